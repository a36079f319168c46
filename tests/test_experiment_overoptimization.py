"""``scalelab experiments reward-overopt``: the gold scorer, the best-of-n estimator and KL, the headline rule on
hand-made curves, bad settings, and a tiny end-to-end run (SFT, two proxies per seed, best-of-n, PPO)."""

import json
from math import log

import pytest

from posttrain_util import make_init_run, one_thread  # noqa: F401 (fixture)
from scalelab.cli import main
from scalelab.errors import ScalelabError
from scalelab.experiments import overoptimization as overopt
from scalelab.experiments.overoptimization import (
    RewardOveroptConfig, best_of_n, check, gold_f1, kl_best_of_n, peak_then_fall,
)


def test_gold_f1_is_word_overlap_with_the_answer():
    assert gold_f1(" Paris. ", "paris") == 1.0
    assert gold_f1("The answer is Paris.", "Paris") == pytest.approx(2 * 0.25 / 1.25)
    assert gold_f1("Ada Lovelace", "Ada Byron Lovelace") == pytest.approx(0.8)
    assert gold_f1("-12", "12") == 0.0  # the sign is part of a number
    assert gold_f1("1985-03-02", "1985-03-07") == pytest.approx(2 / 3)
    assert gold_f1("", "Paris") == 0.0
    with pytest.raises(ScalelabError):
        gold_f1("x", " ?! ")


def test_best_of_n_kl_and_estimator():
    assert kl_best_of_n(1) == 0.0
    assert kl_best_of_n(2) == pytest.approx(log(2) - 0.5)
    assert kl_best_of_n(64) == pytest.approx(log(64) - 63 / 64)
    proxy, values = [0.1, 0.3, 0.2], [1.0, 2.0, 4.0]
    assert best_of_n(proxy, values, 1) == pytest.approx(7 / 3)  # n = 1: the plain mean
    assert best_of_n(proxy, values, 3) == 2.0  # n = N: the proxy's favourite
    # n = 2: subsets {0,1}, {0,2}, {1,2} are won by 1, 2, 1
    assert best_of_n(proxy, values, 2) == pytest.approx((2.0 + 4.0 + 2.0) / 3)
    with pytest.raises(ScalelabError):
        best_of_n(proxy, values, 4)
    with pytest.raises(ScalelabError):
        kl_best_of_n(0)


def test_headline_rule_needs_a_rise_a_clear_fall_and_a_rising_proxy():
    proxy = [[0, 1, 2, 3], [0, 1.1, 2.2, 3.1], [0, 0.9, 1.9, 2.8]]
    peaked = [[0.2, 0.4, 0.3, 0.1], [0.21, 0.41, 0.3, 0.12], [0.19, 0.39, 0.31, 0.11]]
    r = peak_then_fall(peaked, proxy)
    assert r["holds"] and r["peak_point"] == 1 and r["fall"] == pytest.approx(0.4 - 0.11)
    assert not peak_then_fall([[0.4, 0.3, 0.2, 0.1]] * 3, proxy)["rose"]  # falls from the start: no peak
    noisy = [[0.2, 0.4, 0.3, 0.1], [0.2, 0.4, 0.3, 0.5], [0.2, 0.4, 0.3, 0.3]]
    assert not peak_then_fall(noisy, proxy)["fell"]  # the last point is within 2 std of the peak
    flat_proxy = [[0, 3, 2, 1]] * 3
    r = peak_then_fall(peaked, flat_proxy)
    assert r["rose"] and r["fell"] and not r["proxy_rising"] and not r["holds"]
    with pytest.raises(ScalelabError):
        peak_then_fall([[0.1, 0.2]], [[0.1]])


def test_bad_settings_are_refused():
    for bad, match in ((dict(seeds=[]), "seeds"), (dict(seeds=[1, 1]), "seeds"), (dict(kl_coefs=[-1.0]), "kl_coefs"),
                       (dict(bon_samples=48), "bon_samples"), (dict(eval_every=0), "eval_every"),
                       (dict(length_bias=-0.1), "length_bias")):
        with pytest.raises(ScalelabError, match=match):
            check(RewardOveroptConfig(**bad))


def _letters(reply: str, answer: str) -> float:
    # An untrained byte-level model never says an answer's word, so every gold F1 would tie at 0 and no pair
    # could be labelled; the wiring test scores replies by their share of letters instead.
    return sum(c.isalpha() for c in reply) / max(1, len(reply))


def test_tiny_reward_overopt_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(overopt, "gold_f1", _letters)
    base = make_init_run(tmp_path / "base", block_size=256)
    out = tmp_path / "ro"
    cfg = tmp_path / "ro.toml"
    cfg.write_text(f'[run]\nprogress = false\n[reward_overopt]\nout_dir = "{out}"\nbase = "{base}"\n'
                   "seeds = [0, 1]\nbon_prompts = 2\nbon_samples = 4\nkl_coefs = [0.0, 0.5]\neval_every = 1\neval_samples = 2\n"
                   "[sft]\nn_examples = 40\nsteps = 2\nbatch_size = 4\neval_every = 2\n"
                   "[rm]\nn_pairs = 10\nsteps = 2\nbatch_size = 4\neval_every = 2\nval_fraction = 0.2\n"
                   "[ppo]\niterations = 2\nrollout_batch = 2\nminibatch_size = 2\nmax_new_tokens = 6\n"
                   "[ppo.optim]\nlr = 3e-5\n")
    assert main(["experiments", "reward-overopt", "-c", str(cfg)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert [s["seed"] for s in result["seeds"]] == [0, 1]
    for s in result["seeds"]:
        assert set(s["rl"]) == {"gold_labels/kl0", "gold_labels/kl0.5", "length_biased/kl0"}
        for run in s["rl"].values():
            assert [h["iteration"] for h in run["train"]] == [1, 2]
            assert run["train"][0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the first rollout's policy is the reference
            assert [e["iteration"] for e in run["eval"]] == [0, 1, 2]
            assert run["eval"][0]["kl"] == pytest.approx(0.0, abs=1e-4)  # evaluated before any update
            assert all(h["length"] <= 7 for h in run["train"] + run["eval"])  # 6 new tokens and the end marker
        for name, rows in s["bon"].items():
            assert [r["n"] for r in rows] == [1, 2, 4]
            assert rows[0]["proxy"] == pytest.approx(0.0, abs=1e-6)  # n = 1: the SFT samples, the proxy's zero
            assert all(b["proxy"] >= a["proxy"] - 1e-9 for a, b in zip(rows, rows[1:]))  # best-of-n: proxy grows
        assert (out / "seed{}".format(s["seed"]) / "pairs_length_biased.jsonl").read_text().count("\n") == 10
    agg = result["aggregate"]
    assert set(agg["rl"]) == {"gold_labels/kl0", "gold_labels/kl0.5", "length_biased/kl0"}
    assert all(isinstance(a["rule"]["holds"], bool) for kind in ("bon", "rl") for a in agg[kind].values())
    assert (out / "reward_overopt.png").stat().st_size > 0 and "Headline rule" in (out / "results.md").read_text()
    (out / "results.json").unlink()  # an interrupted run: the finished seeds are reused, not recomputed
    capsys.readouterr()
    assert main(["experiments", "reward-overopt", "-c", str(cfg), "--set", "reward_overopt.seeds=[1]"]) == 0
    assert "seed 1: reusing" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["seeds"] == result["seeds"][1:]
    assert main(["experiments", "reward-overopt", "-c", str(cfg)]) == 2  # finished results are not replaced unasked
    assert "--overwrite" in capsys.readouterr().err
    code = main(["experiments", "reward-overopt", "-c", str(cfg), "--set", "reward_overopt.bon_samples=3"])
    err = capsys.readouterr().err
    assert code == 2 and "bon_samples" in err and len(err.strip().splitlines()) == 1
