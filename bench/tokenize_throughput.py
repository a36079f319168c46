"""Tokenization throughput and memory of the streaming shard pipeline, side by side in one run.

The bench writes its own corpus (JSONL parts of generated English-like text, nothing downloaded),
trains a byte-level BPE on its first MB through scalelab's sampler, then measures over the same text:

1. raw: tokenizers' ``encode_batch`` (Rust threads) over documents already held in memory: the
   library's own limit, with no reading, hashing or writing;
2. ours: ``stream_shards`` end to end (read + parse JSONL, hash split, dedup, encode, write shards),
   with tokenizers' threads in this process (workers=0) and with worker processes (workers=N);
3. baseline: a plain single-process, single-thread nanoGPT-``prepare.py``-style script: read every
   document into a list, ``encode`` one by one, one big array, ``tofile``.

and the peak RSS of our pipeline over the first 0.5, 1 and 2 GB (or the sizes given). Every
measurement runs in a fresh subprocess, so peaks and thread pools do not leak between them.
Results are appended to bench/results/tokenize.md.

    python bench/tokenize_throughput.py [--size-gb 2] [--throughput-mb 256] [--memory-gb 0.5 1 2] [--workers 2]
"""

from __future__ import annotations

import argparse
import json  # noqa: E402
import os
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

PART_MB = 128  # the corpus is written in parts; a size is a folder holding the first parts
WORDS_SEED = 0


def make_vocabulary(rng: np.random.Generator, n: int = 20000) -> list[str]:
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    freq = np.array([12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0,
                     2.0, 1.9, 1.5, 1.0, 0.8, 0.2, 0.2, 0.1, 0.1])
    lengths = rng.integers(2, 11, size=n)
    return ["".join(rng.choice(letters, size=k, p=freq / freq.sum())) for k in lengths]


def write_corpus(folder: Path, size_gb: float, part_mb: int) -> list[Path]:
    """Parts of PART_MB each until ``size_gb``; documents of Zipf-distributed words in sentences and
    paragraphs, 1% exact duplicates. Deterministic; existing parts are reused."""
    folder.mkdir(parents=True, exist_ok=True)
    n_parts = max(1, round(size_gb * 1000 / part_mb))
    rng = np.random.default_rng(WORDS_SEED)
    vocab = np.array(make_vocabulary(rng), dtype=object)
    zipf = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    zipf /= zipf.sum()
    parts = []
    for p in range(n_parts):
        path = folder / f"part_{p:03d}.jsonl"
        parts.append(path)
        if path.is_file() and path.stat().st_size >= part_mb * 1_000_000:
            continue
        prng = np.random.default_rng([WORDS_SEED, p])
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            recent: list[str] = []
            while f.tell() < part_mb * 1_000_000:
                words = vocab[prng.choice(len(vocab), size=int(prng.integers(80, 900)), p=zipf)]
                cuts = np.cumsum(prng.integers(6, 25, size=len(words)))
                sentences = [" ".join(words[a:b]).capitalize() + "." for a, b in zip(np.r_[0, cuts], cuts) if a < len(words)]
                doc = "\n\n".join(" ".join(sentences[i : i + 4]) for i in range(0, len(sentences), 4))
                if recent and prng.random() < 0.01:
                    doc = recent[int(prng.integers(len(recent)))]  # an exact duplicate
                recent = (recent + [doc])[-100:]
                f.write(json.dumps({"text": doc}) + "\n")
        tmp.rename(path)
    return parts


def subset(parts: list[Path], size_mb: float, work: Path, part_mb: int) -> Path:
    """A folder of links to the first parts that hold ``size_mb``."""
    n = max(1, round(size_mb / part_mb))
    if n > len(parts):
        raise SystemExit(f"the corpus holds {len(parts) * part_mb} MB, less than {size_mb:.0f} MB; raise --size-gb")
    folder = work / f"first_{n * part_mb}mb"
    folder.mkdir(exist_ok=True)
    for p in parts[:n]:
        link = folder / p.name
        if not link.exists():
            link.symlink_to(p.resolve())
    return folder


# -- measurements (each in its own process) -----------------------------------------------------------


def _peak_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: the latter keeps the parent's peak across fork + exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _read_docs(folder: Path) -> list[str]:
    docs = []
    for path in sorted(folder.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            docs.extend(json.loads(line)["text"] for line in f)
    return docs


def child_raw(folder: Path, tok_dir: Path, batch_bytes: int) -> dict:
    from scalelab.tokenizer import load_tokenizer

    hf = load_tokenizer(tok_dir).hf
    docs = _read_docs(folder)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    batches, cur, size = [], [], 0
    for d in docs:
        cur.append(d)
        size += len(d)
        if size >= batch_bytes:
            batches.append(cur)
            cur, size = [], 0
    batches.append(cur)
    best = None
    for name in ("encode_batch", "encode_batch_fast"):  # the faster of the two is the library's limit
        if not hasattr(hf, name):
            continue
        encode = getattr(hf, name)
        t0 = time.perf_counter()
        n_tokens = 0
        for b in batches:
            n_tokens += sum(len(e.ids) for e in encode(b, add_special_tokens=False))
        seconds = time.perf_counter() - t0
        if best is None or seconds < best["seconds"]:
            best = {"seconds": seconds, "call": name}
    return {**best, "bytes": n_bytes, "tokens": n_tokens, "peak_rss_mb": _peak_mb()}


def child_ours(folder: Path, tok_dir: Path, out: Path, workers: int) -> dict:
    from scalelab.data.corpus import CorpusStream
    from scalelab.data.shards import stream_shards
    from scalelab.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    t0 = time.perf_counter()
    meta = stream_shards(CorpusStream("jsonl", str(folder)), tok, out, val_fraction=0.01, seed=0, workers=workers)
    seconds = time.perf_counter() - t0
    s = meta.splits
    # workers are spawned from this process: their ru_maxrss starts at most at this one's peak at spawn time
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 if workers else 0.0
    return {"seconds": seconds, "bytes": s["train"]["bytes"] + s["val"]["bytes"],
            "tokens": s["train"]["tokens"] + s["val"]["tokens"], "duplicates": meta.duplicates,
            "peak_rss_mb": _peak_mb(), "worker_peak_rss_mb": children}


def child_baseline(folder: Path, tok_dir: Path, out: Path) -> dict:
    from scalelab.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    t0 = time.perf_counter()
    docs = _read_docs(folder)
    ids: list[int] = []
    for d in docs:
        ids.extend(tok.hf.encode(d, add_special_tokens=False).ids)
        ids.append(tok.bos_id)
    arr = np.array(ids, dtype=np.uint16)
    out.mkdir(parents=True, exist_ok=True)
    arr.tofile(out / "train.bin")
    return {"seconds": time.perf_counter() - t0, "bytes": sum(len(d.encode("utf-8")) for d in docs),
            "tokens": int(arr.size), "peak_rss_mb": _peak_mb()}


def run_child(args: list[str], single_thread: bool = False) -> dict:
    env = dict(os.environ)
    if single_thread:  # the plain baseline: one process, one thread
        env.update(TOKENIZERS_PARALLELISM="false", RAYON_NUM_THREADS="1")
    r = subprocess.run([sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"bench child {args[0]} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def mbps(r: dict) -> float:
    return r["bytes"] / 1e6 / r["seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=2.0, help="corpus to generate (default 2 GB)")
    p.add_argument("--throughput-mb", type=float, default=256, help="text for the side-by-side throughput runs")
    p.add_argument("--memory-gb", type=float, nargs="*", default=[0.5, 1.0, 2.0], help="sizes for the peak-RSS curve")
    p.add_argument("--workers", type=int, default=2, help="worker processes for the workers=N run")
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--part-mb", type=int, default=PART_MB, help="size of one corpus part (the unit of every size)")
    p.add_argument("--work", default="bench/.tokenize_work", help="where the corpus and shards go")
    p.add_argument("--out", default="bench/results/tokenize.md")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        mode, *rest = a.child
        folder, tok_dir = Path(rest[0]), Path(rest[1])
        if mode == "raw":
            result = child_raw(folder, tok_dir, int(rest[2]))
        elif mode == "ours":
            result = child_ours(folder, tok_dir, Path(rest[2]), int(rest[3]))
        else:
            result = child_baseline(folder, tok_dir, Path(rest[2]))
        print(json.dumps(result))
        return

    from results_file import append_results

    from scalelab.data.corpus import CorpusStream, tokenizer_texts
    from scalelab.data.shard_writer import BATCH_BYTES
    from scalelab.tokenizer import train_bpe

    work = Path(a.work)
    t0 = time.perf_counter()
    parts = write_corpus(work / "corpus", a.size_gb, a.part_mb)
    print(f"corpus: {len(parts)} parts of {a.part_mb} MB in {work / 'corpus'} ({time.perf_counter() - t0:.0f} s)", flush=True)
    tok_dir = work / f"bpe_{a.vocab}"
    if not (tok_dir / "tokenizer.json").is_file():
        stream = CorpusStream("jsonl", str(parts[0]))
        train_bpe(tokenizer_texts(stream, "bpe", "head", 1_000_000, 0, 0.01), a.vocab).save(tok_dir)

    folder = subset(parts, a.throughput_mb, work, a.part_mb)
    shard_out = work / "shards"
    raw = run_child(["raw", str(folder), str(tok_dir), str(BATCH_BYTES)])
    print(f"raw {raw['call']}: {mbps(raw):.2f} MB/s", flush=True)
    ours = {}
    for w in (0, a.workers):
        ours[w] = run_child(["ours", str(folder), str(tok_dir), str(shard_out / f"w{w}"), str(w)])
        print(f"ours, workers={w}: {mbps(ours[w]):.2f} MB/s", flush=True)
    base = run_child(["baseline", str(folder), str(tok_dir), str(shard_out / "baseline")], single_thread=True)
    print(f"baseline: {mbps(base):.2f} MB/s", flush=True)
    best = max(ours, key=lambda w: mbps(ours[w]))
    curve = []
    for gb in a.memory_gb:
        sub = subset(parts, gb * 1000, work, a.part_mb)
        r = run_child(["ours", str(sub), str(tok_dir), str(shard_out / f"mem_{gb}"), str(best)])
        curve.append((gb, r))
        print(f"{gb} GB: peak RSS {r['peak_rss_mb']:.0f} MB (workers: {r['worker_peak_rss_mb']:.0f} MB each at most), "
              f"{mbps(r):.2f} MB/s", flush=True)

    size_mb = raw["bytes"] / 1e6
    vocab_size = json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"].__len__()
    lines = [
        f"corpus: generated JSONL, {len(parts) * a.part_mb} MB in {len(parts)} parts; BPE vocab {vocab_size} "
        f"(--vocab {a.vocab}, trained on the first 1 MB); "
        f"{os.cpu_count()} CPUs (shared with other jobs while this ran)",
        f"throughput over the same {size_mb:.0f} MB ({raw['tokens']:,} tokens, "
        f"{raw['bytes'] / raw['tokens']:.2f} bytes/token):",
        "",
        "  | path | MB/s | vs raw encode_batch | vs single-process baseline |",
        "  |---|---:|---:|---:|",
        f"  | tokenizers {raw['call']}, text in memory (library limit: the faster of encode_batch and encode_batch_fast) | {mbps(raw):.2f} | 100% | "
        f"{mbps(raw) / mbps(base):.2f}x |",
    ]
    for w, r in ours.items():
        label = "tokenizers threads in-process (workers=0)" if w == 0 else f"{w} worker processes (workers={w})"
        lines.append(f"  | ours: stream_shards, {label} | {mbps(r):.2f} | {mbps(r) / mbps(raw):.0%} | "
                     f"{mbps(r) / mbps(base):.2f}x |")
    lines += [
        f"  | nanoGPT-prepare-style baseline: 1 process, 1 thread, all in memory | {mbps(base):.2f} | "
        f"{mbps(base) / mbps(raw):.0%} | 1.00x |",
        "",
        f"peak RSS (baseline over {size_mb:.0f} MB: {base['peak_rss_mb']:.0f} MB; raw, text held: "
        f"{raw['peak_rss_mb']:.0f} MB); ours with workers={best}, the faster here:",
        "",
        "  | input | peak RSS, main process | peak RSS, largest worker | MB/s | duplicates dropped |",
        "  |---:|---:|---:|---:|---:|",
    ]
    for gb, r in curve:
        lines.append(f"  | {r['bytes'] / 1e6:,.0f} MB | {r['peak_rss_mb']:.0f} MB | {r['worker_peak_rss_mb']:.0f} MB | "
                     f"{mbps(r):.2f} | {r['duplicates']:,} |")
    append_results(a.out, lines)
    print("\n".join(lines))
    print(f"appended to {a.out}")


if __name__ == "__main__":
    main()
