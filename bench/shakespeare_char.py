"""The classic character-level tiny-Shakespeare run, with this project's model and trainer.

Setup (nanoGPT's CPU budget): first 90% of characters train, last 10% validate; 2,000 steps of
12 × 64 tokens; a 4-layer, 128-wide, 4-head model. Reports the wall time and steps to reach
val loss 1.88, and the best val loss within the budget. Validation loss is measured every
``--eval-every`` steps on the whole validation split.

Reads ../shared/data/tinyshakespeare/input.txt (or --data); exits 0 with a message when absent.
Appends to bench/results/shakespeare_char.md.

    python bench/shakespeare_char.py [--steps 2000] [--set train.optim.lr=3e-3 ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
TARGET = 1.88


def main() -> int:
    from scalelab.config import load_config
    from scalelab.data.loader import TokenLoader
    from scalelab.model.gpt import GPT
    from scalelab.runtime import seed_everything
    from results_file import append_results
    from scalelab.tokenizer import CharTokenizer
    from scalelab.train.optim import build_optimizer, lr_at, set_lr
    from scalelab.train.trainer import evaluate_loss

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--config", default=str(REPO / "configs" / "shakespeare_char.toml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--results", default=str(REPO / "bench" / "results" / "shakespeare_char.md"))
    args = ap.parse_args()
    path = Path(args.data)
    if not path.is_file():
        print(f"skipped: {path} not found (the tinyshakespeare corpus is needed for this benchmark)")
        return 0

    cfg = load_config(args.config, args.overrides)
    text = path.read_text(encoding="utf-8")
    split = int(0.9 * len(text))
    tok = CharTokenizer.from_text(text)
    train_ids = np.array(tok.encode(text[:split]), dtype=np.uint16)
    val_ids = np.array(tok.encode(text[split:]), dtype=np.uint16)
    cfg.model.vocab_size = tok.vocab_size
    t = cfg.train
    seed_everything(cfg.run.seed)
    model = GPT(cfg.model)
    opt = build_optimizer(model, t.optim)
    loader = TokenLoader(train_ids, t.batch_size, model.config.block_size, seed=cfg.run.seed)
    device = torch.device("cpu")

    history, reached_at, reached_time = [], None, None
    train_time = 0.0
    for step in range(1, t.steps + 1):
        t0 = time.perf_counter()
        set_lr(opt, lr_at(step - 1, t.optim, t.steps))  # each group's lr_scale (Muon's rate) rides on it
        x, y = loader.next_batch()
        loss = model(x, y)
        loss.backward()
        if t.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        train_time += time.perf_counter() - t0
        if step % args.eval_every == 0 or step == t.steps:
            val, _ = evaluate_loss(model, val_ids, 64, model.config.block_size, None, device, "fp32")
            model.train()
            history.append((step, val))
            print(f"step {step:5d}  train {loss.item():.4f}  val {val:.4f}  ({train_time:.0f} s training)", flush=True)
            if reached_at is None and val <= TARGET:
                reached_at, reached_time = step, train_time
    best_step, best = min(history, key=lambda h: h[1])
    c = model.config
    lines = [
        f"model: {c.depth} layers, width {c.n_embd}, {c.n_head} heads, mlp {c.mlp}, qk_norm {c.qk_norm}, "
        f"{model.num_params():,} parameters, vocab {c.vocab_size}",
        f"budget: {t.steps} steps of {t.batch_size} x {c.block_size} tokens; optimizer {t.optim.name}, lr {t.optim.lr}"
        f"{f' (Muon {t.optim.muon_lr})' if t.optim.name == 'muon' else ''}, {t.optim.schedule} schedule, warmup {t.optim.warmup_steps}",
        f"val loss measured every {args.eval_every} steps on the whole validation split ({len(val_ids):,} chars)",
        (f"reached val loss {TARGET} at step {reached_at} after {reached_time:.0f} s of training"
         if reached_at else f"did not reach val loss {TARGET} within {t.steps} steps"),
        f"best val loss {best:.4f} at step {best_step}; final {history[-1][1]:.4f}; total training time {train_time:.0f} s",
    ]
    print("\n".join(lines))
    append_results(args.results, lines + ["val loss by step: " + ", ".join(f"{s}: {v:.3f}" for s, v in history)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
