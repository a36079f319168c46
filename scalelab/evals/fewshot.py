"""Zero-, one- and few-shot prompts: solved examples from a task's train split before the test item.

Shots are drawn per test item from a seeded permutation of the train split, so the k-shot prompt's
examples are the first k of the (k+1)-shot prompt's: a curve over shot counts changes one thing at a
time. A shot is never the test item itself, checked by identity and by text, because a leaked answer
would turn "in-context learning" into copying.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

from scalelab.errors import ScalelabError


def parse_shots(text: str) -> list[int]:
    """"0,1,5" -> [0, 1, 5]; a ScalelabError for anything that is not a list of counts >= 0."""
    try:
        shots = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ScalelabError(f"--shots must be comma-separated counts such as 0,1,5, got {text!r}") from None
    if not shots or any(s < 0 for s in shots):
        raise ScalelabError(f"--shots must be comma-separated counts >= 0, got {text!r}")
    return sorted(set(shots))


def draw_shots(pool: Sequence, item, k: int, seed: int, index: int, text_of: Callable[[object], str]) -> list:
    """``k`` shots for the test ``item`` (the ``index``-th test item) from ``pool``, never the item itself.

    ``text_of`` gives an item's text as a solved shot; a pool entry with the same text as the test item is
    excluded as surely as the item object.
    """
    if k == 0:
        return []
    test_text = text_of(item)
    candidates = [p for p in pool if p is not item and text_of(p) != test_text]
    if len(candidates) < k:
        raise ScalelabError(f"{k} shots asked for, but the train split has only {len(candidates)} usable examples")
    order = list(range(len(candidates)))
    random.Random(f"shots-{seed}-{index}").shuffle(order)
    shots = [candidates[i] for i in order[:k]]
    assert all(s is not item and text_of(s) != test_text for s in shots), "a shot leaked the test item"
    return shots


def build_prompt(shots: list, item, render_shot: Callable[[object], str], separator: str) -> str:
    """The solved shots, each rendered with its answer, then the test item's prompt."""
    parts = [render_shot(s) for s in shots] + [item.prompt]
    return separator.join(parts)
