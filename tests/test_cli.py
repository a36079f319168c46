"""The CLI end to end, and bad input: one clear line on stderr, exit code 2, no traceback, nothing lost."""

import subprocess

import pytest

from conftest import scalelab_cmd, subprocess_env, tiny_overrides


def run_cli(*args, timeout=300):
    return subprocess.run(scalelab_cmd(*args), env=subprocess_env(2), capture_output=True, text=True, timeout=timeout)


def sets(overrides):
    return sum((["--set", o] for o in overrides), [])


def assert_clean_error(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [l for l in result.stderr.strip().splitlines() if l.startswith("scalelab: error:")]
    assert len(lines) == 1, result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    r = run_cli("pretrain", *sets(tiny_overrides(run)))
    assert r.returncode == 0, r.stderr
    assert "val bpb" in r.stdout and "gram KN bpb" in r.stdout and "--- sample ---" in r.stdout
    return run


def test_pretrain_smoke(finished_run):
    assert (finished_run / "report.md").read_text().startswith("# Run report")


def test_sample_and_eval_on_a_finished_run(finished_run):
    r = run_cli("sample", str(finished_run), "--prompt", "Question:", "-n", "2", "--max-new-tokens", "5", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("--- sample ---") == 2
    again = run_cli("sample", str(finished_run), "--prompt", "Question:", "-n", "2", "--max-new-tokens", "5", "--seed", "3")
    assert again.stdout == r.stdout
    r = run_cli("eval", str(finished_run))
    assert r.returncode == 0 and "val bpb" in r.stdout, r.stderr


def test_existing_run_is_not_overwritten(finished_run):
    before = (finished_run / "metrics.jsonl").read_text()
    r = run_cli("pretrain", *sets(tiny_overrides(finished_run)))
    assert_clean_error(r, "already holds a checkpoint", "--resume")
    assert (finished_run / "metrics.jsonl").read_text() == before


def test_config_show_prints_resolved_toml():
    r = run_cli("config", "show", "--set", "train.optim.lr=0.01")
    assert r.returncode == 0 and "lr = 0.01" in r.stdout


def test_invalid_config_key():
    assert_clean_error(run_cli("config", "show", "--set", "train.lrr=1"), "unknown config key 'train.lrr'")


def test_missing_config_file(tmp_path):
    assert_clean_error(run_cli("pretrain", "--config", str(tmp_path / "nope.toml")), "config file not found", "nope.toml")


def test_missing_data_path(tmp_path):
    o = tiny_overrides(tmp_path / "r") + ["data.source=text", f'data.path="{tmp_path / "missing.txt"}"']
    assert_clean_error(run_cli("pretrain", *sets(o)), "missing.txt")


def test_empty_corpus(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    o = tiny_overrides(tmp_path / "r") + ["data.source=text", f'data.path="{empty}"']
    assert_clean_error(run_cli("pretrain", *sets(o)), "empty")


def test_corpus_shorter_than_one_block(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("to be or not\n\nto be\n")
    o = tiny_overrides(tmp_path / "r") + ["data.source=text", f'data.path="{short}"', "tokenizer.kind=byte"]
    assert_clean_error(run_cli("pretrain", *sets(o)), "shorter than one block")


def test_not_a_run_folder(tmp_path):
    assert_clean_error(run_cli("sample", str(tmp_path)), "not a run folder")
