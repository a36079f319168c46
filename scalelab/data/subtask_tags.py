"""Next-token loss as a weighted sum of sub-tasks.

Every validation token of the synthetic world is tagged with the sub-task its prediction exercises:

- ``filler``: the templated prose around the facts ("was born on", "graduated from", pronouns);
- ``names``: people's full names ("Zelda C. Rasmussen");
- ``facts``: attribute values (cities, universities, majors, employers, birth dates);
- ``digits``: digits of the arithmetic worksheets (operands and results).

The validation loss is then the token-weighted mean of the per-sub-task losses. Logged during
training, they show that sub-tasks saturate at different times: filler is learnt first, memorised
facts last (or never, at small scale), which is why a smooth total loss hides very uneven progress.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from scalelab.data import world as W
from scalelab.errors import ScalelabError

SUBTASKS = ("filler", "names", "facts", "digits")
IGNORE = 255  # the BOS target: the start of a document is no sub-task's
TAGS_FILE = "val_subtasks.npy"

_NAME = re.compile(r"\b[A-Z][a-z]+ [A-Z]\. [A-Z][a-z]+\b")
_VALUES = sorted({*W.CITIES, *W.UNIVERSITIES, *W.MAJORS, *W.EMPLOYERS}, key=len, reverse=True)
# Longest first, so "Kestrel Ridge" wins over "Kestrel" and "Fennel Bay University" over "Fennel Bay".
_FACT = re.compile(
    r"\b(?:(?:" + "|".join(W.MONTHS) + r") \d{1,2}, \d{4}|" + "|".join(re.escape(v) for v in _VALUES) + r")\b"
)
_ARITHMETIC_LINE = re.compile(r"^What is \d+ [-+*] \d+\? \d+$", re.M)
_DIGITS = re.compile(r"\d+")


def tag_world_text(text: str) -> np.ndarray:
    """One sub-task index per UTF-8 byte of ``text``."""
    data = text.encode("utf-8")
    tags = np.zeros(len(data), dtype=np.uint8)
    # Character offsets equal byte offsets only for ASCII; the world corpus is ASCII, anything else is
    # mapped through a char->byte table.
    if len(data) == len(text):
        to_byte = None
    else:
        to_byte = np.cumsum([0] + [len(ch.encode("utf-8")) for ch in text])

    def mark(start: int, end: int, tag: int) -> None:
        if to_byte is not None:
            start, end = int(to_byte[start]), int(to_byte[end])
        tags[start:end] = tag

    for line in _ARITHMETIC_LINE.finditer(text):
        for m in _DIGITS.finditer(line.group()):
            mark(line.start() + m.start(), line.start() + m.end(), SUBTASKS.index("digits"))
    for m in _NAME.finditer(text):
        mark(m.start(), m.end(), SUBTASKS.index("names"))
    for m in _FACT.finditer(text):
        mark(m.start(), m.end(), SUBTASKS.index("facts"))
    return tags


def tag_token_stream(documents: list[str], tokenizer) -> np.ndarray:
    """Sub-task tags aligned with the token stream ``build_shards`` writes: BOS, doc tokens, BOS, ...

    A token takes the tag of its bytes, any sub-task winning over filler (" Zelda" is a name token
    even though it carries the space before it).
    """
    lengths = tokenizer.token_byte_lengths()
    out = []
    for doc, ids in zip(documents, tokenizer.encode_batch(documents)):
        out.append(np.array([IGNORE], dtype=np.uint8))
        byte_tags = tag_world_text(doc)
        ends = np.cumsum(lengths[np.asarray(ids, dtype=np.int64)]) if ids else np.zeros(0, dtype=np.int64)
        if ends.size and ends[-1] != byte_tags.size:
            raise ScalelabError("cannot tag sub-tasks: the tokenizer does not map text to bytes one-to-one")
        starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        # max over each token's bytes: filler is 0, so any sub-task byte claims the token
        safe_starts = np.minimum(starts, max(byte_tags.size - 1, 0))
        per_token = np.maximum.reduceat(byte_tags, safe_starts) if ids else np.zeros(0, dtype=np.uint8)
        empty = ends == starts  # zero-byte tokens (specials) have nothing to reduce over
        per_token[empty] = 0
        out.append(per_token.astype(np.uint8))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.uint8)


def save_tags(tags: np.ndarray, data_dir: str | Path) -> None:
    np.save(Path(data_dir) / TAGS_FILE, tags)


def load_tags(data_dir: str | Path, n_tokens: int) -> np.ndarray | None:
    """The val split's tags, or None if this corpus has none (only the world corpus is tagged)."""
    path = Path(data_dir) / TAGS_FILE
    if not path.is_file():
        return None
    tags = np.load(path, allow_pickle=False)
    if tags.shape != (n_tokens,):
        raise ScalelabError(f"{path} has {tags.size} tags for {n_tokens} val tokens; rebuild the run's data")
    return tags
