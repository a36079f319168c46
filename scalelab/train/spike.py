"""Loss-spike guard, and the fault injection that exercises it.

Policy (PaLM's remedy, made explicit): a step's training loss is a *spike* when it
is not finite, or when, after a warm-up, it sits more than ``threshold`` robust
standard deviations above the median of a trailing window of accepted losses.
The robust spread is 1.4826 x the median absolute deviation, floored at 2% of the
median so that a flat, noiseless plateau does not turn tiny bumps into spikes.

On a spike the trainer rolls back to the newest checkpoint at least
``spike_rollback_steps`` before it, skips the data window between that checkpoint
and the spike (plus ``spike_skip_batches`` more), and carries on; after
``spike_max_rollbacks`` interventions in one run it stops with an error instead,
because a run that keeps spiking needs a person (lower LR, better data).

A spike loss never enters the window, and the window is saved in every
checkpoint, so a rolled-back or resumed run judges later steps exactly as an
uninterrupted one would.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist

from scalelab.errors import ScalelabError

MAD_TO_STD = 1.4826  # the MAD of a normal distribution is 0.6745 sigma
MIN_REL_SCALE = 0.02


class SpikeGuard:
    def __init__(self, window: int = 50, threshold: float = 6.0, warmup: int = 100):
        if window < 3:
            raise ScalelabError(f"invalid config: train.spike_window must be at least 3, got {window}")
        if threshold <= 0:
            raise ScalelabError(f"invalid config: train.spike_threshold must be positive, got {threshold}")
        self.window, self.threshold, self.warmup = window, threshold, warmup
        self.recent: deque[float] = deque(maxlen=window)

    def check(self, step: int, loss: float) -> str | None:
        """Why the loss of ``step`` is a spike, or None (then it joins the trailing window)."""
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if step > self.warmup and len(self.recent) == self.window:
            values = sorted(self.recent)
            median = _median(values)
            mad = _median(sorted(abs(v - median) for v in values))
            scale = max(MAD_TO_STD * mad, MIN_REL_SCALE * abs(median), 1e-12)
            z = (loss - median) / scale
            if z > self.threshold:
                return f"loss {loss:.4f} is {z:.1f} robust std above the trailing median {median:.4f}"
        self.recent.append(loss)
        return None

    def state_dict(self) -> dict:
        return {"recent": list(self.recent)}

    def load_state_dict(self, state: dict) -> None:
        self.recent = deque((float(v) for v in state.get("recent", [])), maxlen=self.window)


def _median(sorted_values: list[float]) -> float:
    n = len(sorted_values)
    mid = n // 2
    return sorted_values[mid] if n % 2 else 0.5 * (sorted_values[mid - 1] + sorted_values[mid])


def agree_on_loss(loss: float, env, device: torch.device | str = "cpu") -> float:
    """Rank 0's copy of the loss on every rank, bit for bit, so every rank takes the same spike decision.

    ``device`` is where the process group's backend wants tensors (CUDA for NCCL).
    """
    if not env.enabled:
        return loss

    box = torch.tensor([loss], dtype=torch.float64, device=device)
    dist.broadcast(box, src=0)
    return float(box.item())


# -- fault injection ---------------------------------------------------------------------------------


@dataclass
class FaultInjector:
    """A one-shot fault for fire drills and tests, from ``train.inject_fault``.

    ``poison:STEP`` replaces the batch of STEP with random tokens (a corrupt shard);
    ``lr:STEP:FACTOR`` multiplies the learning rate of STEP's update by FACTOR (a bad
    schedule or a flipped bit). Each fires once per process: replaying STEP after a
    rollback sees clean data and the normal LR, as a transient fault would.
    """
    kind: str
    step: int
    factor: float = 1.0
    fired: bool = False

    @classmethod
    def parse(cls, spec: str) -> FaultInjector | None:
        if not spec:
            return None
        parts = spec.split(":")
        try:
            if parts[0] == "poison" and len(parts) == 2:
                fault = cls("poison", int(parts[1]))
            elif parts[0] == "lr" and len(parts) == 3:
                fault = cls("lr", int(parts[1]), float(parts[2]))
            else:
                raise ValueError
        except ValueError:
            raise ScalelabError(
                f"invalid config: train.inject_fault = {spec!r}; expected 'poison:STEP' or 'lr:STEP:FACTOR'"
            ) from None
        if fault.step < 1:
            raise ScalelabError(f"invalid config: train.inject_fault step must be at least 1, got {fault.step}")
        return fault

    def _due(self, kind: str, step: int) -> bool:
        if self.kind == kind and step == self.step and not self.fired:
            self.fired = True
            return True
        return False

    def lr_factor(self, step: int) -> float:
        return self.factor if self._due("lr", step) else 1.0

    def batch(self, step: int, x: torch.Tensor, y: torch.Tensor, vocab_size: int, seed: int, rank: int):
        if not self._due("poison", step):
            return x, y
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1009 + rank)
        return (torch.randint(0, vocab_size, x.shape, generator=g, dtype=x.dtype),
                torch.randint(0, vocab_size, y.shape, generator=g, dtype=y.dtype))
