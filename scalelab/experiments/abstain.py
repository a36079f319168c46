"""Abstention: does RL teach a model to say "I don't know" about people it never read about?

The world controls what the model knows: ``known`` people appear in pretraining (several
biographies each, and their QA mixed in), ``unknown`` people never do. Both groups are split
three ways, by person: SFT people, RL people and evaluation people, so every number below is
measured on people that post-training never saw.

Conditions, all starting from one pretraining run:

- (a) SFT on QA about SFT people, unknown ones with their true attributes as targets: the model
  learns to answer whatever it is asked;
- (b) the same SFT, but unknown people's targets are "I don't know";
- (c) RL (group-normalised policy gradient, scalelab.posttrain.grpo) on QA about RL people from
  (a) or (b), reward: correct ``correct_reward``, "I don't know" ``abstain_reward`` (swept),
  anything else ``wrong_reward``; judged by the exact-match rule;
- (d) the same RL with a small learned judge (answer_scorer.py) in place of the rule.

Each reply is classified as correct / abstain / wrong (:func:`classify_answer`). Reported per
condition: accuracy on known people, the abstention and hallucination (confident wrong answer)
rates on unknown people, and whether the issue's target holds: RL at least halves (a)'s
hallucination rate on unknown people while known accuracy drops by at most 5 points.
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from scalelab.config import GRPOConfig, SFTConfig
from scalelab.data.world import render_qa
from scalelab.errors import ScalelabError, check_config
from scalelab.evals.answer_scorer import LABELS, train_scorer
from scalelab.evals.plots import plt
from scalelab.experiments.base_run import open_study_folder
from scalelab.experiments.study import Study
from scalelab.infer.engine import Engine, GenerationParams
from scalelab.pipeline import pretrain
from scalelab.posttrain import common
from scalelab.posttrain.data import pad_rows
from scalelab.posttrain.grpo import trainer_from_config
from scalelab.posttrain.sft import sft_loss, sft_on_batches
from scalelab.run import Run
from scalelab.runtime import resolve_device, seed_everything

IDK = "I don't know"
CLASSES = ("correct", "abstain", "wrong")
_ABSTAIN_FORMS = {"i don't know", "i do not know", "i dont know"}


@dataclass
class AbstainConfig:
    out_dir: str = "runs/abstain"
    base_run: str = ""  # a finished pretraining run on a world with unknown people; empty: pretrain one first
    sft_fraction: float = 0.4  # share of known and of unknown people for SFT
    rl_fraction: float = 0.3  # share for RL; the rest are evaluation people
    # the same shares for unknown people; negative: as for known people
    unknown_sft_fraction: float = -1.0
    unknown_rl_fraction: float = -1.0
    # SFT runs as the config's [sft] section (steps, batch_size, [sft.optim]) and RL as its [grpo] section
    # (steps, prompts_per_step, group_size, minibatch_size, epochs, kl_coef, clip, temperature, max_new_tokens,
    # scale_advantages, loss_norm, dynamic_sampling, max_refill_rounds, old_logprobs, [grpo.optim]); the study
    # sets the data and reward.
    rl_from: list[str] = field(default_factory=lambda: ["a", "b"])  # SFT conditions RL starts from
    # of those, the ones whose RL runs every abstain reward; the others run the first reward only (RL from (a)
    # never samples "I don't know", so every reward gives it the same policy: a sweep there only costs time)
    sweep_from: list[str] = field(default_factory=lambda: ["a", "b"])
    abstain_rewards: list[float] = field(default_factory=lambda: [0.0])  # the sweep; the first is the headline
    correct_reward: float = 1.0
    wrong_reward: float = -1.0
    scorer: bool = True  # run condition (d)
    scorer_from: str = "b"  # SFT condition (d) starts from
    scorer_steps: int = 400
    max_eval: int = 0  # evaluation questions per group (0: all)
    target_hallucination_cut: float = 0.5
    target_accuracy_drop: float = 0.05


def validate(a: AbstainConfig) -> None:
    checks = [
        (0 < a.sft_fraction < 1 and 0 < a.rl_fraction < 1 and a.sft_fraction + a.rl_fraction < 1,
         "abstain.sft_fraction and abstain.rl_fraction must be in (0, 1) and leave people for evaluation"),
        (all(f < 0 or 0 < f < 1 for f in (a.unknown_sft_fraction, a.unknown_rl_fraction))
         and sum(unknown_shares(a)) < 1,
         "abstain.unknown_sft_fraction and unknown_rl_fraction must be negative (as for known people) or in (0, 1), "
         "and leave unknown people for evaluation"),
        (all(x in ("a", "b") for x in a.rl_from), "abstain.rl_from may only hold \"a\" and \"b\""),
        (all(x in ("a", "b") for x in a.sweep_from), "abstain.sweep_from may only hold \"a\" and \"b\""),
        (a.scorer_from in ("a", "b"), "abstain.scorer_from must be \"a\" or \"b\""),
        (len(a.abstain_rewards) >= 1, "abstain.abstain_rewards needs at least one value"),
        (a.wrong_reward < a.correct_reward and all(a.wrong_reward <= r <= a.correct_reward for r in a.abstain_rewards),
         "abstain rewards must lie between abstain.wrong_reward and abstain.correct_reward, wrong < correct"),
        (a.max_eval >= 0 and a.scorer_steps >= 1, "abstain.scorer_steps must be >= 1 and abstain.max_eval >= 0"),
    ]
    check_config(checks)


def unknown_shares(a: AbstainConfig) -> tuple[float, float]:
    """(SFT, RL) shares of the unknown people."""
    return (a.unknown_sft_fraction if a.unknown_sft_fraction >= 0 else a.sft_fraction,
            a.unknown_rl_fraction if a.unknown_rl_fraction >= 0 else a.rl_fraction)


# -- scoring replies --------------------------------------------------------------------------------------------


def _norm(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def classify_answer(reply: str, answer: str) -> str:
    """"correct" (the answer, case, spacing and a final period ignored), "abstain" ("I don't know"), else "wrong"."""
    r = _norm(reply)
    if r in _ABSTAIN_FORMS:
        return "abstain"
    return "correct" if r == _norm(answer) else "wrong"


def rates(labels: list[str]) -> dict:
    if not labels:
        raise ScalelabError("no replies to score")
    bad = sorted(set(labels) - set(CLASSES))
    if bad:
        raise ScalelabError(f"unknown answer class {bad[0]!r} (classes: {', '.join(CLASSES)})")
    return {c: labels.count(c) / len(labels) for c in CLASSES} | {"n": len(labels)}


def summarize(known: list[str], unknown: list[str]) -> dict:
    """The table's columns from the classes of replies about known and unknown evaluation people."""
    k, u = rates(known), rates(unknown)
    return {"known_accuracy": k["correct"], "known_abstain": k["abstain"], "known_wrong": k["wrong"],
            "unknown_abstain": u["abstain"], "unknown_hallucination": u["wrong"], "unknown_lucky": u["correct"],
            "n_known": k["n"], "n_unknown": u["n"]}


def meets_target(cond: dict, ref: dict, cut: float = 0.5, drop: float = 0.05) -> bool:
    """RL at least ``cut``s ref's hallucination on unknown people; known accuracy falls by at most ``drop``."""
    return (cond["unknown_hallucination"] <= (1 - cut) * ref["unknown_hallucination"] + 1e-12
            and cond["known_accuracy"] >= ref["known_accuracy"] - drop - 1e-12)


def headline_condition(a: AbstainConfig) -> str | None:
    """The RL condition reported as the headline: fixed by the config before anything runs.

    It is RL from the first of ``rl_from`` with the first abstain reward. A headline picked after the
    runs would need people that neither trained nor evaluate: the RL people cannot serve, because RL
    learns them (every RL-from-(b) condition scores 0.97-1.00 known accuracy on them in the preset's worlds).
    """
    return f"c[{a.rl_from[0]}, abstain={a.abstain_rewards[0]:g}]" if a.rl_from else None


# -- people and data --------------------------------------------------------------------------------------------


def split_people(world, sft_fraction: float, rl_fraction: float, seed: int,
                 unknown_fractions: tuple[float, float] | None = None) -> dict[str, list[int]]:
    """Known and unknown people, each shuffled and cut into sft / rl / eval groups (disjoint by person).

    ``unknown_fractions`` (SFT, RL) cuts the unknown people differently; by default as the known ones.
    """
    known = world.qa_train_people + world.qa_eval_people
    unknown = world.unknown_people
    if len(unknown) < 3 or len(known) < 3:
        raise ScalelabError(f"the world has {len(known)} known and {len(unknown)} unknown people; the experiment needs "
                            "at least 3 of each (raise data.world.n_people or data.world.unknown_fraction)")
    out = {}
    shares = {"known": (sft_fraction, rl_fraction), "unknown": unknown_fractions or (sft_fraction, rl_fraction)}
    for name, ids in (("known", sorted(known)), ("unknown", sorted(unknown))):
        ids = list(ids)
        sft_share, rl_share = shares[name]
        random.Random(f"abstain-{name}-{seed}").shuffle(ids)
        n_sft = max(1, round(sft_share * len(ids)))
        n_rl = max(1, min(len(ids) - n_sft - 1, round(rl_share * len(ids))))
        out[f"sft_{name}"], out[f"rl_{name}"], out[f"eval_{name}"] = ids[:n_sft], ids[n_sft:n_sft + n_rl], ids[n_sft + n_rl:]
    return out


def qa_items(world, people: list[int]) -> list[dict]:
    """Every question template about every attribute of these people, with the true answer."""
    return [{"question": q.question, "answer": q.answer, "person": q.person_id, "known": world.people[q.person_id].known}
            for q in world.qa_pairs(people)]


def sft_records(world, groups: dict, unknown_target: str) -> list[dict]:
    """(question, reply) records for SFT: ``unknown_target`` = "answer" (condition a) or "idk" (condition b)."""
    if unknown_target not in ("answer", "idk"):
        raise ScalelabError(f"unknown_target must be 'answer' or 'idk', got {unknown_target!r}")
    return [{"question": it["question"], "reply": it["answer"] if it["known"] or unknown_target == "answer" else IDK}
            for it in qa_items(world, groups["sft_known"] + groups["sft_unknown"])]


# Post-training keeps pretraining's own QA text, "Question: ...\nAnswer: <reply>\n", instead of the
# chat template: a small model's facts are keyed to that text, and its chat markers are untrained
# embeddings (a first try with the chat template lost every known fact during SFT).
def qa_prompt(tok, question: str) -> list[int]:
    return [tok.bos_id] + tok.encode(render_qa(question))


def qa_reply(tok, reply: str) -> list[int]:
    """The reply's tokens with the newline that ends it (the model must learn to stop)."""
    return tok.encode(" " + reply + "\n")


# -- stages -----------------------------------------------------------------------------------------------------


def sft(base, tok, records: list[dict], stage: SFTConfig, train_cfg, seed: int, log_path: Path, loss_fn=sft_loss):
    """A copy of the base model tuned on ``records`` (assistant tokens only); returns (model, final loss).
    ``loss_fn``: cross-entropy on the replies by default (see sft_on_batches)."""
    rows = []
    for r in records:
        p, y = qa_prompt(tok, r["question"]), qa_reply(tok, r["reply"])
        rows.append((p + y, [0] * len(p) + [1] * len(y)))
    ids, mask = pad_rows(rows, max(len(r[0]) for r in rows), tok.bos_id)
    tcfg = common.stage_train_config(train_cfg, stage)
    batches = common.epoch_batches(len(ids), min(tcfg.batch_size, len(ids)), seed)

    def batch(_):
        idx = next(batches)
        return ids[idx], mask[idx]

    model, losses = sft_on_batches(base, batch, tcfg, log_path, "sft", loss_fn)
    return model, losses[-1]


def replies(model, tok, items: list[dict], max_new_tokens: int, temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Replies to "Question: ...\nAnswer:", up to the newline: greedy, or sampled at ``temperature``."""
    prompts = [qa_prompt(tok, it["question"]) for it in items]
    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, stop_strings=("\n",))
    was = model.training
    model.eval()
    try:
        outs = Engine(model, tok, max_batch=min(64, len(prompts))).generate(prompts, params)
    finally:
        model.train(was)
    return [o.text.strip() for o in outs]


def evaluate(model, tok, ev: dict, max_new_tokens: int) -> dict:
    out = {}
    labels = {}
    for group in ("known", "unknown"):
        items = ev[group]
        texts = replies(model, tok, items, max_new_tokens)
        labels[group] = [classify_answer(t, it["answer"]) for t, it in zip(texts, items)]
        out[f"examples_{group}"] = [{"q": it["question"], "answer": it["answer"], "reply": t, "class": c}
                                    for it, t, c in list(zip(items, texts, labels[group]))[:8]]
    return summarize(labels["known"], labels["unknown"]) | out


def rl(init_model, tok, rl_items: list[dict], a: AbstainConfig, g: GRPOConfig, abstain_reward: float, seed: int, log_path: Path,
       judge=None):
    """GRPO from ``init_model``; the reward is the rule classifier's class, or the learned judge's when given."""
    value = {"correct": a.correct_reward, "abstain": abstain_reward, "wrong": a.wrong_reward}
    judged = {"agree": "correct", "abstain": "abstain", "disagree": "wrong"}
    assert set(judged) == set(LABELS)
    agreement = []

    def reward(i, text, item):
        rule = classify_answer(text, item["answer"])
        if judge is None:
            return value[rule]
        verdict = judged[judge.judge([item["answer"]], [text])[0]]
        agreement.append(verdict == rule)
        return value[verdict]

    policy = copy.deepcopy(init_model)
    trainer = trainer_from_config(policy, tok, reward, g, seed, stop_strings=("\n",))
    rng = random.Random(f"abstain-rl-{seed}")

    def refill(n: int):
        more = rng.sample(rl_items, min(n, len(rl_items)))
        return [qa_prompt(tok, b["question"]) for b in more], more

    history = []
    with open(log_path, "w", encoding="utf-8") as log:
        for it in range(1, g.steps + 1):
            batch = rng.sample(rl_items, min(g.prompts_per_step, len(rl_items)))
            stats = trainer.step([qa_prompt(tok, b["question"]) for b in batch], batch,
                                 refill=refill if g.dynamic_sampling else None)
            texts = stats.pop("texts")
            cls = [classify_answer(t, batch[j // g.group_size]["answer"]) for j, t in enumerate(texts)]
            stats |= {f"rollout_{c}": cls.count(c) / len(cls) for c in CLASSES}
            history.append(stats)
            log.write(json.dumps({"kind": "rl", "step": it, **stats}) + "\n")
    extra = {"judge_rule_agreement": sum(agreement) / len(agreement)} if agreement else {}
    return policy.eval(), history, extra


# -- the experiment ---------------------------------------------------------------------------------------------


def _pretrain(cfg, out: Path) -> Path:
    base = out / "base"
    cfg = copy.deepcopy(cfg)
    cfg.run.out_dir = str(base)
    if cfg.data.source != "world" or cfg.data.world.unknown_fraction <= 0:
        raise ScalelabError("the abstention experiment needs data.source = 'world' with data.world.unknown_fraction > 0")
    pretrain(cfg, overwrite=True, stages=())
    return base


def run_abstain(cfg, a: AbstainConfig, overwrite: bool = False, log=print) -> dict:
    """Every condition, evaluated on held-out people; writes results.json, results.md and abstain.png."""
    validate(a)

    # The base lives inside this folder without a recipe fingerprint, so --overwrite retrains it.
    out = open_study_folder(a.out_dir, overwrite, keep_base=False)
    t0 = time.perf_counter()
    timings = {}
    seed = cfg.run.seed
    seed_everything(seed)
    base_dir = Path(a.base_run) if a.base_run else _pretrain(cfg, out)
    timings["pretrain"] = time.perf_counter() - t0
    init = Run.open(base_dir)
    init_model = init.load_model(resolve_device(cfg.run.device))
    if init.world is None or not init.world.unknown_people:
        raise ScalelabError(f"{base_dir} was not trained on a world with unknown people (data.world.unknown_fraction > 0)")
    world, base = init.world, init_model.eval()
    tok = init.tokenizer
    groups = split_people(world, a.sft_fraction, a.rl_fraction, seed, unknown_shares(a))
    ev = {g: qa_items(world, groups[f"eval_{g}"]) for g in ("known", "unknown")}
    if a.max_eval:
        ev = {g: random.Random(f"abstain-eval-{seed}").sample(v, min(a.max_eval, len(v))) for g, v in ev.items()}
    rl_items = qa_items(world, groups["rl_known"] + groups["rl_unknown"])
    rl_people = {g: qa_items(world, groups[f"rl_{g}"]) for g in ("known", "unknown")}
    conditions: dict[str, dict] = {}
    rl_view: dict[str, dict] = {}  # the same scores on the RL people, for choosing the headline

    def record(name, model, **extra):
        t = time.perf_counter()
        conditions[name] = evaluate(model, tok, ev, cfg.grpo.max_new_tokens) | extra
        m = conditions[name]
        log(f"{name}: known acc {m['known_accuracy']:.3f} | unknown abstain {m['unknown_abstain']:.3f} "
            f"hallucination {m['unknown_hallucination']:.3f} (eval {time.perf_counter() - t:.0f}s)")

    record("base", base)
    # The base model's memory, measured on the people post-training tunes on (their QA is in pretraining).
    sft_known_items = qa_items(world, groups["sft_known"])
    base_tune = [classify_answer(r, it["answer"]) for r, it in zip(replies(base, tok, sft_known_items, cfg.grpo.max_new_tokens), sft_known_items)]
    base_memory = base_tune.count("correct") / len(base_tune)
    log(f"base model, QA about SFT-split known people: exact match {base_memory:.3f}")
    models = {}
    for name, target in (("a", "answer"), ("b", "idk")):
        t = time.perf_counter()
        models[name], loss = sft(base, tok, sft_records(world, groups, target), cfg.sft, cfg.train, seed, out / f"sft_{name}.jsonl")
        timings[f"sft_{name}"] = time.perf_counter() - t
        record(name, models[name], sft_final_loss=loss)
        rl_view[name] = evaluate(models[name], tok, rl_people, cfg.grpo.max_new_tokens)
    histories = {}
    for init_name in a.rl_from:
        for r in a.abstain_rewards if init_name in a.sweep_from else a.abstain_rewards[:1]:
            name = f"c[{init_name}, abstain={r:g}]"
            t = time.perf_counter()
            policy, hist, _ = rl(models[init_name], tok, rl_items, a, cfg.grpo, r, seed, out / f"rl_{init_name}_{r:g}.jsonl")
            timings[name] = time.perf_counter() - t
            histories[name] = hist
            record(name, policy, init=init_name, abstain_reward=r, rl_reward_first=hist[0]["reward"] if hist else None,
                   rl_reward_last=hist[-1]["reward"] if hist else None)
            rl_view[name] = evaluate(policy, tok, rl_people, cfg.grpo.max_new_tokens)
    scorer_stats = {}
    if a.scorer:
        t = time.perf_counter()
        judge, scorer_stats = train_scorer(steps=a.scorer_steps, seed=seed)
        r = a.abstain_rewards[0]
        name = f"d[{a.scorer_from}, abstain={r:g}, judge]"
        policy, hist, extra = rl(models[a.scorer_from], tok, rl_items, a, cfg.grpo, r, seed, out / f"rl_judge_{a.scorer_from}.jsonl", judge)
        timings[name] = time.perf_counter() - t
        histories[name] = hist
        record(name, policy, init=a.scorer_from, abstain_reward=r, **extra, **scorer_stats)
        rl_view[name] = evaluate(policy, tok, rl_people, cfg.grpo.max_new_tokens)
    for name, m in conditions.items():
        if name.startswith(("c[", "d[")):
            m["meets_target_vs_a"] = meets_target(m, conditions["a"], a.target_hallucination_cut, a.target_accuracy_drop)
    selected = headline_condition(a)
    timings["total"] = time.perf_counter() - t0
    result = {"abstain": asdict(a), "sft": asdict(cfg.sft), "grpo": asdict(cfg.grpo), "world": asdict(world.cfg), "people": {k: len(v) for k, v in groups.items()},
              "rl_people_view": rl_view, "selected": selected,
              "base_memory_sft_known": base_memory, "conditions": conditions, "rl_history": histories,
              "scorer": scorer_stats, "timings_seconds": timings, "base_run": str(base_dir)}
    common.write_json(out / "results.json", result)
    (out / "results.md").write_text(results_markdown(result))
    plot(result, out / "abstain.png")
    return result


def results_markdown(result: dict) -> str:
    a = result["abstain"]
    p = result["people"]
    lines = [
        "# Abstention experiment",
        "",
        f"Evaluation on people post-training never saw: {p['eval_known']} known ({result['conditions']['a']['n_known']} "
        f"questions) and {p['eval_unknown']} unknown ({result['conditions']['a']['n_unknown']} questions). "
        f"SFT on {p['sft_known']} known + {p['sft_unknown']} unknown people, RL on {p['rl_known']} + {p['rl_unknown']}.",
        f"Base model's exact match on QA about SFT-split known people (pretraining format): "
        f"{result['base_memory_sft_known']:.3f}.",
        f"Reward: correct {a['correct_reward']:g}, \"I don't know\" (swept), wrong {a['wrong_reward']:g}. "
        f"Target: hallucination on unknown people ≤ {1 - a['target_hallucination_cut']:g} × (a)'s, "
        f"known accuracy ≥ (a)'s − {a['target_accuracy_drop']:g}.",
        "",
        "| condition | known acc | known IDK | known wrong | unknown IDK | unknown halluc. | unknown lucky | target vs (a) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in result["conditions"].items():
        target = {True: "met", False: "not met"}.get(m.get("meets_target_vs_a"), "")
        lines.append(f"| {name} | {m['known_accuracy']:.3f} | {m['known_abstain']:.3f} | {m['known_wrong']:.3f} | "
                     f"{m['unknown_abstain']:.3f} | {m['unknown_hallucination']:.3f} | {m['unknown_lucky']:.3f} | {target} |")
    sel = result.get("selected")
    if "rl_people_view" in result:
        lines += ["", "The same policies on the RL people (the people RL trained on): RL learns these people, so "
                  "this table shows how far RL fits them, and it plays no part in choosing the headline.", "",
                  "| condition | RL people: known acc | RL people: unknown halluc. | target vs (a) on RL people |",
                  "|---|---|---|---|"]
        view = result["rl_people_view"]
        for name, m in view.items():
            hit = ""
            if name.startswith("c["):
                hit = "met" if meets_target(m, view["a"], a["target_hallucination_cut"], a["target_accuracy_drop"]) else "not met"
            lines.append(f"| {name} | {m['known_accuracy']:.3f} | {m['unknown_hallucination']:.3f} | {hit} |")
        if sel:
            m = result["conditions"][sel]
            lines += ["", f"**Headline (fixed by the config: the first of rl_from, the first abstain reward): {sel}.** "
                      f"On the evaluation people: known accuracy {m['known_accuracy']:.3f}, "
                      f"hallucination {m['unknown_hallucination']:.3f}; target "
                      f"{'met' if m['meets_target_vs_a'] else 'not met'} against (a)."]
    if result["scorer"]:
        s = result["scorer"]
        lines += ["", f"Learned judge: held-out accuracy {s['scorer_heldout_accuracy']:.3f} on generated pairs."]
        for name, m in result["conditions"].items():
            if "judge_rule_agreement" in m:
                lines.append(f"{name}: the judge agreed with the exact-match rule on {m['judge_rule_agreement']:.3f} "
                             "of RL rollouts.")
    t = result["timings_seconds"]
    lines += ["", "Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in t.items()), ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    conds = result["conditions"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(conds)
    x = range(len(names))
    w = 0.27
    for k, (key, label) in enumerate((("known_accuracy", "known accuracy"), ("unknown_abstain", "unknown: I don't know"),
                                      ("unknown_hallucination", "unknown: hallucination"))):
        ax1.bar([i + (k - 1) * w for i in x], [conds[n][key] for n in names], w, label=label)
    ax1.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
    ax1.set_ylim(0, 1)
    ax1.set_title("held-out people, greedy replies")
    ax1.legend(fontsize=8)
    for init in result["abstain"]["rl_from"]:
        pts = sorted((m["abstain_reward"], m) for n, m in conds.items() if n.startswith("c[") and m["init"] == init)
        if not pts:
            continue
        rs = [r for r, _ in pts]
        ax2.plot(rs, [m["known_accuracy"] for _, m in pts], "o-", label=f"from ({init}): known accuracy")
        ax2.plot(rs, [m["unknown_hallucination"] for _, m in pts], "s--", label=f"from ({init}): unknown hallucination")
        ax2.plot(rs, [m["unknown_abstain"] for _, m in pts], "^:", label=f"from ({init}): unknown IDK")
    ax2.set_xlabel("reward for \"I don't know\"")
    ax2.set_ylim(0, 1)
    ax2.set_title("RL: the abstain reward's trade-off")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# The stage settings this study once copied into [abstain] (read, with a FutureWarning, for one release).
MOVED_KEYS = {"sft_steps": "sft.steps", "sft_batch_size": "sft.batch_size", "sft_lr": "sft.optim.lr",
              "sft_warmup_steps": "sft.optim.warmup_steps", "rl_iterations": "grpo.steps",
              "rl_prompts": "grpo.prompts_per_step", "rl_lr": "grpo.optim.lr",
              **{k: f"grpo.{k}" for k in ("group_size", "kl_coef", "clip", "scale_advantages", "dynamic_sampling",
                                          "max_refill_rounds", "temperature", "max_new_tokens")}}

STUDY = Study("abstain", AbstainConfig, run_abstain, results_markdown,
              ("results.md", "results.json", "abstain.png"), MOVED_KEYS)
