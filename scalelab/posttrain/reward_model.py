"""Reward model: a scalar head on a GPT backbone, trained with the Bradley-Terry pairwise loss.

The score of a (prompt, reply) is the head applied to the final hidden state of
the reply's last token, its ``<|assistant_end|>``: causal attention means that
position has read the whole conversation. The same module gives one value per
position, which is what PPO's critic needs.

    P(chosen > rejected) = sigmoid(r_chosen - r_rejected)
    loss = -log sigmoid(r_chosen - r_rejected - margin)
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from scalelab.config import Config
from scalelab.errors import ScalelabError
from scalelab.model.gpt import GPT
from scalelab.posttrain import common
from scalelab.posttrain.data import (
    Preference,
    load_hf_preferences,
    load_preferences,
    preference_batch,
    split_holdout,
    tokenize_preferences,
    write_jsonl,
)
from scalelab.posttrain.mixture import people_group, preference_pairs
from scalelab.run import Run
from scalelab.runtime import resolve_device, seed_everything
from scalelab import checkpoint as ckpt
from scalelab.train.metrics import MetricsLogger
from scalelab.train.optim import build_optimizer

HEAD_FILE = "score_head.safetensors"


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float = 0.0
                       ) -> torch.Tensor:
    """Mean of -log sigmoid(r_c - r_r - margin): the chosen reply must win by at least ``margin``."""
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()


class ScalarHeadModel(nn.Module):
    """A GPT backbone with a linear head to one number per position (values) or per sequence (score)."""

    def __init__(self, backbone: GPT):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.n_embd, 1)
        with torch.no_grad():
            self.head.weight.normal_(0.0, 1.0 / (backbone.config.n_embd + 1) ** 0.5)
            self.head.bias.zero_()

    @property
    def config(self):
        return self.backbone.config

    def values(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.hidden_states(idx)).squeeze(-1).float()

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Score of each right-padded row, read at its last real token (position lengths - 1)."""
        v = self.values(idx)
        return v[torch.arange(len(idx), device=idx.device), lengths.to(idx.device) - 1]

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        groups = self.backbone.optimizer_groups(weight_decay)
        groups[1]["params"] = groups[1]["params"] + list(self.head.parameters())
        return groups

    def save_head(self, folder: Path) -> None:
        tmp = folder / (HEAD_FILE + ".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}, str(tmp))
        tmp.replace(folder / HEAD_FILE)


def load_reward_model(run_dir: str | Path, device="cpu") -> tuple[ScalarHeadModel, object]:
    """The reward model of an ``scalelab rm`` run folder, and its tokenizer."""
    run = Run.open(run_dir)
    found = run.latest_checkpoint()
    if found is None or not (found / HEAD_FILE).is_file():
        raise ScalelabError(f"{run.path} is not a reward-model run (no checkpoint with {HEAD_FILE}); "
                            "train one with scalelab rm")
    model = ScalarHeadModel(run.load_model(device))
    model.head.load_state_dict(ckpt.read_safetensors(found / HEAD_FILE))
    return model.to(device).eval(), run.tokenizer


def load_pairs(section, world, seed: int) -> list[Preference]:
    """Preference pairs from the stage's section (rm or dpo): generated over the world, or read from a file."""
    if section.data == "generated":
        if world is None:
            raise ScalelabError("data = 'generated' needs a run trained on the synthetic world (its world.json); "
                                "give a jsonl or hf preference file instead")
        return preference_pairs(world, section.n_pairs, seed=seed, bias=section.bias,
                                people=people_group(world, section.people))
    if section.data == "jsonl":
        return load_preferences(section.path)
    return load_hf_preferences(section.path, section.split)


def tokenized_or_fail(tokenizer, prefs, block_size: int, what: str):
    rows, dropped = tokenize_preferences(tokenizer, prefs, block_size)
    if not rows:
        raise ScalelabError(f"no {what} preference pair fits the model's context of {block_size} tokens")
    return rows, dropped


@torch.no_grad()
def pairwise_accuracy(model: ScalarHeadModel, rows, metas: list[dict], pad_id: int, batch_size: int, device) -> dict:
    """Held-out share of pairs whose chosen reply scores higher; also per preference rule when known."""
    was = model.training
    model.eval()
    wins, margins = [], []
    for i in range(0, len(rows), batch_size):
        ids, _, lengths, _ = preference_batch(rows[i : i + batch_size], pad_id)
        r = model(ids.to(device), lengths)
        rc, rr = r.chunk(2)
        wins += (rc > rr).float().tolist()
        margins += (rc - rr).tolist()
    model.train(was)
    out = {"val_accuracy": sum(wins) / len(wins), "val_margin": sum(margins) / len(margins)}
    by_rule: dict[str, list[float]] = {}
    for w, m in zip(wins, metas):
        if "rule" in m:
            by_rule.setdefault(m["rule"], []).append(w)
    out.update({f"val_accuracy/{k}": sum(v) / len(v) for k, v in sorted(by_rule.items())})
    return out


def run_rm(cfg: Config, init_dir: str | Path, overwrite: bool = False) -> dict:
    """Train a reward model from the --init backbone; reports held-out pairwise accuracy."""
    device = resolve_device(cfg.run.device)
    seed_everything(cfg.run.seed)
    init = Run.open(init_dir)
    init_model = init.load_model(device)
    run = Run.create(cfg, "rm", init, overwrite).path
    tok, r = init.tokenizer, cfg.rm
    model = ScalarHeadModel(init_model).to(device).train()
    train_p, val_p = split_holdout(load_pairs(r, init.world, cfg.run.seed), r.val_fraction, cfg.run.seed)
    block = model.config.block_size
    train_rows, dropped = tokenized_or_fail(tok, train_p, block, "training")
    val_rows, val_metas = [], []
    for p in val_p:
        rows, _ = tokenize_preferences(tok, [p], block)
        if rows:
            val_rows += rows
            val_metas.append(p.meta)
    write_jsonl(run / "rm_val.jsonl", [p.to_json() for p in val_p])
    tcfg = common.stage_train_config(cfg.train, r)
    optimizer = build_optimizer(model, tcfg.optim)
    logger = MetricsLogger(run / "metrics.jsonl")
    logger.log(kind="setup", step=0, stage="rm", pairs=len(train_rows), val_pairs=len(val_rows),
               dropped_too_long=dropped, params=model.backbone.num_params())
    batches = common.epoch_batches(len(train_rows), min(tcfg.batch_size, len(train_rows)), cfg.run.seed)

    def step_fn(step):
        batch = [train_rows[i] for i in next(batches).tolist()]
        ids, _, lengths, margins = preference_batch(batch, tok.bos_id)
        rc, rr = model(ids.to(device), lengths).chunk(2)
        loss = bradley_terry_loss(rc, rr, margins.to(device) + r.margin)
        rd = (rc - rr).detach()
        return loss, {"accuracy": float((rd > 0).float().mean()), "margin": float(rd.mean())}

    def eval_fn():
        return pairwise_accuracy(model, val_rows, val_metas, tok.bos_id, tcfg.batch_size, device) if val_rows else {}

    t0 = time.perf_counter()
    losses, last = common.run_steps(model.parameters(), optimizer, tcfg, step_fn, eval_fn, r.eval_every, logger, device,
                                    "rm", cfg.run.progress)
    path = common.save(run, model.backbone, optimizer, tcfg.steps, "rm")
    model.save_head(path)
    logger.close()
    summary = {"stage": "rm", "init": str(init.path), "steps": tcfg.steps, "final_loss": losses[-1], **last,
               "checkpoint": str(path), "wall_seconds": time.perf_counter() - t0}
    common.write_json(run / "summary.json", summary)
    return summary
