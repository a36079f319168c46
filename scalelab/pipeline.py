"""The pretraining pipeline as a Python API; the CLI is a thin layer over it.

    corpus -> tokenizer -> token shards -> pretrain -> evaluate (vs n-gram) -> sample -> report

Every stage reads and writes the run folder, so any stage can be re-run alone
on a finished run (``scalelab eval RUN``, ``scalelab sample RUN``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from scalelab.config import Config, config_from_dict, load_config, read_toml, to_toml
from scalelab.data import subtask_tags
from scalelab.data.corpus import CorpusStream, tokenizer_texts
from scalelab.data.generators import generate as generate_examples
from scalelab.data.shard_writer import PROGRESS_FILE
from scalelab.data.shards import TokenShards, build_shards, split_documents, stream_shards
from scalelab.data.sources import SourceErrors, load_documents, resolve_path
from scalelab.data.world import World
from scalelab.errors import ScalelabError
from scalelab.evals.ngram import KneserNeyLM
from scalelab.evals.tasks import exact_match
from scalelab.infer.sample import SamplingParams, cut_at_stop, generate
from scalelab.parallel.dist import DistEnv, barrier, init_distributed, shutdown
from scalelab.report import write_report, write_report_card
from scalelab.run import CHECKPOINTS_DIR, CONFIG_FILE, DATA_DIR, TOKENIZER_DIR, WORLD_FILE, Run
from scalelab.runtime import resolve_device
from scalelab.tokenizer import build_tokenizer, load_tokenizer
from scalelab.tokenizer.tokenizers import META_FILE as TOKENIZER_META
from scalelab import checkpoint as ckpt
from scalelab.train.metrics import MetricsLogger, read_metrics, truncate_after
from scalelab.train.trainer import Trainer, evaluate_loss, write_json


@dataclass
class PreparedData:
    tokenizer: object
    shards: TokenShards

    @property
    def train_tokens(self) -> np.ndarray:
        return self.shards.tokens("train")

    @property
    def val_tokens(self) -> np.ndarray:
        return self.shards.tokens("val")


def load_corpus(cfg: Config) -> list[str]:
    """Every document in memory: the world corpus, or a small user corpus (tests, quick looks)."""
    d = cfg.data
    if d.source == "world":
        return World(d.world).pretraining_documents()
    return load_documents(d.source, d.path, field=d.text_field, split=d.split, errors=SourceErrors(d.on_error))


def corpus_stream(cfg: Config) -> CorpusStream:
    """A user corpus as a stream that is read afresh each time it is iterated."""
    d = cfg.data
    return CorpusStream(d.source, resolve_path(d.source, d.path), d.text_field, d.split, SourceErrors(d.on_error))


def train_tokenizer(cfg: Config, stream: CorpusStream):
    """A tokenizer trained on the bounded sample ``tokenizer.sample`` / ``sample_bytes`` of a user corpus."""
    t = cfg.tokenizer
    texts = tokenizer_texts(stream, t.kind, t.sample, t.sample_bytes, cfg.run.seed, cfg.data.val_fraction)
    return build_tokenizer(t.kind, texts, t.vocab_size)


def prepare(cfg: Config, run_dir: str | Path, env: DistEnv = DistEnv()) -> PreparedData:
    """Corpus -> tokenizer -> shards under ``run_dir`` (done once, by the main process).

    The world corpus is small and generated in memory: it keeps its shuffle split (its token stream is
    unchanged). Every other source streams (docs/data_at_scale.md), and a killed preparation resumes
    from its last complete shard when run again.
    """
    run = Path(run_dir)
    tok_dir, data_dir = run / "tokenizer", run / "data"
    if env.is_main and not (data_dir / "meta.json").is_file():
        if cfg.data.source == "world":
            _prepare_world(cfg, run)
        else:
            stream = corpus_stream(cfg)
            if cfg.tokenizer.path:
                tokenizer = load_tokenizer(cfg.tokenizer.path)
            elif (data_dir / PROGRESS_FILE).is_file() and (tok_dir / TOKENIZER_META).is_file():
                tokenizer = load_tokenizer(tok_dir)  # an interrupted preparation: resume with its tokenizer
            else:
                tokenizer = train_tokenizer(cfg, stream)
            tokenizer.save(tok_dir)
            d = cfg.data
            meta = stream_shards(stream, tokenizer, data_dir, val_fraction=d.val_fraction, seed=cfg.run.seed,
                                 shard_tokens=d.shard_tokens, dedup=d.dedup, workers=d.workers,
                                 progress=cfg.run.progress, source=stream.describe(), errors=stream.errors,
                                 single_document=stream.is_single_file())
            print(describe_shards(meta), file=sys.stderr)
    barrier(env)
    return PreparedData(tokenizer=load_tokenizer(tok_dir), shards=TokenShards(data_dir))


def describe_shards(meta) -> str:
    s = meta.splits
    line = (f"shards: {s['train']['tokens']:,} train / {s['val']['tokens']:,} val tokens from "
            f"{s['train']['documents'] + s['val']['documents']:,} documents; {meta.duplicates:,} exact duplicates dropped")
    if meta.skipped:
        line += f"; {meta.skipped:,} bad records skipped ({', '.join(f'{k}: {v}' for k, v in meta.skipped_kinds.items())})"
    return line


def _prepare_world(cfg: Config, run: Path) -> None:
    docs = load_corpus(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer.path) if cfg.tokenizer.path else \
        build_tokenizer(cfg.tokenizer.kind, docs, cfg.tokenizer.vocab_size)
    tokenizer.save(run / TOKENIZER_DIR)
    build_shards(docs, tokenizer, run / DATA_DIR, val_fraction=cfg.data.val_fraction, seed=cfg.run.seed)
    World(cfg.data.world).save(run / WORLD_FILE)
    _, val_docs = split_documents(docs, cfg.data.val_fraction, cfg.run.seed)
    subtask_tags.save_tags(subtask_tags.tag_token_stream(val_docs, tokenizer), run / DATA_DIR)


def _model_config_for(cfg: Config, tokenizer) -> None:
    cfg.model.vocab_size = tokenizer.vocab_size


def pretrain(cfg: Config, resume: bool = False, overwrite: bool = False, stages: tuple[str, ...] = ("eval", "sample", "report")) -> dict:
    """The main job: prepare, train, then evaluate, sample and report. Returns the summary dict."""
    env = init_distributed(resolve_device(cfg.run.device).type)
    try:
        run = Path(cfg.run.out_dir)
        if env.is_main:
            _claim_run_dir(run, cfg, resume, overwrite)
        barrier(env)
        data = prepare(cfg, run, env)
        _model_config_for(cfg, data.tokenizer)
        if env.is_main:
            (run / CONFIG_FILE).write_text(to_toml(cfg))
        trainer = Trainer(
            cfg, run, data.train_tokens, data.val_tokens, data.shards.bytes_per_token("val"), env=env,
            val_subtasks=subtask_tags.load_tags(run / "data", len(data.val_tokens)),
        )
        metrics_path = run / "metrics.jsonl"
        if resume and trainer.resume():
            if env.is_main:
                truncate_after(metrics_path, trainer.step)
        logger = MetricsLogger(metrics_path, enabled=env.is_main, tensorboard_dir=run / "tb" if cfg.run.tensorboard else None)
        if env.is_main:
            m = trainer.model
            logger.log(
                kind="setup", step=trainer.step, params=m.num_params(), params_non_embedding=m.num_params(False),
                flops_per_token=m.flops_per_token(), world_size=env.world_size, device=str(trainer.device),
                # torchrun tells each worker how many run on its node; the rest are on other nodes
                nodes=env.world_size // int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size)),
            )
        result = trainer.fit(logger=logger)
        logger.close()
        summary = {"train": {k: v for k, v in asdict(result).items() if k != "losses"}}
        if env.is_main:
            summary["train"]["checkpoint"] = str(result.checkpoint)
            if "eval" in stages:
                summary["eval"] = evaluate(run, cfg, data)
            if "sample" in stages:
                summary["samples"] = sample(run, cfg)
            write_json(run / "summary.json", summary)
            if "report" in stages:
                write_report(run)
                write_report_card([run])
        barrier(env)
        return summary
    finally:
        shutdown(env)


def _claim_run_dir(run: Path, cfg: Config, resume: bool, overwrite: bool) -> None:
    has_ckpt = ckpt.latest_checkpoint(run / CHECKPOINTS_DIR) is not None
    if overwrite and run.exists():
        ckpt.remove_run_folder(run)
    elif has_ckpt and not resume:
        raise ScalelabError(
            f"run folder {run} already holds a checkpoint; pass --resume to continue it or --overwrite to start again"
        )
    elif resume and run.exists() and (run / CONFIG_FILE).is_file():
        saved = read_toml(run / CONFIG_FILE)
        saved.get("model", {}).pop("vocab_size", None)
        mine = asdict(cfg.model)
        mine.pop("vocab_size", None)
        differing = [k for k, v in saved.get("model", {}).items() if mine.get(k) != v]
        if differing:
            raise ScalelabError(f"cannot resume {run}: model settings differ from the saved run ({', '.join(differing)})")
    run.mkdir(parents=True, exist_ok=True)


def evaluate(run_dir: str | Path, cfg: Config | None = None, data: PreparedData | None = None) -> dict:
    """Full-validation loss and bits per byte, the n-gram baseline on the same tokens, and task exact match."""
    opened = Run.open(run_dir)
    run, cfg = opened.path, cfg or opened.cfg
    data = data or PreparedData(tokenizer=opened.tokenizer, shards=TokenShards(opened.data_dir))
    device = resolve_device(cfg.run.device)
    model = opened.load_model(device)
    t0 = time.perf_counter()
    bpt = data.shards.bytes_per_token("val")
    val_loss, n_tokens = evaluate_loss(
        model, data.val_tokens, cfg.train.batch_size, model.config.block_size, None, device, cfg.train.dtype
    )
    ngram = KneserNeyLM(order=cfg.eval.ngram_order, vocab_size=data.tokenizer.vocab_size)
    ngram.fit(np.asarray(data.train_tokens))
    ngram_nats = ngram.nll(np.asarray(data.val_tokens))
    result = {
        "val_loss": val_loss,
        "val_bpb": val_loss / math.log(2) / bpt,
        "val_tokens_scored": n_tokens,
        "ngram_order": cfg.eval.ngram_order,
        "ngram_val_loss": ngram_nats,
        "ngram_val_bpb": ngram_nats / math.log(2) / bpt,
        "tokenizer_bytes_per_token_val": bpt,
        "params": model.num_params(),
        "params_non_embedding": model.num_params(False),
        "flops_per_token": model.flops_per_token(),
    }
    result["bpb_improvement_over_ngram"] = 1 - result["val_bpb"] / result["ngram_val_bpb"]
    if cfg.data.source == "world":
        result["tasks"] = _world_tasks(model, data.tokenizer, cfg)
    result["eval_seconds"] = time.perf_counter() - t0
    write_json(run / "eval.json", result)
    return result


def _world_tasks(model, tokenizer, cfg: Config) -> dict:
    world = World(cfg.data.world)
    n_qa = cfg.eval.qa_examples
    seen = world.qa_pairs(world.qa_train_people)[:n_qa]
    held = world.eval_qa()[:n_qa]
    tasks = {}
    for name, pairs in (("qa_seen_in_pretraining", seen), ("qa_heldout_people", held)):
        if pairs:  # a QAPair's prompt ends in "Answer:", its answer is the continuation
            tasks[name] = asdict(exact_match(model, tokenizer, pairs, name, cfg.eval.max_new_tokens))
    if cfg.eval.arithmetic_examples:
        # Score only problems pretraining never showed: small operands repeat by chance otherwise.
        seen_prompts = {e.prompt for e in world.task_examples().get("arithmetic", [])}
        pool = generate_examples("arithmetic", 4 * cfg.eval.arithmetic_examples, seed=cfg.run.seed + 1)
        arith = [e for e in pool if e.prompt not in seen_prompts][: cfg.eval.arithmetic_examples]
        tasks["arithmetic_unseen"] = asdict(exact_match(model, tokenizer, arith, "arithmetic_unseen", cfg.eval.max_new_tokens))
    return tasks


def sample(run_dir: str | Path, cfg: Config | None = None, prompt: str | None = None) -> list[dict]:
    """Samples from the run's model; written to samples.jsonl in the run folder."""
    opened = Run.open(run_dir)
    run, cfg = opened.path, cfg or opened.cfg
    tokenizer = opened.tokenizer
    model = opened.load_model(resolve_device(cfg.run.device))
    s = cfg.sample
    text = s.prompt if prompt is None else prompt
    if not text and cfg.data.source == "world":
        text = _default_world_prompt(cfg)
    ids = [tokenizer.bos_id] + tokenizer.encode(text)
    params = SamplingParams(
        max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed,
        stop_token_ids=(tokenizer.bos_id,), stop_strings=tuple(s.stop),
    )
    outs = generate(model, ids, params, num_samples=s.num_samples, decode=tokenizer.decode)
    samples = [{"prompt": text, "completion": cut_at_stop(tokenizer.decode(o), s.stop)} for o in outs]
    with open(run / "samples.jsonl", "w", encoding="utf-8") as f:
        for item in samples:
            f.write(json.dumps(item) + "\n")
    return samples


def _default_world_prompt(cfg: Config) -> str:
    world = World(cfg.data.world)
    person = world.people[0]
    return f"{person.name} was born"


__all__ = [
    "Config", "PreparedData", "config_from_dict", "evaluate", "load_config", "load_corpus",
    "prepare", "pretrain", "read_metrics", "sample",
]
