"""Does int8 close the CPU decoding gap, at equal quality? Kernel speed and model quality, side by side.

Decoding a 135M model on CPU is bound by its linear layers (83% of an eager batch-16 SmolLM2 decode step
is ``aten::mm`` under torch.profiler). llama.cpp decodes from 4- and 8-bit blocks; this asks whether
PyTorch's int8 paths would do the same for scalelab's engine:

1. **Speed** of one linear layer at decode shapes (batch 1 and 16; SmolLM2-135M's shapes by default),
   best of N, in one process:
   - fp32 ``F.linear`` (MKL), the engine's path today;
   - weight-only int8, ``aten._weight_int8pack_mm`` (the CPU kernel behind weight-only int8);
   - torchao ``Int8WeightOnlyConfig`` and ``Int8DynamicActivationInt8WeightConfig`` (if torchao is
     installed; eager, as the engine would call them);
   - PyTorch's dynamically quantized Linear (``torch.ao.quantization.quantize_dynamic``: int8 weights
     per output channel, activations quantized per tensor at each call, fbgemm/x86 kernels).
2. **Quality** (``--run RUN``): the run's model with one group of layers at a time swapped for the
   dynamically quantized Linear (the only fast path in 1.), teacher-forced on a few texts: mean KL
   from the fp32 next-token distribution and the share of positions whose top-1 token is unchanged.

Results are appended to bench/results/int8_linear.md.

    python bench/int8_linear.py [--run runs/smollm2_256] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from results_file import append_results
from scalelab.run import Run

# (in, out) of SmolLM2-135M's linears: q/o, k/v, gate/up, down, lm_head
SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]
LAYER_GROUPS = [["lm_head"], ["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"],
                ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]]
TEXTS = [
    "The capital of France is Paris. It is known for the Eiffel Tower, the Louvre and its cafes, and the river "
    "Seine runs through the city from east to west.",
    "To add two numbers with two digits, add the ones first, carry the ten if there is one, then add the tens. "
    "For example, 47 + 38: seven and eight make fifteen, write five and carry one.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. It happens in the leaves of "
    "plants, inside small green bodies called chloroplasts.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
]


def best_us(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(10):
            fn()
        best = min(best, (time.perf_counter() - t) / 10)
    return best * 1e6


def dynamic_int8(module: nn.Module, names=None) -> nn.Module:
    """A copy with the Linear layers whose names end in one of ``names`` (all if None) dynamically quantized."""
    q = copy.deepcopy(module).eval()
    chosen = {n for n, m in q.named_modules() if isinstance(m, nn.Linear)
              and (names is None or any(n == s or n.endswith("." + s) for s in names))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's eager API points at torchao, measured below
        torch.ao.quantization.quantize_dynamic(
            q, {n: torch.ao.quantization.per_channel_dynamic_qconfig for n in chosen}, inplace=True)
    return q


def torchao_variants():
    """{name: quantize config} for torchao's int8 configs, or {} without torchao (an optional comparison)."""
    try:
        # optional: only this benchmark's comparison rows use torchao
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        return {}, None
    return {"torchao int8 weight-only": Int8WeightOnlyConfig(),
            "torchao int8 dynamic": Int8DynamicActivationInt8WeightConfig()}, quantize_


def kernel_rows(batches: list[int], repeats: int) -> list[str]:
    torch.backends.quantized.engine = "x86"
    ao_configs, ao_quantize = torchao_variants()
    rows = []
    for k, n in SHAPES:
        torch.manual_seed(0)
        lin = nn.Sequential(nn.Linear(k, n, bias=False)).eval()
        w = lin[0].weight.detach()
        scale = w.abs().amax(1) / 127
        w_int8 = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8)
        variants = {"int8 weight-only (_weight_int8pack_mm)": lambda x: torch.ops.aten._weight_int8pack_mm(x, w_int8, scale),
                    "dynamic int8 (torch.ao, fbgemm)": dynamic_int8(lin)}
        for name, cfg in ao_configs.items():
            q = copy.deepcopy(lin)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ao_quantize(q, cfg)
            variants[name] = q
        for b in batches:
            x = torch.randn(b, k)
            with torch.no_grad():
                ref = F.linear(x, w)
                t_fp32 = best_us(lambda: F.linear(x, w), repeats)
                cells = []
                for name, fn in variants.items():
                    err = ((fn(x) - ref).abs().max() / ref.abs().max()).item()
                    t = best_us(lambda: fn(x), repeats)
                    cells.append(f"{t:.0f} ({t_fp32 / t:.2f}x, err {err:.3f})")
            rows.append(f"| {k} -> {n} | {b} | {t_fp32:.0f} | " + " | ".join(cells) + " |")
    header = ["| linear | batch | fp32 us | " + " | ".join(variants) + " |", "|---" * (3 + len(variants)) + "|"]
    return header + rows


def quality_rows(run_dir: str) -> list[str]:
    run = Run.open(run_dir)
    model, tok = run.load_model().eval(), run.tokenizer
    ids = [tok.encode(t) for t in TEXTS]
    length = min(len(i) for i in ids)
    idx = torch.tensor([i[:length] for i in ids])
    with torch.no_grad():
        ref = model(idx).log_softmax(-1)
    rows = ["| int8 layers | mean KL from fp32 (nats/token) | top-1 token unchanged |", "|---|---|---|"]
    for names in LAYER_GROUPS:
        with torch.no_grad():
            out = dynamic_int8(model, names)(idx).log_softmax(-1)
        kl = (ref.exp() * (ref - out)).sum(-1).mean().item()
        same = (ref.argmax(-1) == out.argmax(-1)).float().mean().item()
        label = "all" if len(names) > 3 else ", ".join(names)
        rows.append(f"| {label} | {kl:.4f} | {same:.3f} |")
    return [f"quality on {run_dir}: {len(TEXTS)} texts x {length} tokens, teacher-forced, fp32 reference", ""] + rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=None, help="run folder for the quality check (e.g. an imported SmolLM2)")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=str(Path(__file__).parent / "results" / "int8_linear.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    note = (f"torch threads {args.threads}; time per call in us, best of {args.repeats} x 10 calls; "
            "in brackets: speed-up vs fp32, max |error| / max |fp32 output|")
    tables = [""] + kernel_rows([int(b) for b in args.batches.split(",")], args.repeats)
    if args.run:
        tables += [""] + quality_rows(args.run)
    print(note, *tables, sep="\n")
    append_results(args.results, [note])
    with open(args.results, "a", encoding="utf-8") as f:
        f.write("\n".join(tables) + "\n")


if __name__ == "__main__":
    main()
