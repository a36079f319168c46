"""``scalelab parallel explain``: where every parameter lives on a mesh, and what one step sends.

Placements and per-rank shapes are read off the real plans (scalelab.parallel.plans)
applied to a model on the meta device under a fake process group of the mesh's size:
no memory, no processes, and no second copy of the layout rules to drift out of date.

The collectives of one optimizer step follow from those plans. Bytes are what each
rank sends with ring algorithms (what NCCL and gloo use for large messages):
all-gather and reduce-scatter of a full tensor of N bytes over g ranks: (g-1)/g · N;
all-reduce: 2 (g-1)/g · N. Activations are counted in fp32 (halve them for bf16
autocast); parameters and gradients are fp32. Scalar all-reduces (the loss, the
gradient norm) are listed but not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from scalelab.errors import ScalelabError
from scalelab.model.gpt import GPT
from scalelab.parallel.mesh import Layout, build_mesh
from scalelab.parallel.plans import apply_plans, check_model_fits

FP32 = 4


@dataclass
class ParamRow:
    name: str
    shape: tuple[int, ...]
    placements: dict[str, str]  # mesh axis -> "S(0)", "R", ...
    local_shape: tuple[int, ...]
    tp_local_numel: int  # size after tensor parallelism, before FSDP sharding
    unit: str  # FSDP unit: "blocks.3" or "root"


@dataclass
class Collective:
    axis: str
    op: str
    calls: int
    bytes_per_rank: int
    what: str


def _short(placement) -> str:
    name = type(placement).__name__
    if name == "Replicate":
        return "R"
    if name == "_StridedShard":
        return f"S({placement.dim})*"  # a shard of a shard: FSDP's slice of a TP slice
    if name == "Shard":
        return f"S({placement.dim})"
    return name


def param_layout(model_cfg, layout: Layout) -> list[ParamRow]:
    """Per-parameter placements on rank 0, from the real plans on a fake process group."""

    with torch.device("meta"):
        model = GPT(model_cfg)
    check_model_fits(model, layout)
    rows = []
    if layout.sharded:
        if dist.is_initialized():
            raise ScalelabError("parallel explain runs outside torchrun; start it as a plain command")
        # deferred: torch's fake process group is only for the dry-run explainer
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", rank=0, world_size=layout.world_size, store=FakeStore())
        try:
            apply_plans(model, layout, build_mesh(layout, "cpu"), torch.device("cpu"))
            rows = [_row(n, p, layout) for n, p in model.named_parameters()]
        finally:
            dist.destroy_process_group()
    else:
        rows = [_row(n, p, layout) for n, p in model.named_parameters()]
    return rows


def _row(name: str, p, layout: Layout) -> ParamRow:
    unit = ".".join(name.split(".")[:2]) if name.startswith("blocks.") else "root"
    if not isinstance(p, DTensor):
        axes = {"dp_replicate": "R"} if layout.dp_replicate > 1 else {}
        return ParamRow(name, tuple(p.shape), axes, tuple(p.shape), p.numel(), unit)
    names = p.device_mesh.mesh_dim_names
    placements = {axis: _short(pl) for axis, pl in zip(names, p.placements)}
    tp_split = layout.tp if placements.get("tp", "R").startswith("S") else 1
    return ParamRow(name, tuple(p.shape), placements, tuple(p.to_local().shape), p.numel() // tp_split, unit)


def step_collectives(rows: list[ParamRow], model_cfg, layout: Layout, batch_size: int, grad_accum: int) -> list[Collective]:
    """The collectives of one optimizer step (forward + backward of every micro-batch, then AdamW)."""
    c = model_cfg
    if batch_size % (layout.dp * grad_accum):
        raise ScalelabError(
            f"invalid config: train.batch_size={batch_size} must be divisible by data-parallel processes × "
            f"train.grad_accum = {layout.dp} × {grad_accum}"
        )
    rows_per_rank = batch_size // layout.dp
    T, C, L = c.block_size, c.n_embd, c.depth
    ring = lambda g: (g - 1) / g  # noqa: E731
    out: list[Collective] = []
    if layout.tp > 1:
        t = layout.tp
        act = rows_per_rank * T * C * FP32  # one full-sequence activation, summed over micro-batches
        logits = rows_per_rank * T * c.vocab_size * FP32
        ag_calls = (4 * L + 2) * grad_accum  # fwd: 2 per block + lm_head input; bwd: embed + 2 per block
        out.append(Collective("tp", "all-gather", ag_calls, int(ring(t) * act * (4 * L + 2)),
                              "activations: sequence slices -> full sequence before attention/MLP/lm_head (fwd), "
                              "and the backward of every reduce-scatter"))
        out.append(Collective("tp", "all-gather", grad_accum, int(ring(t) * logits),
                              "logits: vocabulary slices -> full vocabulary for the loss (fwd)"))
        out.append(Collective("tp", "reduce-scatter", (4 * L + 2) * grad_accum, int(ring(t) * act * (4 * L + 2)),
                              "partial sums of embedding/o_proj/down_proj -> sequence slices (fwd), "
                              "and the backward of every activation all-gather"))
        norm_bytes = sum(r.tp_local_numel for r in rows if r.name.endswith("norm.weight")) * FP32
        out.append(Collective("tp", "all-reduce", sum(r.name.endswith("norm.weight") for r in rows),
                              int(2 * ring(t) * norm_bytes),
                              "gradients of the replicated norm weights (each rank saw part of the sequence or heads)"))
    if layout.uses_fsdp:
        s = layout.dp_shard
        units: dict[str, int] = {}
        for r in rows:
            units[r.unit] = units.get(r.unit, 0) + r.tp_local_numel * FP32
        total = sum(units.values())
        regathered = total - units.get("root", 0)  # the root stays gathered between forward and backward
        if s > 1:
            out.append(Collective("dp_shard", "all-gather", (2 * len(units) - 1) * grad_accum,
                                  int(ring(s) * (total + regathered) * grad_accum),
                                  f"parameters of each FSDP unit before use: {len(units)} in forward, "
                                  f"{len(units) - 1} again in backward (blocks reshard after forward)"))
            out.append(Collective("dp_shard", "reduce-scatter", len(units), int(ring(s) * total),
                                  "gradients, each rank keeps its shard (once per step: micro-batches accumulate)"))
        if layout.dp_replicate > 1:
            r = layout.dp_replicate
            out.append(Collective("dp_replicate", "all-reduce", len(units), int(2 * ring(r) * total / s),
                                  "gradient shards across replica groups (HSDP: the only traffic on this axis)"))
    elif layout.uses_ddp:
        r = layout.dp_replicate
        total = sum(x.tp_local_numel for x in rows) * FP32
        buckets = -(-total // (25 * 2**20))  # DDP's default bucket size
        out.append(Collective("dp_replicate", "all-reduce", buckets, int(2 * ring(r) * total),
                              "gradients in 25 MiB buckets, overlapped with backward (once per step)"))
    if layout.world_size > 1:
        scalars = "the loss" + (", the gradient norm" if layout.sharded else "")
        out.append(Collective("all", "all-reduce", 1 + int(layout.sharded), 0, f"scalars: {scalars} (not counted)"))
    return [x for x in out if x.calls]


def _mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


def render(model_cfg, layout: Layout, batch_size: int, grad_accum: int, vocab_note: str = "") -> str:
    c = model_cfg.resolved()
    rows = param_layout(model_cfg, layout)
    colls = step_collectives(rows, c, layout, batch_size, grad_accum)
    n_params = sum(int(torch.Size(r.shape).numel()) for r in rows)
    lines = [
        f"mesh: {layout.name()} on {layout.world_size} processes "
        f"(dp_replicate={layout.dp_replicate}, dp_shard={layout.dp_shard}, tp={layout.tp})",
        f"model: depth {c.depth}, width {c.n_embd}, heads {c.n_head} (kv {c.n_kv_head}), mlp {c.mlp} {c.mlp_hidden}, "
        f"vocab {c.vocab_size}{vocab_note}, context {c.block_size}; {n_params:,} parameters",
        "",
        "parameters on rank 0 (S(d): split along dim d over that mesh axis; S(d)*: FSDP's split of a TP slice; "
        "R: replicated; an axis not listed: replicated)",
    ]
    w = max(len(r.name) for r in rows)
    lines.append(f"  {'parameter':<{w}}  {'global shape':<14} {'placements':<28} {'on rank 0':<14} {'bytes':>10}")
    local_total = 0
    for r in rows:
        pl = " ".join(f"{a}={p}" for a, p in r.placements.items()) or "-"
        nbytes = int(torch.Size(r.local_shape).numel()) * FP32
        local_total += nbytes
        lines.append(f"  {r.name:<{w}}  {str(r.shape):<14} {pl:<28} {str(r.local_shape):<14} {nbytes:>10,}")
    full = n_params * FP32
    lines += [
        "",
        f"per rank: parameters {_mib(local_total)}, gradients {_mib(local_total)}, AdamW state {_mib(2 * local_total)} "
        f"= {_mib(4 * local_total)} (one process: {_mib(4 * full)}; activations not included)",
        "",
        f"one optimizer step: global batch {batch_size} x {c.block_size} tokens, {batch_size // layout.dp} rows per "
        f"data rank, grad_accum {grad_accum}; bytes sent per rank (ring algorithms)",
    ]
    if layout.world_size == 1:
        lines.append("  no collectives: one process holds everything")
    else:
        lines.append(f"  {'axis':<13} {'collective':<15} {'calls':>5} {'bytes/rank':>14}  what")
        for x in colls:
            lines.append(f"  {x.axis:<13} {x.op:<15} {x.calls:>5} {x.bytes_per_rank:>14,}  {x.what}")
        per_axis: dict[str, int] = {}
        for x in colls:
            per_axis[x.axis] = per_axis.get(x.axis, 0) + x.bytes_per_rank
        lines.append("  total per rank: " + ", ".join(f"{a} {_mib(b)}" for a, b in per_axis.items() if b))
    return "\n".join(lines)
