"""Process-wide runtime choices: seeding, device, precision."""

from __future__ import annotations

import contextlib
import platform
import random

import numpy as np
import torch

from scalelab.errors import ScalelabError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ScalelabError(f"run.device = '{name}' but CUDA is not available on this machine")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ScalelabError(f"invalid config: run.device = '{name}' is not a device (use auto, cpu, cuda)") from None


def autocast_context(device: torch.device, dtype: str):
    """bf16 autocast on CUDA; plain fp32 on CPU, where bf16 matmuls are ~100x slower."""
    use_bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def machine_description() -> str:
    """One line naming the CPU (and GPU), for benchmark results files and reports."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = f"{names[0]} ({len(names)} logical cores)"
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}{gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"
