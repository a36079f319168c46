"""``scalelab parallel explain|matmul-demo``. Nothing heavy at import time: the CLI imports this on every start."""

from __future__ import annotations

import argparse


def register(sub, add_config_args) -> dict:
    p = sub.add_parser(
        "parallel",
        help="device meshes: explain a layout (placements, collectives, bytes) or run the 2x4 matmul demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "explain:     per-parameter placements on a mesh and the collectives of one step, with bytes moved\n"
            "             --mesh DATAxMODEL (FSDP x TP, e.g. 2x4) or REPLICATExSHARDxMODEL (HSDP x TP, e.g. 2x2x4)\n"
            "matmul-demo: C = A @ B (16x16) on 8 local gloo processes of a 2x4 mesh, checked against 1 process"
        ),
    )
    p.add_argument("action", choices=["explain", "matmul-demo"])
    add_config_args(p)
    p.add_argument("--mesh", default="2x4", help="explain: DATAxMODEL or REPLICATExSHARDxMODEL (default 2x4)")
    return {"parallel": _cmd_parallel}


def _cmd_parallel(args) -> None:
    if args.action == "matmul-demo":
        from scalelab.parallel.matmul_demo import run

        run()
        return
    from scalelab.config import load_config
    from scalelab.parallel.explain import render
    from scalelab.parallel.mesh import parse_mesh

    layout = parse_mesh(args.mesh)
    cfg = load_config(args.config, args.overrides)
    note = ""
    if cfg.model.vocab_size <= 0:
        # The real vocabulary comes from the trained tokenizer; explain needs no data, so it estimates.
        cfg.model.vocab_size = cfg.tokenizer.vocab_size if cfg.tokenizer.kind == "bpe" else 256
        note = " (tokenizer.vocab_size; set model.vocab_size for the exact one)"
    print(render(cfg.model, layout, cfg.train.batch_size, cfg.train.grad_accum, note))
