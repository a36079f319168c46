"""Stream a corpus into fixed-size token shards: bounded memory, parallel encoding, resumable.

Every decision is made in the main process in corpus order, so the output does not depend on the
number of workers: a document's split comes from a hash of its content and the seed, an exact
duplicate (same content hash as an earlier document) is dropped and counted. Workers only encode.

Resuming: a shard is written to ``NAME.tmp`` and renamed once full; then ``progress.json`` records, per
split, the completed shards and the (piece index, token offset) where the next shard starts. A restarted
build re-reads the source from the start (reading and hashing are cheap next to encoding), re-makes
every decision, and encodes only what lies past the recorded points, so its output is byte-identical to
an uninterrupted build's.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import tempfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from scalelab.data.sources import Piece, SourceErrors, content_key
from scalelab.errors import ScalelabError

PROGRESS_FILE = "progress.json"
BATCH_BYTES = 1 << 20  # text per encode call: big enough for the Rust threads, small enough to bound memory
BATCH_PIECES = 1024
SPLITS = ("train", "val")


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65536 else np.uint32


def tokenizer_sha256(tokenizer) -> str:
    """Hash of the tokenizer's saved files: shards record which tokenizer wrote them."""
    h = hashlib.sha256()
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save(d)
        for f in sorted(Path(d).iterdir()):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def split_of(key: bytes, seed: int, val_fraction: float) -> str:
    """train or val for a document with content hash ``key``: the same whatever the order, run or workers."""
    return "val" if hash_unit(key, seed) < val_fraction else "train"


def hash_unit(key: bytes, seed: int, purpose: bytes = b"split") -> float:
    """A number in [0, 1) fixed by (key, seed, purpose): uniform over documents, independent across purposes."""
    salt = seed.to_bytes(8, "little", signed=True) + purpose[:8].ljust(8, b"\0")
    h = hashlib.blake2b(key, digest_size=8, salt=salt)
    return int.from_bytes(h.digest(), "little") / 2.0**64


def encode_pieces(tokenizer, texts: list[str], starts: list[bool], dtype) -> tuple[np.ndarray, np.ndarray]:
    """The pieces' tokens as one flat array (a BOS before each document start) and each piece's length."""
    flat: list[int] = []
    lengths = np.zeros(len(texts), dtype=np.int64)
    bos = tokenizer.bos_id
    for i, (ids, start) in enumerate(zip(tokenizer.encode_batch(texts), starts)):
        before = len(flat)
        if start:
            flat.append(bos)
        flat.extend(ids)
        lengths[i] = len(flat) - before
    return np.asarray(flat, dtype=dtype), lengths


# -- worker processes ---------------------------------------------------------------------------------

_WORKER_TOKENIZER = None


def _worker_init(tokenizer) -> None:
    global _WORKER_TOKENIZER
    # one Rust thread per worker process: the processes are the parallelism
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    _WORKER_TOKENIZER = tokenizer


def _worker_encode(args):
    texts, starts, dtype = args
    return encode_pieces(_WORKER_TOKENIZER, texts, starts, dtype)


class _Encoder:
    """Ordered encoding of batches, in this process (tokenizers' Rust threads) or in worker processes;
    at most ``2 × workers`` batches are in flight, so memory stays bounded."""

    def __init__(self, tokenizer, dtype, workers: int):
        self.tokenizer, self.dtype, self.workers = tokenizer, dtype, workers
        self.pool = None
        if workers > 0:
            self.pool = multiprocessing.get_context("spawn").Pool(workers, _worker_init, (tokenizer,))
        self.pending: deque = deque()

    def submit(self, batch) -> Iterator:
        """Queue a batch; yields (batch, (flat, lengths)) for the batches that are done, in order."""
        texts, starts = [p[2] for p in batch], [p[3] for p in batch]
        if self.pool is None:
            yield batch, encode_pieces(self.tokenizer, texts, starts, self.dtype)
            return
        self.pending.append((batch, self.pool.apply_async(_worker_encode, ((texts, starts, self.dtype),))))
        while len(self.pending) > 2 * self.workers:
            b, result = self.pending.popleft()
            yield b, result.get()

    def drain(self) -> Iterator:
        while self.pending:
            b, result = self.pending.popleft()
            yield b, result.get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


# -- one split's shard files --------------------------------------------------------------------------


class _SplitWriter:
    """Appends a split's tokens to ``NAME.tmp`` and renames it to NAME when it holds ``shard_tokens``."""

    def __init__(self, out: Path, split: str, dtype, shard_tokens: int, bos_id: int, done: list, resume_at):
        self.out, self.split, self.dtype, self.shard_tokens, self.bos_id = out, split, dtype, shard_tokens, bos_id
        self.done = list(done)  # completed shards: {name, tokens, documents, sha256}
        self.resume_at = tuple(resume_at)  # (piece, token offset) where the first unwritten shard starts
        self.handle, self.hash, self.in_shard, self.docs = None, None, 0, 0

    def append(self, tokens: np.ndarray, piece: int, offset: int) -> bool:
        """Write ``tokens`` (those of ``piece`` from token ``offset`` on); True when a shard was completed."""
        completed = False
        while tokens.size:
            if self.handle is None:
                self.handle = open(self._path(len(self.done)).with_suffix(".bin.tmp"), "wb")
                self.hash, self.in_shard, self.docs = hashlib.sha256(), 0, 0
            take = min(tokens.size, self.shard_tokens - self.in_shard)
            chunk = tokens[:take]
            data = chunk.tobytes()
            self.handle.write(data)
            self.hash.update(data)
            self.docs += int(np.count_nonzero(chunk == self.bos_id))
            self.in_shard += take
            tokens, offset = tokens[take:], offset + take
            if self.in_shard == self.shard_tokens:
                self._finish()
                self.resume_at = (piece, offset)
                completed = True
        return completed

    def _path(self, index: int) -> Path:
        return self.out / f"{self.split}_{index:03d}.bin"

    def _finish(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        path = self._path(len(self.done))
        os.replace(path.with_suffix(".bin.tmp"), path)
        self.done.append({"name": path.name, "tokens": self.in_shard, "documents": self.docs,
                          "sha256": self.hash.hexdigest()})
        self.handle = None

    def close(self) -> None:
        if self.handle is not None:
            self._finish()

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.done)


# -- the build ----------------------------------------------------------------------------------------


@dataclass
class BuildStats:
    documents: int = 0
    duplicates: int = 0
    pieces: int = 0


def write_shards(make_stream: Callable[[float | None], Iterable[Piece]], tokenizer, out_dir: str | Path, *,
                 val_fraction: float, seed: int, shard_tokens: int = 100_000_000, dedup: bool = True,
                 workers: int = 0, progress: bool = False, source: str = "", errors: SourceErrors | None = None,
                 single_document: bool = False) -> dict:
    """Tokenize the stream ``make_stream(single_doc_val)`` into ``out_dir`` and return the manifest fields.

    ``make_stream(None)`` is the corpus as pieces; ``make_stream(f)`` the same corpus known to be one
    document, cut by characters (asked for when a first pass finds a single document).
    Resumes from ``out_dir/progress.json`` when it was written by the same build settings.
    """
    if shard_tokens < 1:
        raise ScalelabError(f"shard_tokens must be positive, got {shard_tokens}")
    if not 0.0 < val_fraction < 1.0:
        raise ScalelabError(f"invalid config: data.val_fraction must be between 0 and 1, got {val_fraction}")
    if workers < 0:
        raise ScalelabError(f"invalid config: data.workers must be 0 (in-process threads) or more, got {workers}")
    errors = errors or SourceErrors()
    out = Path(out_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    plan = {"tokenizer_sha256": tokenizer_sha256(tokenizer), "seed": seed, "val_fraction": val_fraction,
            "shard_tokens": shard_tokens, "dtype": np.dtype(dtype).name, "dedup": dedup, "source": source,
            "on_error": errors.policy}
    forced: dict = {"single_document": single_document, "val_key": "", "train_key": ""}
    while True:
        result = _build(make_stream, tokenizer, out, plan, forced, dtype, workers, progress, errors)
        redo = _needs_redo(result, forced)
        if redo is None:
            return result
        forced.update(redo)
        # the decisions change, so nothing written so far stays valid
        for f in out.glob("*.bin*"):
            f.unlink()
        (out / PROGRESS_FILE).unlink(missing_ok=True)
        errors.skipped, errors.kinds, errors.first = 0, {}, ""


def _needs_redo(result: dict, forced: dict) -> dict | None:
    """Tiny corpora: one document is cut by characters; an empty split takes the document whose hash is
    most extreme, so both splits are non-empty whatever the seed."""
    docs = result["documents"]
    if docs == 0:
        return None
    if docs == 1 and not forced["single_document"]:
        return {"single_document": True}
    if forced["single_document"]:
        return None
    if result["splits"]["val"]["documents"] == 0 and not forced["val_key"]:
        return {"val_key": result["extreme_keys"][0]}
    if result["splits"]["train"]["documents"] == 0 and not forced["train_key"]:
        return {"train_key": result["extreme_keys"][1]}
    return None


def _build(make_stream, tokenizer, out: Path, plan: dict, forced: dict, dtype, workers: int, progress: bool,
           errors: SourceErrors) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    state = _load_progress(out, {**plan, **forced})
    for f in out.glob("*.bin.tmp"):
        f.unlink()  # a partial shard is never read; the build rewrites it
    writers = {s: _SplitWriter(out, s, dtype, plan["shard_tokens"], tokenizer.bos_id, state["shards"][s],
                               state["resume"][s]) for s in SPLITS}
    counts = {s: {"documents": 0, "bytes": 0} for s in SPLITS}
    seen: set[int] = set()
    stats = BuildStats()
    extreme = [(2.0, b""), (-1.0, b"")]  # (unit, key) of the lowest and highest split hash seen
    encoder = _Encoder(tokenizer, dtype, workers)
    bar = tqdm(total=None, unit="B", unit_scale=True, unit_divisor=1000, desc="tokenize", disable=not progress,
               dynamic_ncols=True, mininterval=0.5)

    def save_progress() -> None:
        data = {"plan": {**plan, **forced}, "shards": {s: w.done for s, w in writers.items()},
                "resume": {s: list(w.resume_at) for s, w in writers.items()}}
        tmp = out / (PROGRESS_FILE + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, out / PROGRESS_FILE)

    def consume(done_batches) -> None:
        completed = False
        for batch, (flat, lengths) in done_batches:
            at = 0
            for (index, split, _, _, skip), n in zip(batch, lengths):
                tokens = flat[at : at + n]
                at += n
                completed |= writers[split].append(tokens[skip:], index, skip)
        if completed:
            save_progress()

    batch, batch_bytes = [], 0
    split = None
    try:
        stream = make_stream(plan["val_fraction"] if forced["single_document"] else None)
        for index, piece in enumerate(stream):
            try:
                data = piece.text.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate, e.g. "\ud800" escaped in JSON
                errors.report(f"document {stats.documents + 1} of {plan['source'] or 'the corpus'}: not valid "
                              f"UTF-8 text ({e.reason})", "invalid_utf8")
                split = None if piece.start else split
                continue
            bar.update(len(data))
            stats.pieces += 1
            if piece.start:
                split = _decide(piece, data, plan, forced, seen, stats, extreme)
                if split is not None:
                    counts[split]["documents"] += 1
                    stats.documents += 1
            if split is None:
                continue  # a duplicate document, and all its pieces
            counts[split]["bytes"] += len(data)
            piece_at, offset = writers[split].resume_at
            if index < piece_at:
                continue  # already in a completed shard
            skip = offset if index == piece_at else 0
            batch.append((index, split, piece.text, piece.start, skip))
            batch_bytes += len(data)
            if batch_bytes >= BATCH_BYTES or len(batch) >= BATCH_PIECES:
                consume(encoder.submit(batch))
                batch, batch_bytes = [], 0
                bar.set_postfix(docs=stats.documents, dups=stats.duplicates, skipped=errors.skipped, refresh=False)
        if batch:
            consume(encoder.submit(batch))
        consume(encoder.drain())
    finally:
        encoder.close()
        bar.close()
    for w in writers.values():
        w.close()
    # complete: meta.json, written next by the caller, marks it; a rebuild starts afresh
    (out / PROGRESS_FILE).unlink(missing_ok=True)
    splits = {s: {"files": [d["name"] for d in w.done], "tokens": w.tokens, **counts[s]} for s, w in writers.items()}
    return {"dtype": plan["dtype"], "splits": splits, "shards": {s: w.done for s, w in writers.items()},
            "documents": stats.documents, "duplicates": stats.duplicates, "skipped": errors.skipped,
            "skipped_kinds": dict(errors.kinds), "tokenizer_sha256": plan["tokenizer_sha256"],
            "split_rule": "characters" if forced["single_document"] else "hash",
            "extreme_keys": [extreme[0][1].hex(), extreme[1][1].hex()]}


def _decide(piece: Piece, data: bytes, plan: dict, forced: dict, seen: set, stats: BuildStats, extreme: list):
    """The split of a new document, or None for a duplicate."""
    if piece.split is not None:
        return piece.split
    key = piece.key or content_key(data)
    if plan["dedup"]:
        short = int.from_bytes(key[:8], "little")
        if short in seen:
            stats.duplicates += 1
            return None
        seen.add(short)
    if key.hex() == forced["val_key"]:
        return "val"
    if key.hex() == forced["train_key"]:
        return "train"
    u = hash_unit(key, plan["seed"])
    if u < extreme[0][0]:
        extreme[0] = (u, key)
    if u > extreme[1][0]:
        extreme[1] = (u, key)
    return "val" if u < plan["val_fraction"] else "train"


def _load_progress(out: Path, plan: dict) -> dict:
    fresh = {"shards": {s: [] for s in SPLITS}, "resume": {s: [0, 0] for s in SPLITS}}
    path = out / PROGRESS_FILE
    if not path.is_file():
        for f in out.glob("*.bin*"):
            f.unlink()
        return fresh
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        state = None
    ok = isinstance(state, dict) and state.get("plan") == plan
    if ok:
        for s in SPLITS:
            for shard in state["shards"][s]:
                ok = ok and (out / shard["name"]).is_file() and \
                    (out / shard["name"]).stat().st_size == shard["tokens"] * np.dtype(plan["dtype"]).itemsize
    if not ok:  # other settings, or damaged: start over rather than mix two builds
        for f in out.glob("*.bin*"):
            f.unlink()
        return fresh
    return {"shards": state["shards"], "resume": state["resume"]}
