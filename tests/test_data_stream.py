"""Streaming a corpus into shards: equality with in-memory tokenization, kill and resume, the hash split
and dedup, bounded memory, bad records, tokenizer samples, and many-rank loading over shards."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zstandard

from conftest import subprocess_env
from scalelab.data import sources
from scalelab.data.corpus import CorpusStream, head_sample, tokenizer_texts, uniform_sample
from scalelab.data.loader import TokenLoader
from scalelab.data.shard_writer import PROGRESS_FILE, split_of
from scalelab.data.shards import ShardedTokens, TokenShards, stream_shards
from scalelab.data.sources import SourceErrors, content_key, load_documents, safe_cut
from scalelab.errors import ScalelabError
from scalelab.tokenizer import ByteTokenizer, CharTokenizer, train_bpe

WORDS = "the quick brown fox jumps over lazy dogs while seven wizards quietly hex a jolly ümlaut 世界".split()


def corpus_docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        lines = [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(rng.integers(1, 6))]
        docs.append(f"Doc {i}.\n" + "\n".join(lines) + ("\n\n  indented tail " if i % 7 == 0 else ""))
    return docs


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


def reference(docs, tok, seed, val_fraction, dedup=True):
    """The in-memory path: every document encoded whole, split by the same hash, in corpus order."""
    streams, seen = {"train": [], "val": []}, set()
    for d in docs:
        key = content_key(d.encode("utf-8"))
        if dedup and key in seen:
            continue
        seen.add(key)
        streams[split_of(key, seed, val_fraction)] += [tok.bos_id] + tok.encode(d)
    return {s: np.array(v, dtype=np.uint16) for s, v in streams.items()}


def shard_bytes(out, meta):
    return [(out / f).read_bytes() for s in ("train", "val") for f in meta.splits[s]["files"]]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(corpus_docs(200, seed=9), 400)


# -- streaming equals the in-memory path --------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_shards_equal_in_memory_tokens(bpe, tmp_path, workers):
    docs = corpus_docs(300)
    docs += docs[:20]  # exact duplicates, dropped
    write_jsonl(tmp_path / "c.jsonl", docs)
    out = tmp_path / "shards"
    meta = stream_shards(CorpusStream("jsonl", str(tmp_path / "c.jsonl")), bpe, out, val_fraction=0.2, seed=3,
                         shard_tokens=500, workers=workers)
    ref = reference(docs, bpe, 3, 0.2)
    shards = TokenShards(out)
    for split in ("train", "val"):
        assert np.array_equal(np.asarray(shards.tokens(split)), ref[split])
        assert meta.splits[split]["tokens"] == len(ref[split])
        assert sum(s["documents"] for s in meta.shards[split]) == meta.splits[split]["documents"]
    assert meta.duplicates == 20 and meta.split_rule == "hash" and len(meta.tokenizer_sha256) == 64
    assert all(s["tokens"] == 500 for s in meta.shards["train"][:-1])  # fixed-size shards, the last shorter
    assert not (out / PROGRESS_FILE).exists() and not list(out.glob("*.tmp"))
    shards.verify()
    damaged = out / meta.shards["train"][1]["name"]
    data = bytearray(damaged.read_bytes())
    data[0] ^= 1
    damaged.write_bytes(bytes(data))
    with pytest.raises(ScalelabError, match="does not match its sha256"):
        shards.verify()
    damaged.write_bytes(bytes(data[:-2]))
    with pytest.raises(ScalelabError, match="has 998 bytes, the manifest says 1000"):
        shards.tokens("train")


def test_large_text_files_stream_in_pieces_with_the_same_tokens(bpe, tmp_path, monkeypatch):
    text = "\n".join(corpus_docs(120, seed=4)) + "\n  trailing spaces  \n\nend"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    (tmp_path / "b.txt").write_text("a small second file", encoding="utf-8")
    monkeypatch.setattr(sources, "PIECE_BYTES", 300)
    monkeypatch.setattr(sources, "READ_BYTES", 128)  # multi-byte characters straddle reads
    pieces = list(sources.stream_pieces("text", str(tmp_path)))
    assert len(pieces) > 10 and [p.start for p in pieces].count(True) == 2
    assert "".join(p.text for p in pieces[:-1]) == text
    keys = [content_key(t.encode()) for t in (text, "a small second file")]
    seed = next(s for s in range(100) if split_of(keys[0], s, 0.5) != split_of(keys[1], s, 0.5))
    meta = stream_shards(CorpusStream("text", str(tmp_path)), bpe, tmp_path / "out", val_fraction=0.5, seed=seed)
    ref = reference([text, "a small second file"], bpe, seed, 0.5)
    for split in ("train", "val"):
        assert np.array_equal(np.asarray(TokenShards(tmp_path / "out").tokens(split)), ref[split])
    assert meta.splits["train"]["documents"] + meta.splits["val"]["documents"] == 2


def test_safe_cut_is_invisible_to_bpe(bpe):
    text = "alpha beta\ngamma  \n delta\n\nepsilon\nzeta"
    at = safe_cut(text, len(text) - 3)
    assert text[at - 2 : at + 1] == "n\nz"  # after "epsilon", before "zeta"
    assert bpe.encode(text) == bpe.encode(text[:at]) + bpe.encode(text[at:])
    long = "\n".join(corpus_docs(80, seed=5)) + "\n\n \t x.\n'sx\n!?\n"
    for target in range(40, len(long), 97):
        at = safe_cut(long, target)
        assert bpe.encode(long) == bpe.encode(long[:at]) + bpe.encode(long[at:]), target


def test_one_text_file_is_cut_by_characters_like_before(tmp_path, monkeypatch):
    text = "".join(corpus_docs(60, seed=2))
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    tok = CharTokenizer.from_text(text)
    for piece_bytes in (sources.PIECE_BYTES, 500):  # whole, then read in pieces: same shards
        monkeypatch.setattr(sources, "PIECE_BYTES", piece_bytes)
        out = tmp_path / f"out{piece_bytes}"
        meta = stream_shards(CorpusStream("text", str(tmp_path / "one.txt")), tok, out, val_fraction=0.1, seed=0,
                             single_document=True)
        cut = int(len(text) * 0.9)
        assert meta.split_rule == "characters"
        assert np.array_equal(np.asarray(TokenShards(out).tokens("val")), [tok.bos_id] + tok.encode(text[cut:]))
        assert np.array_equal(np.asarray(TokenShards(out).tokens("train")), [tok.bos_id] + tok.encode(text[:cut]))
    # found out while streaming (a folder holding one document) gives the same split
    (tmp_path / "blank.txt").write_text("  ", encoding="utf-8")
    meta = stream_shards(CorpusStream("text", str(tmp_path)), tok, tmp_path / "found", val_fraction=0.1, seed=0)
    assert meta.split_rule == "characters" and meta.splits["val"]["bytes"] == len(text[int(len(text) * 0.9):].encode())


# -- split and dedup ----------------------------------------------------------------------------------


def test_split_and_dedup_are_deterministic_and_order_free(tmp_path):
    docs = corpus_docs(400)
    tok = ByteTokenizer()

    def build(name, order, seed=0, workers=0):
        write_jsonl(tmp_path / f"{name}.jsonl", order)
        out = tmp_path / name
        meta = stream_shards(CorpusStream("jsonl", str(tmp_path / f"{name}.jsonl")), tok, out, val_fraction=0.25,
                             seed=seed, shard_tokens=4096, workers=workers)
        val = tok.decode(np.asarray(TokenShards(out).tokens("val"))).split("<|bos|>")
        return meta, set(v for v in val if v), shard_bytes(out, meta)

    meta_a, val_a, bytes_a = build("a", docs + docs[:30])
    meta_b, val_b, bytes_b = build("b", docs + docs[:30])
    assert bytes_a == bytes_b and meta_a.duplicates == 30  # same run twice: same bytes
    assert build("w", docs + docs[:30], workers=2)[2] == bytes_a  # whatever the number of workers
    shuffled = [docs[i] for i in np.random.default_rng(1).permutation(len(docs))]
    _, val_c, _ = build("c", shuffled[:200] + docs[:30] + shuffled[200:])
    assert val_c == val_a  # a document's split depends on its content, not its position
    _, val_d, _ = build("d", docs, seed=1)
    assert val_d != val_a and 60 < len(val_a) < 140  # ~25% of 400


def test_tiny_corpora_still_get_both_splits(tmp_path):
    tok = ByteTokenizer()
    for seed in range(6):
        write_jsonl(tmp_path / "t.jsonl", ["one", "two", "three"])
        meta = stream_shards(CorpusStream("jsonl", str(tmp_path / "t.jsonl")), tok, tmp_path / f"o{seed}",
                             val_fraction=0.01, seed=seed)
        assert meta.splits["val"]["documents"] >= 1 and meta.splits["train"]["documents"] >= 1


# -- kill and resume ----------------------------------------------------------------------------------

CHILD = """
import sys, time
from scalelab.data.corpus import CorpusStream
from scalelab.data.shards import stream_shards
from scalelab.tokenizer import ByteTokenizer

def slow(stream):
    def pieces(single):
        for p in stream(single):
            time.sleep(0.001)
            yield p
    return pieces

if __name__ == "__main__":
    stream = CorpusStream("jsonl", sys.argv[1])
    stream_shards(slow(stream), ByteTokenizer(), sys.argv[2], val_fraction=0.2, seed=0, shard_tokens=20000,
                  workers=int(sys.argv[3]), source="corpus")
"""


class CountingBytes(ByteTokenizer):
    encoded = 0

    def encode_batch(self, texts):
        CountingBytes.encoded += len(texts)
        return super().encode_batch(texts)


@pytest.mark.slow
def test_sigkill_mid_build_resumes_to_identical_shards(tmp_path):
    docs = corpus_docs(3000)
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    (tmp_path / "child.py").write_text(CHILD)
    victim = tmp_path / "victim"
    proc = subprocess.Popen([sys.executable, str(tmp_path / "child.py"), str(corpus), str(victim), "0"],
                            env=subprocess_env(1), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the build never completed three shards"
        try:
            if len(json.loads((victim / PROGRESS_FILE).read_text())["shards"]["train"]) >= 3:
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    proc.stderr.close()
    assert not (victim / "meta.json").exists()

    resumed = stream_shards(CorpusStream("jsonl", str(corpus)), CountingBytes(), victim, val_fraction=0.2, seed=0,
                            shard_tokens=20000, source="corpus")
    encoded_on_resume = CountingBytes.encoded
    fresh = stream_shards(CorpusStream("jsonl", str(corpus)), CountingBytes(), tmp_path / "fresh", val_fraction=0.2,
                          seed=0, shard_tokens=20000, source="corpus")
    assert shard_bytes(victim, resumed) == shard_bytes(tmp_path / "fresh", fresh)
    assert resumed.shards == fresh.shards and resumed.splits == fresh.splits
    assert encoded_on_resume < CountingBytes.encoded - encoded_on_resume  # it did not start over
    assert not list(victim.glob("*.tmp"))


def test_other_settings_start_over_instead_of_resuming(tmp_path):
    docs = corpus_docs(200)
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    out = tmp_path / "out"
    out.mkdir()
    (out / PROGRESS_FILE).write_text(json.dumps({"plan": {"seed": 99}, "shards": {}, "resume": {}}))
    (out / "train_000.bin").write_bytes(b"stale")
    meta = stream_shards(CorpusStream("jsonl", str(corpus)), ByteTokenizer(), out, val_fraction=0.2, seed=0)
    assert np.array_equal(np.asarray(TokenShards(out).tokens("train")), reference(docs, ByteTokenizer(), 0, 0.2)["train"])
    assert meta.splits["train"]["files"] == ["train_000.bin"]


# -- bounded memory -----------------------------------------------------------------------------------

MEMORY_CHILD = """
import json, resource, sys
from pathlib import Path
import scalelab.data.shard_writer as sw
from scalelab.data.corpus import CorpusStream
from scalelab.data.shards import stream_shards
from scalelab.tokenizer import ByteTokenizer

if __name__ == "__main__":
    d, mb = Path(sys.argv[1]), int(sys.argv[2])
    sw.BATCH_BYTES = 1 << 16
    tok = ByteTokenizer()
    small = d / "small.jsonl"
    small.write_text("".join(json.dumps({"text": f"warm {i} " * 50}) + "\\n" for i in range(2000)))
    stream_shards(CorpusStream("jsonl", str(small)), tok, d / "warm", val_fraction=0.1, seed=0, shard_tokens=1 << 20)
    big, n = d / "big.jsonl", 0
    with open(big, "w") as fh:
        while fh.tell() < mb << 20:
            fh.write(json.dumps({"text": f"{n} " + "lorem ipsum dolor sit amet " * 80}) + "\\n")
            n += 1
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    meta = stream_shards(CorpusStream("jsonl", str(big)), tok, d / "out", val_fraction=0.1, seed=0,
                         shard_tokens=1 << 20)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"grew_kb": after - before, "corpus_bytes": big.stat().st_size,
                      "tokens": meta.splits["train"]["tokens"] + meta.splits["val"]["tokens"]}))
"""


@pytest.mark.slow
def test_peak_memory_stays_flat_on_a_corpus_many_times_the_cap(tmp_path):
    cap_mb, corpus_mb = 5, 30
    (tmp_path / "child.py").write_text(MEMORY_CHILD)
    r = subprocess.run([sys.executable, str(tmp_path / "child.py"), str(tmp_path), str(corpus_mb)],
                       env=subprocess_env(1), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["corpus_bytes"] >= corpus_mb << 20 and report["tokens"] > report["corpus_bytes"] * 0.9
    # the whole corpus is 6x the cap, and more than 30 shards: peak RSS grows by less than the cap
    assert report["grew_kb"] < cap_mb * 1024, report


# -- bad input ----------------------------------------------------------------------------------------


def bad_inputs(tmp_path):
    """(source kind, path, field, kind of error, message) for each bad record the readers name."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = [{"text": d} for d in corpus_docs(10)]
    cases = []
    f = tmp_path / "missing.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in good[:5] + [{"body": "x"}] + good[5:]))
    cases.append(("jsonl", f, "missing_field", r"missing\.jsonl:6: no field 'text'"))
    f = tmp_path / "utf8.jsonl"
    f.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in good[:3]) + b'{"text": "caf\xe9"}\n')
    cases.append(("jsonl", f, "invalid_utf8", r"utf8\.jsonl:4: not UTF-8 text"))
    f = tmp_path / "surrogate.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in good) + '{"text": "half \\ud800 a pair"}\n')
    cases.append(("jsonl", f, "invalid_utf8", r"not valid UTF-8 text \(surrogates not allowed\)"))
    f = tmp_path / "broken.jsonl.gz"
    f.write_bytes(gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in good))[:-30])
    cases.append(("jsonl", f, "unreadable", r"broken\.jsonl\.gz: cannot read"))
    d = tmp_path / "pq"
    d.mkdir()
    pq.write_table(pa.table({"text": [r["text"] for r in good]}), d / "a.parquet")
    pq.write_table(pa.table({"text": [1, 2, 3]}), d / "b.parquet")
    cases.append(("parquet", d, "not_text", r"b\.parquet: column 'text' holds int64, not text"))
    d = tmp_path / "txt"
    d.mkdir()
    (d / "a.txt").write_text("fine text", encoding="utf-8")
    (d / "b.txt").write_bytes("caf\xe9".encode("latin-1"))
    cases.append(("text", d, "invalid_utf8", r"b\.txt is not UTF-8 text"))
    return cases


def test_each_bad_input_fails_in_one_line_or_is_skipped_and_counted(tmp_path):
    for kind, path, what, message in bad_inputs(tmp_path):
        with pytest.raises(ScalelabError, match=message) as info:
            stream_shards(CorpusStream(kind, str(path)), ByteTokenizer(), tmp_path / "out", val_fraction=0.2)
        assert "\n" not in str(info.value) and 'data.on_error = "skip"' in str(info.value)
        errors = SourceErrors("skip")
        meta = stream_shards(CorpusStream(kind, str(path), errors=errors), ByteTokenizer(), tmp_path / "out",
                             val_fraction=0.2)
        assert meta.skipped >= 1 and what in meta.skipped_kinds, (kind, meta.skipped_kinds)
        assert meta.splits["train"]["documents"] + meta.splits["val"]["documents"] >= 1
        assert json.loads((tmp_path / "out" / "meta.json").read_text())["skipped_kinds"] == meta.skipped_kinds


def test_cli_reports_a_bad_record_in_one_line(tmp_path):
    f = tmp_path / "missing.jsonl"
    f.write_text('{"text": "a b c"}\n{"body": "no text"}\n')
    r = subprocess.run([sys.executable, "-m", "scalelab", "tokenizer", "train", "--out", str(tmp_path / "tok"),
                        "--set", "data.source=\"jsonl\"", "--set", f'data.path="{f}"'],
                       env=subprocess_env(1), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "missing.jsonl:2: no field 'text'" in r.stderr


def test_all_bad_records_is_an_empty_corpus(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"body": 1}\n{"body": 2}\n')
    with pytest.raises(ScalelabError, match=r"empty corpus: no non-empty documents \(2 bad records skipped\)"):
        stream_shards(CorpusStream("jsonl", str(f), errors=SourceErrors("skip")), ByteTokenizer(), tmp_path / "o")
    with pytest.raises(ScalelabError, match="data.on_error must be fail or skip"):
        SourceErrors("ignore")


# -- compressed and columnar sources ------------------------------------------------------------------


def test_gzip_zstd_jsonl_folders_and_parquet_batches_stream_the_same_documents(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = corpus_docs(50)
    body = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "a.jsonl.gz").write_bytes(gzip.compress(body))
    (tmp_path / "j" / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(body))
    assert load_documents("jsonl", str(tmp_path / "j")) == docs + docs
    monkeypatch.setattr(sources, "PARQUET_BATCH_ROWS", 7)
    pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet", row_group_size=16)
    assert load_documents("parquet", str(tmp_path / "d.parquet")) == docs


# -- tokenizer training on a sample -------------------------------------------------------------------


def test_tokenizer_trains_on_a_bounded_sample(tmp_path):
    docs = corpus_docs(400)
    stream = CorpusStream("jsonl", str(write_jsonl(tmp_path / "c.jsonl", docs)))
    train_docs = [d for d in docs if split_of(content_key(d.encode()), 0, 0.1) == "train"]
    head = list(tokenizer_texts(stream, "bpe", "head", 2000, seed=0, val_fraction=0.1))
    assert sum(len(t.encode()) for t in head) == 2000 and "".join(head) == "".join(train_docs)[: len("".join(head))]
    uni = list(tokenizer_texts(stream, "bpe", "uniform", 5000, seed=0, val_fraction=0.1))
    assert sum(len(t.encode()) for t in uni) <= 5000 and set(uni) <= set(train_docs)
    positions = [train_docs.index(t) for t in uni]
    assert positions == sorted(positions) and positions[-1] > len(train_docs) // 2  # from all over the corpus
    assert uni == list(tokenizer_texts(stream, "bpe", "uniform", 5000, seed=0, val_fraction=0.1))
    assert uni != list(tokenizer_texts(stream, "bpe", "uniform", 5000, seed=1, val_fraction=0.1))
    # the same bytes give the same tokenizer, however they arrive
    assert train_bpe(iter(head), 300).hf.to_str() == train_bpe(list(head), 300).hf.to_str()
    with pytest.raises(ScalelabError, match="tokenizer.sample must be one of head, uniform"):
        tokenizer_texts(stream, "bpe", "random", 10, seed=0, val_fraction=0.1)
    assert list(head_sample(iter(["ab", "cd"]), 3)) == ["ab", "c"]
    assert uniform_sample(iter(["a" * 10] * 5), 25, seed=0) == ["a" * 10] * 2


def test_pretrain_prepares_a_jsonl_corpus_by_streaming(tmp_path):
    from scalelab.config import load_config
    from scalelab.pipeline import prepare

    docs = corpus_docs(300)
    f = write_jsonl(tmp_path / "c.jsonl", docs + docs[:10])
    cfg = load_config(None, ["data.source=\"jsonl\"", f'data.path="{f}"', "tokenizer.vocab_size=300",
                             "tokenizer.sample_bytes=20000", "data.shard_tokens=3000", "run.progress=false"])
    data = prepare(cfg, tmp_path / "run")
    meta = data.shards.meta
    assert meta.split_rule == "hash" and meta.duplicates == 10 and len(meta.splits["train"]["files"]) > 2
    assert isinstance(data.train_tokens, ShardedTokens) and len(data.train_tokens) == meta.splits["train"]["tokens"]
    assert np.array_equal(np.asarray(data.train_tokens), reference(docs, data.tokenizer, cfg.run.seed, 0.1)["train"])


# -- loading for many ranks ---------------------------------------------------------------------------


def sharded(n_tokens: int, shard: int, tmp_path) -> tuple[ShardedTokens, np.ndarray]:
    whole = (np.arange(n_tokens) % 60000).astype(np.uint16)
    parts = []
    for i, s in enumerate(range(0, n_tokens, shard)):
        whole[s : s + shard].tofile(tmp_path / f"p{i}.bin")
        parts.append(np.memmap(tmp_path / f"p{i}.bin", dtype=np.uint16, mode="r"))
    return ShardedTokens(parts), whole


def test_sharded_view_reads_slices_across_shards_without_loading(tmp_path):
    view, whole = sharded(1000, 128, tmp_path)
    assert len(view) == 1000 and all(isinstance(p, np.memmap) for p in view.parts)
    for lo, hi in ((0, 5), (120, 140), (127, 129), (0, 1000), (990, 2000), (300, 300)):
        assert np.array_equal(view[lo:hi], whole[lo:hi])
    assert view[129] == whole[129] and view[-1] == whole[-1]
    with pytest.raises(IndexError):
        view[1000]


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_slices_are_disjoint_and_cover_every_window(tmp_path, world_size):
    view, whole = sharded(4097, 300, tmp_path)
    B, T = 8, 16
    ranks = [TokenLoader(view, B, T, seed=3, rank=r, world_size=world_size) for r in range(world_size)]
    n_windows = len(ranks[0]._starts)
    seen = []
    for _ in range(n_windows // B):
        rows = [r.next_batch()[0] for r in ranks]
        seen += [tuple(row.tolist()) for x in rows for row in x]
    assert len(seen) == len(set(seen)) == (n_windows // B) * B  # disjoint across ranks and steps
    single = TokenLoader(whole, B, T, seed=3)  # the same windows as one process over one array
    assert sorted(seen) == sorted(tuple(row.tolist()) for _ in range(n_windows // B) for row in single.next_batch()[0])


def test_resume_at_step_k_with_another_number_of_ranks_gives_the_same_global_batches(tmp_path):
    view, _ = sharded(3000, 256, tmp_path)
    B, T, k = 8, 16, 13
    straight = TokenLoader(view, B, T, seed=1)
    expected = [straight.next_batch() for _ in range(k + 25)]
    before = [TokenLoader(view, B, T, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(k):
        for r in before:
            r.next_batch()
    state = json.loads(json.dumps(before[0].state_dict()))
    after = [TokenLoader(view, B, T, seed=1, rank=r, world_size=4) for r in range(4)]
    for r in after:
        r.load_state_dict(state)
    for x, y in expected[k:]:
        parts = [r.next_batch() for r in after]
        assert torch.cat([p[0] for p in parts]).equal(x) and torch.cat([p[1] for p in parts]).equal(y)


def test_tokenizer_command_streams_a_parquet_folder(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from scalelab.cli import main
    from scalelab.tokenizer import load_tokenizer

    (tmp_path / "pq").mkdir()
    docs = corpus_docs(300)
    for i in range(3):
        pq.write_table(pa.table({"text": docs[i * 100 : (i + 1) * 100]}), tmp_path / "pq" / f"{i}.parquet")
    assert main(["tokenizer", "train", "--out", str(tmp_path / "tok"), "--set", 'data.source="parquet"',
                 "--set", f'data.path="{tmp_path / "pq"}"', "--set", "tokenizer.vocab_size=300",
                 "--set", 'tokenizer.sample="uniform"', "--set", "tokenizer.sample_bytes=20000"]) == 0
    out = capsys.readouterr().out
    assert "bpe tokenizer, vocab 300" in out and "held-out compression" in out
    assert load_tokenizer(tmp_path / "tok").vocab_size == 300
