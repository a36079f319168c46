"""Pretraining throughput: tokens/s and achieved FLOP/s as a fraction of the fp32 matmul peak.

Both numbers are measured side by side in one run on this machine:
1. the peak: the best of several large square fp32 matrix products;
2. full training steps (forward, backward, AdamW) of a GPT of 4M+ parameters at context 256.

Achieved FLOP/s counts the model's training FLOPs per token (PaLM convention, see
GPT.flops_per_token) times tokens/s. Results are appended to bench/results/pretrain_throughput.md.

    python bench/pretrain_throughput.py [--depth 4] [--batch 16] [--steps 10] [--compile] [--profile]

--profile adds where a step's time goes (torch.profiler, self CPU time): the matrix products and the
FLOP/s they reach on their own, attention, the optimizer and the rest, and the fraction of peak the step
would reach if everything but the matrix products cost nothing, which bounds what fusing can win.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import profile

from scalelab.model.gpt import GPT, GPTConfig
from results_file import append_results


def matmul_peak_flops(n: int = 2048, repeats: int = 8) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm up the BLAS threads
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def step_breakdown(step_fn, steps: int = 3) -> dict:
    """Per-step self CPU seconds by kind of operator, and the matrix products' FLOPs per step."""
    with profile(with_flops=True) as prof:
        for _ in range(steps):
            step_fn()
    split = {"matmul": 0.0, "attention": 0.0, "optimizer": 0.0, "other": 0.0}
    matmul_flops = 0
    for e in prof.key_averages():
        sec = e.self_cpu_time_total / 1e6 / steps
        if e.key in MATMUL_OPS:
            split["matmul"] += sec
            matmul_flops += (e.flops or 0) / steps
        elif "scaled_dot_product" in e.key:
            split["attention"] += sec
        elif e.key.startswith("aten::_foreach") or e.key in ("aten::lerp_", "aten::addcdiv_", "aten::addcmul_", "aten::sqrt"):
            split["optimizer"] += sec  # AdamW's arithmetic: no other op of the step calls these
        else:
            split["other"] += sec
    return {"seconds": split, "matmul_flops": matmul_flops}


def train_throughput(cfg: GPTConfig, batch: int, steps: int, warmup: int = 3, compile: bool = False,
                     breakdown: bool = False) -> tuple[float, GPT, dict | None]:
    torch.manual_seed(0)
    model = GPT(cfg)
    step_model = torch.compile(model) if compile else model
    opt = torch.optim.AdamW(model.optimizer_groups(0.1), lr=1e-3, betas=(0.9, 0.95))
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size))
    y = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size))

    def step():
        loss = step_model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    return batch * cfg.block_size / median, model, step_breakdown(step) if breakdown else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=384)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--mlp", default="relu2")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (inductor fuses the elementwise ops)")
    ap.add_argument("--profile", action="store_true", help="also print where a step's time goes (torch.profiler)")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results" / "pretrain_throughput.md"))
    args = ap.parse_args()

    cfg = GPTConfig(vocab_size=args.vocab, block_size=args.block, depth=args.depth, n_embd=args.n_embd, mlp=args.mlp)
    peak_before = matmul_peak_flops()
    tok_s, model, split = train_throughput(cfg, args.batch, args.steps, compile=args.compile, breakdown=args.profile)
    peak_after = matmul_peak_flops()
    peak = max(peak_before, peak_after)
    achieved = tok_s * model.flops_per_token()
    frac = achieved / peak
    c = model.config
    lines = [
        f"model: depth {c.depth}, width {c.n_embd}, heads {c.n_head}, mlp {c.mlp}, vocab {c.vocab_size}, context {c.block_size}",
        f"parameters: {model.num_params():,} ({model.num_params(False):,} non-embedding); training FLOPs/token {model.flops_per_token():,}",
        f"batch {args.batch} x {args.block} tokens, median of {args.steps} steps, fp32, {torch.get_num_threads()} threads, compile={args.compile}",
        f"fp32 matmul peak (2048^3 mm, best of 8, before/after): {peak_before / 1e9:.1f} / {peak_after / 1e9:.1f} GFLOP/s",
        f"training throughput: {tok_s:,.0f} tokens/s = {achieved / 1e9:.1f} GFLOP/s",
        f"fraction of peak: {frac:.1%}",
    ]
    if split:
        sec = split["seconds"]
        total = sum(sec.values())
        mm = sec["matmul"]
        lines += [
            "profiled step (self CPU time, 3 steps): " + ", ".join(f"{k} {v * 1e3:.0f} ms ({v / total:.0%})" for k, v in sec.items()),
            f"matrix products alone: {split['matmul_flops'] / mm / 1e9:.1f} GFLOP/s = {split['matmul_flops'] / mm / peak:.1%} of peak",
            f"ceiling if only the matrix products cost time: {model.flops_per_token() * args.batch * args.block / mm / peak:.1%} of peak",
        ]
    print("\n".join(lines))
    append_results(args.results, lines)


if __name__ == "__main__":
    main()
