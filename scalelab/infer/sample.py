"""Sampling from a model with its KV cache.

The prompt is prefilled once and its cache shared by every sample; each new
token then costs one forward pass of length 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scalelab.errors import ScalelabError
from scalelab.model.gpt import GPT, KVCache


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering; rows are independent."""
    logits = logits.float() / max(temperature, 1e-8)
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token once the mass strictly before it already reaches top_p (the top token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


@torch.no_grad()
def generate(
    model: GPT,
    prompt_ids: list[int],
    params: SamplingParams,
    num_samples: int = 1,
    decode=None,
) -> list[list[int]]:
    """``num_samples`` continuations of one prompt (new tokens only, stop token excluded).

    ``decode`` (ids -> str) is needed only for stop strings; the text is then cut
    by the caller with :func:`cut_at_stop`.
    """
    if not prompt_ids:
        raise ScalelabError("empty prompt: give at least one token (e.g. the BOS token)")
    if params.max_new_tokens < 0:
        raise ScalelabError("max_new_tokens must be >= 0")
    ctx = model.config.block_size
    if len(prompt_ids) > ctx:
        raise ScalelabError(f"prompt of {len(prompt_ids)} tokens is longer than the model's context of {ctx}")
    max_new = min(params.max_new_tokens, ctx - len(prompt_ids))
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(params.seed)
    model.eval()
    cache = KVCache(model.config, 1, len(prompt_ids) + max_new, device=device, dtype=next(model.parameters()).dtype)
    logits = model(torch.tensor([prompt_ids], device=device), cache=cache)[:, -1]
    if num_samples > 1:
        cache = cache.expand(num_samples)
        logits = logits.expand(num_samples, -1)
    out: list[list[int]] = [[] for _ in range(num_samples)]
    done = torch.zeros(num_samples, dtype=torch.bool, device=device)
    stops = set(params.stop_token_ids)
    for _ in range(max_new):
        if params.temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = filter_logits(logits, params.temperature, params.top_k, params.top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        for i, tok in enumerate(nxt.tolist()):
            if done[i]:
                continue
            if tok in stops:
                done[i] = True
                continue
            out[i].append(tok)
            if params.stop_strings and decode and any(s in decode(out[i]) for s in params.stop_strings):
                done[i] = True
        if bool(done.all()):
            break
        logits = model(nxt.view(-1, 1), cache=cache)[:, -1]
    return out


def cut_at_stop(text: str, stop_strings) -> str:
    """Text up to (not including) the earliest stop string."""
    cut = len(text)
    for s in stop_strings:
        i = text.find(s)
        if s and i != -1:
            cut = min(cut, i)
    return text[:cut]
