"""The device mesh: world = dp_replicate × dp_shard × tp, named axes, from the config.

Ranks are laid out row-major over ("dp_replicate", "dp_shard", "tp"), so the tp
axis holds neighbouring ranks: with torchrun's one-host-after-another rank order
the tensor-parallel group (the chattiest: collectives in every layer) stays inside
one host, the shard group comes next, and the replicate axis (one gradient
all-reduce per step) is the one that crosses the slowest link.

The data a rank trains on is named by its coordinate on the two data axes, not by
its global rank: every rank of one tensor-parallel group must see the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import init_device_mesh

from scalelab.errors import ScalelabError

AXES = ("dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class Layout:
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different slices of the global batch are in flight."""
        return self.dp_replicate * self.dp_shard

    @property
    def sharded(self) -> bool:
        """Parameters are DTensors (FSDP2 and/or TP): state goes through DCP, not rank 0 alone."""
        return self.dp_shard > 1 or self.tp > 1

    @property
    def uses_fsdp(self) -> bool:
        # TP + pure replication also goes through fully_shard (an HSDP mesh whose shard axis is 1):
        # DDP cannot wrap DTensor parameters.
        return self.dp_shard > 1 or (self.tp > 1 and self.dp_replicate > 1)

    @property
    def uses_ddp(self) -> bool:
        return self.dp_replicate > 1 and not self.uses_fsdp

    def data_coords(self, rank: int) -> tuple[int, int]:
        """(data-parallel rank, data-parallel size) of a global rank."""
        return rank // self.tp, self.dp

    def name(self) -> str:
        if self.world_size == 1:
            return "1 process"
        parts = []
        if self.dp_replicate > 1 and self.dp_shard > 1:
            parts.append(f"HSDP={self.dp_replicate}x{self.dp_shard}")
        elif self.dp_shard > 1:
            parts.append(f"FSDP={self.dp_shard}")
        elif self.dp_replicate > 1:
            parts.append(f"DP={self.dp_replicate}")
        if self.tp > 1:
            parts.append(f"TP={self.tp}")
        return " x ".join(parts)


def resolve_layout(dp_replicate: int, dp_shard: int, tp: int, world_size: int) -> Layout:
    """Fill the one -1 axis from the world size and check the product; errors are one line."""
    if tp < 1 or world_size < 1:
        raise ScalelabError(f"invalid mesh: parallel.tp={tp} must be >= 1")
    if dp_replicate == -1 and dp_shard == -1:
        raise ScalelabError("invalid mesh: only one of parallel.dp_replicate and parallel.dp_shard may be -1")
    fixed = tp * (dp_shard if dp_shard != -1 else 1) * (dp_replicate if dp_replicate != -1 else 1)
    for name, v in (("dp_replicate", dp_replicate), ("dp_shard", dp_shard)):
        if v != -1 and v < 1:
            raise ScalelabError(f"invalid mesh: parallel.{name}={v} must be >= 1 or -1")
    if -1 in (dp_replicate, dp_shard):
        if world_size % fixed:
            raise ScalelabError(
                f"invalid mesh: {world_size} processes cannot be split into groups of {fixed} "
                f"(parallel.tp × the fixed data axis); use a world size that is a multiple of {fixed}"
            )
        rest = world_size // fixed
        dp_replicate = rest if dp_replicate == -1 else dp_replicate
        dp_shard = rest if dp_shard == -1 else dp_shard
    layout = Layout(dp_replicate, dp_shard, tp)
    if layout.world_size != world_size:
        raise ScalelabError(
            f"invalid mesh: parallel.dp_replicate × dp_shard × tp = {dp_replicate} × {dp_shard} × {tp} = "
            f"{layout.world_size}, but there are {world_size} processes"
        )
    return layout


def layout_from_config(pcfg, world_size: int) -> Layout:
    return resolve_layout(pcfg.dp_replicate, pcfg.dp_shard, pcfg.tp, world_size)


def parse_mesh(text: str) -> Layout:
    """'2x4' -> FSDP=2 x TP=4 (data x model); '2x2x4' -> replicate x shard x tp (HSDP); '2x1x4' -> DP=2 x TP=4."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        dims = []
    if len(dims) not in (2, 3) or min(dims) < 1:
        raise ScalelabError(
            f"invalid mesh '{text}': expected DATAxMODEL (e.g. 2x4) or REPLICATExSHARDxMODEL (e.g. 2x2x4), positive integers"
        )
    return Layout(1, *dims) if len(dims) == 2 else Layout(*dims)


def build_mesh(layout: Layout, device_type: str):
    """The 3-axis DeviceMesh over the default process group (None for one process)."""
    if layout.world_size == 1:
        return None

    return init_device_mesh(device_type, (layout.dp_replicate, layout.dp_shard, layout.tp), mesh_dim_names=AXES)


def data_mesh(mesh, layout: Layout):
    """The sub-mesh FSDP2 shards over: 2-D (replicate, shard) for HSDP, else the shard axis alone."""
    if layout.dp_replicate > 1:
        return mesh["dp_replicate", "dp_shard"]
    return mesh["dp_shard"]


def data_group(mesh, layout: Layout):
    """The process group of one data-parallel slice's peers (same tp coordinate); None: the world."""
    if layout.tp == 1 or layout.dp == 1:
        return None
    return mesh["dp_replicate", "dp_shard"]._flatten("dp").get_group()
