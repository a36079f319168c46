"""``scalelab serve RUN_DIR``: the OpenAI-compatible server and web chat over a run's model."""

from __future__ import annotations

import gc
import os


def register(sub, add_config_args) -> dict:
    p = sub.add_parser("serve", help="serve a run's model: OpenAI-compatible API and a web chat page")
    p.add_argument("run_dir", help="run folder (its latest checkpoint and tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/; repeat for several callers, each with its own "
                        "memories and limits (default: $SCALELAB_API_KEY, comma-separated, else none)")
    p.add_argument("--allowed-host", action="append", default=None,
                   help="a host name clients use to reach the server (Host header), besides the bound address")
    p.add_argument("--cors-origin", action="append", default=None,
                   help="a web origin (https://app.example) whose pages may call the API from a browser")
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
    p.add_argument("--max-queue", type=int, default=None,
                   help="prompts that may wait for a batch slot; past it requests get 429 (default 4 x max batch)")
    p.add_argument("--max-per-caller", type=int, default=None,
                   help="requests one API key (or user) may have in flight; past it 429 (default 2 x max batch)")
    p.add_argument("--queue-timeout", type=float, default=None,
                   help="seconds a request may wait for a slot before a 503 (default 60)")
    p.add_argument("--header-timeout", type=float, default=None,
                   help="seconds a connection has to send its request headers, else it is closed (default 10)")
    p.add_argument("--body-timeout", type=float, default=None,
                   help="seconds a request body has to arrive in full after its headers, else 408 (default 30)")
    p.add_argument("--drain-timeout", type=float, default=None,
                   help="seconds the server reads and drops the rest of a body it refused with 413 before it "
                        "closes the connection (default 30)")
    p.add_argument("--memory-budget", type=int, default=None,
                   help="tokens of memories a new chat starts with, newest first (default: a quarter of the context)")
    return {"serve": _cmd_serve}


def _cmd_serve(args) -> None:
    import uvicorn

    from scalelab.errors import ScalelabError
    from scalelab.serve.app import DEFAULT_MAX_TOOL_CALLS, DEFAULT_QUEUE_TIMEOUT_S, create_app
    from scalelab.serve.guard import (
        DEFAULT_BODY_TIMEOUT_S, DEFAULT_DRAIN_TIMEOUT_S, DEFAULT_HEADER_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, timed_protocol,
    )

    if args.max_batch < 1 or args.threads < 1:
        raise ScalelabError("--max-batch and --threads must be at least 1")
    max_tool_calls = DEFAULT_MAX_TOOL_CALLS if args.max_tool_calls is None else args.max_tool_calls
    if max_tool_calls < 0:
        raise ScalelabError("--max-tool-calls must be at least 0")
    for name in ("max_queue", "max_per_caller", "queue_timeout", "header_timeout", "body_timeout", "drain_timeout",
                 "memory_budget", "max_body_bytes"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ScalelabError(f"--{name.replace('_', '-')} must be positive")
    keys = args.api_key
    if keys is None:
        keys = [k.strip() for k in os.environ.get("SCALELAB_API_KEY", "").split(",") if k.strip()]
    import torch

    torch.set_num_threads(args.threads)
    app = create_app(args.run_dir, model_name=args.model_name, api_key=keys, max_batch=args.max_batch,
                     max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES, memory=args.memory,
                     tools=not args.no_tools, max_tool_calls=max_tool_calls, compile=args.compile, host=args.host,
                     allowed_hosts=args.allowed_host, cors_origins=args.cors_origin, max_queue=args.max_queue,
                     max_per_caller=args.max_per_caller, queue_timeout=args.queue_timeout or DEFAULT_QUEUE_TIMEOUT_S,
                     memory_budget=args.memory_budget, body_timeout=args.body_timeout or DEFAULT_BODY_TIMEOUT_S)
    engine = app.state.engine
    print(f"serving {args.run_dir} (context {engine.context}, max batch {engine.max_batch}, "
          f"queue {engine.max_waiting}, tools {'on' if app.state.tools else 'off'}) "
          f"at http://{args.host}:{args.port}/ {f'with {len(keys)} API key(s)' if keys else 'without an API key'}",
          flush=True)
    # What is loaded by now (torch, the model, the web stack: ~350k objects) lives as long as the server.
    # Frozen, a full garbage collection no longer walks it: one took 0.5-0.9 s on a shared 2-core host,
    # with the GIL held, stalling every stream and the engine at once (the tail of bench/serve_faults.py).
    gc.collect()
    gc.freeze()
    protocol = timed_protocol(args.header_timeout or DEFAULT_HEADER_TIMEOUT_S,
                              args.drain_timeout or DEFAULT_DRAIN_TIMEOUT_S)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", http=protocol)
