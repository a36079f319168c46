"""Every sharding plan of the project, in one place; the model never sees them.

Tensor parallel over the ``tp`` axis (Megatron layout with sequence parallelism):
- the residual stream between sub-layers is split along the sequence (Shard(1));
- the norms run on their sequence slice (SequenceParallel; weights replicated);
- before attention and the MLP an all-gather rebuilds the full sequence; q/k/v and
  up/gate are split by output features (column-wise), so each rank owns whole heads
  and a slice of the MLP hidden units; o_proj and down_proj are split by input
  features (row-wise) and their partial sums are reduce-scattered back to sequence
  slices;
- the embedding is split by vocabulary rows, and the lm_head by vocabulary columns
  with its logits all-gathered (the loss then needs no vocabulary-parallel code);
- the per-head q/k RMSNorm sees the local heads as a tensor sharded on the head
  axis (dim 2 of (B, T, H, D)), so its weight gradient is summed over the tp ranks.

FSDP2 (``fully_shard``) over the data axes: one unit per block plus the root (embedding,
final norm, lm_head). With a ``dp_replicate`` axis > 1 the mesh is 2-D and FSDP2 does
HSDP: parameters and gradients are sharded within a shard group, and the sharded
gradients are all-reduced across groups.
"""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.nn.parallel import DistributedDataParallel as DDP

from scalelab.errors import ScalelabError, check_config
from scalelab.parallel.mesh import Layout, data_mesh


def check_model_fits(model, layout: Layout) -> None:
    """The head and width splits tensor parallelism needs; each failure names the key to change."""
    if layout.tp == 1:
        return
    c = model.config
    t = layout.tp
    checks = [
        (c.n_head % t == 0, f"model.n_head={c.n_head} is not divisible by parallel.tp={t}"),
        (c.n_kv_head % t == 0, f"model.n_kv_head={c.n_kv_head} is not divisible by parallel.tp={t} (GQA: kv heads are split too)"),
        (c.mlp_hidden % t == 0, f"model.mlp_hidden={c.mlp_hidden} is not divisible by parallel.tp={t}"),
        (c.vocab_size % t == 0, f"model.vocab_size={c.vocab_size} is not divisible by parallel.tp={t}"),
        (c.block_size % t == 0, f"model.block_size={c.block_size} is not divisible by parallel.tp={t} (sequence parallel)"),
        (not c.tie_embeddings, "model.tie_embeddings=true is not supported with parallel.tp > 1 "
                               "(the embedding is split by rows, the lm_head by columns)"),
    ]
    check_config(checks)


def tp_plan(model) -> dict:
    """{module path: ParallelStyle} for torch's parallelize_module."""
    plan = {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "final_norm": SequenceParallel(),
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    }
    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}"
        # Attention(x, cos, sin, cache): only x is distributed.
        plan[f"{p}.attn_norm"] = SequenceParallel()
        plan[f"{p}.attn"] = PrepareModuleInput(
            input_layouts=(Shard(1), None, None, None), desired_input_layouts=(Replicate(), None, None, None)
        )
        for name in ("q_proj", "k_proj", "v_proj"):
            plan[f"{p}.attn.{name}"] = ColwiseParallel()
        plan[f"{p}.attn.o_proj"] = RowwiseParallel(output_layouts=Shard(1))
        if block.attn.q_norm is not None:
            plan[f"{p}.attn.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
            plan[f"{p}.attn.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        plan[f"{p}.mlp_norm"] = SequenceParallel()
        plan[f"{p}.mlp"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
        if hasattr(block.mlp, "gate_proj"):
            plan[f"{p}.mlp.gate_proj"] = ColwiseParallel()
        plan[f"{p}.mlp.up_proj"] = ColwiseParallel()
        plan[f"{p}.mlp.down_proj"] = RowwiseParallel(output_layouts=Shard(1))
    return plan


def fsdp_units(model) -> list[torch.nn.Module]:
    """Modules that get their own fully_shard call, innermost first; the root comes last."""
    return [*model.blocks, model]


def apply_plans(model, layout: Layout, mesh, device: torch.device, reshard_after_forward: bool = True):
    """Shard ``model`` in place for ``layout``; return the module to call in training (DDP wraps it)."""
    if layout.world_size == 1:
        return model
    check_model_fits(model, layout)
    if layout.sharded and not hasattr(torch.nn.utils, "get_total_norm"):
        raise ScalelabError(f"parallel.dp_shard > 1 and parallel.tp > 1 need torch >= 2.6 (public FSDP2); "
                            f"this is torch {torch.__version__}")
    if layout.tp > 1:
        parallelize_module(model, mesh["tp"], tp_plan(model))
    if layout.uses_fsdp:
        dmesh = data_mesh(mesh, layout)
        for unit in fsdp_units(model):
            # The root's parameters are used last in forward and first in backward: keeping them
            # gathered saves one all-gather per step, as torchtitan does.
            fully_shard(unit, mesh=dmesh, reshard_after_forward=reshard_after_forward and unit is not model)
        return model
    if layout.uses_ddp:
        # broadcast_buffers=False: the only buffers are the RoPE tables, identical on every rank by construction.
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    return model


def no_sync(train_model, layout: Layout):
    """Skip the gradient reduction of a micro-batch that is not the last of its step."""
    if layout.uses_fsdp:
        @contextlib.contextmanager
        def fsdp_no_sync():
            train_model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                train_model.set_requires_gradient_sync(True)

        return fsdp_no_sync()
    if layout.uses_ddp:
        return train_model.no_sync()
    return contextlib.nullcontext()


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """Global gradient-norm clipping that also works when parameters are DTensors.

    A DTensor norm comes back as a partial or sharded value; full_tensor() reduces it
    over the mesh so every rank scales by the same global norm, as one process would.
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())

    total = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


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
