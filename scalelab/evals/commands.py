"""``scalelab eval RUN_DIR``: evaluate one run."""

from __future__ import annotations


def register(sub, add_config_args) -> dict:
    p = sub.add_parser("eval", help="evaluate a run: val loss, bits per byte, n-gram baseline, task exact match")
    p.add_argument("run_dir")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return {"eval": _run}


def _run(args) -> None:
    from scalelab.cli import print_eval
    from scalelab.pipeline import evaluate, load_run_config

    cfg = load_run_config(args.run_dir, args.overrides)
    print_eval(evaluate(args.run_dir, cfg))
