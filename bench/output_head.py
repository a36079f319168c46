"""The engine's output layer: ``F.linear`` (MKL sgemm on the plain weight) vs oneDNN's prepacked weight
(scalelab.infer.head.OutputHead), side by side in one process, at decode shapes. A third column is MKL's
own packed sgemm (``mkl._mkl_linear``), which inductor's freezing uses for fp32 linears in a compiled graph.

The default shape is SmolLM2-135M's 576 -> 49152 head; ``--layers`` adds its block linears for comparison
(the engine prepacks only the head: inductor's freezing already prepacks every linear in the compiled path).
Each row also gives the max |difference| between the two outputs and the one-off cost of packing.
Results are appended to bench/results/output_head.md.

    python bench/output_head.py [--threads 2] [--batches 1 16 24] [--layers]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from int8_linear import SHAPES, best_us
from results_file import append_results
from scalelab.infer.head import OutputHead


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 24])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", action="store_true", help="also the block linears' shapes")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results" / "output_head.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = SHAPES if args.layers else SHAPES[-1:]
    rows = ["| linear | batch | F.linear us | oneDNN prepacked us (engine) | speed-up | max abs diff "
            "| MKL packed us (inductor freezing) | speed-up |", "|---|---|---|---|---|---|---|---|"]
    packing = []
    for k, n in shapes:
        linear = nn.Linear(k, n, bias=False)
        head = OutputHead(linear)
        with torch.inference_mode():
            t = time.perf_counter()
            head(torch.randn(1, k))  # packs
            packing.append(f"packing the {k} -> {n} weight: {(time.perf_counter() - t) * 1e3:.0f} ms")
            for m in args.batches:
                x = torch.randn(m, k)
                plain = best_us(lambda: F.linear(x, linear.weight), args.repeats)
                packed = best_us(lambda: head(x), args.repeats)
                diff = (head(x) - F.linear(x, linear.weight)).abs().max().item()
                mkl = "n/a | n/a"
                if torch._C.has_mkl:
                    w = torch.ops.mkl._mkl_reorder_linear_weight(linear.weight, m)
                    us = best_us(lambda: torch.ops.mkl._mkl_linear(x, w, linear.weight, None, m), args.repeats)
                    mkl = f"{us:.0f} | {plain / us:.2f}x"
                rows.append(f"| {k} -> {n} | {m} | {plain:.0f} | {packed:.0f} | {plain / packed:.2f}x | {diff:.1e} "
                            f"| {mkl} |")
                print(rows[-1], flush=True)
    header = [f"torch threads {args.threads}; time per call, best of {args.repeats} x 10 calls; fp32, inference mode",
              *packing]
    append_results(args.results, header)
    with open(args.results, "a", encoding="utf-8") as f:
        f.write("\n" + "\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
