"""Three Transformer families on one backbone: decoder-only, prefix-LM and encoder-only masked LM.

All three are a :class:`scalelab.model.gpt.GPT` (same Block, Attention, MLP, RMSNorm, RoPE and
weights layout); they differ only in which keys each query may see and where the loss is taken:

- ``decoder``: causal attention, next-token loss everywhere. This is ``GPT.forward`` unchanged.
- ``prefix_lm`` (the "non-causal decoder" of T5/UL2): a prefix of each row is read bidirectionally,
  the rest causally; next-token loss only on tokens after the prefix. It generates like a decoder,
  with the prompt as its bidirectional prefix.
- ``mlm`` (BERT-style encoder): full bidirectional attention over an input in which 15% of the
  positions were corrupted by the 80/10/10 rule; loss only on those positions. Its [MASK] token
  extends the tokenizer's vocabulary by one id (``mask_id = tokenizer.vocab_size``) rather than
  reusing a reserved chat token, so a chat-tuned copy could never confuse the two.

The attention mask reaches every layer through GPT's cache protocol (``positions`` / ``update`` /
``advance``), which exists so a caller can decide what each new query sees; using that seam keeps
gpt.py's fast ``is_causal`` training path byte-for-byte unchanged.

Loss heads run only where a loss is taken (all positions for ``decoder``, the suffix for
``prefix_lm``, the corrupted 15% for ``mlm``), and :func:`training_flops_per_token` counts FLOPs
the same way, so "equal training FLOPs" is computed per family, not assumed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scalelab.errors import ScalelabError
from scalelab.model.gpt import GPT, GPTConfig

FAMILIES = ("decoder", "prefix_lm", "mlm")
MASK_RATE = 0.15
# BERT's 80/10/10 rule: of the selected positions, 80% become [MASK], 10% a random token, 10% stay.
MASK_SPLIT = (0.8, 0.1, 0.1)


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ScalelabError(f"unknown model family '{family}' (families: {', '.join(FAMILIES)})")
    return family


def model_vocab_size(family: str, tokenizer_vocab: int) -> int:
    """The MLM has one extra id, its [MASK] token, at ``tokenizer_vocab``."""
    return tokenizer_vocab + 1 if check_family(family) == "mlm" else tokenizer_vocab


def build_model(family: str, cfg: GPTConfig, tokenizer_vocab: int) -> GPT:
    c = GPTConfig(**{**cfg.__dict__, "vocab_size": model_vocab_size(family, tokenizer_vocab)})
    return GPT(c)


# -- who sees whom --------------------------------------------------------------------------------------------


class _FixedVisibility:
    """Stands in for a KV cache to hand each layer one explicit boolean mask (True: may attend).

    ``mask`` is (T, T) or (B, 1, T, T); None means every query sees every key (bidirectional).
    Nothing is stored, so one object serves every layer of one forward pass.
    """

    def __init__(self, mask: torch.Tensor | None):
        self.mask = mask

    def positions(self, T: int):
        return slice(0, T), T

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        return k, v, self.mask

    def advance(self, T: int) -> None:
        pass


def causal_mask(T: int, device=None) -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def prefix_lm_mask(prefix_lens: torch.Tensor, T: int) -> torch.Tensor:
    """(B, 1, T, T): query i sees key j if j <= i (causal) or both lie in the row's prefix."""
    idx = torch.arange(T, device=prefix_lens.device)
    in_prefix = idx[None, :] < prefix_lens[:, None]  # (B, T)
    both_in_prefix = in_prefix[:, :, None] & in_prefix[:, None, :]
    return (causal_mask(T, prefix_lens.device)[None] | both_in_prefix)[:, None]


def padded_bidirectional_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """(B, 1, T, T): every query sees every real key of its row; right padding is invisible.

    Padding queries still see the real keys (an all-False row would give NaN); their outputs are ignored.
    """
    real = torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]
    return real[:, None, None, :].expand(-1, 1, T, T)


def hidden_with_mask(model: GPT, idx: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Final-norm hidden states (B, T, C) with an explicit attention mask (None: bidirectional)."""
    T = idx.shape[1]
    if T > model.config.block_size:
        raise ScalelabError(f"sequence of {T} tokens is longer than the model's context of {model.config.block_size}")
    vis = _FixedVisibility(mask)
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    x = model.embed(idx)
    for block in model.blocks:
        x = block(x, cos, sin, vis)
    return model.final_norm(x)


def family_hidden(model: GPT, family: str, idx: torch.Tensor, prefix_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Each family's own view of a whole input: causal, prefix (default: all of it) or bidirectional."""
    if check_family(family) == "decoder":
        return model.hidden_states(idx)
    if family == "prefix_lm":
        B, T = idx.shape
        lens = prefix_lens if prefix_lens is not None else torch.full((B,), T, device=idx.device)
        return hidden_with_mask(model, idx, prefix_lm_mask(lens, T))
    return hidden_with_mask(model, idx, None)


def head_loss(model: GPT, h: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy with the lm_head applied only where targets != -1 (the FLOPs we count)."""
    keep = targets != -1
    if not keep.any():
        raise ScalelabError("no position carries a loss in this batch")
    logits = model.logits(h[keep])
    return F.cross_entropy(logits.float(), targets[keep], reduction=reduction)


# -- objectives -----------------------------------------------------------------------------------------------


def sample_prefix_lens(B: int, T: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A split point per row, uniform over 1..T-1: at least one prefix token and one scored token."""
    return torch.randint(1, T, (B,), generator=generator)


def prefix_targets(y: torch.Tensor, prefix_lens: torch.Tensor) -> torch.Tensor:
    """Next-token targets outside the prefix; -1 (ignored) inside it.

    Position t predicts token t+1, which it has not seen only if token t+1 lies outside the prefix,
    i.e. t >= prefix_len - 1; earlier positions see their own target through bidirectional attention.
    """
    T = y.shape[1]
    pos = torch.arange(T, device=y.device)[None, :]
    return torch.where(pos >= prefix_lens[:, None] - 1, y, torch.full_like(y, -1))


def prefix_lm_loss(model: GPT, x: torch.Tensor, y: torch.Tensor, prefix_lens: torch.Tensor,
                   reduction: str = "mean") -> torch.Tensor:
    h = hidden_with_mask(model, x, prefix_lm_mask(prefix_lens, x.shape[1]))
    return head_loss(model, h, prefix_targets(y, prefix_lens), reduction)


def mlm_corrupt(tokens: torch.Tensor, mask_id: int, random_ids: torch.Tensor, generator: torch.Generator | None = None,
                rate: float = MASK_RATE, protected: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: (inputs, targets); targets hold the original token at selected positions, -1 elsewhere.

    Each position is selected with probability ``rate`` (never a ``protected`` one, e.g. BOS); a
    selected position becomes ``mask_id`` with p=0.8, a token drawn from ``random_ids`` with p=0.1,
    and keeps its token with p=0.1. Every row gets at least one selected position, so no row is loss-free.
    """
    if not 0 < rate < 1:
        raise ScalelabError(f"MLM mask rate must lie in (0, 1), got {rate}")
    u = torch.rand(tokens.shape, generator=generator)
    can = torch.ones_like(tokens, dtype=torch.bool) if protected is None else ~torch.isin(tokens, protected)
    selected = (u < rate) & can
    # A short row can draw nothing; then its first eligible position with the smallest draw is taken.
    empty = ~selected.any(dim=1) & can.any(dim=1)
    if empty.any():
        pick = torch.where(can, u, torch.full_like(u, 2.0)).argmin(dim=1)
        selected[empty, pick[empty]] = True
    kind = torch.rand(tokens.shape, generator=generator)
    to_mask = selected & (kind < MASK_SPLIT[0])
    to_random = selected & (kind >= MASK_SPLIT[0]) & (kind < MASK_SPLIT[0] + MASK_SPLIT[1])
    rand_tok = random_ids[torch.randint(len(random_ids), tokens.shape, generator=generator)]
    inputs = torch.where(to_mask, torch.full_like(tokens, mask_id), tokens)
    inputs = torch.where(to_random, rand_tok, inputs)
    targets = torch.where(selected, tokens, torch.full_like(tokens, -1))
    return inputs, targets


def mlm_loss(model: GPT, inputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return head_loss(model, hidden_with_mask(model, inputs, None), targets, reduction)


def ordinary_ids(vocab_size: int, special_ids) -> torch.Tensor:
    """Token ids a random replacement may draw: the tokenizer's vocabulary minus its special tokens."""
    special = set(int(i) for i in special_ids)
    return torch.tensor([i for i in range(vocab_size) if i not in special], dtype=torch.long)


# -- FLOPs ----------------------------------------------------------------------------------------------------


def mean_visible_keys(family: str, T: int) -> float:
    """Average number of keys one query attends to, with the training-time masks.

    decoder: (T+1)/2. mlm: T. prefix_lm: with a split P uniform over 1..T-1, the prefix's P queries see
    P keys each and query t >= P sees t+1, averaged over P and over the T queries.
    """
    if check_family(family) == "decoder":
        return (T + 1) / 2
    if family == "mlm":
        return float(T)
    total = 0
    for P in range(1, T):
        total += P * P + (T * (T + 1) - P * (P + 1)) // 2
    return total / ((T - 1) * T)


def loss_fraction(family: str, T: int, mask_rate: float = MASK_RATE) -> float:
    """Expected share of positions that carry a loss (and so run the lm_head)."""
    if check_family(family) == "decoder":
        return 1.0
    if family == "mlm":
        return mask_rate
    # positions t >= P-1 are scored: T-P+1 of T, P uniform over 1..T-1
    return sum(T - P + 1 for P in range(1, T)) / ((T - 1) * T)


def training_flops_per_token(model: GPT, family: str, seq_len: int | None = None, mask_rate: float = MASK_RATE) -> float:
    """Forward + backward FLOPs per input token, counting only work a mask-aware kernel must do.

    6 × (matmul weights of the blocks) + 6 × (lm_head weights) × (share of positions with a loss)
    + 12 × layers × heads × head_dim × (mean keys visible per query). The embedding lookup is free.
    Unlike ``GPT.flops_per_token`` (full attention, head everywhere), this sees each family's masks.
    """
    c = model.config
    T = seq_len or c.block_size
    head = model.lm_head.weight.numel()
    body = sum(p.numel() for n, p in model.named_parameters()
               if p.dim() == 2 and n not in ("embed.weight", "lm_head.weight"))
    return (6 * body + 6 * head * loss_fraction(family, T, mask_rate)
            + 12 * c.depth * c.n_head * c.head_dim * mean_visible_keys(family, T))


# -- generation and scoring -----------------------------------------------------------------------------------


@torch.no_grad()
def next_token_logits(model: GPT, family: str, context: list[int], prompt_len: int, mask_id: int | None = None,
                      fill_masks: int = 1) -> torch.Tensor:
    """Logits (V,) for the token after ``context``; ``prompt_len`` is the prefix-LM's bidirectional prefix.

    The MLM has no next-token head: it appends ``fill_masks`` [MASK] tokens and reads the first.
    """
    device = next(model.parameters()).device
    if family == "mlm":
        if mask_id is None:
            raise ScalelabError("the MLM needs its mask_id to generate")
        ids = torch.tensor([context + [mask_id] * fill_masks], device=device)
        return model.logits(hidden_with_mask(model, ids, None)[0, len(context)])
    ids = torch.tensor([context], device=device)
    if family == "decoder":
        return model(ids)[0, -1]
    h = hidden_with_mask(model, ids, prefix_lm_mask(torch.tensor([prompt_len], device=device), len(context)))
    return model.logits(h[0, -1])


@torch.no_grad()
def greedy_generate(model: GPT, family: str, prompt: list[int], max_new_tokens: int, stop=None,
                    mask_id: int | None = None, fill_masks: int = 1) -> list[int]:
    """Greedy continuation of ``prompt``, recomputed in full each step (short answers: no KV cache needed).

    ``stop(ids) -> bool`` ends generation early; generation never runs past the context window.
    """
    check_family(family)
    was = model.training
    model.eval()
    out: list[int] = []
    extra = fill_masks if family == "mlm" else 0
    try:
        while len(out) < max_new_tokens and len(prompt) + len(out) + extra < model.config.block_size:
            logits = next_token_logits(model, family, prompt + out, len(prompt), mask_id, fill_masks)
            if mask_id is not None and family == "mlm":
                logits[mask_id] = float("-inf")  # the MLM must never "generate" its own mask
            out.append(int(logits.argmax()))
            if stop is not None and stop(out):
                break
    finally:
        model.train(was)
    return out
