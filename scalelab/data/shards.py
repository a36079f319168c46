"""Token shards: memory-mapped token streams with a train/val split, and their manifest.

Layout of a shard folder::

    meta.json          the manifest: dtype, vocab size, tokenizer hash, per split files, tokens, documents,
                       UTF-8 bytes, and per shard its tokens, documents and sha256; duplicates and skipped records
    train_000.bin ...  flat token streams of ``shard_tokens`` tokens (the last one shorter); a BOS token
    val_000.bin        precedes every document
    progress.json      how far a build got (see shard_writer), so a killed build resumes

Bytes are recorded so that loss converts to bits per byte, a tokenizer-independent unit.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from scalelab.data.shard_writer import write_shards
from scalelab.data.sources import Piece, SourceErrors, split_by_characters
from scalelab.errors import ScalelabError


@dataclass
class ShardMeta:
    """What meta.json records. ``splits[name]`` has files, tokens (BOS included), documents and bytes
    (UTF-8 bytes of the split's text, BOS excluded): bits per byte = nats/token * tokens / (bytes * ln 2).
    ``split_rule``: shuffle (an in-memory document list), hash (streamed: hash of content and seed) or
    characters (a single document cut in two)."""

    dtype: str
    vocab_size: int
    bos_id: int
    splits: dict
    seed: int = 0
    val_fraction: float = 0.1
    shards: dict = field(default_factory=dict)
    tokenizer_sha256: str = ""
    split_rule: str = "shuffle"
    duplicates: int = 0
    skipped: int = 0
    skipped_kinds: dict = field(default_factory=dict)


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
        train, val = split_by_characters(documents[0], val_fraction)
        return [train], [val]
    docs = list(documents)
    random.Random(f"split-{seed}").shuffle(docs)
    n_val = min(len(docs) - 1, max(1, int(round(val_fraction * len(docs)))))
    return docs[n_val:], docs[:n_val]


def build_shards(documents: list[str], tokenizer, out_dir: str | Path, val_fraction: float = 0.1, seed: int = 0,
                 shard_tokens: int = 100_000_000) -> ShardMeta:
    """Tokenize an in-memory document list, split by ``split_documents`` (no deduplication): the
    embedded world corpus's path, whose token stream must not change. Same inputs, same bytes."""
    train_docs, val_docs = split_documents(documents, val_fraction, seed)

    def pieces(_single_doc_val) -> Iterable[Piece]:
        yield from (Piece(d, split="train") for d in train_docs)
        yield from (Piece(d, split="val") for d in val_docs)

    return _finish(out_dir, tokenizer, seed, val_fraction, "shuffle",
                   lambda: write_shards(pieces, tokenizer, out_dir, val_fraction=val_fraction, seed=seed,
                                        shard_tokens=shard_tokens, dedup=False))


def stream_shards(make_stream: Callable[[float | None], Iterable[Piece]], tokenizer, out_dir: str | Path, *,
                  val_fraction: float = 0.1, seed: int = 0, shard_tokens: int = 100_000_000, dedup: bool = True,
                  workers: int = 0, progress: bool = False, source: str = "", errors: SourceErrors | None = None,
                  single_document: bool = False) -> ShardMeta:
    """Stream a corpus into shards (see shard_writer): split per document by a hash of its content and the
    seed, exact duplicates dropped, resumable. A corpus of one document is cut by characters instead."""
    # a CorpusStream carries the error policy its readers report to
    errors = errors or getattr(make_stream, "errors", None) or SourceErrors()
    return _finish(out_dir, tokenizer, seed, val_fraction, "hash", lambda: write_shards(
        make_stream, tokenizer, out_dir, val_fraction=val_fraction, seed=seed, shard_tokens=shard_tokens,
        dedup=dedup, workers=workers, progress=progress, source=source, errors=errors,
        single_document=single_document))


def _finish(out_dir, tokenizer, seed: int, val_fraction: float, rule: str, build) -> ShardMeta:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A stale meta.json would vouch for half-rewritten .bin files if this build is interrupted.
    (out / "meta.json").unlink(missing_ok=True)
    r = build()
    if r["documents"] == 0:
        detail = f" ({r['skipped']} bad records skipped)" if r["skipped"] else ""
        raise ScalelabError(f"empty corpus: no non-empty documents{detail}")
    meta = ShardMeta(dtype=r["dtype"], vocab_size=tokenizer.vocab_size, bos_id=tokenizer.bos_id, splits=r["splits"],
                     seed=seed, val_fraction=val_fraction, shards=r["shards"], tokenizer_sha256=r["tokenizer_sha256"],
                     split_rule=rule if r["split_rule"] == "hash" else r["split_rule"], duplicates=r["duplicates"],
                     skipped=r["skipped"], skipped_kinds=r["skipped_kinds"])
    # meta.json is written last: its presence marks a complete shard folder
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta.__dict__, indent=2))
    tmp.replace(out / "meta.json")
    return meta


class ShardedTokens:
    """Several memory-mapped shards read as one token stream. Slicing reads just the slice (across a shard
    boundary when needed); nothing is concatenated, so no shard is ever loaded whole."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"token {key} is outside a stream of {len(self)}")
            p = int(np.searchsorted(self.starts, i, side="right")) - 1
            return self.parts[p][i - self.starts[p]]
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("sharded tokens support integer indices and contiguous slices")
        lo, hi, _ = key.indices(len(self))
        if hi <= lo:
            return np.zeros(0, dtype=self.dtype)
        first = int(np.searchsorted(self.starts, lo, side="right")) - 1
        out = []
        p = first
        while p < len(self.parts) and self.starts[p] < hi:
            a, b = max(lo, self.starts[p]) - self.starts[p], min(hi, self.starts[p + 1]) - self.starts[p]
            out.append(self.parts[p][a:b])
            p += 1
        return out[0] if len(out) == 1 else np.concatenate(out)

    def __iter__(self):
        for p in self.parts:
            yield from p

    def __array__(self, dtype=None, copy=None):
        # an explicit np.asarray(...) of the whole stream (the n-gram baseline) does load it
        whole = np.concatenate(self.parts)
        return whole if dtype is None else whole.astype(dtype)


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

    def tokens(self, split: str) -> np.ndarray | ShardedTokens:
        """The split's token stream: a read-only memmap, or a ShardedTokens view over several."""
        missing = [f for f in self._split(split)["files"] if not (self.dir / f).is_file()]
        if missing:
            raise ScalelabError(f"token shard {self.dir / missing[0]} is missing; rebuild the shards")
        itemsize = np.dtype(self.meta.dtype).itemsize
        for shard in self.meta.shards.get(split, []):
            size = (self.dir / shard["name"]).stat().st_size
            if size != shard["tokens"] * itemsize:
                raise ScalelabError(f"token shard {self.dir / shard['name']} has {size} bytes, the manifest says "
                                    f"{shard['tokens'] * itemsize}; rebuild the shards")
        parts = [np.memmap(self.dir / f, dtype=self.meta.dtype, mode="r") for f in self.meta.splits[split]["files"]]
        if not parts:
            return np.zeros(0, dtype=self.meta.dtype)
        return parts[0] if len(parts) == 1 else ShardedTokens(parts)

    def verify(self) -> None:
        """Check every shard against the manifest's sha256, reading each in blocks (never whole)."""
        for split, shards in self.meta.shards.items():
            for shard in shards:
                h = hashlib.sha256()
                with open(self.dir / shard["name"], "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                if h.hexdigest() != shard["sha256"]:
                    raise ScalelabError(f"token shard {self.dir / shard['name']} does not match its sha256 in "
                                        "meta.json; rebuild the shards")

    def bytes_per_token(self, split: str) -> float:
        s = self._split(split)
        if not s["tokens"]:
            raise ScalelabError(f"split '{split}' in {self.dir} is empty")
        return s["bytes"] / s["tokens"]


def load_shards(directory: str | Path, split: str) -> np.ndarray:
    """Shorthand for ``TokenShards(directory).tokens(split)``."""
    return TokenShards(directory).tokens(split)
