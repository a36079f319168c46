"""A KV cache with one length per slot, for batches of sequences of different lengths.

The model's own KVCache keeps one position counter for the whole batch. Here
every slot (row) has its own length, so a decode step can advance sequences
that started at different times: each row's new token is written at that row's
position, rotated by that row's RoPE angle, and attends only to that row's
keys (an attention mask hides the rest of the padded key range).

A forward pass works on a subset of the slots, chosen before the call with
:meth:`SlotKVCache.begin_prefill` or :meth:`SlotKVCache.begin_decode`.

:class:`StaticDecode` is the same protocol for a decode step over every slot at
once, built from tensors only, so the step's shapes stay the same from step to
step (but for the key span) and it can be compiled (the engine's ``compile=True`` path).
"""

from __future__ import annotations

import torch

from scalelab.model.gpt import GPTConfig


def _as_index(slots: list[int], device) -> slice | torch.Tensor:
    # A run of consecutive slots is a view, not a gather: the common case once slots are reused lowest-first.
    if slots == list(range(slots[0], slots[0] + len(slots))):
        return slice(slots[0], slots[0] + len(slots))
    return torch.tensor(slots, dtype=torch.long, device=device)


class SlotKVCache:
    def __init__(self, cfg: GPTConfig, n_slots: int, max_len: int, device=None, dtype=torch.float32):
        c = cfg.resolved()
        shape = (n_slots, c.n_kv_head, max_len, c.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.depth)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.depth)]
        self.n_slots, self.max_len, self.device = n_slots, max_len, device
        self.lengths = [0] * n_slots
        self._mode = ""

    # -- choosing the rows of the next forward pass --------------------------------------------------

    def begin_prefill(self, slots: list[int], lengths: list[int]) -> None:
        """Next forward: whole prompts into empty slots, right-padded to the longest.

        Padding positions write keys past a row's real length; they are never
        attended to (causal mask, then the decode mask) and are overwritten later.
        """
        self._mode, self._slots, self._new_lengths = "prefill", list(slots), list(lengths)
        self._rows = _as_index(self._slots, self.device)

    def begin_decode(self, slots: list[int]) -> None:
        """Next forward: one new token per slot, each at its own position."""
        self._mode, self._slots = "decode", list(slots)
        self._rows = _as_index(self._slots, self.device)
        self._row_ids = torch.tensor(self._slots, dtype=torch.long, device=self.device)
        pos = [self.lengths[s] for s in slots]
        self._pos = torch.tensor(pos, dtype=torch.long, device=self.device)
        self._span = max(pos) + 1
        keys = torch.arange(self._span, device=self.device)
        self._mask = (keys[None, :] <= self._pos[:, None]).view(len(slots), 1, 1, self._span)

    # -- the protocol GPT.forward calls ---------------------------------------------------------------

    def positions(self, T: int):
        if self._mode == "prefill":
            return slice(0, T), max(self._new_lengths)
        return self._pos.view(-1, 1), self._span

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        kc, vc = self.k[layer], self.v[layer]
        if self._mode == "prefill":
            T = k.shape[2]
            kc[self._rows, :, :T] = k
            vc[self._rows, :, :T] = v
            return k, v, torch.ones(T, T, dtype=torch.bool, device=k.device).tril()
        # pair row b with position pos[b]: (B,) and (B,) advanced indices pick one (H, D) slice per row
        kc[self._row_ids, :, self._pos] = k[:, :, 0]
        vc[self._row_ids, :, self._pos] = v[:, :, 0]
        span = slice(0, self._span)
        return kc[self._rows, :, span], vc[self._rows, :, span], self._mask

    def advance(self, T: int) -> None:
        if self._mode == "prefill":
            for s, n in zip(self._slots, self._new_lengths):
                self.lengths[s] = n
        else:
            for s in self._slots:
                self.lengths[s] += 1
        self._mode = ""

    # -- slot management ------------------------------------------------------------------------------

    def copy_slot(self, src: int, dst: int) -> None:
        """Give ``dst`` the prompt already prefilled in ``src``: n samples share one prefill."""
        n = self.lengths[src]
        for kc, vc in zip(self.k, self.v):
            kc[dst, :, :n] = kc[src, :, :n]
            vc[dst, :, :n] = vc[src, :, :n]
        self.lengths[dst] = n

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0

    def save_slot(self, slot: int) -> tuple[int, list[torch.Tensor], list[torch.Tensor]]:
        """A copy (in host memory) of the keys and values ``slot`` holds, for :meth:`restore_slot`."""
        n = self.lengths[slot]
        return (n, [kc[slot, :, :n].to("cpu", copy=True) for kc in self.k],
                [vc[slot, :, :n].to("cpu", copy=True) for vc in self.v])

    def restore_slot(self, slot: int, saved: tuple[int, list[torch.Tensor], list[torch.Tensor]]) -> None:
        """Put keys and values from :meth:`save_slot` into ``slot`` (any slot): its cache as it was."""
        n, ks, vs = saved
        for kc, vc, k, v in zip(self.k, self.v, ks, vs):
            kc[slot, :, :n] = k.to(kc.device)
            vc[slot, :, :n] = v.to(vc.device)
        self.lengths[slot] = n

    def advance_slots(self, slots: list[int]) -> None:
        """Count one more token in each slot: a :class:`StaticDecode` step does not touch the lengths."""
        for s in slots:
            self.lengths[s] += 1


class StaticDecode:
    """One decode step over all slots: row b's new token sits at ``pos[b]``; ``keys`` is ``arange(span)``.

    The span comes in as a tensor's length rather than an int, so a compiler can
    treat it as one symbolic size instead of compiling a graph per span. Free slots
    decode a dummy token at their own length (0), which the next prefill overwrites.
    """

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], pos: torch.Tensor, keys: torch.Tensor):
        span = keys.shape[0]
        self.k, self.v, self.pos, self.span = k, v, pos, span
        self.rows = torch.arange(pos.shape[0], device=pos.device)
        self.mask = (keys[None, :] <= pos[:, None]).view(pos.shape[0], 1, 1, span)

    def positions(self, T: int):
        return self.pos.view(-1, 1), self.span

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        kc, vc = self.k[layer], self.v[layer]
        kc[self.rows, :, self.pos] = k[:, :, 0]
        vc[self.rows, :, self.pos] = v[:, :, 0]
        return kc[:, :, : self.span], vc[:, :, : self.span], self.mask

    def advance(self, T: int) -> None:
        pass  # the engine advances the slots that were really decoding
