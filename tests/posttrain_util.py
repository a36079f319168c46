"""A tiny finished 'pretraining' run folder, built in well under a second, for the post-training tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scalelab.config import Config, to_toml
from scalelab.data.world import World, WorldConfig
from scalelab.model.gpt import GPT, GPTConfig
from scalelab.tokenizer import ByteTokenizer
from scalelab import checkpoint as ckpt

WORLD = WorldConfig(n_people=24, bios_per_person=1, extra_tasks={})


def tiny_model(vocab_size: int, block_size: int = 128, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, depth=2, aspect_ratio=32, head_dim=16, **kw))


def make_init_run(root: Path, block_size: int = 128, seed: int = 0) -> Path:
    """A run folder as pretraining leaves it: config.toml, tokenizer/, world.json and one checkpoint."""
    run = Path(root)
    run.mkdir(parents=True, exist_ok=True)
    tok = ByteTokenizer()
    tok.save(run / "tokenizer")
    World(WORLD).save(run / "world.json")
    model = tiny_model(tok.vocab_size, block_size, seed)
    opt = torch.optim.AdamW(model.parameters())
    ckpt.save_checkpoint(run / "checkpoints", model, opt, 0, {})
    cfg = Config()
    cfg.model, cfg.tokenizer.kind, cfg.data.world = model.config, "byte", WORLD
    (run / "config.toml").write_text(to_toml(cfg))
    return run


def post_overrides(out_dir: Path, **extra) -> list[str]:
    base = {"run.out_dir": f'"{out_dir}"', "run.progress": "false", "train.log_every": "1", "eval.max_new_tokens": "8"}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and far faster when other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
