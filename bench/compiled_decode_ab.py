"""Two inductor option sets for the compiled decode step, side by side in one process.

Two engines with ``compile=True`` decode the same 16 prompts greedily, each compiled with the
engine's shipped options (``scalelab.infer.engine._INDUCTOR_OPTIONS``) plus its own overrides.
They alternate, and each keeps its best steady-state step time over ``--repeats`` rounds. The
tokens must agree. The default pair is the Python wrapper against the C++ wrapper (the graph's
kernels launched from a generated Python function, or from generated C++); ``--a``/``--b`` set
other pairs, e.g. ``--a cpp.enable_concat_linear=false --b cpp.enable_concat_linear=true``.
Results are appended to bench/results/compiled_decode_ab.md.

    python bench/compiled_decode_ab.py [--threads 2] [--pairs 3] [--a KEY=VALUE ...] [--b KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from generate import compiled_engine, decode_bench_setup
from results_file import append_results
from scalelab.infer.engine import _INDUCTOR_OPTIONS, GenerationParams


def parse_options(pairs: list[str]) -> dict:
    """``KEY=VALUE`` overrides; VALUE is true/false, an int, or a string."""
    out = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: option override {item!r} is not KEY=VALUE")
        node = torch._inductor.config
        for part in key.split("."):
            if not hasattr(node, part):
                raise SystemExit(f"error: {key!r} is not an inductor option (torch._inductor.config)")
            node = getattr(node, part)
        low = value.lower()
        out[key] = True if low == "true" else False if low == "false" else int(value) if value.isdigit() else value
    return out


def label(overrides: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items()) or "shipped"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=384)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=3, help="independent A/B pairs (fresh engines each)")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--a", nargs="*", default=["cpp_wrapper=false"], help="overrides of the shipped options for A")
    ap.add_argument("--b", nargs="*", default=[], help="overrides of the shipped options for B")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results" / "compiled_decode_ab.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    over = {"A": parse_options(args.a), "B": parse_options(args.b)}

    tok, model, prompts = decode_bench_setup(args.vocab, args.depth, args.n_embd)

    def run(engine, n):
        return engine.generate(prompts, GenerationParams(max_new_tokens=n, temperature=0.0, stop_token_ids=()))

    def build(overrides: dict):
        return compiled_engine(model, tok, 16, {**_INDUCTOR_OPTIONS, **overrides}, lambda e: run(e, 8))

    rows = []
    for pair in range(args.pairs):
        engines = {name: build(o) for name, o in over.items()}
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
        a, b = best["A"], best["B"]
        rows.append(f"| {pair + 1} | {1000 * a:.2f} | {1000 * b:.2f} | {100 * (1 - b / a):.1f}% | {'yes' if same else 'NO'} |")
    table = ["| pair | A (ms/step) | B (ms/step) | B faster by | same tokens |", "|---|---|---|---|---|", *rows]
    print("\n".join(table))
    append_results(args.results, [
        f"model: depth {args.depth}, width {args.n_embd}, vocab {args.vocab}, swiglu, fp32; batch 16, 64-token prompts, "
        f"greedy; torch threads {args.threads}; best of {args.repeats} alternating rounds per pair",
        f"shipped options: {label(_INDUCTOR_OPTIONS)}; A: {label(over['A'])}; B: {label(over['B'])}",
    ])
    with open(args.results, "a", encoding="utf-8") as f:
        f.write("\n" + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
