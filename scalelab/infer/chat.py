"""The chat template, written once for serving and post-training.

A conversation becomes::

    <|bos|><|user_start|>question<|user_end|><|assistant_start|>answer<|assistant_end|>
    <|user_start|>next question<|user_end|><|assistant_start|>

and the model's reply ends at ``<|assistant_end|>``. The tokenizer has no
system turn, so system messages (and any preamble such as the memory block)
are written at the start of the first user turn, separated by a blank line.
Special tokens come only from ``token_id``: a message containing the text
"<|user_end|>" cannot forge a turn boundary.
"""

from __future__ import annotations

import re

from scalelab.errors import ScalelabError

ROLES = ("system", "user", "assistant")
TOOL_MARKERS = ("<|tool_call_start|>", "<|tool_call_end|>", "<|tool_output_start|>", "<|tool_output_end|>")
_TOOL_MARKER_RE = re.compile("|".join(re.escape(m) for m in TOOL_MARKERS))


def chat_stop_ids(tokenizer) -> tuple[int, ...]:
    """Tokens that end an assistant reply: its end marker, or the start of a turn it should not write."""
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
    system = [preamble.strip()] if preamble.strip() else []
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ScalelabError(f"messages[{i}].role must be one of {', '.join(ROLES)} (got {role!r})")
        if not isinstance(content, str):
            raise ScalelabError(f"messages[{i}].content must be a string")
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
