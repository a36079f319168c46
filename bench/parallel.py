"""Parallel layouts side by side on this machine: throughput and memory per process.

Runs the real training step (scalelab.train.Trainer.train_step: forward, backward, grad
clipping, AdamW) of one model at one global batch under 1 process, DP=2, FSDP=2 and
TP=2 (gloo on CPU), one after the other in one run, and reports per layout:
tokens/s (global tokens per step / median step time), peak RSS of the largest
process, and the bytes of parameters + gradients + AdamW state held per rank.

The single process uses all cores (OMP threads = cores); each of N processes gets
cores / N threads, so every layout uses the same hardware. On a 2-core laptop this can
only show the memory side: FSDP divides parameter, gradient and optimizer bytes by
the shard count; nothing can be faster on the same 2 cores once communication is added.

    python bench/parallel.py [--depth 4] [--n-embd 512] [--vocab 8192] [--batch 8] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).parent))

LAYOUTS = [("1 process", 1, (1, 1, 1)), ("DP=2", 2, (2, 1, 1)), ("FSDP=2", 2, (1, 2, 1)), ("TP=2", 2, (1, 1, 2))]


def worker(args) -> None:
    """One layout, inside torchrun (or alone for 1 process): time train_step, measure memory."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from scalelab.config import load_config
    from scalelab.parallel.dist import init_distributed, shutdown
    from scalelab.parallel.plans import local_bytes
    from scalelab.train.trainer import Trainer

    env = init_distributed("cpu")
    runtime_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Python + torch + gloo, before the model
    rep, shard, tp = (int(x) for x in args.layout.split("x"))
    cfg = load_config(None, [
        f"model.vocab_size={args.vocab}", f"model.depth={args.depth}", f"model.n_embd={args.n_embd}",
        f"model.block_size={args.block}", f"train.batch_size={args.batch}", "train.optim.warmup_steps=1",
        f"train.steps={args.steps + args.warmup}", f"parallel.dp_replicate={rep}", f"parallel.dp_shard={shard}",
        f"parallel.tp={tp}", "run.progress=false", "run.device=cpu",
    ])
    tokens = np.random.default_rng(0).integers(0, args.vocab, 200_000).astype(np.uint16)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, tmp, tokens, tokens[:10_000], 1.0, env=env)
        times = []
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            trainer.train_step()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        params, optim = local_bytes(trainer.model, trainer.optimizer)
        n_params = trainer.model.num_params() if not trainer.parallel.sharded else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    mine = {"median_s": sorted(times)[len(times) // 2], "rss": rss, "runtime_rss": runtime_rss, "params": params, "optim": optim, "n_params": n_params}
    everyone = [mine]
    if env.enabled:
        everyone = [None] * env.world_size
        dist.all_gather_object(everyone, mine)
    if env.is_main:
        Path(args.out).write_text(json.dumps({"ranks": everyone, "threads": torch.get_num_threads()}))
    shutdown(env)


def run_layout(args, nproc: int, layout: tuple[int, int, int], out: Path) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    # Idle OpenMP threads sleep instead of spinning: on a busy machine spinning threads steal the cores.
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    # A fixed mmap threshold makes glibc hand freed large buffers back at once, so RSS tracks live tensors
    # (FSDP's per-unit gather buffers would otherwise stay resident and hide the sharding).
    env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    me = [str(Path(__file__).resolve()), "--worker", "--layout", "x".join(map(str, layout)), "--out", str(out)]
    me += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in ("depth", "n_embd", "vocab", "block", "batch", "steps", "warmup")]
    if nproc == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *me]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{layout} failed:\n{r.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="global batch in sequences")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="run every layout this many times, interleaved; keep the best")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--layout", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--results", default=str(Path(__file__).parent / "results" / "parallel.md"))
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    from results_file import append_results

    before_load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name, nproc, layout in LAYOUTS:
                res = run_layout(args, nproc, layout, Path(tmp) / f"{name}.json")
                step = max(r["median_s"] for r in res["ranks"])
                if name not in best or step < max(r["median_s"] for r in best[name]["ranks"]):
                    best[name] = res
                print(f"round {round_ + 1}: {name}: {args.batch * args.block / step:,.0f} tokens/s", file=sys.stderr)
    rows = [(name, nproc, best[name]) for name, nproc, _ in LAYOUTS]
    n_params = rows[0][2]["ranks"][0]["n_params"]
    tokens = args.batch * args.block
    mib = lambda b: f"{b / 2**20:,.1f}"  # noqa: E731
    table = [
        "| layout | processes x threads | tokens/s | peak RSS, largest process (MiB) | peak RSS above the runtime (MiB) "
        "| params / rank (MiB) | grads / rank (MiB) | AdamW state / rank (MiB) | params+grads+AdamW / rank (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, nproc, res in rows:
        ranks = res["ranks"]
        worst = max(ranks, key=lambda r: r["params"] + r["optim"])
        step = max(r["median_s"] for r in ranks)
        table.append(
            f"| {name} | {nproc} x {res['threads']} | {tokens / step:,.0f} | {mib(max(r['rss'] for r in ranks))} | "
            f"{mib(max(r['rss'] - r['runtime_rss'] for r in ranks))} | {mib(worst['params'])} | {mib(worst['params'])} | {mib(worst['optim'])} | "
            f"{mib(2 * worst['params'] + worst['optim'])} |"
        )
    lines = [
        f"model: depth {args.depth}, width {args.n_embd}, vocab {args.vocab}, context {args.block}, "
        f"{n_params:,} parameters (fp32); global batch {args.batch} x {args.block} = {tokens:,} tokens/step; "
        f"median of {args.steps} steps after {args.warmup} warm-up, best of {args.rounds} interleaved rounds; gloo on CPU",
        "gradients are counted at the size of the local parameter shards (what stays allocated between steps)",
        "peak RSS includes the Python + torch + gloo runtime of every process (measured before the model is built "
        "and subtracted in the next column), which no sharding removes; OMP_WAIT_POLICY=PASSIVE, MALLOC_MMAP_THRESHOLD_=1MiB",
        "load average before / after: " + before_load + " / " + " ".join(f"{x:.1f}" for x in os.getloadavg())
        + " (other processes on the machine slow every layout; compare rows of one run only)",
    ]
    print("\n".join(lines + [""] + table))
    append_results(args.results, lines)
    with open(args.results, "a", encoding="utf-8") as f:  # after the bullet list: a table needs bare lines
        f.write("\n" + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
