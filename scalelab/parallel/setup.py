"""What the trainer asks of scalelab.parallel: one object, built from the config and the process group."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from scalelab.parallel import plans, state
from scalelab.parallel.dist import DistEnv, barrier
from scalelab.parallel.mesh import Layout, build_mesh, data_group, layout_from_config
from scalelab.parallel.state import load_dcp, load_full
from scalelab.train import checkpoint as ckpt


class ParallelSetup:
    """The mesh, this rank's place in it, and the plan to apply to a model.

    ``data_env`` is the data-parallel view: rank and size on the data axes, and the
    group of peers holding other slices of the batch. Ranks of one tensor-parallel
    group share a data rank, so they read the same rows.
    """

    def __init__(self, pcfg, env: DistEnv, device: torch.device):
        self.env, self.device = env, device
        self.layout: Layout = layout_from_config(pcfg, env.world_size)
        # DDP needs only the default group; a mesh (and its sub-groups) is built only for DTensor plans.
        self.mesh = build_mesh(self.layout, device.type) if self.layout.sharded else None
        dp_rank, dp_size = self.layout.data_coords(env.rank)
        group = data_group(self.mesh, self.layout) if self.mesh is not None else None
        self.data_env = DistEnv(rank=dp_rank, world_size=dp_size, local_rank=env.local_rank, group=group)

    @property
    def sharded(self) -> bool:
        return self.layout.sharded

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        return plans.apply_plans(model, self.layout, self.mesh, self.device)

    def no_sync(self, train_model: torch.nn.Module):
        return plans.no_sync(train_model, self.layout)

    def clip_grad_norm_(self, parameters, max_norm: float) -> torch.Tensor:
        if self.sharded:
            return plans.clip_grad_norm_(parameters, max_norm)
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    # -- checkpoints: the trainer keeps the atomic write; these supply the sharded parts ------------

    def save_shards(self, ckpt_dir: Path, step: int, model, optimizer) -> dict:
        """All ranks write DCP shards to a staging folder and gather the full weights.

        Returns, on rank 0, the keyword arguments for checkpoint.save_checkpoint.
        """
        staging = Path(ckpt_dir) / f".step_{step:06d}.dcp.tmp"
        if self.env.is_main:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
        barrier(self.env)
        state.save_dcp(staging, model, optimizer)
        full = state.full_model_state(model)
        barrier(self.env)
        return {"model_state": full, "sharded_dir": staging} if self.env.is_main else {}

    def load(self, path: Path, model, optimizer, optimizer_state: dict) -> None:
        """Weights and optimizer state from a checkpoint folder written on any mesh."""
        if (path / ckpt.SHARDED_DIR).is_dir():
            load_dcp(path / ckpt.SHARDED_DIR, model, optimizer)
        elif self.sharded:
            load_full(model, optimizer, ckpt.read_safetensors(path / ckpt.MODEL_FILE), optimizer_state)
        else:
            ckpt.load_weights_into(model, path / ckpt.MODEL_FILE)
            optimizer.load_state_dict(optimizer_state)
