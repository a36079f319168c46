import json
import subprocess

import numpy as np
import pytest

from conftest import scalelab_cmd, subprocess_env, tiny_overrides
from scalelab.data.world import World, WorldConfig
from scalelab.data import subtask_tags
from scalelab.evals import subtasks
from scalelab.tokenizer import build_tokenizer


def _tag_names(text: str) -> dict[str, str]:
    tags = subtask_tags.tag_world_text(text)
    out: dict[str, list[str]] = {}
    for ch, t in zip(text, tags):
        out.setdefault(subtask_tags.SUBTASKS[t], []).append(ch)
    return {k: "".join(v) for k, v in out.items()}


def test_tags_names_facts_digits_and_filler():
    text = "Zelda C. Rasmussen was born on January 7, 1984 in Kestrel Ridge.\nWhat is 12 + 7? 19"
    got = _tag_names(text)
    assert got["names"] == "Zelda C. Rasmussen"
    assert got["facts"] == "January 7, 1984Kestrel Ridge"  # the longest value wins over the city "Kestrel"
    assert got["digits"] == "12719"
    assert "was born on" in got["filler"] and "What is" in got["filler"]


def test_digits_outside_worksheets_are_not_arithmetic():
    assert "digits" not in _tag_names("She has 3 cats and 12 dogs.")


def test_token_tags_align_with_the_shard_stream():
    world = World(WorldConfig(n_people=20, bios_per_person=1, extra_tasks={"arithmetic": 20}))
    docs = world.pretraining_documents()
    tok = build_tokenizer("bpe", docs, 300)
    tags = subtask_tags.tag_token_stream(docs, tok)
    n_tokens = sum(len(ids) + 1 for ids in tok.encode_batch(docs))
    assert tags.shape == (n_tokens,)
    assert tags[0] == subtask_tags.IGNORE
    present = set(np.unique(tags)) - {subtask_tags.IGNORE}
    assert present == set(range(len(subtask_tags.SUBTASKS)))
    # Decoding each sub-task's tokens gives back text of that kind.
    stream = np.concatenate([[tok.bos_id, *ids] for ids in tok.encode_batch(docs)])
    digits = tok.decode(stream[tags == subtask_tags.SUBTASKS.index("digits")].tolist())
    assert set(digits.replace(" ", "")) <= set("0123456789")


def test_char_tokenizer_tags_too():
    docs = ["Aria B. Holloway works at Emberforge.", "What is 3 + 4? 7"]
    tok = build_tokenizer("char", docs)
    tags = subtask_tags.tag_token_stream(docs, tok)
    assert (tags == subtask_tags.SUBTASKS.index("names")).sum() == len("Aria B. Holloway")


def test_saturation_steps():
    curves = {"fast": ([1, 2, 3, 4], [4.0, 1.1, 1.0, 1.0]), "slow": ([1, 2, 3, 4], [4.0, 3.5, 3.0, 1.0])}
    assert subtasks.saturation_steps(curves) == {"fast": 2, "slow": 4}


def test_load_tags_checks_length(tmp_path):
    subtask_tags.save_tags(np.zeros(5, dtype=np.uint8), tmp_path)
    assert subtask_tags.load_tags(tmp_path, 5).shape == (5,)
    with pytest.raises(Exception, match="rebuild"):
        subtask_tags.load_tags(tmp_path, 6)
    assert subtask_tags.load_tags(tmp_path / "none", 5) is None


def test_pretrain_logs_subtask_losses_and_plots_them(tmp_path):
    out = tmp_path / "run"
    args = scalelab_cmd("pretrain", "--skip-eval")
    extra = {"data.world.n_people": "60", "data.val_fraction": "0.3", "train.eval_batches": "100",
             "data.world.extra_tasks": "{arithmetic = 400}"}  # enough worksheets that val holds digits
    for o in tiny_overrides(out, steps=8, **extra):
        args += ["--set", o]
    subprocess.run(args, check=True, env=subprocess_env(), capture_output=True, timeout=300)
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert evals and all(f"val_loss/{name}" in evals[-1] for name in ("filler", "names", "facts", "digits"))
    subprocess.run(scalelab_cmd("report", str(out)), check=True, env=subprocess_env(), capture_output=True)
    assert (out / "subtasks.png").is_file()
    assert "## Sub-tasks" in (out / "report.md").read_text()
