"""The ``scalelab`` command: ``scalelab <stage> ...``, a thin layer over scalelab.pipeline.

Every stage that takes a config accepts ``--config FILE`` and any number of
``--set section.key=value`` overrides (TOML values: 3e-4, true, "text", [1, 2]).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from scalelab.errors import ScalelabError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="TOML recipe (see configs/); defaults apply to keys it leaves out")
    p.add_argument(
        "--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config key, e.g. --set train.optim.lr=3e-4 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scalelab", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")

    p = sub.add_parser("pretrain", help="corpus -> tokenizer -> pretrain -> eval vs n-gram -> sample -> report")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue the run in run.out_dir from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete run.out_dir first and start again")
    p.add_argument("--skip-eval", action="store_true", help="train only: no eval, samples or report")

    p = sub.add_parser("sample", help="sample text from a run's model with its KV cache")
    p.add_argument("run_dir")
    p.add_argument("--prompt", "-p", default=None, help="text to continue (default: sample.prompt from the run config)")
    p.add_argument("--num-samples", "-n", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", "-t", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")

    p = sub.add_parser("report", help="report card (Markdown + self-contained HTML) over one or more run folders")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="pretraining or post-training run, scaling sweep out_dir, or a study's folder")
    p.add_argument("--out", default=None, help="folder for report_card.md/.html (default: the folder holding the runs)")
    p.add_argument("--title", default=None, help="the report's title")

    p = sub.add_parser("tokenizer", help="train a tokenizer on the configured corpus and report its compression")
    p.add_argument("action", choices=["train"])
    _add_config_args(p)
    p.add_argument("--out", required=True, help="folder to save the tokenizer in")

    p = sub.add_parser("data", help="write the embedded synthetic world corpus and its QA view to files")
    p.add_argument("action", choices=["world"])
    _add_config_args(p)
    p.add_argument("--out", required=True, help="folder for corpus.jsonl and qa.jsonl")

    p = sub.add_parser("scaling", help="scaling laws: run a sweep, fit it, forecast a bigger run and check")
    p.add_argument("action", choices=["sweep", "fit", "predict"])
    _add_config_args(p)

    p = sub.add_parser("evals", help="deprecated: 'evals emergence' is now 'experiments emergence'")
    p.add_argument("action", choices=["emergence"])
    _add_config_args(p)
    p.add_argument("--n", type=int, default=100, help="examples per task and run")
    p.add_argument("--overwrite", action="store_true", help=argparse.SUPPRESS)

    p = sub.add_parser("config", help="print the resolved config as TOML")
    p.add_argument("action", choices=["show"])
    _add_config_args(p)

    # Stages with many flags keep their sub-command in their own package; each such module has
    # ``register(sub, add_config_args) -> {name: handler}`` and imports nothing heavy at top level.
    for module_name in STAGE_COMMAND_MODULES:
        module = importlib.import_module(module_name)
        COMMANDS.update(module.register(sub, _add_config_args))
    return parser


def _cmd_pretrain(args) -> None:
    from scalelab.config import load_config
    from scalelab.pipeline import pretrain

    cfg = load_config(args.config, args.overrides)
    stages = () if args.skip_eval else ("eval", "sample", "report")
    summary = pretrain(cfg, resume=args.resume, overwrite=args.overwrite, stages=stages)
    if "eval" in summary:
        from scalelab.cli.evals import print_eval

        print_eval(summary["eval"])
    for s in summary.get("samples", []):
        print(f"\n--- sample ---\n{s['prompt']}{s['completion']}")
    print(f"\nrun folder: {cfg.run.out_dir}")


def _cmd_sample(args) -> None:
    from scalelab.pipeline import sample
    from scalelab.run import Run

    overrides = []
    for flag, key in (("num_samples", "num_samples"), ("max_new_tokens", "max_new_tokens"), ("temperature", "temperature"),
                      ("top_k", "top_k"), ("top_p", "top_p"), ("seed", "seed")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"sample.{key}={value}")
    if args.stop:
        overrides.append("sample.stop=" + json.dumps(args.stop))
    cfg = Run.open(args.run_dir, overrides).cfg
    for s in sample(args.run_dir, cfg, prompt=args.prompt):
        print(f"--- sample ---\n{s['prompt']}{s['completion']}")


def _cmd_report(args) -> None:
    from scalelab.report import collect_run, write_report, write_report_card

    if len(args.run_dirs) == 1 and args.out is None and collect_run(args.run_dirs[0]).stage == "base":
        # one pretraining run, as before: its report.md and loss.png are rewritten too
        print(write_report(args.run_dirs[0]))
    for path in write_report_card(args.run_dirs, out=args.out, title=args.title):
        print(path)


def _cmd_tokenizer(args) -> None:
    from scalelab.config import load_config
    from scalelab.data.corpus import documents, head_sample
    from scalelab.pipeline import corpus_stream, load_corpus, train_tokenizer
    from scalelab.tokenizer import build_tokenizer, bytes_per_token

    cfg = load_config(args.config, args.overrides)
    note = ""
    if cfg.data.source == "world":
        docs = load_corpus(cfg)
        n_val = max(1, int(len(docs) * cfg.data.val_fraction)) if len(docs) > 1 else 0
        train_docs, val_docs = docs[n_val:], docs[:n_val] or docs
        tok = build_tokenizer(cfg.tokenizer.kind, train_docs, cfg.tokenizer.vocab_size)
    else:
        # streamed: trained on a bounded sample of the training split, measured on held-out documents
        stream = corpus_stream(cfg)
        tok = train_tokenizer(cfg, stream)
        seed, vf = cfg.run.seed, cfg.data.val_fraction
        val_docs = list(head_sample(documents(stream, seed, vf, "val"), HELD_OUT_BYTES))
        if not val_docs:
            val_docs = list(head_sample(documents(stream, seed, vf, None), HELD_OUT_BYTES))
            note = " (no held-out documents: measured on training text)"
    tok.save(args.out)
    print(f"{cfg.tokenizer.kind} tokenizer, vocab {tok.vocab_size}, saved to {args.out}; "
          f"held-out compression {bytes_per_token(tok, val_docs):.3f} bytes/token{note}")


HELD_OUT_BYTES = 10_000_000  # enough text for a stable compression figure


def _cmd_data(args) -> None:
    from scalelab.config import load_config
    from scalelab.data.world import World

    cfg = load_config(args.config, args.overrides)
    world = World(cfg.data.world)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    docs = world.pretraining_documents()
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    with open(out / "qa.jsonl", "w", encoding="utf-8") as f:
        for q in world.qa_pairs():
            f.write(json.dumps({"question": q.question, "answer": q.answer, "person_id": q.person_id,
                                "attribute": q.attribute}) + "\n")
    world.save(out / "world.json")
    print(f"wrote {len(docs)} documents to {out / 'corpus.jsonl'} and the QA view to {out / 'qa.jsonl'}")


def _cmd_scaling(args) -> None:
    from scalelab.config import load_config
    from scalelab.scaling import sweep

    cfg = load_config(args.config, args.overrides)
    if args.action == "sweep":
        rows = sweep.run_sweep(cfg, progress=cfg.run.progress)
        print(f"{len(rows)} runs in {Path(cfg.scaling.out_dir) / 'results.csv'}")
    elif args.action == "fit":
        sweep.fit_sweep(cfg)
        out = Path(cfg.scaling.out_dir)
        print((out / "fit.md").read_text(), end="")
        print(f"plots and fit.json in {out}")
    else:
        print(sweep.describe_forecast(sweep.predict_then_verify(cfg)))


def _cmd_evals(args) -> None:
    from scalelab.experiments.emergence import run_cli

    print("scalelab: 'evals emergence' is deprecated and goes in the next release; "
          "use 'scalelab experiments emergence'", file=sys.stderr)
    run_cli(args)


def _cmd_config(args) -> None:
    from scalelab.config import load_config, to_toml

    print(to_toml(load_config(args.config, args.overrides)), end="")


COMMANDS = {
    "pretrain": _cmd_pretrain, "sample": _cmd_sample, "report": _cmd_report,
    "tokenizer": _cmd_tokenizer, "data": _cmd_data, "config": _cmd_config, "scaling": _cmd_scaling,
    "evals": _cmd_evals,
}


STAGE_COMMAND_MODULES: list[str] = ["scalelab.cli.infer", "scalelab.cli.serve", "scalelab.cli.parallel",
                                    "scalelab.cli.posttrain", "scalelab.cli.experiments",
                                    "scalelab.cli.evals", "scalelab.cli.tasks", "scalelab.cli.adapt"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except ScalelabError as e:
        print(f"scalelab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("scalelab: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
