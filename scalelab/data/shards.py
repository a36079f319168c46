"""Tokenize once into memory-mapped token shards, with a train/val split.

Layout of a shard folder::

    meta.json          dtype, vocab size, and per split: files, tokens, documents, UTF-8 bytes
    train_000.bin ...  flat token streams; a BOS token precedes every document
    val_000.bin

Bytes are recorded so that loss converts to bits per byte, a tokenizer-independent unit.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scalelab.errors import ScalelabError

ENCODE_CHUNK = 512  # documents per encode_batch call: bounded memory, still batched


@dataclass
class ShardMeta:
    """What meta.json records. ``splits[name]`` has files, tokens (BOS included), documents and bytes
    (UTF-8 bytes of the split's text, BOS excluded): bits per byte = nats/token * tokens / (bytes * ln 2)."""

    dtype: str
    vocab_size: int
    bos_id: int
    splits: dict
    seed: int = 0
    val_fraction: float = 0.1


def split_documents(documents: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Shuffle documents by seed and hold out ``val_fraction`` of them.

    A single document is split by characters instead: its first (1 - val_fraction) trains and the
    rest validates, the classic setup for one-file corpora such as tiny Shakespeare.
    """
    if not documents:
        raise ScalelabError("empty corpus: no documents")
    if not 0.0 < val_fraction < 1.0:
        raise ScalelabError(f"invalid config: data.val_fraction must be between 0 and 1, got {val_fraction}")
    if len(documents) == 1:
        text = documents[0]
        if len(text) < 2:
            raise ScalelabError(f"corpus too short: one document of {len(text)} characters cannot be split into train and val")
        # both sides keep at least one character, however extreme val_fraction is
        cut = min(len(text) - 1, max(1, int(len(text) * (1 - val_fraction))))
        return [text[:cut]], [text[cut:]]
    docs = list(documents)
    random.Random(f"split-{seed}").shuffle(docs)
    n_val = min(len(docs) - 1, max(1, int(round(val_fraction * len(docs)))))
    return docs[n_val:], docs[:n_val]


def _write_split(docs: list[str], tokenizer, out: Path, split: str, dtype, shard_tokens: int) -> dict:
    files, n_tokens, n_bytes = [], 0, 0
    handle, in_shard = None, 0
    for start in range(0, len(docs), ENCODE_CHUNK):
        chunk = docs[start : start + ENCODE_CHUNK]
        n_bytes += sum(len(d.encode("utf-8")) for d in chunk)
        stream = []
        for ids in tokenizer.encode_batch(chunk):
            stream.append(tokenizer.bos_id)
            stream.extend(ids)
        arr = np.asarray(stream, dtype=dtype)
        while arr.size:
            if handle is None or in_shard >= shard_tokens:
                if handle:
                    handle.close()
                name = f"{split}_{len(files):03d}.bin"
                files.append(name)
                handle, in_shard = open(out / name, "wb"), 0
            take = min(arr.size, shard_tokens - in_shard)
            handle.write(arr[:take].tobytes())
            in_shard += take
            n_tokens += take
            arr = arr[take:]
    if handle:
        handle.close()
    return {"files": files, "tokens": n_tokens, "documents": len(docs), "bytes": n_bytes}


def build_shards(documents: list[str], tokenizer, out_dir: str | Path, val_fraction: float = 0.1, seed: int = 0,
                 shard_tokens: int = 100_000_000) -> ShardMeta:
    """Tokenize ``documents`` into ``out_dir`` (see the module docstring); same inputs, same bytes."""
    if shard_tokens < 1:
        raise ScalelabError(f"shard_tokens must be positive, got {shard_tokens}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A stale meta.json would vouch for half-rewritten .bin files if this build is interrupted.
    (out / "meta.json").unlink(missing_ok=True)
    train_docs, val_docs = split_documents(documents, val_fraction, seed)
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    splits = {
        "train": _write_split(train_docs, tokenizer, out, "train", dtype, shard_tokens),
        "val": _write_split(val_docs, tokenizer, out, "val", dtype, shard_tokens),
    }
    meta = ShardMeta(dtype=np.dtype(dtype).name, vocab_size=tokenizer.vocab_size, bos_id=tokenizer.bos_id,
                     splits=splits, seed=seed, val_fraction=val_fraction)
    # meta.json is written last: its presence marks a complete shard folder
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta.__dict__, indent=2))
    tmp.replace(out / "meta.json")
    return meta


class TokenShards:
    """Read access to a shard folder; token arrays are memory-mapped, not loaded."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            raise ScalelabError(f"no token shards in {self.dir} (missing meta.json)")
        try:
            self.meta = ShardMeta(**json.loads(meta_path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, TypeError) as e:
            raise ScalelabError(f"{meta_path} is not a scalelab shard index ({e})") from None

    def _split(self, split: str) -> dict:
        if split not in self.meta.splits:
            raise ScalelabError(f"no split '{split}' in {self.dir} (splits: {', '.join(self.meta.splits)})")
        return self.meta.splits[split]

    def tokens(self, split: str) -> np.ndarray:
        """The split's token stream: a read-only memmap, or an in-memory concatenation of several shards."""
        missing = [f for f in self._split(split)["files"] if not (self.dir / f).is_file()]
        if missing:
            raise ScalelabError(f"token shard {self.dir / missing[0]} is missing; rebuild the shards")
        parts = [np.memmap(self.dir / f, dtype=self.meta.dtype, mode="r") for f in self.meta.splits[split]["files"]]
        if not parts:
            return np.zeros(0, dtype=self.meta.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def bytes_per_token(self, split: str) -> float:
        s = self._split(split)
        if not s["tokens"]:
            raise ScalelabError(f"split '{split}' in {self.dir} is empty")
        return s["bytes"] / s["tokens"]


def load_shards(directory: str | Path, split: str) -> np.ndarray:
    """Shorthand for ``TokenShards(directory).tokens(split)``."""
    return TokenShards(directory).tokens(split)
