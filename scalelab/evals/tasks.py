"""Exact-match task evaluation by greedy generation.

A task example is anything with ``prompt`` and ``answer`` strings; the model's
continuation is cut at the first newline (or end-of-text) and compared with
the answer after trimming whitespace.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from scalelab.infer.sample import SamplingParams, generate
from scalelab.model.gpt import GPT


@dataclass
class ExactMatchResult:
    task: str
    accuracy: float
    n: int
    samples: list[dict] = field(default_factory=list)  # a few (prompt, answer, output) for the report


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().split("\n", 1)[0].split())


@torch.no_grad()
def exact_match(model: GPT, tokenizer, examples, task: str, max_new_tokens: int = 16, keep_samples: int = 5) -> ExactMatchResult:
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=(tokenizer.bos_id,))
    correct, samples = 0, []
    for ex in examples:
        prompt_ids = [tokenizer.bos_id] + tokenizer.encode(ex.prompt)
        budget = model.config.block_size - len(prompt_ids)
        if budget <= 0:
            continue
        params.max_new_tokens = min(max_new_tokens, budget)
        out_ids = generate(model, prompt_ids, params)[0]
        output = normalize_answer(tokenizer.decode(out_ids))
        ok = output == normalize_answer(ex.answer)
        correct += ok
        if len(samples) < keep_samples:
            samples.append({"prompt": ex.prompt, "answer": ex.answer, "output": output, "correct": bool(ok)})
    n = len(examples)
    return ExactMatchResult(task=task, accuracy=correct / n if n else float("nan"), n=n, samples=samples)
