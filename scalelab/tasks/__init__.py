"""Reasoning tasks with generators, a difficulty dial, chain-of-thought renderings and verifiers.

``get_task(name).generate(n, seed, difficulty)`` gives ``Problem`` records; ``answer_format`` holds
the reply format ("...thinking...\\nAnswer: <answer>"), the verifier entry point and the reward.
Importing this package also registers the CoT data generators ("cot_addition", "cot_multiplication",
"cot_expression", "countdown", "sudoku4") in ``scalelab.data.generators``. See docs/reasoning.md.
"""

from __future__ import annotations

from scalelab.errors import ScalelabError
from scalelab.tasks.arithmetic import ADDITION, EXPRESSION, MULTIPLICATION
from scalelab.tasks.base import Problem, ReasoningTask
from scalelab.tasks.countdown import COUNTDOWN
from scalelab.tasks.sudoku import SUDOKU

TASKS: dict[str, ReasoningTask] = {t.name: t for t in (ADDITION, MULTIPLICATION, EXPRESSION, COUNTDOWN, SUDOKU)}


def get_task(name: str) -> ReasoningTask:
    if name not in TASKS:
        raise ScalelabError(f"unknown reasoning task '{name}' (known: {', '.join(TASKS)})")
    return TASKS[name]


__all__ = ["TASKS", "Problem", "ReasoningTask", "get_task"]
