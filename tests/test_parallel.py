"""scalelab.parallel: the mesh from the config, and that every layout keeps the 1-process training math.

Tolerances (also in docs/parallel.md): training losses match the 1-process losses to
rel 1e-4 / abs 1e-5 over the steps run (observed: ~1e-7, float32 reduction order only);
gradients after one step match to 1e-5 of each parameter's largest gradient entry
(observed: ~1e-6); a DCP checkpoint resumed on another mesh gives the same next-step loss
to rel 1e-5.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, scalelab_cmd, subprocess_env, tiny_overrides
from scalelab.config import load_config
from scalelab.errors import ScalelabError
from scalelab.parallel.dist import DistEnv
from scalelab.parallel.mesh import Layout, parse_mesh, resolve_layout
from scalelab.pipeline import prepare

LOSS_TOL = dict(rel=1e-4, abs=1e-5)
GRAD_TOL = 1e-5
STEPS = 4


# -- the mesh from the config (fast) -------------------------------------------------------------------


def test_layout_fills_the_free_axis_and_names_itself():
    assert resolve_layout(-1, 1, 1, 4) == Layout(4, 1, 1)
    assert resolve_layout(1, -1, 2, 8) == Layout(1, 4, 2)
    assert resolve_layout(2, 2, 1, 4).name() == "HSDP=2x2"
    assert resolve_layout(1, 2, 2, 4).name() == "FSDP=2 x TP=2"
    assert Layout(1, 1, 2).data_coords(1) == (0, 1)  # both TP ranks read data rank 0's rows
    assert Layout(2, 1, 2).data_coords(3) == (1, 2)


@pytest.mark.parametrize("args, fragment", [
    ((2, 2, 1, 2), "2 × 2 × 1 = 4, but there are 2 processes"),
    ((-1, 1, 3, 4), "cannot be split into groups of 3"),
    ((-1, -1, 1, 4), "only one of"),
    ((0, 1, 1, 1), "must be >= 1 or -1"),
])
def test_bad_meshes_are_one_line_errors(args, fragment):
    with pytest.raises(ScalelabError, match=fragment.replace("(", r"\(")):
        resolve_layout(*args)


def test_parse_mesh():
    assert parse_mesh("2x4") == Layout(1, 2, 4)
    assert parse_mesh("2x1x4") == Layout(2, 1, 4)
    for bad in ("2x", "8", "0x2", "axb", "1x1x1x1"):
        with pytest.raises(ScalelabError, match="DATAxMODEL"):
            parse_mesh(bad)


def test_config_checks_parallel_keys():
    with pytest.raises(ScalelabError, match="parallel.tp"):
        load_config(None, ["parallel.tp=0"])
    with pytest.raises(ScalelabError, match="only one of"):
        load_config(None, ["parallel.dp_shard=-1"])


def test_tp_refuses_tied_embeddings_and_odd_heads():
    from scalelab.model.gpt import GPT, GPTConfig
    from scalelab.parallel.plans import check_model_fits

    tied = GPT(GPTConfig(vocab_size=64, depth=2, aspect_ratio=32, head_dim=16, tie_embeddings=True))
    with pytest.raises(ScalelabError, match="tie_embeddings"):
        check_model_fits(tied, Layout(1, 1, 2))
    odd = GPT(GPTConfig(vocab_size=64, depth=3, aspect_ratio=16, head_dim=16))  # 3 heads
    with pytest.raises(ScalelabError, match="n_head=3"):
        check_model_fits(odd, Layout(1, 1, 2))


# -- equivalence on 2 and 4 gloo processes (slow) ----------------------------------------------------


def _overrides():
    return [o for o in tiny_overrides(Path("unused"), steps=STEPS) if not o.startswith("run.out_dir")]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Prepared data and the 1-process losses that every layout must reproduce."""
    from parallel_worker import make_trainer

    root = tmp_path_factory.mktemp("parallel")
    spec = {"data_dir": str(root / "data"), "overrides": _overrides(), "steps": STEPS}
    data = prepare(load_config(None, spec["overrides"]), spec["data_dir"])
    losses = make_trainer(spec, (1, 1, 1), DistEnv(), root / "one", data).fit(steps=STEPS).losses
    resumed = make_trainer(spec, (1, 1, 1), DistEnv(), root / "one", data)
    assert resumed.resume()
    return root, spec, data, losses + [resumed.train_step()]  # the last: step STEPS + 1 after a resume


def _launch(nproc: int, spec: dict, root: Path, name: str) -> dict:
    spec_path, out_path = root / f"{name}.json", root / f"{name}.out.json"
    spec_path.write_text(json.dumps({**spec, "work_dir": str(root / name)}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "tests" / "parallel_worker.py"), str(spec_path), str(out_path)]
    env = subprocess_env(1)
    env["PYTHONPATH"] = str(REPO / "tests") + ":" + env["PYTHONPATH"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(out_path.read_text())


def _check(out: dict, reference: list[float], layouts: list[list[int]]) -> None:
    """Every layout asked for trained and was compared: losses and gradients for each, none missing."""
    keys = {"x".join(map(str, layout)) for layout in layouts}
    assert set(out["losses"]) == keys and set(out["grad_rel_err"]) == keys, (sorted(out["losses"]), sorted(keys))
    for key, losses in out["losses"].items():
        assert len(losses) == STEPS and losses == pytest.approx(reference[:STEPS], **LOSS_TOL), key
    for key, err in out["grad_rel_err"].items():
        assert err < GRAD_TOL, (key, err)


def _explained_calls(spec, data, layout: Layout) -> dict[str, int]:
    from scalelab.parallel.explain import param_layout, step_collectives

    cfg = load_config(None, spec["overrides"])
    cfg.model.vocab_size = data.tokenizer.vocab_size
    colls = step_collectives(param_layout(cfg.model, layout), cfg.model.resolved(), layout,
                             cfg.train.batch_size, cfg.train.grad_accum)
    calls = {"all_gather": 0, "reduce_scatter": 0}
    for c in colls:
        key = c.op.replace("-", "_")
        if key in calls:
            calls[key] += c.calls
    return calls


@pytest.mark.slow
def test_two_processes_dp_fsdp_tp_match_one_process(shared):
    """Same losses and gradients as 1 process; `parallel explain` predicts the collectives the step runs."""
    root, spec, data, reference = shared
    layouts = [[2, 1, 1], [1, 2, 1], [1, 1, 2], [1, 2, 1, 2], [1, 1, 2, 2]]  # the last two: grad_accum 2
    resume = {"run_dir": str(root / "one"), "layouts": [[1, 2, 1], [1, 1, 2]]}
    out = _launch(2, {**spec, "layouts": layouts, "grads": True, "comm": True, "resume_full": resume}, root, "two")
    assert set(out["losses"]) == {"2x1x1", "1x2x1", "1x1x2", "1x2x1x2", "1x1x2x2"}
    _check(out, reference, layouts)
    # a 1-process checkpoint (no dcp/) continues on FSDP=2 and on TP=2 with the 1-process next loss
    assert out["resume_full"] == pytest.approx({"1x2x1": reference[STEPS], "1x1x2": reference[STEPS]}, rel=1e-5)
    for layout in layouts[:3]:
        seen = out["comm"]["x".join(map(str, layout))]
        explained = _explained_calls(spec, data, Layout(*layout))
        assert {k: seen[k] for k in explained} == explained, layout
    assert out["comm"]["2x1x1"]["all_reduce"] == 2 and out["comm"]["2x1x1"]["broadcast"] == 0  # grads + loss


@pytest.mark.slow
def test_four_processes_2d_hsdp_and_dcp_resharding(shared):
    """FSDP=2 x TP=2 and HSDP=2x2 train like 1 process; a DCP checkpoint written at FSDP=2 x TP=2
    resumes at DP=4, at FSDP=4 and at 1 process with the same next-step loss."""
    from parallel_worker import make_trainer
    from scalelab.checkpoint import SHARDED_DIR, latest_checkpoint, load_model

    root, spec, data, reference = shared
    run_dir = root / "dcp_run"
    dcp = {"save": [1, 2, 2], "load": [[4, 1, 1], [1, 4, 1]], "steps": STEPS - 1, "run_dir": str(run_dir)}
    layouts = [[1, 2, 2], [2, 2, 1]]
    out = _launch(4, {**spec, "layouts": layouts, "grads": True, "comm": True, "dcp": dcp}, root, "four")
    assert set(out["losses"]) == {"1x2x2", "2x2x1"}  # FSDP=2 x TP=2 and HSDP=2x2
    _check(out, reference, layouts)
    for layout in layouts:
        seen = out["comm"]["x".join(map(str, layout))]
        explained = _explained_calls(spec, data, Layout(*layout))
        assert {k: seen[k] for k in explained} == explained, layout
    saved = out["dcp"]["saved"]
    assert saved == pytest.approx(reference[STEPS - 1], **LOSS_TOL)  # step STEPS of an uninterrupted run
    assert out["dcp"]["4x1x1"] == pytest.approx(saved, rel=1e-5)
    assert out["dcp"]["1x4x1"] == pytest.approx(saved, rel=1e-5)

    ckpt = latest_checkpoint(run_dir / "checkpoints")
    assert (ckpt / SHARDED_DIR / ".metadata").is_file() and (ckpt / "model.safetensors").is_file()
    one = make_trainer(spec, (1, 1, 1), DistEnv(), run_dir, data)
    assert one.resume() and one.step == STEPS - 1
    assert one.train_step() == pytest.approx(saved, rel=1e-5)
    # The one-file export is the full model, for every single-process tool.
    assert load_model(ckpt).num_params() == one.model.num_params()


@pytest.mark.slow
def test_pretrain_cli_under_torchrun_with_fsdp(tmp_path):
    """The whole stage, as a user runs it: torchrun + --set parallel.dp_shard=-1."""
    run = tmp_path / "run"
    sets = sum((["--set", o] for o in tiny_overrides(run, steps=4)), [])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "scalelab", "pretrain", "--skip-eval", *sets,
           "--set", "parallel.dp_replicate=1", "--set", "parallel.dp_shard=-1"]
    r = subprocess.run(cmd, env=subprocess_env(1), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert (run / "checkpoints" / "step_000004" / "dcp" / ".metadata").is_file()
    bad = subprocess.run(scalelab_cmd("pretrain", "--skip-eval", *sets, "--set", "parallel.tp=2", "--overwrite"),
                         env=subprocess_env(1), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "invalid mesh" in bad.stderr


# -- the two CLI actions ------------------------------------------------------------------------------


def test_explain_lists_placements_and_hsdp_traffic():
    from scalelab.model.gpt import GPTConfig
    from scalelab.parallel.explain import render

    cfg = GPTConfig(vocab_size=512, depth=2, aspect_ratio=64, head_dim=32)
    text = render(cfg, Layout(2, 2, 2), batch_size=16, grad_accum=2)
    assert "HSDP=2x2 x TP=2 on 8 processes" in text
    assert "blocks.0.attn.q_proj.weight" in text and "dp_shard=S(0)* tp=S(0)" in text
    assert "dp_replicate  all-reduce" in text  # gradient shards cross the replica groups, nothing else does
    one = render(cfg, Layout(), batch_size=16, grad_accum=1)
    assert "no collectives" in one


@pytest.mark.slow
def test_explain_and_matmul_demo_cli():
    r = subprocess.run(scalelab_cmd("parallel", "explain", "--mesh", "2x4"), env=subprocess_env(1),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "FSDP=2 x TP=4 on 8 processes" in r.stdout and "bytes/rank" in r.stdout
    bad = subprocess.run(scalelab_cmd("parallel", "explain", "--mesh", "2x3"), env=subprocess_env(1),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "not divisible by parallel.tp=3" in bad.stderr
    demo = subprocess.run(scalelab_cmd("parallel", "matmul-demo"), env=subprocess_env(1),
                          capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert demo.stdout.count("computes C[") == 8
    assert "C matches the one-process product: True" in demo.stdout
