"""``scalelab eval RUN_DIR``: evaluate one run.

Without task flags it is the run's standard evaluation (val loss, bits per byte, n-gram baseline,
task exact match). With ``--tasks`` / ``--probes`` it runs the harness (scalelab/evals/harness.py) on
the run folder or on a Hugging Face folder (``scalelab export``), writes JSON and prints a table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def register(sub, add_config_args) -> dict:
    p = sub.add_parser("eval", help="evaluate a run: val loss, bits per byte, n-gram baseline, task exact match; "
                                    "or --tasks/--probes: the evaluation harness (also on a Hugging Face folder)")
    p.add_argument("run_dir", nargs="?", help="a run folder, a checkpoint folder, or a Hugging Face export folder")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--tasks", help="comma-separated harness tasks (see --list-tasks)")
    p.add_argument("--shots", default="0", help="comma-separated shot counts, e.g. 0,1,5 (default 0)")
    p.add_argument("--n", type=int, default=100, help="test items per task (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed for test sampling and shot draws (default 0)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--probes", action="store_true", help="also run the behaviour probes (scalelab/evals/probes.py)")
    p.add_argument("--judge", choices=("rule", "learned"), default="rule",
                   help="judge for win-rate tasks: exact-match rule, or the learned trigram answer scorer")
    p.add_argument("--list-tasks", action="store_true", help="list the harness tasks and exit")
    return {"eval": _run}


def _run(args) -> None:
    from scalelab.errors import ScalelabError

    if args.list_tasks:
        from scalelab.evals.harness import available_tasks, get_task

        for name in available_tasks():
            spec = get_task(name)
            print(f"{name:16s} {spec.kind:9s} {', '.join(spec.metrics):50s} {spec.description}")
        return
    if not args.run_dir:
        raise ScalelabError("eval needs a RUN_DIR (or --list-tasks)")
    if args.tasks is None and not args.probes:
        from scalelab.pipeline import evaluate
        from scalelab.run import Run

        cfg = Run.open(args.run_dir, args.overrides).cfg
        print_eval(evaluate(args.run_dir, cfg))
        return
    run_harness(args)


def run_harness(args) -> dict:
    from scalelab.evals.fewshot import parse_shots
    from scalelab.evals.harness import TaskContext, format_table, learned_judge, parse_tasks, run_eval
    from scalelab.evals.lm import find_world, load_lm
    from scalelab.errors import ScalelabError

    # Arguments first, so a typo fails before a model is loaded.
    tasks = parse_tasks(args.tasks) if args.tasks is not None else []
    shots = parse_shots(args.shots)
    if args.n < 1:
        raise ScalelabError(f"--n must be at least 1, got {args.n}")
    if args.out and Path(args.out).is_dir():
        raise ScalelabError(f"--out {args.out} is a folder; give a file name such as results.json")
    lm = load_lm(args.run_dir)
    world = find_world(args.run_dir)
    ctx = TaskContext(world=world, seed=args.seed, n=args.n)
    judge = learned_judge(seed=args.seed) if args.judge == "learned" else None
    result = run_eval(lm, tasks, shots, ctx, judge=judge, progress=lambda s: print(s, file=sys.stderr))
    result["run_dir"], result["judge"] = str(args.run_dir), args.judge
    if tasks:
        print(format_table(result))
    if args.probes:
        from scalelab.evals.probes import build_probes, format_probe_table, run_probes

        result["probes"] = run_probes(lm, build_probes(world, n_per_dimension=min(args.n, 50), seed=args.seed))
        print(format_probe_table(result["probes"]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"results: {args.out}")
    return result


def print_eval(ev: dict) -> None:
    """The summary of the classic evaluation (``scalelab eval RUN_DIR`` and the end of ``pretrain``)."""
    from scalelab.evals.metrics import bits_vs_baseline  # like the rest of this file: torch loads only when run

    print(f"val loss {ev['val_loss']:.4f} nats/token | val bpb {ev['val_bpb']:.4f} | "
          f"{ev['ngram_order']}-gram KN bpb {ev['ngram_val_bpb']:.4f} "
          f"({bits_vs_baseline(ev['bpb_improvement_over_ngram'])} than the baseline)")
    for name, t in ev.get("tasks", {}).items():
        print(f"  {name}: exact match {t['accuracy']:.3f} (n={t['n']})")
