import pytest

from scalelab.config import Config, TrainConfig, load_config, to_toml
from scalelab.errors import ScalelabError
from scalelab.train.optim import lr_at


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('[train]\nlr = 1e-3\nsteps = 10\n[model]\ndepth = 2\n[data.world]\nn_people = 50\n')
    cfg = load_config(f, ["train.lr=3e-4", "model.qk_norm=false", "run.name=x", 'sample.stop=["\\n"]',
                          "data.world.extra_tasks={arithmetic = 5}"])
    assert cfg.train.lr == 3e-4 and cfg.train.steps == 10 and cfg.model.depth == 2
    assert cfg.model.qk_norm is False and cfg.run.name == "x" and cfg.sample.stop == ["\n"]
    assert cfg.data.world.n_people == 50 and cfg.data.world.extra_tasks == {"arithmetic": 5}


def test_bare_string_override_and_int_widening():
    cfg = load_config(None, ["run.out_dir=runs/abc", "train.lr=1"])
    assert cfg.run.out_dir == "runs/abc" and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown config key 'train.lrr'"),
        ("bogus.x=1", "unknown config key 'bogus'"),
        ("train.steps=abc", "train.steps: expected an integer"),
        ("train.steps=1.5", "train.steps: expected an integer"),
        ("model.qk_norm=maybe", "model.qk_norm: expected true or false"),
        ("train.schedule=linear", "train.schedule must be one of"),
        ("train.lr", "expected key=value"),
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
    cfg = load_config(None, ["train.lr=2e-4", "sample.stop=['a', 'b']", "model.n_embd=96", "sample.prompt=\"x\\ny\""])
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

    # TOML section -> (study module, its config dataclass)
    studies = {"abstain": ("abstain", "AbstainConfig"), "flan": ("flan", "FlanConfig"),
               "reward_hacking": ("reward_hacking", "RewardHackingConfig"), "icl": ("icl", "ICLConfig"),
               "adaptation": ("adaptation", "AdaptationConfig"), "families": ("families", "FamiliesConfig"),
               "reasoning": ("reasoning", "ReasoningConfig")}
    experiment_sections = {section: getattr(importlib.import_module(f"scalelab.experiments.{module}"), cls)
                           for section, (module, cls) in studies.items()}
    recipes = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.toml"))
    assert recipes
    for recipe in recipes:
        sections = [k for k in read_toml(recipe) if k in experiment_sections]
        if sections:
            load_config_with_section(recipe, [], sections[0], experiment_sections[sections[0]])
        else:
            load_config(recipe)


def test_schedules():
    t = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert lr_at(0, t) == pytest.approx(0.1) and lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(10, t) == pytest.approx(1.0) and lr_at(100, t) == pytest.approx(0.1)
    assert lr_at(55, t) == pytest.approx(0.55)
    w = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, w) == 1.0 and lr_at(79, w) == 1.0 and lr_at(99, w) == pytest.approx(0.0)
    assert lr_at(89, w) == pytest.approx(0.5)
