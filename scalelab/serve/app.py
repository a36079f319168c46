"""The OpenAI-compatible HTTP server: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``,
the user's memories (``/v1/memories``), and a web chat page at ``/``.

One :class:`~scalelab.infer.engine.Engine` runs on a background thread; each
HTTP request submits its prompts and awaits their tokens through an asyncio
queue, so many requests share every decode step (continuous batching). A tool
call the model writes is run between engine requests (:class:`_Run`): the
sample ends on the call, the output is appended, and the sequence re-enters the
queue.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from scalelab.errors import ScalelabError
from scalelab.infer.chat import chat_stop_ids, render_chat, uses_template
from scalelab.infer.engine import Engine, GenerationParams, QueueFull, QueueTimeout
from scalelab.infer.engine import Request as EngineRequest
from scalelab.infer.tools import TOOL_CALL_END, ToolCall, call_tool, tool_call_request, tool_output_tokens
from scalelab.run import Run
from scalelab.runtime import resolve_device
from scalelab.serve.guard import CALLER_SCOPE_KEY, DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, Guard, check_api_keys
from scalelab.serve.limits import Admission, metrics_text, overloaded
from scalelab.serve.mailbox import mailbox_for
from scalelab.serve.memory import MemoryStore, build_memory_router, owner_of
from scalelab.serve.protocol import (
    APIError, ParsedRequest, check_context, check_model, fit_text_before_encoding, parse_completion_prompts,
    parse_messages, parse_sampling, read_json,
)

CHAT_PAGE = Path(__file__).with_name("static") / "chat.html"
MEMORY_FILE = "memory.sqlite"
DEFAULT_MAX_TOOL_CALLS = 4
DEFAULT_QUEUE_TIMEOUT_S = 60.0
PROMPTS_PER_SLOT = 4  # prompts × n one completions request may carry, per batch slot


def default_limits(max_batch: int) -> dict:
    """Queue and per-caller limits that scale with the batch: a queue four batches deep, and one
    caller holding at most two batches' worth of requests."""
    return {"max_queue": 4 * max_batch, "max_per_caller": 2 * max_batch}


def load_engine(run_dir: str | Path, max_batch: int = 8, device: str | None = None, compile: bool = False,
                max_waiting: int | None = None) -> Engine:
    """An engine over a run folder's latest checkpoint and its tokenizer."""
    run = Run.open(run_dir)
    dev = resolve_device(device or run.cfg.run.device)
    return Engine(run.load_model(dev), run.tokenizer, device=dev, max_batch=max_batch, compile=compile,
                  max_waiting=max_waiting)


def create_app(
    engine_or_run_dir: Engine | str | Path,
    model_name: str | None = None,
    api_key: str | list[str] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_batch: int = 8,
    memory: MemoryStore | str | Path | None = None,
    tools: bool = True,
    max_tool_calls: int = DEFAULT_MAX_TOOL_CALLS,
    compile: bool = False,
    host: str = "127.0.0.1",
    allowed_hosts: list[str] | None = None,
    cors_origins: list[str] | None = None,
    max_queue: int | None = None,
    max_per_caller: int | None = None,
    queue_timeout: float | None = DEFAULT_QUEUE_TIMEOUT_S,
    memory_budget: int | None = None,
    body_timeout: float = DEFAULT_BODY_TIMEOUT_S,
) -> FastAPI:
    """The server app. A run folder is loaded here; its memories live in RUN_DIR/memory.sqlite unless
    ``memory`` names another store or file (an Engine without one gets an in-memory store).

    With ``tools``, a tool call the model writes (calculator, or ``bio:`` into the memory store) is
    run inside the request and its output fed back before generation goes on, at most
    ``max_tool_calls`` times per choice. An imported checkpoint (its own chat template) is served
    without tools.

    ``api_key``: one key or several (each caller's memories and limits are its key's); ``host`` is
    the bound address, which Host headers must name (or one of ``allowed_hosts``); browser pages
    from ``cors_origins`` may call the API. ``max_queue`` engine requests may wait (an Engine
    passed in keeps its own ``max_waiting``), each for ``queue_timeout`` seconds; one caller may
    have ``max_per_caller`` requests in flight (defaults: :func:`default_limits`). A new chat's
    memory block gets ``memory_budget`` tokens (default: a quarter of the context). A request body
    must arrive within ``body_timeout`` seconds of its headers (else 408); one over ``max_body_bytes``
    gets a 413 (the connection-level deadlines are :func:`~scalelab.serve.guard.timed_protocol`'s)."""
    limits = default_limits(max_batch if not isinstance(engine_or_run_dir, Engine) else engine_or_run_dir.max_batch)
    if isinstance(engine_or_run_dir, Engine):
        engine = engine_or_run_dir
        model_name = model_name or "scalelab"
        default_memory = ":memory:"
    else:
        engine = load_engine(engine_or_run_dir, max_batch=max_batch, compile=compile,
                             max_waiting=max_queue or limits["max_queue"])
        model_name = model_name or Path(engine_or_run_dir).resolve().name
        default_memory = Path(engine_or_run_dir) / MEMORY_FILE
    keys = check_api_keys([api_key] if isinstance(api_key, str) else list(api_key or []))
    admission = Admission(max_per_caller or limits["max_per_caller"])
    own_store = not isinstance(memory, MemoryStore)
    store = memory if isinstance(memory, MemoryStore) else MemoryStore(memory or default_memory)
    tok, context = engine.tokenizer, engine.context
    budget = memory_budget if memory_budget is not None else context // 4
    max_token_bytes = max(1, int(tok.token_byte_lengths().max()))
    # Tool calls are written in scalelab's tool tokens; an imported checkpoint has none (its own tool
    # format, if any, lives in its chat template), so it is served without them.
    tools = tools and not uses_template(tok)
    page = CHAT_PAGE.read_text(encoding="utf-8")
    created = int(time.time())

    def count_tokens(text: str) -> int:
        return len(tok.encode(text))

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()
            if own_store:
                store.close()

    app = FastAPI(title="scalelab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.memory, app.state.tools, app.state.admission = engine, store, tools, admission
    app.add_middleware(Guard, api_keys=keys, max_body_bytes=max_body_bytes, bind=host, allowed_hosts=allowed_hosts,
                       cors_origins=cors_origins, on_reject=admission.reject, body_timeout=body_timeout)
    if cors_origins:  # outside the guard: it answers the browser's preflight requests itself
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "PATCH",
                           "DELETE"], allow_headers=["Authorization", "Content-Type", "X-Scalelab-User"])
    app.include_router(build_memory_router(store, budget, count_tokens))

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        err = APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        err = APIError(500, f"internal error: {type(exc).__name__}", kind="server_error")
        return JSONResponse(err.body(), status_code=500)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "scalelab",
                "context_length": context}

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse(page.replace("__MODEL__", json.dumps(model_name)))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "running": engine.num_running, "waiting": engine.num_waiting,
                "queue_limit": engine.max_waiting, "in_flight": sum(admission.in_flight.values())}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(metrics_text(engine, admission), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id != model_name:
            raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _admitted(request, _completion_request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _admitted(request, _chat_request, chat=True)

    async def _admitted(request: Request, prepare, chat: bool):
        """A generation request, refused with a 429 before any parsing or tokenizing when its caller is
        over its limit or the queue is full: a burst costs the server little more than its bodies."""
        body = await read_json(request)
        check_model(body, model_name)
        caller = request.scope.get(CALLER_SCOPE_KEY, "local")
        release = admission.acquire(caller)
        try:
            past_full_queue = admission.within_fair_share(caller, engine.max_waiting)
            if not past_full_queue and engine.max_waiting is not None and engine.num_waiting >= engine.max_waiting:
                raise QueueFull(f"the server's queue is full ({engine.max_waiting} requests waiting)")
            parsed, headers = await prepare(request, body)
            return await _respond(request, parsed, chat, release, past_full_queue, headers)
        except QueueFull as e:
            release()
            admission.reject("queue_full")
            raise overloaded(f"{e}: try again shortly", "queue_full") from None
        except BaseException:
            release()
            raise

    async def _completion_request(request: Request, body: dict) -> tuple[ParsedRequest, dict | None]:
        parsed = parse_sampling(body, context, engine.max_batch, (tok.bos_id,), chat=False)
        truncate = parsed.params.truncate_prompt
        prompts = parse_completion_prompts(body, tok.vocab_size, engine.max_batch * PROMPTS_PER_SLOT // parsed.params.n)
        texts = [fit_text_before_encoding(p, context, max_token_bytes, truncate, "prompt")
                 for p in prompts if isinstance(p, str)]
        if texts:  # text prompts start with BOS, as every pretraining document did
            prompts = [[tok.bos_id] + ids for ids in await asyncio.to_thread(tok.encode_batch, texts)]
        parsed.prompts = prompts
        check_context(parsed.prompts, context, truncate, "prompt")
        return parsed, None

    async def _chat_request(request: Request, body: dict) -> tuple[ParsedRequest, dict | None]:
        parsed = parse_sampling(body, context, engine.max_batch, chat_stop_ids(tok), chat=True)
        messages = parse_messages(body)
        truncate = parsed.params.truncate_prompt
        fit_text_before_encoding("".join(m["content"] for m in messages), context, max_token_bytes, truncate,
                                 "messages")
        owner = owner_of(request)
        new_chat = not any(m["role"] == "assistant" for m in messages)

        def render() -> tuple[list[int], int]:
            # a conversation with no reply yet is a new one: it starts with what the user asked us to remember
            preamble, _, dropped = store.fitted_block(owner, budget, count_tokens) if new_chat else ("", 0, 0)
            return render_chat(tok, messages, preamble=preamble, tool_markers=True), dropped

        try:
            prompt, dropped = await asyncio.to_thread(render)
        except ScalelabError as e:
            raise APIError(400, str(e), param="messages") from None
        admission.memories_dropped += dropped
        parsed.prompts = [prompt]
        check_context(parsed.prompts, context, truncate, "messages")
        return parsed, {"X-Scalelab-Memories-Dropped": str(dropped)}

    async def _respond(request: Request, parsed: ParsedRequest, chat: bool, release, past_full_queue: bool,
                       headers: dict | None):
        """Generation for an admitted request; ``release`` (its caller's slot) is called once it ends."""
        caller = request.scope.get(CALLER_SCOPE_KEY, "local")
        run = _Run(engine, parsed, store.tool_handler(owner_of(request)) if tools else None, max_tool_calls,
                   queue_timeout, caller)
        run.start(over_limit=past_full_queue)
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        shape = _Shape(rid, model_name, chat, parsed, tok)
        if parsed.stream:
            admission.responses[200] += 1
            return StreamingResponse(_stream(shape, run, release), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        watcher = asyncio.create_task(_cancel_when_gone(request, run))
        try:
            async for _ in run.pieces():
                pass
        except _GenerationFailed as e:
            status = 503 if isinstance(e.error, QueueTimeout) else 500
            admission.responses[status] += 1
            if status == 503:
                raise overloaded(f"{e.error}: the server is busy, try again", "queue_timeout", 503) from None
            raise APIError(500, "generation failed on the server", kind="server_error") from None
        finally:
            watcher.cancel()
            run.cancel()  # no-op when finished; frees the slots when the client went away
            release()
        admission.responses[200] += 1
        return JSONResponse(shape.full_response(run), headers=headers)

    async def _cancel_when_gone(request: Request, run: "_Run") -> None:
        # the body is read: what the server hears from the client now is that it went away
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                admission.disconnects += 1
                run.cancel()
                return

    async def _stream(shape: "_Shape", run: "_Run", release):
        try:
            if shape.chat:
                for ch in run.choices:
                    yield _sse(shape.chunk(ch.ci, {"role": "assistant", "content": ""}, None, []))
            try:
                async for piece in run.pieces():
                    delta = {"content": piece.text} if piece.text or not shape.chat else {}
                    yield _sse(shape.chunk(piece.ci, delta, piece.finish, piece.toks, text=piece.text,
                                           call=piece.call))
            except _GenerationFailed as e:
                if isinstance(e.error, QueueTimeout):
                    yield _sse(overloaded(f"{e.error}: the server is busy, try again", "queue_timeout", 503).body())
                else:
                    yield _sse(APIError(500, "generation failed on the server", kind="server_error").body())
            else:
                if shape.parsed.include_usage:
                    yield _sse(shape.usage_chunk(run))
            yield "data: [DONE]\n\n"
        finally:
            run.cancel()
            release()

    return app


def _top_map(tok, top: list[tuple[int, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for t, v in top:  # likeliest first: a later token with the same text does not overwrite it
        out.setdefault(tok.decode([t]), v)
    return out


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Shape:
    """OpenAI response objects for one request: chat or text completion, whole or chunked."""

    def __init__(self, rid: str, model: str, chat: bool, parsed: ParsedRequest, tok):
        self.rid, self.model, self.chat, self.parsed, self.tok = rid, model, chat, parsed, tok
        self.created = int(time.time())
        self.offsets: dict[int, int] = {}

    def _logprobs(self, ci: int, toks: list[tuple[int, float | None, list | None]]):
        # tool-output tokens were inserted, not sampled: their logprob is null and they have no alternatives
        if not self.parsed.logprobs:
            return None
        strs = [self.tok.decode([t]) for t, _, _ in toks]
        if self.chat:
            def entry(s: str, lp) -> dict:
                return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

            return {"content": [{**entry(s, lp), "top_logprobs": [entry(self.tok.decode([t]), v) for t, v in top or []]}
                                for s, (_, lp, top) in zip(strs, toks)]}
        offsets, at = [], self.offsets.get(ci, 0)
        for s in strs:
            offsets.append(at)
            at += len(s)
        self.offsets[ci] = at
        # OpenAI's legacy format: one {token: logprob} map per position (same-text tokens collapse into one key)
        tops = None
        if self.parsed.params.top_logprobs:
            tops = [_top_map(self.tok, top) if top else None for _, _, top in toks]
        return {"tokens": strs, "token_logprobs": [lp for _, lp, _ in toks], "top_logprobs": tops,
                "text_offset": offsets}

    @staticmethod
    def _usage(run: "_Run") -> dict:
        prompt = sum(len(p) for p in run.prompts)
        completion = sum(len(ch.tokens) for ch in run.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _head(self, kind: str) -> dict:
        return {"id": self.rid, "object": kind, "created": self.created, "model": self.model}

    def chunk(self, ci: int, delta: dict, finish: str | None, toks, text: str = "",
              call: ToolCall | None = None) -> dict:
        if self.chat:
            choice = {"index": ci, "delta": delta, "logprobs": self._logprobs(ci, toks), "finish_reason": finish}
            out = self._head("chat.completion.chunk")
        else:
            choice = {"index": ci, "text": text, "logprobs": self._logprobs(ci, toks), "finish_reason": finish}
            out = self._head("text_completion")
        if call is not None:
            choice["scalelab_tool_call"] = asdict(call)
        out["choices"] = [choice]
        if self.parsed.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, run: "_Run") -> dict:
        out = self._head("chat.completion.chunk" if self.chat else "text_completion")
        out["choices"] = []
        out["usage"] = self._usage(run)
        return out

    def full_response(self, run: "_Run") -> dict:
        choices = []
        for ch in run.choices:
            lp = self._logprobs(ch.ci, ch.logprobs)
            text = "".join(ch.texts)
            if self.chat:
                choice = {"index": ch.ci, "message": {"role": "assistant", "content": text},
                          "logprobs": lp, "finish_reason": ch.finish}
            else:
                choice = {"index": ch.ci, "text": text, "logprobs": lp, "finish_reason": ch.finish}
            if ch.calls:
                choice["scalelab_tool_calls"] = [asdict(c) for c in ch.calls]
            choices.append(choice)
        out = self._head("chat.completion" if self.chat else "text_completion")
        out["choices"] = choices
        out["usage"] = self._usage(run)
        return out


class _GenerationFailed(Exception):
    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


@dataclass
class _Piece:
    """A part of one choice's output, in order: what a stream chunk carries."""

    ci: int
    text: str
    toks: list[tuple[int, float | None]]
    finish: str | None = None
    call: ToolCall | None = None


@dataclass(eq=False)
class _Choice:
    ci: int
    prompt_index: int
    sample: int
    prompt: list[int] = field(default_factory=list)  # as the engine ran it (after any truncation)
    seed: int = 0
    tokens: list[int] = field(default_factory=list)  # every new token: the model's and the inserted tool outputs
    segment: list[int] = field(default_factory=list)  # the model's tokens since the last tool output
    segment_chars: int = 0
    pending: list = field(default_factory=list)  # (token, logprob) not yet sent with a piece
    logprobs: list = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)
    finish: str | None = None
    sub: "_Sub | None" = None  # the engine request now generating this choice


@dataclass(eq=False)
class _Sub:
    cis: list[int]  # choice index of each of the engine request's samples
    req: EngineRequest | None = None


class _Run:
    """One API request's generation: its engine requests, and the tool calls that extend them.

    When a sample stops on ``<|tool_call_end|>``, its call runs in a worker thread (the engine's
    thread never waits on a tool), the output tokens are appended, and the extended sequence
    goes back into the engine's queue as a new one-sample request with what is left of the
    token budget. The prompt is prefilled again rather than reusing the finished slot's cache:
    the engine has no hook to keep a slot, and a prefill costs one batched forward pass.
    """

    def __init__(self, engine: Engine, parsed: ParsedRequest, handler, max_tool_calls: int,
                 queue_timeout: float | None = None, caller: str | None = None):
        self.engine, self.tok, self.handler, self.max_tool_calls = engine, engine.tokenizer, handler, max_tool_calls
        self.queue_timeout, self.caller = queue_timeout, caller
        self.prompts = parsed.prompts
        params = parsed.params
        if handler is not None:
            # a stop *string*: the engine keeps its tokens, so a stop on the call is told apart from other stops
            params = replace(params, stop_strings=tuple(params.stop_strings) + (TOOL_CALL_END,))
        self.params = params
        self.call_end = self.tok.token_id(TOOL_CALL_END) if handler is not None else None
        n = params.n
        self.choices = [_Choice(i * n + j, i, j) for i in range(len(self.prompts)) for j in range(n)]
        self.mailbox = mailbox_for(asyncio.get_running_loop())
        self.events: asyncio.Queue = asyncio.Queue()
        self.live: list[EngineRequest] = []
        self.open = 0

    def _submit_all(self, items: list[tuple[list[int], GenerationParams, list[int], int]],
                    over_limit: bool = False, continuing: bool = False) -> list[EngineRequest]:
        """Queue (prompt, params, choice indices, prompt index) items together; ``over_limit`` ones
        are not held to the queue limit, and a ``continuing`` one (after a tool call: admitted
        already) neither to the limit nor to the queue timeout."""
        subs, specs = [], []
        for prompt, params, cis, prompt_index in items:
            sub = _Sub(cis)

            def on_event(ev, sub=sub):
                self.mailbox.post(self.events, (sub, ev))

            subs.append(sub)
            specs.append((prompt, params, on_event, prompt_index))
        # events are handled on this loop, so sub.req is set before the first one is read
        reqs = self.engine.submit_many(specs, None if continuing else self.queue_timeout,
                                       over_limit=over_limit or continuing, owner=self.caller)
        for sub, req in zip(subs, reqs):
            sub.req = req
            self.live.append(req)
            self.open += 1
            for ci in sub.cis:
                self.choices[ci].sub = sub
        return reqs

    def start(self, over_limit: bool = False) -> None:
        """Queue every prompt, or none (QueueFull when the engine's queue has no room for them all)."""
        n = self.params.n
        items = [(p, self.params, list(range(i * n, (i + 1) * n)), i) for i, p in enumerate(self.prompts)]
        try:
            reqs = self._submit_all(items, over_limit)
        except QueueFull:
            raise
        except ScalelabError as e:
            raise APIError(400, str(e)) from None
        for i, req in enumerate(reqs):
            for ch in self.choices[i * n : (i + 1) * n]:
                ch.prompt, ch.seed = req.prompt, req.params.seed
        self.prompts = [r.prompt for r in reqs]

    def cancel(self) -> None:
        for r in self.live:
            r.cancel()

    async def pieces(self):
        """Every choice's output pieces as they come; the choices' fields hold the whole result after."""
        while self.open:
            sub, ev = await self.events.get()
            if ev is None:
                self.open -= 1
                self.live.remove(sub.req)
                if sub.req.error is not None:
                    raise _GenerationFailed(sub.req.error)
                for ci in sub.cis:  # cancelled (server shutdown) before its sample finished
                    ch = self.choices[ci]
                    if ch.sub is sub and ch.finish is None:
                        yield self._piece(ch, "", "cancelled")
                continue
            ch = self.choices[sub.cis[ev.index]]
            if ev.token is not None:
                ch.tokens.append(ev.token)
                ch.segment.append(ev.token)
                ch.pending.append((ev.token, ev.logprob, ev.top_logprobs))
            ch.segment_chars += len(ev.text)
            if ev.finish_reason == "stop" and self._stopped_on_call(ch):
                yield await self._tool_call(ch, ev.text)
            elif ev.text or ev.finish_reason:
                yield self._piece(ch, ev.text, ev.finish_reason)

    def _piece(self, ch: _Choice, text: str, finish: str | None, call: ToolCall | None = None) -> _Piece:
        piece = _Piece(ch.ci, text, ch.pending, finish, call)
        ch.texts.append(text)
        ch.logprobs.extend(ch.pending)
        ch.pending = []
        if finish is not None:
            ch.finish = finish
        if call is not None:
            ch.calls.append(call)
        return piece

    def _stopped_on_call(self, ch: _Choice) -> bool:
        # The engine cut the text at the earliest stop string; it was the call's end only if the text
        # sent is everything before that last token (a user's stop string could have matched first).
        seg = ch.segment
        return (self.call_end is not None and bool(seg) and seg[-1] == self.call_end
                and ch.segment_chars == len(self.tok.decode(seg[:-1])))

    async def _tool_call(self, ch: _Choice, text: str) -> _Piece:
        if len(ch.calls) >= self.max_tool_calls:
            return self._piece(ch, text, "tool_limit")
        request = tool_call_request(ch.prompt + ch.tokens, len(ch.segment), self.tok)
        call = await asyncio.to_thread(_safe_call, self.handler, request)
        feedback = tool_output_tokens(self.tok, call.output)
        ch.tokens.extend(feedback)
        ch.pending.extend((t, None, None) for t in feedback)
        # the stop string (the call's end) was cut from the model's text: show it again, then the output
        text += self.tok.decode([self.call_end] + feedback)
        room = self.params.max_new_tokens - len(ch.tokens)
        extended = ch.prompt + ch.tokens
        if room <= 0 or len(extended) >= self.engine.context:
            return self._piece(ch, text, "length", call)
        params = replace(self.params, n=1, max_new_tokens=room, truncate_prompt=False,
                         seed=_derived_seed(ch.seed, ch.sample, len(ch.calls) + 1))
        try:
            self._submit_all([(extended, params, [ch.ci], ch.prompt_index)], continuing=True)
        except ScalelabError:
            return self._piece(ch, text, "length", call)
        ch.segment, ch.segment_chars = [], 0
        return self._piece(ch, text, None, call)


def _safe_call(handler, request: str) -> ToolCall:
    try:
        return call_tool(handler, request)
    except Exception as e:  # a bug or a broken store must not take the request down: the model hears of it
        return ToolCall(request=request, output=f"error: the tool failed ({type(e).__name__})", ok=False)


def _derived_seed(seed: int, sample: int, segment: int) -> int:
    # each continuation after a tool call draws from its own stream, reproducible from the request's seed
    digest = hashlib.blake2b(f"{seed}:{sample}:tool:{segment}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
