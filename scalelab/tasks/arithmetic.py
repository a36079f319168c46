"""Arithmetic with worked steps: column addition, long multiplication, multi-step expressions.

The chains of thought are compact on purpose: the models are tiny char/BPE models trained from
scratch, so a whole problem + steps + answer at the hardest difficulty stays near 200 characters.
"""

from __future__ import annotations

import random

from scalelab.data.registry import Example, register
from scalelab.tasks.answer_format import as_examples
from scalelab.tasks.base import Problem, ReasoningTask, register_task, operand_text, parse_int, render_expression


def _operand(rng: random.Random, digits: int) -> int:
    # Exactly ``digits`` digits (no leading zero); 1-digit operands include 0.
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


class _IntegerAnswerTask(ReasoningTask):
    def _check(self, problem: Problem, answer: str) -> bool:
        value = parse_int(answer)
        return value is not None and value == problem.meta["value"]


class AdditionTask(_IntegerAnswerTask):
    """Two numbers of exactly ``difficulty`` digits. Steps: one column per line, right to left, with
    the carry and the answer digits written so far ("9+2+1=12 carry 1 -> 24")."""

    name = "addition"
    min_difficulty, max_difficulty, default_difficulty = 1, 6, 3
    difficulty_meaning = "digits per operand"

    def _make_problem(self, rng: random.Random, difficulty: int) -> Problem:
        a, b = _operand(rng, difficulty), _operand(rng, difficulty)
        return Problem(self.name, f"What is {a} + {b}?", str(a + b), addition_steps(a, b), difficulty,
                       {"a": a, "b": b, "op": "+", "value": a + b})


def addition_steps(a: int, b: int) -> str:
    da, db = str(a)[::-1], str(b)[::-1]
    width = max(len(da), len(db))
    lines, written, carry = [], "", 0
    for i in range(width):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        total = x + y + carry
        terms = f"{x}+{y}" + (f"+{carry}" if carry else "")
        if i == width - 1:  # the last column writes its whole sum, carry included
            written = str(total) + written
            lines.append(f"{terms}={total} -> {written}")
        else:
            written = str(total % 10) + written
            carry = total // 10
            lines.append(f"{terms}={total}" + (" carry 1" if carry else "") + f" -> {written}")
    return "\n".join(lines)


class MultiplicationTask(_IntegerAnswerTask):
    """Two numbers of exactly ``difficulty`` digits. Steps: the first number times each digit of
    the second in its place ("4821*30=144630"), then the partial products summed one per line."""

    name = "multiplication"
    min_difficulty, max_difficulty, default_difficulty = 1, 4, 2
    difficulty_meaning = "digits per operand"

    def _make_problem(self, rng: random.Random, difficulty: int) -> Problem:
        a, b = _operand(rng, difficulty), _operand(rng, difficulty)
        return Problem(self.name, f"What is {a} * {b}?", str(a * b), multiplication_steps(a, b), difficulty,
                       {"a": a, "b": b, "op": "*", "value": a * b})


def multiplication_steps(a: int, b: int) -> str:
    partials = [(int(d) * 10**place) for place, d in enumerate(str(b)[::-1])]
    lines = [f"{a}*{p}={a * p}" for p in partials]
    running = a * partials[0]
    for p in partials[1:]:
        lines.append(f"{running}+{a * p}={running + a * p}")
        running += a * p
    return "\n".join(lines)


# -- expressions --------------------------------------------------------------------------------------
# A tree is an int (a leaf) or a tuple (op, left, right).

_APPLY = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}


def _reduce_leftmost(tree):
    """(tree with its leftmost ready operation evaluated, that operation as "a op b = c"); the
    leftmost node whose operands are both numbers is always a legal next step by precedence."""
    op, left, right = tree
    if isinstance(left, int) and isinstance(right, int):
        value = _APPLY[op](left, right)
        return value, f"{operand_text(left)} {op} {operand_text(right)} = {value}"
    if not isinstance(left, int):
        new_left, step = _reduce_leftmost(left)
        return (op, new_left, right), step
    new_right, step = _reduce_leftmost(right)
    return (op, left, new_right), step


def expression_steps(tree) -> tuple[str, int]:
    """One operation per line ("7 + 5 = 12, so 12 * 3 - 4"), and the value."""
    lines = []
    while not isinstance(tree, int):
        tree, step = _reduce_leftmost(tree)
        lines.append(step if isinstance(tree, int) else f"{step}, so {render_expression(tree)}")
    return "\n".join(lines), tree


def _random_tree(rng: random.Random, n_ops: int):
    if n_ops == 0:
        return rng.randint(1, 9)
    n_left = rng.randint(0, n_ops - 1)
    op = rng.choice("+-*")
    return (op, _random_tree(rng, n_left), _random_tree(rng, n_ops - 1 - n_left))


class ExpressionTask(_IntegerAnswerTask):
    """Expressions of 1-digit numbers with + - * and parentheses, e.g. "(7 + 5) * 3 - 4";
    ``difficulty`` operations. Steps: one operation per line in order of precedence."""

    name = "expression"
    min_difficulty, max_difficulty, default_difficulty = 1, 5, 2
    difficulty_meaning = "number of operations"

    def _make_problem(self, rng: random.Random, difficulty: int) -> Problem:
        tree = _random_tree(rng, difficulty)
        text = render_expression(tree)
        steps, value = expression_steps(tree)
        return Problem(self.name, f"What is {text}?", str(value), steps, difficulty,
                       {"expression": text, "value": value})


# -- data-generator registry: the CoT replies as pretraining / SFT text -------------------------------

ADDITION = register_task(AdditionTask())
MULTIPLICATION = register_task(MultiplicationTask())
EXPRESSION = register_task(ExpressionTask())


@register("cot_addition")
def cot_addition(n: int, rng: random.Random, *, difficulty: int = 3) -> list[Example]:
    """Addition with column-wise steps. Prompt "What is 512 + 907?", answer the reply
    "2+7=9 -> 9\\n1+0=1 -> 19\\n5+9=14 -> 1419\\nAnswer: 1419". Params: difficulty = digits (1-6).
    meta: {"a", "b", "op", "value", "difficulty", "final_answer"}."""
    return as_examples(ADDITION, "cot_addition", n, rng, difficulty)


@register("cot_multiplication")
def cot_multiplication(n: int, rng: random.Random, *, difficulty: int = 2) -> list[Example]:
    """Multiplication with partial products then their sum. Prompt "What is 12 * 34?", answer the
    reply "12*4=48\\n12*30=360\\n48+360=408\\nAnswer: 408". Params: difficulty = digits (1-4).
    meta: {"a", "b", "op", "value", "difficulty", "final_answer"}."""
    return as_examples(MULTIPLICATION, "cot_multiplication", n, rng, difficulty)


@register("cot_expression")
def cot_expression(n: int, rng: random.Random, *, difficulty: int = 2) -> list[Example]:
    """Multi-step expressions. Prompt "What is (7 + 5) * 3?", answer the reply
    "7 + 5 = 12, so 12 * 3\\n12 * 3 = 36\\nAnswer: 36". Params: difficulty = operations (1-5).
    meta: {"expression", "value", "difficulty", "final_answer"}."""
    return as_examples(EXPRESSION, "cot_expression", n, rng, difficulty)
