"""The evaluation harness: registry, few-shot draws, CLI, and a run scored the same as its HF export."""

import json

import pytest
import torch

from posttrain_util import one_thread  # noqa: F401  (autouse: one torch thread)
from conftest import dev_import
from scalelab.cli import main
from scalelab.config import Config, to_toml
from scalelab.data.world import World, WorldConfig
from scalelab.errors import ScalelabError
from scalelab.evals import harness as H
from scalelab.evals.fewshot import draw_shots, parse_shots
from scalelab.evals.lm import ScalelabLM, load_lm
from scalelab.infer.export_hf import export_run
from scalelab.evals.probes import DIMENSIONS, build_probes, format_probe_table, run_probes
from scalelab.model.gpt import GPT, GPTConfig
from scalelab.tokenizer import build_tokenizer
from scalelab import checkpoint as ckpt

WORLD = WorldConfig(n_people=24, bios_per_person=1, extra_tasks={"arithmetic": 40})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder with a BPE tokenizer and a random (not zero-initialised) swiglu model: exportable,
    and its outputs depend on the context, so shots change the scores."""
    root = tmp_path_factory.mktemp("evalrun")
    world = World(WORLD)
    tok = build_tokenizer("bpe", world.pretraining_documents() * 2, 400)
    tok.save(root / "tokenizer")
    world.save(root / "world.json")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=256, depth=1, n_embd=32, head_dim=16, mlp="swiglu"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.3)
    ckpt.save_checkpoint(root / "checkpoints", model, torch.optim.SGD(model.parameters(), lr=0.1), 0, {})
    cfg = Config()
    cfg.model, cfg.tokenizer.kind, cfg.data.world = model.config, "bpe", WORLD
    (root / "config.toml").write_text(to_toml(cfg))
    return root


def test_registry_lists_every_kind_and_rejects_bad_names(capsys):
    names = H.available_tasks()
    for name in ("world_qa", "world_qa_mc", "world_qa_judged", "addition", "multiplication", "bio_bpb", "bio_generation"):
        assert name in names
    assert {H.get_task(n).kind for n in names} == set(H.KINDS)
    with pytest.raises(ScalelabError, match="unknown eval task 'nope'.*available: addition"):
        H.parse_tasks("world_qa,nope")
    with pytest.raises(ValueError, match="registered twice"):
        H.register_task("addition", kind="generate", metrics=("exact_match",), description="")(lambda ctx: None)
    with pytest.raises(ValueError, match="does not apply"):
        H.register_task("x", kind="choice", metrics=("bleu",), description="")
    with pytest.raises(ScalelabError, match="needs the run's synthetic world"):
        H.build_task("world_qa", H.TaskContext(world=None, n=5))
    assert main(["eval", "--list-tasks"]) == 0
    assert "bio_generation" in capsys.readouterr().out


def test_user_task_by_decorator(run):
    @H.register_task("echo_test", kind="generate", metrics=("exact_match",), description="repeat a letter")
    def echo(ctx):
        items = [H.EvalItem(f"Say {c}:", c) for c in "abcdefgh"]
        return H.TaskData(items[:4], items[4:])

    try:
        result = H.run_eval(load_lm(run), ["echo_test"], [0, 2], H.TaskContext(n=4))
        assert set(result["tasks"]["echo_test"]["shots"]) == {"0", "2"}
        assert result["tasks"]["echo_test"]["shots"]["2"]["n"] == 4
    finally:
        H._TASKS.pop("echo_test")


@pytest.mark.parametrize("task", sorted(H._TASKS))
def test_shots_never_leak_the_test_item(run, task):
    data = H.build_task(task, H.TaskContext(world=World.load(run / "world.json"), seed=3, n=12))
    spec = H.get_task(task)
    assert data.train and data.test
    for i, item in enumerate(data.test):
        pool = H.shot_pool(data.train, item)
        five = draw_shots(pool, item, 5, 3, i, spec.render_shot)
        assert five == draw_shots(pool, item, 5, 3, i, spec.render_shot)  # seeded
        assert draw_shots(pool, item, 2, 3, i, spec.render_shot) == five[:2]  # k shots are a prefix of k+1
        for s in five:
            assert s is not item and spec.render_shot(s) != spec.render_shot(item)
            assert item.group is None or s.group != item.group
    # even when the test item itself is in the pool, by object or as a copy with the same text
    item = data.test[0]
    twin = H.EvalItem(item.prompt, item.target, item.choices, item.label)
    pool = [item, twin] + H.shot_pool(data.train, item)[:3]
    shots = draw_shots(pool, item, 3, 0, 0, spec.render_shot)
    assert item not in shots and twin not in shots
    with pytest.raises(ScalelabError, match="only 3 usable"):
        draw_shots(pool, item, 4, 0, 0, spec.render_shot)


def test_parse_shots():
    assert parse_shots("5,0,1,1") == [0, 1, 5]
    for bad in ("", "a", "1,-2"):
        with pytest.raises(ScalelabError, match="--shots"):
            parse_shots(bad)


def test_cli_errors_exit_2_with_one_line(run, tmp_path, capsys):
    for argv, msg in (
        (["eval", str(run), "--tasks", "world_qa,nope"], "unknown eval task 'nope'"),
        (["eval", str(run), "--tasks", "addition", "--shots", "1,x"], "--shots"),
        (["eval", str(run), "--tasks", "addition", "--shots", "-1"], "--shots"),
        (["eval", str(run), "--tasks", "addition", "--n", "0"], "--n"),
        (["eval", str(tmp_path / "missing"), "--tasks", "addition"], "run folder not found"),
        (["eval", "--tasks", "addition"], "RUN_DIR"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and err.strip().count("\n") == 0


def test_old_eval_is_kept_without_new_flags(run, monkeypatch):
    seen = {}
    monkeypatch.setattr("scalelab.pipeline.evaluate", lambda run_dir, cfg: seen.setdefault("run", run_dir) and {
        "val_loss": 1.0, "val_bpb": 1.0, "ngram_order": 3, "ngram_val_bpb": 2.0, "bpb_improvement_over_ngram": 0.5})
    assert main(["eval", str(run)]) == 0
    assert seen["run"] == str(run)


def test_end_to_end_cli_writes_json_and_table(run, tmp_path, capsys):
    out = tmp_path / "results.json"
    argv = ["eval", str(run), "--tasks", "world_qa,world_qa_mc,addition,bio_bpb,bio_generation,world_qa_judged",
            "--shots", "0,1", "--n", "4", "--out", str(out), "--probes"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| world_qa | 1 | 4 |" in printed and "| refusal |" in printed
    result = json.loads(out.read_text())
    t = result["tasks"]
    assert set(t["world_qa"]["shots"]) == {"0", "1"}
    for name, keys in (("world_qa", ("exact_match", "edit_distance", "logprob_per_token")),
                       ("world_qa_mc", ("accuracy", "accuracy_norm")), ("addition", ("digit_credit",)),
                       ("bio_bpb", ("bits_per_byte",)), ("bio_generation", ("rouge_l", "bleu")),
                       ("world_qa_judged", ("win_rate",))):
        for k in keys:
            v = t[name]["shots"]["1"][k]
            assert isinstance(v, float) and v == v, (name, k)  # a number, not NaN
    # a shot is context: the random model's scores move with it
    assert t["world_qa"]["shots"]["0"]["logprob_per_token"] != t["world_qa"]["shots"]["1"]["logprob_per_token"]
    assert 0 < t["bio_bpb"]["shots"]["0"]["bits_per_byte"] < 20
    assert set(result["probes"]) == set(DIMENSIONS)


def test_win_rate_takes_any_judge(run):
    lm = load_lm(run)
    data = H.build_task("world_qa_judged", H.TaskContext(world=World.load(run / "world.json"), n=5))
    always = H.evaluate_task(lm, "world_qa_judged", data, 0, judge=lambda p, r, c: [1.0 if x != "I don't know" else 0.0
                                                                                  for x in c])
    assert always["win_rate"] == 1.0
    never = H.evaluate_task(lm, "world_qa_judged", data, 0, judge=lambda p, r, c: [0.0] * len(c))
    assert never["win_rate"] == 0.5  # all ties
    assert H.rule_judge([""] * 3, ["Port Alder"] * 3, ["port alder.", "I don't know", "Saltmere"]) == [1.0, 0.5, 0.0]


def test_probes_table(run):
    world = World.load(run / "world.json")
    probes = build_probes(world, n_per_dimension=3, seed=1)
    assert [p.dimension for p in probes].count("refusal") == 3
    names = {p.name for p in world.people}
    assert not any(name in p.prompt for p in probes if p.dimension == "refusal" for name in names)
    assert any("9." in p.prompt or "." in p.prompt for p in probes if p.dimension == "number_comparison")
    result = run_probes(load_lm(run), probes)
    assert set(result) == set(DIMENSIONS)
    assert all(0 <= r["pass_rate"] <= 1 and 0 <= r["choice_accuracy"] <= 1 for r in result.values())
    assert "| formatting | 3 |" in format_probe_table(result)
    assert set(d for d in (p.dimension for p in build_probes(None, 2))) == set(DIMENSIONS) - {"formatting"}


def test_hf_export_scores_like_the_run(run, tmp_path):
    dev_import("transformers")
    hf = export_run(run, tmp_path / "hf")
    assert (hf / "world.json").is_file()  # export carries the world along for the world tasks
    native, exported = load_lm(run), load_lm(hf)
    assert isinstance(native, ScalelabLM) and type(exported).__name__ == "HFLM"
    text = "Question: Where was Aria B. Drummond born?\nAnswer: Port Alder"
    assert exported.encode(text) == native.encode(text) and exported.bos_id == native.bos_id
    ctx = H.TaskContext(world=World.load(run / "world.json"), seed=0, n=4)
    tasks = ["world_qa", "world_qa_mc", "bio_bpb", "addition"]
    a = H.run_eval(native, tasks, [0, 1], ctx)
    b = H.run_eval(exported, tasks, [0, 1], ctx)
    for name in tasks:
        for k in ("0", "1"):
            ma, mb = a["tasks"][name]["shots"][k], b["tasks"][name]["shots"][k]
            for metric in H.get_task(name).metrics:
                assert ma[metric] == pytest.approx(mb[metric], abs=1e-4), (name, k, metric)
            assert [s["output"] for s in ma.get("samples", [])] == [s["output"] for s in mb.get("samples", [])]


def test_icl_study_end_to_end_tiny(tmp_path):
    from conftest import tiny_overrides
    from scalelab.config import load_config_with_section
    from scalelab.experiments.icl import ICLConfig, run_icl

    overrides = tiny_overrides(tmp_path / "unused", steps=3) + [
        f'icl.out_dir="{tmp_path / "icl"}"', "icl.depths=[1, 2]", "icl.shots=[0, 1]", "icl.n=3",
        'icl.tasks=["world_qa", "world_qa_mc"]', "model.block_size=128", "data.source=\"world\"",
        "data.world.extra_tasks={}", "train.eval_every=3"]
    cfg, a = load_config_with_section(None, overrides, "icl", ICLConfig)
    result = run_icl(cfg, a, log=lambda s: None)
    out = tmp_path / "icl"
    for f in ("results.json", "summary.md", "icl.png"):
        assert (out / f).is_file()
    assert [s["depth"] for s in result["sizes"]] == [1, 2]
    assert result["sizes"][0]["params"] < result["sizes"][1]["params"]
    assert result["gains"]["world_qa"]["metric"] == "exact_match"
    assert "| 2 |" in (out / "summary.md").read_text()
    with pytest.raises(ScalelabError, match="icl.depths"):
        run_icl(cfg, ICLConfig(out_dir=str(out), depths=[0]))
    with pytest.raises(ScalelabError, match="unknown eval task"):
        run_icl(cfg, ICLConfig(out_dir=str(out), tasks=["nope"]))


def test_cli_accepts_an_hf_folder(run, tmp_path, capsys):
    dev_import("transformers")
    hf = export_run(run, tmp_path / "hf")
    assert main(["eval", str(hf), "--tasks", "addition", "--shots", "0,1", "--n", "2"]) == 0
    assert "| addition | 1 | 2 |" in capsys.readouterr().out
    assert main(["eval", str(hf), "--tasks", "world_qa", "--n", "2"]) == 0
    # without the world the world tasks fail with a one-line error, not a traceback
    (hf / "world.json").unlink()
    assert main(["eval", str(hf), "--tasks", "world_qa", "--n", "2"]) == 2
    assert "world.json" in capsys.readouterr().err
