"""The distillation study: two worlds that know overlapping people, the four groups by hand, and a tiny
end-to-end run (pretraining included, seconds) that writes the per-group tables, JSON and figure."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from posttrain_util import one_thread, tiny_model  # noqa: F401 (fixture)

from scalelab.cli import main
from scalelab.config import load_config_with_section
from scalelab.data.world import World, WorldConfig
from scalelab.errors import ScalelabError
from scalelab.experiments import distill as ds
from scalelab.posttrain.sft import token_distill_loss


def test_unknown_window_moves_with_the_offset():
    base = World(WorldConfig(n_people=40, bios_per_person=1, unknown_fraction=0.5, extra_tasks={}))
    moved = World(WorldConfig(n_people=40, bios_per_person=1, unknown_fraction=0.5, unknown_offset=0.25, extra_tasks={}))
    # offset 0 is the old layout; the people themselves never move
    old = World(WorldConfig(n_people=40, bios_per_person=1, unknown_fraction=0.5, extra_tasks={}))
    assert base.unknown_people == old.unknown_people and len(moved.unknown_people) == 20
    assert [p.name for p in base.people] == [p.name for p in moved.people]
    groups = ds.knowledge_groups(base, moved)
    assert {g: len(v) for g, v in groups.items()} == {g: 10 for g in ds.GROUPS}
    assert sorted(sum(groups.values(), [])) == list(range(40))
    for i in groups["teacher_only"]:
        assert base.people[i].known and not moved.people[i].known
    for i in groups["student_only"]:
        assert moved.people[i].known and not base.people[i].known
    assert set(groups["neither"]) == set(base.unknown_people) & set(moved.unknown_people)
    # a biography mentions only people the world knows
    bios = " ".join(moved.biographies())
    assert all(moved.people[i].name not in bios for i in moved.unknown_people)
    assert World.from_dict(moved.to_dict()).unknown_people == moved.unknown_people
    with pytest.raises(ScalelabError, match="unknown_offset"):
        World(WorldConfig(n_people=40, unknown_fraction=0.5, unknown_offset=0.6, extra_tasks={}))
    with pytest.raises(ScalelabError, match="different people"):
        ds.knowledge_groups(base, World(WorldConfig(seed=1, n_people=40, unknown_fraction=0.5, extra_tasks={})))


def test_split_groups_is_disjoint_and_complete():
    groups = {g: list(range(10 * k, 10 * k + 10)) for k, g in enumerate(ds.GROUPS)}
    split = ds.split_groups(groups, ds.DistillConfig(), seed=0)
    for g in ds.GROUPS:
        parts = [split[g][s] for s in ds.SPLITS]
        assert all(parts) and sorted(sum(parts, [])) == groups[g]
        assert [len(p) for p in parts] == [3, 3, 2, 2]
    with pytest.raises(ScalelabError, match="at least 4"):
        ds.split_groups(groups | {"neither": [1, 2, 3]}, ds.DistillConfig(), seed=0)


def test_claim_by_hand():
    def seed(sft_h, dist_h, rep_h, sft_a, dist_a, rep_a):
        m = {name: {g: {"accuracy": 0.0, "abstention": 0.0, "hallucination": 0.0} for g in ds.GROUPS} for name in ds.MODELS}
        for name, h, a in (("student_sft", sft_h, sft_a), ("distilled", dist_h, dist_a), ("repaired", rep_h, rep_a)):
            m[name]["teacher_only"]["hallucination"] = h
            m[name]["student_only"]["abstention"] = a
        return {"models": m}

    c = ds.claim([seed(0.2, 0.8, 0.3, 0.1, 0.6, 0.2), seed(0.3, 0.2, 0.1, 0.1, 0.5, 0.6)])
    h = c["hallucination_up_on_teacher_only"]
    assert h["mean_difference"] == pytest.approx(0.25) and h["seeds_holding"] == 1 and h["holds_on_mean"]
    assert c["abstention_up_on_student_only"]["seeds_holding"] == 2
    assert c["rl_cuts_abstention_on_student_only"]["mean_difference"] == pytest.approx(0.15)
    text = ds.claim_sentence(c)
    assert "hallucination on teacher-only people held on the mean only (+0.250; 1/2 seeds)" in text
    assert "abstention on student-only people held on every seed (+0.450)" in text
    agg = ds.mean_std([0.2, 0.4])
    assert agg["mean"] == pytest.approx(0.3) and agg["std"] == pytest.approx(0.1414, abs=1e-3)
    assert ds.mean_std([0.5])["std"] == 0.0


TINY = ["run.progress=false", "run.device=\"cpu\"", "data.world.n_people=16", "data.world.bios_per_person=1",
        "data.world.unknown_fraction=0.5", "data.world.extra_tasks={}", "data.world.qa_in_pretrain_fraction=1.0",
        "data.val_fraction=0.1", 'tokenizer.kind="byte"', "model.depth=1", "model.n_embd=32", "model.head_dim=16",
        "model.block_size=128", "train.steps=2", "train.batch_size=2", "train.eval_every=2", "train.eval_batches=1",
        "train.log_every=1", "sft.steps=2", "sft.batch_size=4", "grpo.steps=1", "grpo.prompts_per_step=2",
        "grpo.group_size=2", "grpo.minibatch_size=4", "grpo.max_new_tokens=4", "grpo.scale_advantages=false",
        "distill.max_eval=3"]


def test_tiny_study_writes_results(tmp_path):
    out = tmp_path / "distill"
    cfg, d = load_config_with_section(None, TINY + [f'distill.out_dir="{out}"', "distill.seeds=[0, 1]"],
                                      "distill", ds.DistillConfig)
    result = ds.run_distill(cfg, d, log=lambda *_: None)
    assert [r["seed"] for r in result["seeds"]] == [0, 1]
    for r in result["seeds"]:
        assert set(r["models"]) == set(ds.MODELS)
        for m in r["models"].values():
            for g in ds.GROUPS:
                assert m[g]["n"] == 3
                assert sum(m[g][k] for k, _ in ds.METRICS) == pytest.approx(1.0)
        assert r["people"]["both"] == {"teacher_sft": 1, "distill": 1, "rl": 1, "eval": 1}
        assert r["teacher_run"] != r["student_run"]
    assert set(result["claim"]) == {"hallucination_up_on_teacher_only", "abstention_up_on_student_only",
                                    "rl_cuts_hallucination_on_teacher_only", "rl_cuts_abstention_on_student_only"}
    agg = result["aggregate"]["distilled"]["teacher_only"]["hallucination"]
    assert agg["mean"] == pytest.approx(sum(agg["values"]) / 2) and len(agg["values"]) == 2
    md = (out / "results.md").read_text()
    assert all(f"## {g} people" in md for g in ds.GROUPS) and "## The claim" in md and " ± " in md
    saved = json.loads((out / "results.json").read_text())
    assert saved["claim"] == json.loads(json.dumps(result["claim"]))
    assert (out / "distill.png").stat().st_size > 1000
    with pytest.raises(ScalelabError, match="--overwrite"):
        ds.run_distill(cfg, d, log=lambda *_: None)
    # --overwrite keeps the cached bases: the teacher's checkpoint is reused, not retrained
    stamp = (out / "base" / "seed0_teacher" / "base_recipe.json").stat().st_mtime_ns
    ds.run_distill(cfg, replace(d, seeds=[0]), overwrite=True, log=lambda *_: None)
    assert (out / "base" / "seed0_teacher" / "base_recipe.json").stat().st_mtime_ns == stamp


def test_bad_input_fails_with_the_key(tmp_path, capsys):
    def err(*sets):
        rc = main(["experiments", "distill", *[x for s in sets for x in ("--set", s)],
                   "--set", f'distill.out_dir="{tmp_path / "x"}"'])
        assert rc == 2
        return capsys.readouterr().err

    world = ["data.world.unknown_fraction=0.5"]
    assert "unknown_fraction > 0" in err("train.steps=1")  # the default world knows everyone
    assert "distill.seeds" in err(*world, "distill.seeds=[]")
    assert "distill.kl_temperature" in err(*world, "distill.kl_temperature=0")
    assert "distill.student_offset" in err(*world, "distill.student_offset=0.6")
    assert "distill.student_offset" in err(*world, "distill.student_offset=0.0")
    assert "distill.teacher_sft_fraction" in err(*world, "distill.rl_fraction=0.5")
    assert "wrong_reward < abstain_reward" in err(*world, "distill.abstain_reward=2.0")
    assert "unknown config key 'distill.nope'" in err("distill.nope=1")
    assert "at least 4" in err(*TINY, "data.world.n_people=8", f'distill.out_dir="{tmp_path / "y"}"')


def test_token_distill_loss_by_hand():
    student, teacher = tiny_model(40, seed=0), tiny_model(40, seed=1)
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros_like(ids)
    mask[0, 4:], mask[1, 6:] = 1, 1  # targets at positions 4.. and 6..: 5 + 3 = 8 scored next-token predictions
    assert float(token_distill_loss(student, ids, mask, teacher=student).detach()) == pytest.approx(0.0, abs=1e-6)
    for temp in (1.0, 2.0):
        with torch.no_grad():
            s_log = F.log_softmax(student(ids[:, :-1]) / temp, -1)
            t_log = F.log_softmax(teacher(ids[:, :-1]) / temp, -1)
        keep = mask[:, 1:].bool()
        by_hand = (t_log.exp() * (t_log - s_log)).sum(-1)[keep].mean() * temp ** 2
        assert keep.sum() == 8
        loss = token_distill_loss(student, ids, mask, teacher=teacher, temperature=temp)
        assert float(loss.detach()) == pytest.approx(float(by_hand), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_tiny_study_token_level(tmp_path):
    """With distill.token_level the student pretrains on the teacher's BPE tokenizer (trained on the teacher's
    corpus) and a fifth student is distilled on the teacher's next-token distributions."""
    out = tmp_path / "distill"
    sets = [x for x in TINY if not x.startswith("tokenizer.")] + [
        'tokenizer.kind="bpe"', "tokenizer.vocab_size=300", f'distill.out_dir="{out}"', "distill.seeds=[0]",
        "distill.token_level=true", "distill.kl_temperature=2.0"]
    cfg, d = load_config_with_section(None, sets, "distill", ds.DistillConfig)
    result = ds.run_distill(cfg, d, log=lambda *_: None)
    seed = result["seeds"][0]
    assert list(seed["models"]) == ["teacher", "student_base", "student_sft", "distilled", ds.TOKEN_MODEL, "repaired"]
    assert ds.TOKEN_MODEL in seed["sft_final_loss"] and "distill_kl" in seed["timings_seconds"]
    vocab = {who: (out / "base" / f"seed0_{who}" / "tokenizer").iterdir() for who in ("teacher", "student")}
    files = {who: {f.name: f.read_bytes() for f in fs} for who, fs in vocab.items()}
    assert files["teacher"] == files["student"]
    assert {"kl_hallucination_up_on_teacher_only", "kl_abstention_up_on_student_only"} <= set(result["claim"])
    md = (out / "results.md").read_text()
    assert "student distilled token by token" in md and "After token-level distillation" in md
    assert (out / "seed0" / "distill_kl.jsonl").stat().st_size > 0
