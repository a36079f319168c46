"""The chat template, written once for serving and post-training.

A conversation becomes::

    <|bos|><|user_start|>question<|user_end|><|assistant_start|>answer<|assistant_end|>
    <|user_start|>next question<|user_end|><|assistant_start|>

and the model's reply ends at ``<|assistant_end|>``. The tokenizer has no
system turn, so system messages (and any preamble such as the memory block)
are written at the start of the first user turn, separated by a blank line.
Special tokens come only from ``token_id``: a message containing the text
"<|user_end|>" cannot forge a turn boundary.

An imported checkpoint (tokenizer kind "hf") brings its own format instead: its Jinja chat
template, rendered as ``transformers`` renders it, then tokenized with its special strings parsed
(as ``apply_chat_template`` does). A checkpoint without a template cannot chat; ``scalelab import
--chat-template FILE`` gives it one.
"""

from __future__ import annotations

import re

from scalelab.errors import ScalelabError
from scalelab.tokenizer.chat_template import render_template

ROLES = ("system", "user", "assistant")
TOOL_MARKERS = ("<|tool_call_start|>", "<|tool_call_end|>", "<|tool_output_start|>", "<|tool_output_end|>")
_TOOL_MARKER_RE = re.compile("|".join(re.escape(m) for m in TOOL_MARKERS))


def chat_stop_ids(tokenizer) -> tuple[int, ...]:
    """Tokens that end an assistant reply: its end marker, or the start of a turn it should not write."""
    if uses_template(tokenizer):
        return tokenizer.stop_ids
    return tuple(tokenizer.token_id(s) for s in ("<|assistant_end|>", "<|user_start|>", "<|bos|>"))


def _encode_tool_markers(tokenizer, text: str) -> list[int]:
    ids, at = [], 0
    for m in _TOOL_MARKER_RE.finditer(text):
        ids.extend(tokenizer.encode(text[at : m.start()]))
        ids.append(tokenizer.token_id(m.group()))
        at = m.end()
    return ids + tokenizer.encode(text[at:])


def render_chat(tokenizer, messages: list[dict], preamble: str = "", add_generation_prompt: bool = True,
                tool_markers: bool = False) -> list[int]:
    """Token ids of ``messages`` ([{"role": ..., "content": str}, ...]) in the chat template.

    With ``add_generation_prompt`` the ids end with ``<|assistant_start|>``, ready for the reply;
    without it (SFT data) they end after the last turn.

    With ``tool_markers``, the tool-call and tool-output markers written in an *assistant*
    message become their special ids again. The server shows a reply's tool calls as those
    markers, so a client sending the conversation back gives the model the tokens it wrote.
    Turn markers never convert, and user and system text never does: the caller controls the
    assistant's past turns anyway, so nothing it could not already write becomes possible.
    """
    if not messages:
        raise ScalelabError("a chat needs at least one message")
    if uses_template(tokenizer):
        return tokenizer.encode_chat(template_text(tokenizer, messages, add_generation_prompt, preamble))[0]
    system = [preamble.strip()] if preamble.strip() else []
    turns: list[tuple[str, str]] = []
    for m in checked_messages(messages):
        role, content = m["role"], m["content"]
        if role == "system":
            system.append(content)
        else:
            turns.append((role, content))
    if system:
        prefix = "\n\n".join(system)
        if turns and turns[0][0] == "user":
            turns[0] = ("user", prefix + "\n\n" + turns[0][1])
        else:
            turns.insert(0, ("user", prefix))
    ids = [tokenizer.bos_id]
    for role, content in turns:
        ids.append(tokenizer.token_id(f"<|{role}_start|>"))
        ids.extend(_encode_tool_markers(tokenizer, content) if tool_markers and role == "assistant"
                   else tokenizer.encode(content))
        ids.append(tokenizer.token_id(f"<|{role}_end|>"))
    if add_generation_prompt:
        ids.append(tokenizer.token_id("<|assistant_start|>"))
    return ids


# -- an imported checkpoint's own chat template ----------------------------------------------------------


def uses_template(tokenizer) -> bool:
    return getattr(tokenizer, "kind", None) == "hf"


def checked_messages(messages: list[dict], preamble: str = "") -> list[dict]:
    """Plain {"role", "content"} copies of ``messages`` (an error names the first bad one); a ``preamble``
    (e.g. the memory block) goes into the system turn."""
    out = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ScalelabError(f"messages[{i}].role must be one of {', '.join(ROLES)} (got {role!r})")
        if not isinstance(content, str):
            raise ScalelabError(f"messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    if preamble.strip():  # the memory block: into the system turn, as for scalelab's own template
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": preamble.strip() + "\n\n" + out[0]["content"]}
        else:
            out.insert(0, {"role": "system", "content": preamble.strip()})
    return out


def template_text(tokenizer, messages: list[dict], add_generation_prompt: bool, preamble: str = "") -> str:
    if tokenizer.chat_template is None:
        raise ScalelabError(
            "this model has no chat template, so it cannot chat; re-import it with "
            "`scalelab import SRC --out RUN --chat-template FILE` (a Jinja template, e.g. ChatML)"
        )
    return render_template(tokenizer.chat_template, checked_messages(messages, preamble), add_generation_prompt,
                           tokenizer.special_tokens)


def template_assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The whole conversation's text and the character span of each assistant reply in it.

    A reply's span runs from the end of the prompt the template writes for it (the generation
    prompt) to the end of the turn, the end-of-turn marker included: what the model writes.
    This needs a template whose rendering of a conversation's first turns is a prefix of its
    rendering of the whole; one that rewrites earlier turns is refused, as the mask would be wrong.
    """
    full = template_text(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = template_text(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = template_text(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise ScalelabError(
                "the chat template renders earlier turns differently once later turns follow, so assistant "
                f"tokens cannot be located for the loss mask (at messages[{i}])"
            )
        spans.append((len(before), len(upto)))
    return full, spans


def template_reply_text(tokenizer, prompt_messages: list[dict], reply: str) -> tuple[str, str]:
    """(prompt text ending in the generation prompt, the reply as the model writes it, end-of-turn included)."""
    before = template_text(tokenizer, prompt_messages, add_generation_prompt=True)
    full = template_text(tokenizer, prompt_messages + [{"role": "assistant", "content": reply}], False)
    if not full.startswith(before):
        raise ScalelabError("the chat template's generation prompt is not a prefix of the rendered reply")
    return before, full[len(before):]
