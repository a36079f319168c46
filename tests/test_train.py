"""Trainer behaviour: exact resume, data-parallel equivalence, run-folder contents."""

import subprocess

import pytest

from conftest import scalelab_cmd, subprocess_env, tiny_overrides
from scalelab.config import load_config
from scalelab.parallel.dist import DistEnv
from scalelab.pipeline import prepare, pretrain
from scalelab.train.metrics import read_metrics
from scalelab.train.trainer import Trainer


def _trainer(cfg, run_dir):
    data = prepare(cfg, run_dir)
    cfg.model.vocab_size = data.tokenizer.vocab_size
    return Trainer(cfg, run_dir, data.train_tokens, data.val_tokens, data.shards.bytes_per_token("val"), env=DistEnv())


def test_resume_continues_bit_for_bit(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path / "a", steps=10))
    straight = _trainer(cfg, tmp_path / "a").fit().losses

    cfg_b = load_config(None, tiny_overrides(tmp_path / "b", steps=10))
    first = _trainer(cfg_b, tmp_path / "b")
    head = first.fit(steps=5).losses
    del first
    second = _trainer(load_config(None, tiny_overrides(tmp_path / "b", steps=10)), tmp_path / "b")
    assert second.resume() and second.step == 5
    tail = second.fit().losses
    assert head + tail == straight  # exact equality, not approximate


def test_pretrain_writes_a_complete_run_folder(tmp_path):
    run = tmp_path / "run"
    summary = pretrain(load_config(None, tiny_overrides(run)))
    for name in ("config.toml", "metrics.jsonl", "loss.png", "report.md", "eval.json", "samples.jsonl", "summary.json",
                 "tokenizer", "data/meta.json", "checkpoints/latest"):
        assert (run / name).exists(), name
    ev = summary["eval"]
    assert ev["val_bpb"] > 0 and ev["ngram_val_bpb"] > 0
    assert {"qa_seen_in_pretraining", "qa_heldout_people", "arithmetic_unseen"} <= set(ev["tasks"])
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 9))
    assert load_config(run / "config.toml").train.steps == 8


def test_two_process_data_parallel_matches_one_process(tmp_path):
    """gloo DDP on 2 processes at the same global batch gives the single-process losses."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--skip-eval"]
    r1 = subprocess.run(scalelab_cmd("pretrain", *common, *sum((["--set", o] for o in tiny_overrides(one)), [])),
                        env=subprocess_env(2), capture_output=True, text=True, timeout=300)
    assert r1.returncode == 0, r1.stderr
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "scalelab", "pretrain"]
    r2 = subprocess.run([scalelab_cmd()[0], *torchrun, *common, *sum((["--set", o] for o in tiny_overrides(two)), [])],
                        env=subprocess_env(1), capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr
    l1 = [r["loss"] for r in read_metrics(one / "metrics.jsonl") if r["kind"] == "train"]
    l2 = [r["loss"] for r in read_metrics(two / "metrics.jsonl") if r["kind"] == "train"]
    assert len(l1) == len(l2) == 8
    assert l1 == pytest.approx(l2, rel=1e-4, abs=1e-5)
    setup = [r for r in read_metrics(two / "metrics.jsonl") if r["kind"] == "setup"][0]
    assert setup["world_size"] == 2


def test_gradient_accumulation_keeps_the_training_math(tmp_path):
    """Two micro-batches of 4 make the same optimizer steps as one batch of 8."""
    one = _trainer(load_config(None, tiny_overrides(tmp_path / "a", steps=4)), tmp_path / "a").fit().losses
    two = _trainer(load_config(None, tiny_overrides(tmp_path / "b", steps=4) + ["train.grad_accum=2"]), tmp_path / "b")
    assert two.fit().losses == pytest.approx(one, rel=1e-5)
