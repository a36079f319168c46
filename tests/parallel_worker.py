"""Run under torchrun by tests/test_parallel.py: several mesh layouts in one launch (process start-up is the cost).

    torchrun --standalone --nproc_per_node N tests/parallel_worker.py SPEC.json OUT.json

SPEC: {"data_dir": ..., "overrides": [...], "steps": N, "layouts": [[rep, shard, tp], ...],
       "grads": true, "comm": true, "resume_full": {"run_dir": ..., "layouts": [...]}, "dcp": {"save": [rep, shard, tp], "load": [[rep, shard, tp], ...], "steps": K, "run_dir": ...}}
Rank 0 writes OUT: losses per layout, gradient errors against the 1-process gradients, collective counts
of one step, DCP next-step losses.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from scalelab.config import load_config
from scalelab.parallel.dist import DistEnv, barrier, init_distributed, shutdown
from scalelab.pipeline import prepare
from scalelab.train.trainer import Trainer


def layout_overrides(layout) -> list[str]:
    """[rep, shard, tp] or [rep, shard, tp, grad_accum]."""
    rep, shard, tp, *accum = layout
    out = [f"parallel.dp_replicate={rep}", f"parallel.dp_shard={shard}", f"parallel.tp={tp}"]
    return out + [f"train.grad_accum={a}" for a in accum]


def make_trainer(spec, layout, env, run_dir, data):
    cfg = load_config(None, spec["overrides"] + layout_overrides(layout) + [f'run.out_dir="{run_dir}"'])
    cfg.model.vocab_size = data.tokenizer.vocab_size
    return Trainer(cfg, run_dir, data.train_tokens, data.val_tokens, data.shards.bytes_per_token("val"), env=env)


def full_grads(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        out[name] = (g.full_tensor() if isinstance(g, DTensor) else g).detach().clone()
    return out


def one_backward(trainer) -> dict[str, torch.Tensor]:
    """Gradients of the first global batch's mean loss, reduced over the data axes as in training."""
    x, y = trainer.loader.next_batch()
    trainer.train_model(x, y).backward()
    return full_grads(trainer.model)


def count_collectives(trainer) -> dict[str, int]:
    """Collective calls of one training step, by kind, as CommDebugMode sees them (c10d and functional)."""
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as mode:
        trainer.train_step()
    kinds = {"all_gather": 0, "reduce_scatter": 0, "all_reduce": 0, "broadcast": 0}
    for op, n in mode.get_comm_counts().items():
        name = str(op).replace("_", "")
        for kind in kinds:
            if kind.replace("_", "") in name:
                kinds[kind] += n
    return kinds


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    env = init_distributed("cpu")
    data = prepare(load_config(None, spec["overrides"]), spec["data_dir"], env)
    out: dict = {"losses": {}, "grad_rel_err": {}, "dcp": {}}
    work = Path(spec["work_dir"])
    reference = None
    if spec.get("grads"):
        # The 1-process reference runs inside each rank: no collectives, same seed, same global batch.
        reference = one_backward(make_trainer(spec, (1, 1, 1), DistEnv(), work / "ref", data))
    for layout in spec.get("layouts", []):
        key = "x".join(map(str, layout))
        trainer = make_trainer(spec, layout, env, work / f"run_{key}", data)
        if reference is not None:
            grads = one_backward(trainer)
            out["grad_rel_err"][key] = max(
                float((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)) for n, g in reference.items()
            )
            trainer = make_trainer(spec, layout, env, work / f"run_{key}", data)
        out["losses"][key] = trainer.fit(steps=spec["steps"]).losses
        if spec.get("comm") and len(layout) == 3:  # CommDebugMode's module tracker trips over micro-batches
            out.setdefault("comm", {})[key] = count_collectives(trainer)
        del trainer
        barrier(env)
    for layout in spec.get("resume_full", {}).get("layouts", []):
        # A 1-process checkpoint (no dcp/) resumed on a sharded mesh: full weights + positional optimizer state.
        trainer = make_trainer(spec, layout, env, Path(spec["resume_full"]["run_dir"]), data)
        assert trainer.resume() and trainer.step == spec["steps"]
        out.setdefault("resume_full", {})["x".join(map(str, layout))] = trainer.train_step()
        del trainer
        barrier(env)
    if spec.get("dcp"):
        d = spec["dcp"]
        run_dir = Path(d["run_dir"])
        saver = make_trainer(spec, d["save"], env, run_dir, data)
        saver.fit(steps=d["steps"])  # checkpoints at the end, through DCP
        out["dcp"]["saved"] = saver.train_step()
        del saver
        barrier(env)
        for layout in d["load"]:
            loader = make_trainer(spec, layout, env, run_dir, data)
            assert loader.resume() and loader.step == d["steps"]
            out["dcp"]["x".join(map(str, layout))] = loader.train_step()
            del loader
            barrier(env)
    if env.is_main:
        Path(sys.argv[2]).write_text(json.dumps(out, indent=1))
    shutdown(env)


if __name__ == "__main__":
    main()
