"""Adaptation: what a small pretrained GPT's features are good for, and how to tune it for a task.

One pretrained base (cached, experiments/base_run.py) on the synthetic world, then:

1. embeddings: zero-shot classification by cosine similarity to label descriptions vs a linear probe
   (torch logistic regression) on the same frozen features, mean vs last-token pooling, on two
   tasks: which attribute a bio sentence states (6 classes, the base's own kind of text) and
   review sentiment with negation (2 classes, words the base never read);
2. task heads on the backbone: sequence classification (sentiment), token classification (name
   tokens in short bios), extractive span QA (the answer span in a bio) and generation (the LM head
   on "bio + question -> answer"), each trained in ``heads_mode``;
3. fine-tuning modes on one task (``finetune_task``): full, last-k blocks, frozen backbone + head,
   LoRA (peft); accuracy, trainable parameters and wall time.

Every example is about people split by person: test examples are about people training never showed.
Every head and mode trains with the config's [sft] batch size and [sft.optim] (warmup, schedule,
weight decay, clip), each mode at its own rate (``lr_<mode>``, part of the comparison's design).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from scalelab.adapt import data
from scalelab.adapt.embed import POOLS, LinearProbe, accuracy, cosine_classify, embed_texts
from scalelab.adapt.finetune import LORA_TARGETS, MODES, base_weights_unchanged, evaluate_head, set_mode, train_head
from scalelab.adapt.heads import HEADS
from scalelab.config import OptimConfig
from scalelab.data.world import ATTRIBUTES
from scalelab.errors import ScalelabError, check_config
from scalelab.evals.plots import plt, save_figure
from scalelab.experiments.base_run import ensure_base, open_study_folder
from scalelab.experiments.study import Study
from scalelab.posttrain import common
from scalelab.run import Run
from scalelab.runtime import resolve_device, seed_everything

TASKS = ("attribute", "sentiment")


@dataclass
class AdaptationConfig:
    out_dir: str = "runs/adaptation"
    base_run: str = ""  # a finished pretraining run on the world; empty: pretrain (or reuse) <out_dir>/base
    test_fraction: float = 0.3  # share of people whose examples are held out
    n_train: int = 2000  # examples per task for training (probe, heads, fine-tuning)
    n_test: int = 300
    negation: float = 0.3  # share of negated review sentences
    pools: list[str] = field(default_factory=lambda: ["mean", "last"])
    probe_l2: float = 1e-3
    n_sentences: int = 3  # sentences per short bio (token tagging, span QA, reading QA)
    heads_mode: str = "full"
    heads_steps: int = 300
    finetune_task: str = "sentiment"
    finetune_steps: int = 300
    modes: list[str] = field(default_factory=lambda: ["full", "last_k", "frozen", "lora"])
    last_k: int = 1
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    # Learning rates per mode: fewer trainable weights tolerate (and need) larger steps. Each replaces the rate
    # of [sft.optim], whose other keys (warmup, schedule, decay, clip) every mode shares.
    lr_full: float = 3e-4
    lr_last_k: float = 1e-3
    lr_frozen: float = 3e-3
    lr_lora: float = 2e-3


def validate(a: AdaptationConfig) -> None:
    checks = [
        (0 < a.test_fraction < 1, "adaptation.test_fraction must lie in (0, 1)"),
        (a.n_train >= 2 and a.n_test >= 1, "adaptation.n_train must be at least 2 and n_test at least 1"),
        (0 <= a.negation <= 1, "adaptation.negation must lie in [0, 1]"),
        (bool(a.pools) and all(p in POOLS for p in a.pools), f"adaptation.pools must be a non-empty list of {', '.join(POOLS)}"),
        (a.probe_l2 >= 0, "adaptation.probe_l2 must be >= 0"),
        (a.n_sentences >= 1, "adaptation.n_sentences must be at least 1"),
        (a.heads_mode in MODES, f"adaptation.heads_mode must be one of {', '.join(MODES)}"),
        (a.finetune_task in TASKS, f"adaptation.finetune_task must be one of {', '.join(TASKS)}"),
        (bool(a.modes) and all(m in MODES for m in a.modes), f"adaptation.modes must be a non-empty list of {', '.join(MODES)}"),
        (a.heads_steps >= 1 and a.finetune_steps >= 1, "adaptation.heads_steps and finetune_steps must be at least 1"),
        (a.last_k >= 1 and a.lora_rank >= 1 and a.lora_alpha > 0, "adaptation.last_k, lora_rank and lora_alpha must be positive"),
        (bool(a.lora_targets) and all(t in LORA_TARGETS for t in a.lora_targets),
         f"adaptation.lora_targets must be a non-empty list of {', '.join(LORA_TARGETS)}"),
        (min(a.lr_full, a.lr_last_k, a.lr_frozen, a.lr_lora) > 0, "adaptation.lr_* must be positive"),
    ]
    check_config(checks)


# The stage setting this study once copied into [adaptation] (read, with a FutureWarning, for one release).
MOVED_KEYS = {"batch_size": "sft.batch_size"}


def mode_optim(cfg, a: AdaptationConfig, mode: str) -> OptimConfig:
    """[sft.optim] at the mode's own rate."""
    return replace(cfg.sft.optim, lr=getattr(a, f"lr_{mode}"))


def _examples(world, task: str, people: list[int], n: int, seed: int, a: AdaptationConfig):
    if task == "attribute":
        return data.attribute_examples(world, people, n, seed)
    return data.sentiment_examples(world, people, n, seed, a.negation)


def _label_texts(task: str) -> list[str]:
    if task == "attribute":
        return [data.ATTRIBUTE_DESCRIPTIONS[k] for k in ATTRIBUTES]
    return [data.SENTIMENT_DESCRIPTIONS[k] for k in data.SENTIMENT_LABELS]


# -- the three parts --------------------------------------------------------------------------------------------


def embedding_study(model, tok, world, split, a: AdaptationConfig, seed: int) -> dict:
    """Zero-shot cosine and linear-probe accuracy per task and pooling, on frozen final-layer features."""
    out = {}
    for task in TASKS:
        xs_train, y_train = _examples(world, task, split[0], a.n_train, seed, a)
        xs_test, y_test = _examples(world, task, split[1], a.n_test, seed + 1, a)
        labels = _label_texts(task)
        counts = torch.bincount(torch.tensor(y_test), minlength=len(labels)).float()
        row = {"n_classes": len(labels), "majority": float(counts.max() / counts.sum()), "pools": {}}
        for pool in a.pools:
            t = time.perf_counter()
            f_train = embed_texts(model, tok, xs_train, pool=pool)
            f_test = embed_texts(model, tok, xs_test, pool=pool)
            f_labels = embed_texts(model, tok, labels, pool=pool)
            probe = LinearProbe(l2=a.probe_l2).fit(f_train, torch.tensor(y_train), len(labels))
            row["pools"][pool] = {
                "zero_shot": accuracy(cosine_classify(f_test, f_labels), y_test),
                "probe": accuracy(probe.predict(f_test), y_test),
                "probe_train": accuracy(probe.predict(f_train), y_train),
                "seconds": time.perf_counter() - t,
            }
        row["example"] = {"text": xs_test[0], "label": labels[y_test[0]]}
        out[task] = row
    return out


def _head_data(kind: str, tok, world, split, a: AdaptationConfig, seed: int, block: int):
    """(train rows, test rows) for one head, in the row format its ``collate`` reads."""
    if kind == "sequence":
        def rows(people, n, s):
            texts, labels = _examples(world, a.finetune_task, people, n, s, a)
            return [(([tok.bos_id] + tok.encode(t))[:block], y) for t, y in zip(texts, labels)]
    elif kind == "token":
        def rows(people, n, s):
            return data.tagging_rows(tok, data.name_tag_examples(world, people, n, s, a.n_sentences), block)
    elif kind == "span":
        def rows(people, n, s):
            return data.span_rows(tok, data.qa_examples(world, people, n, s, a.n_sentences), block)
    else:
        def rows(people, n, s):
            out = []
            for it in data.qa_examples(world, people, n, s, a.n_sentences):
                p = [tok.bos_id] + tok.encode(data.reading_prompt(it))
                y = tok.encode(" " + it["answer"] + "\n")
                if len(p) + len(y) <= block:
                    out.append((p, y))
            return out
    train, test = rows(split[0], a.n_train, seed), rows(split[1], a.n_test, seed + 1)
    if not train or not test:
        raise ScalelabError(f"the {kind} head has no examples that fit the model's context of {block} tokens")
    return train, test


def tune(base, kind: str, mode: str, train_rows, test_rows, a: AdaptationConfig, cfg, steps: int, seed: int) -> dict:
    """A fresh copy of ``base`` under a ``kind`` head, tuned in ``mode`` with [sft]; test metrics before and after."""
    torch.manual_seed(seed)
    backbone = copy.deepcopy(base)
    head = HEADS[kind](backbone, 2) if kind in ("sequence", "token") else HEADS[kind](backbone)
    info = set_mode(head, mode, last_k=a.last_k, lora_rank=a.lora_rank, lora_alpha=a.lora_alpha,
                    lora_targets=a.lora_targets)
    before = evaluate_head(head, test_rows)
    optim = mode_optim(cfg, a, mode)
    run = train_head(head, train_rows, steps, optim, batch_size=cfg.sft.batch_size, seed=seed)
    after = evaluate_head(head, test_rows)
    info.pop("adapted", None)
    if mode == "lora":
        info["base_weights_unchanged"] = base_weights_unchanged(backbone, base)
    return info | {"test": after, "test_before": before, "train_seconds": run["seconds"], "loss_first": run["losses"][0],
                   "loss_last": sum(run["losses"][-10:]) / len(run["losses"][-10:]), "n_train": len(train_rows),
                   "n_test": len(test_rows), "lr": optim.lr, "steps": steps,
                   "backbone_params": base.num_params()}


HEAD_METRIC = {"sequence": "accuracy", "token": "name_f1", "span": "exact_match", "generation": "exact_match"}


def run_adaptation(cfg, a: AdaptationConfig, overwrite: bool = False, log=print) -> dict:
    validate(a)
    out = open_study_folder(a.out_dir, overwrite)
    seed = cfg.run.seed
    seed_everything(seed)
    t0 = time.perf_counter()
    base_dir = ensure_base(cfg, out / "base", a.base_run)
    timings = {"pretrain_or_cache": time.perf_counter() - t0}
    init = Run.open(base_dir)
    init_model = init.load_model(resolve_device(cfg.run.device))
    if init.world is None:
        raise ScalelabError(f"{base_dir} was not trained on the synthetic world (data.source = 'world')")
    world, base, tok = init.world, init_model.eval(), init.tokenizer
    for p in base.parameters():
        p.requires_grad_(False)
    split = data.split_people(world, a.test_fraction, seed)
    block = base.config.block_size

    t = time.perf_counter()
    embeddings = embedding_study(base, tok, world, split, a, seed)
    timings["embeddings"] = time.perf_counter() - t
    for task, row in embeddings.items():
        log(f"[embeddings] {task}: " + " | ".join(
            f"{pool}: zero-shot {r['zero_shot']:.3f} probe {r['probe']:.3f}" for pool, r in row["pools"].items())
            + f" (majority {row['majority']:.3f})")

    heads = {}
    for kind in ("sequence", "token", "span", "generation"):
        t = time.perf_counter()
        train_rows, test_rows = _head_data(kind, tok, world, split, a, seed, block)
        heads[kind] = tune(base, kind, a.heads_mode, train_rows, test_rows, a, cfg, a.heads_steps, seed)
        timings[f"head_{kind}"] = time.perf_counter() - t
        m = HEAD_METRIC[kind]
        log(f"[head] {kind} ({a.heads_mode}): {m} {heads[kind]['test_before'][m]:.3f} -> {heads[kind]['test'][m]:.3f} "
            f"({heads[kind]['train_seconds']:.0f}s)")

    modes = {}
    train_rows, test_rows = _head_data("sequence", tok, world, split, a, seed, block)
    for mode in a.modes:
        t = time.perf_counter()
        if mode == a.heads_mode and a.finetune_steps == a.heads_steps:
            modes[mode] = heads["sequence"]  # the same task, data, seed and steps: the run above, not a rerun
        else:
            modes[mode] = tune(base, "sequence", mode, train_rows, test_rows, a, cfg, a.finetune_steps, seed)
        timings[f"mode_{mode}"] = time.perf_counter() - t
        r = modes[mode]
        log(f"[finetune] {mode}: accuracy {r['test']['accuracy']:.3f}, trainable {r['trainable_params']:,}, "
            f"{r['train_seconds']:.1f}s")
    timings["total"] = time.perf_counter() - t0
    result = {"adaptation": asdict(a), "sft": {"batch_size": cfg.sft.batch_size, "optim": asdict(cfg.sft.optim)},
              "world": asdict(world.cfg), "base_run": str(base_dir),
              "base_params": base.num_params(), "model": asdict(base.config),
              "people": {"train": len(split[0]), "test": len(split[1])},
              "embeddings": embeddings, "heads": heads, "modes": modes, "timings_seconds": timings}
    common.write_json(out / "results.json", result)
    plot_embeddings(result, out / "embeddings.png")
    plot_modes(result, out / "finetune.png")
    (out / "summary.md").write_text(summary_markdown(result))
    return result


# -- reporting --------------------------------------------------------------------------------------------------


def summary_markdown(result: dict) -> str:
    a = result["adaptation"]
    lines = [
        "# Adaptation study",
        "",
        f"Base: {result['base_params']:,} parameters (depth {result['model']['depth']}, width {result['model']['n_embd']}), "
        f"pretrained on the synthetic world ({result['world']['n_people']} people). Examples are about "
        f"{result['people']['train']} training and {result['people']['test']} held-out people "
        f"({a['n_train']} training and {a['n_test']} test examples per task).",
        "",
        "## 1. Frozen features: zero-shot cosine vs linear probe",
        "",
        "| task | classes | majority | pooling | zero-shot (cosine) | linear probe (test) | probe (train) |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, row in result["embeddings"].items():
        for pool, r in row["pools"].items():
            lines.append(f"| {task} | {row['n_classes']} | {row['majority']:.3f} | {pool} | {r['zero_shot']:.3f} | "
                         f"{r['probe']:.3f} | {r['probe_train']:.3f} |")
    lines += ["", f"## 2. Task heads ({a['heads_mode']} fine-tuning, {a['heads_steps']} steps)", "",
              "| head | task | metric | before | after | other metrics | trainable params | train s |", "|---|---|---|---|---|---|---|---|"]
    tasks = {"sequence": f"{a['finetune_task']} classification", "token": "name tokens in bios",
             "span": "answer span in a bio", "generation": "bio + question -> answer"}
    for kind, r in result["heads"].items():
        m = HEAD_METRIC[kind]
        other = ", ".join(f"{k} {v:.3f}" for k, v in r["test"].items() if k not in (m, "n", "loss"))
        lines.append(f"| {kind} | {tasks[kind]} | {m} | {r['test_before'][m]:.3f} | {r['test'][m]:.3f} | {other} | "
                     f"{r['trainable_params']:,} | {r['train_seconds']:.1f} |")
    lines += ["", f"## 3. Fine-tuning modes ({a['finetune_task']}, {a['finetune_steps']} steps each)", "",
              "| mode | test accuracy | trainable params | share of base | learning rate | train s |", "|---|---|---|---|---|---|"]
    for mode, r in result["modes"].items():
        name = {"last_k": f"last {r.get('last_k', a['last_k'])} block(s)", "lora": f"LoRA r={r.get('rank')}",
                "frozen": "frozen + head", "full": "full"}[mode]
        lines.append(f"| {name} | {r['test']['accuracy']:.3f} | {r['trainable_params']:,} | "
                     f"{r['trainable_params'] / result['base_params']:.2%} | {r['lr']:g} | {r['train_seconds']:.1f} |")
    t = result["timings_seconds"]
    lines += ["", "Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in t.items()), ""]
    return "\n".join(lines)


def plot_embeddings(result: dict, path: Path) -> None:
    emb = result["embeddings"]
    groups = [(task, pool) for task, row in emb.items() for pool in row["pools"]]
    fig, ax = plt.subplots(figsize=(7.5, 4))
    x = range(len(groups))
    w = 0.38
    ax.bar([i - w / 2 for i in x], [emb[t]["pools"][p]["zero_shot"] for t, p in groups], w, label="zero-shot (cosine to label text)")
    ax.bar([i + w / 2 for i in x], [emb[t]["pools"][p]["probe"] for t, p in groups], w, label="linear probe")
    for i, (t, _) in enumerate(groups):
        ax.hlines(emb[t]["majority"], i - 0.45, i + 0.45, colors="k", linestyles=":", label="majority class" if i == 0 else None)
    ax.set_xticks(list(x), [f"{t}\n{p} pooling" for t, p in groups], fontsize=8)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    save_figure(fig, path, "frozen features of the pretrained base")


def plot_modes(result: dict, path: Path) -> None:
    modes = result["modes"]
    names = list(modes)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    colors = [f"C{i}" for i in range(len(names))]
    panels = ((lambda r: r["test"]["accuracy"], "test accuracy", False),
              (lambda r: r["trainable_params"], "trainable parameters", True),
              (lambda r: r["train_seconds"], "training wall time (s)", False))
    for ax, (value, label, log_scale) in zip(axes, panels):
        bars = ax.bar(names, [value(modes[n]) for n in names], color=colors)
        ax.set_xlabel("fine-tuning mode")
        ax.set_ylabel(label)
        if log_scale:
            ax.set_yscale("log")
        for b, n in zip(bars, names):
            b.set_label(n)
    axes[0].set_ylim(0, 1.05)
    axes[0].axhline(result["embeddings"][result["adaptation"]["finetune_task"]]["majority"], color="k", ls=":",
                    label="majority class")
    axes[0].legend(fontsize=7)
    save_figure(fig, path, f"fine-tuning modes on {result['adaptation']['finetune_task']}")


STUDY = Study("adaptation", AdaptationConfig, run_adaptation, summary_markdown,
              ("summary.md", "results.json", "embeddings.png", "finetune.png"), MOVED_KEYS)
