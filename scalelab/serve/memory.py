"""Memory about the user: the "bio" tool pattern, stored in SQLite.

A conversation saves a memory when the model calls ``<|tool_call_start|>bio: TEXT<|tool_call_end|>``
(see scalelab.infer.tools); the user lists, edits and deletes memories through ``/v1/memories``.
Every new conversation starts with :meth:`MemoryStore.context_block`::

    Model set context:
    1. Prefers answers in metric units.
    2. Is learning Rust.

One SQLite file holds them, so they survive a server restart. Each memory belongs to one owner:
the API key that wrote it, or, on a server without keys, the user id the client names (the
``X-Scalelab-User`` header; ``local`` without one). A memory the model saved through the bio tool
is marked ``source: "model"``, one the user wrote ``source: "user"``; both are listed and deleted
alike. The block prepended to a chat is fitted to a token budget: newest memories first, the
rest left out and counted.
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
from scalelab.serve.protocol import APIError, read_json

MAX_MEMORY_CHARS = 500
MAX_MEMORIES = 200  # per owner: the list is listed whole, and every memory competes for the prompt budget
LOCAL_USER = "local"  # the owner on a server without API keys, when the client names no user
SOURCES = ("user", "model")
_BLOCK_HEAD = "Model set context:\n"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS memories (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    text TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    owner TEXT NOT NULL DEFAULT 'local',
    source TEXT NOT NULL DEFAULT 'user'
)
"""
# files written before memories had owners: their memories become the local user's, written by the user
_MIGRATIONS = {"owner": "ALTER TABLE memories ADD COLUMN owner TEXT NOT NULL DEFAULT 'local'",
               "source": "ALTER TABLE memories ADD COLUMN source TEXT NOT NULL DEFAULT 'user'"}


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
            have = {row[1] for row in self._db.execute("PRAGMA table_info(memories)")}
            for column, sql in _MIGRATIONS.items():
                if column not in have:
                    self._db.execute(sql)
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
        return {"id": row["id"], "object": "memory", "text": row["text"], "source": row["source"],
                "created_at": int(row["created_at"]), "updated_at": int(row["updated_at"])}

    def add(self, text: str, owner: str = LOCAL_USER, source: str = "user") -> int:
        """Save a memory; returns its id."""
        text = _clean(text)
        if source not in SOURCES:
            raise ScalelabError(f"memory source must be one of {', '.join(SOURCES)}")
        now = time.time()
        with self._lock:
            (count,) = self._db.execute("SELECT COUNT(*) FROM memories WHERE owner = ?", (owner,)).fetchone()
            if count >= MAX_MEMORIES:
                raise ScalelabError(f"memory is full ({MAX_MEMORIES} memories); delete some first")
            cur = self._db.execute(
                "INSERT INTO memories (text, created_at, updated_at, owner, source) VALUES (?, ?, ?, ?, ?)",
                (text, now, now, owner, source))
            return int(cur.lastrowid)

    def get(self, memory_id: int, owner: str = LOCAL_USER) -> dict:
        # another owner's memory is "not found", never "forbidden": ids say nothing about other users
        with self._lock:
            row = self._db.execute("SELECT * FROM memories WHERE id = ? AND owner = ?",
                                   (int(memory_id), owner)).fetchone()
        if row is None:
            raise MemoryNotFound(f"no memory with id {memory_id}")
        return self._row(row)

    def list(self, owner: str = LOCAL_USER, source: str | None = None) -> list[dict]:
        """The owner's memories, oldest first; ``source`` keeps only the user's or the model's."""
        query, args = "SELECT * FROM memories WHERE owner = ?", [owner]
        if source is not None:
            query, args = query + " AND source = ?", args + [source]
        with self._lock:
            rows = self._db.execute(query + " ORDER BY id", args).fetchall()
        return [self._row(r) for r in rows]

    def update(self, memory_id: int, text: str, owner: str = LOCAL_USER) -> dict:
        text = _clean(text)
        with self._lock:
            cur = self._db.execute("UPDATE memories SET text = ?, updated_at = ? WHERE id = ? AND owner = ?",
                                   (text, time.time(), int(memory_id), owner))
        if cur.rowcount == 0:
            raise MemoryNotFound(f"no memory with id {memory_id}")
        return self.get(memory_id, owner)

    def delete(self, memory_id: int, owner: str = LOCAL_USER) -> None:
        with self._lock:
            cur = self._db.execute("DELETE FROM memories WHERE id = ? AND owner = ?", (int(memory_id), owner))
        if cur.rowcount == 0:
            raise MemoryNotFound(f"no memory with id {memory_id}")

    def fitted_block(self, owner: str = LOCAL_USER, budget: int | None = None,
                     count_tokens=None) -> tuple[str, int, int]:
        """(block, memories in it, memories left out). With a ``budget``, the block (head and lines,
        as ``count_tokens`` counts them) stays within it: newest memories first, older ones dropped."""
        items = self.list(owner)
        if not items:
            return "", 0, 0
        kept = items
        if budget is not None:
            used, kept = count_tokens(_BLOCK_HEAD), []
            for m in reversed(items):
                cost = count_tokens(f"{len(items)}. {m['text']}\n")  # the widest number: never under-counts
                if used + cost > budget:
                    break
                used += cost
                kept.append(m)
            kept.reverse()
        if not kept:
            return "", 0, len(items)
        block = _BLOCK_HEAD + "\n".join(f"{i}. {m['text']}" for i, m in enumerate(kept, 1)) + "\n"
        return block, len(kept), len(items) - len(kept)

    def context_block(self, owner: str = LOCAL_USER) -> str:
        """The "Model set context" block for the start of a new conversation ("" when there is none)."""
        return self.fitted_block(owner)[0]

    def tool_handler(self, owner: str = LOCAL_USER):
        """A ``handler`` for scalelab.infer.tools.run_with_tools: bio calls save here, marked as the model's,
        for ``owner``; the rest is arithmetic."""
        return lambda text: handle_tool_call(text, memory=_ModelWrites(self, owner))


class _ModelWrites:
    """What the bio tool sees of the store: adding, as the model, for one owner."""

    def __init__(self, store: MemoryStore, owner: str):
        self.store, self.owner = store, owner

    def add(self, text: str) -> int:
        return self.store.add(text, self.owner, source="model")


# -- HTTP ----------------------------------------------------------------------------------------------

OWNER_SCOPE_KEY = "scalelab.owner"  # set by the server's guard from the API key or the user header
_MAX_ID = (1 << 63) - 1  # SQLite's largest integer: a bigger id cannot exist, and would overflow the query


def owner_of(request) -> str:
    return request.scope.get(OWNER_SCOPE_KEY, LOCAL_USER)


def _error(status: int, message: str, code: str, kind: str = "invalid_request_error"):
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "code": code}})


def build_memory_router(store: MemoryStore, budget: int | None = None, count_tokens=None):
    """``/v1/memories`` endpoints over ``store``, as a FastAPI router for the server to include; each
    caller sees only its own memories. ``budget`` and ``count_tokens`` fit ``/v1/memories/context``
    as chats get it.

    Bodies are parsed here rather than by FastAPI's models so that every refusal, whatever
    app includes the router, is an OpenAI-style ``{"error": {message, type, code}}``.
    """
    router = APIRouter()

    async def _text_from(request: Request):
        try:
            body = await read_json(request, require_object=False)
        except APIError as e:
            if e.status != 400:
                raise  # too large: the server's handler answers it
            return None, _error(400, e.message, "invalid_json")
        if not isinstance(body, dict) or "text" not in body:
            return None, _error(422, "request body must be a JSON object with a 'text' field", "missing_text")
        try:
            return _clean(body["text"]), None
        except ScalelabError as e:
            return None, _error(422, str(e), "invalid_text")

    def _id(raw: str):
        if raw.isascii() and raw.isdigit() and 0 < int(raw) <= _MAX_ID:
            return int(raw), None
        return None, _error(404, f"no memory with id {raw}", "memory_not_found")

    @router.get("/v1/memories")
    def list_memories(request: Request, source: str | None = None):
        if source is not None and source not in SOURCES:
            return _error(400, f"'source' must be one of {', '.join(SOURCES)}", "invalid_value")
        return {"object": "list", "data": store.list(owner_of(request), source)}

    @router.get("/v1/memories/context")
    def memory_context(request: Request):
        block, included, dropped = store.fitted_block(owner_of(request), budget, count_tokens)
        return {"object": "memory.context", "context": block, "included": included, "dropped": dropped}

    @router.post("/v1/memories", status_code=201)
    async def create_memory(request: Request):
        text, err = await _text_from(request)
        if err is not None:
            return err
        try:
            owner = owner_of(request)
            return store.get(store.add(text, owner), owner)
        except ScalelabError as e:
            return _error(409, str(e), "memory_full")

    @router.get("/v1/memories/{memory_id}")
    def get_memory(memory_id: str, request: Request):
        mid, err = _id(memory_id)
        if err is not None:
            return err
        try:
            return store.get(mid, owner_of(request))
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
            return store.update(mid, text, owner_of(request))
        except MemoryNotFound as e:
            return _error(404, str(e), "memory_not_found")

    @router.delete("/v1/memories/{memory_id}")
    def delete_memory(memory_id: str, request: Request):
        mid, err = _id(memory_id)
        if err is not None:
            return err
        try:
            store.delete(mid, owner_of(request))
        except MemoryNotFound as e:
            return _error(404, str(e), "memory_not_found")
        return {"id": mid, "object": "memory.deleted", "deleted": True}

    return router
