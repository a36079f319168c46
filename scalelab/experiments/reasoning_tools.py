"""Tool use for the reasoning study: SFT on calculator-call traces, then accuracy with and without the tool.

A trace is the assistant turn::

    <|tool_call_start|>37 * 48<|tool_call_end|><|tool_output_start|>1776<|tool_output_end|>
    Answer: 1776

The model learns to write the call (the hard step) and to copy the result into its answer; the
tool output's tokens carry no loss, since at inference the calculator (scalelab.infer.tools,
driven by ``run_with_tools``) writes them. "Without the tool" runs the same model with a handler
that refuses every call, so the model reads ``error: ...`` where the result should be.
"""

from __future__ import annotations

import re

from scalelab.errors import ScalelabError
from scalelab.evals.plots import label_fraction_axes, plt, save_figure
from scalelab.infer.chat import chat_stop_ids
from scalelab.infer.engine import Engine, GenerationParams
from scalelab.infer.tools import (
    TOOL_CALL_END,
    TOOL_CALL_START,
    TOOL_OUTPUT_END,
    TOOL_OUTPUT_START,
    ToolError,
    engine_generate_fn,
    evaluate_expression,
    run_with_tools,
)
from scalelab.tasks.answer_format import verify

# The arithmetic inside a prompt such as "What is 12 + 7 * 3?": digits, operators, parentheses, spaces.
_EXPRESSION = re.compile(r"[\d(][\d\s+\-*/()]*[\d)]")


def problem_expression(problem) -> str | None:
    """The calculator call for an arithmetic problem: the longest arithmetic span of its prompt that
    holds an operator and evaluates to the problem's answer; None when there is none."""
    spans = sorted((m.group().strip() for m in _EXPRESSION.finditer(problem.prompt)), key=len, reverse=True)
    for expr in spans:
        if not any(op in expr for op in "+-*/"):
            continue
        try:
            if evaluate_expression(expr) == problem.answer.strip():
                return expr
        except ToolError:
            continue
    return None


def tool_row(tokenizer, prompt_ids: list[int], expr: str, answer: str) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of one trace: the call and the answer are trained, the tool output is not."""
    tid = tokenizer.token_id
    call = [tid(TOOL_CALL_START)] + tokenizer.encode(expr) + [tid(TOOL_CALL_END)]
    output = [tid(TOOL_OUTPUT_START)] + tokenizer.encode(evaluate_expression(expr)) + [tid(TOOL_OUTPUT_END)]
    tail = tokenizer.encode(f"\nAnswer: {answer}") + [tid("<|assistant_end|>")]
    ids = prompt_ids + call + output + tail
    mask = [0] * len(prompt_ids) + [1] * len(call) + [0] * len(output) + [1] * len(tail)
    return ids, mask


def tool_rows(tokenizer, problems: list, prompt_fn) -> tuple[list[tuple[list[int], list[int]]], int]:
    """Trace rows for every problem whose prompt holds a computable expression; also how many had none."""
    rows, skipped = [], 0
    for p in problems:
        expr = problem_expression(p)
        if expr is None:
            skipped += 1
            continue
        rows.append(tool_row(tokenizer, prompt_fn(p), expr, p.answer))
    return rows, skipped


def _refuse(_request: str) -> str:
    raise ToolError("calculator: not available")


def tool_replies(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, with_tool: bool) -> list[dict]:
    """Greedy replies through ``run_with_tools``, one prompt at a time (the loop is per sequence):
    [{"text", "calls"}], the text with its tool markers and outputs."""
    engine = Engine(model, tokenizer, max_batch=1)
    generate_fn = engine_generate_fn(engine)
    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=chat_stop_ids(tokenizer))
    out = []
    for p in prompts:
        run = run_with_tools(generate_fn, p, tokenizer, params, max_tool_calls=2, handler=None if with_tool else _refuse,
                             max_context=model.config.block_size)
        out.append({"text": tokenizer.decode(run.tokens), "calls": len(run.calls)})
    return out


def tool_accuracy(model, tokenizer, problems: list, prompts: list[list[int]], max_new_tokens: int,
                  with_tool: bool) -> dict:
    """Accuracy, share of replies that called the tool, and a few examples."""
    if not problems:
        raise ScalelabError("no problems to evaluate tool use on")
    replies = tool_replies(model, tokenizer, prompts, max_new_tokens, with_tool)
    correct = [verify(p, r["text"])["correct"] for p, r in zip(problems, replies)]
    return {"accuracy": sum(correct) / len(correct), "called": sum(r["calls"] > 0 for r in replies) / len(replies),
            "n": len(correct), "examples": [{"prompt": p.prompt, "reply": r["text"], "correct": c}
                                            for p, r, c in list(zip(problems, replies, correct))[:3]]}


def plot_tools(tools: dict, task_names: list[str], path) -> None:
    """Accuracy against difficulty with and without the calculator, one panel per arithmetic task."""
    fig, axes = plt.subplots(1, len(task_names), figsize=(3.4 * len(task_names), 3.4), squeeze=False)
    lines = (("answer_only", "SFT answer only", "s:"), ("cot", "SFT chain of thought", "^--"),
             ("tool_disabled", "tool SFT, calculator refused", "x-."), ("tool", "tool SFT + calculator", "o-"))
    for ax, name in zip(axes[0], task_names):
        ds = list(tools[name])
        for key, label, style in lines:
            ax.plot([int(d) for d in ds], [tools[name][d][key] for d in ds], style, label=label)
        ax.xaxis.get_major_locator().set_params(integer=True)
        label_fraction_axes(ax, name, "difficulty", "accuracy (greedy)", legend_size=6)
    save_figure(fig, path, "Arithmetic with and without the calculator tool")
