"""A pretrained base shared by every condition of a study, cached in the study's output folder.

Pretraining is the slow part of a post-training study on CPU, and every condition must start from
the same weights for the comparison to mean anything, so the base is trained once and reused while
its recipe (the sections that shape it) is unchanged.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

from scalelab.config import Config
from scalelab.errors import ScalelabError
from scalelab.pipeline import pretrain
from scalelab.run import CHECKPOINTS_DIR, Run
from scalelab import checkpoint as ckpt

FINGERPRINT = "base_recipe.json"


def _recipe(cfg: Config) -> dict:
    recipe = {k: asdict(getattr(cfg, k)) for k in ("data", "tokenizer", "model", "train")} | {"seed": cfg.run.seed}
    return json.loads(json.dumps(recipe, default=str))  # the form it has once read back from disk


def ensure_base(cfg: Config, folder: str | Path, given: str = "") -> Path:
    """The run to post-train from: ``given`` if set, else a cached pretraining run in ``folder``."""
    if given:
        run = Run.open(given)
        if run.latest_checkpoint() is None or run.world is None:
            raise ScalelabError(f"base run {run.path} has no checkpoint or no world.json; pretrain it on the world first")
        return run.path
    run = Path(folder)
    stamp = run / FINGERPRINT
    recipe = _recipe(cfg)
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe and ckpt.latest_checkpoint(run / CHECKPOINTS_DIR):
        return run
    if cfg.data.source != "world":
        raise ScalelabError("post-training studies need the synthetic world: set data.source = 'world'")
    if run.exists():
        shutil.rmtree(run)

    pretrain(replace(cfg, run=replace(cfg.run, out_dir=str(run), name="base")), overwrite=True, stages=())
    stamp.write_text(json.dumps(recipe, indent=2) + "\n")
    return run


def stage_config(cfg: Config, out_dir: Path, **sections) -> Config:
    """A copy of ``cfg`` writing to ``out_dir``, with some stage sections replaced (sft=..., rm=..., ...)."""
    return replace(cfg, run=replace(cfg.run, out_dir=str(out_dir), name=Path(out_dir).name), **sections)


def clear_outputs_keep_base(out: str | Path) -> None:
    """``--overwrite`` for a study: delete its outputs but keep the cached bases (``base``, or one per size
    ``base_d<depth>``), which are retrained only when their recipe changes."""
    out = Path(out)
    if not out.is_dir():
        return
    for child in out.iterdir():
        if child.name != "base" and not child.name.startswith("base_"):
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def open_study_folder(out_dir: str | Path, overwrite: bool, keep_base: bool = True) -> Path:
    """A study's output folder, ready to write: finished results are never replaced unasked, and what an
    earlier (finished or crashed) run left is cleared, keeping the cached base unless ``keep_base`` is off."""
    out = Path(out_dir)
    if (out / "results.json").exists() and not overwrite:
        raise ScalelabError(f"{out} already holds results.json; pass --overwrite to run again")
    if keep_base:
        clear_outputs_keep_base(out)
    elif out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out
