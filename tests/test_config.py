import re
import tempfile
from pathlib import Path

import pytest

from scalelab.config import Config, OptimConfig, load_config, to_toml
from scalelab.errors import ScalelabError
from scalelab.train.optim import lr_at


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('[train]\nsteps = 10\n[train.optim]\nlr = 1e-3\n[model]\ndepth = 2\n[data.world]\nn_people = 50\n')
    cfg = load_config(f, ["train.optim.lr=3e-4", "model.qk_norm=false", "run.name=x", 'sample.stop=["\\n"]',
                          "data.world.extra_tasks={arithmetic = 5}"])
    assert cfg.train.optim.lr == 3e-4 and cfg.train.steps == 10 and cfg.model.depth == 2
    assert cfg.model.qk_norm is False and cfg.run.name == "x" and cfg.sample.stop == ["\n"]
    assert cfg.data.world.n_people == 50 and cfg.data.world.extra_tasks == {"arithmetic": 5}


def test_bare_string_override_and_int_widening():
    cfg = load_config(None, ["run.out_dir=runs/abc", "train.optim.lr=1"])
    assert cfg.run.out_dir == "runs/abc" and cfg.train.optim.lr == 1.0 and isinstance(cfg.train.optim.lr, float)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown config key 'train.lrr'"),
        ("bogus.x=1", "unknown config key 'bogus'"),
        ("train.steps=abc", "train.steps: expected an integer"),
        ("train.steps=1.5", "train.steps: expected an integer"),
        ("model.qk_norm=maybe", "model.qk_norm: expected true or false"),
        ("train.optim.schedule=linear", "train.optim.schedule must be one of"),
        ("train.optim.lr", "expected key=value"),
        ("data.source=csv", "data.source must be one of"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(ScalelabError, match=message):
        load_config(None, [override])


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ScalelabError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr=")
    with pytest.raises(ScalelabError, match="not valid TOML"):
        load_config(bad)


def test_toml_round_trip(tmp_path):
    cfg = load_config(None, ["train.optim.lr=2e-4", "sample.stop=['a', 'b']", "model.n_embd=96", "sample.prompt=\"x\\ny\""])
    f = tmp_path / "c.toml"
    f.write_text(to_toml(cfg))
    assert load_config(f) == cfg
    assert Config() == load_config(None)


def test_repo_recipes_load():
    """Every recipe under configs/ loads; an experiment's recipe also carries its own section."""
    from pathlib import Path

    import importlib

    from scalelab.config import read_toml
    from scalelab.config import load_config_with_section

    from scalelab.cli.experiments import ACTIONS

    # TOML section -> the study's config dataclass, for every registered study that has a STUDY
    studies = [getattr(importlib.import_module(module), "STUDY", None) for module, _ in ACTIONS.values()]
    experiment_sections = {study.name: study.config_class for study in studies if study is not None}
    assert {"abstain", "distill", "emergence_addition", "reward_overopt"} <= set(experiment_sections)
    recipes = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.toml"))
    assert recipes
    for recipe in recipes:
        sections = [k for k in read_toml(recipe) if k in experiment_sections]
        if sections:
            load_config_with_section(recipe, [], sections[0], experiment_sections[sections[0]])
        else:
            load_config(recipe)


def test_schedules():
    t = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert lr_at(0, t, 100) == pytest.approx(0.1) and lr_at(9, t, 100) == pytest.approx(1.0)
    assert lr_at(10, t, 100) == pytest.approx(1.0) and lr_at(100, t, 100) == pytest.approx(0.1)
    assert lr_at(55, t, 100) == pytest.approx(0.55)
    w = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, w, 100) == 1.0 and lr_at(79, w, 100) == 1.0 and lr_at(99, w, 100) == pytest.approx(0.0)
    assert lr_at(89, w, 100) == pytest.approx(0.5)
    c = OptimConfig(lr=2.0, warmup_steps=4, schedule="constant")
    assert [lr_at(s, c, 10) for s in (0, 3, 9)] == [0.5, 2.0, 2.0]


def test_every_stage_has_one_optimizer_section_that_inherits_from_train():
    cfg = load_config(None, ["train.optim.weight_decay=0.0", "train.optim.grad_clip=0.5", "train.optim.beta2=0.99",
                             "sft.optim.lr=1e-3"])
    assert cfg.train.optim.weight_decay == 0.0 and cfg.train.optim.lr == 3e-3
    # SFT keeps its own rate and warmup, and takes the rest from [train.optim]
    assert (cfg.sft.optim.lr, cfg.sft.optim.warmup_steps) == (1e-3, 20)
    assert (cfg.sft.optim.weight_decay, cfg.sft.optim.grad_clip, cfg.sft.optim.beta2) == (0.0, 0.5, 0.99)
    assert (cfg.rm.optim.lr, cfg.dpo.optim.lr) == (1e-4, 5e-5)
    # the RL stages fix a constant rate and their betas; GRPO also no weight decay
    for optim in (cfg.ppo.optim, cfg.ppo.critic_optim, cfg.grpo.optim):
        assert optim.schedule == "constant" and optim.warmup_steps == 0 and optim.beta2 == 0.95
        assert optim.grad_clip == 0.5
    assert (cfg.ppo.optim.lr, cfg.ppo.critic_optim.lr, cfg.grpo.optim.lr, cfg.grpo.optim.weight_decay) == (1e-5, 1e-4, 1e-5, 0.0)
    # a written run config reads back as the same config
    assert load_config_text(to_toml(cfg)) == cfg


def load_config_text(text: str):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.toml"
        path.write_text(text)
        return load_config(path)


def test_old_optimizer_keys_are_read_with_a_warning(tmp_path):
    """Run folders written before [STAGE.optim] existed still open (the old keys are moved, for one release)."""
    f = tmp_path / "old.toml"
    f.write_text('[train]\nlr = 1e-3\nweight_decay = 0.0\n[sft]\nlr = 2e-4\nwarmup_steps = 5\n'
                 '[grpo]\nlr = 3e-5\nwarmup = 4\n[ppo]\ncritic_lr = 2e-4\n')
    with pytest.warns(FutureWarning, match="train.lr -> train.optim.lr"):
        cfg = load_config(f, ["train.grad_clip=0.5"])
    assert (cfg.train.optim.lr, cfg.train.optim.weight_decay, cfg.train.optim.grad_clip) == (1e-3, 0.0, 0.5)
    assert (cfg.sft.optim.lr, cfg.sft.optim.warmup_steps, cfg.sft.optim.weight_decay) == (2e-4, 5, 0.0)
    assert (cfg.grpo.optim.lr, cfg.grpo.optim.warmup_steps, cfg.ppo.critic_optim.lr) == (3e-5, 4, 2e-4)


@pytest.mark.parametrize("override, message", [
    ("sft.optim.schedule=linear", "sft.optim.schedule must be one of cosine, wsd, constant"),
    ("grpo.optim.lr=0", "grpo.optim.lr must be positive"),
    ("train.optim.beta2=1.0", "train.optim.beta1 and train.optim.beta2 must be in [0, 1)"),
    ("ppo.critic_optim.name=sgd", "ppo.critic_optim.name must be one of adamw"),
    ("dpo.optim.lerning_rate=1", "unknown config key 'dpo.optim.lerning_rate'"),
])
def test_bad_optimizer_values_name_their_key(override, message):
    with pytest.raises(ScalelabError, match=re.escape(message)):
        load_config(None, [override])


def test_a_study_key_that_moved_to_a_stage_loads_there_with_a_warning():
    from dataclasses import dataclass

    from scalelab.config import load_config_with_section

    @dataclass
    class Design:
        out_dir: str = "x"

    moved = {"batch_size": ("sft.batch_size", "rm.batch_size"), "sft_lr": "sft.optim.lr"}
    with pytest.warns(FutureWarning, match="study.batch_size -> sft.batch_size, study.batch_size -> rm.batch_size"):
        cfg, own = load_config_with_section(None, ["study.batch_size=7", "study.sft_lr=2e-3", 'study.out_dir="y"'],
                                            "study", Design, moved)
    assert (cfg.sft.batch_size, cfg.rm.batch_size, cfg.sft.optim.lr, own.out_dir) == (7, 7, 2e-3, "y")
    assert cfg.sft.optim.warmup_steps == 20  # the stage's other keys as before
    with pytest.warns(FutureWarning, match=r"study.sft_lr \(ignored: sft.optim.lr is set\)"):
        cfg, _ = load_config_with_section(None, ["sft.optim.lr=1e-3", "study.sft_lr=2e-3"], "study", Design, moved)
    assert cfg.sft.optim.lr == 1e-3
    with pytest.raises(ScalelabError, match="unknown config key 'study.sft_rate'"):
        load_config_with_section(None, ["study.sft_rate=1"], "study", Design, moved)

