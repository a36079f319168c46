"""Memory about the user: the "bio" tool pattern, stored in SQLite.

A conversation saves a memory when the model calls ``<|tool_call_start|>bio: TEXT<|tool_call_end|>``
(see scalelab.infer.tools); the user lists, edits and deletes memories through ``/v1/memories``.
Every new conversation starts with :meth:`MemoryStore.context_block`::

    Model set context:
    1. Prefers answers in metric units.
    2. Is learning Rust.

One SQLite file holds them, so they survive a server restart. The server is a single-user,
local one: there is one list of memories, not one per account.
"""

# No ``from __future__ import annotations``: FastAPI must see the real ``Request`` class in the
# endpoint signatures, and it is imported inside build_memory_router (fastapi is optional).
import sqlite3
import threading
import time
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from scalelab.errors import ScalelabError
from scalelab.infer.tools import handle_tool_call

MAX_MEMORY_CHARS = 500
MAX_MEMORIES = 200  # every memory is in every prompt: an unbounded list would eat the context

_SCHEMA = """
CREATE TABLE IF NOT EXISTS memories (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    text TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
)
"""


class MemoryNotFound(ScalelabError):
    pass


def _clean(text) -> str:
    if not isinstance(text, str):
        raise ScalelabError("memory text must be a string")
    # one memory is one line of the context block
    text = " ".join(text.split())
    if not text:
        raise ScalelabError("memory text is empty")
    if len(text) > MAX_MEMORY_CHARS:
        raise ScalelabError(f"memory text is longer than {MAX_MEMORY_CHARS} characters")
    return text


class MemoryStore:
    """Memories in one SQLite file. Thread-safe: the server calls it from several threads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")  # a crash mid-write never loses committed memories
            self._db.execute(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise ScalelabError(f"{path} is not a usable memory database ({e})") from None
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "MemoryStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _row(row: sqlite3.Row) -> dict:
        return {"id": row["id"], "object": "memory", "text": row["text"],
                "created_at": int(row["created_at"]), "updated_at": int(row["updated_at"])}

    def add(self, text: str) -> int:
        """Save a memory; returns its id."""
        text = _clean(text)
        now = time.time()
        with self._lock:
            (count,) = self._db.execute("SELECT COUNT(*) FROM memories").fetchone()
            if count >= MAX_MEMORIES:
                raise ScalelabError(f"memory is full ({MAX_MEMORIES} memories); delete some first")
            cur = self._db.execute("INSERT INTO memories (text, created_at, updated_at) VALUES (?, ?, ?)",
                                   (text, now, now))
            return int(cur.lastrowid)

    def get(self, memory_id: int) -> dict:
        with self._lock:
            row = self._db.execute("SELECT * FROM memories WHERE id = ?", (int(memory_id),)).fetchone()
        if row is None:
            raise MemoryNotFound(f"no memory with id {memory_id}")
        return self._row(row)

    def list(self) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM memories ORDER BY id").fetchall()
        return [self._row(r) for r in rows]

    def update(self, memory_id: int, text: str) -> dict:
        text = _clean(text)
        with self._lock:
            cur = self._db.execute("UPDATE memories SET text = ?, updated_at = ? WHERE id = ?",
                                   (text, time.time(), int(memory_id)))
        if cur.rowcount == 0:
            raise MemoryNotFound(f"no memory with id {memory_id}")
        return self.get(memory_id)

    def delete(self, memory_id: int) -> None:
        with self._lock:
            cur = self._db.execute("DELETE FROM memories WHERE id = ?", (int(memory_id),))
        if cur.rowcount == 0:
            raise MemoryNotFound(f"no memory with id {memory_id}")

    def context_block(self) -> str:
        """The "Model set context" block for the start of a new conversation ("" when there is none)."""
        items = self.list()
        if not items:
            return ""
        return "Model set context:\n" + "\n".join(f"{i}. {m['text']}" for i, m in enumerate(items, 1)) + "\n"

    def tool_handler(self):
        """A ``handler`` for scalelab.infer.tools.run_with_tools: bio calls save here, the rest is arithmetic."""
        return lambda text: handle_tool_call(text, memory=self)


# -- HTTP ----------------------------------------------------------------------------------------------


def _error(status: int, message: str, code: str, kind: str = "invalid_request_error"):
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "code": code}})


def build_memory_router(store: MemoryStore):
    """``/v1/memories`` endpoints over ``store``, as a FastAPI router for the server to include.

    Bodies are parsed here rather than by FastAPI's models so that every refusal, whatever
    app includes the router, is an OpenAI-style ``{"error": {message, type, code}}``.
    """
    router = APIRouter()

    async def _text_from(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return None, _error(400, "request body is not valid JSON", "invalid_json")
        if not isinstance(body, dict) or "text" not in body:
            return None, _error(422, "request body must be a JSON object with a 'text' field", "missing_text")
        try:
            return _clean(body["text"]), None
        except ScalelabError as e:
            return None, _error(422, str(e), "invalid_text")

    def _id(raw: str):
        try:
            return int(raw), None
        except ValueError:
            return None, _error(404, f"no memory with id {raw}", "memory_not_found")

    @router.get("/v1/memories")
    def list_memories():
        return {"object": "list", "data": store.list()}

    @router.get("/v1/memories/context")
    def memory_context():
        return {"object": "memory.context", "context": store.context_block()}

    @router.post("/v1/memories", status_code=201)
    async def create_memory(request: Request):
        text, err = await _text_from(request)
        if err is not None:
            return err
        try:
            return store.get(store.add(text))
        except ScalelabError as e:
            return _error(409, str(e), "memory_full")

    @router.get("/v1/memories/{memory_id}")
    def get_memory(memory_id: str):
        mid, err = _id(memory_id)
        if err is not None:
            return err
        try:
            return store.get(mid)
        except MemoryNotFound as e:
            return _error(404, str(e), "memory_not_found")

    @router.patch("/v1/memories/{memory_id}")
    async def update_memory(memory_id: str, request: Request):
        mid, err = _id(memory_id)
        if err is not None:
            return err
        text, err = await _text_from(request)
        if err is not None:
            return err
        try:
            return store.update(mid, text)
        except MemoryNotFound as e:
            return _error(404, str(e), "memory_not_found")

    @router.delete("/v1/memories/{memory_id}")
    def delete_memory(memory_id: str):
        mid, err = _id(memory_id)
        if err is not None:
            return err
        try:
            store.delete(mid)
        except MemoryNotFound as e:
            return _error(404, str(e), "memory_not_found")
        return {"id": mid, "object": "memory.deleted", "deleted": True}

    return router
