"""Chat conversations as training rows: the serving template plus an assistant-only loss mask.

The template itself lives in :mod:`scalelab.infer.chat` so that what the model
is trained on and what the server sends it can never drift apart. Here we only
add which positions carry loss: every token of every assistant reply, its
``<|assistant_end|>`` included (the model must learn to stop), and nothing else
(not the BOS, not the user turns, not the ``<|assistant_start|>`` the template
writes for it).
"""

from __future__ import annotations

from scalelab.errors import ScalelabError
from scalelab.infer.chat import chat_stop_ids, render_chat

__all__ = ["assistant_mask", "chat_stop_ids", "prompt_ids", "render_chat", "render_training", "targets_from_mask"]


def assistant_mask(ids: list[int], assistant_start: int, assistant_end: int) -> list[int]:
    """1 for each token inside an assistant turn (its end marker included), else 0.

    Scanning ids is safe because special ids never come out of ``encode``: message text cannot
    open or close a turn.
    """
    mask, inside = [], False
    for tok in ids:
        if tok == assistant_start:
            mask.append(0)
            inside = True
        elif inside:
            mask.append(1)
            if tok == assistant_end:
                inside = False
        else:
            mask.append(0)
    return mask


def render_training(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation and its loss mask (see :func:`assistant_mask`)."""
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        raise ScalelabError("a training conversation needs at least one assistant message")
    ids = render_chat(tokenizer, messages, add_generation_prompt=False)
    start, end = tokenizer.token_id("<|assistant_start|>"), tokenizer.token_id("<|assistant_end|>")
    return ids, assistant_mask(ids, start, end)


def prompt_ids(tokenizer, prompt: str | list[dict]) -> list[int]:
    """A prompt (one user message, or earlier turns ending with a user turn) ready for the reply."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return render_chat(tokenizer, messages, add_generation_prompt=True)


def reply_ids(tokenizer, reply: str) -> list[int]:
    """The tokens a model writes for ``reply``: its text and the closing ``<|assistant_end|>``."""
    return tokenizer.encode(reply) + [tokenizer.token_id("<|assistant_end|>")]


def targets_from_mask(ids: list[int], mask: list[int], ignore: int = -1) -> tuple[list[int], list[int]]:
    """Next-token inputs and targets; a target whose token carries no loss becomes ``ignore``."""
    x = ids[:-1]
    y = [t if m else ignore for t, m in zip(ids[1:], mask[1:])]
    return x, y
