"""The evaluation harness: a registry of tasks, each with its prompt format, scoring and metrics.

A task builds two lists of :class:`EvalItem` from a :class:`TaskContext` (the run's synthetic world,
a seed, a size): ``train`` (the pool few-shot examples come from) and ``test`` (what is scored).
How an item is scored follows from the task's ``kind``:

- ``generate``: greedy decoding until a newline; metrics compare the output with ``item.target``
  (exact match, edit distance, digit credit, ROUGE-L, BLEU, win rate under a judge) or score the
  target by teacher forcing (``logprob_per_token``).
- ``choice``: log-likelihood of every option as the continuation; ``accuracy`` picks the highest
  total, ``accuracy_norm`` the highest per byte.
- ``bpb``: bits per byte of ``item.target`` given the prompt (held-out text).

Adding a task::

    @register_task("my_task", kind="generate", metrics=("exact_match",), description="...")
    def my_task(ctx: TaskContext) -> TaskData:
        ...

A prompt and its target are joined by ``join`` (one space, as the generators' ``Example.text``),
and shots are separated by ``separator`` (a newline, as the QA lines of the pretraining corpus).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from typing import Callable

from scalelab.data import world as W
from scalelab.data.generators import generate
from scalelab.data.world import ATTRIBUTES, render_qa
from scalelab.errors import ScalelabError
from scalelab.evals import metrics as M
from scalelab.evals.answer_scorer import train_scorer
from scalelab.evals.fewshot import build_prompt, draw_shots

KINDS = ("generate", "choice", "bpb")
GENERATE_METRICS = ("exact_match", "edit_distance", "digit_credit", "logprob_per_token", "rouge_l", "bleu", "win_rate")
METRICS_BY_KIND = {"generate": GENERATE_METRICS, "choice": ("accuracy", "accuracy_norm"), "bpb": ("bits_per_byte",)}
IDK = "I don't know"


@dataclass(eq=False)  # items compare by identity: the few-shot no-leak check relies on it
class EvalItem:
    prompt: str
    target: str
    choices: tuple[str, ...] = ()
    label: int = -1
    group: object = None  # items of one group (a person) never serve as each other's shots
    meta: dict = field(default_factory=dict)

    @property
    def answer(self) -> str:
        return self.choices[self.label] if self.choices else self.target


@dataclass
class TaskData:
    train: list[EvalItem]
    test: list[EvalItem]
    note: str = ""  # which split was scored, when that depends on the world


@dataclass
class TaskContext:
    world: object = None  # scalelab.data.world.World, when the run was trained on one
    seed: int = 0
    n: int = 100


# A judge scores candidates against references: 1 right, 0 wrong, anything in between allowed.
Judge = Callable[[list[str], list[str], list[str]], list[float]]


@dataclass
class TaskSpec:
    name: str
    kind: str
    metrics: tuple[str, ...]
    description: str
    build: Callable[[TaskContext], TaskData]
    separator: str = "\n"
    join: str = " "
    max_new_tokens: int = 16
    needs_world: bool = False
    postprocess: Callable[[str], str] | None = None

    def render_shot(self, item: EvalItem) -> str:
        return item.prompt + self.join + item.answer


_TASKS: dict[str, TaskSpec] = {}


def register_task(name: str, *, kind: str, metrics: tuple[str, ...], description: str, **options):
    """Decorator adding a task builder under ``name``; a name taken twice is a programming error."""
    if kind not in KINDS:
        raise ValueError(f"task kind must be one of {KINDS}, got {kind!r}")
    bad = [m for m in metrics if m not in METRICS_BY_KIND[kind]]
    if bad:
        raise ValueError(f"metric {bad[0]!r} does not apply to a {kind} task (use {METRICS_BY_KIND[kind]})")

    def wrap(fn):
        if name in _TASKS:
            raise ValueError(f"eval task '{name}' registered twice")
        _TASKS[name] = TaskSpec(name, kind, tuple(metrics), description, fn, **options)
        return fn

    return wrap


def available_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str) -> TaskSpec:
    if name not in _TASKS:
        raise ScalelabError(f"unknown eval task '{name}' (available: {', '.join(available_tasks())})")
    return _TASKS[name]


def parse_tasks(text: str) -> list[str]:
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if not names:
        raise ScalelabError("--tasks needs at least one task name (see --list-tasks)")
    for name in names:
        get_task(name)
    return list(dict.fromkeys(names))


def build_task(name: str, ctx: TaskContext) -> TaskData:
    spec = get_task(name)
    if spec.needs_world and ctx.world is None:
        raise ScalelabError(f"eval task '{name}' needs the run's synthetic world (world.json); "
                            "this model was not trained on one (or the folder lacks it: re-export with scalelab export)")
    if not isinstance(ctx.n, int) or ctx.n < 1:
        raise ScalelabError(f"--n must be a count >= 1, got {ctx.n!r}")
    data = spec.build(ctx)
    if not data.test:
        raise ScalelabError(f"eval task '{name}' has no test items in this world")
    return data


# -- judges -----------------------------------------------------------------------------------------------------


def _plain(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def rule_judge(prompts: list[str], references: list[str], candidates: list[str]) -> list[float]:
    """1 for the reference answer (case, spacing and a final period ignored), 0.5 for "I don't know", else 0."""
    out = []
    for ref, cand in zip(references, candidates):
        c = _plain(M.normalize_answer(cand))
        out.append(1.0 if c == _plain(ref) else 0.5 if c in ("i don't know", "i do not know") else 0.0)
    return out


def learned_judge(steps: int = 400, seed: int = 0) -> Judge:
    """The trigram judge of scalelab/experiments/answer_scorer.py: agree 1, abstain 0.5, disagree 0."""
    scorer, _ = train_scorer(steps=steps, seed=seed)
    value = {"agree": 1.0, "abstain": 0.5, "disagree": 0.0}

    def judge(prompts, references, candidates):
        return [value[label] for label in scorer.judge(list(references), [M.normalize_answer(c) for c in candidates])]

    return judge


# -- running ----------------------------------------------------------------------------------------------------


def shot_pool(train: list[EvalItem], item: EvalItem) -> list[EvalItem]:
    """The train items that may be shots for ``item``: another question about the same person would
    give its answer away in a paraphrase, so the item's group is left out."""
    if item.group is None:
        return train
    return [x for x in train if x.group != item.group]


def evaluate_task(lm, name: str, data: TaskData, shots: int, seed: int = 0, judge: Judge | None = None,
                  baseline: str = IDK, keep_samples: int = 3) -> dict:
    """Every metric of task ``name`` at one shot count, as means over ``data.test``."""
    spec = get_task(name)
    prompts = []
    for i, item in enumerate(data.test):
        chosen = draw_shots(shot_pool(data.train, item), item, shots, seed, i, text_of=spec.render_shot)
        prompts.append(build_prompt(chosen, item, spec.render_shot, spec.separator))
    too_long = sum(len(lm.prompt_ids(p)) + 1 >= lm.context_length for p in prompts)
    out: dict = {"n": len(data.test), "prompts_cut_to_context": too_long}
    if spec.kind == "choice":
        _score_choices(lm, spec, data.test, prompts, out)
    elif spec.kind == "bpb":
        lps = lm.continuation_logprobs([(p, spec.join + it.target) for p, it in zip(prompts, data.test)])
        bits = sum(-sum(lp) for lp in lps) / math.log(2)
        n_bytes = sum(len((spec.join + it.target).encode("utf-8")) for lp, it in zip(lps, data.test) if lp)
        out["bits_per_byte"] = bits / n_bytes if n_bytes else float("nan")
    else:
        _score_generations(lm, spec, data.test, prompts, out, judge or rule_judge, baseline, keep_samples)
    return out


def _score_choices(lm, spec: TaskSpec, items, prompts, out: dict) -> None:
    pairs = [(p, spec.join + c) for p, it in zip(prompts, items) for c in it.choices]
    lps = lm.continuation_logprobs(pairs)
    raw, norm, k = [], [], 0
    for it in items:
        lls = [sum(lp) for lp in lps[k : k + len(it.choices)]]
        k += len(it.choices)
        raw.append(float(M.choice_index(lls, list(it.choices)) == it.label))
        norm.append(float(M.choice_index(lls, [spec.join + c for c in it.choices], "bytes") == it.label))
    out["accuracy"], out["accuracy_norm"] = M.nanmean(raw), M.nanmean(norm)


def _score_generations(lm, spec: TaskSpec, items, prompts, out: dict, judge: Judge, baseline: str, keep: int) -> None:
    outputs = [lm.generate(p, spec.max_new_tokens) for p in prompts]
    if spec.postprocess:
        outputs = [spec.postprocess(o) for o in outputs]
    refs = [it.target for it in items]
    per_item = {
        "exact_match": lambda o, r: M.exact_match(o, r),
        "edit_distance": lambda o, r: M.normalized_edit_distance(o, r),
        "digit_credit": lambda o, r: M.digit_credit(o, r),
        "rouge_l": lambda o, r: M.rouge_l(o.strip(), r),
    }
    for m in spec.metrics:
        if m in per_item:
            out[m] = M.nanmean(per_item[m](o, r) for o, r in zip(outputs, refs))
    if "bleu" in spec.metrics:
        out["bleu"] = M.bleu([o.strip() for o in outputs], refs)
    if "logprob_per_token" in spec.metrics:
        lps = lm.continuation_logprobs([(p, spec.join + r) for p, r in zip(prompts, refs)])
        out["logprob_per_token"] = M.nanmean(sum(lp) / len(lp) if lp else float("nan") for lp in lps)
    if "win_rate" in spec.metrics:
        plain = [it.prompt for it in items]
        mine, theirs = judge(plain, refs, outputs), judge(plain, refs, [baseline] * len(refs))
        out["win_rate"] = M.win_rate(mine, theirs)
    out["samples"] = [{"prompt": it.prompt, "target": it.target, "output": o} for it, o in zip(items[:keep], outputs)]


def run_eval(lm, task_names: list[str], shots: list[int], ctx: TaskContext, judge: Judge | None = None,
             progress: Callable[[str], None] | None = None) -> dict:
    """Every task at every shot count: {"tasks": {task: {"kind", "note", "shots": {"0": metrics, ...}}}}."""
    result = {"model": lm.name, "n": ctx.n, "seed": ctx.seed, "shots": list(shots), "tasks": {}}
    for name in task_names:
        spec = get_task(name)
        data = build_task(name, ctx)
        entry = {"kind": spec.kind, "metrics": list(spec.metrics), "note": data.note, "shots": {}}
        for k in shots:
            entry["shots"][str(k)] = evaluate_task(lm, name, data, k, ctx.seed, judge)
            if progress:
                progress(f"{name} {k}-shot: " + ", ".join(f"{m} {entry['shots'][str(k)][m]:.3f}" for m in spec.metrics))
        result["tasks"][name] = entry
    return result


def format_table(result: dict) -> str:
    """One line per (task, shots) with that task's metrics, as a Markdown table."""
    lines = ["| task | shots | n | metrics |", "|---|---|---|---|"]
    for name, entry in result["tasks"].items():
        for k, m in entry["shots"].items():
            vals = ", ".join(f"{key} {m[key]:.3f}" for key in entry["metrics"])
            lines.append(f"| {name} | {k} | {m['n']} | {vals} |")
    return "\n".join(lines)


# -- the built-in tasks -------------------------------------------------------------------------------------------


def _sample(items: list, n: int, seed: int, tag: str) -> list:
    items = list(items)
    random.Random(f"{tag}-{seed}").shuffle(items)
    return items[:n]


def _world_qa_splits(world):
    """(shot pool, test pairs, note): held-out people's QA when the world has them, else the seen QA."""
    pool = world.qa_pairs(world.qa_train_people)
    test = world.eval_qa()
    if test:
        return pool, test, "test: people whose QA pretraining never showed; shots: QA pretraining showed"
    return pool, world._one_question_each(world.qa_train_people, f"eval-qa-{world.cfg.seed}"), \
        "test: QA pretraining showed (the world holds no held-out people); shots: other people"


def _qa_item(q) -> EvalItem:
    return EvalItem(render_qa(q.question), q.answer, group=q.person_id, meta={"attribute": q.attribute})


@register_task("world_qa", kind="generate", metrics=("exact_match", "edit_distance", "logprob_per_token"),
               description="QA about the synthetic world's people, greedy answer vs the attribute", needs_world=True)
def _world_qa(ctx: TaskContext) -> TaskData:
    pool, test, note = _world_qa_splits(ctx.world)
    return TaskData([_qa_item(q) for q in pool], [_qa_item(q) for q in _sample(test, ctx.n, ctx.seed, "world_qa")], note)


@register_task("world_qa_judged", kind="generate", metrics=("win_rate", "exact_match"),
               description="world QA, win rate under a judge vs a baseline that always says \"I don't know\"",
               needs_world=True)
def _world_qa_judged(ctx: TaskContext) -> TaskData:
    return _world_qa(ctx)


# A format pretraining never shows: what the shots teach is the mapping from this layout to a fact
# the model has read, so zero shots measure format transfer and more shots in-context learning.
_CARD_LABELS = {"birth_date": "birth date", "birth_city": "birth city", "university": "university",
                "major": "major", "employer": "employer", "employer_city": "work city"}


@register_task("world_facts_newformat", kind="generate", metrics=("exact_match", "edit_distance", "logprob_per_token"),
               description="facts of people whose QA pretraining showed, asked in a new format: 'Name -> birth city:'",
               needs_world=True)
def _world_facts_newformat(ctx: TaskContext) -> TaskData:
    world = ctx.world
    people = world.qa_train_people or [p.id for p in world.people if p.known]

    def item(pid, attr):
        person = world.people[pid]
        return EvalItem(f"{person.name} -> {_CARD_LABELS[attr]}:", person.attribute(attr), group=pid,
                        meta={"attribute": attr})


    pairs = [(pid, attr) for pid in people for attr in ATTRIBUTES]
    test = _sample(pairs, ctx.n, ctx.seed, "world_facts_newformat")
    return TaskData([item(*q) for q in pairs], [item(*q) for q in test],
                    "people whose QA pretraining showed, in a layout it never showed; shots: other people")


def _attribute_values(world, attribute: str, rng: random.Random, k: int, answer: str) -> list[str]:
    pools = {"birth_city": W.CITIES, "employer_city": W.CITIES, "university": W.UNIVERSITIES, "major": W.MAJORS,
             "employer": W.EMPLOYERS}
    if attribute in pools:
        return rng.sample([v for v in pools[attribute] if v != answer], k)
    dates = sorted({p.birth_date for p in world.people} - {answer})
    return rng.sample(dates, min(k, len(dates)))


@register_task("world_qa_mc", kind="choice", metrics=("accuracy", "accuracy_norm"),
               description="world QA as 4-way multiple choice over the attribute's values, by log-likelihood",
               needs_world=True)
def _world_qa_mc(ctx: TaskContext) -> TaskData:
    pool, test, note = _world_qa_splits(ctx.world)
    rng = random.Random(f"world_qa_mc-{ctx.seed}")

    def item(q):
        options = _attribute_values(ctx.world, q.attribute, rng, 3, q.answer) + [q.answer]
        rng.shuffle(options)
        base = _qa_item(q)
        base.choices, base.label = tuple(options), options.index(q.answer)
        return base

    return TaskData([item(q) for q in pool], [item(q) for q in _sample(test, ctx.n, ctx.seed, "world_qa_mc")], note)


def _arithmetic(task: str, ctx: TaskContext, digits: int) -> TaskData:
    seen = set()
    if ctx.world is not None:  # problems pretraining showed are no test of arithmetic
        seen = {e.prompt for examples in ctx.world.task_examples().values() for e in examples}
    train = generate(task, max(200, ctx.n), seed=2 * ctx.seed + 1, digits=digits)
    test = [e for e in generate(task, 4 * ctx.n, seed=2 * ctx.seed + 2, digits=digits) if e.prompt not in seen][: ctx.n]
    return TaskData([EvalItem(e.prompt, e.answer) for e in train], [EvalItem(e.prompt, e.answer) for e in test],
                    f"{digits}-digit operands; test problems absent from the pretraining corpus")


@register_task("addition", kind="generate", metrics=("exact_match", "edit_distance", "digit_credit", "logprob_per_token"),
               description="3-digit addition (generator 'addition'), exact match and continuous metrics")
def _addition(ctx: TaskContext) -> TaskData:
    return _arithmetic("addition", ctx, 3)


@register_task("multiplication", kind="generate",
               metrics=("exact_match", "edit_distance", "digit_credit", "logprob_per_token"),
               description="2-digit multiplication (generator 'multiplication'), exact match and continuous metrics")
def _multiplication(ctx: TaskContext) -> TaskData:
    return _arithmetic("multiplication", ctx, 2)


# Sentences of a biography end in a period after a lower-case letter or a digit; a middle initial
# ("Aria B. Drummond") has an upper-case letter before its period and is no sentence end.
_SENTENCE_END = re.compile(r"(?<=[a-z0-9])\.(?:\s+|$)")


def split_sentences(text: str) -> list[str]:
    parts = [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]
    return [p + "." for p in parts]


def _fresh_bios(world, seed: int) -> list[tuple[int, str]]:
    """Biographies of known people in new random wordings (a stream pretraining never drew from)."""
    rng = random.Random(f"eval-bios-{seed}")
    return [(p.id, world.biography(p, rng)) for p in world.people if p.known]


def _bio_splits(world, seed: int):
    bios = _fresh_bios(world, seed)
    held = set(world.qa_eval_people) or {i for i, _ in bios}
    test = [b for b in bios if b[0] in held]
    return bios, test


@register_task("bio_bpb", kind="bpb", metrics=("bits_per_byte",), separator="\n", join="",
               description="bits per byte of freshly worded biographies of the world's people (held-out text)",
               needs_world=True)
def _bio_bpb(ctx: TaskContext) -> TaskData:
    bios, test = _bio_splits(ctx.world, ctx.seed)
    return TaskData([EvalItem("", t, group=i) for i, t in bios],
                    [EvalItem("", t, group=i) for i, t in _sample(test, ctx.n, ctx.seed, "bio_bpb")],
                    "biographies worded by a random stream pretraining never used")


def first_sentence(text: str) -> str:
    parts = split_sentences(text.split("\n", 1)[0])
    return parts[0] if parts else text.strip()


@register_task("bio_generation", kind="generate", metrics=("rouge_l", "bleu"), max_new_tokens=40,
               description="continue a biography by one sentence; ROUGE-L and BLEU against the corpus sentence",
               needs_world=True, postprocess=first_sentence)
def _bio_generation(ctx: TaskContext) -> TaskData:
    bios, test = _bio_splits(ctx.world, ctx.seed)

    def item(pid, text):
        sentences = split_sentences(text)
        return EvalItem(sentences[0], sentences[1], group=pid)

    return TaskData([item(*b) for b in bios], [item(*b) for b in _sample(test, ctx.n, ctx.seed, "bio_generation")],
                    "prompt: a biography's first sentence; reference: its second")
