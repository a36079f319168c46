"""The engine's output layer: logits for the positions it samples from, from a prepacked weight on CPU.

Why our own: with a large vocabulary the output layer is the largest matmul of a decode step (SmolLM2-135M:
576 -> 49152, 113 MB, about as much time as its 30 blocks at batch 1). ``F.linear`` on CPU hands the
(vocab, width) weight to MKL's sgemm as it is; oneDNN's own blocked layout (``mkldnn._reorder_linear_weight``,
the op behind inductor's weight prepacking) ran that matmul 2.0x faster at batch 1 and 2.6x at batch 16 on
2 threads (bench/output_head.py). PyTorch has no eager module for it, so this keeps one packed copy of the
weight and repacks it whenever the weight changes (a training step between two rollouts, a loaded
checkpoint): the key is the storage and the in-place version counter.

Elsewhere (CUDA, another dtype, a LoRA-wrapped or sharded layer, a build without oneDNN) it calls the layer.
"""

from __future__ import annotations

import torch
from torch import nn


def prepacking_applies(linear: nn.Module) -> bool:
    """Whether the oneDNN prepacked path is used: a plain ``nn.Linear`` (not an adapter-wrapped one, whose
    output is more than its weight's) with a plain fp32 CPU weight (not a sharded DTensor), on a build with oneDNN."""
    if type(linear) is not nn.Linear:
        return False
    w = linear.weight
    return (type(w.detach()) is torch.Tensor and w.device.type == "cpu" and w.dtype == torch.float32
            and torch.backends.mkldnn.is_available())


class OutputHead:
    """Applies ``linear`` to hidden states (..., width) under no_grad/inference mode, as ``linear(h)`` would."""

    def __init__(self, linear: nn.Module):
        self.linear = linear
        self.prepacked = prepacking_applies(linear)
        self._key = None
        self._packed = None

    def _packed_weight(self, weight: torch.Tensor) -> torch.Tensor:
        key = (weight.data_ptr(), weight._version, tuple(weight.shape))
        if key != self._key:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
            self._key = key
        return self._packed

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if not self.prepacked or torch.is_grad_enabled() or h.dtype != torch.float32:
            return self.linear(h)
        weight, bias = self.linear.weight, self.linear.bias
        flat = h.reshape(-1, h.shape[-1]).contiguous()
        out = torch.ops.mkldnn._linear_pointwise(flat, self._packed_weight(weight), bias, "none", [], "")
        return out.view(*h.shape[:-1], weight.shape[0])
