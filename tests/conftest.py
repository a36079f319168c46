import importlib
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def dev_import(module: str):
    """Import a package of the ``dev`` extra (pyproject.toml), which ``make test`` always installs.

    Without it, a local run skips the test (a bare ``pip install -e .`` plus pytest); under CI=true
    the missing or broken import fails, so a broken install can never pass as skips. At module
    level a skip is raised for the whole file.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{module} (the dev extra) does not import under CI: {e}", pytrace=False)
        pytest.skip(f"{module} is not installed (pip install -e '.[dev]')", allow_module_level=True)


def subprocess_env(threads: int = 1) -> dict:
    """Environment for a child process: one intra-op thread each, so two ranks share 2 cores without thrashing."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def tiny_overrides(out_dir: Path, steps: int = 8, **extra) -> list[str]:
    """A config that trains in seconds: a small world, byte-level BPE of 300, a 2-layer model."""
    base = {
        "run.out_dir": f'"{out_dir}"',
        "run.progress": "false",
        "data.world.n_people": "24",
        "data.world.bios_per_person": "2",
        "data.world.extra_tasks": "{arithmetic = 50}",
        "tokenizer.vocab_size": "300",
        "model.depth": "2",
        "model.aspect_ratio": "32",
        "model.head_dim": "16",
        "model.block_size": "32",
        "train.steps": str(steps),
        "train.batch_size": "8",
        "train.optim.warmup_steps": "2",
        "train.eval_every": "4",
        "train.eval_batches": "2",
        "train.log_every": "1",
        "eval.qa_examples": "5",
        "eval.arithmetic_examples": "5",
        "eval.ngram_order": "3",
        "sample.num_samples": "1",
        "sample.max_new_tokens": "8",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture
def tiny():
    return tiny_overrides


def scalelab_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "scalelab", *args]


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """One `scalelab serve` process (API key serve_util.API_KEY) over a tiny trained run, shared by
    the server and web chat tests."""
    from serve_util import API_KEY, Server, train_tiny_run

    server = Server(train_tiny_run(tmp_path_factory.mktemp("serve") / "tiny"), "--api-key", API_KEY, "--max-batch", "4")
    yield server
    server.stop()
