"""User corpora: plain text files or folders, JSONL, Parquet, and Hugging Face datasets."""

from __future__ import annotations

import json
from pathlib import Path

from scalelab.errors import ScalelabError

TEXT_SUFFIXES = (".txt", ".md")


def load_documents(kind: str, path: str | None, field: str = "text", split: str = "train") -> list[str]:
    """Documents (one string each) from a source; empty documents are dropped.

    - text: a file is one document; a folder contributes every *.txt / *.md below it, sorted by path.
    - jsonl: one document per line, from ``field``.
    - parquet: one document per row, from column ``field``.
    - hf: a dataset folder written by ``save_to_disk``, a local data file (json/jsonl/csv/parquet/txt),
      or a dataset name that ``datasets.load_dataset`` can resolve offline; column ``field`` of ``split``.
    """
    loaders = {"text": _load_text, "jsonl": _load_jsonl, "parquet": _load_parquet, "hf": _load_hf}
    if kind not in loaders:
        raise ScalelabError(f"unknown data source '{kind}' (use one of {', '.join(loaders)})")
    if not path:
        raise ScalelabError(f"data.path is required for data.source = '{kind}'")
    looks_local = kind != "hf" or Path(path).exists() or path.startswith((".", "/", "~"))
    if looks_local and not Path(path).exists():
        raise ScalelabError(f"data path not found: {path}")
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
            docs.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ScalelabError(f"{f} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return docs


def _load_jsonl(path: str, field: str, split: str) -> list[str]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ScalelabError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or field not in record:
                raise ScalelabError(f"{path}:{n}: no field '{field}' (set data.text_field to the field holding the text)")
            if not isinstance(record[field], str):
                raise ScalelabError(f"{path}:{n}: field '{field}' is not a string")
            docs.append(record[field])
    return docs


def _load_parquet(path: str, field: str, split: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for an unreadable file
        raise ScalelabError(f"{path} is not a readable Parquet file ({e})") from None
    if field not in table.column_names:
        raise ScalelabError(f"{path}: no column '{field}' (columns: {', '.join(table.column_names)})")
    return [v for v in table.column(field).to_pylist() if isinstance(v, str)]


def _load_hf(path: str, field: str, split: str) -> list[str]:
    try:
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
