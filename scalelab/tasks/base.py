"""The shape every reasoning task shares: a ``Problem`` record and the ``ReasoningTask`` base class.

A task draws problems at a difficulty, renders a worked solution (the chain of thought used as
warm-start SFT data) and checks a parsed final answer. Checking must be cheap and total: RL calls it
on every sampled reply, most of them garbage early on, so ``check`` returns False instead of raising.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from scalelab.errors import ScalelabError


@dataclass
class Problem:
    task: str  # registry name, e.g. "addition"
    prompt: str  # the question as a user asks it: one line, no answer
    answer: str  # canonical final answer text
    thinking: str  # worked steps that lead to the answer, without the "Answer:" line
    difficulty: int
    meta: dict = field(default_factory=dict)  # what the verifier needs (operands, numbers and target, grid, ...)


class ReasoningTask:
    """Subclasses set ``name``, the difficulty range and ``default_difficulty``, and implement
    ``_make_problem`` (one problem from an rng) and ``_check`` (a stripped answer string)."""

    name: str = ""
    min_difficulty: int = 1
    max_difficulty: int = 1
    default_difficulty: int = 1
    difficulty_meaning: str = ""  # one phrase for docs and error messages, e.g. "digits per operand"

    def generate(self, n: int, seed: int, difficulty: int) -> list[Problem]:
        """``n`` problems; the same (task, seed, difficulty) always gives the same list, and the first
        k problems of a longer list are the k problems of a shorter one (so an index names a problem)."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ScalelabError(f"task '{self.name}': number of problems must be an integer >= 1, got {n!r}")
        self.check_difficulty(difficulty)
        return self.sample(random.Random(f"{self.name}-{seed}-{difficulty}"), n, difficulty)

    def sample(self, rng: random.Random, n: int, difficulty: int) -> list[Problem]:
        """``n`` problems drawn from ``rng`` (the data-generator registry passes its own rng here)."""
        self.check_difficulty(difficulty)
        return [self._make_problem(rng, difficulty) for _ in range(n)]

    def check_difficulty(self, difficulty: int) -> None:
        if (not isinstance(difficulty, int) or isinstance(difficulty, bool)
                or not self.min_difficulty <= difficulty <= self.max_difficulty):
            raise ScalelabError(
                f"task '{self.name}': difficulty ({self.difficulty_meaning}) must be an integer from "
                f"{self.min_difficulty} to {self.max_difficulty}, got {difficulty!r}"
            )

    def check(self, problem: Problem, answer: str) -> bool:
        """Is ``answer`` (the text after "Answer:") a correct final answer to ``problem``? Never raises
        on garbage answers."""
        if not isinstance(answer, str):
            return False
        return bool(self._check(problem, answer.strip()))

    def _make_problem(self, rng: random.Random, difficulty: int) -> Problem:
        raise NotImplementedError

    def _check(self, problem: Problem, answer: str) -> bool:
        raise NotImplementedError



def parse_int(text: str) -> int | None:
    """A plain integer ("-77", "4821"), or None: no thousands separators, no decimals, no words."""
    text = text.strip()
    body = text[1:] if text.startswith("-") else text
    if not body or len(body) > 40 or not body.isascii() or not body.isdigit():
        return None
    return int(text)


# Precedence of every operator a task writes; expressions and countdown share one renderer.
PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


def render_expression(tree) -> str:
    """Infix text of ``tree`` (an int, or (op, left, right)) with only the parentheses needed to read
    back the same tree (a right operand of equal precedence is bracketed, so "2 - (3 + 4)" and
    "2 + (3 + 4)" keep their shape)."""
    if isinstance(tree, int):
        return operand_text(tree)
    op, left, right = tree
    left_text, right_text = render_expression(left), render_expression(right)
    if not isinstance(left, int) and PRECEDENCE[left[0]] < PRECEDENCE[op]:
        left_text = f"({left_text})"
    if not isinstance(right, int) and PRECEDENCE[right[0]] <= PRECEDENCE[op]:
        right_text = f"({right_text})"
    return f"{left_text} {op} {right_text}"


def operand_text(value: int) -> str:
    # A negative intermediate is bracketed: "12 - (-4)", not "12 - -4".
    return f"({value})" if value < 0 else str(value)


# The registry of reasoning tasks by name. The built-in tasks register themselves when scalelab.tasks
# (the package) imports their modules; Problem.task names an entry here.
TASKS: dict[str, ReasoningTask] = {}


def register_task(task: ReasoningTask) -> ReasoningTask:
    if task.name in TASKS:
        raise ValueError(f"reasoning task '{task.name}' registered twice")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> ReasoningTask:
    if name not in TASKS:
        raise ScalelabError(f"unknown reasoning task '{name}' (known: {', '.join(TASKS)})")
    return TASKS[name]
