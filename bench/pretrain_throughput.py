"""Pretraining throughput: tokens/s and achieved FLOP/s as a fraction of the fp32 matmul peak.

Both numbers are measured side by side in one run on this machine:
1. the peak: the best of several large square fp32 matrix products;
2. full training steps (forward, backward, AdamW) of a GPT of 4M+ parameters at context 256.

Achieved FLOP/s counts the model's training FLOPs per token (PaLM convention, see
GPT.flops_per_token) times tokens/s. Results are appended to bench/results/pretrain_throughput.md.

    python bench/pretrain_throughput.py [--depth 4] [--batch 16] [--steps 10] [--compile] [--profile]

--variants runs several versions of the compiled step side by side: each is built and warmed up once, then
--rounds interleaved rounds time every variant after a fresh peak measurement, so a drifting host moves
all of them alike. A variant is "default" or knobs joined by "+" (VARIANT_KNOBS below), for example
``--compile --variants default,sdpa_math,cpp_wrapper+fused_adamw --rounds 5``. It prints each variant's
fraction of peak per round and its step time relative to the first variant in the same round.

--profile adds where a step's time goes (torch.profiler, self CPU time): the matrix products and the
FLOP/s they reach on their own, attention, the optimizer and the rest, and the fraction of peak the step
would reach if everything but the matrix products cost nothing, which bounds what fusing can win.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from torch.nn.attention import SDPBackend, sdpa_kernel
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


# Knobs a --variants entry can turn on. Inductor's are code-generation choices, so they only need to hold
# while the step is first run (compiled); the SDPA backend is chosen on every call.
VARIANT_KNOBS = {
    "sdpa_math": "attention as plain matrix products and softmax (SDPA's math backend) instead of CPU flash",
    "fused_adamw": "torch.optim.AdamW(fused=True), one kernel per parameter group",
    "cpp_wrapper": "inductor's C++ wrapper: the compiled graph calls its kernels from C++, not Python",
    "max_autotune": "inductor max-autotune, its C++ GEMM templates competing with ATen's",
}


def parse_variant(name: str) -> set[str]:
    knobs = set() if name == "default" else set(name.split("+"))
    unknown = knobs - set(VARIANT_KNOBS)
    if unknown:
        raise SystemExit(f"unknown variant knob(s) {sorted(unknown)}; knobs: default, {', '.join(VARIANT_KNOBS)}")
    return knobs


def build_step(cfg: GPTConfig, batch: int, compile: bool = False, knobs: frozenset[str] = frozenset(),
               warmup: int = 3):
    """A full training step (forward, backward, AdamW) on random tokens, run ``warmup`` times."""
    torch.manual_seed(0)
    model = GPT(cfg)
    step_model = torch.compile(model) if compile else model
    opt = torch.optim.AdamW(model.optimizer_groups(0.1), lr=1e-3, betas=(0.9, 0.95),
                            fused=True if "fused_adamw" in knobs else None)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size))
    y = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size))
    backend = SDPBackend.MATH if "sdpa_math" in knobs else None

    def step():
        with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
            loss = step_model(x, y)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    codegen = {"cpp_wrapper": "cpp_wrapper" in knobs, "max_autotune": "max_autotune" in knobs}
    if codegen["max_autotune"]:
        codegen["max_autotune_gemm_backends"] = "CPP,ATEN"
    with inductor_config.patch(codegen):
        for _ in range(warmup):
            step()
    return model, step


def median_step_seconds(step, steps: int) -> float:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def train_throughput(cfg: GPTConfig, batch: int, steps: int, warmup: int = 3, compile: bool = False,
                     breakdown: bool = False) -> tuple[float, GPT, dict | None]:
    model, step = build_step(cfg, batch, compile, warmup=warmup)
    median = median_step_seconds(step, steps)
    return batch * cfg.block_size / median, model, step_breakdown(step) if breakdown else None


def compare_variants(cfg: GPTConfig, batch: int, steps: int, compile: bool, variants: list[str],
                     rounds: int) -> list[str]:
    """Each variant's fraction of peak per round, and its step time over the first variant's in that round."""
    built = {}
    for name in variants:
        # no dynamo reset: every model instance gets its own compiled entry, made under its own knobs
        built[name] = build_step(cfg, batch, compile, frozenset(parse_variant(name)))
    tokens = batch * cfg.block_size
    flops_per_token = next(iter(built.values()))[0].flops_per_token()
    fractions = {name: [] for name in variants}
    ratios = {name: [] for name in variants}
    for r in range(rounds):
        peak = matmul_peak_flops()
        seconds = {name: median_step_seconds(step, steps) for name, (_, step) in built.items()}
        for name in variants:
            fractions[name].append(tokens / seconds[name] * flops_per_token / peak)
            ratios[name].append(seconds[name] / seconds[variants[0]])
        print(f"round {r + 1}/{rounds}, peak {peak / 1e9:.0f} GFLOP/s: "
              + ", ".join(f"{n} {seconds[n] * 1e3:.0f} ms" for n in variants), flush=True)
    lines = [f"variants side by side: {rounds} interleaved rounds, each a fresh peak then every variant's median of "
             f"{steps} steps; step time relative to {variants[0]} in the same round"]
    for name in variants:
        f, q = fractions[name], ratios[name]
        lines.append(f"{name}: fraction of peak {statistics.mean(f):.1%} (rounds: "
                     + ", ".join(f"{v:.1%}" for v in f) + f"); step time x{statistics.mean(q):.3f} "
                     f"(range {min(q):.3f}-{max(q):.3f})")
    return lines


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
    ap.add_argument("--variants", default="", help="comma-separated step variants timed side by side, e.g. "
                    "default,sdpa_math,cpp_wrapper+fused_adamw (knobs: " + ", ".join(VARIANT_KNOBS) + ")")
    ap.add_argument("--rounds", type=int, default=5, help="--variants: interleaved timing rounds")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results" / "pretrain_throughput.md"))
    args = ap.parse_args()

    cfg = GPTConfig(vocab_size=args.vocab, block_size=args.block, depth=args.depth, n_embd=args.n_embd, mlp=args.mlp)
    if args.variants and args.profile:
        ap.error("--profile times one step; run it without --variants")
    if args.variants:
        variants = args.variants.split(",")
        for name in variants:
            parse_variant(name)  # fail before any compiling
        c = cfg.resolved()
        lines = [f"model: depth {c.depth}, width {c.n_embd}, heads {c.n_head}, mlp {c.mlp}, vocab {c.vocab_size}, "
                 f"context {c.block_size}; batch {args.batch} x {args.block} tokens, fp32, "
                 f"{torch.get_num_threads()} threads, compile={args.compile}"]
        lines += compare_variants(cfg, args.batch, args.steps, args.compile, variants, args.rounds)
        print("\n".join(lines))
        append_results(args.results, lines)
        return
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
