"""Recipe ablation: steps and wall time to a fixed validation loss, every recipe side by side in one process.

Two tasks:
- ``shakespeare``: character-level tiny Shakespeare at nanoGPT's CPU budget (4 layers, width 128, 12 x 64
  tokens; first 90% of characters train, last 10% validate), from configs/shakespeare_char.toml;
- ``world``: the demo's world model (configs/demo.toml: the synthetic world, byte-level BPE, 4 x 256).

Rows (each trained with ``--seeds`` seeds, interleaved seed by seed so that load on a shared host falls on
every row alike):
- ``classic``: a plain-PyTorch GPT written the nanoGPT way (GELU MLP, LayerNorm, learned positions, tied
  embeddings, AdamW at lr 1e-3 with beta2 0.99, warmup 100 and cosine to 1e-4) and its own training loop:
  the baseline every gain is measured against, and the per-step cost of a plain model of the same shape;
- ``scalelab``: the task's config as it is (RoPE, RMSNorm, ReLU², QK-norm, the config's optimizer and schedule:
  Muon for both since 2026-12-06, the world model's for 270 steps; ``adamw_450`` is the demo's earlier recipe);
- one row per recipe switch, each the ``scalelab`` row plus ``--set`` overrides (see ROWS).

The target: ``--target`` (shakespeare default 1.886, nanoGPT's val loss after 2,000 steps; world default: the
``--target-row`` row's mean final val loss; unnamed, the ``scalelab`` row, i.e. the demo's own result, or the
first row). The demo's 60%-of-steps comparison is ``--tasks world --seeds 3 --rows adamw_450,scalelab
--target-row adamw_450``. A row's "steps to target" is the first
evaluation at or under it; its "time to target" the training time (evaluations excluded) up to that step.
Validation loss is the mean over ``--eval-batches`` fixed windows of the validation split.

Tiny Shakespeare comes from ../shared/data/tinyshakespeare/input.txt (or --data); the benchmark stops with
an error when it is missing. Appends to bench/results/recipe_ablation.md and writes recipe_ablation.png.

    python bench/recipe_ablation.py [--quick] [--tasks shakespeare,world] [--seeds 3] [--rows classic,scalelab,muon]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from results_file import append_results
from scalelab.config import Config, OptimConfig, load_config
from scalelab.data.loader import TokenLoader
from scalelab.errors import ScalelabError
from scalelab.evals.plots import plt, save_figure
from scalelab.model.gpt import GPT
from scalelab.pipeline import prepare
from scalelab.runtime import seed_everything
from scalelab.tokenizer import CharTokenizer
from scalelab.train.optim import build_optimizer, clip_grad_norm, lr_at, set_lr
from scalelab.train.trainer import evaluate_loss

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
SHAKESPEARE_TARGET = 1.886  # nanoGPT's own val loss after 2,000 iterations of its CPU recipe

# Recipe switches: name -> overrides on top of the task's config. "classic" and "scalelab" are built in.
ROWS: dict[str, list[str]] = {
    # configs/shakespeare_char.toml defaults to Muon since 2026-12-06: this row is its AdamW recipe
    "adamw": ["train.optim.name=adamw"],
    "muon": ["train.optim.name=muon"],
    "muon_no_qk_norm": ["train.optim.name=muon", "model.qk_norm=false"],
    "muon_gelu": ["train.optim.name=muon", 'model.mlp="gelu"'],
    "muon_cosine": ["train.optim.name=muon", 'train.optim.schedule="cosine"', "train.optim.min_lr_ratio=0.0"],
    # the whole WSD schedule in 400 steps: Muon's fewer steps spent as a shorter run, not an early stop
    "muon_400": ["train.optim.name=muon", "train.steps=400"],
    # about the scalelab row's 2,000-step wall time on CPU, where a Muon step costs ~1.3x an AdamW one
    "muon_1500": ["train.optim.name=muon", "train.steps=1500"],
    # the world task's full budget is the demo's 450 steps: its whole schedule in 60% of them (the target)
    "muon_270": ["train.optim.name=muon", "train.steps=270"],
    # the same at twice Muon's default peak rate: a short schedule may want a larger step
    "muon_270_lr04": ["train.optim.name=muon", "train.steps=270", "train.optim.muon_lr=0.04"],
    # the demo's recipe before 2026-12-06 (AdamW for 450 steps): on the world task, the 60% target's reference
    "adamw_450": ["train.optim.name=adamw", "train.steps=450"],
    # logit soft-capping as in modded-nanogpt and nanochat (cap 15): Muon's default recipe plus the cap
    "muon_softcap": ["train.optim.name=muon", "model.logit_softcap=15"],
}
DEFAULT_ROWS = ["classic", "scalelab", "adamw", "muon", "muon_no_qk_norm", "muon_gelu"]

# --quick: the same recipes on budgets that finish in minutes on a shared 2-core host.
QUICK = {
    "shakespeare": ["train.steps=400"],
    "world": ["train.steps=120", "train.batch_size=8", "model.block_size=128", "data.world.n_people=300"],
}


# -- the classic baseline: a plain PyTorch GPT ----------------------------------------------------------


class ClassicBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width, bias=False), nn.LayerNorm(width, bias=False)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.fc = nn.Linear(width, 4 * width, bias=False)
        self.fc_out = nn.Linear(4 * width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in self.qkv(self.ln1(x)).split(C, 2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class ClassicGPT(nn.Module):
    """GELU, LayerNorm, learned absolute positions, the lm_head tied to the token embedding."""

    def __init__(self, vocab: int, block: int, depth: int, width: int, heads: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(block, width)
        self.blocks = nn.ModuleList(ClassicBlock(width, heads) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width, bias=False)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tok.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:
                # residual outputs scaled down by depth, as GPT-2 does
                std = 0.02 / math.sqrt(2 * depth) if name.endswith(("proj.weight", "fc_out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean"):
        T = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)


CLASSIC_OPTIM = OptimConfig(lr=1e-3, warmup_steps=100, schedule="cosine", min_lr_ratio=0.1, weight_decay=0.1,
                            beta1=0.9, beta2=0.99, grad_clip=1.0)


def classic_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() != 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": optim.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=optim.lr, betas=(optim.beta1, optim.beta2))


# -- one training run ---------------------------------------------------------------------------------


@dataclass
class Task:
    name: str
    cfg: Config
    train_ids: np.ndarray
    val_ids: np.ndarray
    vocab_size: int
    target: float | None  # None: the scalelab row's mean final val loss


@dataclass
class RunResult:
    row: str
    seed: int
    evals: list[tuple[int, float, float]] = field(default_factory=list)  # (step, train seconds, val loss)
    step_ms: float = 0.0

    def reached(self, target: float) -> tuple[int, float] | None:
        return next(((s, t) for s, t, v in self.evals if v <= target), None)


def train_once(task: Task, row: str, cfg: Config, seed: int, eval_every: int, eval_batches: int) -> RunResult:
    t = cfg.train
    seed_everything(seed)
    c = cfg.model
    if row == "classic":
        r = c.resolved()
        model = ClassicGPT(task.vocab_size, c.block_size, r.depth, r.n_embd, r.n_head)
        optim = CLASSIC_OPTIM
        opt = classic_optimizer(model, optim)
    else:
        model = GPT(c)
        optim = t.optim
        opt = build_optimizer(model, optim)
    loader = TokenLoader(task.train_ids, t.batch_size, c.block_size, seed=seed)
    result, train_time = RunResult(row, seed), 0.0
    for step in range(1, t.steps + 1):
        t0 = time.perf_counter()
        set_lr(opt, lr_at(step - 1, optim, t.steps))
        x, y = loader.next_batch()
        loss = model(x, y)
        loss.backward()
        clip_grad_norm(model.parameters(), optim)
        opt.step()
        opt.zero_grad(set_to_none=True)
        train_time += time.perf_counter() - t0
        if step % eval_every == 0 or step == t.steps:
            val, _ = evaluate_loss(model, task.val_ids, 32, c.block_size, eval_batches, torch.device("cpu"), "fp32")
            model.train()
            result.evals.append((step, train_time, val))
            if not math.isfinite(val):
                break
    result.step_ms = 1000 * train_time / result.evals[-1][0]
    return result


# -- tasks ------------------------------------------------------------------------------------------


def shakespeare_task(path: Path, overrides: list[str], target: float | None) -> Task:
    if not path.is_file():
        raise ScalelabError(f"tiny Shakespeare not found at {path} (pass --data, or drop 'shakespeare' from --tasks)")
    cfg = load_config(REPO / "configs" / "shakespeare_char.toml", overrides)
    text = path.read_text(encoding="utf-8")
    split = int(0.9 * len(text))
    tok = CharTokenizer.from_text(text)
    cfg.model.vocab_size = tok.vocab_size
    return Task("shakespeare", cfg, np.array(tok.encode(text[:split]), dtype=np.uint16),
                np.array(tok.encode(text[split:]), dtype=np.uint16), tok.vocab_size,
                SHAKESPEARE_TARGET if target is None else target)


def world_task(work: Path, overrides: list[str], target: float | None) -> Task:
    cfg = load_config(REPO / "configs" / "demo.toml", overrides)
    data = prepare(cfg, work / "world")
    cfg.model.vocab_size = data.tokenizer.vocab_size
    return Task("world", cfg, data.train_tokens, data.val_tokens, data.tokenizer.vocab_size, target)


# -- report -----------------------------------------------------------------------------------------


def _mean_sd(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.0f}" + (f" ± {statistics.stdev(xs):.0f}" if len(xs) > 1 else "")


def table(task: Task, target: float, results: dict[str, list[RunResult]]) -> list[str]:
    lines = [f"**{task.name}**: target val loss {target:.3f}",
             "",
             "| row | reached | steps to target | time to target (s) | × classic time | final val loss | ms/step |",
             "|---|---|---|---|---|---|---|"]
    classic_time = [r.reached(target)[1] for r in results.get("classic", []) if r.reached(target)]
    for row, runs in results.items():
        hits = [r.reached(target) for r in runs]
        steps = [h[0] for h in hits if h]
        secs = [h[1] for h in hits if h]
        ratio = (f"{statistics.mean(secs) / statistics.mean(classic_time):.2f}"
                 if secs and len(secs) == len(runs) and classic_time and len(classic_time) == len(results["classic"])
                 else "-")
        finals = [r.evals[-1][2] for r in runs]
        lines.append(f"| {row} | {len(steps)}/{len(runs)} | {_mean_sd(steps)} | {_mean_sd(secs)} | {ratio} | "
                     f"{statistics.mean(finals):.3f} | {statistics.mean(r.step_ms for r in runs):.1f} |")
    return lines


def plot(all_results: dict[str, tuple[float, dict[str, list[RunResult]]]], out: Path) -> Path:
    fig, axes = plt.subplots(1, len(all_results), figsize=(6 * len(all_results), 4), squeeze=False)
    for ax, (task, (target, results)) in zip(axes[0], all_results.items()):
        for row, runs in results.items():
            n = min(len(r.evals) for r in runs)
            secs = [statistics.mean(r.evals[i][1] for r in runs) for i in range(n)]
            vals = [statistics.mean(r.evals[i][2] for r in runs) for i in range(n)]
            ax.plot(secs, vals, label=row)
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.3f}")
        lo = min(target, *(r.evals[-1][2] for runs in results.values() for r in runs))
        ax.set_ylim(lo - 0.1, lo + 1.2)
        ax.set_title(f"{task}: val loss (mean of seeds) vs training time")
        ax.set_xlabel("training seconds (evaluations excluded)")
        ax.set_ylabel("val loss (nats/token)")
        ax.legend(fontsize=7)
    return save_figure(fig, out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short budgets (see QUICK) for a shared or slow host")
    ap.add_argument("--tasks", default="shakespeare,world")
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"classic, scalelab and any of {', '.join(ROWS)}")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--target", type=float, action="append", default=[],
                    help="target val loss per task, in --tasks order (default: see the module doc)")
    ap.add_argument("--target-row", default=None,
                    help="a task without --target aims at this row's mean final val loss (default: scalelab, "
                         "else the first row)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="applied to every task and row")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--results", default=str(REPO / "bench" / "results" / "recipe_ablation.md"))
    ap.add_argument("--note", default="", help="a line for the results file (e.g. that the host was shared)")
    args = ap.parse_args()
    tasks, rows = args.tasks.split(","), args.rows.split(",")
    for name in rows:
        if name not in ("classic", "scalelab", *ROWS):
            raise ScalelabError(f"unknown row {name!r}; rows: classic, scalelab, {', '.join(ROWS)}")
    target_row = args.target_row or ("scalelab" if "scalelab" in rows else rows[0])
    if target_row not in rows:
        raise ScalelabError(f"--target-row {args.target_row!r} is not among --rows ({', '.join(rows)})")
    targets = dict(zip(tasks, args.target))

    all_results: dict[str, tuple[float, dict[str, list[RunResult]]]] = {}
    tables: list[str] = []
    lines = [f"mode: {'quick' if args.quick else 'full'}; seeds {args.seeds}; rows {', '.join(rows)}; "
             f"val loss every {args.eval_every} steps on {args.eval_batches} windows of 32 sequences"]
    if args.note:
        lines.append(args.note)
    with tempfile.TemporaryDirectory() as work:
        for name in tasks:
            overrides = (QUICK[name] if args.quick else []) + args.overrides
            if name == "shakespeare":
                task = shakespeare_task(Path(args.data), overrides, targets.get(name))
            elif name == "world":
                task = world_task(Path(work), overrides, targets.get(name))
            else:
                raise ScalelabError(f"unknown task {name!r}; tasks: shakespeare, world")
            cfgs = {row: task.cfg if row in ("classic", "scalelab") else load_config(
                REPO / "configs" / ("shakespeare_char.toml" if name == "shakespeare" else "demo.toml"),
                overrides + ROWS[row]) for row in rows}
            for cfg in cfgs.values():
                cfg.model.vocab_size = task.vocab_size
            results: dict[str, list[RunResult]] = {row: [] for row in rows}
            for seed in range(args.seeds):
                for row in rows:
                    r = train_once(task, row, cfgs[row], 1337 + seed, args.eval_every, args.eval_batches)
                    results[row].append(r)
                    print(f"{name} {row} seed {seed}: final val {r.evals[-1][2]:.4f}, {r.step_ms:.1f} ms/step", flush=True)
            target = task.target
            if target is None:
                target = statistics.mean(r.evals[-1][2] for r in results[target_row])
            all_results[name] = (target, results)
            t, m = task.cfg.train, task.cfg.model.resolved()
            lines.append(f"{name}: {t.steps} steps of {t.batch_size} x {m.block_size} tokens; scalelab model "
                         f"{m.depth} layers, width {m.n_embd}, {m.n_head} heads, vocab {m.vocab_size}; "
                         f"scalelab optim {t.optim.name} lr {t.optim.lr} {t.optim.schedule}")
            tables += table(task, target, results) + [""]
            print("\n".join(table(task, target, results)), flush=True)
            if "classic" in results and "scalelab" in results:
                ratio = statistics.mean(r.step_ms for r in results["scalelab"]) / statistics.mean(
                    r.step_ms for r in results["classic"])
                lines.append(f"{name}: scalelab ms/step ÷ classic plain-PyTorch ms/step = {ratio:.2f} (same process)")
    png = plot(all_results, Path(args.results).with_suffix(".png"))
    lines.append(f"plot: {png.name}")
    print("\n".join(lines))
    append_results(args.results, lines)
    with open(args.results, "a", encoding="utf-8") as f:
        f.write("\n" + "\n".join(tables))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ScalelabError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
