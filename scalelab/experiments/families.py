"""Why decoder-only? Decoder, prefix-LM and masked-LM encoder at equal training FLOPs on the same data.

One token stream (the synthetic world, its QA mixed in), one tokenizer, one backbone size. Each
family trains for as many steps as its own FLOPs per token allow within one shared budget
(scalelab.model.families.training_flops_per_token), seeing the same windows in the same order.
The MLM pays full attention but runs its head on 15% of positions, and only those carry a loss:
it gets more tokens per FLOP and far less signal per token, which is part of what is measured.

Metrics, each on held-out material:

- QA exact match (greedy, "Question: ...\\nAnswer:" prompt, cut at the newline) on people whose QA
  was mixed into pretraining and on people whose QA never was. The MLM generates by filling one
  trailing [MASK] at a time, left to right.
- Continuation bits per byte: the second half of each validation window given the first. Decoder
  and prefix-LM (first half as its prefix) see exactly the same information, so their numbers
  compare directly. The MLM's comparable number fills a trailing [MASK] after each true prefix;
  its pseudo-log-likelihood (one position masked, both sides visible) is reported separately and
  is NOT comparable: it reads the future.
- Linear probes: frozen mean-pooled final hidden states, a logistic regression (torch) predicting the
  person's field-of-study group from a fresh sentence stating the major, and from a whole fresh
  biography (six sentences, only one about the major); train and test people are disjoint. Each
  model is saved (model_<family>.safetensors) so other probes can be run later.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from scalelab.data.loader import TokenLoader, eval_batches
from scalelab.data.world import _PRONOUNS, SENTENCE_TEMPLATES, World, render_qa
from scalelab.errors import ScalelabError, check_config
from scalelab.evals.plots import plt, save_figure
from scalelab.evals.tasks import normalize_answer
from scalelab.experiments.base_run import open_study_folder
from scalelab.experiments.study import Study
from scalelab.model import families as fam
from scalelab.pipeline import prepare
from scalelab.runtime import seed_everything
from scalelab.train.optim import build_optimizer, lr_at, optimizer_step, set_lr
from scalelab.train.trainer import write_json

# The world's 25 majors in four groups: the probe's classes (roughly balanced: 10 / 4 / 6 / 5).
MAJOR_GROUPS = {
    "science": ("mathematics", "physics", "chemistry", "biology", "astronomy", "geology", "statistics",
                "marine biology", "materials science", "computer science"),
    "engineering": ("mechanical engineering", "electrical engineering", "civil engineering", "architecture"),
    "humanities": ("history", "philosophy", "linguistics", "music", "literature", "art history"),
    "social science": ("economics", "psychology", "sociology", "anthropology", "political science"),
}
PROBE_TASKS = ("sentence", "bio")
METRICS = ("qa_seen_em", "qa_heldout_em", "continuation_bpb", "probe_sentence_accuracy", "probe_bio_accuracy")


@dataclass
class FamiliesConfig:
    out_dir: str = "runs/families"
    families: list[str] = field(default_factory=lambda: list(fam.FAMILIES))
    # Training FLOPs every family gets; 0: what the decoder-only family spends in train.steps steps
    # of train.batch_size × model.block_size tokens.
    flops_budget: float = 0.0
    mask_rate: float = 0.15
    qa_examples: int = 120  # per QA set (seen / held-out people); 0: all
    max_new_tokens: int = 16
    mlm_fill_masks: int = 1  # [MASK] tokens after the text when the MLM predicts the next token
    bpb_windows: int = 16  # validation windows scored for continuation bits per byte
    bpb_prefix_fraction: float = 0.5  # the share of each window given as context
    probe_bios_per_person: int = 2
    probe_train_fraction: float = 0.7  # of the people; the rest are the probe's test set
    probe_steps: int = 300
    probe_weight_decay: float = 1e-2
    val_batches: int = 8  # batches for each family's own objective on the validation split


def validate(a: FamiliesConfig) -> None:
    for f in a.families:
        fam.check_family(f)
    checks = [
        (len(a.families) >= 1 and len(set(a.families)) == len(a.families), "families.families needs distinct families"),
        (a.flops_budget >= 0, "families.flops_budget must be >= 0 (0: the decoder's train.steps)"),
        (0 < a.mask_rate < 1, "families.mask_rate must lie in (0, 1)"),
        (a.qa_examples >= 0 and a.max_new_tokens >= 1 and a.mlm_fill_masks >= 1,
         "families.qa_examples >= 0, max_new_tokens >= 1 and mlm_fill_masks >= 1"),
        (a.bpb_windows >= 1 and 0 < a.bpb_prefix_fraction < 1,
         "families.bpb_windows >= 1 and bpb_prefix_fraction in (0, 1)"),
        (a.probe_bios_per_person >= 1 and 0 < a.probe_train_fraction < 1 and a.probe_steps >= 1
         and a.probe_weight_decay >= 0, "families.probe_* must be positive, probe_train_fraction in (0, 1)"),
        (a.val_batches >= 1, "families.val_batches must be >= 1"),
    ]
    check_config(checks)


# -- training ---------------------------------------------------------------------------------------------------


class _Objective:
    """One family's training loss on an (x, y) window batch, with its own seeded corruption stream."""

    def __init__(self, family: str, tokenizer, mask_rate: float, seed: int):
        self.family, self.mask_rate = family, mask_rate
        self.gen = torch.Generator().manual_seed(seed)
        self.mask_id = tokenizer.vocab_size
        self.random_ids = fam.ordinary_ids(tokenizer.vocab_size, tokenizer.special_ids.values())
        self.protected = torch.tensor(sorted(tokenizer.special_ids.values()))

    def loss(self, model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.family == "decoder":
            return model(x, y)
        if self.family == "prefix_lm":
            return fam.prefix_lm_loss(model, x, y, fam.sample_prefix_lens(x.shape[0], x.shape[1], self.gen))
        inputs, targets = fam.mlm_corrupt(x, self.mask_id, self.random_ids, self.gen, self.mask_rate, self.protected)
        return fam.mlm_loss(model, inputs, targets)


def train_family(family: str, cfg, a: FamiliesConfig, tokenizer, train_tokens, val_tokens, budget: float,
                 log_path: Path) -> tuple[object, dict]:
    """A fresh model trained on ``budget`` FLOPs of the shared token stream; returns (model, record)."""
    seed = cfg.run.seed
    seed_everything(seed)  # same initial weights for the shared backbone across families
    model = fam.build_model(family, cfg.model, tokenizer.vocab_size)
    B, T = cfg.train.batch_size, model.config.block_size
    fpt = fam.training_flops_per_token(model, family, T, a.mask_rate)
    steps = max(1, int(budget // (B * T * fpt)))
    optim = replace(cfg.train.optim, warmup_steps=min(cfg.train.optim.warmup_steps, max(0, steps - 1)))
    opt = build_optimizer(model, optim)
    loader = TokenLoader(train_tokens, B, T, seed=seed)
    objective = _Objective(family, tokenizer, a.mask_rate, seed)
    model.train()
    t0, losses = time.perf_counter(), []
    with open(log_path, "w", encoding="utf-8") as log:
        for step in range(steps):
            set_lr(opt, lr_at(step, optim, steps))
            x, y = loader.next_batch()
            loss = objective.loss(model, x, y)
            optimizer_step(loss, opt, model.parameters(), optim)
            losses.append(float(loss.detach()))
            if step % max(1, cfg.train.log_every) == 0 or step == steps - 1:
                log.write(json.dumps({"family": family, "step": step, "loss": losses[-1],
                                      "lr": lr_at(step, optim, steps)}) + "\n")
    wall = time.perf_counter() - t0
    model.eval()
    val_objective = _Objective(family, tokenizer, a.mask_rate, seed + 1)
    with torch.no_grad():
        vals = [float(val_objective.loss(model, x, y)) for x, y in eval_batches(val_tokens, B, T, a.val_batches)]
    if not vals:
        raise ScalelabError(f"validation split has too few tokens for one block of {T + 1}")
    tokens = steps * B * T
    record = {
        "params": model.num_params(), "params_non_embedding": model.num_params(False),
        "vocab_size": model.config.vocab_size, "flops_per_token": fpt, "steps": steps, "tokens_seen": tokens,
        "loss_tokens_expected": tokens * fam.loss_fraction(family, T, a.mask_rate), "train_flops": tokens * fpt,
        "train_loss_last": float(np.mean(losses[-max(1, min(20, steps // 10)):])),
        "val_objective_loss": float(np.mean(vals)), "train_seconds": wall,
    }
    return model, record


# -- generation: QA ---------------------------------------------------------------------------------------------


def qa_sets(world, n: int, seed: int) -> dict[str, list]:
    """QA about people whose QA was in pretraining ("seen") and about people whose QA never was."""
    seen = world.qa_pairs(world.qa_train_people)
    random.Random(f"families-qa-{seed}").shuffle(seen)
    held = world.eval_qa()
    return {"seen": seen[:n] if n else seen, "heldout": held[:n] if n else held}


def qa_exact_match(model, family: str, tokenizer, pairs, max_new_tokens: int, fill_masks: int) -> tuple[float, list]:
    if not pairs:
        return float("nan"), []
    mask_id = tokenizer.vocab_size if family == "mlm" else None
    hits, examples = 0, []
    for p in pairs:
        prompt = [tokenizer.bos_id] + tokenizer.encode(render_qa(p.question))
        out = fam.greedy_generate(model, family, prompt, max_new_tokens, stop=lambda ids: "\n" in tokenizer.decode(ids),
                                  mask_id=mask_id, fill_masks=fill_masks)
        reply = normalize_answer(tokenizer.decode(out))
        ok = reply == normalize_answer(p.answer)
        hits += ok
        if len(examples) < 5:
            examples.append({"question": p.question, "answer": p.answer, "reply": reply, "correct": bool(ok)})
    return hits / len(pairs), examples


# -- continuation bits per byte ---------------------------------------------------------------------------------


def bpb_windows(val_tokens, n: int, T: int) -> torch.Tensor:
    starts = np.arange(min(n, len(val_tokens) // T)) * T
    if not len(starts):
        raise ScalelabError(f"validation split has fewer tokens than one window of {T}")
    return torch.from_numpy(np.stack([np.asarray(val_tokens[s:s + T], dtype=np.int64) for s in starts]))


@torch.no_grad()
def continuation_nats(model, family: str, windows: torch.Tensor, P: int, n_vocab: int, mode: str = "causal",
                      fill_masks: int = 1) -> torch.Tensor:
    """Nats of tokens P..T-1 of each window given what the family may see; (n_windows, T-P).

    ``mode`` for the MLM: "fill" (tokens < s, then [MASK] at s: comparable) or "pll" (only s masked:
    the future is visible, not comparable). Log-probabilities are normalised over the tokenizer's
    ``n_vocab`` ids, so the MLM's own [MASK] id takes no probability mass.
    """
    model.eval()
    W, T = windows.shape
    rows = []
    if family in ("decoder", "prefix_lm"):
        if family == "decoder":
            h = model.hidden_states(windows)
        else:
            h = fam.hidden_with_mask(model, windows, fam.prefix_lm_mask(torch.full((W,), P), T))
        logp = torch.log_softmax(model.logits(h[:, P - 1:T - 1]).float()[..., :n_vocab], dim=-1)
        return -logp.gather(-1, windows[:, P:, None])[..., 0]
    mask_id = n_vocab
    targets = torch.arange(P, T)
    for w in windows:
        if mode == "pll":
            ids = w.repeat(len(targets), 1)
            ids[torch.arange(len(targets)), targets] = mask_id
            h = fam.hidden_with_mask(model, ids, None)
        elif mode == "fill":
            ids = torch.full((len(targets), T), mask_id, dtype=torch.long)
            lengths = torch.clamp(targets + fill_masks, max=T)
            for r, s in enumerate(targets.tolist()):
                ids[r, :s] = w[:s]
            h = fam.hidden_with_mask(model, ids, fam.padded_bidirectional_mask(lengths, T))
        else:
            raise ScalelabError(f"unknown MLM scoring mode '{mode}' (modes: fill, pll)")
        logp = torch.log_softmax(model.logits(h[torch.arange(len(targets)), targets]).float()[:, :n_vocab], dim=-1)
        rows.append(-logp.gather(-1, w[targets][:, None])[:, 0])
    return torch.stack(rows)


def bits_per_byte(nats: torch.Tensor, windows: torch.Tensor, P: int, token_bytes: np.ndarray) -> float:
    n_bytes = int(token_bytes[windows[:, P:].numpy()].sum())
    if n_bytes == 0:
        raise ScalelabError("the scored validation tokens hold no bytes")
    return float(nats.double().sum()) / math.log(2) / n_bytes


# -- classification: linear probe -------------------------------------------------------------------------------


def major_group(major: str) -> int:
    for k, (_, majors) in enumerate(MAJOR_GROUPS.items()):
        if major in majors:
            return k
    raise ScalelabError(f"major '{major}' has no probe group; add it to MAJOR_GROUPS")


def major_sentence(person, rng: random.Random) -> str:
    """One freshly drawn sentence stating the person's major, worded like the biographies' sentences."""
    pron, poss = _PRONOUNS[person.pronoun]
    s = rng.choice(SENTENCE_TEMPLATES["major"]).format(name=person.name, full=person.name, value=person.major,
                                                         pron=pron, poss=poss, Poss=f"{person.name}'s")
    return s[0].upper() + s[1:]


def probe_data(world, tokenizer, a: FamiliesConfig, T: int, seed: int) -> dict:
    """Two probe tasks labelled by the person's major group, split by person into train / test:
    ``sentence`` (one sentence stating the major) and ``bio`` (a fresh whole biography, where that
    sentence is one of six and mean pooling dilutes it)."""
    people = [p for p in world.people if p.known]
    if len(people) < 4:
        raise ScalelabError(f"the world has {len(people)} known people; the probe needs at least 4")
    order = list(range(len(people)))
    random.Random(f"families-probe-split-{seed}").shuffle(order)
    n_train = min(len(people) - 1, max(1, round(a.probe_train_fraction * len(people))))
    rng = random.Random(f"families-probe-text-{seed}")
    out = {task: {"train": ([], []), "test": ([], [])} for task in PROBE_TASKS}
    for rank, i in enumerate(order):
        p = people[i]
        split = "train" if rank < n_train else "test"
        for _ in range(a.probe_bios_per_person):
            for task, text in (("sentence", major_sentence(p, rng)), ("bio", world.biography(p, rng))):
                out[task][split][0].append(([tokenizer.bos_id] + tokenizer.encode(text))[:T])
                out[task][split][1].append(major_group(p.major))
    return out


@torch.no_grad()
def pooled_features(model, family: str, sequences: list[list[int]]) -> torch.Tensor:
    """Mean over positions of each family's own final hidden states (prefix-LM: all of it is prefix)."""
    model.eval()
    return torch.stack([fam.family_hidden(model, family, torch.tensor([s]))[0].mean(0) for s in sequences])


def linear_probe(train_x, train_y, test_x, test_y, n_classes: int, steps: int, weight_decay: float, seed: int) -> dict:
    """Multinomial logistic regression on standardised features, full-batch L-BFGS (written here: a few lines
    of torch instead of a scikit-learn dependency)."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xtr, xte = (train_x - mean) / std, (test_x - mean) / std
    ytr, yte = torch.tensor(train_y), torch.tensor(test_y)
    g = torch.Generator().manual_seed(seed)
    W = (0.01 * torch.randn(xtr.shape[1], n_classes, generator=g)).requires_grad_()
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xtr @ W + b, ytr) + weight_decay * W.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        acc = lambda x, y: float(((x @ W + b).argmax(1) == y).float().mean())  # noqa: E731
        majority = float((yte == torch.bincount(ytr, minlength=n_classes).argmax()).float().mean())
        return {"probe_accuracy": acc(xte, yte), "probe_train_accuracy": acc(xtr, ytr),
                "probe_majority_baseline": majority, "probe_n_train": len(train_y), "probe_n_test": len(test_y)}


# -- the study --------------------------------------------------------------------------------------------------


def run_families(cfg, a: FamiliesConfig, overwrite: bool = False, log=print) -> dict:
    """Train every family on one FLOPs budget and score it; writes results.json, summary.md and families.png."""
    validate(a)
    if cfg.data.source != "world":
        raise ScalelabError("the families study needs the synthetic world: set data.source = 'world'")
    cfg.model.validate()

    out = open_study_folder(a.out_dir, overwrite, keep_base=False)
    t_start = time.perf_counter()
    seed = cfg.run.seed
    data = prepare(replace(cfg, run=replace(cfg.run, out_dir=str(out / "data"))), out / "data")
    tok, world = data.tokenizer, World(cfg.data.world)
    train_tokens, val_tokens = data.train_tokens, data.val_tokens
    T, B = cfg.model.block_size, cfg.train.batch_size
    budget = a.flops_budget
    if not budget:
        probe_model = fam.build_model("decoder", cfg.model, tok.vocab_size)
        budget = cfg.train.steps * B * T * fam.training_flops_per_token(probe_model, "decoder", T, a.mask_rate)
    log(f"budget: {budget:.3e} training FLOPs per family; {len(train_tokens):,} train tokens, vocab {tok.vocab_size}")
    qa = qa_sets(world, a.qa_examples, seed)
    windows = bpb_windows(val_tokens, a.bpb_windows, T)
    P = max(1, min(T - 1, int(round(a.bpb_prefix_fraction * T))))
    token_bytes = np.asarray(tok.token_byte_lengths())
    probe = probe_data(world, tok, a, T, seed)
    results: dict[str, dict] = {}
    for family in a.families:
        model, rec = train_family(family, cfg, a, tok, train_tokens, val_tokens, budget, out / f"train_{family}.jsonl")
        t = time.perf_counter()
        for name, pairs in qa.items():
            rec[f"qa_{name}_em"], rec[f"qa_{name}_examples"] = qa_exact_match(
                model, family, tok, pairs, a.max_new_tokens, a.mlm_fill_masks)
        rec["qa_n"] = {k: len(v) for k, v in qa.items()}
        mode = "fill" if family == "mlm" else "causal"
        nats = continuation_nats(model, family, windows, P, tok.vocab_size, mode, a.mlm_fill_masks)
        rec["continuation_bpb"] = bits_per_byte(nats, windows, P, token_bytes)
        rec["continuation_bpb_method"] = {"decoder": "causal next-token", "prefix_lm": "first part as prefix",
                                          "mlm": "left-to-right [MASK] filling"}[family]
        if family == "mlm":
            pll = continuation_nats(model, family, windows, P, tok.vocab_size, "pll")
            rec["pll_bpb_not_comparable"] = bits_per_byte(pll, windows, P, token_bytes)
        for task, d in probe.items():
            feats = {s: pooled_features(model, family, d[s][0]) for s in ("train", "test")}
            scores = linear_probe(feats["train"], d["train"][1], feats["test"], d["test"][1], len(MAJOR_GROUPS),
                                  a.probe_steps, a.probe_weight_decay, seed)
            rec |= {k.replace("probe_", f"probe_{task}_"): v for k, v in scores.items()}
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"model_{family}.safetensors"))
        rec["eval_seconds"] = time.perf_counter() - t
        results[family] = rec
        log(f"{family}: {rec['steps']} steps, {rec['train_flops']:.3e} FLOPs, objective val loss "
            f"{rec['val_objective_loss']:.3f} | QA seen {rec['qa_seen_em']:.3f} held-out {rec['qa_heldout_em']:.3f} | "
            f"continuation bpb {rec['continuation_bpb']:.3f} | probe sentence {rec['probe_sentence_accuracy']:.3f} "
            f"bio {rec['probe_bio_accuracy']:.3f} "
            f"({rec['train_seconds']:.0f}s train, {rec['eval_seconds']:.0f}s eval)")
    result = {
        "families_config": asdict(a), "world": asdict(cfg.data.world), "model": asdict(cfg.model),
        "train": {"batch_size": B, "block_size": T, "lr": cfg.train.optim.lr, "schedule": cfg.train.optim.schedule},
        "flops_budget": budget, "tokenizer_vocab": tok.vocab_size, "mask_id_mlm": tok.vocab_size,
        "continuation": {"windows": int(windows.shape[0]), "context_tokens": P, "scored_tokens_per_window": T - P},
        "probe_classes": list(MAJOR_GROUPS), "families": results, "winners": winners(results),
        "seconds_total": time.perf_counter() - t_start,
    }
    write_json(out / "results.json", result)
    (out / "summary.md").write_text(summary_markdown(result))
    plot(result, out / "families.png")
    return result


def winners(results: dict) -> dict:
    """The best family per metric (lower is better for bits per byte); ties list every leader."""
    out = {}
    for m in METRICS:
        vals = {f: r[m] for f, r in results.items() if not math.isnan(r[m])}
        if not vals:
            continue
        best = min(vals.values()) if m.endswith("bpb") else max(vals.values())
        out[m] = [f for f, v in vals.items() if abs(v - best) < 1e-12]
    return out


def summary_markdown(result: dict) -> str:
    r, c = result["families"], result["continuation"]
    lines = [
        "# Decoder-only vs prefix-LM vs masked LM at equal training FLOPs",
        "",
        f"Budget: {result['flops_budget']:.3e} training FLOPs per family (6·N per token with the head only where a "
        "loss is taken, plus attention over the keys each mask leaves visible); same world corpus, tokenizer "
        f"(vocab {result['tokenizer_vocab']}; the MLM adds [MASK] as id {result['mask_id_mlm']}), backbone and data order.",
        "",
        "| family | params | FLOPs/token | steps | tokens | loss tokens | objective val loss | QA seen EM | "
        "QA held-out EM | continuation bpb | probe: sentence | probe: bio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f, m in r.items():
        lines.append(f"| {f} | {m['params']:,} | {m['flops_per_token']:.3e} | {m['steps']} | {m['tokens_seen']:,} | "
                     f"{m['loss_tokens_expected']:,.0f} | {m['val_objective_loss']:.3f} | {m['qa_seen_em']:.3f} | "
                     f"{m['qa_heldout_em']:.3f} | {m['continuation_bpb']:.3f} | {m['probe_sentence_accuracy']:.3f} | "
                     f"{m['probe_bio_accuracy']:.3f} |")
    lines += ["", "Which wins where:"]
    names = {"qa_seen_em": "QA exact match, people whose QA was in pretraining",
             "qa_heldout_em": "QA exact match, people whose QA never was",
             "continuation_bpb": "continuation bits per byte (lower is better)",
             "probe_sentence_accuracy": "linear probe, frozen mean-pooled features of one sentence (major group)",
             "probe_bio_accuracy": "linear probe, frozen mean-pooled features of a whole biography (major group)"}
    for m, fs in result["winners"].items():
        lines.append(f"- {names[m]}: {', '.join(fs)}")
    lines += [
        "",
        f"Continuation: {c['windows']} validation windows, {c['context_tokens']} tokens of context, the next "
        f"{c['scored_tokens_per_window']} scored. Decoder and prefix-LM see the same information; the MLM's number "
        "comes from filling one [MASK] after each true prefix, a use it was not trained for.",
    ]
    if "mlm" in r:
        m = r["mlm"]
        lines.append(f"MLM pseudo-log-likelihood (one position masked, both sides visible): "
                     f"{m['pll_bpb_not_comparable']:.3f} bpb — NOT comparable, it reads the tokens after the one scored.")
    probe = next(iter(r.values()))
    lines += [f"Probe: {probe['probe_bio_n_train']} train / {probe['probe_bio_n_test']} test texts per task (people "
              f"disjoint), classes {', '.join(result['probe_classes'])}; majority baseline "
              f"{probe['probe_bio_majority_baseline']:.3f}. Probe train accuracy (sentence / bio): "
              + ", ".join(f"{f} {m['probe_sentence_train_accuracy']:.2f} / {m['probe_bio_train_accuracy']:.2f}"
                          for f, m in r.items()) + ".",
              "", f"Wall time: {result['seconds_total']:.0f} s.", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    r = result["families"]
    names = list(r)
    colors = dict(zip(("decoder", "prefix_lm", "mlm"), ("tab:blue", "tab:orange", "tab:green")))
    panels = [("train_flops", "training FLOPs"), ("qa_seen_em", "QA exact match (QA seen)"),
              ("qa_heldout_em", "QA exact match (held-out people)"), ("continuation_bpb", "continuation bits/byte"),
              ("probe_sentence_accuracy", "probe accuracy: one sentence"),
              ("probe_bio_accuracy", "probe accuracy: whole biography")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 8))
    axes = axes.ravel()
    for ax, (key, label) in zip(axes, panels):
        for i, f in enumerate(names):
            ax.bar(i, r[f][key], color=colors.get(f, "tab:gray"), label=f)
        if key == "continuation_bpb" and "mlm" in r:
            ax.bar(len(names), r["mlm"]["pll_bpb_not_comparable"], color="white", edgecolor=colors["mlm"], hatch="//",
                   label="mlm pseudo-LL (not comparable)")
        if key.startswith("probe_"):
            ax.axhline(next(iter(r.values()))[key.replace("accuracy", "majority_baseline")], color="k", ls="--", lw=1, label="majority class")
        if key.startswith(("qa_", "probe_")):
            ax.set_ylim(0, 1.05)
        ax.set_xticks([])
        ax.set_xlabel("family")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    save_figure(fig, path, "decoder vs prefix-LM vs masked LM at equal training FLOPs")


STUDY = Study("families", FamiliesConfig, run_families, summary_markdown,
              ("summary.md", "results.json", "families.png"))
