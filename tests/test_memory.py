import socket
import subprocess
import sys
import time

import fastapi
import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from conftest import subprocess_env
from serve_util import Server
from scalelab.config import Config, to_toml
from scalelab.errors import ScalelabError
from scalelab.infer.sample import SamplingParams
from scalelab.infer.tools import run_with_tools
from scalelab.model.gpt import GPT, GPTConfig
from scalelab.serve.memory import MAX_MEMORY_CHARS, MemoryNotFound, MemoryStore, build_memory_router
from scalelab.tokenizer import ByteTokenizer
from scalelab.checkpoint import save_checkpoint


def test_store_crud_and_context_block(tmp_path):
    store = MemoryStore(tmp_path / "mem.sqlite")
    assert store.list() == [] and store.context_block() == ""
    a = store.add("Prefers metric units.")
    b = store.add("Is learning\nRust.")  # one memory is one line of the block
    assert [m["text"] for m in store.list()] == ["Prefers metric units.", "Is learning Rust."]
    assert store.context_block() == "Model set context:\n1. Prefers metric units.\n2. Is learning Rust.\n"
    assert store.update(b, "Is learning Go.")["text"] == "Is learning Go."
    store.delete(a)
    assert store.context_block() == "Model set context:\n1. Is learning Go.\n"
    with pytest.raises(MemoryNotFound):
        store.delete(a)
    with pytest.raises(MemoryNotFound):
        store.update(12345, "x")
    for bad in ("", "   ", "x" * (MAX_MEMORY_CHARS + 1), 3):
        with pytest.raises(ScalelabError):
            store.add(bad)
    store.close()


def test_store_survives_reopen(tmp_path):
    path = tmp_path / "mem.sqlite"
    with MemoryStore(path) as store:
        store.add("Has a cat named Ada.")
    with MemoryStore(path) as store:
        assert [m["text"] for m in store.list()] == ["Has a cat named Ada."]


def test_not_a_database_is_a_clear_error(tmp_path):
    bad = tmp_path / "mem.sqlite"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ScalelabError, match="not a usable memory database"):
        MemoryStore(bad)


def test_bio_tool_call_saves_to_store(tmp_path):
    tok = ByteTokenizer()
    start, end = tok.token_id("<|tool_call_start|>"), tok.token_id("<|tool_call_end|>")
    outputs = iter([[start] + tok.encode("bio: Likes green tea.") + [end], tok.encode("Noted.")])
    with MemoryStore(tmp_path / "m.sqlite") as store:
        run = run_with_tools(lambda t, p: next(outputs), [tok.bos_id], tok, SamplingParams(max_new_tokens=100),
                             handler=store.tool_handler())
        assert run.calls[0].output == "saved memory #1"
        assert "1. Likes green tea." in store.context_block()


def test_router_endpoints_and_errors(tmp_path):
    app = fastapi.FastAPI()
    store = MemoryStore(tmp_path / "m.sqlite")
    app.include_router(build_memory_router(store))
    c = TestClient(app)
    r = c.post("/v1/memories", json={"text": "Lives in Lyon."})
    assert r.status_code == 201 and r.json()["text"] == "Lives in Lyon."
    mid = r.json()["id"]
    assert [m["id"] for m in c.get("/v1/memories").json()["data"]] == [mid]
    assert c.get("/v1/memories/context").json()["context"] == "Model set context:\n1. Lives in Lyon.\n"
    assert c.patch(f"/v1/memories/{mid}", json={"text": "Lives in Paris."}).json()["text"] == "Lives in Paris."
    assert c.get(f"/v1/memories/{mid}").json()["text"] == "Lives in Paris."

    for method, url, kw, status, code in [
        ("get", "/v1/memories/999", {}, 404, "memory_not_found"),
        ("get", "/v1/memories/abc", {}, 404, "memory_not_found"),
        ("patch", "/v1/memories/999", {"json": {"text": "x"}}, 404, "memory_not_found"),
        ("delete", "/v1/memories/999", {}, 404, "memory_not_found"),
        ("post", "/v1/memories", {"json": {"txt": "x"}}, 422, "missing_text"),
        ("post", "/v1/memories", {"json": ["x"]}, 422, "missing_text"),
        ("post", "/v1/memories", {"json": {"text": ""}}, 422, "invalid_text"),
        ("post", "/v1/memories", {"json": {"text": 5}}, 422, "invalid_text"),
        ("post", "/v1/memories", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400,
         "invalid_json"),
        ("patch", f"/v1/memories/{mid}", {"json": {}}, 422, "missing_text"),
    ]:
        r = getattr(c, method)(url, **kw)
        assert r.status_code == status, (method, url, r.text)
        err = r.json()["error"]
        assert err["code"] == code and err["type"] == "invalid_request_error" and err["message"]

    r = c.delete(f"/v1/memories/{mid}")
    assert r.json() == {"id": mid, "object": "memory.deleted", "deleted": True}
    assert c.get("/v1/memories").json()["data"] == []
    store.close()


_SERVER = """
import sys, uvicorn
from fastapi import FastAPI
from scalelab.serve.memory import MemoryStore, build_memory_router
app = FastAPI()
app.include_router(build_memory_router(MemoryStore(sys.argv[1])))
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(db, port):
    proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(db), str(port)], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read().decode())
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/memories", timeout=1.0)
            return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("server did not start")


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_memories_survive_a_server_restart(tmp_path):
    db, port = tmp_path / "memories.sqlite", _free_port()
    proc = _start_server(db, port)
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/v1/memories", json={"text": "Allergic to peanuts."}, timeout=10)
        assert r.status_code == 201
    finally:
        _stop(proc)
    proc = _start_server(db, port)
    try:
        data = httpx.get(f"http://127.0.0.1:{port}/v1/memories", timeout=10).json()["data"]
        assert [m["text"] for m in data] == ["Allergic to peanuts."]
    finally:
        _stop(proc)


def test_memories_survive_a_real_scalelab_serve_restart(tmp_path):
    """Through the real server (`scalelab serve`), which keeps memories in RUN/memory.sqlite."""

    run = tmp_path / "run"
    tok = ByteTokenizer()
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, depth=1, n_embd=32, head_dim=16))
    save_checkpoint(run / "checkpoints", model, torch.optim.SGD(model.parameters(), lr=0.1), step=1, loader_state={})
    tok.save(run / "tokenizer")
    (run / "config.toml").write_text(to_toml(Config()))

    server = Server(run)
    try:
        r = httpx.post(server.url + "/v1/memories", json={"text": "Works night shifts."}, timeout=10)
        assert r.status_code == 201, r.text
    finally:
        server.stop()
    server = Server(run, "--memory-budget", "48")  # a 64-byte context's default quarter holds no memory
    try:
        data = httpx.get(server.url + "/v1/memories", timeout=10).json()["data"]
        assert [m["text"] for m in data] == ["Works night shifts."]
        ctx = httpx.get(server.url + "/v1/memories/context", timeout=10).json()["context"]
        assert ctx == "Model set context:\n1. Works night shifts.\n"
    finally:
        server.stop()
    assert (run / "memory.sqlite").is_file()


def test_model_written_memories_are_marked_and_owners_are_separate(tmp_path):
    tok = ByteTokenizer()
    start, end = tok.token_id("<|tool_call_start|>"), tok.token_id("<|tool_call_end|>")
    outputs = iter([[start] + tok.encode("bio: Likes green tea.") + [end], tok.encode("Noted.")])
    with MemoryStore(tmp_path / "m.sqlite") as store:
        store.add("Lives in Lyon.", owner="ann")
        run_with_tools(lambda t, p: next(outputs), [tok.bos_id], tok, SamplingParams(max_new_tokens=100),
                       handler=store.tool_handler("ann"))
        assert [(m["text"], m["source"]) for m in store.list("ann")] == [("Lives in Lyon.", "user"),
                                                                         ("Likes green tea.", "model")]
        [bio] = store.list("ann", source="model")
        assert store.list("bob") == [] and store.context_block("bob") == ""
        with pytest.raises(MemoryNotFound):
            store.delete(bio["id"], owner="bob")
        store.delete(bio["id"], owner="ann")
        assert store.list("ann", source="model") == []


def test_budget_keeps_the_newest_memories():
    with MemoryStore(":memory:") as store:
        for text in ("First.", "Second.", "Third."):
            store.add(text)
        count = len  # one token per character
        assert store.fitted_block(budget=1000, count_tokens=count)[1:] == (3, 0)
        block, kept, dropped = store.fitted_block(budget=len("Model set context:\n") + 2 * 11, count_tokens=count)
        assert block == "Model set context:\n1. Second.\n2. Third.\n" and (kept, dropped) == (2, 1)
        assert store.fitted_block(budget=5, count_tokens=count) == ("", 0, 3)


def test_a_file_from_before_owners_keeps_its_memories_for_the_local_user(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE memories (id INTEGER PRIMARY KEY AUTOINCREMENT, text TEXT NOT NULL, "
               "created_at REAL NOT NULL, updated_at REAL NOT NULL)")
    db.execute("INSERT INTO memories (text, created_at, updated_at) VALUES ('Has a dog.', 0, 0)")
    db.commit()
    db.close()
    with MemoryStore(path) as store:
        assert [(m["text"], m["source"]) for m in store.list()] == [("Has a dog.", "user")]
        assert store.list("someone-else") == []
