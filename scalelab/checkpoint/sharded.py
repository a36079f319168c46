"""Sharded checkpoints: model and optimizer state across meshes, DCP for resharding, a full state dict for export.

A sharded run (FSDP2 and/or TP) saves with torch.distributed.checkpoint: every rank
writes its own shards and rank 0 the metadata that names which slice of which
global tensor each piece is. Loading asks for the slices the *current* mesh needs,
so a checkpoint written at FSDP=2 × TP=2 loads at 1 process, at DP=4, or at any
other layout. The same step also gets a one-file model.safetensors (the gathered
full weights) for every single-process tool.

Keys are fully qualified parameter names ("blocks.0.attn.q_proj.weight") for both the
model and the optimizer, so they do not depend on the wrapping.

DCP pickles two things: the ``.metadata`` index, and the non-tensor values of the state (the
optimizer's hyperparameters). Stock ``dcp.load`` unpickles both without limits, so a crafted
checkpoint could run code. Here the index goes through an unpickler that builds only DCP's own
metadata classes, ``torch.Size``, dtypes and paths, and the values go through
``torch.load(weights_only=True)``; anything else is refused with a ScalelabError.
"""

from __future__ import annotations

import pickle
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint._traverse import set_element  # private: DCP has no public setter
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from scalelab.checkpoint.folder import MODEL_FILE, SHARDED_DIR, load_weights_into, read_safetensors
from scalelab.errors import ScalelabError
from scalelab.parallel.dist import DistEnv, barrier

_DCP_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_SAFE_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                 ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
                 ("builtins", "set"), ("builtins", "frozenset"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds a DCP index and nothing else."""

    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module in _DCP_METADATA_MODULES:
            obj = super().find_class(module, name)
            if isinstance(obj, type) and obj.__module__ == module:  # a class DCP defines, not one it imported
                return obj
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a DCP checkpoint's metadata")


def _safe_reader(folder: str | Path):
    """A DCP reader whose index is read, through the restricted unpickler, now: a refusal is a plain
    ScalelabError here rather than an exception wrapped inside DCP's collective machinery."""
    class SafeFileSystemReader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = self.checked_metadata
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    reader = SafeFileSystemReader(str(folder))
    path = reader._get_metadata_path()
    try:
        with reader.fs.create_stream(path, "rb") as f:
            reader.checked_metadata = _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, AttributeError, EOFError, TypeError, ValueError, OSError) as e:
        raise ScalelabError(f"refusing to load {path}: {e}") from None
    return reader


def _safe_planner():
    class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as e:
                first = (str(e).strip().splitlines() or ["not a plain value"])[0]
                raise ScalelabError(f"refusing a non-tensor value in a DCP checkpoint: {first}") from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return WeightsOnlyLoadPlanner()


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
        dcp.load(state, storage_reader=_safe_reader(folder), planner=_safe_planner())
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


def write_shards(env: DistEnv, ckpt_dir: Path, step: int, model, optimizer) -> dict:
    """All ranks write DCP shards to a staging folder and gather the full weights.

    Returns, on rank 0, the keyword arguments for ``folder.save_checkpoint``, which moves the staging
    folder inside its atomic write; other ranks get an empty dict.
    """
    staging = Path(ckpt_dir) / f".step_{step:06d}.dcp.tmp"
    if env.is_main:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    barrier(env)
    save_dcp(staging, model, optimizer)
    full = full_model_state(model)
    barrier(env)
    return {"model_state": full, "sharded_dir": staging} if env.is_main else {}


def load_into(path: Path, model, optimizer, optimizer_state: dict, sharded: bool) -> None:
    """Weights and optimizer state from a checkpoint folder written on any mesh, into a model on this one."""
    if (path / SHARDED_DIR).is_dir():
        load_dcp(path / SHARDED_DIR, model, optimizer)
    elif sharded:
        load_full(model, optimizer, read_safetensors(path / MODEL_FILE), optimizer_state)
    else:
        load_weights_into(model, path / MODEL_FILE)
        optimizer.load_state_dict(optimizer_state)
