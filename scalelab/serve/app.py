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
import hmac
import json
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from scalelab.errors import ScalelabError
from scalelab.infer.chat import chat_stop_ids, render_chat, uses_template
from scalelab.infer.engine import Engine, GenerationParams
from scalelab.infer.engine import Request as EngineRequest
from scalelab.infer.tools import TOOL_CALL_END, ToolCall, call_tool, tool_call_request, tool_output_tokens
from scalelab.serve.memory import MemoryStore, build_memory_router
from scalelab.serve.protocol import (
    APIError, ParsedRequest, check_context, check_model, parse_completion_prompts, parse_messages, parse_sampling,
)

DEFAULT_MAX_BODY_BYTES = 1 << 20
CHAT_PAGE = Path(__file__).with_name("static") / "chat.html"
MEMORY_FILE = "memory.sqlite"
DEFAULT_MAX_TOOL_CALLS = 4


def load_engine(run_dir: str | Path, max_batch: int = 8, device: str | None = None, compile: bool = False) -> Engine:
    """An engine over a run folder's latest checkpoint and its tokenizer."""
    from scalelab.pipeline import load_run_config
    from scalelab.runtime import resolve_device
    from scalelab.tokenizer import load_tokenizer
    from scalelab.train import checkpoint as ckpt

    run = Path(run_dir)
    if not run.is_dir():
        raise ScalelabError(f"run folder not found: {run}")
    cfg = load_run_config(run)
    dev = resolve_device(device or cfg.run.device)
    return Engine(ckpt.load_model(run, dev), load_tokenizer(run / "tokenizer"), device=dev, max_batch=max_batch,
                  compile=compile)


class _Guard:
    """API-key check and Content-Length limit, before any route reads the request."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            err = None
            if self.api_key and scope["path"].startswith("/v1/"):
                given = headers.get(b"authorization", b"").decode("latin-1")
                if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                    err = APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                                   code="invalid_api_key")
            length = headers.get(b"content-length", b"")
            if err is None and length.isdigit() and int(length) > self.max_body_bytes:
                err = _too_large(self.max_body_bytes)
            if err is not None:
                await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body is larger than the server's limit of {limit} bytes", code="body_too_large")


def create_app(
    engine_or_run_dir: Engine | str | Path,
    model_name: str | None = None,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_batch: int = 8,
    memory: MemoryStore | str | Path | None = None,
    tools: bool = True,
    max_tool_calls: int = DEFAULT_MAX_TOOL_CALLS,
    compile: bool = False,
) -> FastAPI:
    """The server app. A run folder is loaded here; its memories live in RUN_DIR/memory.sqlite unless
    ``memory`` names another store or file (an Engine without one gets an in-memory store).

    With ``tools``, a tool call the model writes (calculator, or ``bio:`` into the memory store) is
    run inside the request and its output fed back before generation goes on, at most
    ``max_tool_calls`` times per choice. An imported checkpoint (its own chat template) is served
    without tools."""
    if isinstance(engine_or_run_dir, Engine):
        engine = engine_or_run_dir
        model_name = model_name or "scalelab"
        default_memory = ":memory:"
    else:
        engine = load_engine(engine_or_run_dir, max_batch=max_batch, compile=compile)
        model_name = model_name or Path(engine_or_run_dir).resolve().name
        default_memory = Path(engine_or_run_dir) / MEMORY_FILE
    own_store = not isinstance(memory, MemoryStore)
    store = memory if isinstance(memory, MemoryStore) else MemoryStore(memory or default_memory)
    tok, context = engine.tokenizer, engine.context
    # Tool calls are written in scalelab's tool tokens; an imported checkpoint has none (its own tool
    # format, if any, lives in its chat template), so it is served without them.
    tools = tools and not uses_template(tok)
    handler = store.tool_handler() if tools else None
    page = CHAT_PAGE.read_text(encoding="utf-8")
    created = int(time.time())

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
    app.state.engine, app.state.memory, app.state.tools = engine, store, tools
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    app.include_router(build_memory_router(store))

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        err = APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        err = APIError(500, f"internal error: {type(exc).__name__}", kind="server_error")
        return JSONResponse(err.body(), status_code=500)

    async def read_json(request: Request) -> dict:
        chunks, size = [], 0
        async for chunk in request.stream():  # counted as it arrives: chunked bodies have no Content-Length
            size += len(chunk)
            if size > max_body_bytes:
                raise _too_large(max_body_bytes)
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"We could not parse the JSON body of your request ({e})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_type")
        return body

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "scalelab",
                "context_length": context}

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse(page.replace("__MODEL__", json.dumps(model_name)))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "running": engine.num_running, "waiting": engine.num_waiting}

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
        body = await read_json(request)
        check_model(body, model_name)
        parsed = parse_sampling(body, context, engine.max_batch, (tok.bos_id,), chat=False)
        try:
            parsed.prompts = parse_completion_prompts(body, tok)
        except ScalelabError as e:
            raise APIError(400, str(e), param="prompt") from None
        if len(parsed.prompts) * parsed.params.n > engine.max_batch * 4:
            raise APIError(400, "too many prompts × n in one request", param="prompt")
        check_context(parsed.prompts, context, parsed.params.truncate_prompt, "prompt")
        return await _respond(parsed, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request)
        check_model(body, model_name)
        parsed = parse_sampling(body, context, engine.max_batch, chat_stop_ids(tok), chat=True)
        messages = parse_messages(body)
        # a conversation with no reply yet is a new one: it starts with what the user asked us to remember
        preamble = store.context_block() if not any(m["role"] == "assistant" for m in messages) else ""
        try:
            parsed.prompts = [render_chat(tok, messages, preamble=preamble, tool_markers=True)]
        except ScalelabError as e:
            raise APIError(400, str(e), param="messages") from None
        check_context(parsed.prompts, context, parsed.params.truncate_prompt, "messages")
        return await _respond(parsed, chat=True)

    async def _respond(parsed: ParsedRequest, chat: bool):
        run = _Run(engine, parsed, handler, max_tool_calls)
        run.start()
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        shape = _Shape(rid, model_name, chat, parsed, tok)
        if parsed.stream:
            return StreamingResponse(_stream(shape, run), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            async for _ in run.pieces():
                pass
        except _GenerationFailed:
            raise APIError(500, "generation failed on the server", kind="server_error") from None
        finally:
            run.cancel()  # no-op when finished; frees the slots when the client went away
        return shape.full_response(run)

    async def _stream(shape: "_Shape", run: "_Run"):
        try:
            if shape.chat:
                for ch in run.choices:
                    yield _sse(shape.chunk(ch.ci, {"role": "assistant", "content": ""}, None, []))
            try:
                async for piece in run.pieces():
                    delta = {"content": piece.text} if piece.text or not shape.chat else {}
                    yield _sse(shape.chunk(piece.ci, delta, piece.finish, piece.toks, text=piece.text,
                                           call=piece.call))
            except _GenerationFailed:
                yield _sse(APIError(500, "generation failed on the server", kind="server_error").body())
            else:
                if shape.parsed.include_usage:
                    yield _sse(shape.usage_chunk(run))
            yield "data: [DONE]\n\n"
        finally:
            run.cancel()

    return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Shape:
    """OpenAI response objects for one request: chat or text completion, whole or chunked."""

    def __init__(self, rid: str, model: str, chat: bool, parsed: ParsedRequest, tok):
        self.rid, self.model, self.chat, self.parsed, self.tok = rid, model, chat, parsed, tok
        self.created = int(time.time())
        self.offsets: dict[int, int] = {}

    def _logprobs(self, ci: int, toks: list[tuple[int, float | None]]):
        # tool-output tokens were inserted, not sampled: their logprob is null
        if not self.parsed.logprobs:
            return None
        strs = [self.tok.decode([t]) for t, _ in toks]
        if self.chat:
            return {"content": [{"token": s, "logprob": lp, "bytes": list(s.encode("utf-8")), "top_logprobs": []}
                                for s, (_, lp) in zip(strs, toks)]}
        offsets, at = [], self.offsets.get(ci, 0)
        for s in strs:
            offsets.append(at)
            at += len(s)
        self.offsets[ci] = at
        return {"tokens": strs, "token_logprobs": [lp for _, lp in toks], "top_logprobs": None, "text_offset": offsets}

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
    pass


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

    def __init__(self, engine: Engine, parsed: ParsedRequest, handler, max_tool_calls: int):
        self.engine, self.tok, self.handler, self.max_tool_calls = engine, engine.tokenizer, handler, max_tool_calls
        self.prompts = parsed.prompts
        params = parsed.params
        if handler is not None:
            # a stop *string*: the engine keeps its tokens, so a stop on the call is told apart from other stops
            params = replace(params, stop_strings=tuple(params.stop_strings) + (TOOL_CALL_END,))
        self.params = params
        self.call_end = self.tok.token_id(TOOL_CALL_END) if handler is not None else None
        n = params.n
        self.choices = [_Choice(i * n + j, i, j) for i in range(len(self.prompts)) for j in range(n)]
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.live: list[EngineRequest] = []
        self.open = 0

    def _submit(self, prompt: list[int], params: GenerationParams, cis: list[int],
                prompt_index: int) -> EngineRequest:
        sub = _Sub(cis)

        def on_event(ev):
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, (sub, ev))
            except RuntimeError:  # the event loop closed under us: the server is shutting down
                pass

        # events are handled on this loop, so sub.req is set before the first one is read
        sub.req = self.engine.submit(prompt, params, on_event=on_event, prompt_index=prompt_index)
        self.live.append(sub.req)
        self.open += 1
        for ci in cis:
            self.choices[ci].sub = sub
        return sub.req

    def start(self) -> None:
        n = self.params.n
        try:
            for i, p in enumerate(self.prompts):
                req = self._submit(p, self.params, list(range(i * n, (i + 1) * n)), i)
                for ch in self.choices[i * n : (i + 1) * n]:
                    ch.prompt, ch.seed = req.prompt, req.params.seed
        except ScalelabError as e:
            self.cancel()
            raise APIError(400, str(e)) from None
        self.prompts = [r.prompt for r in self.live]

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
                    raise _GenerationFailed()
                for ci in sub.cis:  # cancelled (server shutdown) before its sample finished
                    ch = self.choices[ci]
                    if ch.sub is sub and ch.finish is None:
                        yield self._piece(ch, "", "cancelled")
                continue
            ch = self.choices[sub.cis[ev.index]]
            if ev.token is not None:
                ch.tokens.append(ev.token)
                ch.segment.append(ev.token)
                ch.pending.append((ev.token, ev.logprob))
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
        ch.pending.extend((t, None) for t in feedback)
        # the stop string (the call's end) was cut from the model's text: show it again, then the output
        text += self.tok.decode([self.call_end] + feedback)
        room = self.params.max_new_tokens - len(ch.tokens)
        extended = ch.prompt + ch.tokens
        if room <= 0 or len(extended) >= self.engine.context:
            return self._piece(ch, text, "length", call)
        params = replace(self.params, n=1, max_new_tokens=room, truncate_prompt=False,
                         seed=_derived_seed(ch.seed, ch.sample, len(ch.calls) + 1))
        try:
            self._submit(extended, params, [ch.ci], ch.prompt_index)
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
