"""The pretraining loop: one code path for 1 process or many under torchrun.

Batch size, gradient accumulation and the learning-rate schedule are defined by
the global batch, so the number of processes changes only who computes which
rows, never the training math.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from scalelab.config import Config
from scalelab.data.loader import TokenLoader, eval_batches
from scalelab.data.subtask_tags import SUBTASKS
from scalelab.errors import ScalelabError
from scalelab.model.gpt import GPT
from scalelab.parallel.dist import DistEnv, all_reduce_mean, all_reduce_sum, barrier, broadcast_object
from scalelab.parallel.setup import ParallelSetup
from scalelab.runtime import autocast_context, resolve_device, seed_everything
from scalelab import checkpoint as ckpt
from scalelab.train.metrics import MetricsLogger
from scalelab.train.optim import build_optimizer, lr_at, set_lr
from scalelab.train.spike import FaultInjector, SpikeGuard, agree_on_loss


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # training loss of every step run in this call
    final_val_loss: float = float("nan")
    best_val_loss: float = float("nan")
    tokens_seen: int = 0
    wall_seconds: float = 0.0
    checkpoint: Path | None = None
    interventions: list[dict] = field(default_factory=list)  # spike-guard rollbacks, as logged


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    tokens: np.ndarray,
    batch_size: int,
    block_size: int,
    max_batches: int | None,
    device: torch.device,
    dtype: str,
    env: DistEnv = DistEnv(),
    tags: np.ndarray | None = None,
    n_tags: int = 0,
    lockstep: bool = False,
) -> tuple[float, int] | tuple[float, int, dict[int, tuple[float, int]]]:
    """Mean next-token loss (nats) over deterministic windows of ``tokens``; also the token count.

    With ``tags`` (one small int per token, < ``n_tags``), also the loss and token count of each tag,
    from the same forward passes. Batches are dealt round-robin to processes and the sums all-reduced.
    ``lockstep``: sharded models run collectives inside forward, so every rank makes the same number
    of forward calls (ranks short of a batch repeat one and discard it).
    """
    was_training = model.training
    model.eval()
    total = torch.zeros(2 + 2 * n_tags, dtype=torch.float64)
    windows = eval_batches(tokens, batch_size, block_size, max_batches)
    # The same windowing over the tag array lines every target token up with its tag.
    tag_windows = eval_batches(tags, batch_size, block_size, max_batches) if tags is not None else None
    n_batches = 0
    for i, (x, y) in enumerate(windows):
        y_tags = next(tag_windows)[1] if tag_windows is not None else None
        n_batches += 1
        if i % env.world_size != env.rank:
            continue
        with autocast_context(device, dtype):
            token_losses = model(x.to(device), y.to(device), reduction="none").double().cpu()
        total[0] += token_losses.sum()
        total[1] += y.numel()
        if y_tags is not None:
            flat = y_tags.reshape(-1)
            for k in range(n_tags):
                hit = flat == k
                total[2 + 2 * k] += token_losses[hit].sum()
                total[3 + 2 * k] += hit.sum()
    if lockstep:
        mine = len(range(env.rank, n_batches, env.world_size))
        for x, y in eval_batches(tokens, batch_size, block_size, 1):
            for _ in range(-(-n_batches // env.world_size) - mine):
                with autocast_context(device, dtype):
                    model(x.to(device), y.to(device), reduction="none")
    total = all_reduce_sum(total, env)
    model.train(was_training)
    if total[1] == 0:
        raise ScalelabError(f"validation split has too few tokens for one block of {block_size + 1}")
    mean, count = float(total[0] / total[1]), int(total[1])
    if tags is None:
        return mean, count
    per_tag = {k: (float(total[2 + 2 * k] / max(total[3 + 2 * k], 1)), int(total[3 + 2 * k])) for k in range(n_tags)}
    return mean, count, per_tag


class Trainer:
    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path,
        train_tokens: np.ndarray,
        val_tokens: np.ndarray,
        val_bytes_per_token: float,
        env: DistEnv = DistEnv(),
        model: GPT | None = None,
        val_subtasks: np.ndarray | None = None,
    ):
        self.cfg, self.env = cfg, env
        self.val_subtasks = val_subtasks  # per-token sub-task tags of val_tokens (see data/subtask_tags.py)
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.val_tokens = val_tokens
        self.val_bytes_per_token = val_bytes_per_token
        t = cfg.train
        self.device = resolve_device(cfg.run.device, env.local_rank)
        # The mesh decides who reads which rows: ranks of one tensor-parallel group share a data rank.
        self.parallel = ParallelSetup(cfg.parallel, env, self.device)
        data = self.parallel.data_env
        if t.batch_size % (data.world_size * t.grad_accum):
            raise ScalelabError(
                f"invalid config: train.batch_size={t.batch_size} must be divisible by data-parallel processes × "
                f"train.grad_accum = {data.world_size} × {t.grad_accum}"
            )
        seed_everything(cfg.run.seed)
        self.model = (model or GPT(cfg.model)).to(self.device)
        self.block_size = self.model.config.block_size
        self.loader = TokenLoader(
            train_tokens, t.batch_size, self.block_size, seed=cfg.run.seed, rank=data.rank, world_size=data.world_size
        )
        self.step = 0
        # FSDP2 and TP replace parameters with DTensors in place: the optimizer must see the new ones.
        self.train_model = self.parallel.apply(self.model)
        self.optimizer = build_optimizer(self.model, t.optim)
        if t.compile:
            self.train_model = torch.compile(self.train_model)
        self.guard = SpikeGuard(t.spike_window, t.spike_threshold, t.spike_warmup) if t.spike_guard else None
        self.fault = FaultInjector.parse(t.inject_fault)
        self.rollbacks = 0

    # -- state ----------------------------------------------------------------------------------------

    def save(self) -> Path:
        path, sharded = None, {}
        if self.parallel.sharded:
            # Every rank writes its DCP shards; rank 0 folds them into its atomic checkpoint write.
            sharded = ckpt.write_shards(self.env, self.ckpt_dir, self.step, self.model, self.optimizer)
        if self.env.is_main:
            extra = {"spike_guard": self.guard.state_dict()} if self.guard else None
            path = ckpt.save_checkpoint(
                self.ckpt_dir, self.model, self.optimizer, self.step, self.loader.state_dict(), extra=extra, **sharded
            )
            ckpt.prune_checkpoints(self.ckpt_dir, self.cfg.train.keep_checkpoints)
        barrier(self.env)
        return path or self.ckpt_dir / f"step_{self.step:06d}"

    def resume(self, path: Path | None = None) -> bool:
        """Continue from ``path`` (default: the latest complete checkpoint), exactly where it stopped.

        False if there is no checkpoint.
        """
        path = path or ckpt.latest_checkpoint(self.ckpt_dir)
        if path is None:
            return False
        state = ckpt.load_train_state(path)
        # DCP when the checkpoint has shards (resharded onto this mesh), else the one-file weights
        ckpt.load_into(path, self.model, self.optimizer, state["optimizer"], sharded=self.parallel.sharded)
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["torch_rng"])
        if torch.cuda.is_available() and state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step = int(state["step"])
        if self.guard:
            self.guard.load_state_dict(state["extra"].get("spike_guard", {}))
        return True

    # -- loop -----------------------------------------------------------------------------------------

    def _roll_back(self, reason: str, loss: float) -> dict:
        """Back to the newest checkpoint old enough to predate the spike, past the data that led to it."""
        t = self.cfg.train
        spike_step = self.step
        if self.rollbacks >= t.spike_max_rollbacks:
            raise ScalelabError(
                f"loss spike at step {spike_step} ({reason}) after {self.rollbacks} rollbacks "
                f"(train.spike_max_rollbacks); lower train.optim.lr or check the data"
            )
        latest_allowed = spike_step - t.spike_rollback_steps
        # Rank 0 picks, so every rank restores the same checkpoint even if a listing races a write.
        target = broadcast_object(_spike_target(self.ckpt_dir, latest_allowed) if self.env.is_main else None, self.env)
        if target is None:
            raise ScalelabError(
                f"loss spike at step {spike_step} ({reason}) but no checkpoint at or before step {latest_allowed} "
                f"to roll back to in {self.ckpt_dir}; lower train.ckpt_every or train.spike_rollback_steps"
            )
        self.resume(Path(target))
        skipped = spike_step - self.step + t.spike_skip_batches
        self.loader.skip_batches(skipped)
        if self.env.is_main:
            # Newer checkpoints hold the abandoned history: a resume or a later rollback must not see them.
            ckpt.discard_checkpoints_after(self.ckpt_dir, self.step)
        barrier(self.env)
        self.rollbacks += 1
        return {
            "kind": "intervention", "step": spike_step, "loss": loss if math.isfinite(loss) else None,
            "reason": reason, "rolled_back_to": self.step, "skipped_batches": skipped,
            "rollback": self.rollbacks,
        }

    def eval_val(self) -> tuple[float, float, dict[str, float]]:
        """Val loss, val bits per byte, and the val loss of each sub-task when the val set is tagged."""
        t = self.cfg.train
        tagged = self.val_subtasks is not None
        out = evaluate_loss(
            self.model, self.val_tokens, max(1, t.batch_size // self.parallel.data_env.world_size), self.block_size,
            t.eval_batches, self.device, t.dtype, self.parallel.data_env,
            tags=self.val_subtasks, n_tags=len(SUBTASKS) if tagged else 0, lockstep=self.parallel.sharded,
        )
        loss = out[0]
        per_subtask = {f"val_loss/{SUBTASKS[k]}": v for k, (v, n) in out[2].items() if n} if tagged else {}
        return loss, loss / math.log(2) / self.val_bytes_per_token, per_subtask

    def train_step(self) -> float:
        t = self.cfg.train
        lr = lr_at(self.step, t.optim, t.steps)
        if self.fault:
            lr *= self.fault.lr_factor(self.step + 1)
        set_lr(self.optimizer, lr)  # each group's lr_scale (Muon's rate) rides on the schedule
        x, y = self.loader.next_batch()
        if self.fault:
            x, y = self.fault.batch(
                self.step + 1, x, y, self.model.config.vocab_size, self.cfg.run.seed, self.parallel.data_env.rank
            )
        micro_x, micro_y = x.chunk(t.grad_accum), y.chunk(t.grad_accum)
        loss_total = torch.zeros((), dtype=torch.float32)
        for i, (mx, my) in enumerate(zip(micro_x, micro_y)):
            last = i == t.grad_accum - 1
            # Only the last micro-batch reduces gradients (DDP all-reduce, FSDP2 reduce-scatter).
            sync = _null() if last else self.parallel.no_sync(self.train_model)
            with sync, autocast_context(self.device, t.dtype):
                loss = self.train_model(mx.to(self.device, non_blocking=True), my.to(self.device, non_blocking=True))
                (loss / t.grad_accum).backward()
            loss_total += loss.detach().float().cpu() / t.grad_accum
        if t.optim.grad_clip > 0:
            self.parallel.clip_grad_norm_(self.model.parameters(), t.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return float(all_reduce_mean(loss_total, self.env))

    def fit(self, steps: int | None = None, logger: MetricsLogger | None = None) -> TrainResult:
        """Run until ``steps`` (default: train.steps) optimizer steps have been taken in total."""
        t = self.cfg.train
        end = t.steps if steps is None else steps
        tokens_per_step = t.batch_size * self.block_size
        result = TrainResult(steps=end)
        bar = None
        if self.env.is_main and self.cfg.run.progress:
            bar = tqdm(total=end, initial=self.step, desc="pretrain", unit="step", dynamic_ncols=True)
        start_time = time.perf_counter()
        last_time, best = start_time, float("inf")
        self.train_model.train()
        first_step = self.step
        while self.step < end:
            loss = self.train_step()
            if self.guard:
                loss = agree_on_loss(loss, self.env, self.device)
                reason = self.guard.check(self.step, loss)
                if reason:
                    record = self._roll_back(reason, loss)
                    del result.losses[max(0, self.step - first_step):]
                    result.interventions.append(record)
                    if logger:
                        logger.log(**record)
                    if self.env.is_main:
                        note = (f"scalelab: loss spike at step {record['step']} ({reason}); rolled back to step "
                                f"{record['rolled_back_to']} and skipped {record['skipped_batches']} batches")
                        if bar:
                            bar.write(note, file=sys.stderr)
                        else:
                            print(note, file=sys.stderr)
                    if bar:
                        bar.n = self.step
                        bar.refresh()
                    continue
            if not math.isfinite(loss):
                raise ScalelabError(f"training loss became {loss} at step {self.step}; lower train.optim.lr or check the data")
            result.losses.append(loss)
            now = time.perf_counter()
            if logger and (self.step % t.log_every == 0 or self.step == end):
                logger.log(
                    kind="train", step=self.step, loss=loss, lr=lr_at(self.step - 1, t.optim, t.steps),
                    tokens=self.step * tokens_per_step, tok_per_s=tokens_per_step / max(now - last_time, 1e-9),
                    elapsed=now - start_time,
                )
            last_time = now
            if self.step % t.eval_every == 0 or self.step == end:
                val_loss, val_bpb, per_subtask = self.eval_val()
                best = min(best, val_loss)
                result.final_val_loss = val_loss
                if logger:
                    logger.log(kind="eval", step=self.step, val_loss=val_loss, val_bpb=val_bpb,
                               elapsed=now - start_time, **per_subtask)
                if bar:
                    bar.set_postfix(loss=f"{loss:.3f}", val=f"{val_loss:.3f}")
            elif bar and self.step % t.log_every == 0:
                bar.set_postfix(loss=f"{loss:.3f}")
            if t.ckpt_every and self.step % t.ckpt_every == 0 and self.step != end:
                self.save()
            if bar:
                bar.update(1)
        if bar:
            bar.close()
        result.best_val_loss = best
        result.tokens_seen = self.step * tokens_per_step
        result.wall_seconds = time.perf_counter() - start_time
        result.checkpoint = self.save()
        return result


def _spike_target(ckpt_dir: Path, latest_allowed: int) -> str | None:
    good = [p for p in ckpt.list_checkpoints(ckpt_dir) if ckpt.checkpoint_step(p) <= latest_allowed]
    return str(good[-1]) if good else None


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")
