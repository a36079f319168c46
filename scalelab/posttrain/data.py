"""Post-training data: conversation and preference files, and packing conversations into blocks.

Formats (one JSON object per line):

- conversations: ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]}``
- preferences: ``{"prompt": "...", "chosen": "...", "rejected": "..."}``; ``prompt`` may also be a
  list of messages ending with a user turn, and an optional number ``margin`` feeds the
  reward model's margin loss.

Every problem in a file is a ScalelabError naming the file, the line and the field.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scalelab.data.sources import iter_jsonl
from scalelab.errors import ScalelabError
from scalelab.infer.chat import ROLES
from scalelab.posttrain.chat import prompt_ids, render_training, reply_ids


@dataclass
class Preference:
    prompt: str | list[dict]
    chosen: str
    rejected: str
    margin: float = 0.0
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}
        if self.margin:
            out["margin"] = self.margin
        if self.meta:
            out["meta"] = self.meta
        return out


# -- reading files -------------------------------------------------------------------------------------


def _jsonl_records(path: str | Path):
    p = Path(path)
    if not p.is_file():
        raise ScalelabError(f"data file not found: {p}")
    n = 0
    for lineno, record in iter_jsonl(p):
        if not isinstance(record, dict):
            raise ScalelabError(f"{p}:{lineno}: expected a JSON object, got {type(record).__name__}")
        n += 1
        yield f"{p}:{lineno}", record
    if n == 0:
        raise ScalelabError(f"{p} holds no records")


def check_messages(messages, where: str, need_assistant: bool = True) -> list[dict]:
    """``messages`` as a clean list of {"role", "content"} dicts, or an error naming ``where``."""
    if not isinstance(messages, list):
        raise ScalelabError(f"{where}: 'messages' must be a list of {{role, content}} objects")
    if not messages:
        raise ScalelabError(f"{where}: 'messages' is empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ScalelabError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        for key in ("role", "content"):
            if key not in m:
                raise ScalelabError(f"{where}: messages[{i}] has no '{key}' field")
        if m["role"] not in ROLES:
            raise ScalelabError(f"{where}: messages[{i}].role must be one of {', '.join(ROLES)}, got {m['role']!r}")
        if not isinstance(m["content"], str):
            raise ScalelabError(f"{where}: messages[{i}].content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise ScalelabError(f"{where}: 'messages' has no assistant message, so nothing would be trained")
    return out


def load_conversations(path: str | Path, field_name: str = "messages") -> list[list[dict]]:
    return [check_messages(_field(r, field_name, where), where) for where, r in _jsonl_records(path)]


def _field(record: dict, name: str, where: str):
    if name not in record:
        raise ScalelabError(f"{where}: missing field '{name}' (fields present: {', '.join(record) or 'none'})")
    return record[name]


def check_preference(record: dict, where: str) -> Preference:
    prompt = _field(record, "prompt", where)
    chosen, rejected = _field(record, "chosen", where), _field(record, "rejected", where)
    if isinstance(prompt, list):
        prompt = check_messages(prompt, f"{where} (prompt)", need_assistant=False)
        if prompt[-1]["role"] != "user":
            raise ScalelabError(f"{where}: a 'prompt' given as messages must end with a user message")
    elif not isinstance(prompt, str) or not prompt.strip():
        raise ScalelabError(f"{where}: 'prompt' must be a non-empty string or a list of messages")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            raise ScalelabError(f"{where}: '{name}' must be a string")
    if chosen == rejected:
        raise ScalelabError(f"{where}: 'chosen' equals 'rejected', so the pair says nothing")
    margin = record.get("margin", 0.0)
    if not isinstance(margin, (int, float)) or isinstance(margin, bool):
        raise ScalelabError(f"{where}: 'margin' must be a number")
    meta = record.get("meta", {})
    return Preference(prompt, chosen, rejected, float(margin), meta if isinstance(meta, dict) else {})


def load_preferences(path: str | Path) -> list[Preference]:
    return [check_preference(r, where) for where, r in _jsonl_records(path)]


def load_hf_records(name: str, split: str) -> tuple[str, list[dict]]:
    """Rows of a Hugging Face dataset (hub name, saved folder, or a local data file)."""
    try:
        # deferred: HF datasets is an optional extra (pip install scalelab[hf])
        import datasets
    except ImportError:
        raise ScalelabError("HF datasets need the datasets package: pip install 'scalelab[hf]'") from None
    p = Path(name)
    try:
        if p.is_dir():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ScalelabError(f"{p} has no split '{split}' (splits: {', '.join(ds)})")
                ds = ds[split]
        elif p.is_file():
            builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(p.suffix, "json")
            ds = datasets.load_dataset(builder, data_files=str(p), split="train")
        else:
            ds = datasets.load_dataset(name, split=split)
    except ScalelabError:
        raise
    except Exception as e:  # datasets raises many types (a missing hub connection included)
        raise ScalelabError(f"cannot load HF dataset {name!r} (split {split!r}): {e}") from None
    return f"{name}[{split}]", [dict(r) for r in ds]


def load_hf_conversations(name: str, split: str = "train", field_name: str = "messages") -> list[list[dict]]:
    src, rows = load_hf_records(name, split)
    if not rows:
        raise ScalelabError(f"{src} holds no records")
    return [check_messages(_field(r, field_name, f"{src} row {i}"), f"{src} row {i}") for i, r in enumerate(rows)]


def load_hf_preferences(name: str, split: str = "train") -> list[Preference]:
    src, rows = load_hf_records(name, split)
    if not rows:
        raise ScalelabError(f"{src} holds no records")
    return [check_preference(r, f"{src} row {i}") for i, r in enumerate(rows)]


def write_jsonl(path: str | Path, records) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def split_holdout(items: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded shuffle, then (train, val); val has at least one item when there are two or more."""
    items = list(items)
    random.Random(f"holdout-{seed}").shuffle(items)
    n_val = max(1, int(round(len(items) * val_fraction))) if len(items) > 1 and val_fraction > 0 else 0
    return items[n_val:], items[:n_val]


# -- conversations as token blocks -----------------------------------------------------------------------


def tokenize_conversations(tokenizer, conversations: list[list[dict]], max_len: int) -> tuple[list, int]:
    """(ids, mask) per conversation, cut to ``max_len`` tokens; also how many were dropped.

    A conversation is dropped only when the cut leaves it no trained token.
    """
    rows, dropped = [], 0
    for messages in conversations:
        ids, mask = render_training(tokenizer, messages)
        ids, mask = ids[:max_len], mask[:max_len]
        if sum(mask[1:]) == 0:
            dropped += 1
            continue
        rows.append((ids, mask))
    return rows, dropped


def pack(rows: list[tuple[list[int], list[int]]], length: int, pad_id: int, seed: int = 0, shuffle: bool = True
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedily fill blocks of ``length`` tokens with whole conversations; returns (ids, mask) of shape (N, length).

    Each conversation keeps its own BOS, which the model learns to read as a reset (we do not mask
    attention across conversations: the usual, cheap choice). Padding carries no loss. A row
    longer than ``length`` must be cut before packing (tokenize_conversations does).
    """
    order = list(range(len(rows)))
    if shuffle:
        random.Random(f"pack-{seed}").shuffle(order)
    blocks: list[tuple[list[int], list[int]]] = []
    cur_ids: list[int] = []
    cur_mask: list[int] = []
    for i in order:
        ids, mask = rows[i]
        if len(ids) > length:
            raise ValueError("rows must be cut to the block length before packing")
        if len(cur_ids) + len(ids) > length:
            blocks.append((cur_ids, cur_mask))
            cur_ids, cur_mask = [], []
        cur_ids = cur_ids + ids
        cur_mask = cur_mask + mask
    if cur_ids:
        blocks.append((cur_ids, cur_mask))
    return pad_rows(blocks, length, pad_id)


def pad_rows(rows: list[tuple[list[int], list[int]]], length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for r, (i, m) in enumerate(rows):
        ids[r, : len(i)] = torch.tensor(i, dtype=torch.long)
        mask[r, : len(m)] = torch.tensor(m, dtype=torch.long)
    return ids, mask


def masked_targets(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) for GPT.forward: y is -1 wherever the target token carries no loss."""
    x = ids[:, :-1]
    y = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -1)
    return x, y


# -- preference pairs as token rows ----------------------------------------------------------------------


def tokenize_preferences(tokenizer, prefs: list[Preference], max_len: int):
    """For each pair that fits in ``max_len`` tokens: (chosen ids, chosen mask, rejected ids, rejected mask, margin).

    The mask marks the reply tokens (what DPO scores); a pair that does not fit is dropped, never
    cut, since a cut reply is a different answer. Returns (rows, number dropped).
    """
    rows, dropped = [], 0
    for p in prefs:
        prompt = prompt_ids(tokenizer, p.prompt)
        pair = []
        for reply in (p.chosen, p.rejected):
            r = reply_ids(tokenizer, reply, p.prompt)
            pair.append((prompt + r, [0] * len(prompt) + [1] * len(r)))
        if max(len(pair[0][0]), len(pair[1][0])) > max_len:
            dropped += 1
            continue
        rows.append((pair[0][0], pair[0][1], pair[1][0], pair[1][1], p.margin))
    return rows, dropped


def preference_batch(rows, pad_id: int):
    """Chosen then rejected rows, right-padded to one length: ids (2B, T), mask (2B, T), lengths (2B,), margins (B,)."""
    seqs = [(r[0], r[1]) for r in rows] + [(r[2], r[3]) for r in rows]
    length = max(len(s[0]) for s in seqs)
    ids, mask = pad_rows(seqs, length, pad_id)
    lengths = torch.tensor([len(s[0]) for s in seqs], dtype=torch.long)
    margins = torch.tensor([r[4] for r in rows], dtype=torch.float32)
    return ids, mask, lengths, margins
