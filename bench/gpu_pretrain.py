"""GPU pretraining throughput: a GPT-2-small-class model (124M) with bf16 autocast, torch.compile, fused AdamW
(or Muon), flash SDPA, and FSDP2 over NCCL when launched with torchrun on several GPUs. Reports tokens/s and
MFU against the device's dense bf16 peak (a table of known devices; unknown devices report no MFU).

Trains on random tokens it generates (throughput does not depend on the text). On a CPU it runs the same
code in fp32 (no autocast, no flash kernel), so the selection logic is testable without a GPU.

    python bench/gpu_pretrain.py [--steps 30] [--batch 16] [--compile] [--optim adamw|muon]
    torchrun --nproc_per_node 8 bench/gpu_pretrain.py --compile
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.fsdp import fully_shard
from torch.nn.attention import SDPBackend, sdpa_kernel

from results_file import append_results
from scalelab.config import OptimConfig
from scalelab.model.gpt import GPT, GPTConfig
from scalelab.parallel.dist import init_distributed, shutdown
from scalelab.train.optim import build_optimizer

REPO = Path(__file__).resolve().parents[1]

# Dense bf16 tensor-core peak FLOP/s per device, from the vendors' data sheets (SXM parts, no sparsity).
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


@dataclass
class Precision:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: plain fp32
    flash: bool  # restrict SDPA to the flash kernel


def select_precision(device_name: str, cuda_available: bool, bf16_supported: bool) -> Precision:
    """The device and dtypes to train with: bf16 autocast and flash SDPA on a GPU that has bf16, fp16 autocast
    on one that does not (no flash then), fp32 on the CPU."""
    if device_name == "auto":
        device_name = "cuda" if cuda_available else "cpu"
    device = torch.device(device_name)
    if device.type == "cuda":
        if not cuda_available:
            raise SystemExit("error: --device cuda but torch sees no CUDA device")
        return Precision(device, torch.bfloat16 if bf16_supported else torch.float16, bf16_supported)
    return Precision(device, None, False)


def bf16_peak(gpu_name: str) -> float | None:
    """The table's peak for the first key that the device name contains (e.g. 'NVIDIA H200' -> H200)."""
    return next((peak for key, peak in BF16_PEAK.items() if key in gpu_name), None)


def model_config(vocab: int, depth: int, width: int, block: int) -> GPTConfig:
    return GPTConfig(vocab_size=vocab, block_size=block, depth=depth, n_embd=width, head_dim=64, mlp="gelu")


def run(args) -> dict:
    env = init_distributed("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    cuda = torch.cuda.is_available()
    prec = select_precision(args.device if env.world_size == 1 or not cuda else f"cuda:{env.local_rank}",
                            cuda, cuda and torch.cuda.is_bf16_supported())
    torch.manual_seed(0)
    model = GPT(model_config(args.vocab, args.depth, args.width, args.block)).to(prec.device)
    if env.world_size > 1:
        for unit in [*model.blocks, model]:
            fully_shard(unit, reshard_after_forward=unit is not model)
    opt = build_optimizer(model, OptimConfig(name=args.optim, lr=3e-4))
    step_model = torch.compile(model) if args.compile else model
    g = torch.Generator().manual_seed(env.rank)
    tokens = torch.randint(0, args.vocab, (args.batch, args.block + 1), generator=g).to(prec.device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    autocast = (torch.autocast(prec.device.type, dtype=prec.autocast_dtype) if prec.autocast_dtype
                else contextlib.nullcontext())
    times = []
    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast, (sdpa_kernel(SDPBackend.FLASH_ATTENTION) if prec.flash else contextlib.nullcontext()):
            loss = step_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    step_s = times[len(times) // 2]
    tok_s = args.batch * args.block * env.world_size / step_s
    flops = model.flops_per_token(args.block) * tok_s
    name = torch.cuda.get_device_name(prec.device) if prec.device.type == "cuda" else "cpu"
    peak = bf16_peak(name) if prec.device.type == "cuda" else None
    out = {"device": name, "world": env.world_size, "params": model.num_params(), "dtype": str(prec.autocast_dtype),
           "flash": prec.flash, "compile": args.compile, "optim": args.optim, "step_s": step_s, "tok_s": tok_s,
           "flops": flops, "mfu": flops / (peak * env.world_size) if peak else None, "loss": loss.item()}
    shutdown(env)
    return out if env.is_main else {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16, help="sequences per GPU per step")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--optim", default="adamw", choices=["adamw", "muon"])
    ap.add_argument("--results", default=str(REPO / "bench" / "results" / "gpu_pretrain.md"))
    ap.add_argument("--no-results", action="store_true")
    args = ap.parse_args(argv)
    out = run(args)
    if out:
        mfu = f"{100 * out['mfu']:.1f}% of the bf16 peak" if out["mfu"] else "MFU: device not in BF16_PEAK"
        line = (f"{out['device']} x{out['world']}: {out['params'] / 1e6:.0f}M params, autocast {out['dtype']}, "
                f"flash {out['flash']}, compile {out['compile']}, {out['optim']}: {out['tok_s']:,.0f} tokens/s, "
                f"{out['flops'] / 1e12:.1f} TFLOP/s, {mfu}")
        print(line)
        if not args.no_results:
            append_results(args.results, [line])
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    sys.exit(main())
