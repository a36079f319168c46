"""The server under a hostile or careless client: limits, cancellation, isolation, and refusals.

A tiny random GPT behind a real app on a real uvicorn. Its forward pass can be held at a gate, so
a test decides exactly when the engine is busy and what sits in its queue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import torch

from serve_util import serve_in_thread
from scalelab.errors import ScalelabError
from scalelab.infer.chat import render_chat
from scalelab.infer.engine import Engine
from scalelab.model.gpt import GPT, GPTConfig
from scalelab.serve.app import create_app
from scalelab.serve.guard import header_timeout_protocol
from scalelab.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
MODEL = "tiny"
KEYS = ["key-alice", "key-bob"]


class _GatedGPT(GPT):
    """A real tiny GPT whose forward pass waits at ``gate`` (open unless a test closes it)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.gate = threading.Event()
        self.gate.set()
        self.delay = 0.0

    def forward(self, *args, **kw):
        self.gate.wait()
        if self.delay:
            time.sleep(self.delay)
        return super().forward(*args, **kw)


class _RecordingEngine(Engine):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.requests, self.admitted = [], []

    def submit_many(self, items, queue_timeout=None, over_limit=False, owner=None):
        reqs = super().submit_many(items, queue_timeout, over_limit, owner)
        self.requests.extend(reqs)
        return reqs

    def _admit(self):
        admitted, resumed = super()._admit()
        self.admitted.extend(req.owner for req, _ in admitted)
        return admitted, resumed


def _engine(max_batch: int = 1, max_waiting: int | None = 2, block_size: int = 256) -> _RecordingEngine:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=TOK.vocab_size, block_size=block_size, depth=1, n_embd=32, head_dim=16)
    return _RecordingEngine(_GatedGPT(cfg).eval(), TOK, max_batch=max_batch, max_waiting=max_waiting)


@contextlib.contextmanager
def _served(engine=None, **kw):
    engine = engine or _engine()
    http = kw.pop("http", "h11")
    app = create_app(engine, model_name=MODEL, **kw)
    with serve_in_thread(app, http=http) as url:
        yield app, engine, url


def _completion(url: str, key: str | None = None, timeout: float = 60, **body) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 4,
                                                     "temperature": 0, **body}, headers=headers, timeout=timeout)


def _wait_for(cond, what: str, limit: float = 30) -> None:
    deadline = time.time() + limit
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _metric(url: str, line_start: str) -> float:
    text = httpx.get(url + "/metrics").text
    return float(next(line for line in text.splitlines() if line.startswith(line_start + " ")).split()[-1])


def test_a_full_queue_answers_429_and_every_admitted_request_completes():
    with _served(max_per_caller=10) as (app, engine, url):
        engine.model.gate.clear()  # the engine takes the first request, then blocks in its prefill
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            first = pool.submit(_completion, url)
            _wait_for(lambda: len(engine.requests) == 1 and engine.num_waiting == 0, "the first request's admission")
            queued = [pool.submit(_completion, url, prompt=p) for p in ("Ab", "Cd")]
            _wait_for(lambda: engine.num_waiting == 2, "two queued requests")
            refused = _completion(url)
            engine.model.gate.set()
            answers = [f.result() for f in (first, *queued)]
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"
        for r in answers:
            assert r.status_code == 200
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 4
        assert _metric(url, 'scalelab_rejected_requests_total{reason="queue_full"}') == 1
        health = httpx.get(url + "/health").json()
        assert health["queue_limit"] == 2 and health["waiting"] == 0


def test_one_caller_is_limited_without_holding_up_another():
    with _served(_engine(max_waiting=8), api_key=KEYS, max_per_caller=1) as (app, engine, url):
        engine.model.gate.clear()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            alice = pool.submit(_completion, url, KEYS[0])
            _wait_for(lambda: len(engine.requests) == 1, "alice's request")
            again = _completion(url, KEYS[0])
            bob = pool.submit(_completion, url, KEYS[1])
            _wait_for(lambda: len(engine.requests) == 2, "bob's request")
            engine.model.gate.set()
            assert alice.result().status_code == 200 and bob.result().status_code == 200
        assert again.status_code == 429 and again.json()["error"]["code"] == "too_many_concurrent_requests"
        assert again.headers["retry-after"]
        assert _completion(url, KEYS[0]).status_code == 200  # the slot came back


def test_another_callers_backlog_neither_turns_a_caller_away_nor_goes_first():
    with _served(api_key=KEYS, max_per_caller=10) as (app, engine, url):  # max_batch 1, queue of 2
        engine.model.gate.clear()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            alice = [pool.submit(_completion, url, KEYS[0])]
            _wait_for(lambda: len(engine.requests) == 1 and engine.num_waiting == 0, "alice's first admission")
            alice += [pool.submit(_completion, url, KEYS[0]) for _ in range(2)]
            _wait_for(lambda: engine.num_waiting == 2, "alice's backlog to fill the queue")
            assert _completion(url, KEYS[0]).json()["error"]["code"] == "queue_full"
            bob = pool.submit(_completion, url, KEYS[1])  # within his share of the queue: he passes it
            _wait_for(lambda: engine.num_waiting == 3, "bob's request in the queue")
            engine.model.gate.set()
            assert bob.result().status_code == 200 and all(f.result().status_code == 200 for f in alice)
        alice_id, bob_id = (r.owner for r in (engine.requests[0], engine.requests[-1]))
        assert engine.admitted == [alice_id, bob_id, alice_id, alice_id]  # the free slot went to bob first


def test_a_request_waiting_past_the_queue_timeout_gets_503():
    with _served(queue_timeout=0.2) as (app, engine, url):
        engine.model.gate.clear()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(_completion, url)
            _wait_for(lambda: len(engine.requests) == 1 and engine.num_waiting == 0, "the first request's admission")
            late = pool.submit(_completion, url)
            _wait_for(lambda: engine.num_waiting == 1, "the second request in the queue")
            time.sleep(0.3)  # past its deadline while the engine is busy
            engine.model.gate.set()
            assert first.result().status_code == 200
            r = late.result()
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_timeout" and r.headers["retry-after"]
        assert _metric(url, "scalelab_queue_timeouts_total") == 1


def test_a_non_streaming_request_is_cancelled_when_its_client_leaves():
    engine = _engine()
    engine.model.delay = 0.02  # 250 tokens: seconds of work, if nobody stopped it
    with _served(engine) as (app, _, url):
        with pytest.raises(httpx.ReadTimeout):
            _completion(url, max_tokens=250, timeout=0.5)
        [req] = engine.requests
        _wait_for(lambda: req.done, "the abandoned request to end")
        result = req.results[0]
        assert result.finish_reason == "cancelled" and len(result.tokens) < 250
        assert _metric(url, "scalelab_client_disconnects_total") == 1
        assert httpx.get(url + "/health").json()["running"] == 0


def test_bodies_are_counted_for_every_route_and_refused_with_a_413_not_a_reset():
    with _served() as (app, engine, url):
        def chunks(total: int):
            yield b'{"text": "'
            for _ in range(total // 65536):
                yield b"x" * 65536

        # no Content-Length: the memories route used to read all of it
        r = httpx.post(url + "/v1/memories", content=chunks(3 << 20), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        # a Content-Length over the limit: the body is drained, so the client reads its 413
        big = b'{"model": "tiny", "prompt": "' + b"x" * (7 << 20) + b'"}'
        r = httpx.post(url + "/v1/completions", content=big, headers={"Content-Type": "application/json"}, timeout=60)
        assert r.status_code == 413
        assert _metric(url, 'scalelab_rejected_requests_total{reason="body_too_large"}') == 2
        # past the drain cap (8 MiB) the server answers and closes: it does not read on to the end
        sent, total = 0, 64 << 20

        def endless():
            nonlocal sent
            yield b'{"text": "'
            while sent < total:
                sent += 65536
                yield b"x" * 65536

        try:
            status = httpx.post(url + "/v1/memories", content=endless(),
                                headers={"Content-Type": "application/json"}, timeout=60).status_code
        except httpx.TransportError:  # the client was still writing when the connection closed
            status = None
        assert status in (413, None) and sent < total
        assert httpx.get(url + "/v1/memories").json()["data"] == []


def test_malformed_requests_are_4xx_not_500():
    with _served() as (app, engine, url):
        nested = b'{"model": "tiny", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        for path in ("/v1/completions", "/v1/chat/completions", "/v1/memories"):
            r = httpx.post(url + path, content=nested, headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", (path, r.text)
        for mid in ("99999999999999999999", "-1", "0", "１２"):
            for method in ("GET", "DELETE"):
                r = httpx.request(method, f"{url}/v1/memories/{mid}")
                assert r.status_code == 404 and r.json()["error"]["code"] == "memory_not_found", (mid, r.text)
        r = httpx.patch(f"{url}/v1/memories/99999999999999999999", json={"text": "x"})
        assert r.status_code == 404


def test_cross_site_requests_and_rebinding_hosts_are_refused():
    with _served() as (app, engine, url):
        port = url.rsplit(":", 1)[1]
        form = {"content": b'{"text": "pwned"}', "headers": {"Content-Type": "text/plain"}}
        r = httpx.post(url + "/v1/memories", **form)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
        r = httpx.post(url + "/v1/memories", json={"text": "pwned"}, headers={"Host": f"evil.example:{port}"})
        assert r.status_code == 421 and r.json()["error"]["code"] == "untrusted_host"
        r = httpx.post(url + "/v1/memories", json={"text": "pwned"}, headers={"Origin": "https://evil.example"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "cross_origin"
        assert httpx.get(url + "/v1/memories").json()["data"] == []
        # the chat page's own calls: same origin, under either loopback name
        for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
            r = httpx.post(url + "/v1/memories", json={"text": "Likes tea."},
                           headers={"Host": host, "Origin": f"http://{host}"})
            assert r.status_code == 201, r.text
    with _served(cors_origins=["https://app.example"], allowed_hosts=["chat.example"]) as (app, engine, url):
        r = httpx.post(url + "/v1/memories", json={"text": "Likes tea."},
                       headers={"Origin": "https://app.example", "Host": "chat.example"})
        assert r.status_code == 201 and r.headers["access-control-allow-origin"] == "https://app.example"
        pre = httpx.options(url + "/v1/memories", headers={"Origin": "https://app.example",
                                                            "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 200


def test_memories_belong_to_their_key_and_fit_the_budget():
    engine = _engine(max_waiting=8)
    with _served(engine, api_key=KEYS, memory_budget=50) as (app, _, url):
        alice, bob = ({"Authorization": f"Bearer {k}"} for k in KEYS)
        ids = [httpx.post(url + "/v1/memories", json={"text": t}, headers=alice).json()["id"]
               for t in ("x" * 470, "Likes tea.", "Has a cat.")]
        assert httpx.get(url + "/v1/memories", headers=bob).json()["data"] == []
        assert httpx.delete(f"{url}/v1/memories/{ids[1]}", headers=bob).status_code == 404
        ctx = httpx.get(url + "/v1/memories/context", headers=alice).json()
        # newest first within 50 tokens: the two short ones, in order; the long old one is dropped
        assert ctx["context"] == "Model set context:\n1. Likes tea.\n2. Has a cat.\n"
        assert (ctx["included"], ctx["dropped"]) == (2, 1)
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        r = httpx.post(url + "/v1/chat/completions", json=chat, headers=alice)
        assert r.status_code == 200 and r.headers["x-scalelab-memories-dropped"] == "1"
        theirs = httpx.post(url + "/v1/chat/completions", json=chat, headers=bob).json()["usage"]["prompt_tokens"]
        with_block = render_chat(TOK, chat["messages"], preamble=ctx["context"], tool_markers=True)
        assert r.json()["usage"]["prompt_tokens"] == len(with_block) and theirs < len(with_block)
        assert _metric(url, "scalelab_memories_dropped_total") == 1
        assert [m["source"] for m in httpx.get(url + "/v1/memories", headers=alice).json()["data"]] == ["user"] * 3


def test_without_keys_the_user_header_separates_memories():
    with _served() as (app, engine, url):
        httpx.post(url + "/v1/memories", json={"text": "Likes tea."}, headers={"X-Scalelab-User": "ann"})
        assert httpx.get(url + "/v1/memories").json()["data"] == []
        mine = httpx.get(url + "/v1/memories", headers={"X-Scalelab-User": "ann"}).json()["data"]
        assert [m["text"] for m in mine] == ["Likes tea."]
        assert httpx.get(url + "/v1/memories", headers={"X-Scalelab-User": "no spaces"}).status_code == 400


def test_a_short_chat_prompt_is_not_truncated_when_truncation_is_allowed():
    with _served() as (app, engine, url):
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 2}
        whole = httpx.post(url + "/v1/chat/completions", json=chat).json()["usage"]["prompt_tokens"]
        # the default max_tokens is the whole context: truncation used to keep a single token
        cut = httpx.post(url + "/v1/chat/completions", json={**{k: v for k, v in chat.items() if k != "max_tokens"},
                                                              "truncate_prompt": True, "max_tokens": None})
        assert cut.status_code == 200 and cut.json()["usage"]["prompt_tokens"] == whole > 1


def test_prompts_are_counted_and_measured_before_encoding_and_encoded_off_the_event_loop(monkeypatch):
    calls = []
    real = TOK.encode_batch

    def spy(texts):
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        calls.append((on_loop, len(texts)))
        return real(texts)

    monkeypatch.setattr(TOK, "encode_batch", spy, raising=False)
    with _served(_engine(max_batch=2)) as (app, engine, url):
        r = _completion(url, prompt=["a"] * 9, n=1)  # max_batch 2 x 4 prompts
        assert r.status_code == 400 and "too many prompts" in r.json()["error"]["message"]
        r = _completion(url, prompt="x" * 100_000)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert calls == []
        assert _completion(url, prompt=["Ab", "Cd"]).status_code == 200
        assert calls == [(False, 2)]  # one batch, in a worker thread: the event loop went on serving
        r = _completion(url, prompt="x" * 100_000, truncate_prompt=True, max_tokens=2)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 256 - 2


def test_top_logprobs_through_the_openai_client():
    with _served() as (app, engine, url):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                           temperature=0, logprobs=True, top_logprobs=3)
        for entry in r.choices[0].logprobs.content:
            assert len(entry.top_logprobs) == 3
            assert entry.top_logprobs[0].token == entry.token
            assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
            assert entry.top_logprobs[0].logprob >= entry.top_logprobs[2].logprob
        c = client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, temperature=0, logprobs=2)
        lp = c.choices[0].logprobs
        assert len(lp.top_logprobs) == 3 and all(1 <= len(t) <= 2 for t in lp.top_logprobs)
        assert all(max(t, key=t.get) == tok for t, tok in zip(lp.top_logprobs, lp.tokens))
        with pytest.raises(openai.BadRequestError, match="needs 'logprobs'"):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], top_logprobs=2)


def test_a_non_ascii_api_key_is_refused_at_startup():
    with pytest.raises(ScalelabError, match="printable ASCII"):
        create_app(_engine(), api_key="clé-secrète")


def test_slow_header_connections_are_closed():
    with _served(http=header_timeout_protocol(0.3)) as (app, engine, url):
        host, port = url.rsplit("/", 1)[1].split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the headers never end
            assert sock.recv(1024) == b""  # closed by the server, well before our 10 s
        with socket.create_connection((host, int(port)), timeout=10) as sock:  # a prompt client is unaffected
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert sock.recv(1024).startswith(b"HTTP/1.1 200")


def test_metrics_are_prometheus_text():
    with _served() as (app, engine, url):
        assert _completion(url, max_tokens=3).status_code == 200
        r = httpx.get(url + "/metrics")
        assert r.headers["content-type"].startswith("text/plain")
        names = {line.split()[2] for line in r.text.splitlines() if line.startswith("# TYPE")}
        assert {"scalelab_queue_depth", "scalelab_running", "scalelab_tokens_per_second",
                "scalelab_rejected_requests_total", "scalelab_generated_tokens_total"} <= names
        assert _metric(url, "scalelab_generated_tokens_total") == 3
        assert _metric(url, 'scalelab_responses_total{status="200"}') == 1
        assert json.loads(httpx.get(url + "/health").text)["status"] == "ok"


def test_fair_share_of_the_queue():
    from scalelab.serve.limits import Admission

    a = Admission(per_caller=100)
    releases = [a.acquire("heavy") for _ in range(30)]
    assert a.within_fair_share("heavy", 32)  # alone: the whole queue is its share
    a.acquire("light")
    assert a.within_fair_share("light", 32) and not a.within_fair_share("heavy", 32)  # shares of 16 each
    assert a.within_fair_share("heavy", None)  # no queue limit, nothing to share
    for release in releases:
        release()
        release()  # a second release is a no-op
    assert dict(a.in_flight) == {"light": 1}
