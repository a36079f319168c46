"""The sweep runner: plans, resume after a partial or crashed sweep, and clear errors."""

import json

import pytest

from conftest import dev_import, tiny_overrides
from scalelab.config import load_config
from scalelab.errors import ScalelabError
from scalelab.scaling import sweep


def sweep_cfg(tmp_path, *extra):
    o = tiny_overrides(tmp_path / "unused") + [
        f'scaling.out_dir="{tmp_path / "sweep"}"', "scaling.depths=[1, 2]", "scaling.tokens=[512, 1024]",
        "scaling.n_bootstrap=5", *extra,
    ]
    return load_config(None, o)


def test_sweep_runs_the_grid_and_resumes(tmp_path, monkeypatch):
    cfg = sweep_cfg(tmp_path)
    rows = sweep.run_sweep(cfg, progress=False)
    assert sorted(r["name"] for r in rows) == ["d1_t1024", "d1_t512", "d2_t1024", "d2_t512"]
    table = sweep.read_results(tmp_path / "sweep" / "results.csv")
    assert len(table) == 4
    for r in table:
        assert r["N"] == r["N_non_embedding"] and r["N_total"] > r["N"]
        assert r["D"] == r["steps"] * 8 * 32 and r["C"] > 0 and r["loss"] > 0 and r["wall_seconds"] > 0

    # a partial sweep: drop one finished row and leave a half-written folder for it (a crash)
    kept = [r for r in table if r["name"] != "d2_t1024"]
    sweep._write_results(tmp_path / "sweep" / "results.csv", kept)
    (tmp_path / "sweep" / "runs" / "d2_t1024" / "metrics.jsonl").write_text('{"kind": "train", "step": 1')
    trained = []
    real = sweep.train_one
    monkeypatch.setattr(sweep, "train_one", lambda *a, **k: trained.append(a[1].name) or real(*a, **k))
    rows = sweep.run_sweep(cfg, progress=False)
    assert trained == ["d2_t1024"] and len(rows) == 4
    pd = dev_import("pandas")
    assert len(pd.read_csv(tmp_path / "sweep" / "results.csv")) == 4


def test_isoflop_plan_spends_each_budget(tmp_path):
    cfg = sweep_cfg(tmp_path, "scaling.design=isoflop", "scaling.budgets=[1e9, 4e9]", "scaling.depths=[1, 2, 3]")
    specs = sweep.plan_runs(cfg, vocab_size=300)
    assert {s.budget for s in specs} == {1e9, 4e9} and len(specs) == 6
    small = [s for s in specs if s.budget == 1e9]
    assert small[0].tokens > small[-1].tokens  # bigger models get fewer tokens at equal compute


def test_triangle_grid_skips_the_costly_corner(tmp_path):
    cfg = sweep_cfg(tmp_path, "scaling.depths=[1, 2, 3]", "scaling.tokens=[512, 1024, 2048]")
    full = sweep.plan_runs(cfg, vocab_size=300)
    cost = {s.name: sweep._model_for(cfg, s.depth, 300).flops_per_token() * s.tokens for s in full}
    cap = sorted(cost.values())[-3]  # keep all but the two most expensive points
    cfg.scaling.max_run_flops = cap
    kept = {s.name for s in sweep.plan_runs(cfg, vocab_size=300)}
    assert kept == {n for n, c in cost.items() if c <= cap} and "d1_t2048" in kept and "d3_t2048" not in kept


@pytest.mark.parametrize("extra, message", [
    (("scaling.max_run_flops=1.0",), "max_run_flops"),
    (("scaling.depths=[2, 2]",), "at least 2 distinct depths"),
    (("scaling.tokens=[512]",), "2 distinct token budgets"),
    (("scaling.design=isoflop", "scaling.budgets=[1e9]"), "at least 2 budgets"),
    (("scaling.design=isoflop", "scaling.budgets=[10.0, 20.0]"), "no budget pays"),
])
def test_degenerate_grids_are_clear_errors(tmp_path, extra, message):
    with pytest.raises(ScalelabError, match=message):
        sweep.plan_runs(sweep_cfg(tmp_path, *extra), vocab_size=300)


def test_fit_needs_finished_runs(tmp_path):
    with pytest.raises(ScalelabError, match="no finished runs"):
        sweep.fit_sweep(sweep_cfg(tmp_path))


def test_shakespeare_preset_sweeps_and_fits(tmp_path):
    """The tiny-Shakespeare preset, shrunk: the same code path on a one-file text corpus (char tokens)."""
    from conftest import SHAKESPEARE

    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is not on this machine")
    small = [
        f'data.path="{SHAKESPEARE}"', "run.progress=false", f'scaling.out_dir="{tmp_path / "sweep"}"',
        "model.block_size=32", "model.head_dim=16", "model.aspect_ratio=16", "train.batch_size=4",
        "train.eval_batches=2", "scaling.depths=[1, 2, 3]", "scaling.tokens=[1024, 2048, 4096]", "scaling.n_bootstrap=3",
    ]
    cfg = load_config("configs/scaling_shakespeare.toml", small)
    rows = sweep.run_sweep(cfg, progress=False)
    assert len(rows) == 9 and all(r["loss"] > 0 for r in rows)
    report = sweep.fit_sweep(cfg)
    assert report["n_runs"] == 9 and (tmp_path / "sweep" / "fit_chinchilla.png").is_file()
    assert "kaplan" in report and "Kaplan fit" in (tmp_path / "sweep" / "fit.md").read_text()


def test_predict_writes_the_forecast_before_training_then_backtests(tmp_path, monkeypatch):
    cfg = sweep_cfg(tmp_path, "scaling.depths=[1, 2, 3]", "scaling.tokens=[512, 1024, 2048]",
                    "scaling.predict_depth=4", "scaling.predict_tokens=2048",
                    'scaling.forecast_forms=["chinchilla", "kaplan"]')
    sweep.run_sweep(cfg, progress=False)
    out = tmp_path / "sweep"
    real, seen = sweep.train_one, []

    def train_one(*a, **k):
        seen.append(json.loads((out / "predictions" / "predict_d4_t2048.json").read_text()))
        return real(*a, **k)

    monkeypatch.setattr(sweep, "train_one", train_one)
    f = sweep.predict_then_verify(cfg)
    assert len(seen) == 1 and "actual_loss" not in seen[0]  # on disk, without the answer, before the run
    assert seen[0]["predicted_loss"] == f["predicted_loss"] and f["backtest"] is False
    forms = f["forms"]
    assert set(forms) == {"chinchilla", "kaplan"}
    assert f["predicted_loss"] == pytest.approx((forms["chinchilla"]["predicted_loss"] + forms["kaplan"]["predicted_loss"]) / 2)
    assert f["interval_95"][0] == min(g["interval_95"][0] for g in forms.values())
    assert f["interval_95"][1] == max(g["interval_95"][1] for g in forms.values())
    assert f["relative_error"] == pytest.approx(abs(f["predicted_loss"] - f["actual_loss"]) / f["actual_loss"])
    assert "kaplan" in sweep.describe_forecast(f) and (out / "forecasts.png").stat().st_size > 0

    # the target has run: a second forecast reuses it and is labelled a backtest, not a prediction
    again = sweep.predict_then_verify(cfg)
    assert len(seen) == 1 and again["backtest"] is True and again["actual_loss"] == f["actual_loss"]
    assert "backtest" in sweep.describe_forecast(again)


def test_unknown_forecast_form_is_a_clear_error(tmp_path):
    grid = ("scaling.depths=[1, 2, 3]", "scaling.tokens=[512, 1024, 2048]", "scaling.predict_depth=4",
            "scaling.predict_tokens=2048")
    sweep.run_sweep(sweep_cfg(tmp_path, *grid), progress=False)
    # refused when the config loads, before any fit or forecast is written
    with pytest.raises(ScalelabError, match="forecast_forms"):
        sweep.predict_then_verify(sweep_cfg(tmp_path, *grid, 'scaling.forecast_forms=["kaplan", "ols"]'))
    assert not (tmp_path / "sweep" / "prediction.json").exists()
