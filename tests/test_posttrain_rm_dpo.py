import math

import pytest
import torch

from posttrain_util import WORLD, make_init_run, one_thread, post_overrides, tiny_model  # noqa: F401 (fixture)
from scalelab.config import load_config
from scalelab.data.world import World
from scalelab.errors import ScalelabError
from scalelab.posttrain.data import Preference, preference_batch, tokenize_preferences
from scalelab.posttrain.dpo import dpo_loss, run_dpo
from scalelab.posttrain.mixture import preference_pairs, prefer
from scalelab.posttrain.reward_model import ScalarHeadModel, bradley_terry_loss, load_reward_model, run_rm
from scalelab.tokenizer import ByteTokenizer
from scalelab.train.metrics import read_metrics

TOK = ByteTokenizer()


def test_bradley_terry_loss_matches_a_hand_computed_value():
    rc, rr = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5])
    # -log sigmoid(1) = log(1 + e^-1); -log sigmoid(-1) = log(1 + e)
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2
    assert bradley_terry_loss(rc, rr).item() == pytest.approx(expected, abs=1e-6)
    assert bradley_terry_loss(rc, rr).item() == pytest.approx(0.8132617, abs=1e-6)
    with_margin = (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(1.5))) / 2  # 1.0877452
    assert bradley_terry_loss(rc, rr, 0.5).item() == pytest.approx(with_margin, abs=1e-6)
    assert bradley_terry_loss(rc, rr, torch.tensor([0.5, 0.5])).item() == pytest.approx(with_margin, abs=1e-6)


def test_dpo_loss_matches_a_hand_computed_value():
    pc, pr = torch.tensor([-2.0]), torch.tensor([-3.0])
    rc, rr = torch.tensor([-2.5]), torch.tensor([-2.5])
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # implicit rewards 0.5 * 0.5 = 0.25 and 0.5 * -0.5 = -0.25; loss = -log sigmoid(0.5) = log(1 + e^-0.5)
    assert chosen.item() == pytest.approx(0.25) and rejected.item() == pytest.approx(-0.25)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.5)), abs=1e-6)  # 0.4740770
    smoothed, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.9 * 0.4740770 + 0.1 * math.log(1 + math.exp(0.5)), abs=1e-6)


def test_dpo_starts_at_log_two_and_its_gradient_favours_the_chosen_reply():
    pc, pr = torch.tensor([-4.0], requires_grad=True), torch.tensor([-4.0], requires_grad=True)
    loss, _, _ = dpo_loss(pc, pr, pc.detach(), pr.detach(), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    loss.backward()
    assert pc.grad.item() < 0 < pr.grad.item()


def test_scalar_head_reads_the_last_real_token_and_ignores_padding():
    model = ScalarHeadModel(tiny_model(TOK.vocab_size, 64)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    rows, _ = tokenize_preferences(TOK, [Preference("Hi?", "Hello.", "A much longer reply.")], 64)
    ids, mask, lengths, _ = preference_batch(rows, TOK.bos_id)
    scores = model(ids, lengths)
    short = ids[0, : lengths[0]].unsqueeze(0)
    assert lengths[0] < ids.shape[1]  # the chosen row is padded
    assert torch.allclose(scores[0], model.values(short)[0, -1], atol=1e-5)
    assert TOK.decode(ids[0, : lengths[0]].tolist()).endswith("Hello.<|assistant_end|>")
    assert TOK.decode(ids[0][mask[0].bool()].tolist()) == "Hello.<|assistant_end|>"


def test_preferences_put_correctness_first_and_conciseness_second():
    right_long, right_short = ("The answer is 4.", True), ("4", True)
    wrong_short = ("5", False)
    assert prefer(right_short, right_long) and not prefer(right_long, right_short)
    assert prefer(right_long, wrong_short)  # a correct reply beats a wrong one whatever its length
    assert prefer(right_long, right_short, bias="longer")  # the planted bias flips only the length rule
    assert prefer(right_short, wrong_short, bias="longer") and not prefer(wrong_short, right_long, bias="longer")
    world = World(WORLD)
    pairs = preference_pairs(world, 60, seed=1)
    assert len(pairs) == 60 and all(p.chosen != p.rejected for p in pairs)
    for p in pairs:
        m = p.meta
        if m["rule"] == "correctness":
            assert m["chosen_correct"] and not m["rejected_correct"]
        else:
            assert m["chosen_correct"] == m["rejected_correct"] and len(p.chosen) < len(p.rejected)
    biased = preference_pairs(world, 60, seed=1, bias="longer")
    assert all(len(p.chosen) > len(p.rejected) for p in biased if p.meta["rule"] == "length_bias")
    assert {p.meta["rule"] for p in biased} == {"correctness", "length_bias"}
    with pytest.raises(ScalelabError, match="bias"):
        preference_pairs(world, 5, bias="shorter")


def test_reward_model_run_reports_held_out_pairwise_accuracy(tmp_path):
    init = make_init_run(tmp_path / "base")
    out = tmp_path / "rm"
    cfg = load_config(None, post_overrides(out, **{
        "rm.n_pairs": "240", "rm.steps": "40", "rm.batch_size": "16", "rm.optim.lr": "3e-3", "rm.eval_every": "20",
        "rm.val_fraction": "0.2"}))
    summary = run_rm(cfg, init)
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert len(evals) == 2 and "val_accuracy" in evals[-1] and "val_accuracy/correctness" in evals[-1]
    # the length rule is learnable from the text alone, even by a random backbone
    assert summary["val_accuracy/conciseness"] >= 0.75
    model, tok = load_reward_model(out)
    rows, _ = tokenize_preferences(tok, [Preference("What is 2 + 2?", "4", "Sure! The answer is 4. Let me know.")], 128)
    ids, _, lengths, _ = preference_batch(rows, tok.bos_id)
    rc, rr = model(ids, lengths)
    assert rc > rr


def test_dpo_run_learns_the_preferences(tmp_path):
    init = make_init_run(tmp_path / "base")
    out = tmp_path / "dpo"
    cfg = load_config(None, post_overrides(out, **{
        "dpo.n_pairs": "160", "dpo.steps": "30", "dpo.batch_size": "16", "dpo.optim.lr": "1e-3", "dpo.eval_every": "15",
        "dpo.beta": "0.5", "dpo.val_fraction": "0.25"}))
    summary = run_dpo(cfg, init)
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step one
    assert sum(r["loss"] for r in train[-5:]) / 5 < 0.6
    assert summary["val_reward_accuracy"] > 0.6


def test_a_run_without_a_world_needs_a_preference_file(tmp_path):
    init = make_init_run(tmp_path / "base")
    (init / "world.json").unlink()
    cfg = load_config(None, post_overrides(tmp_path / "rm", **{"rm.steps": "1"}))
    with pytest.raises(ScalelabError, match="world"):
        run_rm(cfg, init)
