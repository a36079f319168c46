"""``scalelab grpo``: GRPO with verifiable rewards on a reasoning task, from a finished (normally SFT) run.

Each step draws ``prompts_per_step`` problems of the task, asks each as a chat user turn (the template
SFT trains on, so a chat model answers in its assistant turn), samples ``group_size`` replies and
rewards them with the task's verifier (``answer_format.make_reward``). Every ``eval_every`` steps the
greedy reply to each held-out problem is verified: greedy pass@1. The held-out problems come from
their own seed and are removed from the training stream, so the evaluation never sees a trained prompt.
"""

from __future__ import annotations

import time
from pathlib import Path

from scalelab.config import Config
from scalelab.errors import ScalelabError
from scalelab.evals.plots import plt, save_figure
from scalelab.posttrain import common
from scalelab.posttrain.chat import prompt_ids
from scalelab.posttrain.grpo import trainer_from_config
from scalelab.run import Run
from scalelab.runtime import resolve_device, seed_everything
from scalelab.tasks import get_task
from scalelab.tasks.answer_format import make_reward, verify
from scalelab.train.metrics import MetricsLogger, read_metrics
from scalelab.train.optim import lr_at, set_lr


class ProblemStream:
    """The task's problems in seed order, held-out prompts skipped; ``take(n)`` never returns one twice.

    A task's list for a seed is prefix-stable (the first k of a longer list are the k of a shorter one),
    so the stream grows by asking for a longer list and keeping its new tail.
    """

    def __init__(self, task, seed: int, difficulty: int, exclude: set[str]):
        self.task, self.seed, self.difficulty, self.exclude = task, seed, difficulty, exclude
        self.pool: list = []
        self.generated = self.drawn = 0

    def take(self, n: int) -> list:
        while len(self.pool) - self.drawn < n:
            size = max(256, 2 * self.generated)
            fresh = self.task.generate(size, self.seed, self.difficulty)[self.generated :]
            self.generated = size
            self.pool += [p for p in fresh if p.prompt not in self.exclude]
            if len(self.pool) == 0 and size >= 1 << 16:
                raise ScalelabError(f"task '{self.task.name}' at difficulty {self.difficulty} has no problem outside "
                                    "the held-out set; lower grpo.eval_problems or raise grpo.difficulty")
        out = self.pool[self.drawn : self.drawn + n]
        self.drawn += n
        return out

    def peek(self):
        """The next problem ``take`` will return, without taking it."""
        problem = self.take(1)[0]
        self.drawn -= 1
        return problem


def greedy_pass_at_1(policy, tok, problems: list, encode, max_new_tokens: int) -> dict:
    """Greedy replies to ``problems``, verified: pass@1, the share with an answer line, the mean reply length."""
    outs = common.generate_replies(policy, tok, [encode(p) for p in problems], max_new_tokens)
    checks = [verify(p, o.text) for p, o in zip(problems, outs)]
    return {"pass@1": sum(c["correct"] for c in checks) / len(checks),
            "formatted": sum(c["formatted"] for c in checks) / len(checks),
            "response_length": sum(len(o.tokens) for o in outs) / len(outs),
            "example": f"{problems[0].prompt} -> {outs[0].text[:200]}"}


def plot_reward(records: list[dict], out_path: Path) -> Path:
    """reward.png: the sampled replies' mean reward (left), and pass@1 sampled and greedy held-out (right)."""
    train = [r for r in records if r.get("kind") == "grpo"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, (ax_r, ax_p) = plt.subplots(1, 2, figsize=(11, 4))
    ax_r.plot([r["step"] for r in train], [r["reward"] for r in train], "o-", ms=3, label="mean reward (sampled)")
    ax_r.set(xlabel="GRPO step", ylabel="reward", title="reward")
    if train and "pass@1" in train[0]:
        ax_p.plot([r["step"] for r in train], [r["pass@1"] for r in train], "o-", ms=3, alpha=0.7,
                  label="pass@1, sampled replies (train problems)")
    if evals:
        ax_p.plot([r["step"] for r in evals], [r["pass@1"] for r in evals], "s-", label="pass@1, greedy (held-out)")
    ax_p.set(xlabel="GRPO step", ylabel="pass@1", title="pass@1", ylim=(-0.02, 1.02))
    for ax in (ax_r, ax_p):
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, out_path)


def run_grpo(cfg: Config, init_dir: str | Path, overwrite: bool = False) -> dict:
    """GRPO from the --init run on the task ``grpo.task``; writes a run folder."""
    g = cfg.grpo
    task = get_task(g.task)
    difficulty = g.difficulty or task.default_difficulty
    task.check_difficulty(difficulty)
    reward = make_reward(correct=g.reward_correct, formatted=g.reward_formatted, wrong=g.reward_wrong,
                         malformed=g.reward_malformed)
    device = resolve_device(cfg.run.device)
    seed_everything(cfg.run.seed)
    init = Run.open(init_dir)
    init_model = init.load_model(device)
    tok, policy = init.tokenizer, init_model
    ctx = policy.config.block_size
    cache: dict[str, list[int]] = {}

    def encode(problem) -> list[int]:
        if problem.prompt not in cache:
            turns = [{"role": "system", "content": g.system_prompt}] if g.system_prompt else []
            ids = prompt_ids(tok, turns + [{"role": "user", "content": problem.prompt}])
            if len(ids) >= ctx:
                raise ScalelabError(f"a {g.task} prompt of {len(ids)} tokens does not fit the model's context of {ctx}")
            cache[problem.prompt] = ids
        return cache[problem.prompt]

    held_out = task.generate(g.eval_problems, cfg.run.seed + g.eval_seed_offset, difficulty) if g.eval_problems else []
    stream = ProblemStream(task, cfg.run.seed, difficulty, {p.prompt for p in held_out})
    first_prompt = tok.decode(encode(stream.peek()))  # a prompt that cannot fit fails before the run folder exists
    run = Run.create(cfg, "grpo", init, overwrite).path

    def refill(n: int):
        problems = stream.take(n)
        return [encode(p) for p in problems], problems

    trainer = trainer_from_config(policy, tok, lambda i, text, problem: reward(problem, text), g, cfg.run.seed,
                                  correct_fn=lambda problem, text: verify(problem, text)["correct"])
    logger = MetricsLogger(run / "metrics.jsonl")
    logger.log(kind="setup", step=0, stage="grpo", task=g.task, difficulty=difficulty, params=policy.num_params(),
               held_out=len(held_out), reward_weights=reward.weights, first_prompt=first_prompt)
    t0 = time.perf_counter()
    evals = []

    def evaluate(step: int) -> None:
        if held_out:
            ev = greedy_pass_at_1(policy, tok, held_out, encode, g.max_new_tokens)
            evals.append(ev)
            logger.log(kind="eval", step=step, elapsed=time.perf_counter() - t0, **ev)

    evaluate(0)
    bar = common.progress(cfg.run.progress, g.steps, "grpo")
    history = []
    for step in range(1, g.steps + 1):
        lr = lr_at(step - 1, g.optim, g.steps)
        set_lr(trainer.opt, lr)
        problems = stream.take(g.prompts_per_step)
        stats = trainer.step([encode(p) for p in problems], problems, refill=refill if g.dynamic_sampling else None)
        texts = stats.pop("texts")
        # over the replies to this step's own problems (dynamic sampling's refill rounds left out)
        formatted = [verify(problems[j // g.group_size], t)["formatted"] for j, t in enumerate(texts)]
        stats["formatted"] = sum(formatted) / len(formatted)
        history.append(stats)
        logger.log(kind="grpo", step=step, lr=lr, elapsed=time.perf_counter() - t0, **stats)
        if step % g.eval_every == 0 or step == g.steps:
            evaluate(step)
        if bar:
            bar.set_postfix(reward=f"{stats['reward']:.3f}", pass1=f"{stats['pass@1']:.2f}",
                            len=f"{stats['response_length']:.0f}")
            bar.update(1)
    if bar:
        bar.close()
    path = common.save(run, policy, trainer.opt, g.steps, "grpo")
    logger.close()
    plot_reward(read_metrics(run / "metrics.jsonl"), run / "reward.png")
    k = max(1, len(history) // 5)
    summary = {"stage": "grpo", "init": str(init.path), "task": g.task, "difficulty": difficulty, "steps": g.steps,
               "reward_first": sum(h["reward"] for h in history[:k]) / k,
               "reward_last": sum(h["reward"] for h in history[-k:]) / k,
               "pass@1_before": evals[0]["pass@1"] if evals else None,
               "pass@1_after": evals[-1]["pass@1"] if evals else None,
               "dropped_groups": sum(h["dropped_groups"] for h in history),
               "checkpoint": str(path), "plot": str(run / "reward.png"), "wall_seconds": time.perf_counter() - t0}
    common.write_json(run / "summary.json", summary)
    return summary
