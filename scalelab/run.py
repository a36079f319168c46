"""A run folder: what every stage and study reads and writes, opened and created through one type.

    runs/NAME/
        config.toml      the resolved config (load_config reads it back)
        stage.json       which stage made the run, and the run it started from (absent for pretraining)
        tokenizer/       the tokenizer the model was trained with
        data/            token shards (pretraining; post-training runs copy them along)
        world.json       the synthetic world, for runs trained on it
        checkpoints/     step_NNNNNN/ folders and the ``latest`` pointer (scalelab/checkpoint/)
        metrics.jsonl    the training log

``Run.open(path)`` reads a finished run (or one of its checkpoint folders); ``Run.create(cfg, stage,
parent)`` starts a new one from a parent run; ``Run.create_from_model`` writes a run with no parent (an
imported checkpoint). Model, tokenizer and world load on first use.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scalelab.config import Config, OptimConfig, load_config, to_toml
from scalelab.data.world import World
from scalelab.errors import ScalelabError
from scalelab.model.gpt import GPT, GPTConfig
from scalelab import checkpoint as ckpt
from scalelab.tokenizer import load_tokenizer
from scalelab.train.optim import build_optimizer

CONFIG_FILE = "config.toml"
STAGE_FILE = "stage.json"
WORLD_FILE = "world.json"
TOKENIZER_DIR = "tokenizer"
DATA_DIR = "data"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"


def is_run_folder(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


@dataclass
class Run:
    path: Path
    cfg: Config
    checkpoint: Path | None = None  # a pinned checkpoint folder; None: the latest
    _tokenizer: object = field(default=None, repr=False)
    _world: World | None = field(default=None, repr=False)

    # -- layout ------------------------------------------------------------------------------------

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / TOKENIZER_DIR

    @property
    def data_dir(self) -> Path:
        return self.path / DATA_DIR

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def world_file(self) -> Path:
        return self.path / WORLD_FILE

    # -- opening -----------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, overrides: list[str] | None = None) -> Run:
        """A run folder, or a checkpoint folder inside one (then that checkpoint, not the latest, is used)."""
        p = Path(path)
        if not p.exists():
            raise ScalelabError(f"run folder not found: {p} (so it is not a run folder)")
        checkpoint = None
        if not is_run_folder(p) and p.parent.name == CHECKPOINTS_DIR and is_run_folder(p.parent.parent):
            checkpoint, p = p, p.parent.parent
        if not is_run_folder(p):
            raise ScalelabError(f"{p} is not a run folder (no {CONFIG_FILE})")
        return cls(p, load_config(p / CONFIG_FILE, overrides), checkpoint)

    def latest_checkpoint(self) -> Path | None:
        return self.checkpoint or ckpt.latest_checkpoint(self.checkpoints_dir)

    def require_checkpoint(self) -> Path:
        found = self.latest_checkpoint()
        if found is None:
            raise ScalelabError(f"run folder {self.path} has no complete checkpoint")
        return found

    def load_model(self, device: str | torch.device = "cpu") -> GPT:
        """The model of the pinned or latest checkpoint, in eval mode on ``device``."""
        return ckpt.load_model(self.require_checkpoint(), device)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if not self.tokenizer_dir.is_dir():
                raise ScalelabError(f"run folder {self.path} has no {TOKENIZER_DIR}/")
            self._tokenizer = load_tokenizer(self.tokenizer_dir)
        return self._tokenizer

    @property
    def world(self) -> World | None:
        """The synthetic world the run was trained on; None for runs on other corpora."""
        if self._world is None and self.world_file.is_file():
            self._world = World.load(self.world_file)
        return self._world

    def model_config(self) -> GPTConfig:
        """The model's architecture, read from the checkpoint's metadata without loading its weights."""
        meta_file = self.require_checkpoint() / ckpt.META_FILE
        try:
            return GPTConfig(**json.loads(meta_file.read_text())["model_config"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ScalelabError(f"cannot read the model config from {meta_file}: {e}") from None

    def stage_info(self) -> dict:
        """{"stage", "init"} as recorded by Run.create ("init": the parent run), or {"stage", "source"} for an
        imported run; pretraining runs have none."""
        f = self.path / STAGE_FILE
        return json.loads(f.read_text()) if f.is_file() else {"stage": "pretrain"}

    # -- creating ----------------------------------------------------------------------------------

    @classmethod
    def create(cls, cfg: Config, stage: str, parent: Run, overwrite: bool = False) -> Run:
        """A new run folder at ``cfg.run.out_dir`` that starts from ``parent``: its tokenizer, data,
        world and model config come along, so every run-taking command opens the new run unchanged."""
        out = Path(cfg.run.out_dir)
        if out.resolve() == parent.path.resolve():
            raise ScalelabError(f"run.out_dir {out} is the parent run itself; give the {stage} run its own folder")
        if ckpt.latest_checkpoint(out / CHECKPOINTS_DIR) is not None:
            if not overwrite:
                raise ScalelabError(f"run folder {out} already holds a checkpoint; pass --overwrite to start again")
            ckpt.remove_run_folder(out)
        out.mkdir(parents=True, exist_ok=True)
        # The token shards come along (small) so `scalelab eval` can measure what tuning cost on pretraining text.
        for name in (TOKENIZER_DIR, DATA_DIR):
            if (out / name).exists():
                shutil.rmtree(out / name)
            if (parent.path / name).is_dir():
                shutil.copytree(parent.path / name, out / name)
        if parent.world_file.is_file():
            shutil.copy2(parent.world_file, out / WORLD_FILE)
        if (out / METRICS_FILE).exists():
            (out / METRICS_FILE).unlink()
        # The model and its data come from the parent run; the stage's own sections come from the user.
        cfg.model = parent.model_config()
        cfg.data, cfg.tokenizer = parent.cfg.data, parent.cfg.tokenizer
        run = cls(out, cfg)
        run.write_config()
        # "init": the parent, named after the --init flag that chose it
        (out / STAGE_FILE).write_text(json.dumps({"stage": stage, "init": str(parent.path)}, indent=2) + "\n")
        return run

    @classmethod
    def create_from_model(cls, cfg: Config, model: GPT, tokenizer, stage: str, source: dict,
                          overwrite: bool = False) -> Run:
        """A complete run at ``cfg.run.out_dir`` holding ``model`` as its step-0 checkpoint: config, tokenizer,
        checkpoint, stage.json and summary.json. Everything goes to a hidden sibling folder renamed into place
        at the end, so a failure part-way leaves nothing under the out folder."""
        out = Path(cfg.run.out_dir)
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
            raise ScalelabError(f"run folder {out} already exists and is not empty; pass --overwrite to replace it")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            (tmp / CONFIG_FILE).write_text(to_toml(cfg))
            tokenizer.save(tmp / TOKENIZER_DIR)
            # An untouched AdamW: its state_dict holds no moments, only the hyper-parameters
            ckpt.save_checkpoint(tmp / CHECKPOINTS_DIR, model, build_optimizer(model, OptimConfig()), 0, {},
                                 extra={"source": source})
            (tmp / STAGE_FILE).write_text(json.dumps({"stage": stage, "source": source}, indent=2) + "\n")
            (tmp / "summary.json").write_text(json.dumps({"stage": stage, **source}, indent=2) + "\n")
            if out.exists():
                ckpt.remove_run_folder(out) if out.is_dir() else out.unlink()
            tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(out, cfg)

    def write_config(self) -> None:
        self.config_file.write_text(to_toml(self.cfg))
