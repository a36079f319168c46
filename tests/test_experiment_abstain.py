"""The abstention experiment: the answer classifier and metrics by hand, GRPO's advantages, the
learned judge, and a tiny end-to-end run (seconds) that writes the table, JSON and plot."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from posttrain_util import one_thread, tiny_model  # noqa: F401 (fixture)

from scalelab.cli import main
from scalelab.config import Config, GRPOConfig, load_config_with_section, to_toml
from scalelab.data.world import World, WorldConfig
from scalelab.errors import ScalelabError
from scalelab.evals.answer_scorer import generate_pairs, train_scorer
from scalelab.experiments import abstain as ab
from scalelab.experiments import abstain_worlds as aw
from scalelab.posttrain.grpo import GRPOTrainer, group_advantages
from scalelab.tokenizer import ByteTokenizer
from scalelab import checkpoint as ckpt

WORLD = WorldConfig(n_people=18, bios_per_person=1, unknown_fraction=0.34, extra_tasks={})


def _base_run(root: Path) -> Path:
    run = Path(root)
    run.mkdir(parents=True, exist_ok=True)
    tok = ByteTokenizer()
    tok.save(run / "tokenizer")
    World(WORLD).save(run / "world.json")
    model = tiny_model(tok.vocab_size, 128)
    ckpt.save_checkpoint(run / "checkpoints", model, torch.optim.AdamW(model.parameters()), 0, {})
    cfg = Config()
    cfg.model, cfg.tokenizer.kind, cfg.data.world = model.config, "byte", WORLD
    (run / "config.toml").write_text(to_toml(cfg))
    return run


def test_classify_answer():
    assert ab.classify_answer("Port Alder", "Port Alder") == "correct"
    assert ab.classify_answer("  port alder. ", "Port Alder") == "correct"
    assert ab.classify_answer("I don't know", "Port Alder") == "abstain"
    assert ab.classify_answer("i do not know.", "Port Alder") == "abstain"
    assert ab.classify_answer("Port Alder University", "Port Alder") == "wrong"
    assert ab.classify_answer("", "Port Alder") == "wrong"
    assert ab.classify_answer("I don't know Port Alder", "Port Alder") == "wrong"


def test_summary_and_target_by_hand():
    known = ["correct"] * 6 + ["abstain"] * 2 + ["wrong"] * 2
    unknown = ["abstain"] * 3 + ["wrong"] * 4 + ["correct"]
    s = ab.summarize(known, unknown)
    assert (s["known_accuracy"], s["known_abstain"], s["known_wrong"]) == (0.6, 0.2, 0.2)
    assert (s["unknown_abstain"], s["unknown_hallucination"], s["unknown_lucky"]) == (3 / 8, 0.5, 1 / 8)
    assert (s["n_known"], s["n_unknown"]) == (10, 8)
    ref = {"known_accuracy": 0.6, "unknown_hallucination": 0.8}
    assert ab.meets_target({"known_accuracy": 0.55, "unknown_hallucination": 0.4}, ref)  # exactly half, 5 points
    assert not ab.meets_target({"known_accuracy": 0.54, "unknown_hallucination": 0.1}, ref)
    assert not ab.meets_target({"known_accuracy": 0.7, "unknown_hallucination": 0.41}, ref)
    with pytest.raises(ScalelabError, match="no replies"):
        ab.rates([])
    with pytest.raises(ScalelabError, match="unknown answer class"):
        ab.summarize(["correct", "maybe"], ["wrong"])


def test_headline_is_fixed_by_the_config():
    a = ab.AbstainConfig(rl_from=["b", "a"], abstain_rewards=[-0.8, 0.0, 0.5])
    assert ab.headline_condition(a) == "c[b, abstain=-0.8]"
    assert ab.headline_condition(ab.AbstainConfig(rl_from=[])) is None


def test_split_people_is_disjoint_and_sft_targets():
    world = World(WORLD)
    g = ab.split_people(world, 0.4, 0.3, seed=0)
    known = set(world.qa_train_people + world.qa_eval_people)
    for kind, pool in (("known", known), ("unknown", set(world.unknown_people))):
        parts = [set(g[f"{s}_{kind}"]) for s in ("sft", "rl", "eval")]
        assert all(parts) and set().union(*parts) == pool and sum(map(len, parts)) == len(pool)
    a, b = ab.sft_records(world, g, "answer"), ab.sft_records(world, g, "idk")
    unknown_names = {world.people[i].name for i in g["sft_unknown"]}
    assert len(a) == len(b) == 18 * (len(g["sft_known"]) + len(g["sft_unknown"]))
    for ra, rb in zip(a, b):
        about_unknown = any(n in ra["question"] for n in unknown_names)
        assert ra["question"] == rb["question"]
        assert (rb["reply"] == ab.IDK) == about_unknown
        assert ra["reply"] != ab.IDK
    with pytest.raises(ScalelabError, match="unknown_target"):
        ab.sft_records(world, g, "maybe")
    # Unknown people cut in other shares: the known groups do not move, the evaluation tail is the same.
    g2 = ab.split_people(world, 0.4, 0.3, seed=0, unknown_fractions=(0.2, 0.5))
    assert all(g2[f"{s}_known"] == g[f"{s}_known"] for s in ("sft", "rl", "eval"))
    n = len(world.unknown_people)
    assert len(g2["sft_unknown"]) == round(0.2 * n) and len(g2["rl_unknown"]) == round(0.5 * n)
    assert set(g2["sft_unknown"] + g2["rl_unknown"] + g2["eval_unknown"]) == set(world.unknown_people)
    with pytest.raises(ScalelabError, match="at least 3"):
        ab.split_people(World(WorldConfig(n_people=10, bios_per_person=1, extra_tasks={})), 0.4, 0.3, 0)


def test_group_advantages_by_hand():
    adv = group_advantages(torch.tensor([1.0, -1.0, 0.0, 0.0, 1.0, 1.0, 1.0, -1.0]), 4)
    first = torch.tensor([1.0, -1.0, 0.0, 0.0]) / (0.5 ** 0.5 + 1e-6)
    assert torch.allclose(adv[:4], first, atol=1e-5)
    r = torch.tensor([1.0, 1.0, 1.0, -1.0])  # mean 0.5, population std sqrt(0.75)
    assert torch.allclose(adv[4:], (r - 0.5) / (0.75 ** 0.5 + 1e-6), atol=1e-5)
    assert torch.equal(group_advantages(torch.ones(4), 2), torch.zeros(4))
    # Std scaling makes {0, -1} look like {1, -1}; mean-centering alone keeps the reward's size.
    assert torch.allclose(group_advantages(torch.tensor([0.0, -1.0]), 2), group_advantages(torch.tensor([1.0, -1.0]), 2))
    assert torch.equal(group_advantages(torch.tensor([0.5, -1.0, 1.0, -1.0]), 2, scale=False),
                       torch.tensor([0.75, -0.75, 1.0, -1.0]))
    with pytest.raises(ScalelabError, match="groups of 3"):
        group_advantages(torch.ones(4), 3)


def test_grpo_raises_a_toy_reward():
    from scalelab.posttrain.chat import prompt_ids
    from scalelab.tokenizer import CharTokenizer

    tok = CharTokenizer(list("abcd"))  # few symbols, so 'a' is drawn often enough to be reinforced
    policy = tiny_model(tok.vocab_size, 32, seed=0)
    trainer = GRPOTrainer(policy, tok, lambda i, text, extra: text.count("a") / max(1, len(text)), group_size=4,
                          optim=replace(GRPOConfig().optim, lr=1e-2), kl_coef=0.0, max_new_tokens=8,
                          minibatch_size=4, seed=0)
    prompts = [prompt_ids(tok, s) for s in ("ab", "cd", "bd", "ca")]
    history = [trainer.step(prompts) for _ in range(14)]
    first = sum(h["reward"] for h in history[:3]) / 3
    last = sum(h["reward"] for h in history[-3:]) / 3
    assert last > first + 0.3, [round(h["reward"], 3) for h in history]
    with pytest.raises(ScalelabError, match="group_size"):
        GRPOTrainer(policy, tok, lambda *a: 0.0, group_size=1)


def test_learned_judge_separates_the_three_classes():
    judge, stats = train_scorer(steps=150, seed=0, n_pairs=2000, n_heldout=300)
    assert stats["scorer_heldout_accuracy"] > 0.9
    assert judge.judge(["Port Alder", "Port Alder", "Port Alder"], ["port alder", "I don't know", "Saltmere"]) == \
        ["agree", "abstain", "disagree"]
    assert {p[2] for p in generate_pairs(30, 0)} == {0, 1, 2}


def test_tiny_pipeline_writes_results(tmp_path):
    base = _base_run(tmp_path / "base")
    out = tmp_path / "abstain"
    cfg, a = load_config_with_section(None, [
        "run.progress=false", "train.log_every=1", f'abstain.out_dir="{out}"', f'abstain.base_run="{base}"',
        "sft.steps=2", "sft.batch_size=4", "sft.optim.lr=3e-4", "sft.optim.warmup_steps=10",
        "grpo.steps=2", "grpo.prompts_per_step=2", "grpo.group_size=2", "grpo.minibatch_size=2", "grpo.max_new_tokens=4",
        "grpo.optim.lr=5e-5", "grpo.kl_coef=0.02", "grpo.temperature=0.6", "grpo.scale_advantages=false",
        "grpo.dynamic_sampling=true", "grpo.max_refill_rounds=2", 'grpo.old_logprobs="recompute"',
        "abstain.scorer_steps=5", "abstain.max_eval=4",
        "abstain.abstain_rewards=[0.0, 0.5]", 'abstain.rl_from=["b", "a"]', 'abstain.sweep_from=["b"]',
        'abstain.scorer_from="b"',
    ], "abstain", ab.AbstainConfig)
    result = ab.run_abstain(cfg, a, log=lambda *_: None)
    names = list(result["conditions"])
    # (a) is not in sweep_from: its RL runs the first abstain reward only
    assert names == ["base", "a", "b", "c[b, abstain=0]", "c[b, abstain=0.5]", "c[a, abstain=0]", "d[b, abstain=0, judge]"]
    for m in result["conditions"].values():
        assert m["n_known"] == 4 and m["n_unknown"] == 4
        assert abs(m["known_accuracy"] + m["known_abstain"] + m["known_wrong"] - 1) < 1e-9
        assert abs(m["unknown_abstain"] + m["unknown_hallucination"] + m["unknown_lucky"] - 1) < 1e-9
    assert 0 <= result["conditions"]["d[b, abstain=0, judge]"]["judge_rule_agreement"] <= 1
    saved = json.loads((out / "results.json").read_text())
    assert saved["conditions"]["a"] == json.loads(json.dumps(result["conditions"]["a"]))
    md = (out / "results.md").read_text()
    assert "| c[b, abstain=0.5] |" in md and "unknown halluc." in md
    assert set(saved["rl_people_view"]) == {"a", "b", "c[b, abstain=0]", "c[b, abstain=0.5]", "c[a, abstain=0]",
                                            "d[b, abstain=0, judge]"}
    assert saved["selected"] == "c[b, abstain=0]" and "**Headline (fixed by the config" in md
    assert "plays no part in choosing the headline" in md
    assert (out / "abstain.png").stat().st_size > 1000
    with pytest.raises(ScalelabError, match="--overwrite"):
        ab.run_abstain(cfg, a, log=lambda *_: None)


def test_bad_input_fails_with_the_key(tmp_path, capsys):
    def err(*sets):
        rc = main(["experiments", "abstain", *[x for s in sets for x in ("--set", s)],
                   "--set", f'abstain.out_dir="{tmp_path / "x"}"'])
        assert rc == 2
        return capsys.readouterr().err

    assert "abstain.rl_from" in err('abstain.rl_from=["c"]')
    assert "abstain.sweep_from" in err('abstain.sweep_from=["base"]')
    assert "between abstain.wrong_reward" in err("abstain.abstain_rewards=[2.0]")
    assert "unknown config key 'abstain.nope'" in err("abstain.nope=1")
    assert "sft_fraction" in err("abstain.sft_fraction=0.8")
    assert "abstain.unknown_sft_fraction" in err("abstain.unknown_sft_fraction=0.6", "abstain.unknown_rl_fraction=0.5")
    assert "grpo.max_refill_rounds" in err("grpo.max_refill_rounds=-1")
    # the stages' keys live in [sft], [grpo]; an old copy is read into them, with a warning, for one release
    assert "grpo.max_refill_rounds" in err("abstain.max_refill_rounds=-1")
    with pytest.warns(FutureWarning, match=r"abstain.sft_steps -> sft.steps, abstain.rl_lr -> grpo.optim.lr"):
        cfg, _ = ab.STUDY.load(None, ["abstain.rl_lr=1e-4", "abstain.sft_steps=7"])
    assert (cfg.grpo.optim.lr, cfg.sft.steps) == (1e-4, 7)
    # The default world has no unknown people: refused before any training.
    assert "unknown_fraction" in err("train.steps=1")
    base = _base_run(tmp_path / "known_only")
    World(WorldConfig(n_people=18, bios_per_person=1, extra_tasks={})).save(base / "world.json")
    assert "unknown people" in err(f'abstain.base_run="{base}"')


def _world_result(seed: int, a: tuple[float, float], headline: tuple[float, float], selected="c[b, abstain=0]") -> dict:
    """A hand-made results.json: (known accuracy, unknown hallucination) for (a) and the headline."""
    def cond(known, halluc):
        return {"known_accuracy": known, "unknown_abstain": 1 - halluc, "unknown_hallucination": halluc}
    return {"selected": selected, "world": {"seed": seed},
            "conditions": {"a": cond(*a), "b": cond(0.8, 0.3), "c[b, abstain=0]": cond(*headline)}}


def test_abstain_worlds_summary_by_hand(tmp_path, capsys):
    results = {"w3": _world_result(3, (0.90, 0.96), (0.86, 0.40)),   # met: 0.86 >= 0.85, 0.40 <= 0.48
               "w4": _world_result(4, (0.90, 0.96), (0.84, 0.40)),   # missed on known accuracy
               "w5": _world_result(5, (0.80, 0.90), (0.80, 0.46))}   # missed on hallucination (bar 0.45)
    s = aw.summarize_worlds(results, need=2)
    assert [w["meets_target"] for w in s["per_world"].values()] == [True, False, False]
    assert (s["worlds_met"], s["claim_holds"]) == (1, False)
    m = s["conditions"]["c[b, abstain=0]"]["known_accuracy"]
    assert m["mean"] == pytest.approx(0.8333333) and m["std"] == pytest.approx(0.0305505, abs=1e-6)
    assert s["conditions"]["b"]["unknown_hallucination"]["std"] == 0.0
    assert aw.summarize_worlds(results, need=1)["claim_holds"]
    with pytest.raises(ScalelabError, match="different headline"):
        aw.summarize_worlds({**results, "w6": _world_result(6, (0.9, 0.9), (0.9, 0.1), selected="c[b, abstain=-0.8]")}, 2)
    # through the CLI: files written, 4-of-5 style default (ceil(0.8 * 3) = 3 worlds needed)
    folders = []
    for name, r in results.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(r))
        folders.append(str(tmp_path / name))
    out = tmp_path / "summary"
    assert main(["experiments", "abstain-worlds", "--runs", *folders, "--out", str(out)]) == 0
    assert "the claim **does not hold**" in capsys.readouterr().out
    md = (out / "results.md").read_text()
    assert "on 1 of 3 worlds (the claim needs 3)" in md and "**does not hold**" in md
    assert (out / "abstain_worlds.png").stat().st_size > 1000
    # bad input: a folder without results, or an impossible --need, is a one-line error
    assert main(["experiments", "abstain-worlds", "--runs", str(tmp_path / "nope")]) == 2
    assert "results.json not found" in capsys.readouterr().err
    assert main(["experiments", "abstain-worlds", "--runs", *folders, "--need", "4"]) == 2
    assert "--need" in capsys.readouterr().err
