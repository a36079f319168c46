"""Corpus sources (text, JSONL, Parquet, HF datasets) and tokenized shards."""

import json

import numpy as np
import pytest

from conftest import dev_import
from scalelab.data.shards import ShardMeta, TokenShards, build_shards, load_shards, split_documents
from scalelab.data.sources import load_documents
from scalelab.errors import ScalelabError
from scalelab.tokenizer import ByteTokenizer, train_bpe

DOCS = ["first document", "second one\n\nwith a blank line", "third, ünïcode 世界 🌍", "fourth"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


# -- sources ------------------------------------------------------------------------------------------


def test_text_file_is_one_document_and_folder_is_sorted(tmp_path):
    (tmp_path / "z.txt").write_text("zulu\n\nstill zulu", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.md").write_text("alpha", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes("\ufeffbravo".encode("utf-8"))  # a BOM is not part of the text
    (tmp_path / "ignored.bin").write_bytes(b"\x00\xff")
    (tmp_path / "blank.txt").write_text(" \n", encoding="utf-8")  # empty documents are dropped
    assert load_documents("text", str(tmp_path / "z.txt")) == ["zulu\n\nstill zulu"]
    assert load_documents("text", str(tmp_path)) == ["bravo", "alpha", "zulu\n\nstill zulu"]


def test_text_rejects_non_utf8_naming_the_file(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ScalelabError, match="latin1.txt is not UTF-8"):
        load_documents("text", str(tmp_path))


def test_home_relative_paths_expand(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "c.txt").write_text("home text", encoding="utf-8")
    assert load_documents("text", "~/c.txt") == ["home text"]


def test_jsonl_reads_the_named_field(tmp_path):
    f = tmp_path / "d.jsonl"
    write_jsonl(f, [{"body": d, "id": i} for i, d in enumerate(DOCS)])
    f.write_text(f.read_text(encoding="utf-8") + "\n   \n", encoding="utf-8")  # trailing blank lines are fine
    assert load_documents("jsonl", str(f), field="body") == DOCS
    g = tmp_path / "bom.jsonl"
    g.write_bytes(b"\xef\xbb\xbf" + f.read_bytes())
    assert load_documents("jsonl", str(g), field="body") == DOCS


def test_jsonl_errors_name_line_and_field(tmp_path):
    f = tmp_path / "d.jsonl"
    write_jsonl(f, [{"text": "ok"}, {"body": "no text field"}])
    with pytest.raises(ScalelabError, match=r"d\.jsonl:2: no field 'text'"):
        load_documents("jsonl", str(f))
    f.write_text('{"text": "ok"}\n\n{broken\n', encoding="utf-8")
    with pytest.raises(ScalelabError, match=r"d\.jsonl:3: not valid JSON"):
        load_documents("jsonl", str(f))
    write_jsonl(f, [{"text": 7}])
    with pytest.raises(ScalelabError, match=r"d\.jsonl:1: field 'text' is not a string"):
        load_documents("jsonl", str(f))
    write_jsonl(f, [["a list, not an object"]])
    with pytest.raises(ScalelabError, match=r"d\.jsonl:1: no field 'text'"):
        load_documents("jsonl", str(f))
    (tmp_path / "no_jsonl").mkdir()
    with pytest.raises(ScalelabError, match="empty corpus: no .jsonl"):
        load_documents("jsonl", str(tmp_path / "no_jsonl"))


def test_parquet_reads_the_named_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": DOCS + [None], "n": list(range(5))}), f)
    assert load_documents("parquet", str(f), field="content") == DOCS  # a null row is a missing document
    with pytest.raises(ScalelabError, match="no column 'text' \\(columns: content, n\\)"):
        load_documents("parquet", str(f))
    with pytest.raises(ScalelabError, match="column 'n' holds int64, not text"):
        load_documents("parquet", str(f), field="n")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ScalelabError, match="not a readable Parquet file"):
        load_documents("parquet", str(tmp_path / "junk.parquet"))


def test_hugging_face_datasets(tmp_path):
    datasets = dev_import("datasets")
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "saved"))
    assert load_documents("hf", str(tmp_path / "saved")) == DOCS
    with pytest.raises(ScalelabError, match="no column 'body'"):
        load_documents("hf", str(tmp_path / "saved"), field="body")

    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS[:2]}),
                                   "validation": datasets.Dataset.from_dict({"text": DOCS[2:]})})
    splits.save_to_disk(str(tmp_path / "dict"))
    assert load_documents("hf", str(tmp_path / "dict"), split="validation") == DOCS[2:]
    with pytest.raises(ScalelabError, match="no split 'test'.*train, validation"):
        load_documents("hf", str(tmp_path / "dict"), split="test")

    # a local data file goes through datasets.load_dataset("json", data_files=...)
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS])
    assert load_documents("hf", f) == DOCS


def test_missing_and_empty_sources(tmp_path):
    for kind in ("text", "jsonl", "parquet", "hf"):
        with pytest.raises(ScalelabError, match="data path not found: .*nope"):
            load_documents(kind, str(tmp_path / "nope"))
    with pytest.raises(ScalelabError, match="data.path is required"):
        load_documents("text", None)
    with pytest.raises(ScalelabError, match="unknown data source 'csv'"):
        load_documents("csv", str(tmp_path))
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(ScalelabError, match="empty corpus"):
        load_documents("text", str(tmp_path / "empty.txt"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ScalelabError, match="empty corpus"):
        load_documents("text", str(tmp_path / "folder"))
    f = write_jsonl(tmp_path / "e.jsonl", [{"text": ""}, {"text": "\n"}])
    with pytest.raises(ScalelabError, match="empty corpus"):
        load_documents("jsonl", f)


# -- shards -------------------------------------------------------------------------------------------


def docs_in(tok, stream) -> list[str]:
    return [t for t in tok.decode(stream).split("<|bos|>") if t]


@pytest.mark.parametrize("which", ["byte", "bpe"])
def test_shards_round_trip_with_bos_before_every_document(which, tmp_path):
    tok = ByteTokenizer() if which == "byte" else train_bpe(DOCS * 5, 300)
    meta = build_shards(DOCS, tok, tmp_path, val_fraction=0.25, seed=0, shard_tokens=16)
    assert isinstance(meta, ShardMeta) and meta.dtype == "uint16" and meta.bos_id == tok.bos_id
    assert len(meta.splits["train"]["files"]) > 1  # a small shard size forces several files
    shards = TokenShards(tmp_path)
    train, val = np.asarray(shards.tokens("train")), np.asarray(shards.tokens("val"))
    assert train[0] == tok.bos_id and val[0] == tok.bos_id
    assert int((train == tok.bos_id).sum()) == meta.splits["train"]["documents"] == 3
    assert int((val == tok.bos_id).sum()) == meta.splits["val"]["documents"] == 1
    assert sorted(docs_in(tok, train) + docs_in(tok, val)) == sorted(DOCS)
    for split, stream in (("train", train), ("val", val)):
        s = meta.splits[split]
        assert s["tokens"] == len(stream)
        assert s["bytes"] == sum(len(d.encode("utf-8")) for d in docs_in(tok, stream))
        assert shards.bytes_per_token(split) == pytest.approx(s["bytes"] / s["tokens"])
    assert np.array_equal(load_shards(tmp_path, "val"), val)
    on_disk = json.loads((tmp_path / "meta.json").read_text())
    assert on_disk["dtype"] == "uint16" and on_disk["splits"]["val"]["bytes"] == meta.splits["val"]["bytes"]


def test_shards_are_deterministic_by_seed(tmp_path):
    docs = [f"document number {i}" for i in range(20)]
    tok = ByteTokenizer()

    def build(name, seed):
        build_shards(docs, tok, tmp_path / name, val_fraction=0.2, seed=seed)
        return [(tmp_path / name / f"{s}_000.bin").read_bytes() for s in ("train", "val")]

    assert build("a", 3) == build("b", 3)
    assert build("a", 3) != build("c", 4)
    val = docs_in(tok, load_shards(tmp_path / "a", "val"))
    assert len(val) == 4 and set(val) <= set(docs)


def test_val_gets_at_least_one_document(tmp_path):
    meta = build_shards(["one", "two", "three"], ByteTokenizer(), tmp_path, val_fraction=0.01)
    assert meta.splits["val"]["documents"] == 1 and meta.splits["train"]["documents"] == 2


def test_single_document_splits_by_characters():
    assert split_documents(["x" * 90 + "y" * 10], 0.1, seed=0) == (["x" * 90], ["y" * 10])
    assert split_documents(["ab"], 0.001, seed=0) == (["a"], ["b"])  # both sides keep a character
    with pytest.raises(ScalelabError, match="corpus too short"):
        split_documents(["a"], 0.1, seed=0)
    with pytest.raises(ScalelabError, match="val_fraction"):
        split_documents(["abc", "def"], 1.0, seed=0)
    with pytest.raises(ScalelabError, match="empty corpus"):
        split_documents([], 0.1, seed=0)


def test_large_vocab_uses_uint32(tmp_path):
    class WideBytes(ByteTokenizer):
        def __init__(self):
            super().__init__()
            self.special_ids = {k: v + 70_000 for k, v in self.special_ids.items()}
            self.vocab_size = 70_000 + 256 + len(self.special_ids)

    meta = build_shards(DOCS, WideBytes(), tmp_path)
    assert meta.dtype == "uint32"
    assert load_shards(tmp_path, "train")[0] == 70_256  # the BOS id survives, not truncated to 16 bits


def test_shard_read_errors(tmp_path):
    with pytest.raises(ScalelabError, match="missing meta.json"):
        TokenShards(tmp_path)
    build_shards(DOCS, ByteTokenizer(), tmp_path)
    with pytest.raises(ScalelabError, match="no split 'test'"):
        load_shards(tmp_path, "test")
    (tmp_path / "val_000.bin").unlink()
    with pytest.raises(ScalelabError, match="val_000.bin is missing"):
        load_shards(tmp_path, "val")
