"""Where a small training step's time goes: scalelab's GPT against recipe_ablation's classic plain-PyTorch GPT
at the tiny-Shakespeare shape (4 layers, width 128, 12 x 64 tokens), both with AdamW, in one process.

Prints the step time of each (interleaved rounds) and, from torch.profiler, each model's operators by
self CPU time per step, so the per-step gap between the two can be read operator by operator.
Results are appended to bench/results/step_profile.md.

    python bench/step_profile.py [--threads 2] [--steps 50] [--top 12]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import profile

from recipe_ablation import ClassicGPT
from results_file import append_results
from scalelab.model.gpt import GPT, GPTConfig

VOCAB, BLOCK, BATCH, DEPTH, WIDTH, HEADS = 65, 64, 12, 4, 128, 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50, help="steps per timing round (5 rounds) and profiled")
    ap.add_argument("--top", type=int, default=12, help="operators listed per model")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results" / "step_profile.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {
        "scalelab": GPT(GPTConfig(vocab_size=VOCAB, depth=DEPTH, n_embd=WIDTH, n_head=HEADS, block_size=BLOCK)),
        "classic": ClassicGPT(VOCAB, BLOCK, DEPTH, WIDTH, HEADS),
    }
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True) for k, m in models.items()}
    x, y = torch.randint(0, VOCAB, (BATCH, BLOCK)), torch.randint(0, VOCAB, (BATCH, BLOCK))

    def step(name: str) -> None:
        models[name](x, y).backward()
        torch.nn.utils.clip_grad_norm_(models[name].parameters(), 1.0)
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)

    for name in models:  # warm-up
        for _ in range(10):
            step(name)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(5):
        for name in models:  # interleaved, so load on a shared host hits both alike
            t = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            times[name].append((time.perf_counter() - t) / args.steps * 1e3)
    ms = {k: statistics.median(v) for k, v in times.items()}
    lines = [(f"torch threads {args.threads}; {BATCH} x {BLOCK} tokens, {DEPTH} layers, width {WIDTH}; "
              f"AdamW foreach; 5 interleaved rounds of {args.steps} steps"),
             (f"ms per step (median): scalelab {ms['scalelab']:.1f}, classic {ms['classic']:.1f}; "
              f"scalelab / classic = {ms['scalelab'] / ms['classic']:.2f}")]
    table = ["| model | operator | calls per step | self CPU ms per step |", "|---|---|---:|---:|"]
    for name in models:
        with profile() as prof:
            for _ in range(args.steps):
                step(name)
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[: args.top]
        table += [f"| {name} | `{e.key}` | {e.count / args.steps:.0f} | {e.self_cpu_time_total / 1e3 / args.steps:.2f} |"
                  for e in events]
    print("\n".join(lines + [""] + table))
    append_results(args.results, lines)
    with open(args.results, "a", encoding="utf-8") as f:
        f.write("\n" + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
