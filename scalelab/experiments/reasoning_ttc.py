"""Test-time compute for the reasoning study: a thinking-token budget, majority vote, verifier best-of-N.

- Budget: the model thinks for at most ``B`` tokens; its thinking is cut there (or where it wrote
  the answer marker itself, if sooner), the forced-answer suffix "\\nAnswer:" is appended and the
  model finishes the answer greedily. ``B = 0`` answers straight away.
- Samples: ``S`` replies per problem at a temperature. For each ``N`` the ``S`` samples are cut
  into ``S // N`` disjoint blocks of ``N`` and the block scores are averaged (lower variance than
  one prefix, and no sample is reused within one ``N``). A block is scored two ways:
  majority vote over the parsed answers (malformed samples ignored), and best-of-N picked by the
  verifier (the first sample the verifier accepts; a block is right if any sample is).
"""

from __future__ import annotations

from collections import Counter

from scalelab.errors import ScalelabError
from scalelab.evals.plots import label_fraction_axes, plt, save_figure
from scalelab.infer.chat import chat_stop_ids
from scalelab.infer.engine import Engine, GenerationParams
from scalelab.tasks.answer_format import ANSWER_MARKER, force_answer_suffix, verify

# -- pure scoring -----------------------------------------------------------------------------------------------


def majority_vote(answers: list[str | None]) -> str | None:
    """The most frequent parsed answer; malformed samples (None) do not vote.

    Ties go to the answer whose first vote came earliest in sample order, so the result depends
    only on the list, never on hashing. None when no sample has an answer.
    """
    votes = [a.strip() for a in answers if a is not None and a.strip()]
    if not votes:
        return None
    counts = Counter(votes)
    first = {}
    for i, a in enumerate(votes):
        first.setdefault(a, i)
    return min(counts, key=lambda a: (-counts[a], first[a]))


def best_of_n(verdicts: list[bool]) -> int | None:
    """The index of the first sample the verifier accepts, or None when it accepts none."""
    for i, ok in enumerate(verdicts):
        if ok:
            return i
    return None


def block_scores(samples: list[dict], n: int) -> tuple[float, float]:
    """(majority-vote accuracy, verifier best-of-N accuracy) of one problem's samples at ``N = n``.

    Each sample is {"answer": parsed answer or None, "correct": bool}. Correctness is a function
    of the parsed answer, so the voted answer is right when a sample giving it was right.
    """
    if n < 1 or n > len(samples):
        raise ScalelabError(f"N = {n} needs between 1 and {len(samples)} samples per problem")
    right = {s["answer"].strip() for s in samples if s["correct"] and s["answer"] is not None}
    blocks = [samples[i : i + n] for i in range(0, len(samples) - n + 1, n)]
    vote = sum(majority_vote([s["answer"] for s in b]) in right for b in blocks) / len(blocks)
    best = sum(best_of_n([s["correct"] for s in b]) is not None for b in blocks) / len(blocks)
    return vote, best


def sample_curves(per_problem: list[list[dict]], counts: list[int]) -> dict:
    """Mean majority-vote and best-of-N accuracy over problems, one value per N in ``counts``."""
    if not per_problem:
        raise ScalelabError("no problems to score")
    out = {"n": list(counts), "majority": [], "best_of_n": []}
    for n in counts:
        scores = [block_scores(s, n) for s in per_problem]
        out["majority"].append(sum(v for v, _ in scores) / len(scores))
        out["best_of_n"].append(sum(b for _, b in scores) / len(scores))
    return out


def cut_thinking(tokenizer, generated: list[int], budget: int) -> list[int]:
    """The thinking the model wrote within ``budget`` tokens: the first ``budget`` generated tokens,
    cut before an answer marker the model wrote itself, special tokens and trailing newlines dropped
    (the forced suffix brings its own). Token ids, not text: a byte model's half of a UTF-8
    character would come back from text as more tokens than it wrote."""
    if budget < 0:
        raise ScalelabError(f"thinking budget must be >= 0, got {budget}")
    special = set(tokenizer.special_ids.values())
    ids = [t for t in generated[:budget] if t not in special]
    marker = tokenizer.encode(ANSWER_MARKER)
    for i in range(len(ids) - len(marker) + 1):
        if ids[i : i + len(marker)] == marker:
            ids = ids[:i]
            break
    newline = tokenizer.encode("\n")
    while newline and ids[-len(newline):] == newline:
        ids = ids[: -len(newline)]
    return ids


# -- driving a model --------------------------------------------------------------------------------------------


def _engine(model, tokenizer, rows: int):
    return Engine(model, tokenizer, max_batch=max(1, min(64, rows)))


def budget_replies(model, tokenizer, prompts: list[list[int]], budget: int, answer_tokens: int) -> list[dict]:
    """Replies whose thinking is cut at ``budget`` tokens, then forced to answer greedily.

    Each reply is {"text": thinking + "\\nAnswer:" + the model's answer, "thinking": str, "thinking_tokens": int}.
    """
    stops = chat_stop_ids(tokenizer)
    thinking: list[list[int]] = [[] for _ in prompts]
    if budget > 0:
        params = GenerationParams(max_new_tokens=budget, temperature=0.0, stop_token_ids=stops,
                                  stop_strings=(ANSWER_MARKER,))
        outs = _engine(model, tokenizer, len(prompts)).generate(prompts, params)
        thinking = [cut_thinking(tokenizer, o.tokens, budget) for o in outs]
    suffix = force_answer_suffix()
    forced = [p + t + tokenizer.encode(suffix) for p, t in zip(prompts, thinking)]
    params = GenerationParams(max_new_tokens=answer_tokens, temperature=0.0, stop_token_ids=stops, stop_strings=("\n",))
    answers = _engine(model, tokenizer, len(prompts)).generate(forced, params)
    return [{"text": tokenizer.decode(t) + suffix + a.text, "thinking": tokenizer.decode(t), "thinking_tokens": len(t)}
            for t, a in zip(thinking, answers)]


def budget_curve(model, tokenizer, problems: list, prompts: list[list[int]], budgets: list[int],
                 answer_tokens: int) -> dict:
    """Accuracy and mean thinking tokens used at each budget."""
    acc, used = [], []
    for b in budgets:
        replies = budget_replies(model, tokenizer, prompts, b, answer_tokens)
        acc.append(sum(verify(p, r["text"])["correct"] for p, r in zip(problems, replies)) / len(problems))
        used.append(sum(r["thinking_tokens"] for r in replies) / len(replies))
    return {"budget": list(budgets), "accuracy": acc, "thinking_tokens": used}


def sampled_answers(model, tokenizer, problems: list, prompts: list[list[int]], samples: int, temperature: float,
                    max_new_tokens: int, seed: int) -> list[list[dict]]:
    """``samples`` sampled replies per problem, each verified: [{"answer", "correct", "formatted"}]."""
    engine = _engine(model, tokenizer, len(prompts) * samples)
    reqs = [engine.submit(p, GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=0,
                                              top_p=1.0, seed=seed * 100_003 + i, n=samples,
                                              stop_token_ids=chat_stop_ids(tokenizer)), prompt_index=i)
            for i, p in enumerate(prompts)]
    while not all(r.done for r in reqs):
        engine.step()
    out = []
    for prob, req in zip(problems, reqs):
        out.append([{k: v for k, v in verify(prob, c.text).items()} for c in req.wait()])
    return out


def plot_ttc(ttc: dict, budget_path, samples_path) -> None:
    """Two figures: accuracy against thinking budget (one line per task); majority vote vs verifier
    best-of-N against the number of samples (one panel per task)."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, t in ttc.items():
        ax.plot(t["budget"]["budget"], t["budget"]["accuracy"], "o-", label=name)
    ax.set_xscale("symlog", linthresh=8)
    label_fraction_axes(ax, "", "thinking budget (tokens), then forced \"Answer:\"", "accuracy (greedy)", legend_size=8)
    save_figure(fig, budget_path, "Accuracy against thinking-token budget")
    fig, axes = plt.subplots(1, len(ttc), figsize=(3.4 * len(ttc), 3.4), squeeze=False)
    for ax, (name, t) in zip(axes[0], ttc.items()):
        s = t["samples"]
        ax.plot(s["n"], s["majority"], "s--", label="majority vote")
        ax.plot(s["n"], s["best_of_n"], "o-", label="best-of-N by verifier")
        ax.set_xscale("log", base=2)
        label_fraction_axes(ax, name, "samples N", "accuracy")
    save_figure(fig, samples_path, "Accuracy against number of samples")
