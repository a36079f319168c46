"""``scalelab experiments reward-hacking``: the gold scorer, win rates, reward shaping and smoothing on
hand-made inputs, bad settings, and a tiny end-to-end run (SFT, biased RM, DPO, PPO conditions)."""

import json

import pytest

from posttrain_util import make_init_run, one_thread  # noqa: F401 (fixture)
from scalelab.cli import main
from scalelab.errors import ScalelabError
from scalelab.experiments.reward_hacking import (
    RewardHackingConfig, ShapedReward, check, gold_prefers, gold_score, smooth, win_rate,
)


def test_gold_score_exact_wordy_wrong():
    assert gold_score(" paris ", "Paris") == 1.0
    assert gold_score("The answer is Paris. Anything else?", "Paris") == 0.5
    assert gold_score("Rome", "Paris") == 0.0
    with pytest.raises(ScalelabError):
        gold_score("x", "  ")


def test_gold_preference_correct_first_then_shorter():
    assert gold_prefers("Paris", "Rome", "Paris") == 1.0
    assert gold_prefers("Rome", "The answer is Paris.", "Paris") == 0.0  # correctness beats brevity
    assert gold_prefers("Paris", "The answer is Paris.", "Paris") == 1.0
    assert gold_prefers("The answer is Paris.", "Paris", "Paris") == 0.0
    assert gold_prefers("Oslo", "Rome", "Paris") == 0.5  # equally wrong, equally long
    assert gold_prefers("Paris", "paris", "Paris") == 0.5


def test_win_rate_counts_ties_half():
    answers = ["a1", "b2", "c3", "d4"]
    mine = ["a1", "the answer is b2", "zz", "d4"]
    base = ["the answer is a1", "b2", "c3", "d4"]
    assert win_rate(mine, base, answers) == pytest.approx((1 + 0 + 0 + 0.5) / 4)
    assert win_rate(base, base, answers) == 0.5
    with pytest.raises(ScalelabError):
        win_rate(mine, base[:3], answers)


def test_smooth_is_a_trailing_mean():
    assert smooth([1, 2, 3, 4, 5], 2) == [1, 1.5, 2.5, 3.5, 4.5]
    assert smooth([3.0, 1.0], 1) == [3.0, 1.0]
    with pytest.raises(ScalelabError):
        smooth([1.0], 0)


class _FakeRM:
    def score_batch(self, prompts, replies, texts, answers):
        return [float(len(t)) for t in texts]


def test_shaped_reward_subtracts_a_length_penalty_and_records_gold():
    shaped = ShapedReward(_FakeRM(), length_penalty=0.5)
    out = shaped.score_batch([[1], [1]], [[5, 6, 7], [5]], ["Paris!", "Rome"], ["Paris", "Oslo"])
    assert out == [6 - 1.5, 4 - 0.5]
    assert shaped.last == {"rm_score": 5.0, "gold": 0.25, "exact": 0.0}
    assert ShapedReward(_FakeRM(), 0.0).score_batch([[1]], [[5, 6]], ["ab"], ["ab"]) == [2.0]


def test_bad_settings_are_refused():
    with pytest.raises(ScalelabError, match="conditions"):
        check(RewardHackingConfig(conditions=["no_kl", "bogus"]))
    with pytest.raises(ScalelabError, match="eval_prompts"):
        check(RewardHackingConfig(eval_prompts=0))
    with pytest.raises(ScalelabError, match="length_penalty"):
        check(RewardHackingConfig(length_penalty=-1.0))


def test_tiny_reward_hacking_end_to_end(tmp_path, capsys):
    base = make_init_run(tmp_path / "base", block_size=256)
    out = tmp_path / "rh"
    cfg = tmp_path / "rh.toml"
    cfg.write_text(f'[run]\nprogress = false\n[reward_hacking]\nout_dir = "{out}"\nbase = "{base}"\n'
                   "eval_prompts = 4\n"
                   "[sft]\nn_examples = 40\nsteps = 2\nbatch_size = 4\neval_every = 2\n[sft.optim]\nlr = 1e-3\nwarmup_steps = 10\n"
                   "[rm]\nn_pairs = 24\nsteps = 2\nbatch_size = 4\neval_every = 2\n[rm.optim]\nlr = 3e-4\nwarmup_steps = 10\n"
                   "[dpo]\nn_pairs = 24\nsteps = 2\nbatch_size = 4\neval_every = 2\n"
                   "[dpo.optim]\nlr = 1e-4\nwarmup_steps = 10\n"
                   "[ppo]\niterations = 2\nrollout_batch = 2\nminibatch_size = 2\nmax_new_tokens = 6\nkl_coef = 0.2\n"
                   "[ppo.optim]\nlr = 3e-5\nweight_decay = 0.0\n[ppo.critic_optim]\nlr = 1e-4\nweight_decay = 0.0\n")
    assert main(["experiments", "reward-hacking", "-c", str(cfg)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert set(result["curves"]) == {"no_kl", "kl", "kl_length"}
    for hist in result["curves"].values():
        assert [h["iteration"] for h in hist] == [1, 2]
        assert hist[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the first rollout's policy is the reference
        assert all(0 <= h["gold"] <= 1 and h["response_length"] <= 6 for h in hist)
    final = result["final"]
    assert set(final) == {"sft", "dpo", "no_kl", "kl", "kl_length"}
    assert final["sft"]["win_rate_vs_sft"] == 0.5
    assert all(0 <= f["win_rate_vs_sft"] <= 1 for f in final.values())
    assert (out / "reward_hacking.png").stat().st_size > 0 and "gold win rate" in (out / "results.md").read_text()
    accuracy = result["rm"]["val_accuracy"]
    assert 0.0 <= accuracy <= 1.0 and f"{accuracy:.3f}" in (out / "results.md").read_text()
    capsys.readouterr()
    code = main(["experiments", "reward-hacking", "-c", str(cfg), "--set", 'reward_hacking.conditions=["x"]'])
    err = capsys.readouterr().err
    assert code == 2 and "conditions" in err and len(err.strip().splitlines()) == 1
