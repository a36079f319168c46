"""``scalelab experiments reasoning``: chain-of-thought warm start, RL with verifiable rewards, test-time
compute and tool use, on the tasks of :mod:`scalelab.tasks` (arithmetic, countdown, 4x4 sudoku).

One small GPT with a byte (or character) tokenizer, so every digit is one token, starts from a
seeded random initialisation: a base pretrained on the world corpus knows no arithmetic, and the
study is about what post-training on the tasks teaches, so both SFT conditions start from the
same untrained weights (``base`` below).

1. Warm start. SFT on the answer alone ("Answer: 1776") vs SFT on the worked steps then the answer,
   at EQUAL TRAINING FLOPs. Batches hold one task each and are padded to their longest row; a
   batch of ``b`` rows padded to ``T`` input tokens costs ``b * T * flops_per_token(T)``
   (GPT.flops_per_token: forward + backward, attention included). The CoT condition is the config's
   [sft] stage (``sft.steps`` batches of ``sft.batch_size``, [sft.optim]); the answer-only condition
   runs as many of its own (shorter) batches as it takes to reach the same FLOPs, with the same
   settings. Accuracy (greedy, verified) per task and difficulty.
2. RL. The config's [grpo] stage (steps, prompts_per_step, group_size, kl_coef, clip, temperature,
   the reward weights, [grpo.optim], ...) from the CoT model, one run per task, reward
   ``make_reward`` (correct / formatted / wrong / malformed): pass@1 of the rollouts at every step
   and greedy pass@1 on ``grpo.eval_problems`` held-out problems every ``grpo.eval_every`` steps.
   The study sets the problems and each task's ``max_new_tokens`` (room for its longest worked reply).
3. Test-time compute (reasoning_ttc.py): accuracy against the thinking-token budget, and against
   the number of samples with majority vote vs best-of-N picked by the verifier.
4. Tool use (reasoning_tools.py): SFT ([sft], for ``tool_sft_steps``) on calculator-call traces, accuracy
   with and without the tool.
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from scalelab.errors import ScalelabError, check_config
from scalelab.evals.plots import label_fraction_axes, plt, save_figure
from scalelab.experiments import reasoning_tools as tools
from scalelab.experiments import reasoning_ttc as ttc
from scalelab.experiments.base_run import open_study_folder
from scalelab.experiments.study import Study
from scalelab.infer.chat import chat_stop_ids, render_chat
from scalelab.infer.engine import Engine, GenerationParams
from scalelab.model.gpt import GPT
from scalelab.posttrain import common
from scalelab.posttrain.data import pad_rows
from scalelab.posttrain.grpo import trainer_from_config
from scalelab.posttrain.sft import sft_on_batches
from scalelab.runtime import resolve_device, seed_everything
from scalelab.tasks import get_task
from scalelab.tasks.answer_format import make_reward, render_reply, verify
from scalelab.tokenizer import ByteTokenizer, CharTokenizer
from scalelab.train.optim import lr_at, set_lr

SECTION = "reasoning"
CONDITIONS = ("answer_only", "cot")


def _default_difficulties() -> dict[str, list[int]]:
    return {"addition": [1, 2, 3], "multiplication": [1, 2], "expression": [1, 2], "countdown": [2, 3], "sudoku": [4, 5]}


@dataclass
class ReasoningConfig:
    out_dir: str = "runs/reasoning"
    tasks: list[str] = field(default_factory=lambda: ["addition", "multiplication", "expression", "countdown", "sudoku"])
    difficulties: dict[str, list[int]] = field(default_factory=_default_difficulties)  # per task
    train_per_difficulty: int = 2000  # SFT problems per (task, difficulty), before held-out prompts are removed
    eval_per_difficulty: int = 48
    # Warm start: both conditions from the same init; the CoT one is the [sft] stage as configured, the
    # answer-only one matches its FLOPs. RL: the [grpo] stage from the CoT model, one run per task.
    rl_tasks: list[str] = field(default_factory=list)  # empty: every task
    # pass@1 as the mean over this many samples per held-out problem at grpo.temperature (0: greedy only);
    # the same seeds at every evaluation, so the curve moves only because the policy does
    rl_eval_samples: int = 8
    # test-time compute
    ttc_tasks: list[str] = field(default_factory=list)  # empty: every task
    ttc_from: str = "cot"  # the model measured: "cot" (the SFT warm start) or "rl" (each task's RL policy)
    ttc_problems: int = 32  # per task, spread over its difficulties
    thinking_budgets: list[int] = field(default_factory=lambda: [0, 8, 16, 32, 64, 128, 256])
    ttc_samples: int = 16
    sample_counts: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    ttc_temperature: float = 0.8
    # tool use
    tool_tasks: list[str] = field(default_factory=lambda: ["addition", "multiplication", "expression"])
    tool_sft_steps: int = 120  # the [sft] stage, for this many steps, on calculator-call traces
    tool_eval_per_difficulty: int = 24


# The stage settings this study once copied into [reasoning], and where they live now (read, with a
# FutureWarning, for one release). The tool SFT's own rate is gone: it runs [sft.optim] like the warm start.
MOVED_KEYS = {"sft_steps": "sft.steps", "sft_batch_size": "sft.batch_size", "sft_lr": "sft.optim.lr",
              "sft_warmup_steps": "sft.optim.warmup_steps", "tool_lr": "sft.optim.lr", "rl_steps": "grpo.steps",
              "rl_prompts": "grpo.prompts_per_step", "group_size": "grpo.group_size", "rl_lr": "grpo.optim.lr",
              "kl_coef": "grpo.kl_coef", "clip": "grpo.clip", "loss_norm": "grpo.loss_norm",
              "dynamic_sampling": "grpo.dynamic_sampling", "temperature": "grpo.temperature",
              "rl_eval_every": "grpo.eval_every", "rl_eval_problems": "grpo.eval_problems",
              **{f"reward_{k}": f"grpo.reward_{k}" for k in ("correct", "formatted", "wrong", "malformed")}}


def validate(r: ReasoningConfig, cfg) -> dict:
    """The task objects by name; a ScalelabError naming the first bad key otherwise."""
    if not r.tasks:
        raise ScalelabError("invalid config: reasoning.tasks must name at least one task")
    tasks = {name: get_task(name) for name in r.tasks}
    for name, task in tasks.items():
        ds = r.difficulties.get(name)
        if not ds:
            raise ScalelabError(f"invalid config: reasoning.difficulties has no list for task '{name}'")
        for d in ds:
            task.check_difficulty(d)
    for key in ("rl_tasks", "ttc_tasks", "tool_tasks"):
        bad = [t for t in getattr(r, key) if t not in tasks]
        if bad:
            raise ScalelabError(f"invalid config: reasoning.{key} names {bad[0]!r}, which is not in reasoning.tasks")
    g = cfg.grpo
    checks = [
        (r.train_per_difficulty >= 1 and r.eval_per_difficulty >= 1, "reasoning.train_per_difficulty and eval_per_difficulty >= 1"),
        (r.rl_eval_samples >= 0, "reasoning.rl_eval_samples must be >= 0"),
        (g.eval_problems >= 1, "grpo.eval_problems must be >= 1: the study scores every RL run on held-out problems"),
        (g.reward_wrong < g.reward_correct, "grpo.reward_wrong must be below grpo.reward_correct"),
        (r.ttc_from in ("cot", "rl"), "reasoning.ttc_from must be 'cot' or 'rl'"),
        (r.ttc_problems >= 1 and r.thinking_budgets and all(b >= 0 for b in r.thinking_budgets),
         "reasoning.ttc_problems >= 1 and thinking_budgets a non-empty list of budgets >= 0"),
        (1 <= r.ttc_samples <= 64 and r.sample_counts and all(1 <= n <= r.ttc_samples for n in r.sample_counts),
         "reasoning.ttc_samples in 1..64 and every sample_counts value in 1..ttc_samples"),
        (r.ttc_temperature > 0, "reasoning.ttc_temperature must be positive"),
        (r.tool_sft_steps >= 1 and r.tool_eval_per_difficulty >= 1,
         "reasoning.tool_sft_steps and tool_eval_per_difficulty must be positive"),
    ]
    check_config(checks)
    return tasks


# -- data ---------------------------------------------------------------------------------------------------


def chat_prompt(tokenizer, problem) -> list[int]:
    return render_chat(tokenizer, [{"role": "user", "content": problem.prompt}])


def sft_row(tokenizer, problem, with_thinking: bool) -> tuple[list[int], list[int]]:
    """(ids, loss mask): the chat prompt, then the reply and its end marker, which carry the loss."""
    p = chat_prompt(tokenizer, problem)
    y = tokenizer.encode(render_reply(problem, with_thinking)) + [tokenizer.token_id("<|assistant_end|>")]
    return p + y, [0] * len(p) + [1] * len(y)


def problem_sets(r: ReasoningConfig, tasks: dict, seed: int, rl_prompts: int) -> dict:
    """Per task: held-out "eval" problems by difficulty, an "rl" prompt pool, and "train" problems
    (generated with other seeds, every prompt of the held-out and RL sets removed)."""
    out = {}
    for name, task in tasks.items():
        ev = {d: task.generate(r.eval_per_difficulty, seed * 10 + 1, d) for d in r.difficulties[name]}
        rl = [p for d in r.difficulties[name] for p in task.generate(max(64, rl_prompts * 8), seed * 10 + 2, d)]
        held = {p.prompt for ps in ev.values() for p in ps} | {p.prompt for p in rl}
        train = [p for d in r.difficulties[name] for p in task.generate(r.train_per_difficulty, seed * 10, d)
                 if p.prompt not in held]
        if not train:
            raise ScalelabError(f"task '{name}': every training problem is also a held-out one; raise its difficulty")
        out[name] = {"eval": ev, "rl": rl, "train": train}
    return out


def spread(eval_sets: dict, n: int) -> list:
    """Up to ``n`` held-out problems taken evenly across difficulties (the first of each, in turn)."""
    per = max(1, -(-n // len(eval_sets)))
    return [p for ps in eval_sets.values() for p in ps[:per]][:n]


def build_tokenizer(kind: str, texts: list[str]):
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        # the alphabet also covers what a tool may answer with (digits, sign, decimal point, error words)
        return CharTokenizer.from_text(texts + ["0123456789-.e:+*/() abcdefghijklmnopqrstuvwxyz\n"])
    raise ScalelabError(f"the reasoning study needs tokenizer.kind = 'byte' or 'char' (one token per digit), got {kind!r}")


# -- equal-compute SFT --------------------------------------------------------------------------------------


def batch_flops(rows: int, length: int, flops_per_token) -> int:
    """Training FLOPs of one batch of ``rows`` rows padded to ``length`` tokens: the model reads
    ``length - 1`` inputs per row (the last token is only a target)."""
    return rows * (length - 1) * flops_per_token(length - 1)


def batch_stream(lengths_by_task: dict[str, list[int]], batch_size: int, seed: int):
    """Endless batches of row indices (indices into the concatenation of the tasks' rows, in task
    order). Each epoch shuffles every task's rows, cuts them into batches of one task (so padding
    follows that task's lengths), and shuffles the batches."""
    starts, at = {}, 0
    for name, lengths in lengths_by_task.items():
        starts[name], at = at, at + len(lengths)
    epoch = 0
    while True:
        rng = random.Random(f"reasoning-batches-{seed}-{epoch}")
        batches = []
        for name, lengths in lengths_by_task.items():
            idx = [starts[name] + i for i in range(len(lengths))]
            rng.shuffle(idx)
            size = min(batch_size, len(idx))
            batches += [idx[i : i + size] for i in range(0, len(idx) - size + 1, size)]
        rng.shuffle(batches)
        yield from batches
        epoch += 1


def plan(lengths_by_task: dict[str, list[int]], batch_size: int, seed: int, flops_per_token, steps: int = 0,
         flops_budget: int = 0) -> dict:
    """The batches of one SFT run: ``steps`` of them, or the fewest whose FLOPs reach ``flops_budget``."""
    if (steps > 0) == (flops_budget > 0):
        raise ScalelabError("an SFT plan needs exactly one of steps and a FLOP budget")
    flat = [n for lengths in lengths_by_task.values() for n in lengths]
    batches, total, tokens, padded = [], 0, 0, 0
    for b in batch_stream(lengths_by_task, batch_size, seed):
        length = max(flat[i] for i in b)
        batches.append(b)
        total += batch_flops(len(b), length, flops_per_token)
        tokens += sum(flat[i] for i in b)
        padded += len(b) * length
        if (steps and len(batches) == steps) or (flops_budget and total >= flops_budget):
            break
    return {"batches": batches, "steps": len(batches), "flops": total, "tokens": tokens, "padded_tokens": padded}


def equal_compute_plans(lengths: dict[str, dict[str, list[int]]], batch_size: int, cot_steps: int, seed: int,
                        flops_per_token) -> dict[str, dict]:
    """The CoT run's ``cot_steps`` batches, and the answer-only run's batches up to the same FLOPs."""
    cot = plan(lengths["cot"], batch_size, seed, flops_per_token, steps=cot_steps)
    ans = plan(lengths["answer_only"], batch_size, seed, flops_per_token, flops_budget=cot["flops"])
    return {"cot": cot, "answer_only": ans}


def sft_train(init, tokenizer, rows: list, batches: list, cfg, log_path: Path, desc: str):
    """A copy of ``init`` trained on ``rows`` batch by batch (loss on reply tokens only) with the [sft] stage's
    settings, for as many steps as ``batches`` holds (a warmup longer than the run is cut to fit); (model, losses)."""
    tcfg = common.stage_train_config(cfg.train, cfg.sft)
    tcfg = replace(tcfg, steps=len(batches),
                   optim=replace(tcfg.optim, warmup_steps=min(tcfg.optim.warmup_steps, max(0, len(batches) - 1))))

    def batch(step):
        chosen = [rows[i] for i in batches[step]]
        return pad_rows(chosen, max(len(c[0]) for c in chosen), tokenizer.bos_id)

    return sft_on_batches(init, batch, tcfg, log_path, desc)


# -- evaluation ---------------------------------------------------------------------------------------------


def greedy_replies(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=chat_stop_ids(tokenizer))
    outs = Engine(model, tokenizer, max_batch=max(1, min(64, len(prompts)))).generate(prompts, params)
    return [o.text for o in outs]


def sampled_pass_at_1(model, tokenizer, problems: list, max_new_tokens: int, n: int, temperature: float,
                      seed: int) -> float:
    """Mean correctness of ``n`` samples per problem at ``temperature``: pass@1 of the sampling policy."""
    engine = Engine(model, tokenizer, max_batch=max(1, min(128, len(problems) * n)))
    reqs = [engine.submit(chat_prompt(tokenizer, p), GenerationParams(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=0, top_p=1.0, seed=seed * 7919 + i, n=n,
        stop_token_ids=chat_stop_ids(tokenizer))) for i, p in enumerate(problems)]
    while not all(r.done for r in reqs):
        engine.step()
    return sum(verify(p, c.text)["correct"] for p, r in zip(problems, reqs) for c in r.wait()) / (len(problems) * n)


def verified(model, tokenizer, problems: list, max_new_tokens: int) -> list[dict]:
    texts = greedy_replies(model, tokenizer, [chat_prompt(tokenizer, p) for p in problems], max_new_tokens)
    return [verify(p, t) | {"text": t} for p, t in zip(problems, texts)]


def accuracy_by_difficulty(model, tokenizer, eval_sets: dict, max_new_tokens: int) -> dict:
    """{difficulty: {"accuracy", "formatted", "n"}} plus "all", and the per-problem verdicts."""
    problems = [p for ps in eval_sets.values() for p in ps]
    v = verified(model, tokenizer, problems, max_new_tokens)
    out, at, flags = {}, 0, {}
    for d, ps in eval_sets.items():
        part = v[at : at + len(ps)]
        at += len(ps)
        flags[d] = [x["correct"] for x in part]
        out[str(d)] = {"accuracy": sum(x["correct"] for x in part) / len(part),
                       "formatted": sum(x["formatted"] for x in part) / len(part), "n": len(part)}
    out["all"] = {"accuracy": sum(x["correct"] for x in v) / len(v), "n": len(v),
                  "example": {"prompt": problems[-1].prompt, "reply": v[-1]["text"]}}
    return out, flags


# -- RL -----------------------------------------------------------------------------------------------------


def rl_task(init, tokenizer, sets: dict, r: ReasoningConfig, g, max_new_tokens: int, seed: int, log_path: Path):
    """The [grpo] stage ``g`` on one task's RL pool; (policy, history with rollout and held-out pass@1)."""
    reward = make_reward(correct=g.reward_correct, formatted=g.reward_formatted, wrong=g.reward_wrong,
                         malformed=g.reward_malformed)
    policy = copy.deepcopy(init)
    trainer = trainer_from_config(policy, tokenizer, lambda i, text, prob: reward(prob, text), g, seed,
                                  max_new_tokens=max_new_tokens,
                                  correct_fn=lambda prob, text: verify(prob, text)["correct"])
    held = spread(sets["eval"], g.eval_problems)
    rng = random.Random(f"reasoning-rl-{seed}")
    hist = {"step": [], "reward": [], "pass@1": [], "response_length": [], "kl": [], "entropy": [],
            "eval_step": [], "eval_pass@1": [], "eval_sampled_pass@1": []}

    def evaluate(step):
        v = verified(policy, tokenizer, held, max_new_tokens)
        hist["eval_step"].append(step)
        hist["eval_pass@1"].append(sum(x["correct"] for x in v) / len(v))
        if r.rl_eval_samples > 0:
            hist["eval_sampled_pass@1"].append(sampled_pass_at_1(policy, tokenizer, held, max_new_tokens,
                                                                 r.rl_eval_samples, g.temperature, seed))

    evaluate(0)
    with open(log_path, "w", encoding="utf-8") as log:
        for step in range(1, g.steps + 1):
            set_lr(trainer.opt, lr_at(step - 1, g.optim, g.steps))
            batch = rng.sample(sets["rl"], min(g.prompts_per_step, len(sets["rl"])))
            stats = trainer.step([chat_prompt(tokenizer, p) for p in batch], batch)
            texts = stats.pop("texts", None)
            if "pass@1" not in stats and texts is not None:
                stats["pass@1"] = sum(verify(batch[j // g.group_size], t)["correct"]
                                      for j, t in enumerate(texts)) / len(texts)
            hist["step"].append(step)
            for k in ("reward", "pass@1", "response_length", "kl", "entropy"):
                hist[k].append(float(stats[k]) if k in stats else None)
            log.write(json.dumps({"step": step, **{k: v for k, v in stats.items() if isinstance(v, (int, float))}}) + "\n")
            if step % g.eval_every == 0 or step == g.steps:
                evaluate(step)
    return policy.eval(), hist


# -- the study ----------------------------------------------------------------------------------------------


def run_reasoning(cfg, r: ReasoningConfig, overwrite: bool = False, log=print) -> dict:
    tasks = validate(r, cfg)
    out = open_study_folder(r.out_dir, overwrite)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    seed = cfg.run.seed
    seed_everything(seed)
    sets = problem_sets(r, tasks, seed, cfg.grpo.prompts_per_step)
    texts = [p.prompt + "\n" + p.thinking + "\n" + p.answer for s in sets.values() for p in s["train"]]
    tok = build_tokenizer(cfg.tokenizer.kind, texts)
    device = resolve_device(cfg.run.device)
    base = GPT(replace(cfg.model, vocab_size=tok.vocab_size)).to(device).eval()
    block = base.config.block_size

    # 1. warm start at equal compute
    rows, lengths, dropped, max_new = {}, {}, {}, {}
    for cond in CONDITIONS:
        rows[cond], lengths[cond] = [], {}
        for name, s in sets.items():
            built = [sft_row(tok, p, cond == "cot") for p in s["train"]]
            kept = [b for b in built if len(b[0]) <= block]
            dropped[f"{cond}/{name}"] = len(built) - len(kept)
            if not kept:
                raise ScalelabError(f"no {cond} SFT row of task '{name}' fits the model's context of {block} tokens")
            rows[cond] += kept
            lengths[cond][name] = [len(k[0]) for k in kept]
            if cond == "cot":  # room for the longest worked reply, capped by the context
                prompt_len = max(len(chat_prompt(tok, p)) for p in s["train"])
                max_new[name] = min(block - prompt_len, max(len(k[0]) - sum(1 for m in k[1] if not m) for k in kept) + 16)
    plans = equal_compute_plans(lengths, cfg.sft.batch_size, cfg.sft.steps, seed, base.flops_per_token)
    log("equal compute: " + ", ".join(f"{c} {plans[c]['steps']} steps {plans[c]['flops']:.3e} FLOPs" for c in CONDITIONS))
    models, warm, flags = {}, {}, {}
    for cond in CONDITIONS:
        t = time.perf_counter()
        models[cond], losses = sft_train(base, tok, rows[cond], plans[cond]["batches"], cfg, out / f"sft_{cond}.jsonl",
                                         f"sft-{cond}")
        timings[f"sft_{cond}"] = time.perf_counter() - t
        t = time.perf_counter()
        warm[cond], flags[cond] = {}, {}
        for name in tasks:
            warm[cond][name], flags[cond][name] = accuracy_by_difficulty(models[cond], tok, sets[name]["eval"], max_new[name])
        warm[cond]["final_loss"] = losses[-1]
        timings[f"eval_{cond}"] = time.perf_counter() - t
        log(f"SFT {cond}: {plans[cond]['steps']} steps, {plans[cond]['flops'] / 1e12:.3f} TFLOP, "
            f"{timings[f'sft_{cond}']:.0f}s; accuracy " + ", ".join(f"{n} {warm[cond][n]['all']['accuracy']:.2f}" for n in tasks))
    compute = {cond: {k: v for k, v in plans[cond].items() if k != "batches"} for cond in CONDITIONS}
    compute["flops_ratio_answer_only_to_cot"] = plans["answer_only"]["flops"] / plans["cot"]["flops"]
    compute["rows"] = {cond: len(rows[cond]) for cond in CONDITIONS}
    compute["dropped_too_long"] = dropped

    # 2. RL from the CoT warm start, per task
    rl, policies = {}, {}
    for name in r.rl_tasks or list(tasks):
        t = time.perf_counter()
        policies[name], rl[name] = rl_task(models["cot"], tok, sets[name], r, cfg.grpo, max_new[name], seed,
                                           out / f"rl_{name}.jsonl")
        timings[f"rl_{name}"] = time.perf_counter() - t
        sampled = rl[name]["eval_sampled_pass@1"]
        log(f"RL {name}: held-out pass@1 greedy {rl[name]['eval_pass@1'][0]:.3f} -> {rl[name]['eval_pass@1'][-1]:.3f}"
            + (f", sampled {sampled[0]:.3f} -> {sampled[-1]:.3f} " if sampled else " ")
            + f"({timings[f'rl_{name}']:.0f}s)")

    # 3. test-time compute
    ttc_out = {}
    for name in r.ttc_tasks or list(tasks):
        t = time.perf_counter()
        model = policies.get(name, models["cot"]) if r.ttc_from == "rl" else models["cot"]
        problems = spread(sets[name]["eval"], r.ttc_problems)
        prompts = [chat_prompt(tok, p) for p in problems]
        answer_tokens = max(len(tok.encode(" " + p.answer)) for p in problems) + 4
        budgets = sorted({min(b, max_new[name]) for b in r.thinking_budgets})
        samples = ttc.sampled_answers(model, tok, problems, prompts, r.ttc_samples, r.ttc_temperature, max_new[name], seed)
        ttc_out[name] = {"model": "rl" if r.ttc_from == "rl" and name in policies else "cot", "n_problems": len(problems),
                         "budget": ttc.budget_curve(model, tok, problems, prompts, budgets, answer_tokens),
                         "samples": ttc.sample_curves(samples, r.sample_counts)}
        timings[f"ttc_{name}"] = time.perf_counter() - t
        s = ttc_out[name]["samples"]
        log(f"TTC {name}: majority {s['majority'][0]:.2f} -> {s['majority'][-1]:.2f}, "
            f"best-of-N {s['best_of_n'][0]:.2f} -> {s['best_of_n'][-1]:.2f} ({timings[f'ttc_{name}']:.0f}s)")

    # 4. tool use
    tools_out = {}
    if r.tool_tasks:
        t = time.perf_counter()
        trace_rows, skipped = [], {}
        for name in r.tool_tasks:
            got, skipped[name] = tools.tool_rows(tok, sets[name]["train"], lambda p: chat_prompt(tok, p))
            trace_rows += [g for g in got if len(g[0]) <= block]
        if not trace_rows:
            raise ScalelabError(f"reasoning.tool_tasks {r.tool_tasks}: no problem has a prompt the calculator can compute")
        batches = [b for _, b in zip(range(r.tool_sft_steps), batch_stream({"tools": [len(x[0]) for x in trace_rows]},
                                                                             cfg.sft.batch_size, seed))]
        tool_model, _ = sft_train(models["cot"], tok, trace_rows, batches, cfg, out / "sft_tools.jsonl", "sft-tools")
        for name in r.tool_tasks:
            res = {}
            for d, ps in sets[name]["eval"].items():
                ps = ps[: r.tool_eval_per_difficulty]
                prompts = [chat_prompt(tok, p) for p in ps]
                res[str(d)] = {cond: sum(flags[cond][name][d][: len(ps)]) / len(ps) for cond in CONDITIONS}
                for label, on in (("tool", True), ("tool_disabled", False)):
                    acc = tools.tool_accuracy(tool_model, tok, ps, prompts, max_new[name], on)
                    res[str(d)][label], res[str(d)][f"{label}_called"] = acc["accuracy"], acc["called"]
                    res[str(d)].setdefault("examples", {})[label] = acc["examples"][:1]
            tools_out[name] = res
        tools_out["trace_rows"], tools_out["skipped_no_expression"] = len(trace_rows), skipped
        timings["tools"] = time.perf_counter() - t
        log(f"tools: {timings['tools']:.0f}s")

    timings["total"] = time.perf_counter() - t0
    result = {"reasoning": asdict(r), "sft": asdict(cfg.sft), "grpo": asdict(cfg.grpo), "seed": seed, "tokenizer": tok.kind, "model": asdict(base.config),
              "params": base.num_params(), "compute": compute,
              "data": {n: {"train": len(s["train"]), "eval_per_difficulty": r.eval_per_difficulty, "rl_pool": len(s["rl"]),
                           "max_new_tokens": max_new[n]} for n, s in sets.items()},
              "warm_start": warm, "rl": rl, "ttc": ttc_out, "tools": tools_out, "timings_seconds": timings}
    common.write_json(out / "results.json", result)
    (out / "summary.md").write_text(summary_markdown(result))
    plot_warm_start(result, out / "warm_start.png")
    if rl:
        plot_rl(result, out / "rl.png")
    if ttc_out:
        ttc.plot_ttc(result["ttc"], out / "ttc_budget.png", out / "ttc_samples.png")
    if r.tool_tasks:
        tools.plot_tools(result["tools"], r.tool_tasks, out / "tools.png")
    return result


def summary_markdown(result: dict) -> str:
    r, c, sft = result["reasoning"], result["compute"], result["sft"]
    lines = ["# Reasoning study", "",
             f"Model: {result['params']:,} parameters ({result['model']['depth']} layers, width {result['model']['n_embd']}), "
             f"{result['tokenizer']} tokenizer, seeded random init (seed {result['seed']}).", "",
             "## Warm start at equal compute", "",
             f"CoT SFT: {c['cot']['steps']} steps, {c['cot']['flops']:.3e} FLOPs; answer-only SFT: "
             f"{c['answer_only']['steps']} steps, {c['answer_only']['flops']:.3e} FLOPs "
             f"(ratio {c['flops_ratio_answer_only_to_cot']:.3f}). Batches of {sft['batch_size']} rows of one task, "
             "padded to their longest row; FLOPs = rows x inputs x flops_per_token(inputs).", "",
             "| task | difficulty | answer-only | CoT |", "|---|---|---|---|"]
    w = result["warm_start"]
    for name in r["tasks"]:
        for d in [k for k in w["cot"][name] if k != "all"]:
            lines.append(f"| {name} | {d} | {w['answer_only'][name][d]['accuracy']:.3f} | {w['cot'][name][d]['accuracy']:.3f} |")
    if result["rl"]:
        lines += ["", "## GRPO from the CoT warm start", "",
                  "| task | held-out pass@1, sampled: before -> after | greedy: before -> after | "
                  "rollout pass@1, mean of first 5 -> last 5 steps |", "|---|---|---|---|"]
        for name, h in result["rl"].items():
            roll = [x for x in h["pass@1"] if x is not None]
            roll_s = f"{sum(roll[:5]) / len(roll[:5]):.3f} -> {sum(roll[-5:]) / len(roll[-5:]):.3f}" if roll else "n/a"
            sp = h.get("eval_sampled_pass@1") or []
            sp_s = f"{sp[0]:.3f} -> {sp[-1]:.3f}" if sp else "n/a"
            lines.append(f"| {name} | {sp_s} | {h['eval_pass@1'][0]:.3f} -> {h['eval_pass@1'][-1]:.3f} | {roll_s} |")
    if result["ttc"]:
        lines += ["", "## Test-time compute", "", "| task | budget -> accuracy | N | majority vote | verifier best-of-N |",
                  "|---|---|---|---|---|"]
        for name, t in result["ttc"].items():
            b = ", ".join(f"{x}: {a:.2f}" for x, a in zip(t["budget"]["budget"], t["budget"]["accuracy"]))
            s = t["samples"]
            lines.append(f"| {name} | {b} | {', '.join(map(str, s['n']))} | "
                         f"{', '.join(f'{x:.2f}' for x in s['majority'])} | {', '.join(f'{x:.2f}' for x in s['best_of_n'])} |")
    if result["tools"]:
        lines += ["", "## Tool use (arithmetic)", "",
                  "| task | difficulty | answer-only | CoT | tool SFT + calculator | tool SFT, calculator refused |",
                  "|---|---|---|---|---|---|"]
        for name in r["tool_tasks"]:
            for d, m in result["tools"][name].items():
                lines.append(f"| {name} | {d} | {m['answer_only']:.3f} | {m['cot']:.3f} | {m['tool']:.3f} | {m['tool_disabled']:.3f} |")
    t = result["timings_seconds"]
    lines += ["", "Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in t.items()), ""]
    return "\n".join(lines)


def _task_axes(n: int):
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.4), squeeze=False)
    return fig, list(axes[0])


def plot_warm_start(result: dict, path: Path) -> None:
    """Accuracy against difficulty, one line per SFT condition, one panel per task."""
    names = result["reasoning"]["tasks"]
    fig, axes = _task_axes(len(names))
    labels = {"answer_only": "SFT answer only", "cot": "SFT chain of thought"}
    for ax, name in zip(axes, names):
        for cond, style in (("answer_only", "s--"), ("cot", "o-")):
            acc = result["warm_start"][cond][name]
            ds = [d for d in acc if d != "all"]
            ax.plot([int(d) for d in ds], [acc[d]["accuracy"] for d in ds], style, label=labels[cond])
        ax.xaxis.get_major_locator().set_params(integer=True)
        label_fraction_axes(ax, name, "difficulty", "accuracy (greedy)")
    c = result["compute"]
    save_figure(fig, path, f"Warm start at equal compute ({c['cot']['flops']:.2e} vs {c['answer_only']['flops']:.2e} FLOPs)")


def plot_rl(result: dict, path: Path) -> None:
    """pass@1 against GRPO step: rollouts (sampled) and held-out problems (greedy), one panel per task."""
    fig, axes = _task_axes(len(result["rl"]))
    for ax, (name, h) in zip(axes, result["rl"].items()):
        pts = [(s, p) for s, p in zip(h["step"], h["pass@1"]) if p is not None]
        if pts:
            ax.plot([s for s, _ in pts], [p for _, p in pts], alpha=0.5, label="rollout pass@1 (sampled)")
        if h.get("eval_sampled_pass@1"):
            ax.plot(h["eval_step"], h["eval_sampled_pass@1"], "s-", label="held-out pass@1 (sampled)")
        ax.plot(h["eval_step"], h["eval_pass@1"], "o--", label="held-out pass@1 (greedy)")
        label_fraction_axes(ax, name, "GRPO step", "pass@1")
    save_figure(fig, path, "GRPO from the chain-of-thought warm start")


STUDY = Study(SECTION, ReasoningConfig, run_reasoning, summary_markdown, ("summary.md", "results.json"), MOVED_KEYS)
