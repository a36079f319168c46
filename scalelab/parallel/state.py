"""Model and optimizer state across meshes: DCP for resharding, a full state dict for export.

A sharded run (FSDP2 and/or TP) saves with torch.distributed.checkpoint: every rank
writes its own shards and rank 0 the metadata that names which slice of which
global tensor each piece is. Loading asks for the slices the *current* mesh needs,
so a checkpoint written at FSDP=2 × TP=2 loads at 1 process, at DP=4, or at any
other layout. The same step also gets a one-file model.safetensors (the gathered
full weights) for every single-process tool.

Keys are fully qualified parameter names ("blocks.0.attn.q_proj.weight") for both the
model and the optimizer, so they do not depend on the wrapping.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor


def _options(**kw):
    return StateDictOptions(**kw)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU weights on rank 0 (other ranks get an empty dict); every rank must call it."""
    return get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))


def save_dcp(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the model and optimizer under ``folder``."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder))


def load_dcp(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a DCP checkpoint written on any mesh into this (sharded or plain) model and optimizer."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    # DCP reads in place into the tensors it is given: each rank gets exactly its own slices.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_full(model, optimizer, weights: dict[str, torch.Tensor], optim_state: dict) -> None:
    """Load single-process state (full weights, torch optimizer state keyed by position) into a sharded model."""
    if model.config.tie_embeddings and "lm_head.weight" not in weights:
        weights = {**weights, "lm_head.weight": weights["embed.weight"]}
    set_model_state_dict(model, weights, options=_options(full_state_dict=True))
    # A plain optimizer state names parameters by their position in the param groups; the groups
    # come from GPT.optimizer_groups, whose order depends only on parameter names.
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    fqn_state = {
        "state": {order[int(i)]: s for i, s in optim_state["state"].items()},
        "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]} for g in optim_state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, fqn_state, options=_options(full_state_dict=True))


def local_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[int, int]:
    """(parameter bytes, optimizer-state bytes) held by this rank: local shards only."""
    def nbytes(t) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = sum(nbytes(p) for p in model.parameters())
    opt = 0
    if optimizer is not None:
        for s in optimizer.state.values():
            opt += sum(nbytes(v) for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return params, opt
