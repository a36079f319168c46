"""Harness metrics against hand-computed values and the reference libraries' own numbers."""

import json
import math

import pytest
import torch

from scalelab.errors import ScalelabError
from scalelab.evals import metrics as M
from scalelab.cli.evals import print_eval
from scalelab.evals.lm import ScorableLM
from scalelab.experiments import emergence
from scalelab.report import write_report


def test_exact_match_normalises_whitespace_and_first_line():
    assert M.exact_match("  Port   Alder \nmore text", "Port Alder") == 1.0
    assert M.exact_match("Port Alder.", "Port Alder") == 0.0  # punctuation is part of the answer
    assert M.exact_match("port alder", "Port Alder") == 0.0


def test_continuous_metrics_are_emergence_ones():
    assert M.digit_credit is emergence.digit_credit and M.brier_score is emergence.brier_score
    assert M.digit_credit("1244", "1234") == 0.75
    assert M.normalized_edit_distance("kitten", "sitting") == pytest.approx(3 / 7)


class ToyLM(ScorableLM):
    """Characters as tokens; the next-token distribution is a fixed table that ignores the context,
    so every log-likelihood can be computed by hand."""

    def __init__(self, probs: dict[str, float]):
        self.chars = sorted(probs)
        self.bos_id = len(self.chars)
        self.context_length = 64
        p = torch.tensor([probs[c] for c in self.chars] + [1e-12])
        self.logp = p.log()

    def encode(self, text):
        return [self.chars.index(c) for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids if i < len(self.chars))

    def _logits(self, idx):
        return self.logp.expand(idx.shape[0], idx.shape[1], -1).clone()


def test_multiple_choice_raw_vs_length_normalised():
    lm = ToyLM({"a": 0.5, "b": 0.3, "c": 0.2})

    def lls(prompt, choices):
        return [sum(lp) for lp in lm.continuation_logprobs([(prompt, c) for c in choices])]

    got = lls("", ["c", "aa"])
    assert got == pytest.approx([math.log(0.2), 2 * math.log(0.5)], abs=1e-6)
    assert M.choice_index(got, ["c", "aa"]) == 1  # 2 log .5 = -1.386 beats log .2 = -1.609
    # raw: log .3 = -1.204 beats 3 log .5 = -2.079; per byte: -1.204 loses to -0.693
    got = lls("ab", ["b", "aaa"])
    assert got == pytest.approx([math.log(0.3), 3 * math.log(0.5)], abs=1e-6)
    assert M.choice_index(got, ["b", "aaa"]) == 0
    assert M.choice_index(got, ["b", "aaa"], "bytes") == 1
    with pytest.raises(ScalelabError, match="normalisation"):
        M.choice_index(got, ["b", "aaa"], "tokens")


def test_bits_per_byte_by_hand():
    lm = ToyLM({"a": 0.5, "b": 0.25, "c": 0.25})
    lp = lm.continuation_logprobs([("", "abcab")])[0]
    # 1 + 2 + 2 + 1 + 2 bits over 5 bytes
    assert M.bits_per_byte(lp, "abcab") == pytest.approx(8 / 5, abs=1e-6)
    assert math.isnan(M.bits_per_byte([], ""))


def test_long_continuation_is_scored_in_windows():
    lm = ToyLM({"a": 0.5, "b": 0.5})
    lm.context_length = 8
    lp = lm.continuation_logprobs([("", "ab" * 20)])[0]
    assert len(lp) == 40 and sum(lp) == pytest.approx(40 * math.log(0.5), abs=1e-5)


def test_rouge_l_and_bleu_match_hand_and_library_values():
    from rouge_score import rouge_scorer
    import sacrebleu

    # LCS of "the cat sat on the mat" and "the cat is on the mat" is 5 words: P = R = F = 5/6
    assert M.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    ref = rouge_scorer.RougeScorer(["rougeL"]).score("a b c d", "a c d e")["rougeL"].fmeasure
    assert M.rouge_l("a c d e", "a b c d") == pytest.approx(ref) == pytest.approx(0.75)
    assert M.bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    hyp, refs = ["he was born in Port Alder ."], ["he was born in Port Alder today ."]
    assert M.bleu(hyp, refs) == pytest.approx(sacrebleu.corpus_bleu(hyp, [refs]).score)
    # n-gram precisions 7/7, 5/6, 4/5, 3/4 (nothing after "Alder" matches); brevity penalty exp(1 - 8/7)
    by_hand = math.exp(1 - 8 / 7) * (1 * 5 / 6 * 4 / 5 * 3 / 4) ** 0.25 * 100
    assert M.bleu(hyp, refs) == pytest.approx(by_hand, rel=1e-6)


def test_win_rate_counts_ties_as_half():
    assert M.win_rate([1, 0, 0.5, 1], [0.5, 0.5, 0.5, 0]) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    with pytest.raises(ScalelabError):
        M.win_rate([1], [])


def test_bits_vs_baseline_says_more_when_worse():
    assert M.bits_vs_baseline(0.308) == "30.8% fewer bits"
    assert M.bits_vs_baseline(-0.378) == "37.8% more bits"
    assert M.bits_vs_baseline(0.0) == "0.0% fewer bits"


@pytest.mark.parametrize("val_bpb, phrase", [(0.3066, "30.8% fewer bits"), (0.6108, "37.8% more bits")])
def test_pretrain_summary_and_report_read_right_on_both_sides_of_the_baseline(tmp_path, capsys, val_bpb, phrase):
    """A GPT better than the n-gram needs fewer bits; a worse one needs more (never "-37.8% fewer")."""
    ngram_bpb = 0.4432
    ev = {"val_loss": 1.0, "val_bpb": val_bpb, "ngram_order": 4, "ngram_val_loss": 1.3881, "ngram_val_bpb": ngram_bpb,
          "bpb_improvement_over_ngram": 1 - val_bpb / ngram_bpb, "tokenizer_bytes_per_token_val": 4.52}
    print_eval(ev)
    assert f"({phrase} than the baseline)" in capsys.readouterr().out
    (tmp_path / "eval.json").write_text(json.dumps(ev))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"kind": "train", "step": s, "loss": 2.0 / s}) + "\n"
                                                    for s in (1, 2)))
    report = write_report(tmp_path).read_text()
    assert f"The GPT needs {phrase} per byte than the n-gram baseline." in report
    assert "-" not in phrase and report.count("% fewer bits") + report.count("% more bits") == 1
