"""Reasoning tasks with generators, a difficulty dial, chain-of-thought renderings and verifiers.

``get_task(name).generate(n, seed, difficulty)`` gives ``Problem`` records; ``answer_format`` holds
the reply format ("...thinking...\\nAnswer: <answer>"), the verifier entry point and the reward.
Importing this package also registers the CoT data generators ("cot_addition", "cot_multiplication",
"cot_expression", "countdown", "sudoku4") in ``scalelab.data.generators``. See docs/reasoning.md.
"""

from __future__ import annotations

# The built-in tasks: importing their modules registers them (in base.TASKS and in the generator registry).
from scalelab.tasks import arithmetic, countdown, sudoku  # noqa: F401
from scalelab.tasks.base import TASKS, Problem, ReasoningTask, get_task


__all__ = ["TASKS", "Problem", "ReasoningTask", "get_task"]
