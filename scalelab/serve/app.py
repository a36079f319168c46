"""The OpenAI-compatible HTTP server: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``,
the user's memories (``/v1/memories``), and a web chat page at ``/``.

One :class:`~scalelab.infer.engine.Engine` runs on a background thread; each
HTTP request submits its prompts and awaits their tokens through an asyncio
queue, so many requests share every decode step (continuous batching).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from scalelab.errors import ScalelabError
from scalelab.infer.chat import chat_stop_ids, render_chat
from scalelab.infer.engine import Engine
from scalelab.serve.memory import MemoryStore, build_memory_router
from scalelab.serve.protocol import (
    APIError, ParsedRequest, check_context, check_model, parse_completion_prompts, parse_messages, parse_sampling,
)

DEFAULT_MAX_BODY_BYTES = 1 << 20
CHAT_PAGE = Path(__file__).with_name("static") / "chat.html"
MEMORY_FILE = "memory.sqlite"


def load_engine(run_dir: str | Path, max_batch: int = 8, device: str | None = None) -> Engine:
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
    return Engine(ckpt.load_model(run, dev), load_tokenizer(run / "tokenizer"), device=dev, max_batch=max_batch)


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
) -> FastAPI:
    """The server app. A run folder is loaded here; its memories live in RUN_DIR/memory.sqlite unless
    ``memory`` names another store or file (an Engine without one gets an in-memory store)."""
    if isinstance(engine_or_run_dir, Engine):
        engine = engine_or_run_dir
        model_name = model_name or "scalelab"
        default_memory = ":memory:"
    else:
        engine = load_engine(engine_or_run_dir, max_batch=max_batch)
        model_name = model_name or Path(engine_or_run_dir).resolve().name
        default_memory = Path(engine_or_run_dir) / MEMORY_FILE
    own_store = not isinstance(memory, MemoryStore)
    store = memory if isinstance(memory, MemoryStore) else MemoryStore(memory or default_memory)
    tok, context = engine.tokenizer, engine.context
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
    app.state.engine, app.state.memory = engine, store
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
            parsed.prompts = [render_chat(tok, messages, preamble=preamble)]
        except ScalelabError as e:
            raise APIError(400, str(e), param="messages") from None
        check_context(parsed.prompts, context, parsed.params.truncate_prompt, "messages")
        return await _respond(parsed, chat=True)

    async def _respond(parsed: ParsedRequest, chat: bool):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def listener(i):
            def on_event(ev):
                try:
                    loop.call_soon_threadsafe(events.put_nowait, (i, ev))
                except RuntimeError:  # the event loop closed under us: the server is shutting down
                    pass
            return on_event

        reqs = []
        try:
            for i, p in enumerate(parsed.prompts):
                reqs.append(engine.submit(p, parsed.params, on_event=listener(i), prompt_index=i))
        except ScalelabError as e:
            for r in reqs:
                r.cancel()
            raise APIError(400, str(e)) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        shape = _Shape(rid, model_name, chat, parsed, tok)
        if parsed.stream:
            return StreamingResponse(_stream(shape, reqs, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            open_requests = len(reqs)
            while open_requests:
                _, ev = await events.get()
                open_requests -= ev is None
        finally:
            for r in reqs:
                r.cancel()  # no-op when finished; frees the slots when the client went away
        if any(r.error for r in reqs):
            raise APIError(500, "generation failed on the server", kind="server_error")
        return shape.full_response(reqs)

    async def _stream(shape: "_Shape", reqs, events: asyncio.Queue):
        try:
            n = shape.parsed.params.n
            if shape.chat:
                for ci in range(len(reqs) * n):
                    yield _sse(shape.chunk(ci, {"role": "assistant", "content": ""}, None, []))
            pending: dict[int, list] = {}
            open_requests = len(reqs)
            while open_requests:
                i, ev = await events.get()
                if ev is None:
                    open_requests -= 1
                    if reqs[i].error is not None:
                        yield _sse(APIError(500, "generation failed on the server", kind="server_error").body())
                    continue
                ci = i * n + ev.index
                toks = pending.setdefault(ci, [])
                if ev.token is not None and ev.logprob is not None:
                    toks.append((ev.token, ev.logprob))
                if ev.text or ev.finish_reason:
                    yield _sse(shape.chunk(ci, {"content": ev.text} if ev.text or not shape.chat else {},
                                           ev.finish_reason, toks, text=ev.text))
                    pending[ci] = []
            if shape.parsed.include_usage:
                yield _sse(shape.usage_chunk(reqs))
            yield "data: [DONE]\n\n"
        finally:
            for r in reqs:
                r.cancel()

    return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Shape:
    """OpenAI response objects for one request: chat or text completion, whole or chunked."""

    def __init__(self, rid: str, model: str, chat: bool, parsed: ParsedRequest, tok):
        self.rid, self.model, self.chat, self.parsed, self.tok = rid, model, chat, parsed, tok
        self.created = int(time.time())
        self.offsets: dict[int, int] = {}

    def _logprobs(self, ci: int, toks: list[tuple[int, float]]):
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

    def _usage(self, reqs) -> dict:
        prompt = sum(len(r.prompt) for r in reqs)
        completion = sum(len(c.tokens) for r in reqs for c in r.results if c is not None)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _head(self, kind: str) -> dict:
        return {"id": self.rid, "object": kind, "created": self.created, "model": self.model}

    def chunk(self, ci: int, delta: dict, finish: str | None, toks, text: str = "") -> dict:
        if self.chat:
            choice = {"index": ci, "delta": delta, "logprobs": self._logprobs(ci, toks), "finish_reason": finish}
            out = self._head("chat.completion.chunk")
        else:
            choice = {"index": ci, "text": text, "logprobs": self._logprobs(ci, toks), "finish_reason": finish}
            out = self._head("text_completion")
        out["choices"] = [choice]
        if self.parsed.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, reqs) -> dict:
        out = self._head("chat.completion.chunk" if self.chat else "text_completion")
        out["choices"] = []
        out["usage"] = self._usage(reqs)
        return out

    def full_response(self, reqs) -> dict:
        choices = []
        n = self.parsed.params.n
        for r in reqs:
            for c in r.results:
                ci = c.prompt_index * n + c.index
                toks = list(zip(c.tokens, c.logprobs or []))
                lp = self._logprobs(ci, toks)
                if self.chat:
                    choices.append({"index": ci, "message": {"role": "assistant", "content": c.text},
                                    "logprobs": lp, "finish_reason": c.finish_reason})
                else:
                    choices.append({"index": ci, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason})
        out = self._head("chat.completion" if self.chat else "text_completion")
        out["choices"] = choices
        out["usage"] = self._usage(reqs)
        return out
