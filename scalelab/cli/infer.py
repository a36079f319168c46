"""``scalelab export``: hand a trained run to other tools (Hugging Face transformers for now)."""

from __future__ import annotations

import json


def register(sub, add_config_args) -> dict:
    p = sub.add_parser("export", help="export a run's model and tokenizer, e.g. as a Hugging Face transformers folder")
    p.add_argument("run_dir", help="run folder (its latest checkpoint) or one checkpoint folder")
    p.add_argument("--format", "-f", choices=["hf"], default="hf", help="hf: config.json + model.safetensors + tokenizer")
    p.add_argument("--out", "-o", required=True, help="folder to write")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--no-tokenizer", action="store_true", help="weights and config only (byte/char tokenizers)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    return {"export": _cmd_export}


def _cmd_export(args) -> None:
    from scalelab.infer.export_hf import export_run

    out = export_run(args.run_dir, args.out, dtype=args.dtype, with_tokenizer=not args.no_tokenizer,
                     overwrite=args.overwrite)
    arch = json.loads((out / "config.json").read_text())["architectures"][0]
    print(f"exported {args.run_dir} as {arch} ({args.dtype}) to {out}")
