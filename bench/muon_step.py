"""One Muon optimizer step at scalelab's CPU model shapes: torch.optim.Muon (per matrix, bfloat16 Newton-Schulz)
against scalelab's ShardedMuon (same-shape matrices stacked, bfloat16 or float32), with AdamW's step on the
same matrices for scale, side by side in one process, rounds interleaved.

Each row also gives how far the orthogonalised update of one momentum matrix is from a float64 run of the
same iteration (relative Frobenius error), so a faster dtype is shown not to change what Muon computes.
Results are appended to bench/results/muon_step.md.

    python bench/muon_step.py [--threads 2] [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from results_file import append_results
from scalelab.model.gpt import GPT, GPTConfig
from scalelab.train.optim import ShardedMuon, orthogonalize

# (name, model) at the shapes of configs/shakespeare_char.toml and configs/demo.toml (BPE vocab 4096)
MODELS = {
    "shakespeare_char (4 x 128)": GPTConfig(vocab_size=65, depth=4, n_embd=128, n_head=4, block_size=64),
    "demo (4 x 256)": GPTConfig(vocab_size=4096, depth=4, n_embd=256, block_size=256),
}
NS = ((3.4445, -4.7750, 2.0315), 5, 1e-7)  # torch.optim.Muon's defaults


def matrices(cfg: GPTConfig) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    model = GPT(cfg)
    params = model.optimizer_groups(0.0)[0]["params"]  # the hidden matrices Muon trains
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    return params


def optimizers(params) -> dict[str, torch.optim.Optimizer]:
    return {
        "torch.optim.Muon (bf16, per matrix)": torch.optim.Muon(params, lr=0.02, weight_decay=0.0),
        "ShardedMuon bf16 (stacked)": ShardedMuon(params, lr=0.02, weight_decay=0.0, ns_dtype=torch.bfloat16),
        "ShardedMuon fp32 (stacked)": ShardedMuon(params, lr=0.02, weight_decay=0.0, ns_dtype=torch.float32),
        "AdamW foreach (same matrices)": torch.optim.AdamW(params, lr=1e-3, foreach=True),
    }


def ns_error(params, dtype: torch.dtype) -> float:
    """Relative error of one orthogonalised update against the same iteration in float64."""
    g = max(params, key=lambda p: p.numel()).grad[None]
    exact = orthogonalize(g, *NS, torch.float64)
    return float((orthogonalize(g, *NS, dtype).double() - exact).norm() / exact.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--results", default=str(Path(__file__).parent / "results" / "muon_step.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = ["| model | optimizer | ms per step (median) | vs torch.optim.Muon | NS error vs float64 |",
            "|---|---|---|---|---|"]
    for name, cfg in MODELS.items():
        params = matrices(cfg)
        opts = optimizers(params)
        times: dict[str, list[float]] = {k: [] for k in opts}
        for opt in opts.values():  # warm-up: state allocation, first-call dispatch
            opt.step()
        for _ in range(args.repeats):
            for k, opt in opts.items():  # interleaved, so load on a shared host hits every row alike
                t = time.perf_counter()
                opt.step()
                times[k].append((time.perf_counter() - t) * 1e3)
        ref = statistics.median(times["torch.optim.Muon (bf16, per matrix)"])
        errors = {"bf16": ns_error(params, torch.bfloat16), "fp32": ns_error(params, torch.float32)}
        for k, ts in times.items():
            ms = statistics.median(ts)
            err = next((f"{e:.1e}" for d, e in errors.items() if d in k), "-")
            rows.append(f"| {name} | {k} | {ms:.2f} | {ref / ms:.2f}x | {err} |")
            print(rows[-1], flush=True)
    n = {name: len(matrices(cfg)) for name, cfg in MODELS.items()}
    append_results(args.results, [f"torch threads {args.threads}; {args.repeats} interleaved rounds; hidden matrices "
                                  f"per model: {n}; random gradients; NS error: the largest matrix, one update"])
    with open(args.results, "a", encoding="utf-8") as f:
        f.write("\n" + "\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
