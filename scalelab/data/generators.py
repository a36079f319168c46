"""The built-in task generators: arithmetic and QA over the synthetic world (see scalelab.data.registry).

The reasoning tasks register their chain-of-thought generators (cot_addition, countdown, sudoku4, ...)
from scalelab.tasks. This module re-exports the registry's functions, so ``generators.generate`` works.
"""

from __future__ import annotations

import random

from scalelab.data.registry import (Example, available, describe, generate, generator_params, get_generator,
                                    register)
from scalelab.data.world import World, WorldConfig, render_qa
from scalelab.errors import ScalelabError

__all__ = ["Example", "available", "describe", "generate", "generator_params", "get_generator", "register"]


_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_MAX_DIGITS = 40  # beyond this a "problem" is mostly a copying exercise; a typo guard more than a limit


def _number(rng: random.Random, digits: int) -> int:
    # 1-digit operands include 0; longer ones have no leading zero, so the digit count is exact.
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


@register("arithmetic")
def arithmetic(n: int, rng: random.Random, *, ops: str = "+*", min_digits: int = 1, max_digits: int = 3) -> list[Example]:
    """Integer arithmetic. Prompt "What is 123 + 45?", answer "168" (negative results as "-77").

    Params: ops, the operators to draw uniformly from, any of "+", "-", "*" (a string such as "+*" or
    a sequence of them); each operand independently has between min_digits and max_digits digits.
    meta: {"a", "b", "op", "digits"}, digits being the larger operand's digit count.
    """
    op_list = list(ops)
    if not op_list or any(o not in _OPS for o in op_list):
        raise ScalelabError(f"task generator 'arithmetic': ops must be made of + - *, got {ops!r}")
    if not 1 <= min_digits <= max_digits <= _MAX_DIGITS:
        raise ScalelabError(
            f"task generator 'arithmetic': need 1 <= min_digits <= max_digits <= {_MAX_DIGITS}, "
            f"got {min_digits}, {max_digits}"
        )
    out = []
    for _ in range(n):
        op = rng.choice(op_list)
        da, db = rng.randint(min_digits, max_digits), rng.randint(min_digits, max_digits)
        a, b = _number(rng, da), _number(rng, db)
        out.append(Example("arithmetic", f"What is {a} {op} {b}?", str(_OPS[op](a, b)),
                           {"a": a, "b": b, "op": op, "digits": max(da, db)}))
    return out


def _fixed_digits(task: str, op: str, n: int, rng: random.Random, digits: int) -> list[Example]:
    if not 1 <= digits <= _MAX_DIGITS:
        raise ScalelabError(f"task generator '{task}': digits must be between 1 and {_MAX_DIGITS}, got {digits}")
    examples = arithmetic(n, rng, ops=op, min_digits=digits, max_digits=digits)
    for e in examples:
        e.task = task
    return examples


@register("addition")
def addition(n: int, rng: random.Random, *, digits: int = 3) -> list[Example]:
    """Addition of two numbers of exactly ``digits`` digits. Schema as "arithmetic", op "+"."""
    return _fixed_digits("addition", "+", n, rng, digits)


@register("addition_reversed")
def addition_reversed(n: int, rng: random.Random, *, digits: int = 3) -> list[Example]:
    """Addition in the compact format small models learn fast: prompt "512+907=", answer "9141".

    The answer is the sum written least significant digit first and zero-padded to ``digits + 1``
    digits (1419 -> "9141", 579 -> "9750"), so each answer digit follows the operand digits it
    depends on, and every answer has the same length. Operands as in "addition".
    meta: {"a", "b", "op", "digits", "value"}.
    """
    out = []
    for e in _fixed_digits("addition_reversed", "+", n, rng, digits):
        a, b = e.meta["a"], e.meta["b"]
        out.append(Example("addition_reversed", f"{a}+{b}=", str(a + b).zfill(digits + 1)[::-1],
                           {**e.meta, "value": a + b}))
    return out


@register("multiplication")
def multiplication(n: int, rng: random.Random, *, digits: int = 2) -> list[Example]:
    """Multiplication of two numbers of exactly ``digits`` digits. Schema as "arithmetic", op "*"."""
    return _fixed_digits("multiplication", "*", n, rng, digits)


# -- world QA -----------------------------------------------------------------------------------------

_WORLD_SPLITS = ("all", "qa_train", "qa_eval", "unknown")


@register("world_qa")
def world_qa(n: int, rng: random.Random, *, world_seed: int | None = None, n_people: int = 400,
             unknown_fraction: float = 0.0, qa_in_pretrain_fraction: float = 0.5, split: str = "all",
             seed: int = 0) -> list[Example]:
    """QA over the synthetic world. Prompt "Question: Where was X B. Y born?\\nAnswer:", answer "Port Alder".

    Params: world_seed (default: the seed passed to generate), n_people, unknown_fraction and
    qa_in_pretrain_fraction select the world exactly as the data.world fields of the same names, so
    pass the run's values to get its splits. split is "all", "qa_train" (QA that pretraining shows),
    "qa_eval" (known people, QA held out) or "unknown" (people pretraining never mentions).
    Questions are drawn without repeats until the split's pool (every template of every attribute)
    runs out, then the pool is reshuffled. meta: {"person_id", "attribute", "split"}.
    """
    if split not in _WORLD_SPLITS:
        raise ScalelabError(f"task generator 'world_qa': split must be one of {', '.join(_WORLD_SPLITS)}, got {split!r}")
    cfg = WorldConfig(seed=seed if world_seed is None else world_seed, n_people=n_people,
                      unknown_fraction=unknown_fraction, qa_in_pretrain_fraction=qa_in_pretrain_fraction,
                      extra_tasks={})
    world = World(cfg)
    groups = world.split_people()
    pool = world.qa_pairs(None if split == "all" else groups[split])
    if not pool:
        if n == 0:
            return []
        raise ScalelabError(f"task generator 'world_qa': split '{split}' has no people in this world "
                            f"(unknown_fraction={unknown_fraction}, qa_in_pretrain_fraction={qa_in_pretrain_fraction})")
    chosen = []
    while len(chosen) < n:
        batch = list(pool)
        rng.shuffle(batch)
        chosen.extend(batch[: n - len(chosen)])
    return [Example("world_qa", render_qa(q.question), q.answer,
                    {"person_id": q.person_id, "attribute": q.attribute, "split": split}) for q in chosen]
