"""The report card: Markdown + self-contained HTML over pretraining, post-training, sweep and study folders."""

import json
import re
import shutil
import subprocess

import pytest

from conftest import dev_import, scalelab_cmd, subprocess_env, tiny_overrides
from scalelab.cli import main
from scalelab.config import Config, load_config, to_toml
from scalelab.errors import ScalelabError
from scalelab.pipeline import pretrain
from scalelab.report import collect_runs, write_report_card

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished pretraining run; its report stage already wrote the card."""
    run = tmp_path_factory.mktemp("card") / "tiny"
    pretrain(load_config(None, tiny_overrides(run, steps=6)))
    return run


def _png(path, color="tab:blue"):
    from scalelab.evals.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([1, 2, 3], [3, 2, 1], color=color, label="loss")
    ax.set(xlabel="compute", ylabel="loss")
    ax.legend()
    return save_figure(fig, path)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A DPO stage with only summary.json + config.toml, a scaling out_dir with a PNG, a study folder with a PNG."""
    root = tmp_path_factory.mktemp("synthetic")
    dpo = root / "dpo"
    dpo.mkdir()
    (dpo / "summary.json").write_text(json.dumps({"stage": "dpo", "init": "runs/sft", "steps": 20, "final_loss": 0.41,
                                                  "val_reward_accuracy": 0.75, "wall_seconds": 12.5}))
    (dpo / "config.toml").write_text(to_toml(Config()))
    (dpo / "eval_results.json").write_text(json.dumps({"rouge_l": 0.31, "bleu": 12.0, "note": "text is skipped"}))
    sweep = root / "sweep"
    sweep.mkdir()
    (sweep / "results.csv").write_text("name,N,D,C,steps,loss,wall_seconds\nd1_t1000,1000,1000,6000000,10,3.2,1.5\n"
                                       "d2_t1000,2000,1000,12000000,10,3.0,2.5\n")
    (sweep / "fit.json").write_text(json.dumps({"chinchilla": {"E": 1.5, "alpha": 0.34, "ci": {"E": [1, 2]}}}))
    _png(sweep / "loss_vs_compute.png")
    study = root / "study"
    study.mkdir()
    _png(study / "abstain.png", "tab:red")
    (study / "results.md").write_text("# A study\n\n| condition | acc |\n|---|---|\n| a | 0.5 |\n")
    return root


def test_card_from_a_pretraining_run(tiny_run):
    md = (tiny_run / "report_card.md").read_text()
    for heading in ("## Metrics by stage", "## Time and compute", "## Loss curves", "## Plots", "## Samples",
                    "## Machine", "## Run configs"):
        assert heading in md, heading
    assert "Pretraining (base)" in md and "flops_per_token x tokens processed" in md
    assert "![" in md and "(report_card_loss.png)" in md and (tiny_run / "report_card_loss.png").stat().st_size > 0
    assert "## Study results" not in md  # nothing to show: left out
    [run] = collect_runs([tiny_run])
    setup = next(r for r in run.records if r["kind"] == "setup")
    assert run.flops == setup["flops_per_token"] * run.tokens and run.tokens > 0


def test_cli_keeps_report_md_for_one_pretraining_run(tiny_run):
    (tiny_run / "report.md").unlink()
    (tiny_run / "report_card.html").unlink()
    assert main(["report", str(tiny_run)]) == 0
    assert (tiny_run / "report.md").is_file() and (tiny_run / "report_card.html").is_file()


def test_card_from_synthetic_stage_sweep_and_study(synthetic, tmp_path):
    md_path, html_path = write_report_card([synthetic / "dpo", synthetic / "sweep", synthetic / "study"],
                                           out=tmp_path / "card", title="Synthetic")
    md = md_path.read_text()
    assert md.startswith("# Synthetic")
    assert "**DPO**" in md and "| val_reward_accuracy | 0.75 |" in md and "| eval_results.rouge_l | 0.31 |" in md
    assert "**Scaling sweep**" in md and "| chinchilla.alpha | 0.34 |" in md
    assert "loss_vs_compute.png" in md and "abstain.png" in md and "study/results.md" in md
    assert "1.800e+07" in md  # the sweep's FLOPs: the sum of its runs' C
    assert "## Loss curves" not in md and "## Samples" not in md  # no metrics.jsonl, no samples: left out
    assert "**dpo: config.toml**" in md
    html = html_path.read_text()
    assert "<details><summary>dpo: config.toml</summary>" in html


def test_card_shows_the_eval_harness_per_task_and_shot_count(tmp_path):
    """``scalelab eval --out RUN/eval_results.json`` nests metrics four levels deep; each reaches the card."""
    run = tmp_path / "imported"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"stage": "import", "params": 1000}))
    (run / "config.toml").write_text(to_toml(Config()))
    harness = {"model": "m", "n": 100, "seed": 0, "shots": [0, 3], "tasks": {"addition": {
        "kind": "generate", "note": "text", "shots": {"0": {"n": 100, "exact_match": 0.0, "samples": []},
                                                      "3": {"n": 100, "exact_match": 0.02, "digit_credit": 0.2}}}}}
    (run / "eval_results.json").write_text(json.dumps(harness))
    md = write_report_card([run], out=tmp_path / "card")[0].read_text()
    assert "| eval_results.addition.3-shot.exact_match | 0.02 |" in md
    assert "| eval_results.addition.0-shot.exact_match | 0 |" in md and "| eval_results.n | 100 |" in md


def test_not_a_run_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScalelabError, match="not a run folder"):
        write_report_card([tmp_path / "empty"])
    for target in (tmp_path / "empty", tmp_path / "missing"):
        assert main(["report", str(target)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("scalelab: error:") and len(err.strip().splitlines()) == 1
    # the installed command too: exit code 2, one line on stderr
    r = subprocess.run(scalelab_cmd("report", str(tmp_path / "empty")), capture_output=True, text=True,
                       env=subprocess_env())
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def _external_references(html: str) -> list[str]:
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', html)
    return [r for r in refs if not (r.startswith("data:") or r.startswith("#"))]


def test_html_is_self_contained(tiny_run, synthetic, tmp_path):
    _, html_path = write_report_card([tiny_run, synthetic / "dpo", synthetic / "sweep", synthetic / "study"],
                                     out=tmp_path / "card")
    html = html_path.read_text()
    assert "http://" not in html and "https://" not in html and 'src="file' not in html
    assert _external_references(html) == []
    assert html.count('<img src="data:image/png;base64,') == 5  # loss overview, loss, subtasks, sweep, study


def test_html_renders_in_headless_chromium(tiny_run, synthetic, tmp_path):
    sync_api = dev_import("playwright.sync_api")
    if not shutil.which(CHROMIUM):
        pytest.fail("chromium is not installed: `make test` installs it (apt-get install chromium chromium-driver)")
    _, html_path = write_report_card([tiny_run, synthetic / "dpo", synthetic / "sweep", synthetic / "study"],
                                     out=tmp_path / "card", title="Browser check")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(html_path.resolve().as_uri())
            page.wait_for_load_state("load")
            widths = page.evaluate("[...document.images].map(i => i.complete ? i.naturalWidth : 0)")
            assert len(widths) == 5 and all(w > 0 for w in widths), widths
            assert page.locator("h1").inner_text() == "Browser check"
            headings = page.locator("h2").all_inner_texts()
            for expected in ("Metrics by stage", "Time and compute", "Loss curves", "Plots", "Study results", "Samples",
                             "Machine", "Run configs"):
                assert expected in headings, (expected, headings)
            config = page.locator("details", has_text="tiny: config.toml").first
            assert not config.evaluate("d => d.open")  # configs start folded
        finally:
            browser.close()
