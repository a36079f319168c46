"""One config system for every stage.

A config is a tree of dataclasses. Recipes live as TOML files under configs/,
and any key can be overridden on the command line with ``--set a.b=value``.
Every key and value is checked against the dataclass types, so a typo fails
loudly with the key's name instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scalelab.data.world import WorldConfig
from scalelab.errors import ScalelabError
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
    world: WorldConfig = field(default_factory=WorldConfig)


@dataclass
class TokenizerConfig:
    kind: str = "bpe"  # bpe | char | byte
    vocab_size: int = 2048  # bpe only; char and byte derive theirs
    path: str = ""  # reuse a saved tokenizer instead of training one


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # global, in sequences per optimizer step, whatever the number of processes
    grad_accum: int = 1  # micro-batches per step; per-process micro-batch = batch_size / (world * grad_accum)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | wsd | constant
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 20
    log_every: int = 10
    ckpt_every: int = 0  # 0: only at the end
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


@dataclass
class ScalingConfig:
    """A sweep of pretraining runs; every other section of the config is the base recipe of each run."""

    out_dir: str = "runs/scaling"
    design: str = "grid"  # grid: depths x tokens | isoflop: budgets x depths
    depths: list[int] = field(default_factory=lambda: [1, 2, 3, 4])  # model sizes, by the depth dial
    tokens: list[int] = field(default_factory=lambda: [250_000, 500_000, 1_000_000])  # grid: tokens per run
    budgets: list[float] = field(default_factory=list)  # isoflop: training FLOPs per run
    count_embeddings: bool = False  # N includes embedding parameters (Kaplan excludes them)
    n_bootstrap: int = 200
    fit_max_flops: float = 0.0  # predict: fit only on runs with C <= this (0: all but the target)
    predict_depth: int = 0  # predict: the big run to forecast, then train
    predict_tokens: int = 0


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
            raise ScalelabError(f"bad override '{item}': expected key=value, e.g. train.lr=3e-4")
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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    table = read_toml(path) if path else {}
    apply_overrides(table, list(overrides or []))
    cfg = _build(Config, table)
    validate(cfg)
    return cfg


def config_from_dict(table: dict) -> Config:
    cfg = _build(Config, table)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express; each names its key."""
    checks = [
        (cfg.data.source in ("world", "text", "jsonl", "parquet", "hf"), "data.source must be one of world, text, jsonl, parquet, hf"),
        (cfg.data.source == "world" or bool(cfg.data.path), f"data.path is required when data.source = '{cfg.data.source}'"),
        (0.0 < cfg.data.val_fraction < 1.0, "data.val_fraction must be between 0 and 1"),
        (cfg.tokenizer.kind in ("bpe", "char", "byte"), "tokenizer.kind must be one of bpe, char, byte"),
        (cfg.tokenizer.vocab_size >= 256 + 16 or cfg.tokenizer.kind != "bpe", "tokenizer.vocab_size must be at least 272 for bpe"),
        (cfg.train.steps >= 1, "train.steps must be at least 1"),
        (cfg.train.batch_size >= 1, "train.batch_size must be at least 1"),
        (cfg.train.grad_accum >= 1, "train.grad_accum must be at least 1"),
        (cfg.train.lr > 0, "train.lr must be positive"),
        (0.0 <= cfg.train.min_lr_ratio <= 1.0, "train.min_lr_ratio must be in [0, 1]"),
        (cfg.train.schedule in ("cosine", "wsd", "constant"), "train.schedule must be one of cosine, wsd, constant"),
        (0.0 <= cfg.train.decay_fraction <= 1.0, "train.decay_fraction must be in [0, 1]"),
        (cfg.train.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
        (cfg.train.dtype in ("auto", "fp32", "bf16"), "train.dtype must be one of auto, fp32, bf16"),
        (cfg.train.eval_every >= 1, "train.eval_every must be at least 1"),
        (cfg.sample.temperature >= 0, "sample.temperature must be >= 0"),
        (0.0 < cfg.sample.top_p <= 1.0, "sample.top_p must be in (0, 1]"),
        (cfg.scaling.design in ("grid", "isoflop"), "scaling.design must be grid or isoflop"),
        (all(d >= 1 for d in cfg.scaling.depths), "scaling.depths must all be >= 1"),
        (all(t > 0 for t in cfg.scaling.tokens), "scaling.tokens must all be positive"),
        (all(b > 0 for b in cfg.scaling.budgets), "scaling.budgets must all be positive"),
    ]
    for ok, message in checks:
        if not ok:
            raise ScalelabError(f"invalid config: {message}")
    cfg.model.validate()


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
