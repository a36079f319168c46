"""``scalelab serve RUN_DIR``: the OpenAI-compatible server and web chat over a run's model."""

from __future__ import annotations

import os


def register(sub, add_config_args) -> dict:
    p = sub.add_parser("serve", help="serve a run's model: OpenAI-compatible API and a web chat page")
    p.add_argument("run_dir", help="run folder (its latest checkpoint and tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("SCALELAB_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/ (default: $SCALELAB_API_KEY, else none)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (continuous batching)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the run folder's name)")
    p.add_argument("--memory", default=None, help="SQLite file for user memories (default: RUN_DIR/memory.sqlite)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads on CPU (default 1: decoding a few rows is latency-bound, and extra "
                        "threads mostly spin, badly so on a shared machine)")
    p.add_argument("--no-tools", action="store_true",
                   help="do not run tool calls (calculator, bio memory) inside chat and completion requests")
    p.add_argument("--max-tool-calls", type=int, default=None,
                   help="tool calls per choice before the reply ends with finish_reason 'tool_limit' (default 4)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (faster decoding; the first request waits for the compile)")
    p.add_argument("--max-body-bytes", type=int, default=None, help="largest request body accepted (default 1 MiB)")
    return {"serve": _cmd_serve}


def _cmd_serve(args) -> None:
    import uvicorn

    from scalelab.errors import ScalelabError
    from scalelab.serve.app import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_TOOL_CALLS, create_app

    if args.max_batch < 1 or args.threads < 1:
        raise ScalelabError("--max-batch and --threads must be at least 1")
    max_tool_calls = DEFAULT_MAX_TOOL_CALLS if args.max_tool_calls is None else args.max_tool_calls
    if max_tool_calls < 0:
        raise ScalelabError("--max-tool-calls must be at least 0")
    import torch

    torch.set_num_threads(args.threads)
    app = create_app(args.run_dir, model_name=args.model_name, api_key=args.api_key, max_batch=args.max_batch,
                     max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES, memory=args.memory,
                     tools=not args.no_tools, max_tool_calls=max_tool_calls, compile=args.compile)
    engine = app.state.engine
    print(f"serving {args.run_dir} (context {engine.context}, max batch {engine.max_batch}, "
          f"tools {'on' if app.state.tools else 'off'}) "
          f"at http://{args.host}:{args.port}/ {'with' if args.api_key else 'without'} an API key", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
