"""bench/recipe_ablation.py's own pieces: the classic baseline model, the target bookkeeping, bad input."""

import subprocess
import sys
from pathlib import Path

import torch

from conftest import subprocess_env

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import recipe_ablation  # noqa: E402


def test_classic_model_is_tied_and_learns_positions():
    model = recipe_ablation.ClassicGPT(vocab=32, block=16, depth=2, width=32, heads=4)
    assert model.head.weight is model.tok.weight and model.pos.weight.shape == (16, 32)
    x = torch.randint(0, 32, (2, 16))
    assert model(x).shape == (2, 16, 32) and model(x, x).item() > 0


def test_steps_to_target_is_the_first_evaluation_under_it():
    r = recipe_ablation.RunResult("muon", 0, evals=[(25, 1.0, 2.5), (50, 2.0, 2.1), (75, 3.0, 2.0)])
    assert r.reached(2.2) == (50, 2.0) and r.reached(1.5) is None


def test_missing_corpus_is_a_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, str(BENCH / "recipe_ablation.py"), "--quick", "--tasks", "shakespeare",
                        "--data", str(tmp_path / "none.txt"), "--results", str(tmp_path / "r.md")],
                       env=subprocess_env(1), capture_output=True, text=True, cwd=BENCH, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: tiny Shakespeare not found at {tmp_path / 'none.txt'} (pass --data, or drop 'shakespeare' from --tasks)"]
    assert not (tmp_path / "r.md").exists()


def test_target_row_outside_the_rows_is_a_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, str(BENCH / "recipe_ablation.py"), "--quick", "--tasks", "world",
                        "--rows", "scalelab", "--target-row", "adamw_450", "--results", str(tmp_path / "r.md")],
                       env=subprocess_env(1), capture_output=True, text=True, cwd=BENCH, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --target-row 'adamw_450' is not among --rows (scalelab)"]
    assert not (tmp_path / "r.md").exists()
