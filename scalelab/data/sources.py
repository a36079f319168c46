"""User corpora: plain text files or folders, JSONL, Parquet, and Hugging Face datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from scalelab.errors import ScalelabError

TEXT_SUFFIXES = (".txt", ".md")


def load_documents(kind: str, path: str | None, field: str = "text", split: str = "train") -> list[str]:
    """Documents (one string each) from a source; empty documents are dropped.

    - text: a file is one document (a large file is not cut on blank lines: a single document is split
      into train/val by characters later); a folder contributes every *.txt / *.md below it, sorted by
      path so the order does not depend on the file system.
    - jsonl: one document per line, from ``field``.
    - parquet: one document per row, from column ``field``.
    - hf: a dataset folder written by ``save_to_disk``, a local data file (json/jsonl/csv/parquet/txt),
      or a hub dataset name (needs the network or the HF cache); column ``field`` of ``split``.
    """
    loaders = {"text": _load_text, "jsonl": _load_jsonl, "parquet": _load_parquet, "hf": _load_hf}
    if kind not in loaders:
        raise ScalelabError(f"unknown data source '{kind}' (use one of {', '.join(loaders)})")
    if not path:
        raise ScalelabError(f"data.path is required for data.source = '{kind}'")
    local = Path(path).expanduser()
    # for hf a path that does not exist may still be a hub dataset name such as "roneneldan/TinyStories"
    looks_local = kind != "hf" or local.exists() or path.startswith((".", "/", "~"))
    if looks_local and not local.exists():
        raise ScalelabError(f"data path not found: {path}")
    if looks_local:
        path = str(local)
    docs = [d for d in loaders[kind](path, field, split) if d.strip()]
    if not docs:
        raise ScalelabError(f"empty corpus: {path} holds no non-empty documents")
    return docs


def _load_text(path: str, field: str, split: str) -> list[str]:
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
    if not files:
        raise ScalelabError(f"empty corpus: no {' or '.join(TEXT_SUFFIXES)} files under {p}")
    docs = []
    for f in files:
        try:
            docs.append(f.read_text(encoding="utf-8-sig"))
        except UnicodeDecodeError as e:
            raise ScalelabError(f"{f} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return docs


def _load_jsonl(path: str, field: str, split: str) -> list[str]:
    if not Path(path).is_file():
        raise ScalelabError(f"{path} is not a file (data.source = 'jsonl' reads one .jsonl file)")
    docs = []
    for n, record in iter_jsonl(path):
        if not isinstance(record, dict) or field not in record:
            raise ScalelabError(f"{path}:{n}: no field '{field}' (set data.text_field to the field holding the text)")
        if not isinstance(record[field], str):
            raise ScalelabError(f"{path}:{n}: field '{field}' is not a string")
        docs.append(record[field])
    return docs


def iter_jsonl(path: str | Path):
    """(line number, parsed value) for each non-blank line of a JSONL file; bad JSON or bad UTF-8
    is an error naming the file and line. Callers check the existence of the file and the values' shape."""
    # utf-8-sig: a byte-order mark, common in files saved on Windows, must not break line 1
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(_utf8_lines(f, path), 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise ScalelabError(f"{path}:{n}: not valid JSON ({e.msg})") from None


def _utf8_lines(f, path: str):
    n = 0
    try:
        for n, line in enumerate(f, 1):
            yield line
    except UnicodeDecodeError as e:
        raise ScalelabError(f"{path}:{n + 1}: not UTF-8 text ({e.reason})") from None


def _load_parquet(path: str, field: str, split: str) -> list[str]:
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for an unreadable file
        raise ScalelabError(f"{path} is not a readable Parquet file ({e})") from None
    if field not in table.column_names:
        raise ScalelabError(f"{path}: no column '{field}' (columns: {', '.join(table.column_names)})")
    column = table.column(field)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise ScalelabError(f"{path}: column '{field}' holds {column.type}, not text")
    # nulls are missing documents, dropped like empty ones
    return [v for v in column.to_pylist() if v is not None]


def _load_hf(path: str, field: str, split: str) -> list[str]:
    try:
        # deferred: HF datasets is an optional extra (pip install scalelab[hf])
        import datasets
    except ImportError:
        raise ScalelabError("data.source = 'hf' needs the datasets package: pip install 'scalelab[hf]'") from None
    p = Path(path)
    try:
        if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ScalelabError(f"{p}: no split '{split}' (splits: {', '.join(ds)})")
                ds = ds[split]
        elif p.is_file():
            builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}.get(p.suffix)
            if builder is None:
                raise ScalelabError(f"{p}: unsupported file type for the hf source")
            ds = datasets.load_dataset(builder, data_files=str(p), split="train")
        else:
            ds = datasets.load_dataset(path, split=split)
    except ScalelabError:
        raise
    except Exception as e:  # datasets raises many types (missing hub access included)
        raise ScalelabError(f"cannot load Hugging Face dataset '{path}': {str(e).splitlines()[0]}") from None
    if field not in ds.column_names:
        raise ScalelabError(f"dataset '{path}': no column '{field}' (columns: {', '.join(ds.column_names)})")
    return [v for v in ds[field] if isinstance(v, str)]
