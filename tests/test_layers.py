"""The package's layers, checked from its import statements (tools/import_graph.py reads them with ast)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import import_graph as graph  # noqa: E402

EDGES = graph.edges()


def test_every_module_has_a_layer():
    for name in graph.modules():
        graph.layer_of(name)  # raises for a module no layer names


def test_no_import_cycles():
    assert graph.cycles(EDGES) == []


# The one upward edge left: sharded checkpoint loading still lives in parallel/setup.py (issue 18 moves
# checkpointing into one component; until then this edge is known, and no other may appear).
KNOWN_UPWARD = {("scalelab.parallel.setup", "scalelab.checkpoint")}


def test_no_lower_layer_imports_an_upper_one():
    upward = {(e.src, e.dst) for e in graph.upward(EDGES)}
    assert upward <= KNOWN_UPWARD, sorted(upward - KNOWN_UPWARD)


def test_function_local_imports_say_why():
    """Imports sit at the top of a file. The CLI defers each stage's import (so `scalelab --help` and a
    bad flag never import torch); anywhere else a function-local import must name its reason."""
    bare = [f"{e.src}:{e.line} -> {e.dst}" for e in EDGES
            if e.local and not e.src.startswith("scalelab.cli") and not e.comment]
    assert bare == []


def test_the_cli_parser_does_not_import_torch():
    code = "import sys; from scalelab.cli.main import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("bad", [("scalelab.model.gpt", "scalelab.train.trainer")])
def test_the_check_catches_an_upward_edge(bad):
    fake = graph.Edge(bad[0], bad[1], 1, False, "")
    assert graph.upward([fake]) == [fake]


def test_the_old_evals_emergence_name_still_runs_with_a_deprecation_note(tmp_path):
    """Renamed commands keep working for one release; a bad sweep folder is still one clean error line."""
    out = subprocess.run([sys.executable, "-m", "scalelab", "evals", "emergence", "--set",
                          f'scaling.out_dir="{tmp_path / "none"}"'], capture_output=True, text=True, cwd=ROOT)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and "deprecated" in lines[0] and "experiments emergence" in lines[0]
    assert lines[1:] == [f"scalelab: error: sweep folder not found: {tmp_path / 'none'}"]
