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

from scalelab.errors import ScalelabError

ROLES = ("system", "user", "assistant")


def chat_stop_ids(tokenizer) -> tuple[int, ...]:
    """Tokens that end an assistant reply: its end marker, or the start of a turn it should not write."""
    return tuple(tokenizer.token_id(s) for s in ("<|assistant_end|>", "<|user_start|>", "<|bos|>"))


def render_chat(tokenizer, messages: list[dict], preamble: str = "", add_generation_prompt: bool = True) -> list[int]:
    """Token ids of ``messages`` ([{"role": ..., "content": str}, ...]) in the chat template.

    With ``add_generation_prompt`` the ids end with ``<|assistant_start|>``, ready for the reply;
    without it (SFT data) they end after the last turn.
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
        ids.extend(tokenizer.encode(content))
        ids.append(tokenizer.token_id(f"<|{role}_end|>"))
    if add_generation_prompt:
        ids.append(tokenizer.token_id("<|assistant_start|>"))
    return ids
