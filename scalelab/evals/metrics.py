"""Per-example and aggregate metrics of the evaluation harness.

The continuous metrics (edit distance, digit credit, Brier) are also the emergence study's
(scalelab/experiments/emergence.py), so there is one definition of each. ROUGE-L comes from ``rouge_score`` and
BLEU from ``sacrebleu``, the reference implementations the literature reports.
"""

from __future__ import annotations

import math
import re

import torch
from rouge_score import rouge_scorer

from scalelab.errors import ScalelabError
from scalelab.evals.tasks import normalize_answer

__all__ = [
    "brier_score", "digit_credit", "levenshtein", "normalized_edit_distance", "normalize_answer", "exact_match",
    "choice_index", "bits_per_byte", "bits_vs_baseline", "rouge_l", "bleu", "sentence_bleu", "win_rate", "nanmean",
]


_NUMBER = re.compile(r"-?\d+")


# -- per-example metrics ------------------------------------------------------------------------------


def levenshtein(a, b) -> int:
    """Edit distance (insert, delete, substitute; each costs 1) between two sequences."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def normalized_edit_distance(output: str, answer: str) -> float:
    output, answer = normalize_answer(output), normalize_answer(answer)
    return min(1.0, levenshtein(output, answer) / max(1, len(answer)))


def digit_credit(output: str, answer: str) -> float:
    """Right-aligned per-digit credit; NaN when the answer is not an integer."""
    answer = normalize_answer(answer)
    if not _NUMBER.fullmatch(answer):
        return float("nan")
    # The model's number is the first integer it writes; anything after it is ignored.
    m = _NUMBER.search(normalize_answer(output))
    if m is None:
        return 0.0
    got = m.group()
    if got.startswith("-") != answer.startswith("-"):
        return 0.0
    got, want = got.lstrip("-"), answer.lstrip("-")
    width = max(len(got), len(want))
    got, want = got.rjust(width), want.rjust(width)
    return sum(g == w for g, w in zip(got, want)) / width


def brier_score(probs: torch.Tensor, target: int) -> float:
    """Multi-class Brier score of one distribution over the vocabulary against one target id."""
    probs = probs.double()
    return float((probs.pow(2).sum() - 2 * probs[target] + 1).item())


# -- teacher-forced likelihood -----------------------------------------------------------------------


def exact_match(output: str, reference: str) -> float:
    """1.0 when the output's first line equals the reference, whitespace runs collapsed and trimmed."""
    return float(normalize_answer(output) == normalize_answer(reference))


def choice_index(logliks: list[float], choices: list[str], normalize: str = "none") -> int:
    """The chosen option: highest total log-likelihood, or (``normalize="bytes"``) highest per UTF-8 byte.

    Raw sums favour short options (each token costs probability); dividing by the option's byte length
    removes that bias and does not depend on the tokenizer, unlike dividing by its token count.
    """
    if len(logliks) != len(choices) or not choices:
        raise ScalelabError("multiple choice needs one log-likelihood per choice and at least one choice")
    if normalize == "none":
        scores = list(logliks)
    elif normalize == "bytes":
        scores = [ll / max(1, len(c.encode("utf-8"))) for ll, c in zip(logliks, choices)]
    else:
        raise ScalelabError(f"unknown choice normalisation {normalize!r} (use none or bytes)")
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def bits_per_byte(token_logprobs: list[float], text: str) -> float:
    """Negative log-likelihood of ``text`` in bits, divided by its UTF-8 byte count (tokenizer-independent)."""
    n_bytes = len(text.encode("utf-8"))
    if n_bytes == 0 or not token_logprobs:
        return float("nan")
    return -sum(token_logprobs) / math.log(2) / n_bytes


def bits_vs_baseline(improvement: float) -> str:
    """``improvement`` = 1 - bpb / baseline bpb, in words: "30.8% fewer bits", or "37.8% more bits" when worse."""
    if improvement < 0:
        return f"{-100 * improvement:.1f}% more bits"
    return f"{100 * improvement:.1f}% fewer bits"


_ROUGE = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of words), via rouge_score, stemming off."""
    global _ROUGE
    if _ROUGE is None:
        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(_ROUGE.score(reference, prediction)["rougeL"].fmeasure)


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (0-100) with sacrebleu's defaults: 13a tokenisation, 4-grams, one reference each."""
    # deferred: sacrebleu is slow to import; only BLEU needs it
    import sacrebleu

    if len(predictions) != len(references):
        raise ScalelabError("BLEU needs one reference per prediction")
    if not predictions:
        return float("nan")
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def sentence_bleu(prediction: str, reference: str) -> float:
    # deferred: sacrebleu is slow to import; only BLEU needs it
    import sacrebleu

    return float(sacrebleu.sentence_bleu(prediction, [reference]).score)


def win_rate(scores: list[float], baseline_scores: list[float]) -> float:
    """Share of items where the candidate's judge score beats the baseline's; a tie counts one half."""
    if len(scores) != len(baseline_scores):
        raise ScalelabError("win rate needs one baseline score per candidate score")
    if not scores:
        return float("nan")
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline_scores)) / len(scores)


def nanmean(values) -> float:
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")
