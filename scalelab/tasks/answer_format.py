"""The one reply format every reasoning task uses, and the reward built on it.

A reply is free-form thinking whose last line is ``Answer: <answer>``. The marker is fixed so one
parser serves every task, a truncated thinking trace can be forced to commit (append
``force_answer_suffix()`` and let the model finish the line), and format compliance can be
rewarded separately from correctness.
"""

from __future__ import annotations

import random
from typing import Callable

from scalelab.errors import ScalelabError
from scalelab.data.registry import Example
from scalelab.tasks.base import Problem, ReasoningTask, get_task

ANSWER_MARKER = "Answer:"


def render_reply(problem: Problem, with_thinking: bool) -> str:
    """The target reply: thinking then the answer line (chain of thought), or the answer line alone."""
    if with_thinking and problem.thinking:
        return f"{problem.thinking}\n{ANSWER_MARKER} {problem.answer}"
    return f"{ANSWER_MARKER} {problem.answer}"


def parse_answer(text: str) -> str | None:
    """The text after the last "Answer:" up to the end of its line, stripped; None if there is no
    marker or nothing after it. The last marker wins, so thinking may mention "Answer:" freely."""
    if not isinstance(text, str):
        return None
    at = text.rfind(ANSWER_MARKER)
    if at < 0:
        return None
    answer = text[at + len(ANSWER_MARKER):].split("\n", 1)[0].strip()
    return answer or None


def verify(problem: Problem, text: str) -> dict:
    """{"correct", "formatted", "answer"}: formatted means the reply has a non-empty answer line;
    correct means the task's verifier accepts that answer. A malformed reply is never correct."""
    answer = parse_answer(text)
    correct = answer is not None and get_task(problem.task).check(problem, answer)
    return {"correct": bool(correct), "formatted": answer is not None, "answer": answer}


def make_reward(correct: float = 1.0, formatted: float = 0.1, wrong: float = 0.0,
                malformed: float = -0.1) -> Callable[[Problem, str], float]:
    """``reward(problem, reply) -> float``, the sum of a correctness term (``correct`` or ``wrong``)
    and a format term (``formatted`` if the reply has an answer line, else ``malformed``). With the
    defaults: a correct reply 1.1, a well-formatted wrong one 0.1, one with no answer line -0.1.
    Pass formatted=0, malformed=0 for a pure 0/1 correctness reward."""
    weights = {"correct": correct, "formatted": formatted, "wrong": wrong, "malformed": malformed}
    for key, value in weights.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ScalelabError(f"reward weight '{key}' must be a number, got {value!r}")

    def reward(problem: Problem, text: str) -> float:
        result = verify(problem, text)
        return float((correct if result["correct"] else wrong) + (formatted if result["formatted"] else malformed))

    reward.weights = weights  # so a log can record which reward a run used
    return reward


def force_answer_suffix() -> str:
    """What to append to a thinking trace cut off by a token budget so the model answers next."""
    return f"\n{ANSWER_MARKER}"


def as_examples(task: ReasoningTask, generator_name: str, n: int, rng: random.Random, difficulty: int) -> list[Example]:
    """Problems as ``Example(prompt, answer = reply with thinking)``; meta adds the final answer."""
    return [Example(generator_name, p.prompt, render_reply(p, with_thinking=True),
                    {**p.meta, "difficulty": p.difficulty, "final_answer": p.answer})
            for p in task.sample(rng, n, difficulty)]
