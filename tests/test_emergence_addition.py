import json
import math
import pytest
import torch

from scalelab.cli.main import main
from scalelab.config import load_config_with_section
from scalelab.data.generators import generate
from scalelab.errors import ScalelabError
from scalelab.evals import sharpness as sh
from scalelab.experiments import emergence_addition as ea
from scalelab.pipeline import pretrain
from scalelab.run import Run
from scalelab import checkpoint as ckpt


def test_sharpness_rule():
    c = [2.0**i for i in range(6)]  # 32x, 2x apart
    steady = sh.sharpness(c, [0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert steady["sharpness"] == pytest.approx(0.2) and steady["smooth_share"] == pytest.approx(0.2)
    assert steady["resolved"] and not sh.is_sharp(steady["sharpness"])
    jump = sh.sharpness(c, [0, 0, 0, 1, 1, 1])
    assert jump["sharpness"] == pytest.approx(1.0) and jump["window"] == pytest.approx((4.0, 8.0))
    # lower-is-better metrics are turned round, so a falling error is a rise
    assert sh.sharpness(c, [1, 1, 1, 0, 0, 0], higher_is_better=False)["sharpness"] == pytest.approx(1.0)
    # points 4x apart cannot resolve a jump: a straight line spreads it over two doublings
    coarse = sh.sharpness([1, 4, 16], [0, 0, 1])
    assert coarse["sharpness"] == pytest.approx(0.5) and not coarse["resolved"]
    assert math.isnan(sh.sharpness(c, [1, 1, 1, 1, 1, 1])["sharpness"])  # no rise, no sharpness
    assert math.isnan(sh.sharpness(c, [1, 0.5, 0.4, 0.3, 0.2, 0])["sharpness"])  # it falls
    assert sh.sharpness([2, 1], [1, 0])["sharpness"] == 1.0  # sorted by compute; a span of one doubling
    with pytest.raises(ScalelabError, match="distinct compute"):
        sh.sharpness([1, 1, 2], [0, 1, 2])
    with pytest.raises(ScalelabError, match="at least 2"):
        sh.sharpness([1], [0])
    assert sh.mirage_prediction(0.9, 4) == pytest.approx(0.9**4)


def test_reversed_addition_generator():
    exs = generate("addition_reversed", 50, seed=3, digits=3)
    assert exs == generate("addition_reversed", 50, seed=3, digits=3)
    for e in exs:
        a, b = e.meta["a"], e.meta["b"]
        assert e.prompt == f"{a}+{b}=" and len(e.answer) == 4
        assert int(e.answer[::-1]) == a + b and e.text == f"{a}+{b}= {e.answer}"
    assert generate("addition_reversed", 1, digits=1)[0].answer[::-1].lstrip("0") in {str(i) for i in range(19)} | {""}


def test_digit_accuracy_and_data_split():
    assert ea.digit_accuracy("9141", "9141") == 1.0
    assert ea.digit_accuracy("914", "9141") == 0.75  # a missing digit is wrong
    assert ea.digit_accuracy("1141", "9141") == 0.75
    assert ea.digit_accuracy("", "9141") == 0.0
    a = ea.AdditionEmergenceConfig(digits=2, train_examples=500, test_examples=50)
    train, test = ea.make_data(a)
    keys = lambda xs: {(e.meta["a"], e.meta["b"]) for e in xs}  # noqa: E731
    assert len(train) == 500 and len(test) == 50 and len(keys(train)) == 500 and not keys(train) & keys(test)


def _rows(curves: dict[str, list[float]], seeds=(0, 1)) -> list[dict]:
    rows = []
    for seed in seeds:
        for i in range(len(curves["exact_match"])):
            rows.append({"depth": 1, "steps": 2**i, "seed": seed, "params": 10, "C": 2.0**i, "n": 100,
                         **{m: v[i] for m, v in curves.items()}})
    return rows


def test_analysis_follows_the_data():
    a = ea.AdditionEmergenceConfig(digits=3, seeds=[0, 1])
    # per-digit accuracy rises steadily, exact match = its 4th power: the mirage case
    da = [0.2, 0.36, 0.52, 0.68, 0.84, 1.0]
    mirage = ea.analyse(_rows({"exact_match": [d**4 for d in da], "digit_accuracy": da,
                               "edit_distance": [1 - d for d in da], "loglik": [-9, -7.4, -5.8, -4.2, -2.6, -1.0]}), a)
    assert mirage["sharpness"]["exact_match"]["sharp"] and mirage["claim_held"]
    assert mirage["mirage_holds_at"] == 6 and mirage["points"][2]["exact_match"]["std"] == 0.0
    assert "the claim held" in ea.verdict(mirage)
    # every metric jumps at the same doubling: a real change in the model
    step = [0, 0, 0, 1, 1, 1]
    real = ea.analyse(_rows({"exact_match": step, "digit_accuracy": [0.3, 0.3, 0.3, 1, 1, 1],
                             "edit_distance": [0.7, 0.7, 0.7, 0, 0, 0], "loglik": [-9, -9, -9, -1, -1, -1]}), a)
    assert not real["claim_held"] and "did not hold" in ea.verdict(real)
    md = ea.summary_markdown(real)
    assert "| exact_match |" in md and "(digit acc)^4" in md


def test_bad_config_is_refused(capsys):
    cfg, a = load_config_with_section(None, ["tokenizer.kind=char"], ea.SECTION, ea.AdditionEmergenceConfig)
    with pytest.raises(ScalelabError, match="equally long"):
        ea.validate(ea.AdditionEmergenceConfig(depths=[1], steps=[1, 2]), cfg)
    with pytest.raises(ScalelabError, match="only 100 problems"):
        ea.validate(ea.AdditionEmergenceConfig(digits=1, train_examples=200), cfg)
    cfg_bpe, _ = load_config_with_section(None, [], ea.SECTION, ea.AdditionEmergenceConfig)
    with pytest.raises(ScalelabError, match="tokenizer.kind = 'char'"):
        ea.validate(a, cfg_bpe)
    assert main(["experiments", "emergence-addition", "--set", "tokenizer.kind=char",
                 "--set", "emergence_addition.depths=[1, 2]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scalelab: error:") and "equally long" in err and err.count("\n") == 1


TINY = ["tokenizer.kind=char", "model.block_size=32", "model.aspect_ratio=16", "model.head_dim=16",
        "train.batch_size=4", "train.eval_every=1000", "train.eval_batches=1", "train.optim.warmup_steps=1",
        "run.progress=false", "run.device=cpu", "train.optim.schedule=constant"]


def test_training_plan_reuses_checkpoints_only_under_a_constant_rate():
    a = ea.AdditionEmergenceConfig(depths=[1, 1, 1, 2], steps=[100, 200, 400, 400])
    cfg, _ = load_config_with_section(None, ["train.optim.schedule=constant"], ea.SECTION, ea.AdditionEmergenceConfig)
    assert ea.training_plan(cfg, a) == [(1, 400, [100, 200, 400]), (2, 400, [400])]
    cosine, _ = load_config_with_section(None, ["train.optim.schedule=cosine"], ea.SECTION, ea.AdditionEmergenceConfig)
    assert ea.training_plan(cosine, a) == [(1, 100, [100]), (1, 200, [200]), (1, 400, [400]), (2, 400, [400])]


def test_tiny_study_end_to_end(tmp_path):
    overrides = TINY + [f"emergence_addition.out_dir={tmp_path / 'study'}", "emergence_addition.digits=2",
                        "emergence_addition.train_examples=300", "emergence_addition.test_examples=8",
                        "emergence_addition.depths=[1, 1]", "emergence_addition.steps=[2, 4]",
                        "emergence_addition.seeds=[0, 1]"]
    cfg, a = load_config_with_section(None, overrides, ea.SECTION, ea.AdditionEmergenceConfig)
    result = ea.run_emergence_addition(cfg, a, log=lambda s: None)
    out = tmp_path / "study"
    assert len(result["rows"]) == 4 and len(result["points"]) == 2
    assert result["points"][1]["C"] == pytest.approx(2 * result["points"][0]["C"])
    for r in result["rows"]:
        assert 0 <= r["exact_match"] <= r["digit_accuracy"] <= 1 and r["loglik"] < 0 and r["edit_distance"] >= 0
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["sharpness"]) == set(ea.METRICS)
    assert (out / "emergence_addition.png").stat().st_size > 0 and "| depth |" in (out / "results.md").read_text()
    with pytest.raises(ScalelabError, match="already holds results.json"):
        ea.run_emergence_addition(cfg, a, log=lambda s: None)
    # the 2-step point was scored from the 4-step run's checkpoint: it must be the 2-step run itself
    run = out / "runs" / "d1_s4_seed0"
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000002", "step_000004"]
    short = ea._run_config(cfg, out / "data" / "train.jsonl", tmp_path / "alone", 1, 2, 0, ckpt_every=0)
    pretrain(short, overwrite=True, stages=())
    alone = Run.open(short.run.out_dir).load_model().state_dict()
    branched = ckpt.load_model(run / "checkpoints" / "step_000002").state_dict()
    assert all(torch.equal(alone[k], branched[k]) for k in alone)
