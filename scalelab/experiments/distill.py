"""Distillation copies the teacher's knowledge gaps; RL with the abstention reward is the repair.

A teacher and a student are pretrained on the same synthetic world, but each reads about a different
subset of its people: the unknown people are a window of one shuffled order (``data.world.unknown_offset``),
at the config's offset for the teacher and at ``student_offset`` for the student. That cuts the people
into four groups: **both** know them, **teacher_only**, **student_only**, **neither**. Each group is
split by person into teacher-SFT, distillation, RL and evaluation people.

Per seed (its own world and run seed), every stage is one of the abstention study's (abstain.py):

- teacher: the teacher's base after abstention SFT (answer what it read about, "I don't know" otherwise)
  on the teacher-SFT people;
- student_base: the student's pretrained base, no tuning;
- student_sft, the reference "before distillation": the student's base after the same abstention SFT,
  on the distillation people's questions, with targets from the student's own knowledge;
- distilled: the student's base after SFT on the *teacher's sampled answers* to those same questions
  (sequence-level distillation): the same questions as student_sft, only the targets differ;
- repaired: the distilled student after RL (abstain.rl, GRPO) on its own samples for the RL people's
  questions, reward correct ``correct_reward``, "I don't know" ``abstain_reward``, else ``wrong_reward``.

Each model answers the evaluation people's questions (greedy); each reply is correct / abstain / wrong
(abstain.classify_answer), reported per group as accuracy, abstention and hallucination (wrong), mean and
sample std over seeds. The claim: from student_sft to distilled, hallucination rises on teacher_only
people and abstention rises on student_only people; from distilled to repaired, both fall back.
"""

from __future__ import annotations

import copy
import random
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

from scalelab.config import Config
from scalelab.errors import ScalelabError
from scalelab.evals.plots import plt, save_figure
from scalelab.experiments import abstain as ab
from scalelab.experiments.base_run import ensure_base, open_study_folder
from scalelab.experiments.study import Study
from scalelab.posttrain import common
from scalelab.posttrain.sft import token_distill_loss
from scalelab.run import Run
from scalelab.runtime import resolve_device, seed_everything

GROUPS = ("both", "teacher_only", "student_only", "neither")
SPLITS = ("teacher_sft", "distill", "rl", "eval")
MODELS = ("teacher", "student_base", "student_sft", "distilled", "repaired")
TOKEN_MODEL = "distilled_kl"  # with distill.token_level: the student distilled on the teacher's token distributions
METRICS = (("accuracy", "correct"), ("abstention", "abstain"), ("hallucination", "wrong"))


@dataclass
class DistillConfig:
    out_dir: str = "runs/distill"
    # one replication each: world seed data.world.seed + s, run seed run.seed + s
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # where the student's unknown window starts (the teacher's: data.world.unknown_offset); with
    # unknown_fraction 0.5 and offsets 0 and 0.25, each of the four groups holds a quarter of the people
    student_offset: float = 0.25
    # shares of every group's people; evaluation gets the rest
    teacher_sft_fraction: float = 0.3
    distill_fraction: float = 0.3
    rl_fraction: float = 0.2
    teacher_temperature: float = 0.6  # the teacher's sampling temperature for the distillation data (0: greedy)
    # SFT stages run as the config's [sft] section, the repair as its [grpo] section; the study sets data and reward
    correct_reward: float = 1.0
    abstain_reward: float = 0.0
    wrong_reward: float = -1.0
    max_eval: int = 0  # evaluation questions per group and seed (0: all)
    # also distil token by token: KL to the teacher's next-token distributions over its sampled answers (on the
    # same questions as the sequence-level student). That needs one vocabulary, so the student then pretrains
    # with the teacher's tokenizer, which changes every student model of the study, not only this one.
    token_level: bool = False
    kl_temperature: float = 1.0  # both distributions softened by it; the loss is scaled by its square


def validate(d: DistillConfig, cfg: Config) -> None:
    w = cfg.data.world
    shares = (d.teacher_sft_fraction, d.distill_fraction, d.rl_fraction)
    checks = [
        (cfg.data.source == "world" and w.unknown_fraction > 0,
         "the distillation study needs data.source = 'world' with data.world.unknown_fraction > 0"),
        (len(d.seeds) >= 1 and len(set(d.seeds)) == len(d.seeds) and all(isinstance(s, int) and s >= 0 for s in d.seeds),
         "distill.seeds must be a non-empty list of distinct integers >= 0"),
        (all(0 < f < 1 for f in shares) and sum(shares) < 1,
         "distill.teacher_sft_fraction, distill_fraction and rl_fraction must be in (0, 1) and leave people for evaluation"),
        (0 <= d.student_offset < 1 and d.student_offset + w.unknown_fraction <= 1 + 1e-9
         and abs(d.student_offset - w.unknown_offset) > 1e-9,
         "distill.student_offset must lie in [0, 1 - data.world.unknown_fraction] and differ from data.world.unknown_offset"),
        (d.teacher_temperature >= 0, "distill.teacher_temperature must be >= 0"),
        (d.wrong_reward < d.abstain_reward < d.correct_reward,
         "distill rewards must order wrong_reward < abstain_reward < correct_reward"),
        (d.max_eval >= 0, "distill.max_eval must be >= 0"),
        (d.kl_temperature > 0, "distill.kl_temperature must be > 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ScalelabError(f"invalid config: {msg}")


# -- people -----------------------------------------------------------------------------------------------------


def model_configs(cfg: Config, d: DistillConfig, seed: int) -> tuple[Config, Config]:
    """The teacher's and the student's pretraining configs: one world seed, two unknown windows.

    Deep copies: pretraining writes the tokenizer's vocabulary size into its config's model section, and a
    shared section would change the next base's recipe fingerprint (so its cache would never match)."""
    cfg = copy.deepcopy(cfg)
    world = replace(cfg.data.world, seed=cfg.data.world.seed + seed)
    run = replace(cfg.run, seed=cfg.run.seed + seed)
    teacher = replace(cfg, run=run, data=replace(cfg.data, world=world))
    student = replace(copy.deepcopy(cfg), run=run,
                      data=replace(cfg.data, world=replace(world, unknown_offset=d.student_offset)))
    return teacher, student


def knowledge_groups(teacher_world, student_world) -> dict[str, list[int]]:
    """Person ids by who read about them in pretraining."""
    if len(teacher_world.people) != len(student_world.people) or any(
            a.name != b.name for a, b in zip(teacher_world.people, student_world.people)):
        raise ScalelabError("the teacher's and the student's worlds hold different people; they must share data.world "
                            "except for unknown_offset")
    out = {g: [] for g in GROUPS}
    for t, s in zip(teacher_world.people, student_world.people):
        out[("both" if s.known else "teacher_only") if t.known else ("student_only" if s.known else "neither")].append(t.id)
    return out


def split_groups(groups: dict[str, list[int]], d: DistillConfig, seed: int) -> dict[str, dict[str, list[int]]]:
    """Every group shuffled and cut by person into teacher_sft / distill / rl / eval."""
    out = {}
    for g in GROUPS:
        ids = sorted(groups[g])
        if len(ids) < len(SPLITS):
            raise ScalelabError(f"the {g} group holds {len(ids)} people; the study needs at least {len(SPLITS)} "
                                "(raise data.world.n_people, or move distill.student_offset)")
        random.Random(f"distill-{g}-{seed}").shuffle(ids)
        cuts, start = {}, 0
        for name, share in (("teacher_sft", d.teacher_sft_fraction), ("distill", d.distill_fraction), ("rl", d.rl_fraction)):
            n = max(1, min(len(ids) - start - (len(SPLITS) - len(cuts) - 1), round(share * len(ids))))
            cuts[name], start = ids[start:start + n], start + n
        cuts["eval"] = ids[start:]
        out[g] = cuts
    return out


def people(split: dict[str, dict[str, list[int]]], name: str) -> list[int]:
    return [i for g in GROUPS for i in split[g][name]]


def honest_records(world, ids: list[int]) -> list[dict]:
    """Abstention SFT targets from ``world``'s knowledge: the answer about people it read about, else IDK."""
    return [{"question": it["question"], "reply": it["answer"] if it["known"] else ab.IDK} for it in ab.qa_items(world, ids)]


# -- one replication --------------------------------------------------------------------------------------------


def group_rates(model, tok, eval_items: dict[str, list[dict]], max_new_tokens: int) -> dict:
    out = {}
    for g in GROUPS:
        items = eval_items[g]
        texts = ab.replies(model, tok, items, max_new_tokens)
        r = ab.rates([ab.classify_answer(t, it["answer"]) for t, it in zip(texts, items)])
        out[g] = {m: r[c] for m, c in METRICS} | {"n": r["n"]}
    return out


def run_seed(cfg: Config, d: DistillConfig, seed: int, out: Path, log=print) -> dict:
    folder = out / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    timings = {}
    t = time.perf_counter()
    cfg_t, cfg_s = model_configs(cfg, d, seed)
    run_t = Run.open(ensure_base(cfg_t, out / "base" / f"seed{seed}_teacher"))
    if d.token_level:  # one vocabulary for both: the student reads its corpus with the teacher's tokenizer
        cfg_s = replace(cfg_s, tokenizer=replace(cfg_s.tokenizer, path=str(run_t.tokenizer_dir.resolve())))
    run_s = Run.open(ensure_base(cfg_s, out / "base" / f"seed{seed}_student"))
    timings["pretrain"] = time.perf_counter() - t
    stage_seed = cfg_t.run.seed
    seed_everything(stage_seed)
    device = resolve_device(cfg.run.device)
    teacher_base, student_base = run_t.load_model(device), run_s.load_model(device)
    tok_t, tok_s, world_t, world_s = run_t.tokenizer, run_s.tokenizer, run_t.world, run_s.world
    split = split_groups(knowledge_groups(world_t, world_s), d, stage_seed)
    max_new = cfg.grpo.max_new_tokens
    eval_items = {g: ab.qa_items(world_s, split[g]["eval"]) for g in GROUPS}
    if d.max_eval:
        eval_items = {g: random.Random(f"distill-eval-{g}-{stage_seed}").sample(v, min(d.max_eval, len(v)))
                      for g, v in eval_items.items()}
    models = {}

    def record(name, model, tok):
        t0 = time.perf_counter()
        models[name] = group_rates(model, tok, eval_items, max_new)
        m = models[name]
        log(f"seed {seed} {name}: " + " | ".join(
            f"{g} acc {m[g]['accuracy']:.2f} idk {m[g]['abstention']:.2f} wrong {m[g]['hallucination']:.2f}" for g in GROUPS)
            + f" (eval {time.perf_counter() - t0:.0f}s)")

    t = time.perf_counter()
    teacher, loss_t = ab.sft(teacher_base, tok_t, honest_records(world_t, people(split, "teacher_sft")), cfg.sft,
                             cfg.train, stage_seed, folder / "teacher_sft.jsonl")
    timings["teacher_sft"] = time.perf_counter() - t
    record("teacher", teacher, tok_t)
    record("student_base", student_base, tok_s)
    distill_ids = people(split, "distill")
    t = time.perf_counter()
    student_sft, loss_s = ab.sft(student_base, tok_s, honest_records(world_s, distill_ids), cfg.sft, cfg.train,
                                 stage_seed, folder / "student_sft.jsonl")
    timings["student_sft"] = time.perf_counter() - t
    record("student_sft", student_sft, tok_s)

    # The teacher's own tokenizer reads its prompts; the student learns from the text of its answers.
    t = time.perf_counter()
    questions = ab.qa_items(world_t, distill_ids)
    answers = ab.replies(teacher, tok_t, questions, max_new, temperature=d.teacher_temperature, seed=stage_seed)
    by_group = {pid: g for g in GROUPS for pid in split[g]["distill"]}
    teacher_data = {g: ab.rates([ab.classify_answer(a, q["answer"]) for a, q in zip(answers, questions)
                                 if by_group[q["person"]] == g]) for g in GROUPS}
    distill_records = [{"question": q["question"], "reply": a} for q, a in zip(questions, answers)]
    distilled, loss_d = ab.sft(student_base, tok_s, distill_records, cfg.sft, cfg.train, stage_seed,
                               folder / "distill_sft.jsonl")
    timings["distill"] = time.perf_counter() - t
    record("distilled", distilled, tok_s)
    losses = {"teacher": loss_t, "student_sft": loss_s, "distilled": loss_d}
    if d.token_level:
        if tok_s.encode("Question: a probe, 0123") != tok_t.encode("Question: a probe, 0123"):
            raise ScalelabError("token-level distillation needs the teacher's tokenizer in the student's base; "
                                f"{run_s.path} was pretrained with another one")
        t = time.perf_counter()
        kd = partial(token_distill_loss, teacher=teacher, temperature=d.kl_temperature)
        distilled_kl, losses[TOKEN_MODEL] = ab.sft(student_base, tok_s, distill_records, cfg.sft, cfg.train, stage_seed,
                                                   folder / "distill_kl.jsonl", loss_fn=kd)
        timings["distill_kl"] = time.perf_counter() - t
        record(TOKEN_MODEL, distilled_kl, tok_s)

    t = time.perf_counter()
    rewards = ab.AbstainConfig(correct_reward=d.correct_reward, wrong_reward=d.wrong_reward)
    repaired, history, _ = ab.rl(distilled, tok_s, ab.qa_items(world_s, people(split, "rl")), rewards, cfg.grpo,
                                 d.abstain_reward, stage_seed, folder / "repair_rl.jsonl")
    timings["repair_rl"] = time.perf_counter() - t
    record("repaired", repaired, tok_s)
    return {"seed": seed, "world_seed": world_t.cfg.seed, "run_seed": stage_seed,
            "people": {g: {k: len(v) for k, v in split[g].items()} for g in GROUPS},
            "models": models, "teacher_distill_answers": teacher_data,
            "sft_final_loss": losses,
            "rl_reward_first": history[0]["reward"] if history else None,
            "rl_reward_last": history[-1]["reward"] if history else None,
            "teacher_run": str(run_t.path), "student_run": str(run_s.path), "timings_seconds": timings}


# -- aggregate, claim, report -----------------------------------------------------------------------------------


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def models_of(per_seed: list[dict]) -> list[str]:
    """The models every seed evaluated, in the order they were trained (MODELS, and TOKEN_MODEL when built)."""
    return [m for m in per_seed[0]["models"] if all(m in r["models"] for r in per_seed)]


def aggregate(per_seed: list[dict]) -> dict:
    """{model: {group: {metric: {mean, std, values}}}} over seeds (std: sample std, 0 for one seed)."""
    return {m: {g: {k: mean_std([r["models"][m][g][k] for r in per_seed]) for k, _ in METRICS} for g in GROUPS}
            for m in models_of(per_seed)}


def claim(per_seed: list[dict]) -> dict:
    """The issue's four predictions, each on the seed means and counted seed by seed."""
    tests = {
        "hallucination_up_on_teacher_only": ("teacher_only", "hallucination", "student_sft", "distilled"),
        "abstention_up_on_student_only": ("student_only", "abstention", "student_sft", "distilled"),
        "rl_cuts_hallucination_on_teacher_only": ("teacher_only", "hallucination", "repaired", "distilled"),
        "rl_cuts_abstention_on_student_only": ("student_only", "abstention", "repaired", "distilled"),
    }
    if TOKEN_MODEL in models_of(per_seed):  # the same two predictions for the token-level student
        tests |= {"kl_hallucination_up_on_teacher_only": ("teacher_only", "hallucination", "student_sft", TOKEN_MODEL),
                  "kl_abstention_up_on_student_only": ("student_only", "abstention", "student_sft", TOKEN_MODEL)}
    out = {}
    for name, (g, k, low, high) in tests.items():
        diffs = [r["models"][high][g][k] - r["models"][low][g][k] for r in per_seed]
        out[name] = {"group": g, "metric": k, "lower": low, "higher": high, "mean_difference": statistics.fmean(diffs),
                     "holds_on_mean": statistics.fmean(diffs) > 0, "seeds_holding": sum(x > 0 for x in diffs),
                     "n_seeds": len(diffs)}
    return out


def run_distill(cfg: Config, d: DistillConfig, overwrite: bool = False, log=print) -> dict:
    """Every seed, then the aggregate; writes results.json, results.md and distill.png into ``d.out_dir``."""
    validate(d, cfg)
    out = open_study_folder(d.out_dir, overwrite)  # keeps out/base: pretraining is cached by its recipe
    t0 = time.perf_counter()
    per_seed = []
    for s in d.seeds:
        per_seed.append(run_seed(cfg, d, s, out, log))
        common.write_json(out / "results_partial.json", {"seeds": per_seed})
    result = {"distill": asdict(d), "sft": asdict(cfg.sft), "grpo": asdict(cfg.grpo), "world": asdict(cfg.data.world),
              "model": asdict(cfg.model), "train_steps": cfg.train.steps, "seeds": per_seed,
              "aggregate": aggregate(per_seed), "claim": claim(per_seed),
              "total_seconds": time.perf_counter() - t0}
    common.write_json(out / "results.json", result)
    (out / "results_partial.json").unlink()
    (out / "results.md").write_text(results_markdown(result))
    plot(result, out / "distill.png")
    return result


LABELS = {"teacher": "teacher (abstention SFT)", "student_base": "student base (no tuning)",
          "student_sft": "student, own abstention SFT (before)", "distilled": "student distilled from teacher",
          "repaired": "distilled + RL repair", TOKEN_MODEL: "student distilled token by token (KL to the teacher)"}


def _cell(x: dict) -> str:
    return f"{x['mean']:.3f} ± {x['std']:.3f}"


def claim_sentence(c: dict) -> str:
    """One plain sentence per half of the claim: on the seed means, and how many seeds agree."""
    def status(x: dict) -> str:
        if x["seeds_holding"] == x["n_seeds"]:
            return f"held on every seed ({x['mean_difference']:+.3f})"
        if x["holds_on_mean"]:
            return f"held on the mean only ({x['mean_difference']:+.3f}; {x['seeds_holding']}/{x['n_seeds']} seeds)"
        return f"did not hold ({x['mean_difference']:+.3f}; {x['seeds_holding']}/{x['n_seeds']} seeds)"

    text = (f"After distillation, the rise in hallucination on teacher-only people "
            f"{status(c['hallucination_up_on_teacher_only'])} and the rise in abstention on student-only people "
            f"{status(c['abstention_up_on_student_only'])}. RL's cut of that hallucination "
            f"{status(c['rl_cuts_hallucination_on_teacher_only'])} and its cut of that abstention "
            f"{status(c['rl_cuts_abstention_on_student_only'])}.")
    if "kl_hallucination_up_on_teacher_only" in c:
        text += (f" After token-level distillation, the rise in hallucination on teacher-only people "
                 f"{status(c['kl_hallucination_up_on_teacher_only'])} and the rise in abstention on student-only "
                 f"people {status(c['kl_abstention_up_on_student_only'])}.")
    return text


def results_markdown(result: dict) -> str:
    d, agg, seeds = result["distill"], result["aggregate"], result["seeds"]
    n_eval = {g: seeds[0]["models"]["teacher"][g]["n"] for g in GROUPS}
    lines = ["# Distillation study", "",
             f"{len(seeds)} seed(s) {d['seeds']}; mean ± sample std over seeds. Evaluation questions per group and seed: "
             + ", ".join(f"{g} {n_eval[g]}" for g in GROUPS) + ". People per group and split (seed "
             f"{seeds[0]['seed']}): " + "; ".join(f"{g} " + "/".join(str(seeds[0]['people'][g][s]) for s in SPLITS)
                                                  for g in GROUPS) + " (teacher SFT / distillation / RL / evaluation).",
             f"Teacher samples at temperature {d['teacher_temperature']:g}; repair reward: correct {d['correct_reward']:g}, "
             f"\"I don't know\" {d['abstain_reward']:g}, wrong {d['wrong_reward']:g}.", ""]
    for g in GROUPS:
        lines += [f"## {g} people", "", "| model | accuracy | abstention | hallucination |", "|---|---|---|---|"]
        for m in agg:
            lines.append(f"| {LABELS[m]} | " + " | ".join(_cell(agg[m][g][k]) for k, _ in METRICS) + " |")
        lines.append("")
    lines += ["## The teacher's distillation answers (sampled), by group", "",
              "| group | correct | I don't know | wrong |", "|---|---|---|---|"]
    for g in GROUPS:
        vals = [mean_std([r["teacher_distill_answers"][g][c] for r in seeds]) for c in ab.CLASSES]
        lines.append(f"| {g} | " + " | ".join(_cell(v) for v in vals) + " |")
    c = result["claim"]
    lines += ["", "## The claim", "", claim_sentence(c), ""]
    for name, x in c.items():
        lines.append(f"- {name.replace('_', ' ')}: {x['higher']} − {x['lower']} on {x['group']} {x['metric']} = "
                     f"{x['mean_difference']:+.3f} (holds on {x['seeds_holding']}/{x['n_seeds']} seeds)")
    lines += ["", "Wall time (s): " + "; ".join(
        f"seed {r['seed']}: " + ", ".join(f"{k} {v:.0f}" for k, v in r["timings_seconds"].items()) for r in seeds)
        + f"; total {result['total_seconds']:.0f}", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    agg = result["aggregate"]
    models = list(agg)
    fig, axes = plt.subplots(1, len(GROUPS), figsize=(16, 4.5), sharey=True)
    w = 0.27
    x = range(len(models))
    for ax, g in zip(axes, GROUPS):
        for k, (key, _) in enumerate(METRICS):
            ax.bar([i + (k - 1) * w for i in x], [agg[m][g][key]["mean"] for m in models], w,
                   yerr=[agg[m][g][key]["std"] for m in models], capsize=2, label=key)
        ax.set_xticks(list(x), [m.replace("_", "\n") for m in models], fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{g.replace('_', '-')} people")
    axes[0].set_ylabel(f"rate on held-out questions (mean ± std, {len(result['seeds'])} seeds)")
    axes[0].legend(fontsize=8)
    save_figure(fig, path, "teacher, student before and after distillation, and after RL, by who read about the person")


STUDY = Study("distill", DistillConfig, run_distill, results_markdown, ("results.md", "results.json", "distill.png"))
