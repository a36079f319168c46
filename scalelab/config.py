"""One config system for every stage.

A config is a tree of dataclasses. Recipes live as TOML files under configs/,
and any key can be overridden on the command line with ``--set a.b=value``.
Every key and value is checked against the dataclass types, so a typo fails
loudly with the key's name instead of being silently ignored.
"""

from __future__ import annotations

import copy
import dataclasses
import tomllib
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scalelab.data.world import WorldConfig
from scalelab.errors import ScalelabError, check_config
from scalelab.model.gpt import GPTConfig


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs/run"
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    progress: bool = True  # tqdm bar on stderr
    tensorboard: bool = False  # also write TensorBoard events (needs the tensorboard extra)


@dataclass
class DataConfig:
    source: str = "world"  # world | text | jsonl | parquet | hf
    path: str = ""  # file or folder for text/jsonl/parquet; dataset name or saved dir for hf
    text_field: str = "text"  # JSONL field / Parquet column / HF column holding the text
    split: str = "train"  # HF split
    val_fraction: float = 0.1
    # Streamed sources (docs/data_at_scale.md); the world source keeps its in-memory shuffle split.
    on_error: str = "fail"  # fail | skip: a bad record (unreadable file, missing field, bad UTF-8) stops or is counted
    dedup: bool = True  # drop exact duplicate documents (same content hash)
    workers: int = 0  # 0: encode in this process with tokenizers' Rust threads | N: N worker processes
    shard_tokens: int = 100_000_000  # tokens per shard file
    world: WorldConfig = field(default_factory=WorldConfig)


@dataclass
class TokenizerConfig:
    kind: str = "bpe"  # bpe | char | byte | hf (an imported checkpoint's own tokenizer; needs path)
    vocab_size: int = 2048  # bpe only; char and byte derive theirs
    path: str = ""  # reuse a saved tokenizer instead of training one
    sample: str = "head"  # what BPE trains on: head (the first sample_bytes) | uniform (a uniform sample of documents)
    sample_bytes: int = 100_000_000  # bytes of training-split text BPE trains on (user corpora)


OPTIMIZERS = ("adamw", "muon")
MUON_NS_DTYPES = ("auto", "float32", "bfloat16")
SCHEDULES = ("cosine", "wsd", "constant")


@dataclass
class OptimConfig:
    """One stage's optimizer and learning-rate schedule: ``[train.optim]``, ``[sft.optim]``, ``[grpo.optim]``, ...

    Every stage builds its optimizer with train/optim.build_optimizer and steps its learning rate with
    train/optim.lr_at from this section. A post-training stage's keys that its TOML leaves out are taken
    from ``[train.optim]``, except the ones the stage fixes itself (see STAGE_OPTIM_DEFAULTS).
    """

    name: str = "adamw"  # OPTIMIZERS: adamw | muon (Muon on the hidden matrices, AdamW on the rest)
    lr: float = 3e-3  # peak learning rate
    warmup_steps: int = 50  # linear warmup from lr / warmup_steps
    schedule: str = "cosine"  # SCHEDULES: cosine | wsd | constant, after the warmup
    min_lr_ratio: float = 0.1  # cosine and wsd end at lr * min_lr_ratio
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying
    weight_decay: float = 0.1  # on matrix weights only (GPT.optimizer_groups), never norms or embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global gradient-norm clip; 0: none
    # name = "muon" only: the hidden 2-D matrices get torch.optim.Muon; embeddings, lm_head and norms keep
    # AdamW at ``lr``. The schedule scales both rates alike.
    muon_lr: float = 0.02  # peak Muon rate (torch's "original" shape adjustment on top)
    muon_momentum: float = 0.95  # Nesterov momentum of the Muon update
    muon_weight_decay: float = 0.0  # decoupled, as torch.optim.Muon applies it: p *= 1 - rate * decay
    muon_ns_dtype: str = "auto"  # MUON_NS_DTYPES: auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16


@dataclass
class TrainConfig:
    """Pretraining: steps, batch, evaluation, checkpoints and the spike guard; the optimizer is [train.optim]."""

    steps: int = 1000
    batch_size: int = 32  # global, in sequences per optimizer step, whatever the number of processes
    grad_accum: int = 1  # micro-batches per step; per-process micro-batch = batch_size / (world * grad_accum)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval_every: int = 100
    eval_batches: int = 20
    log_every: int = 10
    ckpt_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 0  # newest checkpoints kept on disk; 0 keeps all
    # Loss-spike guard (docs/fault_tolerance.md): roll back and skip data when the loss spikes.
    spike_guard: bool = False
    spike_window: int = 50  # trailing accepted losses the robust z-score is taken over
    spike_threshold: float = 6.0  # robust std above the trailing median that counts as a spike
    spike_warmup: int = 100  # steps before a finite loss may count as a spike (non-finite always does)
    spike_rollback_steps: int = 100  # roll back to a checkpoint at least this many steps before the spike
    spike_skip_batches: int = 0  # batches skipped past the spike, on top of those since the checkpoint
    spike_max_rollbacks: int = 5  # interventions in one run before giving up with an error
    inject_fault: str = ""  # fire drill: "poison:STEP" or "lr:STEP:FACTOR" (see train/spike.py)
    compile: bool = False
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU | fp32 | bf16


@dataclass
class EvalConfig:
    ngram_order: int = 4
    qa_examples: int = 200
    arithmetic_examples: int = 200
    max_new_tokens: int = 16


@dataclass
class SampleConfig:
    prompt: str = ""
    num_samples: int = 3
    max_new_tokens: int = 120
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95
    seed: int = 0
    stop: list[str] = field(default_factory=list)


FORECAST_FORMS = ("chinchilla", "kaplan")  # the scaling-law forms scaling.forecast_forms may name


@dataclass
class ScalingConfig:
    """A sweep of pretraining runs; every other section of the config is the base recipe of each run."""

    out_dir: str = "runs/scaling"
    design: str = "grid"  # grid: depths x tokens | isoflop: budgets x depths
    depths: list[int] = field(default_factory=lambda: [1, 2, 3, 4])  # model sizes, by the depth dial
    tokens: list[int] = field(default_factory=lambda: [250_000, 500_000, 1_000_000])  # grid: tokens per run
    budgets: list[float] = field(default_factory=list)  # isoflop: training FLOPs per run
    max_run_flops: float = 0.0  # grid: skip (depth, tokens) points whose training FLOPs exceed this (0: none)
    count_embeddings: bool = False  # N includes embedding parameters (Kaplan excludes them)
    n_bootstrap: int = 200
    fit_max_flops: float = 0.0  # predict: fit only on runs with C <= this (0: all but the target)
    predict_depth: int = 0  # predict: the big run to forecast, then train
    predict_tokens: int = 0
    # predict: functional forms to forecast with (FORECAST_FORMS); with several, the mean and the
    # envelope of their intervals
    forecast_forms: list[str] = field(default_factory=lambda: ["chinchilla"])


@dataclass
class ParallelConfig:
    """The device mesh: world = dp_replicate × dp_shard × tp (see docs/parallel.md).

    -1 on one data axis means "all processes the other axes leave"; the default is plain DDP.
    """

    dp_replicate: int = -1  # replicas (DDP; HSDP across groups): put this axis on the slow link
    dp_shard: int = 1  # FSDP2 shard group size (ZeRO-3); with dp_replicate > 1 this is HSDP
    tp: int = 1  # tensor parallel (+ sequence parallel norms); keep it inside one host


@dataclass
class SFTConfig:
    """Instruction tuning (scalelab sft); its optimizer is [sft.optim]."""

    data: str = "mixture"  # mixture: the built-in instruction mixture | jsonl | hf
    path: str = ""  # jsonl file, or HF dataset name / saved folder / data file
    split: str = "train"  # HF split
    messages_field: str = "messages"
    n_examples: int = 4000  # mixture: conversations drawn
    families: list[str] = field(default_factory=list)  # mixture: task families (empty: all)
    people: str = "known"  # mixture: whose facts: known | qa_train | qa_eval (world splits)
    val_fraction: float = 0.05
    pack: bool = True  # several conversations per block; false: one per row
    steps: int = 300
    batch_size: int = 16
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, warmup_steps=20))
    eval_every: int = 50
    lora_rank: int = 0  # 0: full fine-tuning; r > 0: LoRA adapters of rank r (the run saves the merged model too)
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"])


@dataclass
class RMConfig:
    """Reward model (scalelab rm): a scalar head on a pretrained or SFT backbone, Bradley-Terry loss."""

    data: str = "generated"  # generated: the built-in preference generator | jsonl | hf
    path: str = ""
    split: str = "train"
    n_pairs: int = 2000  # generated: pairs drawn
    bias: str = ""  # generated: "" or "longer" (between equally correct replies the longer wins)
    people: str = "known"  # generated: known | qa_train | qa_eval
    val_fraction: float = 0.1
    margin: float = 0.0  # added to each pair's own margin field: loss = -log sigmoid(r_c - r_r - margin)
    steps: int = 200
    batch_size: int = 16
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=10))
    eval_every: int = 50


@dataclass
class PPOConfig:
    """PPO (scalelab ppo) from an SFT policy, with a frozen reference, a critic with GAE, and a KL penalty."""

    reward: str = "rm"  # rm: a reward-model run | exact: 1 if the reply equals the task's answer
    reward_model: str = ""  # rm: the reward-model run folder
    families: list[str] = field(default_factory=list)  # prompts: instruction families (empty: short-answer ones)
    people: str = "known"  # prompts about: known | qa_train | qa_eval
    n_prompts: int = 2000
    iterations: int = 50  # rollout batches
    rollout_batch: int = 16  # prompts per rollout batch (one sample each)
    minibatch_size: int = 8
    epochs: int = 1  # passes over each rollout batch; more reuses data but drifts off-policy
    max_new_tokens: int = 32
    temperature: float = 1.0
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, warmup_steps=0, schedule="constant"))
    critic_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=0, schedule="constant"))
    clip: float = 0.2  # policy ratio clip
    value_clip: float = 0.2  # 0: unclipped value loss
    vf_coef: float = 0.5
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05  # initial beta of the per-token KL penalty
    kl_estimator: str = "k1"  # k1: log p - log p_ref | k3: (r - 1) - log r, r = p_ref / p (unbiased, >= 0)
    adaptive_kl: bool = False  # Ziegler et al. controller towards kl_target
    kl_target: float = 6.0  # nats per sequence
    kl_horizon: int = 10000
    whiten_rewards: bool = True  # normalise sequence scores over each rollout batch
    missing_eos_penalty: float = 0.0  # subtracted from the score of replies cut off by max_new_tokens
    critic_init: str = "policy"  # policy: the SFT backbone | reward_model: the reward model's backbone and head


@dataclass
class DPOConfig:
    """DPO (scalelab dpo) on preference pairs, against a frozen copy of the starting model."""

    data: str = "generated"  # generated | jsonl | hf (as rm)
    path: str = ""
    split: str = "train"
    n_pairs: int = 2000
    bias: str = ""
    people: str = "known"
    val_fraction: float = 0.1
    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO: assumed share of flipped labels
    steps: int = 200
    batch_size: int = 16
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5, warmup_steps=10))
    eval_every: int = 50


@dataclass
class GRPOConfig:
    """GRPO with verifiable rewards (scalelab grpo): a reasoning task's problems as chat prompts, a group of
    sampled replies per problem, reward = the task's verifier through answer_format.make_reward."""

    task: str = "addition"  # a name in the scalelab.tasks registry
    difficulty: int = 0  # the task's difficulty dial; 0: the task's default
    steps: int = 50
    prompts_per_step: int = 8
    group_size: int = 8  # replies sampled per prompt
    minibatch_size: int = 0  # replies per optimizer step; 0: the whole batch (one update per step)
    epochs: int = 1  # passes over each step's replies
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, warmup_steps=0, schedule="constant",
                                                                   weight_decay=0.0))
    kl_coef: float = 0.0  # k3 KL to the starting model as a loss term; 0: no reference copy, no reference pass
    clip: float = 0.2  # PPO ratio clip; 0: the plain ratio surrogate
    loss_norm: str = "token"  # token: every reply token weighs the same (DAPO) | sequence: every reply does (GRPO)
    scale_advantages: bool = True  # false: advantage = reward - group mean, without the std (Dr. GRPO)
    dynamic_sampling: bool = False  # drop groups whose replies all score the same; refill with fresh problems
    max_refill_rounds: int = 2  # dynamic sampling: extra sampling rounds a step at most
    old_logprobs: str = "engine"  # engine: the sampler's log-probs | recompute: a no-grad forward of the policy
    max_new_tokens: int = 64
    temperature: float = 1.0
    # a system turn before each problem, e.g. to ask a published chat model for the "Answer:" line it never
    # learned; "": the problem alone as the user turn (models SFT-trained on the format need nothing more)
    system_prompt: str = ""
    reward_correct: float = 1.0  # the reward is a correctness term (correct or wrong) ...
    reward_wrong: float = 0.0
    reward_formatted: float = 0.1  # ... plus a format term (an "Answer:" line or not)
    reward_malformed: float = -0.1
    eval_every: int = 10  # steps between greedy pass@1 evaluations on held-out problems
    eval_problems: int = 64  # 0: no evaluation
    eval_seed_offset: int = 1000  # held-out problems are drawn with run.seed + this (and never trained on)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: GPTConfig = field(default_factory=GPTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)


# ---------------------------------------------------------------------------------------------
# Building a config from TOML and overrides


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotated type ``tp``; ints widen to floats, nothing else converts."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arm, key)
            except ScalelabError as e:
                errors.append(str(e))
        raise ScalelabError(errors[0] if errors else f"config key {key}: bad value {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):  # a single string on the command line means a one-item list
            value = [value]
        if not isinstance(value, list):
            raise ScalelabError(f"config key {key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        k_tp, v_tp = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise ScalelabError(f"config key {key}: expected a table like {{a = 1}}, got {value!r}")
        return {_coerce(k, k_tp, key): _coerce(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ScalelabError(f"config key {key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ScalelabError(f"config key {key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ScalelabError(f"config key {key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ScalelabError(f"config key {key}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ScalelabError(f"config key {key}: expected a table, got {value!r}")
        return _build(tp, value, key)
    raise ScalelabError(f"config key {key}: unsupported type {_type_name(tp)}")


def _build(cls: type, table: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in table.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in hints:
            where = f"[{prefix}]" if prefix else "the top level"
            raise ScalelabError(f"unknown config key '{full}' (valid keys in {where}: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _parse_override_value(text: str) -> Any:
    # TOML literal syntax gives numbers, booleans, lists and inline tables for free;
    # anything that is not a TOML literal is taken as a bare string.
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(table: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ScalelabError(f"bad override '{item}': expected key=value, e.g. train.optim.lr=3e-4")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ScalelabError(f"bad override '{item}': empty key")
        node = table
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ScalelabError(f"bad override '{item}': '{part}' is not a table")
        node[parts[-1]] = _parse_override_value(raw.strip())
    return table


def read_toml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ScalelabError(f"config file not found: {p}")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ScalelabError(f"config file {p} is not valid TOML: {e}") from None


# What a post-training stage fixes in its optimizer section; its other keys default to [train.optim]'s.
# SFT, RM and DPO take their own rate and warmup; PPO and GRPO keep a constant rate (after any warmup)
# with the betas of the usual RL recipes, and GRPO no weight decay.
# Every stage fixes AdamW: Muon (train.optim.name = "muon") is a pretraining choice, and a stage that wants
# it says so in its own section.
_RL_OPTIM = {"warmup_steps": 0, "schedule": "constant", "beta1": 0.9, "beta2": 0.95}
STAGE_OPTIM_DEFAULTS: dict[str, dict] = {
    "sft.optim": {"name": "adamw", "lr": 3e-4, "warmup_steps": 20},
    "rm.optim": {"name": "adamw", "lr": 1e-4, "warmup_steps": 10},
    "dpo.optim": {"name": "adamw", "lr": 5e-5, "warmup_steps": 10},
    "ppo.optim": {"name": "adamw", "lr": 1e-5, **_RL_OPTIM},
    "ppo.critic_optim": {"name": "adamw", "lr": 1e-4, **_RL_OPTIM},
    "grpo.optim": {"name": "adamw", "lr": 1e-5, "weight_decay": 0.0, **_RL_OPTIM},
}
# Optimizer keys that sat directly in a stage's section before [STAGE.optim] existed: still read (and
# moved, with a warning) so that run folders and recipes written then keep working for one release.
_LEGACY_OPTIM_KEYS = ("lr", "warmup_steps", "schedule", "min_lr_ratio", "decay_fraction", "weight_decay",
                      "beta1", "beta2", "grad_clip")
_LEGACY_MOVES = {**{f"{sec}.{k}": f"{sec}.optim.{k}" for sec in ("train", "sft", "rm", "dpo", "ppo", "grpo")
                    for k in _LEGACY_OPTIM_KEYS},
                 "grpo.warmup": "grpo.optim.warmup_steps", "ppo.critic_lr": "ppo.critic_optim.lr"}


def _move_keys(table: dict, moves: dict[str, str | tuple[str, ...]]) -> None:
    """Old keys read at their new place (or places) for one release, with one warning naming each move; a key
    already given at its new place wins. Keys are dotted paths (``"train.lr"`` -> ``"train.optim.lr"``)."""
    notes = []
    for old, targets in moves.items():
        *parents, leaf = old.split(".")
        source = table
        for name in parents:
            source = source.get(name) if isinstance(source, dict) else None
        if not isinstance(source, dict) or leaf not in source:
            continue  # absent (or not a table: _build names the bad key)
        value = source.pop(leaf)
        for new in (targets,) if isinstance(targets, str) else targets:
            *parents, leaf = new.split(".")
            target = table
            for i, name in enumerate(parents):
                target = target.setdefault(name, {})
                if not isinstance(target, dict):
                    raise ScalelabError(f"config key {'.'.join(parents[: i + 1])}: expected a table, got {target!r}")
            if leaf in target and target[leaf] != value:
                notes.append(f"{old} (ignored: {new} is set)")
            else:
                target[leaf] = value
                notes.append(f"{old} -> {new}")
    if notes:
        warnings.warn(f"old config keys read as {', '.join(notes)}; the old names go in the next release",
                      FutureWarning, stacklevel=3)


def _inherit_stage_optims(table: dict) -> None:
    """Fill each post-training stage's optimizer table from [train.optim] and the stage's fixed keys."""
    train = table.get("train", {})
    base = train.get("optim", {}) if isinstance(train, dict) else {}
    if not isinstance(base, dict):
        return  # _build names the bad key
    for dotted, fixed in STAGE_OPTIM_DEFAULTS.items():
        sec, sub = dotted.split(".")
        section = table.setdefault(sec, {})
        if not isinstance(section, dict) or not isinstance(section.get(sub, {}), dict):
            continue
        section[sub] = {**base, **fixed, **section.get(sub, {})}


def _config_from_table(table: dict) -> Config:
    _move_keys(table, _LEGACY_MOVES)
    _inherit_stage_optims(table)
    cfg = _build(Config, table)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    table = read_toml(path) if path else {}
    apply_overrides(table, list(overrides or []))
    return _config_from_table(table)


def load_config_with_section(path, overrides, section: str, cls, moved: dict[str, str | tuple[str, ...]] | None = None):
    """(Config, section dataclass) from one TOML file + ``--set`` overrides; ``[section]`` keys go to ``cls``.

    A study keeps its own knobs in its own section (``[abstain]``, ...) and dataclass, so the shared
    ``Config`` tree does not grow a section per study. ``moved`` maps the study keys that once copied a
    stage's setting to that setting, or settings (``{"sft_lr": "sft.optim.lr"}``): still read, with a warning.
    """
    table = read_toml(path) if path else {}
    apply_overrides(table, list(overrides or []))
    _move_keys(table, {f"{section}.{old}": new for old, new in (moved or {}).items()})
    own = table.pop(section, {})
    return _config_from_table(table), _build(cls, own, section)


def config_from_dict(table: dict) -> Config:
    return _config_from_table(copy.deepcopy(table))


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express; each names its key."""
    checks = [
        (cfg.data.source in ("world", "text", "jsonl", "parquet", "hf"), "data.source must be one of world, text, jsonl, parquet, hf"),
        (cfg.data.source == "world" or bool(cfg.data.path), f"data.path is required when data.source = '{cfg.data.source}'"),
        (0.0 < cfg.data.val_fraction < 1.0, "data.val_fraction must be between 0 and 1"),
        (cfg.data.on_error in ("fail", "skip"), "data.on_error must be fail or skip"),
        (cfg.data.workers >= 0, "data.workers must be 0 (in-process threads) or more"),
        (cfg.data.shard_tokens >= 1, "data.shard_tokens must be positive"),
        (cfg.tokenizer.sample in ("head", "uniform"), "tokenizer.sample must be head or uniform"),
        (cfg.tokenizer.sample_bytes >= 1, "tokenizer.sample_bytes must be positive"),
        (cfg.tokenizer.kind in ("bpe", "char", "byte", "hf"), "tokenizer.kind must be one of bpe, char, byte, hf"),
        (cfg.tokenizer.kind != "hf" or bool(cfg.tokenizer.path),
         "tokenizer.path is required when tokenizer.kind = 'hf' (an imported checkpoint's tokenizer folder)"),
        (cfg.tokenizer.vocab_size >= 256 + 16 or cfg.tokenizer.kind != "bpe", "tokenizer.vocab_size must be at least 272 for bpe"),
        (cfg.train.steps >= 1, "train.steps must be at least 1"),
        (cfg.train.batch_size >= 1, "train.batch_size must be at least 1"),
        (cfg.train.grad_accum >= 1, "train.grad_accum must be at least 1"),
        *(check for name, optim in _stage_optims(cfg) for check in optim_checks(optim, name)),
        (cfg.train.dtype in ("auto", "fp32", "bf16"), "train.dtype must be one of auto, fp32, bf16"),
        (cfg.train.eval_every >= 1, "train.eval_every must be at least 1"),
        (cfg.train.keep_checkpoints >= 0, "train.keep_checkpoints must be >= 0 (0 keeps all)"),
        (not cfg.train.spike_guard or cfg.train.ckpt_every >= 1,
         "train.spike_guard needs train.ckpt_every >= 1: it rolls back to periodic checkpoints"),
        (not cfg.train.spike_guard or cfg.train.keep_checkpoints == 0
         or cfg.train.keep_checkpoints * cfg.train.ckpt_every > cfg.train.spike_rollback_steps,
         "train.keep_checkpoints x train.ckpt_every must exceed train.spike_rollback_steps, or no kept "
         "checkpoint is old enough to roll back to"),
        (cfg.train.spike_window >= 3, "train.spike_window must be at least 3"),
        (cfg.train.spike_threshold > 0, "train.spike_threshold must be positive"),
        (cfg.train.spike_warmup >= 0, "train.spike_warmup must be >= 0"),
        (cfg.train.spike_rollback_steps >= 1, "train.spike_rollback_steps must be at least 1"),
        (cfg.train.spike_skip_batches >= 0, "train.spike_skip_batches must be >= 0"),
        (cfg.train.spike_max_rollbacks >= 0, "train.spike_max_rollbacks must be >= 0"),
        (cfg.sample.temperature >= 0, "sample.temperature must be >= 0"),
        (0.0 < cfg.sample.top_p <= 1.0, "sample.top_p must be in (0, 1]"),
        (cfg.scaling.design in ("grid", "isoflop"), "scaling.design must be grid or isoflop"),
        (all(d >= 1 for d in cfg.scaling.depths), "scaling.depths must all be >= 1"),
        (all(t > 0 for t in cfg.scaling.tokens), "scaling.tokens must all be positive"),
        (all(b > 0 for b in cfg.scaling.budgets), "scaling.budgets must all be positive"),
        (bool(cfg.scaling.forecast_forms) and set(cfg.scaling.forecast_forms) <= set(FORECAST_FORMS),
         f"scaling.forecast_forms must be a non-empty subset of {list(FORECAST_FORMS)}"),
        (all(v >= 1 or v == -1 for v in (cfg.parallel.dp_replicate, cfg.parallel.dp_shard)),
         "parallel.dp_replicate and parallel.dp_shard must be >= 1, or -1 for 'the rest of the processes'"),
        ((cfg.parallel.dp_replicate, cfg.parallel.dp_shard).count(-1) <= 1,
         "only one of parallel.dp_replicate and parallel.dp_shard may be -1"),
        (cfg.parallel.tp >= 1, "parallel.tp must be at least 1"),
        *_posttrain_checks(cfg),
    ]
    check_config(checks)
    cfg.model.validate()


def _stage_optims(cfg: Config) -> list[tuple[str, OptimConfig]]:
    return [("train.optim", cfg.train.optim), ("sft.optim", cfg.sft.optim), ("rm.optim", cfg.rm.optim),
            ("dpo.optim", cfg.dpo.optim), ("ppo.optim", cfg.ppo.optim), ("ppo.critic_optim", cfg.ppo.critic_optim),
            ("grpo.optim", cfg.grpo.optim)]


def optim_checks(o: OptimConfig, name: str) -> list[tuple[bool, str]]:
    """Value checks of one optimizer section, each naming its key (``name`` is e.g. "sft.optim")."""
    return [
        (o.name in OPTIMIZERS, f"{name}.name must be one of {', '.join(OPTIMIZERS)}"),
        (o.lr > 0, f"{name}.lr must be positive"),
        (o.warmup_steps >= 0, f"{name}.warmup_steps must be >= 0"),
        (o.schedule in SCHEDULES, f"{name}.schedule must be one of {', '.join(SCHEDULES)}"),
        (0.0 <= o.min_lr_ratio <= 1.0, f"{name}.min_lr_ratio must be in [0, 1]"),
        (0.0 <= o.decay_fraction <= 1.0, f"{name}.decay_fraction must be in [0, 1]"),
        (o.weight_decay >= 0 and o.grad_clip >= 0, f"{name}.weight_decay and {name}.grad_clip must be >= 0"),
        (0.0 <= o.beta1 < 1.0 and 0.0 <= o.beta2 < 1.0, f"{name}.beta1 and {name}.beta2 must be in [0, 1)"),
        (o.eps > 0, f"{name}.eps must be positive"),
        (o.muon_lr > 0, f"{name}.muon_lr must be positive"),
        (0.0 <= o.muon_momentum < 1.0, f"{name}.muon_momentum must be in [0, 1)"),
        (o.muon_weight_decay >= 0, f"{name}.muon_weight_decay must be >= 0"),
        (o.muon_ns_dtype in MUON_NS_DTYPES, f"{name}.muon_ns_dtype must be one of {', '.join(MUON_NS_DTYPES)}"),
    ]


def _posttrain_checks(cfg: Config) -> list[tuple[bool, str]]:
    s, r, p, d = cfg.sft, cfg.rm, cfg.ppo, cfg.dpo
    checks = [
        (s.data in ("mixture", "jsonl", "hf"), "sft.data must be one of mixture, jsonl, hf"),
        (p.reward in ("rm", "exact"), "ppo.reward must be rm or exact"),
        (p.kl_estimator in ("k1", "k3"), "ppo.kl_estimator must be k1 or k3"),
        (p.critic_init in ("policy", "reward_model"), "ppo.critic_init must be policy or reward_model"),
        (p.iterations >= 1 and p.rollout_batch >= 1 and p.epochs >= 1, "ppo.iterations, ppo.rollout_batch and ppo.epochs must be >= 1"),
        (1 <= p.minibatch_size <= p.rollout_batch, "ppo.minibatch_size must be between 1 and ppo.rollout_batch"),
        (p.max_new_tokens >= 1, "ppo.max_new_tokens must be at least 1"),
        (p.temperature > 0, "ppo.temperature must be positive (PPO needs a sampling policy)"),
        (p.clip > 0 and p.value_clip >= 0 and p.kl_coef >= 0, "ppo.clip must be positive; ppo.value_clip and ppo.kl_coef >= 0"),
        (0 <= p.gamma <= 1 and 0 <= p.lam <= 1, "ppo.gamma and ppo.lam must be in [0, 1]"),
        (p.kl_target > 0 and p.kl_horizon >= 1, "ppo.kl_target must be positive and ppo.kl_horizon >= 1"),
        (d.beta > 0, "dpo.beta must be positive"),
        *((sec.people in ("known", "qa_train", "qa_eval"), f"{name}.people must be one of known, qa_train, qa_eval")
          for name, sec in (("sft", s), ("rm", r), ("ppo", p), ("dpo", d))),
        (0 <= d.label_smoothing < 0.5, "dpo.label_smoothing must be in [0, 0.5)"),
    ]
    checks += _grpo_checks(cfg.grpo)
    for name, sec in (("sft", s), ("rm", r), ("dpo", d)):
        checks += [
            (sec.steps >= 1 and sec.batch_size >= 1, f"{name}.steps and {name}.batch_size must be positive"),
            (sec.eval_every >= 1, f"{name}.eval_every must be >= 1"),
            (0.0 <= sec.val_fraction < 1.0, f"{name}.val_fraction must be in [0, 1)"),
            (sec.data == "mixture" or sec.data == "generated" or bool(sec.path), f"{name}.path is required when {name}.data = '{sec.data}'"),
        ]
    for name, sec in (("rm", r), ("dpo", d)):
        checks += [
            (sec.data in ("generated", "jsonl", "hf"), f"{name}.data must be one of generated, jsonl, hf"),
            (sec.bias in ("", "longer"), f"{name}.bias must be \"\" or \"longer\""),
        ]
    return checks


def _grpo_checks(g: GRPOConfig) -> list[tuple[bool, str]]:
    return [
        (bool(g.task), "grpo.task must name a reasoning task (see scalelab.tasks)"),
        (g.difficulty >= 0, "grpo.difficulty must be >= 0 (0: the task's default)"),
        (g.steps >= 1 and g.prompts_per_step >= 1 and g.epochs >= 1, "grpo.steps, grpo.prompts_per_step and grpo.epochs must be >= 1"),
        (g.group_size >= 2, "grpo.group_size must be at least 2: one reply has no group baseline"),
        (g.minibatch_size >= 0, "grpo.minibatch_size must be >= 0 (0: the whole batch)"),
        (g.kl_coef >= 0 and g.clip >= 0, "grpo.kl_coef and grpo.clip must be >= 0 (0 turns each off)"),
        (g.loss_norm in ("token", "sequence"), "grpo.loss_norm must be token or sequence"),
        (g.old_logprobs in ("engine", "recompute"), "grpo.old_logprobs must be engine or recompute"),
        (g.max_refill_rounds >= 0, "grpo.max_refill_rounds must be >= 0"),
        (g.max_new_tokens >= 1, "grpo.max_new_tokens must be at least 1"),
        (g.temperature > 0, "grpo.temperature must be positive (GRPO needs a sampling policy)"),
        (g.eval_every >= 1 and g.eval_problems >= 0, "grpo.eval_every must be >= 1 and grpo.eval_problems >= 0"),
        (g.eval_seed_offset != 0, "grpo.eval_seed_offset must not be 0: held-out problems need their own seed"),
    ]


def to_toml(cfg: Config) -> str:
    """TOML text that load_config reads back into the same config (a run folder's record)."""
    lines: list[str] = []

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {fmt(x)}" for k, x in v.items()) + "}"
        raise TypeError(v)

    def emit(obj: Any, name: str) -> None:
        # Nested dataclasses become [sections]; dict-typed fields stay inline tables.
        if name:
            lines.append(f"\n[{name}]")
        subsections = []
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                subsections.append((f.name, v))
            elif v is not None:
                lines.append(f"{f.name} = {fmt(v)}")
        for sub_name, sub in subsections:
            emit(sub, f"{name}.{sub_name}" if name else sub_name)

    emit(cfg, "")
    return "\n".join(lines).lstrip() + "\n"
