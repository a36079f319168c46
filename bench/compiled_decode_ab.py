"""The compiled decode step with and without inductor's C++ wrapper, side by side in one process.

Two engines with ``compile=True`` decode the same 16 prompts greedily: one compiled with the
Python wrapper (the graph's kernels launched from a generated Python function), one with
``cpp_wrapper`` (launched from generated C++), which the engine now uses. They alternate, and
each keeps its best steady-state step time over ``--repeats`` rounds. The tokens must agree.
Results are appended to bench/results/compiled_decode_ab.md.

    python bench/compiled_decode_ab.py [--threads 2] [--pairs 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from generate import compiled_engine, decode_bench_setup
from results_file import append_results
from scalelab.infer.engine import GenerationParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=384)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=3, help="independent A/B pairs (fresh engines each)")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--results", default=str(Path(__file__).parent / "results" / "compiled_decode_ab.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tok, model, prompts = decode_bench_setup(args.vocab, args.depth, args.n_embd)

    def run(engine, n):
        return engine.generate(prompts, GenerationParams(max_new_tokens=n, temperature=0.0, stop_token_ids=()))

    def build(options: dict):
        return compiled_engine(model, tok, 16, options, lambda e: run(e, 8))

    variants = {"python wrapper": {"freezing": True}, "C++ wrapper": {"freezing": True, "cpp_wrapper": True}}
    rows = []
    for pair in range(args.pairs):
        engines = {name: build(opts) for name, opts in variants.items()}
        best = {name: float("inf") for name in engines}
        for _ in range(args.repeats):
            for name, engine in engines.items():
                t = time.perf_counter()
                run(engine, 1)
                t1 = time.perf_counter() - t
                t = time.perf_counter()
                run(engine, 64)
                best[name] = min(best[name], (time.perf_counter() - t - t1) / 63)
        same = len({tuple(tuple(c.tokens) for c in run(e, 32)) for e in engines.values()}) == 1
        py, cpp = best["python wrapper"], best["C++ wrapper"]
        rows.append(f"| {pair + 1} | {1000 * py:.2f} | {1000 * cpp:.2f} | {100 * (1 - cpp / py):.1f}% | {'yes' if same else 'NO'} |")
    table = ["| pair | Python wrapper (ms/step) | C++ wrapper (ms/step) | C++ faster by | same tokens |",
             "|---|---|---|---|---|", *rows]
    print("\n".join(table))
    append_results(args.results, [
        f"model: depth {args.depth}, width {args.n_embd}, vocab {args.vocab}, swiglu, fp32; batch 16, 64-token prompts, "
        f"greedy; torch threads {args.threads}; best of {args.repeats} alternating rounds per pair",
    ])
    with open(args.results, "a", encoding="utf-8") as f:
        f.write("\n" + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
