"""OpenAI request parsing: every bad field becomes an :class:`APIError` with an OpenAI-style body.

Bodies are checked by hand rather than by pydantic models so each refusal names
the field and reads like OpenAI's (``{"error": {"message", "type", "param", "code"}}``),
with status 400, instead of FastAPI's 422 validation dump.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from scalelab.infer.engine import GenerationParams

MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS_CHAT = 20  # OpenAI's limits
MAX_LOGPROBS_COMPLETIONS = 5


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


PARSE_ON_LOOP_BYTES = 64 << 10


async def read_json(request, require_object: bool = True):
    """The request's JSON body. The server's guard counts the bytes as they arrive (a body over the
    limit is a 413 whether or not it said its length); this only parses it."""
    raw = await request.body()
    try:
        # a big body (up to the 1 MiB limit: several ms of parsing) is parsed off the event loop, so other
        # requests' streams do not wait for it; a small one costs less than the hand-off
        body = json.loads(raw) if len(raw) <= PARSE_ON_LOOP_BYTES else await asyncio.to_thread(json.loads, raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"We could not parse the JSON body of your request ({e})", code="invalid_json") from None
    except RecursionError:  # a few thousand nested brackets: the parser's stack, not the server, gives out
        raise APIError(400, "the JSON body of your request is nested too deeply", code="invalid_json") from None
    if require_object and not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_type")
    return body


def _bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    x = body.get(name)
    if x is None:
        return default
    if not _is_number(x):
        raise _bad(name, f"'{name}' must be a number", "invalid_type")
    if not lo <= x <= hi:
        raise _bad(name, f"'{name}' must be between {lo:g} and {hi:g} (got {x})")
    return float(x)


def _integer(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    x = body.get(name)
    if x is None:
        return default
    if not _is_int(x):
        raise _bad(name, f"'{name}' must be an integer", "invalid_type")
    if not lo <= x <= hi:
        raise _bad(name, f"'{name}' must be between {lo} and {hi} (got {x})")
    return x


def _boolean(body: dict, name: str, default: bool = False) -> bool:
    x = body.get(name)
    if x is None:
        return default
    if not isinstance(x, bool):
        raise _bad(name, f"'{name}' must be a boolean", "invalid_type")
    return x


@dataclass
class ParsedRequest:
    prompts: list[list[int]]
    params: GenerationParams
    max_tokens_given: bool
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    extra: dict = field(default_factory=dict)


def check_model(body: dict, model_name: str) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        code = "invalid_type" if model is not None else "missing_model"
        raise _bad("model", "'model' is required and must be a string", code)
    if model != model_name:
        raise APIError(404, f"The model '{model}' does not exist (this server serves '{model_name}')",
                       param="model", code="model_not_found")


def _stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _bad("stop", "'stop' must be a string or a list of strings", "invalid_type")
    if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
        raise _bad("stop", f"'stop' takes at most {MAX_STOP_STRINGS} non-empty strings")
    return tuple(stop)


def _unsupported(body: dict) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        x = body.get(name)
        if x is not None and (not _is_number(x) or x != 0):
            raise _bad(name, f"'{name}' is not supported by this server (leave it unset or 0)", "unsupported")
    if body.get("logit_bias"):
        raise _bad("logit_bias", "'logit_bias' is not supported by this server", "unsupported")
    for name in ("echo", "suffix", "tools", "functions", "response_format"):
        if body.get(name) not in (None, False, [], {"type": "text"}):
            raise _bad(name, f"'{name}' is not supported by this server", "unsupported")


def parse_sampling(body: dict, context: int, max_n: int, stop_token_ids: tuple[int, ...], chat: bool) -> ParsedRequest:
    """The fields shared by completions and chat completions; prompts are filled in by the caller."""
    _unsupported(body)
    max_tokens = _integer(body, "max_tokens", None, 1, context)
    if chat and max_tokens is None:
        max_tokens = _integer(body, "max_completion_tokens", None, 1, context)
    given = max_tokens is not None
    if max_tokens is None:
        max_tokens = context if chat else 16  # chat: until the reply ends; completions: OpenAI's default
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        temperature = 0.0  # nothing but the top token: greedy
    params = GenerationParams(
        max_new_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p if top_p > 0 else 1.0,
        top_k=_integer(body, "top_k", 0, 0, 1 << 20),
        seed=_integer(body, "seed", None, -(1 << 63), (1 << 63) - 1),
        n=_integer(body, "n", 1, 1, max_n),
        stop_token_ids=stop_token_ids,
        stop_strings=_stop_strings(body),
        truncate_prompt=_boolean(body, "truncate_prompt"),
    )
    if params.seed is not None and params.seed < 0:
        params.seed %= 1 << 63
    stream = _boolean(body, "stream")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise _bad("stream_options", "'stream_options' must be an object", "invalid_type")
        include_usage = _boolean(opts, "include_usage")
    if chat:
        logprobs = _boolean(body, "logprobs")
        top = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS_CHAT)
        if top and not logprobs:
            raise _bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    else:
        top = _integer(body, "logprobs", None, 0, MAX_LOGPROBS_COMPLETIONS)
        logprobs = top is not None
    params.logprobs, params.top_logprobs = logprobs, top or 0
    return ParsedRequest([], params, given, stream, include_usage and stream, logprobs)


def parse_completion_prompts(body: dict, vocab_size: int, max_prompts: int) -> list[str | list[int]]:
    """``prompt``: a string, a list of strings, a list of token ids, or a list of those lists; each
    prompt comes back as its text (to encode) or its checked ids. The count is checked here, before
    anything is encoded."""
    prompt = body.get("prompt")
    if prompt is None:
        raise _bad("prompt", "'prompt' is required", "missing_prompt")

    def ids(p, where):
        if not p or not all(_is_int(t) and 0 <= t < vocab_size for t in p):
            raise _bad("prompt", f"{where} must be a non-empty list of token ids in [0, {vocab_size})")
        return list(p)

    out = None
    if isinstance(prompt, str):
        out = [prompt]
    elif isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            out = list(prompt)
        elif all(_is_int(t) for t in prompt):
            out = [prompt]
        elif all(isinstance(p, list) for p in prompt):
            out = prompt
    if out is None:
        raise _bad("prompt", "'prompt' must be a string, a list of strings, or token ids", "invalid_type")
    if len(out) > max_prompts:
        raise _bad("prompt", f"too many prompts × n in one request (at most {max_prompts})")
    if isinstance(out[0], list):
        return [ids(p, "'prompt'" if len(out) == 1 and out[0] is prompt else f"prompt[{i}]") for i, p in enumerate(out)]
    return out


def context_error(tokens: int, context: int, param: str, at_least: bool = False) -> APIError:
    has = f"at least {tokens}" if at_least else f"{tokens}"
    return APIError(
        400,
        f"This model's maximum context length is {context} tokens. However, your prompt has {has} "
        "tokens, which leaves no room for the completion. Shorten the prompt, or set truncate_prompt "
        "to keep its end.",
        param=param, code="context_length_exceeded",
    )


def fit_text_before_encoding(text: str, context: int, max_token_bytes: int, truncate: bool, param: str) -> str:
    """Check a text's length before paying for its encoding: no token spans more than
    ``max_token_bytes`` bytes, so a text of B bytes is at least B / max_token_bytes tokens. Too long
    without truncation is an error now; with truncation only the end that can matter is encoded."""
    room = context * max_token_bytes  # characters: each is at least a byte, so this end holds >= context tokens
    if len(text) <= room:
        return text
    if not truncate:
        nbytes = len(text.encode("utf-8", errors="replace"))
        raise context_error(-(-nbytes // max_token_bytes), context, param, at_least=True)
    return text[-room:]


def parse_messages(body: dict) -> list[dict]:
    """``messages``, with OpenAI's list-of-parts content flattened to its text parts."""
    messages = body.get("messages")
    if messages is None:
        raise _bad("messages", "'messages' is required", "missing_messages")
    if not isinstance(messages, list):
        raise _bad("messages", "'messages' must be a list", "invalid_type")
    if not messages:
        raise _bad("messages", "'messages' must contain at least one message", "empty_array")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", f"messages[{i}] must be an object", "invalid_type")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise _bad(f"messages[{i}].content", "only text content parts are supported", "invalid_type")
                parts.append(part["text"])
            content = "".join(parts)
        if content is None and m.get("role") == "assistant":
            content = ""
        if m.get("role") not in ("system", "user", "assistant", "developer"):
            raise _bad(f"messages[{i}].role", f"messages[{i}].role must be system, user or assistant", "invalid_value")
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content", f"messages[{i}].content must be a string", "invalid_type")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


def check_context(prompts: list[list[int]], context: int, truncate: bool, param: str) -> None:
    if truncate:
        return
    for p in prompts:
        if len(p) >= context:
            raise context_error(len(p), context, param)
