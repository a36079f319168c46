import copy
import math

import pytest
import torch
from posttrain_util import make_init_run, one_thread, post_overrides, tiny_model  # noqa: F401 (fixture)

from scalelab.config import OptimConfig, PPOConfig, load_config
from scalelab.posttrain.chat import prompt_ids
from scalelab.posttrain.ppo import (
    KLController,
    PPOTrainer,
    gae,
    kl_estimate,
    logprobs_and_entropy,
    policy_loss,
    reply_logprobs_and_entropy,
    run_ppo,
    value_loss,
    whiten,
)
from scalelab.posttrain.reward_model import ScalarHeadModel
from scalelab.tokenizer import CharTokenizer
from scalelab import checkpoint as ckpt
from scalelab.train.metrics import read_metrics


def test_gae_matches_hand_computed_values():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # gamma = lam = 1: A_t = (sum of rewards from t) - V_t
    assert torch.allclose(adv, torch.tensor([[0.5, 0.4, 0.3]]))
    assert torch.allclose(ret, torch.tensor([[1.0, 1.0, 1.0]]))
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # delta = (0.9*0.6 - 0.5, 0.9*0.7 - 0.6, 1 - 0.7) = (0.04, 0.03, 0.3); A_t = delta_t + 0.45 A_{t+1}
    assert torch.allclose(adv, torch.tensor([[0.11425, 0.165, 0.3]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0.61425, 0.765, 1.0]]), atol=1e-6)


def test_gae_ignores_positions_outside_the_reply():
    # row 0: a prompt position, then a two-token reply, then padding; row 1: the same reply at the start
    rewards = torch.tensor([[9.0, 0.0, 1.0, 9.0], [0.0, 1.0, 9.0, 9.0]])
    values = torch.tensor([[9.0, 0.6, 0.7, 9.0], [0.6, 0.7, 9.0, 9.0]])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[0.0, 0.4, 0.3, 0.0], [0.4, 0.3, 0.0, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]]))


def test_clipped_surrogate_matches_hand_computed_values():
    ratio = torch.tensor([[1.5, 0.5, 1.5, 0.5]])
    old = torch.zeros(1, 4)
    logp = ratio.log().requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, clip_frac = policy_loss(logp, old, adv, torch.ones(1, 4), clip=0.2)
    # per token max(-A r, -A clip(r)): (-1.2, -0.5, 1.5, 0.8); tokens 1 and 4 are clipped
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4)
    assert clip_frac.item() == pytest.approx(0.5)
    loss.backward()
    # clipped tokens get no gradient; the others get -A r / n
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -0.5 / 4, 1.5 / 4, 0.0]]))
    masked, _ = policy_loss(logp, old, adv, torch.tensor([[1, 1, 0, 0]]), clip=0.2)
    assert masked.item() == pytest.approx((-1.2 - 0.5) / 2)


def test_value_loss_takes_the_pessimistic_clipped_error():
    v, old, ret, m = torch.tensor([[1.2, 0.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[1.0, 1.0]]), torch.ones(1, 2)
    # token 1: unclipped (0.2)^2 = 0.04, clipped value 0.7 -> (0.3)^2 = 0.09; token 2: 1.0 vs (0.7)^2 = 0.49
    assert value_loss(v, old, ret, m, clip=0.2).item() == pytest.approx(0.5 * (0.09 + 1.0) / 2)
    assert value_loss(v, old, ret, m, clip=0.0).item() == pytest.approx(0.5 * (0.04 + 1.0) / 2)


def test_kl_estimators_by_hand_and_zero_when_policy_equals_reference():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(-0.5 + math.log(2))  # (r - 1) - log r, r = 1/2
    policy = tiny_model(40, 32)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    reference = copy.deepcopy(policy)
    ids = torch.randint(0, 40, (3, 20))
    lp, _ = logprobs_and_entropy(policy, ids)
    lr, _ = logprobs_and_entropy(reference, ids)
    for kind in ("k1", "k3"):
        assert torch.equal(kl_estimate(lp, lr, kind), torch.zeros_like(lp))


def test_reply_only_logprobs_match_the_full_pass_in_value_and_gradient():
    torch.manual_seed(1)
    model = tiny_model(40, 32)
    ids = torch.randint(0, 40, (3, 20))
    mask = torch.zeros(3, 19)
    mask[0, 5:12], mask[1, 9:19], mask[2, 0:3] = 1, 1, 1  # replies start at different positions
    full, full_ent = logprobs_and_entropy(model, ids, temperature=0.7)
    (full * mask).sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    part, part_ent = reply_logprobs_and_entropy(model, ids, mask, temperature=0.7)
    (part * mask).sum().backward()
    assert torch.allclose(part, full * mask, atol=1e-5)
    assert torch.allclose(part_ent, full_ent.detach() * mask, atol=1e-5) and not part_ent.requires_grad
    assert all(torch.allclose(p.grad, g, atol=1e-5) for p, g in zip(model.parameters(), want))


def test_whitening_and_the_adaptive_kl_controller():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    w = whiten(x, torch.tensor([1, 1, 1, 0]))
    assert torch.allclose(w[:3], torch.tensor([-1.2247, 0.0, 1.2247]), atol=1e-4) and w[3] == 0
    assert torch.allclose(whiten(x[:3], shift_mean=False).mean(), torch.tensor(2.0))
    kl = KLController(0.1, adaptive=True, target=6.0, horizon=1000)
    kl.update(12.0, 100)  # error clipped to +0.2: beta *= 1 + 0.2 * 100 / 1000
    assert kl.value == pytest.approx(0.102)
    kl.update(6.0, 100)
    assert kl.value == pytest.approx(0.102)
    fixed = KLController(0.1)
    fixed.update(50.0, 100)
    assert fixed.value == 0.1


def test_a_tiny_ppo_run_on_a_toy_task_raises_the_reward():
    torch.manual_seed(0)
    tok = CharTokenizer(list("abcd"))
    policy = tiny_model(tok.vocab_size, 32, seed=0)
    critic = ScalarHeadModel(copy.deepcopy(policy))
    a = tok.stoi["a"]
    end = tok.token_id("<|assistant_end|>")

    def reward(prompt, reply, text, extra):  # the share of 'a' among the reply's tokens
        body = [t for t in reply if t != end]
        return sum(t == a for t in body) / max(len(body), 1)

    optim = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.0)
    cfg = PPOConfig(rollout_batch=16, minibatch_size=8, epochs=1, max_new_tokens=8, optim=optim, critic_optim=optim,
                    kl_coef=0.01, whiten_rewards=True)
    trainer = PPOTrainer(policy, critic, tok, cfg, reward, seed=0)
    prompts = [prompt_ids(tok, s) for s in ("ab", "cd", "bd", "ca")] * 4
    history = [trainer.step(prompts) for _ in range(10)]
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first rollout is the reference's own
    for key in ("reward", "kl", "response_length", "entropy", "value_loss", "clip_frac", "policy_loss", "kl_coef"):
        assert all(math.isfinite(h[key]) for h in history), key
    first = sum(h["reward"] for h in history[:3]) / 3
    last = sum(h["reward"] for h in history[-3:]) / 3
    assert last > first + 0.4, [round(h["reward"], 3) for h in history]


def test_ppo_steps_its_rates_on_the_optimizer_sections_schedules():
    tok = CharTokenizer(list("ab"))
    policy = tiny_model(tok.vocab_size, 32, seed=0)
    cfg = PPOConfig(rollout_batch=2, minibatch_size=2, iterations=4, max_new_tokens=2,
                    optim=OptimConfig(lr=1e-3, warmup_steps=4, schedule="constant"),
                    critic_optim=OptimConfig(lr=1e-2, warmup_steps=2, schedule="constant"))
    trainer = PPOTrainer(policy, ScalarHeadModel(copy.deepcopy(policy)), tok, cfg, lambda *a: 0.0, seed=0)
    prompts = [prompt_ids(tok, "ab")] * 2
    for want_policy, want_critic in ((2.5e-4, 5e-3), (5e-4, 1e-2)):
        trainer.step(prompts)
        assert trainer.opt.param_groups[0]["lr"] == pytest.approx(want_policy)
        assert trainer.critic_opt.param_groups[0]["lr"] == pytest.approx(want_critic)


def test_ppo_stage_writes_logs_and_a_loadable_policy(tmp_path):
    init = make_init_run(tmp_path / "base")
    out = tmp_path / "ppo"
    cfg = load_config(None, post_overrides(out, **{
        "ppo.reward": '"exact"', "ppo.n_prompts": "60", "ppo.iterations": "2", "ppo.rollout_batch": "4",
        "ppo.minibatch_size": "2", "ppo.max_new_tokens": "6", "ppo.adaptive_kl": "true", "ppo.kl_estimator": '"k3"'}))
    summary = run_ppo(cfg, init)
    logs = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "ppo"]
    assert len(logs) == 2
    for key in ("reward", "kl", "response_length", "entropy", "value_loss", "clip_frac"):
        assert key in logs[0]
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert [e["step"] for e in evals] == [0, 2] and all(e["exact_match_n"] > 0 for e in evals)
    assert (summary["exact_match_before"], summary["exact_match_after"]) == (evals[0]["exact_match"],
                                                                            evals[1]["exact_match"])
    assert 0.0 <= summary["exact_match_after"] <= 1.0
    assert ckpt.load_model(out).config.block_size == 128


def test_reward_model_scores_a_batch_like_one_reply_at_a_time():
    from scalelab.posttrain.ppo import RewardModelScorer

    tok = CharTokenizer(list("abcd"))
    rm = ScalarHeadModel(tiny_model(tok.vocab_size, 32, seed=1)).eval()
    with torch.no_grad():
        for p in rm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    end = tok.token_id("<|assistant_end|>")
    scorer = RewardModelScorer(rm, end, tok.bos_id, torch.device("cpu"))
    prompts = [prompt_ids(tok, "ab"), prompt_ids(tok, "abcdabcd")]
    replies = [[tok.stoi["a"], end], [tok.stoi["b"]] * 3]  # the second was cut off: scored as if it had ended
    batch = scorer.score_batch(prompts, replies, ["a", "bbb"], [None, None])
    assert batch == pytest.approx([scorer(p, r, "", None) for p, r in zip(prompts, replies)], abs=1e-5)
    assert batch[1] == pytest.approx(scorer(prompts[1], replies[1] + [end], "", None), abs=1e-5)
