"""User corpora, streamed: plain text files or folders, JSONL (also .gz / .zst), Parquet, Hugging Face datasets.

Readers yield :class:`Piece` objects one at a time and never hold the corpus. A piece is a whole document,
except for text files above ``PIECE_BYTES``: those come as several pieces cut where byte-level BPE's
pre-tokenizer splits anyway (a newline between two non-space characters), so the pieces tokenize to exactly
the tokens of the whole file, and only the first piece of a document gets a BOS token.

Bad records (an unreadable file, a missing field, a non-text Parquet column, invalid UTF-8, broken JSON)
go through :class:`SourceErrors`: ``fail`` raises a one-line ScalelabError, ``skip`` counts and goes on.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from scalelab.errors import ScalelabError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst")
PIECE_BYTES = 4 << 20  # text files above this are read in pieces: bounded memory, and encode calls stay small
READ_BYTES = 1 << 20
PARQUET_BATCH_ROWS = 1024
SOURCE_KINDS = ("text", "jsonl", "parquet", "hf")


@dataclass(frozen=True)
class Piece:
    """Text to tokenize. ``start``: begins a document (a BOS goes first); otherwise it continues the last one.
    ``key``: the whole document's content hash when the reader knows it (multi-piece documents); otherwise
    the consumer hashes ``text``. ``split``: a forced train/val assignment (single-document corpora)."""

    text: str
    start: bool = True
    key: bytes = b""
    split: str | None = None


def content_key(data: bytes) -> bytes:
    """The hash that identifies a document for deduplication and the train/val split."""
    return hashlib.blake2b(data, digest_size=16).digest()


@dataclass
class SourceErrors:
    """The data.on_error policy: ``fail`` raises on the first bad record, ``skip`` counts them."""

    policy: str = "fail"
    hint: bool = True  # name the data.on_error key in the message (off for readers outside the corpus pipeline)
    skipped: int = 0
    first: str = ""
    kinds: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.policy not in ("fail", "skip"):
            raise ScalelabError(f"invalid config: data.on_error must be fail or skip, got {self.policy!r}")

    def report(self, message: str, kind: str) -> None:
        if self.policy == "fail":
            hint = " (set data.on_error = \"skip\" to skip such records and count them)" if self.hint else ""
            raise ScalelabError(message + hint)
        self.skipped += 1
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        self.first = self.first or message


def resolve_path(kind: str, path: str | None) -> str:
    if kind not in SOURCE_KINDS:
        raise ScalelabError(f"unknown data source '{kind}' (use one of {', '.join(SOURCE_KINDS)})")
    if not path:
        raise ScalelabError(f"data.path is required for data.source = '{kind}'")
    local = Path(path).expanduser()
    # for hf a path that does not exist may still be a hub dataset name such as "roneneldan/TinyStories"
    looks_local = kind != "hf" or local.exists() or path.startswith((".", "/", "~"))
    if looks_local and not local.exists():
        raise ScalelabError(f"data path not found: {path}")
    return str(local) if looks_local else path


def stream_pieces(kind: str, path: str | None, field: str = "text", split: str = "train",
                  errors: SourceErrors | None = None, single_doc_val: float | None = None) -> Iterator[Piece]:
    """Non-empty pieces of the corpus in a fixed order (files sorted by path).

    - text: a file is one document; a folder contributes every *.txt / *.md below it.
    - jsonl: one document per line, from ``field``; a file or a folder of .jsonl / .jsonl.gz / .jsonl.zst.
    - parquet: one document per row of column ``field``, read in record batches; a file or a folder.
    - hf: a ``save_to_disk`` folder (memory-mapped), a local data file or a hub name (both streamed).

    ``single_doc_val``: the corpus is known to be one document; cut it by characters, the first
    (1 - single_doc_val) into train and the rest into val (the classic one-file setup, e.g. tiny Shakespeare).
    """
    path = resolve_path(kind, path)
    errors = errors or SourceErrors()
    if kind == "text":
        yield from _text_pieces(text_files(path), errors, single_doc_val)
        return
    readers = {"jsonl": _jsonl_docs, "parquet": _parquet_docs, "hf": _hf_docs}
    docs = (d for d in readers[kind](path, field, split, errors) if d.strip())
    if single_doc_val is None:
        yield from (Piece(d) for d in docs)
        return
    for d in docs:
        train, val = split_by_characters(d, single_doc_val)
        yield Piece(train, split="train")
        yield Piece(val, split="val")


def load_documents(kind: str, path: str | None, field: str = "text", split: str = "train",
                   errors: SourceErrors | None = None) -> list[str]:
    """Every document as one list: for small corpora and tests; everything else streams."""
    docs: list[str] = []
    for p in stream_pieces(kind, path, field, split, errors):
        if p.start:
            docs.append(p.text)
        else:
            docs[-1] += p.text
    if not docs:
        raise ScalelabError(f"empty corpus: {path} holds no non-empty documents")
    return docs


def split_by_characters(text: str, val_fraction: float) -> tuple[str, str]:
    if len(text) < 2:
        raise ScalelabError(f"corpus too short: one document of {len(text)} characters cannot be split into train and val")
    return text[: _char_cut(len(text), val_fraction)], text[_char_cut(len(text), val_fraction):]


def _char_cut(n_chars: int, val_fraction: float) -> int:
    # both sides keep at least one character, however extreme val_fraction is
    return min(n_chars - 1, max(1, int(n_chars * (1 - val_fraction))))


# -- text ---------------------------------------------------------------------------------------------


def text_files(path: str) -> list[Path]:
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
    if not files:
        raise ScalelabError(f"empty corpus: no {' or '.join(TEXT_SUFFIXES)} files under {p}")
    return files


def _text_pieces(files: list[Path], errors: SourceErrors, single_doc_val: float | None) -> Iterator[Piece]:
    for f in files:
        try:
            size = f.stat().st_size
            if size <= PIECE_BYTES:
                yield from _small_text_file(f, errors, single_doc_val)
            else:
                yield from _large_text_file(f, errors, single_doc_val)
        except OSError as e:
            errors.report(f"{f}: cannot read ({e.strerror or e})", "unreadable")


def _small_text_file(f: Path, errors: SourceErrors, single_doc_val: float | None) -> Iterator[Piece]:
    data = f.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # utf-8-sig: a byte-order mark is not part of the text
    except UnicodeDecodeError as e:
        errors.report(f"{f} is not UTF-8 text ({e.reason} at byte {e.start})", "invalid_utf8")
        return
    if not text.strip():
        return
    if single_doc_val is None:
        yield Piece(text)
    else:
        train, val = split_by_characters(text, single_doc_val)
        yield Piece(train, split="train")
        yield Piece(val, split="val")


def _decoded_chunks(f: Path) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    offset = 0
    with open(f, "rb") as fh:
        while True:
            raw = fh.read(READ_BYTES)
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise _BadText(f"{f} is not UTF-8 text ({e.reason} at byte {offset + e.start})") from None
            offset += len(raw)
            if text:
                yield text
            if not raw:
                return


class _BadText(Exception):
    pass


def _large_text_file(f: Path, errors: SourceErrors, single_doc_val: float | None) -> Iterator[Piece]:
    # Pass 1 hashes the whole file and checks its UTF-8, so no piece of a bad file is ever yielded.
    h, n_chars, blank = hashlib.blake2b(digest_size=16), 0, True
    try:
        for text in _decoded_chunks(f):
            data = text.encode("utf-8")
            h.update(data)
            n_chars += len(text)
            blank = blank and not text.strip()
    except _BadText as e:
        errors.report(str(e), "invalid_utf8")
        return
    if blank:
        return
    cut = _char_cut(n_chars, single_doc_val) if single_doc_val is not None else None
    key, split = h.digest(), ("train" if cut is not None else None)
    start, pos, buf = True, 0, ""
    for text in _decoded_chunks(f):
        if cut is not None and pos <= cut < pos + len(text):
            # the forced train/val cut: the val part is a document of its own, as in the in-memory split
            head, text = text[: cut - pos], text[cut - pos :]
            buf += head
            if buf:
                yield Piece(buf, start=start, key=key, split=split)
            buf, start, split, pos = "", True, "val", cut
        pos += len(text)
        buf += text
        while len(buf) >= PIECE_BYTES:
            at = safe_cut(buf, PIECE_BYTES)
            yield Piece(buf[:at], start=start, key=key, split=split)
            buf, start = buf[at:], False
    if buf:
        yield Piece(buf, start=start, key=key, split=split)


def safe_cut(text: str, target: int) -> int:
    """An index near ``target`` where cutting ``text`` leaves its byte-level BPE tokens unchanged.

    The pre-tokenizer (GPT-2's pattern) always ends a pre-token before a newline that follows a
    non-space character, and starts a new one after it when a non-space character follows, so a cut
    right after such a newline is invisible to the tokenizer. Without one, any newline, then ``target``.
    """
    i = text.rfind("\n", 0, target)
    while i > 0:
        if i + 1 < len(text) and not text[i - 1].isspace() and not text[i + 1].isspace():
            return i + 1
        i = text.rfind("\n", 0, i)
    i = text.rfind("\n", 0, target)
    return i + 1 if i > 0 else target


# -- JSONL --------------------------------------------------------------------------------------------


def _files_with(path: str, suffixes: tuple[str, ...], kind: str) -> list[Path]:
    p = Path(path)
    if p.is_file():
        return [p]
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(suffixes))
    if not files:
        raise ScalelabError(f"empty corpus: no {' / '.join(suffixes)} files under {p} (data.source = '{kind}')")
    return files


def _open_binary(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        import zstandard  # only .zst corpora need it

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def iter_jsonl(path: str | Path, errors: SourceErrors | None = None):
    """(line number, parsed value) for each non-blank line of a JSONL file (plain, .gz or .zst). Bad JSON
    or bad UTF-8 is an error naming the file and line (or, with ``errors`` set to skip, a counted skip)."""
    errors = errors or SourceErrors(hint=False)
    try:
        with _open_binary(Path(path)) as fh:
            for n, raw in enumerate(fh, 1):
                if n == 1 and raw.startswith(codecs.BOM_UTF8):  # a BOM, common in files saved on Windows
                    raw = raw[len(codecs.BOM_UTF8) :]
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    errors.report(f"{path}:{n}: not UTF-8 text ({e.reason})", "invalid_utf8")
                    continue
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    errors.report(f"{path}:{n}: not valid JSON ({e.msg})", "bad_json")
    except (OSError, EOFError) as e:  # also a truncated or corrupt .gz / .zst stream
        errors.report(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})", "unreadable")
    except Exception as e:  # zstandard raises its own ZstdError
        if type(e).__name__ != "ZstdError":
            raise
        errors.report(f"{path}: cannot read ({e})", "unreadable")


def _jsonl_docs(path: str, field: str, split: str, errors: SourceErrors) -> Iterator[str]:
    for f in _files_with(path, JSONL_SUFFIXES, "jsonl"):
        for n, record in iter_jsonl(f, errors):
            if not isinstance(record, dict) or field not in record:
                errors.report(f"{f}:{n}: no field '{field}' (set data.text_field to the field holding the text)",
                              "missing_field")
            elif not isinstance(record[field], str):
                errors.report(f"{f}:{n}: field '{field}' is not a string", "not_text")
            else:
                yield record[field]


# -- Parquet ------------------------------------------------------------------------------------------


def _parquet_docs(path: str, field: str, split: str, errors: SourceErrors) -> Iterator[str]:
    for f in _files_with(path, (".parquet",), "parquet"):
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # pyarrow raises several types for an unreadable file
            errors.report(f"{f} is not a readable Parquet file ({e})", "unreadable")
            continue
        schema = pf.schema_arrow
        if field not in schema.names:
            errors.report(f"{f}: no column '{field}' (columns: {', '.join(schema.names)})", "missing_field")
            continue
        kind = schema.field(field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            errors.report(f"{f}: column '{field}' holds {kind}, not text", "not_text")
            continue
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
            # nulls are missing documents, dropped like empty ones
            yield from (v for v in batch.column(0).to_pylist() if v is not None)


# -- Hugging Face datasets ----------------------------------------------------------------------------


def _hf_docs(path: str, field: str, split: str, errors: SourceErrors) -> Iterator[str]:
    try:
        # deferred: HF datasets is an optional extra (pip install scalelab[hf])
        import datasets
    except ImportError:
        raise ScalelabError("data.source = 'hf' needs the datasets package: pip install 'scalelab[hf]'") from None
    p = Path(path)
    try:
        if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(p))  # Arrow files, memory-mapped: rows are read as iterated
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ScalelabError(f"{p}: no split '{split}' (splits: {', '.join(ds)})")
                ds = ds[split]
        elif p.is_file():
            builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}.get(p.suffix)
            if builder is None:
                raise ScalelabError(f"{p}: unsupported file type for the hf source")
            ds = datasets.load_dataset(builder, data_files=str(p), split="train", streaming=True)
        else:
            ds = datasets.load_dataset(path, split=split, streaming=True)
    except ScalelabError:
        raise
    except Exception as e:  # datasets raises many types (missing hub access included)
        raise ScalelabError(f"cannot load Hugging Face dataset '{path}': {str(e).splitlines()[0]}") from None
    names = ds.column_names
    if names is not None and field not in names:
        raise ScalelabError(f"dataset '{path}': no column '{field}' (columns: {', '.join(names)})")
    try:
        for n, row in enumerate(ds, 1):
            value = row.get(field)
            if field not in row:
                raise ScalelabError(f"dataset '{path}': no column '{field}' (columns: {', '.join(row)})")
            if isinstance(value, str):
                yield value
            elif value is not None:
                errors.report(f"dataset '{path}': row {n}: column '{field}' is not a string", "not_text")
    except ScalelabError:
        raise
    except Exception as e:  # a streamed file can fail midway (bad JSON, bad UTF-8)
        errors.report(f"cannot read Hugging Face dataset '{path}': {str(e).splitlines()[0]}", "unreadable")
