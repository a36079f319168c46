"""Loss-spike guard: detection policy, rollback + data skip, and recovery under injected faults.

The recovery tests compare against a clean run that skips the same data window by hand: the
guarded run must land on exactly that trajectory, bit for bit, because a rollback restores
weights, optimizer, data position and RNG exactly as a resume does.
"""

import math
import shutil
import subprocess

import numpy as np
import pytest
import torch

from conftest import scalelab_cmd, subprocess_env, tiny_overrides
from scalelab.config import load_config
from scalelab.data.loader import TokenLoader
from scalelab.errors import ScalelabError
from scalelab.evals.plots import plot_loss_curves, split_rolled_back
from scalelab.parallel.dist import DistEnv
from scalelab.pipeline import prepare
from scalelab import checkpoint as ckpt
from scalelab.train.metrics import MetricsLogger, read_metrics
from scalelab.train.spike import FaultInjector, SpikeGuard
from scalelab.train.trainer import Trainer

GUARD = [
    "train.spike_guard=true", "train.ckpt_every=4", "train.keep_checkpoints=3", "train.spike_window=8",
    "train.spike_warmup=10", "train.spike_rollback_steps=2", "train.eval_every=100",
]


@pytest.fixture(scope="module", autouse=True)
def _shared_data(tmp_path_factory):
    """Tokenizer and shards depend only on the data config: prepare them once, not once per run."""
    global _PREPARED
    # One intra-op thread: on a shared 2-core box, two spinning OpenMP threads run 10-20x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _PREPARED = tmp_path_factory.mktemp("prepared")
    prepare(load_config(None, tiny_overrides(_PREPARED)), _PREPARED)
    yield
    _PREPARED = None
    torch.set_num_threads(threads)


_PREPARED = None


def _trainer(run_dir, steps=30, extra=()):
    cfg = load_config(None, tiny_overrides(run_dir, steps=steps) + list(extra))
    if _PREPARED is not None and not (run_dir / "data").exists():
        for sub in ("tokenizer", "data"):
            shutil.copytree(_PREPARED / sub, run_dir / sub)
    data = prepare(cfg, run_dir)
    cfg.model.vocab_size = data.tokenizer.vocab_size
    return Trainer(cfg, run_dir, data.train_tokens, data.val_tokens, data.shards.bytes_per_token("val"), env=DistEnv())


def _clean_run_skipping(run_dir, at_step, n_batches, steps=30):
    """What training would have done had the data window been dropped at ``at_step`` in the first place."""
    t = _trainer(run_dir, steps, ["train.eval_every=100"])
    head = t.fit(steps=at_step).losses
    t.loader.skip_batches(n_batches)
    return head + t.fit().losses


# -- policy ----------------------------------------------------------------------------------------


def test_guard_policy():
    g = SpikeGuard(window=5, threshold=6.0, warmup=3)
    assert g.check(1, float("nan")) == "loss is nan"  # non-finite fires even during warm-up
    assert g.check(2, 50.0) is None  # a finite outlier in warm-up is accepted
    for step, loss in enumerate([3.0, 3.1, 2.9, 3.05, 2.95], start=3):
        assert g.check(step, loss) is None
    assert list(g.recent) == [3.0, 3.1, 2.9, 3.05, 2.95]  # the window slid past the warm-up outlier
    assert g.check(9, 3.2) is None  # ordinary noise
    reason = g.check(10, 4.5)
    assert reason and "robust std above the trailing median" in reason
    assert 4.5 not in g.recent  # a spike never pollutes the window
    assert g.check(11, float("inf")) == "loss is inf"
    fresh = SpikeGuard(window=5)
    fresh.load_state_dict(g.state_dict())
    assert list(fresh.recent) == list(g.recent)


def test_flat_plateau_does_not_turn_noise_into_spikes():
    g = SpikeGuard(window=4, threshold=6.0, warmup=0)
    for step in range(4):
        g.check(step, 2.0)  # zero spread: only the 2%-of-median floor keeps the scale finite
    assert g.check(5, 2.2) is None  # +10% is batch noise at small batch sizes
    # +15% on a flat plateau: 0.3 over a 2%-of-median scale of 0.04 is 7.5 > 6
    assert g.check(6, 2.3) == "loss 2.3000 is 7.5 robust std above the trailing median 2.0000"


def test_fault_spec_parsing():
    assert FaultInjector.parse("") is None
    assert FaultInjector.parse("poison:7") == FaultInjector("poison", 7)
    assert FaultInjector.parse("lr:3:100") == FaultInjector("lr", 3, 100.0)
    for bad in ("poison", "lr:3", "nan:3", "poison:x", "poison:0"):
        with pytest.raises(ScalelabError, match="train.inject_fault"):
            FaultInjector.parse(bad)


def test_config_requires_periodic_checkpoints(tmp_path):
    with pytest.raises(ScalelabError, match="train.ckpt_every"):
        load_config(None, tiny_overrides(tmp_path) + ["train.spike_guard=true"])
    with pytest.raises(ScalelabError, match="keep_checkpoints"):
        load_config(None, tiny_overrides(tmp_path) + GUARD + ["train.keep_checkpoints=1",
                                                              "train.spike_rollback_steps=8"])


def test_loader_skip_equals_reading_the_batches():
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = TokenLoader(tokens, 4, 8, seed=3), TokenLoader(tokens, 4, 8, seed=3)
    for _ in range(40):  # crosses epoch boundaries (31 windows per epoch)
        a.next_batch()
    b.skip_batches(40)
    assert a.state_dict() == b.state_dict()
    assert all((u == v).all() for u, v in zip(a.next_batch(), b.next_batch()))
    with pytest.raises(ScalelabError):
        b.skip_batches(-1)


# -- recovery --------------------------------------------------------------------------------------


def test_poisoned_batch_is_rolled_back_and_skipped(tmp_path):
    run = tmp_path / "guarded"
    t = _trainer(run, extra=GUARD + ["train.spike_skip_batches=1", "train.inject_fault=poison:22"])
    logger = MetricsLogger(run / "metrics.jsonl")
    result = t.fit(logger=logger)
    # spike at 22 -> newest checkpoint at or before 22 - 2 is step 20; skip steps 21, 22 and one more
    [iv] = result.interventions
    assert (iv["step"], iv["rolled_back_to"], iv["skipped_batches"]) == (22, 20, 3)
    assert iv["loss"] > 5.0 and "robust std" in iv["reason"]
    assert len(result.losses) == 30
    assert result.losses == _clean_run_skipping(tmp_path / "clean", 20, 3)

    records = read_metrics(run / "metrics.jsonl")
    assert [{k: v for k, v in r.items() if k != "time"} for r in records if r["kind"] == "intervention"] == [iv]
    kept, abandoned, _ = split_rolled_back(records)
    kept = [r for r in kept if r["kind"] == "train"]
    assert [r["step"] for r in kept] == list(range(1, 31))
    assert [r["step"] for r in abandoned] == [21]  # logged before the spike, then abandoned
    assert [r["loss"] for r in kept] == result.losses
    assert plot_loss_curves(records, run / "loss.png").stat().st_size > 0
    # only the newest 3 checkpoints stay, and none from the abandoned history
    assert [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(run / "checkpoints")] == [24, 28, 30]


def test_lr_blowup_recovers_the_trajectory(tmp_path):
    clean = _trainer(tmp_path / "clean", extra=["train.eval_every=100"]).fit()
    unguarded = _trainer(tmp_path / "unguarded", extra=["train.eval_every=100", "train.inject_fault=lr:20:300"]).fit()
    guarded = _trainer(tmp_path / "guarded", extra=GUARD + ["train.inject_fault=lr:20:300"]).fit()
    # the bad update is step 20's; its loss shows at step 21, and the checkpoint at 20 already holds it
    [iv] = guarded.interventions
    assert (iv["step"], iv["rolled_back_to"], iv["skipped_batches"]) == (21, 16, 5)
    assert guarded.losses == _clean_run_skipping(tmp_path / "skip", 16, 5)
    # Same validation windows for all three: without the guard the run is ruined, with it back on course.
    assert unguarded.final_val_loss > clean.final_val_loss + 2.0
    assert abs(guarded.final_val_loss - clean.final_val_loss) < 0.05


def test_guard_state_survives_resume(tmp_path):
    run = tmp_path / "run"
    first = _trainer(run, steps=20, extra=GUARD)
    first.fit(steps=12)
    second = _trainer(run, steps=20, extra=GUARD)
    assert second.resume() and second.step == 12
    assert list(second.guard.recent) == list(first.guard.recent) and len(second.guard.recent) == 8


def test_gives_up_after_max_rollbacks(tmp_path):
    t = _trainer(tmp_path / "r", extra=GUARD + ["train.spike_max_rollbacks=0", "train.inject_fault=poison:22"])
    with pytest.raises(ScalelabError, match="step 22 .* after 0 rollbacks"):
        t.fit()


def test_no_checkpoint_old_enough_is_a_clear_error(tmp_path):
    t = _trainer(tmp_path / "r", steps=22, extra=GUARD + [
        "train.ckpt_every=16", "train.keep_checkpoints=0", "train.spike_rollback_steps=6",
        "train.inject_fault=poison:20",
    ])
    with pytest.raises(ScalelabError, match="no checkpoint at or before step 14"):
        t.fit()


@pytest.mark.slow
def test_two_processes_take_the_same_rollback(tmp_path):
    """Under torchrun every rank must roll back together, or DDP would deadlock or diverge."""
    overrides = GUARD + ["train.inject_fault=poison:22", "train.spike_skip_batches=1"]
    procs = {}
    for name, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])):
        args = sum((["--set", o] for o in tiny_overrides(tmp_path / name, steps=30) + overrides), [])
        cmd = [scalelab_cmd()[0], *launcher, "-m", "scalelab", "pretrain", "--skip-eval", *args]
        procs[name] = subprocess.Popen(cmd, env=subprocess_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True)
    runs = {}
    for name, p in procs.items():
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 0, out[-3000:]
        runs[name] = read_metrics(tmp_path / name / "metrics.jsonl")
    for name, records in runs.items():
        ivs = [(r["step"], r["rolled_back_to"], r["skipped_batches"]) for r in records if r["kind"] == "intervention"]
        assert ivs == [(22, 20, 3)], name
    one, two = ([r["loss"] for r in split_rolled_back(recs)[0] if r["kind"] == "train"] for recs in runs.values())
    assert len(one) == len(two) == 30
    assert one == pytest.approx(two, rel=1e-4, abs=1e-5)
    assert not any(math.isnan(x) for x in two)
