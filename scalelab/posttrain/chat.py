"""Chat conversations as training rows: the serving template plus an assistant-only loss mask.

The template itself lives in :mod:`scalelab.infer.chat` so that what the model
is trained on and what the server sends it can never drift apart. Here we only
add which positions carry loss: every token of every assistant reply, its
``<|assistant_end|>`` included (the model must learn to stop), and nothing else
(not the BOS, not the user turns, not the ``<|assistant_start|>`` the template
writes for it).

With an imported checkpoint's own chat template, the same rule holds by characters: a token
carries loss when it starts inside an assistant reply's span of the rendered text, from the end
of its generation prompt through its end-of-turn marker.
"""

from __future__ import annotations

from scalelab.errors import ScalelabError
from scalelab.infer.chat import (
    chat_stop_ids,
    render_chat,
    template_assistant_spans,
    template_reply_text,
    uses_template,
)

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
    if uses_template(tokenizer):
        text, spans = template_assistant_spans(tokenizer, messages)
        ids, offsets = tokenizer.encode_chat(text)
        return ids, [int(any(a <= s < b for a, b in spans)) for s, _ in offsets]
    ids = render_chat(tokenizer, messages, add_generation_prompt=False)
    start, end = tokenizer.token_id("<|assistant_start|>"), tokenizer.token_id("<|assistant_end|>")
    return ids, assistant_mask(ids, start, end)


def prompt_ids(tokenizer, prompt: str | list[dict]) -> list[int]:
    """A prompt (one user message, or earlier turns ending with a user turn) ready for the reply."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return render_chat(tokenizer, messages, add_generation_prompt=True)


def reply_ids(tokenizer, reply: str, prompt: str | list[dict] | None = None) -> list[int]:
    """The tokens a model writes for ``reply``: its text and the closing ``<|assistant_end|>``.

    A chat template may write the end of a turn depending on the turns before it, so with one the
    ``prompt`` (as for :func:`prompt_ids`) is needed too.
    """
    if uses_template(tokenizer):
        if prompt is None:
            raise ScalelabError("reply_ids needs the prompt when the model has its own chat template")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return tokenizer.encode_chat(template_reply_text(tokenizer, messages, reply)[1])[0]
    return tokenizer.encode(reply) + [tokenizer.token_id("<|assistant_end|>")]


def targets_from_mask(ids: list[int], mask: list[int], ignore: int = -1) -> tuple[list[int], list[int]]:
    """Next-token inputs and targets; a target whose token carries no loss becomes ``ignore``."""
    x = ids[:-1]
    y = [t if m else ignore for t, m in zip(ids[1:], mask[1:])]
    return x, y
