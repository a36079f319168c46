"""A user corpus as a re-readable stream, and the bounded sample a tokenizer trains on.

The corpus is never held: ``CorpusStream`` re-opens the source each time it is iterated. A BPE tokenizer
trains on the first ``sample_bytes`` of the training documents (``head``) or on a uniform sample of them
(``uniform``: the documents with the lowest hash of content and seed, up to ``sample_bytes``), so
training memory is bounded by the sample, not the corpus.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Iterator

from scalelab.data.shard_writer import hash_unit, split_of
from scalelab.data.sources import Piece, SourceErrors, content_key, stream_pieces, text_files
from scalelab.errors import ScalelabError

SAMPLE_MODES = ("head", "uniform")


@dataclass
class CorpusStream:
    """``stream(single_doc_val)`` or ``iter(stream)``: the pieces of the corpus, read afresh each time."""

    kind: str
    path: str
    text_field: str = "text"
    split: str = "train"
    errors: SourceErrors = field(default_factory=SourceErrors)

    def __call__(self, single_doc_val: float | None = None) -> Iterator[Piece]:
        return stream_pieces(self.kind, self.path, self.text_field, self.split, self.errors, single_doc_val)

    def __iter__(self) -> Iterator[Piece]:
        return self()

    def is_single_file(self) -> bool:
        """One text file: a single document, known before reading it (so it is cut by characters at once)."""
        return self.kind == "text" and len(text_files(self.path)) == 1

    def describe(self) -> str:
        return f"{self.kind}:{self.path}:{self.text_field}:{self.split}"


def documents(stream: CorpusStream, seed: int, val_fraction: float, split: str | None) -> Iterator[str]:
    """Texts of the documents (pieces of long ones) in ``split`` (None: all), by the shard writer's rule."""
    keep = False
    for p in stream():
        if p.start:
            key = p.key or content_key(p.text.encode("utf-8", errors="surrogatepass"))
            keep = split is None or split_of(key, seed, val_fraction) == split
        if keep:
            yield p.text


def head_sample(texts: Iterator[str], n_bytes: int) -> Iterator[str]:
    """The first ``n_bytes`` UTF-8 bytes of ``texts`` (the last text cut to fit)."""
    left = n_bytes
    for t in texts:
        if left <= 0:
            return
        b = len(t.encode("utf-8", errors="surrogatepass"))
        if b > left:
            t = t.encode("utf-8", errors="surrogatepass")[:left].decode("utf-8", errors="ignore")
        left -= b
        yield t


def uniform_sample(texts: Iterator[str], n_bytes: int, seed: int) -> list[str]:
    """A uniform sample without replacement of about ``n_bytes``: the texts with the lowest hash of
    content and seed whose sizes sum to at most ``n_bytes``, in corpus order. Holds only the sample."""
    heap: list = []  # (-u, index, text, size): the highest u sits on top, ready to be evicted
    total = 0
    for i, t in enumerate(texts):
        data = t.encode("utf-8", errors="surrogatepass")
        u = hash_unit(content_key(data), seed, b"sample")
        if total + len(data) <= n_bytes:
            heapq.heappush(heap, (-u, i, t, len(data)))
            total += len(data)
            continue
        # make room by dropping higher-u texts while this one ranks below them
        while heap and -heap[0][0] > u and total + len(data) > n_bytes:
            total -= heapq.heappop(heap)[3]
        if total + len(data) <= n_bytes:
            heapq.heappush(heap, (-u, i, t, len(data)))
            total += len(data)
    return [t for _, _, t, _ in sorted(heap, key=lambda item: item[1])]


def tokenizer_texts(stream: CorpusStream, kind: str, mode: str, n_bytes: int, seed: int,
                    val_fraction: float) -> Iterator[str]:
    """What a tokenizer trains on: BPE on a bounded sample of the training split; the character
    tokenizer scans everything (its alphabet must cover val too, and only the alphabet is kept)."""
    if mode not in SAMPLE_MODES:
        raise ScalelabError(f"invalid config: tokenizer.sample must be one of {', '.join(SAMPLE_MODES)}, got {mode!r}")
    if n_bytes < 1:
        raise ScalelabError(f"invalid config: tokenizer.sample_bytes must be positive, got {n_bytes}")
    if kind == "char":
        return documents(stream, seed, val_fraction, None)
    if stream.is_single_file():
        train = documents(stream, seed, val_fraction, None)  # one document: its split is by characters
    elif any(True for _ in documents(stream, seed, val_fraction, "train")):
        train = documents(stream, seed, val_fraction, "train")
    else:  # every document hashed to val (a tiny corpus): train on what there is
        train = documents(stream, seed, val_fraction, None)
    if mode == "head":
        return head_sample(train, n_bytes)
    return iter(uniform_sample(train, n_bytes, seed))
