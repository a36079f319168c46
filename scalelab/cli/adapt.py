"""``scalelab embed RUN_DIR --text ...``: sentence embeddings from a run's model.

Registered from scalelab/cli/main.py STAGE_COMMAND_MODULES; imports nothing heavy at top level.
"""

from __future__ import annotations

from pathlib import Path

from scalelab.errors import ScalelabError


def register(sub, add_config_args) -> dict:
    p = sub.add_parser("embed", help="embed texts with a run's model (pooled hidden states) into .npy or .jsonl")
    p.add_argument("run_dir")
    p.add_argument("--text", "-t", action="append", default=[], help="a text to embed (repeatable)")
    p.add_argument("--file", "-f", default=None, help="a file with one text per line (blank lines skipped)")
    p.add_argument("--pool", choices=["mean", "last"], default="mean",
                   help="mean over real tokens, or the last real token")
    p.add_argument("--layer", type=int, default=-1, help="block whose output to read (-1: the last, as the LM head sees it)")
    p.add_argument("--no-normalize", action="store_true", help="keep raw vectors instead of unit length")
    p.add_argument("--out", "-o", default=None, help="write embeddings to .npy (N x D) or .jsonl (text + embedding)")
    return {"embed": _cmd_embed}


def _read_texts(args) -> list[str]:
    texts = list(args.text)
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise ScalelabError(f"text file not found: {path}")
        texts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts or not all(t.strip() for t in texts):
        raise ScalelabError("no texts to embed: give --text (non-empty) or --file with one text per line")
    return texts


def _cmd_embed(args) -> None:
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix not in (".npy", ".jsonl"):
        raise ScalelabError(f"--out must end in .npy or .jsonl, got {out.name}")
    # deferred: torch and the model code are slow to import; `scalelab --help` should not pay for them
    import json

    import numpy as np
    import torch

    from scalelab.adapt.embed import embed_texts
    from scalelab.run import Run

    run = Run.open(args.run_dir)
    tokenizer = run.tokenizer
    texts = _read_texts(args)
    torch.manual_seed(0)
    model = run.load_model("cpu")
    emb = embed_texts(model, tokenizer, texts, pool=args.pool,
                      normalize=not args.no_normalize, layer=args.layer)
    arr = emb.numpy().astype(np.float32)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".npy":
            np.save(out, arr)
        else:
            with open(out, "w", encoding="utf-8") as f:
                for t, v in zip(texts, arr):
                    f.write(json.dumps({"text": t, "embedding": [round(float(x), 6) for x in v]}) + "\n")
    print(f"{len(texts)} texts -> embeddings of shape {tuple(arr.shape)} ({args.pool} pooling, layer {args.layer})"
          + (f", written to {out}" if out else ""))
    if 1 < len(texts) <= 8:
        unit = emb / emb.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        sims = (unit @ unit.T).numpy()
        print("cosine similarity:")
        for i, t in enumerate(texts):
            print("  " + " ".join(f"{s:+.3f}" for s in sims[i]) + f"  {t[:60]}")
