"""Process-wide runtime choices: seeding, device, precision."""

from __future__ import annotations

import contextlib
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
