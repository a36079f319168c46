import csv
import json
import math
from types import SimpleNamespace

import pytest
import torch

from scalelab.errors import ScalelabError
from scalelab.evals import metrics as M
from scalelab.experiments import emergence as em
from scalelab.model.gpt import GPT, GPTConfig
from scalelab.tokenizer import ByteTokenizer


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=ByteTokenizer().vocab_size, block_size=64, depth=1, aspect_ratio=32, head_dim=16))
    # Zero-init residual outputs make a fresh model nearly uniform; random weights make the test bite.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def ex(prompt, answer):
    return SimpleNamespace(prompt=prompt, answer=answer)


def test_digit_credit():
    assert M.digit_credit("1244", "1234") == 0.75
    assert M.digit_credit("1234", "1234") == 1.0
    assert M.digit_credit("234", "1234") == 0.75  # right-aligned, missing leading digit
    assert M.digit_credit("11234", "1234") == 0.8  # an extra digit costs credit
    assert M.digit_credit("no idea", "42") == 0.0
    assert M.digit_credit(" 42\nQuestion: 7", "42") == 1.0
    assert math.isnan(M.digit_credit("Paris", "Paris"))


def test_edit_distance():
    assert M.levenshtein("kitten", "sitting") == 3
    assert M.levenshtein([1, 2, 3], [1, 3]) == 1
    assert M.normalized_edit_distance(" 1244\nmore", "1234") == 0.25
    assert M.normalized_edit_distance("", "12") == 1.0
    assert M.normalized_edit_distance("a very long wrong output", "12") == 1.0  # capped


def test_brier_known_distribution():
    p = torch.tensor([0.5, 0.3, 0.2])
    assert M.brier_score(p, 0) == pytest.approx(0.25 + 0.09 + 0.04)
    assert M.brier_score(p, 2) == pytest.approx(0.25 + 0.09 + 0.64)
    assert M.brier_score(torch.tensor([0.0, 1.0]), 1) == pytest.approx(0.0)


def test_logprob_matches_hand_computation():
    tok, model = ByteTokenizer(), tiny_gpt()
    examples = [ex("12+34=", "46"), ex("Question: Where?\nAnswer:", "Port Alder")]
    got = em.answer_logprobs(model, tok, examples, batch_size=2)  # batched, padded
    for e, g in zip(examples, got):
        p = [tok.bos_id] + tok.encode(e.prompt)
        t = tok.encode(" " + e.answer)
        with torch.no_grad():
            logits = model(torch.tensor([p + t]))[0].double()
        lsm = logits - torch.logsumexp(logits, -1, keepdim=True)
        want = [lsm[len(p) - 1 + k, t[k]].item() for k in range(len(t))]
        assert g["token_logprobs"] == pytest.approx(want, abs=1e-5)
        probs = lsm[len(p) - 1].exp()
        assert g["brier"] == pytest.approx(M.brier_score(probs, t[0]), abs=1e-5)


def test_score_examples_on_tiny_model():
    tok, model = ByteTokenizer(), tiny_gpt()
    examples = [ex("12+34=", "46"), ex("7*8=", "56"), ex("Question: Where?\nAnswer:", "Port Alder")]
    s = em.score_examples(model, tok, examples, max_new_tokens=4)
    assert set(em.METRICS) <= set(s)
    assert 0.0 <= s["exact_match"] <= 1.0
    assert s["logprob_per_token"] < 0 and 0 < s["answer_prob"] < 1
    assert 0.0 <= s["edit_distance"] <= 1.0 and 0.0 <= s["digit_credit"] <= 1.0
    assert 0.0 <= s["brier"] <= 2.0
    with pytest.raises(ScalelabError):
        em.score_examples(model, tok, [])


def test_missing_or_empty_sweep(tmp_path):
    with pytest.raises(ScalelabError, match="not found"):
        em.run_emergence(tmp_path / "nope")
    with pytest.raises(ScalelabError, match="no finished run"):
        em.evaluate_sweep(tmp_path)
    with pytest.raises(ScalelabError, match="unknown emergence task"):
        em._resolve_tasks(["poetry"])


def test_summary_verdict_follows_the_data():
    def rows(ems, lps):
        return [{"name": f"r{i}", "N": 1, "D": i, "C": 10.0 ** i, "task": "t", "exact_match": e,
                 "logprob_per_token": l, "answer_prob": math.exp(l), "edit_distance": 1 - e,
                 "digit_credit": e, "brier": 1 - e} for i, (e, l) in enumerate(zip(ems, lps))]

    mirage = em.summarize_emergence(rows([0, 0, 0, 0.9], [-3, -2, -1, 0]))
    assert "Exact match jumps" in mirage and "mirage" in mirage
    real = em.summarize_emergence(rows([0, 0, 0, 0.9], [-3, -3, -3, 0]))
    assert "Exact match jumps" in real and "model itself changes" in real
    flat = em.summarize_emergence(rows([0, 0, 0.01, 0.01], [-3, -2, -1, 0]))
    assert "flat" in flat
    smooth = em.summarize_emergence(rows([0, 0.3, 0.6, 0.9], [-3, -2, -1, 0]))
    assert "gradually" in smooth


def test_fake_sweep_end_to_end(tmp_path):
    from scalelab.config import load_config, to_toml
    from scalelab.checkpoint import save_checkpoint

    tok, model = ByteTokenizer(), tiny_gpt()
    sweep = tmp_path / "sweep"
    tok.save(sweep / "shared" / "tokenizer")
    run = sweep / "runs" / "d1_t100"
    cfg = load_config(None, ["data.world.n_people=24"])
    run.mkdir(parents=True)
    (run / "config.toml").write_text(to_toml(cfg))
    save_checkpoint(run / "checkpoints", model, torch.optim.SGD(model.parameters(), lr=0.1), 1, {})
    with open(sweep / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "N", "D", "C", "loss"])
        w.writerow(["d1_t100", 1000, 100, 6e5, 3.5])
        w.writerow(["d9_t9", 1000, 100, 6e6, 3.5])  # listed but without a checkpoint: skipped
    out = em.run_emergence(sweep, tmp_path / "report", n=3, seed=0, max_new_tokens=4)
    rows = out["rows"]
    assert {r["task"] for r in rows} == {"addition_2d", "addition_3d", "multiplication_2d", "world_qa"}
    assert all(r["name"] == "d1_t100" and r["n"] == 3 for r in rows)
    saved = json.loads((sweep / "emergence.json").read_text())
    assert len(saved) == 4 and saved[0]["C"] == 6e5
    world = next(r for r in saved if r["task"] == "world_qa")
    assert world["digit_credit"] is None  # names have no digits
    assert (tmp_path / "report" / "emergence.png").stat().st_size > 0
    assert "### world_qa" in out["summary"]
