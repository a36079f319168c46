"""GRPO: advantages and the loss by hand, engine log-probs against a teacher-forced forward, dynamic
sampling, a toy run that raises its reward, and `scalelab grpo` end to end."""

import itertools
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from posttrain_util import make_init_run, one_thread, tiny_model  # noqa: F401 (fixture)

from scalelab.config import GRPOConfig
from scalelab.errors import ScalelabError
from scalelab.infer.engine import Engine, GenerationParams
from scalelab.posttrain.chat import prompt_ids
from scalelab.posttrain.grpo import GRPOTrainer, group_advantages, grpo_loss
from scalelab.posttrain.ppo import logprobs_and_entropy
from scalelab.tokenizer import CharTokenizer

GRPO_OPTIM = GRPOConfig().optim


def test_group_advantages_by_hand():
    # group 1: mean 2, deviations (-2, -1, 3), population std sqrt(14/3); group 2: all equal -> zeros
    adv = group_advantages(torch.tensor([0.0, 1.0, 5.0, 2.0, 2.0, 2.0]), 3)
    s = math.sqrt(14 / 3)
    assert torch.allclose(adv, torch.tensor([-2 / s, -1 / s, 3 / s, 0.0, 0.0, 0.0]), atol=1e-5)
    assert torch.equal(group_advantages(torch.tensor([0.0, 1.0, 5.0, 2.0, 2.0, 2.0]), 3, scale=False),
                       torch.tensor([-2.0, -1.0, 3.0, 0.0, 0.0, 0.0]))
    assert torch.allclose(group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4), torch.tensor([1.0, -1, -1, 1]),
                          atol=1e-5)
    with pytest.raises(ScalelabError, match="groups of 4"):
        group_advantages(torch.ones(6), 4)


def _hand_batch():
    # old log-probs 0, so the ratio is exp(logp): row 0 has three reply tokens with ratios (1, 1.5, 0.5)
    # and advantage +1; row 1 one reply token with ratio 2 and advantage -1 (its other positions are padding).
    ratio = torch.tensor([[1.0, 1.5, 0.5], [2.0, 1.0, 1.0]])
    logp = ratio.log()
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    adv = torch.tensor([[1.0], [-1.0]])
    return logp, torch.zeros_like(logp), adv, mask


def test_loss_by_hand_token_and_sequence_normalisation():
    logp, old, adv, mask = _hand_batch()
    # unclipped per-token losses -A r: row 0 (-1, -1.5, -0.5), row 1 (2)
    loss, parts = grpo_loss(logp, old, adv, mask, clip=None, loss_norm="token")
    assert float(loss) == pytest.approx((-1 - 1.5 - 0.5 + 2) / 4)  # every reply token weighs the same
    assert float(parts["clip_frac"]) == 0
    loss, _ = grpo_loss(logp, old, adv, mask, clip=0, loss_norm="sequence")
    assert float(loss) == pytest.approx((-3.0 / 3 + 2.0) / 2)  # each reply weighs the same
    # clip 0.2: only row 0's ratio 1.5 is clipped (to 1.2); ratio 0.5 with A > 0 and ratio 2 with A < 0
    # are pessimistic already and stay
    loss, parts = grpo_loss(logp, old, adv, mask, clip=0.2, loss_norm="token")
    assert float(loss) == pytest.approx((-1 - 1.2 - 0.5 + 2) / 4)
    assert float(parts["clip_frac"]) == pytest.approx(1 / 4)
    loss, parts = grpo_loss(logp, old, adv, mask, clip=0.2, loss_norm="sequence")
    assert float(loss) == pytest.approx((-2.7 / 3 + 2.0) / 2)
    assert float(parts["clip_frac"]) == pytest.approx((1 / 3 + 0) / 2)
    # KL: the reference gives row 1's token half the probability: log ratio ln 2, k3 = 1/2 - 1 + ln 2
    ref = logp.clone()
    ref[1, 0] -= math.log(2)
    k3 = math.log(2) - 0.5
    loss, parts = grpo_loss(logp, old, adv, mask, clip=None, loss_norm="token", ref_logp=ref, kl_coef=0.1)
    assert float(parts["kl"]) == pytest.approx(k3 / 4)
    assert float(loss) == pytest.approx((-1 - 1.5 - 0.5 + 2 + 0.1 * k3) / 4)
    loss, parts = grpo_loss(logp, old, adv, mask, clip=None, loss_norm="sequence", ref_logp=ref, kl_coef=0.1)
    assert float(parts["kl"]) == pytest.approx(k3 / 2)
    assert float(loss) == pytest.approx((-1.0 + 2 + 0.1 * k3) / 2)
    with pytest.raises(ScalelabError, match="loss_norm"):
        grpo_loss(logp, old, adv, mask, clip=None, loss_norm="tokens")


def test_engine_logprobs_match_a_teacher_forced_forward():
    tok = CharTokenizer(list("abcde"))
    model = tiny_model(tok.vocab_size, 48, seed=1).eval()
    stop = tok.encode("a")[0]  # a common stop id, so some replies end on it and report its log-prob
    temperature = 0.7
    params = GenerationParams(max_new_tokens=12, temperature=temperature, top_k=0, top_p=1.0, seed=3, n=4,
                              stop_token_ids=(stop,), logprobs=True, logprobs_at_temperature=True)
    prompts = [prompt_ids(tok, s) for s in ("abc", "dd", "e")]
    outs = Engine(model, tok, max_batch=12).generate(prompts, params)
    stopped = 0
    for out in outs:
        p = prompts[out.prompt_index]
        reply = out.tokens + ([stop] if out.finish_reason == "stop" else [])
        lps = out.logprobs + ([out.stop_logprob] if out.finish_reason == "stop" else [])
        stopped += out.finish_reason == "stop"
        with torch.no_grad():
            ref, _ = logprobs_and_entropy(model, torch.tensor([p + reply]), temperature)
        assert lps == pytest.approx(ref[0, len(p) - 1 :].tolist(), abs=1e-4)
    assert stopped >= 2
    # without logprobs_at_temperature the engine reports the raw distribution's log-probs (serving's choice)
    raw = Engine(model, tok, max_batch=12).generate(prompts[:1], GenerationParams(
        **{**params.__dict__, "logprobs_at_temperature": False, "stop_token_ids": ()}))[0]
    with torch.no_grad():
        ref, _ = logprobs_and_entropy(model, torch.tensor([prompts[0] + raw.tokens]), 1.0)
    assert raw.logprobs == pytest.approx(ref[0, len(prompts[0]) - 1 :].tolist(), abs=1e-4)


def test_dynamic_sampling_drops_uniform_groups_and_refills():
    tok = CharTokenizer(list("abcd"))
    policy = tiny_model(tok.vocab_size, 32, seed=0)
    counter = itertools.count()

    def reward(i, text, extra):  # "const" prompts always score 1; "varied" ones never repeat a reward
        return 1.0 if extra == "const" else float(next(counter))

    def refill(n):
        return [prompt_ids(tok, "b")] * n, ["varied"] * n

    prompts = [prompt_ids(tok, "a"), prompt_ids(tok, "c")]
    trainer = GRPOTrainer(policy, tok, reward, group_size=4, optim=replace(GRPO_OPTIM, lr=1e-3), kl_coef=0.0,
                          max_new_tokens=4, dynamic_sampling=True, max_refill_rounds=2, seed=0)
    stats = trainer.step(prompts, ["const", "varied"])
    assert stats["dropped_groups"] == 1 and stats["trained_groups"] == 1 and stats["sample_rounds"] == 1
    assert len(stats["texts"]) == 8
    stats = trainer.step(prompts, ["const", "varied"], refill=refill)
    assert stats["dropped_groups"] == 1 and stats["trained_groups"] == 2 and stats["sample_rounds"] == 2
    # nothing but uniform groups: the refill rounds stop at the cap and the policy is left alone
    before = [p.detach().clone() for p in policy.parameters()]
    stats = trainer.step(prompts, ["const", "const"], refill=lambda n: ([prompt_ids(tok, "d")] * n, ["const"] * n))
    assert stats["sample_rounds"] == 3 and stats["dropped_groups"] == 2 + 2 + 2 and stats["trained_groups"] == 0
    assert "policy_loss" not in stats
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    # without dynamic sampling every group trains (the uniform one with zero advantage) and none is dropped
    plain = GRPOTrainer(policy, tok, reward, group_size=4, optim=replace(GRPO_OPTIM, lr=1e-3), kl_coef=0.0,
                        max_new_tokens=4, seed=0)
    stats = plain.step(prompts, ["const", "varied"])
    assert stats["dropped_groups"] == 0 and stats["zero_adv_groups"] == 1 and stats["trained_groups"] == 2


def test_kl_coef_zero_keeps_no_reference_and_bad_options_fail():
    tok = CharTokenizer(list("ab"))
    policy = tiny_model(tok.vocab_size, 32, seed=0)
    assert GRPOTrainer(policy, tok, lambda *a: 0.0, kl_coef=0.0).reference is None
    reference = GRPOTrainer(policy, tok, lambda *a: 0.0, kl_coef=0.1).reference
    assert reference is not policy and not reference.training  # a frozen copy of the starting policy
    assert all(not r.requires_grad and r is not p and torch.equal(r, p)
               for r, p in zip(reference.parameters(), policy.parameters()))
    for kw, msg in (({"group_size": 1}, "group_size"), ({"loss_norm": "seq"}, "loss_norm"),
                    ({"old_logprobs": "cache"}, "old_logprobs"), ({"clip": -0.1}, "clip")):
        with pytest.raises(ScalelabError, match=msg):
            GRPOTrainer(policy, tok, lambda *a: 0.0, **kw)


def test_toy_grpo_run_raises_the_reward():
    tok = CharTokenizer(list("abcd"))  # few symbols, so 'a' is drawn often enough to be reinforced
    policy = tiny_model(tok.vocab_size, 32, seed=0)
    trainer = GRPOTrainer(policy, tok, lambda i, text, extra: text.count("a") / max(1, len(text)), group_size=4,
                          optim=replace(GRPO_OPTIM, lr=1e-2), kl_coef=0.01, clip=0.2, max_new_tokens=8, minibatch_size=8, epochs=2, seed=0,
                          loss_norm="sequence", old_logprobs="engine",
                          correct_fn=lambda extra, text: text.startswith("a"))
    prompts = [prompt_ids(tok, s) for s in ("ab", "cd", "bd", "ca")]
    history = [trainer.step(prompts) for _ in range(14)]
    first = sum(h["reward"] for h in history[:3]) / 3
    last = sum(h["reward"] for h in history[-3:]) / 3
    assert last > first + 0.3, [round(h["reward"], 3) for h in history]
    assert history[-1]["pass@1"] > history[0]["pass@1"]
    # two epochs of two minibatches: later minibatches train a policy that has moved, so some tokens clip
    assert history[0]["kl"] >= 0 and 0 < history[0]["clip_frac"] < 1


def _grpo_args(init, out, *extra):
    sets = {"run.out_dir": f'"{out}"', "run.progress": "false", "grpo.steps": "3", "grpo.prompts_per_step": "2",
            "grpo.group_size": "2", "grpo.max_new_tokens": "6", "grpo.eval_every": "2", "grpo.eval_problems": "3",
            "grpo.kl_coef": "0.01", "grpo.dynamic_sampling": "false"}
    args = ["grpo", "--init", str(init), "--config", str(Path(__file__).resolve().parents[1] / "configs" / "grpo.toml")]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    for item in extra:
        args += ["--set", item]
    return args


def test_scalelab_grpo_end_to_end(tmp_path, capsys):
    from scalelab.cli import main
    from scalelab import checkpoint as ckpt
    from scalelab.train.metrics import read_metrics

    init = make_init_run(tmp_path / "base")
    out = tmp_path / "grpo"
    assert main(_grpo_args(init, out)) == 0
    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "grpo"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in ("reward", "pass@1", "response_length", "entropy", "kl", "clip_frac", "dropped_groups", "formatted"):
        assert all(key in r for r in steps), key
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 2, 3]
    assert ckpt.latest_checkpoint(out / "checkpoints").name == "step_000003"
    assert ckpt.load_model(out).config == ckpt.load_model(init).config and (out / "reward.png").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    evals = [r for r in records if r["kind"] == "eval"]
    assert summary["stage"] == "grpo"
    assert (summary["pass@1_before"], summary["pass@1_after"]) == (evals[0]["pass@1"], evals[-1]["pass@1"])
    assert 0.0 <= summary["pass@1_after"] <= 1.0
    assert "run folder" in capsys.readouterr().out
    # dynamic sampling and the unclipped, sequence-normalised, recomputed-log-prob variant run too
    assert main(_grpo_args(init, tmp_path / "grpo2", "grpo.dynamic_sampling=true", "grpo.clip=0", "grpo.kl_coef=0",
                           'grpo.loss_norm="sequence"', 'grpo.old_logprobs="recompute"', "grpo.steps=1",
                           "grpo.eval_problems=0", 'grpo.system_prompt="End with a line Answer: N."')) == 0
    records2 = read_metrics(tmp_path / "grpo2" / "metrics.jsonl")
    setup, setup_plain = (next(r for r in rs if r["kind"] == "setup") for rs in (records2, records))
    assert "End with a line Answer: N." in setup["first_prompt"] and "Answer: N" not in setup_plain["first_prompt"]
    (step,) = [r for r in records2 if r["kind"] == "grpo"]
    assert "kl" not in step and step["sample_rounds"] >= 1
    capsys.readouterr()


def test_scalelab_grpo_bad_input_is_a_one_line_error(tmp_path, capsys):
    from scalelab.cli import main

    init = make_init_run(tmp_path / "base")
    for setting, message in (('grpo.task="juggling"', "unknown reasoning task 'juggling'"),
                             ('grpo.loss_norm="tokens"', "grpo.loss_norm must be token or sequence"),
                             ("grpo.group_size=1", "grpo.group_size must be at least 2")):
        code = main(_grpo_args(init, tmp_path / "grpo", setting))
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "grpo").exists()  # nothing written for a run that could not start
