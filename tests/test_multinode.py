"""Multi-node torchrun: two 'nodes' on 127.0.0.1, started separately, meet by c10d rendezvous and train one model.

This is the same command line as on two real hosts (docs/fault_tolerance.md), with the
rendezvous endpoint on the loopback address.
"""

import socket
import subprocess

import pytest

from conftest import scalelab_cmd, subprocess_env, tiny_overrides
from scalelab.train.metrics import read_metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sets(run):
    return sum((["--set", o] for o in tiny_overrides(run)), [])


def _train_losses(run):
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]


@pytest.mark.slow
def test_two_nodes_train_one_model(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    # the single-process reference runs alongside: one thread each, three processes on two cores is fine
    reference = subprocess.Popen(scalelab_cmd("pretrain", "--skip-eval", *_sets(single)), env=subprocess_env(1),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    port = _free_port()
    nodes = []
    for node_rank in (0, 1):
        cmd = [
            scalelab_cmd()[0], "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--node_rank", str(node_rank), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
            "--rdzv_id", "scalelab-test", "--rdzv_conf", "join_timeout=120", "--max_restarts", "0",
            "-m", "scalelab", "pretrain", "--skip-eval", *_sets(multi),
        ]
        nodes.append(subprocess.Popen(cmd, env=subprocess_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    try:
        outputs = [p.communicate(timeout=300)[0] for p in (reference, *nodes)]
    finally:
        for p in (reference, *nodes):
            if p.poll() is None:
                p.kill()
    for p, out in zip((reference, *nodes), outputs):
        assert p.returncode == 0, out[-3000:]
    assert all(f"run folder: {multi}" in out for out in outputs[1:])

    records = read_metrics(multi / "metrics.jsonl")
    [setup] = [r for r in records if r["kind"] == "setup"]  # rank 0 alone writes the shared run folder
    assert (setup["world_size"], setup["nodes"]) == (2, 2)
    one, two = _train_losses(single), _train_losses(multi)
    assert len(one) == len(two) == 8
    # each node computed half of every global batch; the all-reduced update is the single-process one
    assert two == pytest.approx(one, rel=1e-4, abs=1e-5)
