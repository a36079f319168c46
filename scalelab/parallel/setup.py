"""What the trainer asks of scalelab.parallel: one object, built from the config and the process group."""

from __future__ import annotations

import torch

from scalelab.parallel import plans
from scalelab.parallel.dist import DistEnv
from scalelab.parallel.mesh import Layout, build_mesh, data_group, layout_from_config


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
