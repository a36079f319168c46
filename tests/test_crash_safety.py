"""Crash safety: durable atomic checkpoint writes, corruption caught at load, and a real SIGKILL mid-write
(of the single-file checkpoint, and of one rank during a sharded DCP save under torchrun)."""

import functools
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, scalelab_cmd, subprocess_env, tiny_overrides
from scalelab.config import load_config
from scalelab.errors import ScalelabError
from scalelab.model.gpt import GPT, GPTConfig
from scalelab.parallel.dist import DistEnv
from scalelab.pipeline import prepare
from scalelab import checkpoint as ckpt
from scalelab.checkpoint import folder as checkpoint_folder
from scalelab.train.metrics import read_metrics
from scalelab.train.trainer import Trainer


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Two spinning OpenMP threads on a shared 2-core box run many times slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, block_size=16, depth=1, aspect_ratio=32, head_dim=16))


def _save(root, step, model=None):
    model = model or _model()
    optimizer = torch.optim.AdamW(model.parameters())
    return ckpt.save_checkpoint(root, model, optimizer, step, {"epoch": 0, "position": step})


# -- durability ----------------------------------------------------------------------------------------


def test_every_file_and_folder_is_fsynced_before_it_counts(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    root = tmp_path / "ck"
    _save(root, 7)
    tmp, final = str(root / ".step_000007.tmp"), str(root / "step_000007")
    fsynced = [e[1] for e in events if e[0] == "fsync"]
    renames = [e for e in events if e[0] == "rename"]
    assert renames[0] == ("rename", tmp, final)
    first_rename = events.index(renames[0])
    before = {e[1] for e in events[:first_rename] if e[0] == "fsync"}
    assert {f"{tmp}/{ckpt.MODEL_FILE}", f"{tmp}/{ckpt.STATE_FILE}", f"{tmp}/{ckpt.META_FILE}", tmp} <= before
    # the folder entries of both renames (checkpoint, then the latest pointer) are made durable too
    assert renames[1] == ("rename", str(root / "latest.tmp"), str(root / "latest"))
    second_rename = events.index(renames[1])
    assert ("fsync", str(root)) in events[first_rename:second_rename]
    assert ("fsync", str(root / "latest.tmp")) in events[first_rename:second_rename]
    assert events[-1] == ("fsync", str(root)) and fsynced.count(str(root)) >= 2


def test_unfinished_writes_and_a_lost_pointer_are_handled(tmp_path):
    root = tmp_path / "ck"
    _save(root, 2)
    _save(root, 4)
    (root / ".step_000006.tmp").mkdir()  # a write killed before its rename
    assert ckpt.latest_checkpoint(root) == root / "step_000004"
    (root / "latest").unlink()  # lost pointer: fall back to the newest complete folder
    assert ckpt.latest_checkpoint(root) == root / "step_000004"
    (root / "latest").write_text("step_000099\n")  # dangling pointer: same
    assert ckpt.latest_checkpoint(root) == root / "step_000004"
    _save(root, 6)
    assert not (root / ".step_000006.tmp").exists()
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_000002", "step_000004", "step_000006"]


def test_keep_last_k_and_discard_after_a_rollback(tmp_path):
    root = tmp_path / "ck"
    for step in (2, 4, 6, 8):
        _save(root, step)
    assert [p.name for p in ckpt.prune_checkpoints(root, 2)] == ["step_000002", "step_000004"]
    assert [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(root)] == [6, 8]
    ckpt.discard_checkpoints_after(root, 6)
    assert ckpt.latest_checkpoint(root) == root / "step_000006"
    assert [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(root)] == [6]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    _save(root, 6)  # rewriting a step replaces it whole
    ckpt.verify_checkpoint(root / "step_000006")


# -- corruption ------------------------------------------------------------------------------------------


def test_truncated_weights_are_named(tmp_path):
    path = _save(tmp_path / "ck", 3)
    weights = path / ckpt.MODEL_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ScalelabError, match=f"corrupt or truncated.*{weights}"):
        ckpt.verify_checkpoint(path)
    with pytest.raises(ScalelabError, match=str(weights)):
        ckpt.load_model(path)
    # without the manifest in the way, safetensors itself refuses the file, also by name
    with pytest.raises(ScalelabError, match=f"{weights} is not a readable safetensors file"):
        ckpt.read_safetensors(weights)


def test_manifest_mismatch_is_named(tmp_path):
    path = _save(tmp_path / "ck", 3)
    state = path / ckpt.STATE_FILE
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit, same length
    state.write_bytes(bytes(data))
    with pytest.raises(ScalelabError, match=f"checksum mismatch.*{state}"):
        ckpt.load_train_state(path)


def test_missing_or_garbled_manifest(tmp_path):
    path = _save(tmp_path / "ck", 3)
    (path / ckpt.META_FILE).write_text("{not json")
    with pytest.raises(ScalelabError, match=f"manifest {path / ckpt.META_FILE} is corrupt"):
        ckpt.verify_checkpoint(path)
    (path / ckpt.META_FILE).unlink()
    with pytest.raises(ScalelabError, match="has no meta.json"):
        ckpt.load_model(path)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_train_state_is_never_unpickled(tmp_path, monkeypatch):
    """Even with a manifest that matches, a pickle that would run code is refused, not executed."""
    monkeypatch.chdir(tmp_path)
    path = _save(tmp_path / "ck", 3)
    state = path / ckpt.STATE_FILE
    torch.save({"step": 3, "evil": _Payload()}, state)
    m = json.loads((path / ckpt.META_FILE).read_text())
    m["manifest"][ckpt.STATE_FILE] = checkpoint_folder._sha256(state)
    (path / ckpt.META_FILE).write_text(json.dumps(m))
    with pytest.raises(ScalelabError, match=f"cannot read {state}: .* refused rather than unpickled") as err:
        ckpt.load_train_state(path)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(pickle.UnpicklingError):  # torch's own guard, the one load_train_state relies on
        torch.load(state, weights_only=True)


def test_the_latest_pointer_only_names_a_checkpoint_beside_it(tmp_path):
    root = tmp_path / "ck"
    _save(root, 2)
    elsewhere = _save(tmp_path / "other", 9)
    for bad in (str(elsewhere), "../other/step_000009", "step_000002/../../other/step_000009", "/"):
        (root / "latest").write_text(bad + "\n")
        assert ckpt.latest_checkpoint(root) == root / "step_000002", bad


def test_a_meta_json_without_a_manifest_is_refused(tmp_path):
    path = _save(tmp_path / "ck", 3)
    meta = json.loads((path / ckpt.META_FILE).read_text())
    for manifest in (None, {}, {ckpt.STATE_FILE: checkpoint_folder._sha256(path / ckpt.STATE_FILE)}):
        (path / ckpt.META_FILE).write_text(json.dumps({**meta, "manifest": manifest}))
        with pytest.raises(ScalelabError, match="cannot be verified, and is refused"):
            ckpt.load_model(path)
    escaping = {**meta["manifest"], "../../etc/passwd": "0" * 64}
    (path / ckpt.META_FILE).write_text(json.dumps({**meta, "manifest": escaping}))
    with pytest.raises(ScalelabError, match="outside the checkpoint"):
        ckpt.verify_checkpoint(path)


def test_unknown_model_config_keys_are_a_one_line_error(tmp_path):
    path = _save(tmp_path / "ck", 3)
    meta = json.loads((path / ckpt.META_FILE).read_text())
    meta["model_config"]["n_experts"] = 8
    (path / ckpt.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ScalelabError, match="unknown model_config keys n_experts .*valid: .*block_size") as err:
        ckpt.load_model(path)
    assert "\n" not in str(err.value)


def _dcp_pair(seed: int):
    model = _model() if seed == 0 else GPT(GPTConfig(vocab_size=64, block_size=16, depth=1, aspect_ratio=32,
                                                     head_dim=16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3 * (seed + 1))
    if seed == 0:  # a step, so the optimizer has state to save
        model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
        optimizer.step()
    return model, optimizer


def test_dcp_checkpoints_load_without_unpickling_anything_else(tmp_path, monkeypatch):
    from scalelab.checkpoint import load_dcp, save_dcp

    monkeypatch.chdir(tmp_path)
    model, optimizer = _dcp_pair(0)
    save_dcp(tmp_path / "dcp", model, optimizer)
    fresh, fresh_opt = _dcp_pair(1)
    load_dcp(tmp_path / "dcp", fresh, fresh_opt)  # the restricted path still reads a real checkpoint
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh_opt.param_groups[0]["lr"] == 1e-3
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    with open(tmp_path / "dcp" / ".metadata", "wb") as f:
        pickle.dump(_Payload(), f)
    with pytest.raises(ScalelabError, match="refusing to load .*posix.system is not part of") as err:
        load_dcp(tmp_path / "dcp", fresh, fresh_opt)
    assert "\n" not in str(err.value) and not (tmp_path / "pwned").exists()


def test_resume_from_a_corrupt_checkpoint_fails_clearly(tmp_path):
    run = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(run, steps=4, **{"train.ckpt_every": "2"}))
    data = prepare(cfg, run)
    cfg.model.vocab_size = data.tokenizer.vocab_size

    def trainer():
        return Trainer(cfg, run, data.train_tokens, data.val_tokens, data.shards.bytes_per_token("val"), env=DistEnv())

    trainer().fit()
    weights = ckpt.latest_checkpoint(run / "checkpoints") / ckpt.MODEL_FILE
    with open(weights, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ScalelabError, match=f"{weights}.*older checkpoints: step_000002"):
        trainer().resume()


# -- a real kill ---------------------------------------------------------------------------------------


def _pretrain(run, *extra):
    args = sum((["--set", o] for o in tiny_overrides(run, steps=12, **{"train.ckpt_every": "3"})), [])
    return scalelab_cmd("pretrain", "--skip-eval", *extra, *args)


def _train_losses(run):
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"}


@pytest.mark.slow
def test_sigkill_mid_checkpoint_resumes_with_identical_losses(tmp_path):
    ref, victim = tmp_path / "ref", tmp_path / "victim"
    # the uninterrupted reference runs alongside the victim, one thread each
    reference = subprocess.Popen(_pretrain(ref), env=subprocess_env(1), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
    marker = tmp_path / "hanging"
    env = subprocess_env(1) | {"SCALELAB_TEST_HANG_IN_CHECKPOINT": f"9:{marker}"}
    proc = subprocess.Popen(_pretrain(victim), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the run never reached the checkpoint at step 9"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # every file of step 9 is written and fsynced, the rename is not done
    assert proc.wait(timeout=60) == -signal.SIGKILL
    proc.stderr.close()

    ckdir = victim / "checkpoints"
    assert (ckdir / ".step_000009.tmp" / ckpt.META_FILE).is_file()
    assert not (ckdir / "step_000009").exists()
    assert ckpt.latest_checkpoint(ckdir) == ckdir / "step_000006"
    assert max(_train_losses(victim)) == 9  # steps 7-9 ran and were logged before the kill

    r = subprocess.run(_pretrain(victim, "--resume"), env=subprocess_env(1), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-3000:]
    assert _train_losses(victim) == _train_losses(ref)  # exact: steps 7-12 replayed bit for bit
    assert sorted(_train_losses(ref)) == list(range(1, 13))
    setups = [rec["step"] for rec in read_metrics(victim / "metrics.jsonl") if rec["kind"] == "setup"]
    assert setups == [0, 6]
    assert not [p.name for p in ckdir.iterdir() if p.name.startswith(".")]  # the torn write was cleaned up


def _torchrun_pretrain(run, *extra):
    """2 gloo processes, FSDP=2: every checkpoint is a sharded (DCP) one."""
    args = sum((["--set", o] for o in tiny_overrides(run, steps=12, **{"train.ckpt_every": "3"})), [])
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(REPO / "tests" / "dcp_crash_worker.py"), "pretrain", "--skip-eval", *extra, *args,
            "--set", "parallel.dp_replicate=1", "--set", "parallel.dp_shard=-1"]


@pytest.fixture(scope="module")
def sharded_reference_losses(tmp_path_factory):
    """The uninterrupted 2-process run, started once (alongside the first victim); both kill tests compare to it."""
    ref = tmp_path_factory.mktemp("sharded") / "ref"
    proc = subprocess.Popen(_torchrun_pretrain(ref), env=subprocess_env(1), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)

    @functools.cache
    def losses() -> dict:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        return _train_losses(ref)

    yield losses
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


# Where the sharded write of step 9 is stopped, and what each stop leaves on disk (never a loadable folder).
DCP_STOPS = {
    # rank 1 has written its shards, inside torch.distributed.checkpoint's save: no .metadata yet
    "rank 1 in the DCP write": ("SCALELAB_TEST_DCP_STOP", "9:1:{marker}",
                                (".step_000009.dcp.tmp/__1_0.distcp",), (".step_000009.dcp.tmp/.metadata",)),
    # rank 0 has every file, the shards moved in and the manifest written; the rename is not done
    "rank 0 before the rename": ("SCALELAB_TEST_HANG_IN_CHECKPOINT", "9:{marker}",
                                 (".step_000009.tmp/dcp/.metadata", ".step_000009.tmp/meta.json"), ()),
}


@pytest.mark.slow
@pytest.mark.parametrize("stop", DCP_STOPS)
def test_sigkill_of_a_rank_mid_sharded_save_resumes_with_identical_losses(tmp_path, stop, sharded_reference_losses):
    var, value, left, absent = DCP_STOPS[stop]
    victim = tmp_path / "victim"
    marker = tmp_path / "stopped"
    env = subprocess_env(1) | {var: value.format(marker=marker)}
    proc = subprocess.Popen(_torchrun_pretrain(victim), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 300
    while not (marker.exists() and marker.read_text()):  # the stopped rank writes its pid into it
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the run never reached the sharded save of step 9"
        time.sleep(0.05)
    os.kill(int(marker.read_text()), signal.SIGKILL)
    try:  # torchrun sees the dead rank and stops the other one, which is waiting on it
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("torchrun did not end after a rank was killed")
    assert proc.returncode != 0 and "SIGKILL" in err, err[-3000:]

    ckdir = victim / "checkpoints"
    assert all((ckdir / f).is_file() for f in left) and not any((ckdir / f).exists() for f in absent)
    assert not (ckdir / "step_000009").exists()
    assert ckpt.latest_checkpoint(ckdir) == ckdir / "step_000006"
    assert (ckdir / "step_000006" / ckpt.SHARDED_DIR / ".metadata").is_file()
    assert max(_train_losses(victim)) == 9  # steps 7-9 ran and were logged before the kill

    r = subprocess.run(_torchrun_pretrain(victim, "--resume"), env=subprocess_env(1), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    reference = sharded_reference_losses()
    assert sorted(reference) == list(range(1, 13))
    assert _train_losses(victim) == reference  # exact: steps 7-12 replayed bit for bit from the DCP shards
    setups = [rec["step"] for rec in read_metrics(victim / "metrics.jsonl") if rec["kind"] == "setup"]
    assert setups == [0, 6]
    assert (ckdir / "step_000012" / ckpt.SHARDED_DIR / ".metadata").is_file()
    assert not [p.name for p in ckdir.iterdir() if p.name.startswith(".")]  # the torn write was cleaned up


# -- --overwrite ------------------------------------------------------------------------------------------


def test_overwrite_deletes_run_folders_only(tmp_path, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "home" / "work"
    work.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    (work / "notes.txt").write_text("precious")
    for target, why in [(".", "the current folder"), ("..", "your home folder"), (home.parent, "a parent of your home"),
                        ("/", "the filesystem root")]:
        with pytest.raises(ScalelabError, match=f"refuses to delete .*{why}"):
            ckpt.remove_run_folder(target)
    project = work / "project"
    project.mkdir()
    (project / "config.toml").write_text('[tool]\nname = "not a run"\n')
    with pytest.raises(ScalelabError, match="not a run folder"):
        ckpt.remove_run_folder(project)
    (work / "link").symlink_to(project)
    with pytest.raises(ScalelabError, match="symbolic link"):
        ckpt.remove_run_folder(work / "link")
    assert (project / "config.toml").is_file() and (work / "notes.txt").read_text() == "precious"
    run = work / "run"
    _save(run / "checkpoints", 2)
    ckpt.remove_run_folder(run)
    (work / "empty").mkdir()
    ckpt.remove_run_folder(work / "empty")
    (work / "early" / "tokenizer").mkdir(parents=True)  # a run that died preparing its data: no config yet
    (work / "early" / "world.json").write_text("{}")
    ckpt.remove_run_folder(work / "early")
    assert not run.exists() and not (work / "empty").exists() and not (work / "early").exists()
    assert sorted(p.name for p in work.iterdir()) == ["link", "notes.txt", "project"]


def test_overwrite_of_the_working_folder_is_a_one_line_error(tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    r = subprocess.run(scalelab_cmd("pretrain", "--set", "run.out_dir=.", "--overwrite"), cwd=tmp_path,
                       env=subprocess_env(1), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "refuses to delete" in r.stderr and (tmp_path / "notes.txt").read_text() == "precious"
