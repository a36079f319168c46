"""Countdown: reach a target from a few numbers with + - * / (exact division only, each number at
most once).

Instances are solvable by construction: the target is the value of a random expression over the
numbers. The chain of thought renders a short search: one or two combinations tried that miss, then
the one that works. The verifier parses the answer with ``ast`` and evaluates it itself; it never
calls ``eval``, so an answer such as ``__import__('os')`` is just a wrong answer.
"""

from __future__ import annotations

import ast
import random
import warnings
from collections import Counter

from scalelab.data.registry import Example, register
from scalelab.tasks.answer_format import as_examples
from scalelab.tasks.base import Problem, ReasoningTask, register_task, parse_int, render_expression

_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_MAX_NUMBER, _MAX_TARGET = 12, 999
_MAX_ANSWER_CHARS = 200  # far longer than any honest answer; keeps the parser's work bounded


def apply(op: str, a: int, b: int) -> int | None:
    """Countdown arithmetic on integers: None for a division that is not exact (or by zero)."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0 or a % b:
        return None
    return a // b


def _random_combination(rng: random.Random, numbers: list[int]):
    """Combine all numbers pairwise at random, keeping every intermediate a positive integer (as the
    game does). Returns (tree, value, steps as "a+b=c")."""
    pool = [(n, n) for n in numbers]  # (tree, value)
    steps = []
    while len(pool) > 1:
        i, j = rng.sample(range(len(pool)), 2)
        (ta, a), (tb, b) = pool[i], pool[j]
        ops = ["+", "*"] + (["-"] if a > b else []) + (["/"] if b > 1 and a % b == 0 else [])
        op = rng.choice(ops)
        value = apply(op, a, b)
        steps.append(f"{a}{op}{b}={value}")
        pool = [p for k, p in enumerate(pool) if k not in (i, j)] + [((op, ta, tb), value)]
    return pool[0][0], pool[0][1], steps


class CountdownTask(ReasoningTask):
    name = "countdown"
    min_difficulty, max_difficulty, default_difficulty = 2, 5, 3
    difficulty_meaning = "how many numbers"

    def _make_problem(self, rng: random.Random, difficulty: int) -> Problem:
        while True:
            numbers = [rng.randint(1, _MAX_NUMBER) for _ in range(difficulty)]
            for _ in range(20):
                tree, target, steps = _random_combination(rng, numbers)
                if 1 <= target <= _MAX_TARGET and target not in numbers:
                    return self._problem(rng, numbers, tree, target, steps, difficulty)

    def _problem(self, rng, numbers, tree, target, steps, difficulty) -> Problem:
        tries, wanted = [], rng.randint(1, 2)
        for _ in range(6):  # one or two misses, when the numbers allow them
            if len(tries) == wanted:
                break
            _, value, tried = _random_combination(rng, numbers)
            if value != target:
                tries.append(", ".join(tried) + ", no")
        thinking = "\n".join(tries + [", ".join(steps) + ", yes"])
        listed = " ".join(map(str, numbers))
        solution = render_expression(tree)
        return Problem(self.name, f"Use {listed} to make {target} (+ - * /, each number at most once).",
                       solution, thinking, difficulty, {"numbers": numbers, "target": target, "solution": solution})

    def _check(self, problem: Problem, answer: str) -> bool:
        target = problem.meta["target"]
        if "=" in answer:  # tolerate "(3 + 5) * 4 = 32", but only with the right value after "="
            expression, _, claimed = answer.partition("=")
            if parse_int(claimed) != target:
                return False
            answer = expression
        return evaluate(answer, problem.meta["numbers"]) == target


def evaluate(expression: str, numbers: list[int]) -> int | None:
    """The value of ``expression`` if it is a valid Countdown answer over ``numbers`` (integers,
    + - * / and parentheses only, each number used at most as often as given, every division exact),
    else None. Parses with ``ast`` and walks the tree itself; nothing is executed."""
    if not isinstance(expression, str) or not expression.strip() or len(expression) > _MAX_ANSWER_CHARS:
        return None
    try:
        with warnings.catch_warnings():  # e.g. an invalid escape in a string literal warns while parsing
            warnings.simplefilter("ignore")
            tree = ast.parse(expression.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    used: list[int] = []
    if not _collect(tree, used) or Counter(used) - Counter(numbers):
        return None
    return _value(tree)


def _collect(node, used: list[int]) -> bool:
    """Is the tree made only of integer literals and + - * /? Appends the literals to ``used``."""
    if isinstance(node, ast.Constant):
        if type(node.value) is not int:
            return False
        used.append(node.value)
        return True
    if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
        return _collect(node.left, used) and _collect(node.right, used)
    return False


def _value(node) -> int | None:
    if isinstance(node, ast.Constant):
        return node.value
    left, right = _value(node.left), _value(node.right)
    if left is None or right is None:
        return None
    return apply(_AST_OPS[type(node.op)], left, right)


def solve(numbers: list[int], target: int) -> str | None:
    """An expression over ``numbers`` that makes ``target``, or None: exhaustive search over pairwise
    combinations (tiny here: at most 5 numbers), skipping multisets of values already explored."""
    seen: set[tuple[int, ...]] = set()

    def search(pool: list[tuple[int, str]]) -> str | None:
        for value, text in pool:
            if value == target:
                return text
        key = tuple(sorted(v for v, _ in pool))
        if len(pool) < 2 or key in seen:
            return None
        seen.add(key)
        for i in range(len(pool)):
            for j in range(len(pool)):
                if i == j:
                    continue
                (a, ta), (b, tb) = pool[i], pool[j]
                rest = [p for k, p in enumerate(pool) if k not in (i, j)]
                for op in "+-*/":
                    value = apply(op, a, b)
                    if value is not None:
                        found = search(rest + [(value, f"({ta} {op} {tb})")])
                        if found:
                            return found
        return None

    return search([(n, str(n)) for n in numbers])


COUNTDOWN = register_task(CountdownTask())


@register("countdown")
def countdown(n: int, rng: random.Random, *, difficulty: int = 3) -> list[Example]:
    """Countdown with a short search as chain of thought. Prompt "Use 3 5 4 to make 32 (+ - * /, each
    number at most once).", answer the reply "3*5=15, 15+4=19, no\\n3+5=8, 8*4=32, yes\\nAnswer: (3 + 5) * 4".
    Params: difficulty = how many numbers (2-5). meta: {"numbers", "target", "solution", "difficulty",
    "final_answer"}."""
    return as_examples(COUNTDOWN, "countdown", n, rng, difficulty)
