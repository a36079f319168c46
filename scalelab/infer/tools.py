"""Tools the model can call mid-generation: a calculator and the "bio" memory tool.

The model writes a call between special tokens::

    <|tool_call_start|>12 * (3 + 4)<|tool_call_end|>
    <|tool_call_start|>bio: prefers metric units<|tool_call_end|>

and :func:`run_with_tools` evaluates it, appends
``<|tool_output_start|>84<|tool_output_end|>`` to the context and lets the model
go on. The loop only needs a ``generate_fn(tokens, params) -> new tokens``, so
the one-prompt sampler and the batched engine can both drive it.

The calculator never calls ``eval``: it walks the ``ast`` of the expression
and accepts only number literals and arithmetic operators. Every operation is
bounded before it runs (operand and result magnitude, exponent size), so each
step is cheap and the total work is bounded by the expression length. The time
limit is then a deadline checked at every node. We chose this over a worker
thread (Python cannot kill a thread stuck in a huge ``2**10**10``) and over a
subprocess (tens of milliseconds to start, per call, for what is microseconds
of arithmetic); the bounds are what make the deadline sufficient.
"""

from __future__ import annotations

import ast
import math
import operator
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from scalelab.errors import ScalelabError
from scalelab.infer.engine import GenerationParams
from scalelab.infer.sample import generate

MAX_EXPR_CHARS = 200
MAX_DEPTH = 32  # nested operators/parentheses in the parsed expression
MAX_INT_DIGITS = 100  # any integer operand or result; floats must also stay finite
DEFAULT_TIMEOUT_S = 0.5

TOOL_CALL_START = "<|tool_call_start|>"
TOOL_CALL_END = "<|tool_call_end|>"
TOOL_OUTPUT_START = "<|tool_output_start|>"
TOOL_OUTPUT_END = "<|tool_output_end|>"


class ToolError(ScalelabError):
    """A refused or failed tool call; the message is shown to the model as the tool's output."""


_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_INT_LIMIT = 10**MAX_INT_DIGITS


def _check_number(x, what: str = "result"):
    # bool is an int subclass; complex comes from e.g. (-8) ** 0.5: neither is arithmetic we promise
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ToolError(f"calculator: {what} is not a real number")
    if isinstance(x, int) and abs(x) >= _INT_LIMIT:
        raise ToolError(f"calculator: {what} has more than {MAX_INT_DIGITS} digits")
    if isinstance(x, float) and not math.isfinite(x):
        raise ToolError(f"calculator: {what} is too large (overflow)")
    return x


def _check_power(base, exp) -> None:
    """Refuse a power whose result would be huge before computing it (2 ** 10 ** 10 never runs)."""
    if abs(base) <= 1 or exp <= 0:
        return  # |result| <= 1, or a reciprocal: small
    digits = float(exp) * math.log10(abs(base))
    if digits > MAX_INT_DIGITS:
        raise ToolError(f"calculator: exponent too large (the result would have about {digits:.0f} digits)")


class _Evaluator:
    def __init__(self, timeout_s: float):
        self.deadline = time.monotonic() + timeout_s
        self.timeout_s = timeout_s

    def eval(self, node: ast.AST, depth: int = 0):
        if depth > MAX_DEPTH:
            raise ToolError(f"calculator: expression nested deeper than {MAX_DEPTH} levels")
        if time.monotonic() > self.deadline:
            raise ToolError(f"calculator: time limit of {self.timeout_s:g}s exceeded")
        if isinstance(node, ast.Expression):
            return self.eval(node.body, depth + 1)
        if isinstance(node, ast.Constant):
            return _check_number(node.value, "literal")
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _check_number(_UNARY[type(node.op)](self.eval(node.operand, depth + 1)))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left = self.eval(node.left, depth + 1)
            right = self.eval(node.right, depth + 1)
            if isinstance(node.op, ast.Pow):
                _check_power(left, right)
            try:
                result = _BINARY[type(node.op)](left, right)
            except ZeroDivisionError:
                raise ToolError("calculator: division by zero") from None
            except OverflowError:
                raise ToolError("calculator: result is too large (overflow)") from None
            return _check_number(result)
        raise ToolError(f"calculator: {_describe(node)} is not allowed (only numbers and + - * / // % ** and parentheses)")


def _describe(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return f"the name {node.id!r}"
    if isinstance(node, ast.Call):
        return "a function call"
    if isinstance(node, ast.Attribute):
        return "attribute access"
    if isinstance(node, ast.Subscript):
        return "subscripting"
    if isinstance(node, (ast.BinOp, ast.UnaryOp)):
        return f"the operator {type(node.op).__name__}"
    return f"a {type(node).__name__} expression"


def evaluate_expression(expr: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """The value of an arithmetic expression as text, or ToolError with a one-line reason."""
    if not isinstance(expr, str):
        raise ToolError("calculator: the expression must be text")
    expr = expr.strip()
    if not expr:
        raise ToolError("calculator: empty expression")
    if len(expr) > MAX_EXPR_CHARS:
        raise ToolError(f"calculator: expression longer than {MAX_EXPR_CHARS} characters")
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        raise ToolError("calculator: not a valid arithmetic expression") from None
    return format_number(_Evaluator(timeout_s).eval(tree))


def format_number(x) -> str:
    if isinstance(x, int):
        return str(x)
    # 12 significant digits hide binary rounding noise (0.1 + 0.2 -> 0.3) and print 8 / 2 as 4
    return f"{x:.12g}"


# -- dispatch ----------------------------------------------------------------------------------------


def handle_tool_call(text: str, memory=None, timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """Run one tool call's text: ``bio: ...`` saves a memory, anything else is arithmetic.

    ``memory`` is a :class:`scalelab.serve.memory.MemoryStore` (or anything with ``add(text)``);
    without one, the bio tool is refused rather than silently dropped.
    """
    stripped = text.strip()
    head, sep, rest = stripped.partition(":")
    name = head.strip().lower() if sep else ""
    if name == "bio":
        if memory is None:
            raise ToolError("bio: memory is not enabled in this session")
        try:
            memory_id = memory.add(rest.strip())
        except ToolError:
            raise
        except ScalelabError as e:  # empty text, store full: the model should hear why
            raise ToolError(f"bio: {e}") from None
        return f"saved memory #{memory_id}"
    if name in ("calc", "calculator", "python"):
        return evaluate_expression(rest, timeout_s)
    return evaluate_expression(stripped, timeout_s)


# -- the tool-call loop ------------------------------------------------------------------------------


@dataclass
class ToolCall:
    request: str
    output: str
    ok: bool


@dataclass
class ToolRun:
    tokens: list[int]  # every new token: the model's, and the tool outputs we inserted
    calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "stop"  # stop | length | tool_limit


GenerateFn = Callable[[list[int], object], list[int]]


def _encode_lenient(tokenizer, text: str) -> list[int]:
    # A character tokenizer refuses characters outside its alphabet; a tool result must never
    # crash the conversation, so drop what cannot be encoded.
    try:
        return tokenizer.encode(text)
    except ScalelabError:
        ids: list[int] = []
        for ch in text:
            try:
                ids.extend(tokenizer.encode(ch))
            except ScalelabError:
                pass
        return ids


def run_with_tools(
    generate_fn: GenerateFn,
    prompt_tokens: list[int],
    tokenizer,
    params,
    max_tool_calls: int = 4,
    handler: Callable[[str], str] | None = None,
    max_context: int | None = None,
) -> ToolRun:
    """Generate, run each tool call the model makes, feed the result back, and go on.

    ``generate_fn(tokens, params)`` returns the new tokens after ``tokens``. It is given
    ``params`` with ``<|tool_call_end|>`` added to ``stop_token_ids``; it must return that
    token as the last one when it stopped on it (other stop tokens may be left out, as
    :func:`scalelab.infer.sample.generate` does). ``params.max_new_tokens`` is the budget for
    the whole run, tool outputs included (the last tool output is kept whole, so a run can end
    that many tokens over). Failed calls are fed back as ``error: ...`` so the
    model can see them; after ``max_tool_calls`` calls the run ends with ``tool_limit``.
    """
    handler = handler or handle_tool_call
    call_end = tokenizer.token_id(TOOL_CALL_END)
    base_stops = tuple(t for t in getattr(params, "stop_token_ids", ()) if t != call_end)
    budget = params.max_new_tokens
    context = list(prompt_tokens)
    run = ToolRun(tokens=[])
    while True:
        room = budget - len(run.tokens)
        if max_context is not None:
            room = min(room, max_context - len(context))
        if room <= 0:
            run.finish_reason = "length"
            return run
        step_params = replace(params, max_new_tokens=room, stop_token_ids=base_stops + (call_end,))
        new = list(generate_fn(context, step_params))[:room]
        if call_end in new:
            new = new[: new.index(call_end) + 1]
        run.tokens.extend(new)
        context.extend(new)
        if not new or new[-1] != call_end:
            run.finish_reason = "length" if len(new) >= room else "stop"
            return run
        request = tool_call_request(context, len(new), tokenizer)
        if len(run.calls) >= max_tool_calls:
            run.finish_reason = "tool_limit"
            return run
        call = call_tool(handler, request)
        run.calls.append(call)
        feedback = tool_output_tokens(tokenizer, call.output)
        run.tokens.extend(feedback)
        context.extend(feedback)


def tool_call_request(context: list[int], new_tokens: int, tokenizer) -> str:
    """The text of the call that ``context`` ends with (its last token is ``<|tool_call_end|>``).

    The call is what follows the last ``<|tool_call_start|>``, which may end the prompt, to force
    a call; a start that belongs to an earlier, answered call does not count, and then the call is
    the last ``new_tokens`` tokens (what the model just wrote).
    """
    call_start = tokenizer.token_id(TOOL_CALL_START)
    out_end = tokenizer.token_id(TOOL_OUTPUT_END)
    last_start = _last_index(context[:-1], call_start)
    if last_start > _last_index(context[:-1], out_end):
        body = context[last_start + 1 : -1]
    else:
        body = context[len(context) - new_tokens : -1]
    return tokenizer.decode(body, skip_special=True)


def tool_output_tokens(tokenizer, output: str) -> list[int]:
    """``<|tool_output_start|>OUTPUT<|tool_output_end|>``: what is fed back after a call."""
    return ([tokenizer.token_id(TOOL_OUTPUT_START)] + _encode_lenient(tokenizer, output)
            + [tokenizer.token_id(TOOL_OUTPUT_END)])


def call_tool(handler: Callable[[str], str], request: str) -> ToolCall:
    """Run one call; a refusal becomes ``error: <reason>`` so the model can read what went wrong."""
    try:
        return ToolCall(request=request, output=handler(request), ok=True)
    except ScalelabError as e:  # ToolError, or any refusal a custom handler raises
        return ToolCall(request=request, output=f"error: {e}", ok=False)


def _last_index(seq: list[int], value: int) -> int:
    for i in range(len(seq) - 1, -1, -1):
        if seq[i] == value:
            return i
    return -1


def sampler_generate_fn(model, tokenizer) -> GenerateFn:
    """A ``generate_fn`` over :func:`scalelab.infer.sample.generate` (one sequence).

    ``generate`` drops the stop token it stopped on, so ``<|tool_call_end|>`` is watched as a
    stop *string* instead (kept in the output). The special id decodes to its own name, so
    plain text spelling that name also stops; the loop then finds no end id and ends the run.
    """
    call_end = tokenizer.token_id(TOOL_CALL_END)

    def fn(tokens: list[int], params) -> list[int]:
        call_end_free = replace(
            params,
            stop_token_ids=tuple(t for t in params.stop_token_ids if t != call_end),
            stop_strings=tuple(params.stop_strings) + (TOOL_CALL_END,),
        )
        return generate(model, tokens, call_end_free, num_samples=1, decode=tokenizer.decode)[0]

    return fn


def engine_generate_fn(engine) -> GenerateFn:
    """A ``generate_fn`` over the batched :class:`scalelab.infer.engine.Engine` (one sample).

    Like :func:`sampler_generate_fn`, ``<|tool_call_end|>`` is watched as a stop string, which
    the engine keeps in a completion's tokens. ``params`` should be the engine's
    ``GenerationParams``; a plain SamplingParams is converted.
    """
    call_end = engine.tokenizer.token_id(TOOL_CALL_END)

    def fn(tokens: list[int], params) -> list[int]:
        if not isinstance(params, GenerationParams):
            params = GenerationParams(**params.__dict__)
        params = replace(
            params,
            n=1,
            stop_token_ids=tuple(t for t in params.stop_token_ids if t != call_end),
            stop_strings=tuple(params.stop_strings) + (TOOL_CALL_END,),
        )
        return engine.generate([tokens], params)[0].tokens

    return fn
