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
from scalelab.serve.guard import timed_protocol
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


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _lazy_body(total: int, counter: list[int]):
    yield b'{"text": "'
    chunk = b"x" * 65536
    while counter[0] < total:
        counter[0] += len(chunk)
        yield chunk
    yield b'"}'


def test_bodies_are_counted_for_every_route_and_refused_with_a_413_not_a_reset():
    with _served() as (app, engine, url):
        # no Content-Length: the memories route used to read all of it
        r = httpx.post(url + "/v1/memories", content=_lazy_body(3 << 20, [0]),
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        # a Content-Length over the limit: answered at once, the rest dropped as it arrives, so the client reads it
        big = b'{"model": "tiny", "prompt": "' + b"x" * (7 << 20) + b'"}'
        r = httpx.post(url + "/v1/completions", content=big, headers={"Content-Type": "application/json"}, timeout=60)
        assert r.status_code == 413
        assert _metric(url, 'scalelab_rejected_requests_total{reason="body_too_large"}') == 2
        assert httpx.get(url + "/v1/memories").json()["data"] == []
        # a client that waits for '100 Continue' is refused before it sends the body, and the connection closes
        host, port = url.rsplit("/", 1)[1].split(":")
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            sock.sendall(b"POST /v1/memories HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Expect: 100-continue\r\nContent-Length: 8388608\r\n\r\n")
            head = _read_head(sock)
            assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head.lower()
            assert _closed_by_server(sock)


def test_a_200_mb_chunked_upload_gets_its_413_and_the_server_does_not_keep_it():
    """httpx sends the whole body before it reads the answer: the server must read (and drop) all of
    it, without holding it, for the 413 to arrive."""
    with _served(http=timed_protocol(drain_timeout=120), max_body_bytes=64 << 10) as (app, engine, url):
        sent, samples, done = [0], [_rss_mb()], threading.Event()

        def watch():
            while not done.wait(0.02):
                samples.append(_rss_mb())

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        with httpx.Client(base_url=url, timeout=120) as client:
            r = client.post("/v1/memories", content=_lazy_body(200 << 20, sent),
                            headers={"Content-Type": "application/json"})
            assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
            assert sent[0] >= 200 << 20  # the whole body went out: no reset cut it short
            done.set()
            watcher.join()
            assert max(samples) - samples[0] < 50, (samples[0], max(samples))  # the old reader grew by ~340 MB
            assert client.get("/health").status_code == 200  # the connection is still good for the next request
        assert httpx.get(url + "/v1/memories").json()["data"] == []


def _read_head(sock: socket.socket) -> bytes:
    """The response's status line and headers (b"" when the server closed without an answer)."""
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(4096)
        if not part:
            break
        data += part
    return data


def _closed_by_server(sock: socket.socket, trickle: bytes = b"", every: float = 0.05) -> bool:
    """Keeps sending ``trickle`` (if any) until the server closes the connection; False after 20 s."""
    sock.settimeout(every)
    deadline = time.time() + 20  # a hang guard only: the server's deadlines in these tests are under a second
    while time.time() < deadline:
        try:
            if trickle:
                sock.sendall(trickle)
            if sock.recv(4096) == b"":
                return True
        except socket.timeout:
            continue
        except OSError:  # reset while we were writing: closed too
            return True
    return False


def test_a_slow_body_gets_a_408_and_the_connection_closes():
    with _served(body_timeout=0.5) as (app, engine, url):
        host, port = url.rsplit("/", 1)[1].split(":")
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            sock.sendall(b"POST /v1/memories HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n" + b'{"text": "')  # 90 bytes never come
            head = _read_head(sock)
            assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower()
            assert _closed_by_server(sock)
        # one trickling a byte at a time is timed out the same way: the deadline is for the whole body
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            sock.sendall(b"POST /v1/memories HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            assert _closed_by_server(sock, trickle=b"1\r\nx\r\n")
        assert _metric(url, 'scalelab_rejected_requests_total{reason="body_timeout"}') == 2
        assert httpx.get(url + "/v1/memories").json()["data"] == []


def test_the_dropped_rest_of_a_refused_body_is_cut_off_at_the_drain_timeout():
    with _served(http=timed_protocol(drain_timeout=0.5), max_body_bytes=1024) as (app, engine, url):
        host, port = url.rsplit("/", 1)[1].split(":")
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            sock.sendall(b"POST /v1/memories HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n" + b"800\r\n" + b"x" * 2048 + b"\r\n")
            assert _read_head(sock).startswith(b"HTTP/1.1 413")  # answered while the body is still coming
            assert _closed_by_server(sock, trickle=b"10\r\n" + b"x" * 16 + b"\r\n")  # an endless trickle


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


def test_a_big_json_body_is_parsed_off_the_event_loop(monkeypatch):
    from scalelab.serve import protocol

    where = []
    real = json.loads

    def spy(raw, *a, **kw):
        try:
            asyncio.get_running_loop()
            where.append(("loop", len(raw)))
        except RuntimeError:
            where.append(("thread", len(raw)))
        return real(raw, *a, **kw)

    monkeypatch.setattr(protocol.json, "loads", spy)
    with _served(_engine(max_batch=2)) as (app, engine, url):
        assert _completion(url, prompt="Hi").status_code == 200
        r = _completion(url, prompt="x" * 200_000)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    # (json.loads is patched process-wide: the client's own parsing of the answers shows up too, in this thread)
    assert [w for w, n in where if n > 200_000] == ["thread"] and ("loop", len(b'{"model"')) not in where
    assert any(w == "loop" for w, n in where)  # a small body is parsed where it is


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
    with _served(http=timed_protocol(header_timeout=0.3), max_body_bytes=1024) as (app, engine, url):
        host, port = url.rsplit("/", 1)[1].split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the headers never end
            assert sock.recv(1024) == b""  # closed by the server, well before our 10 s
        with socket.create_connection((host, int(port)), timeout=10) as sock:  # trickled a byte at a time
            assert _closed_by_server(sock, trickle=b"a", every=0.1)
        with socket.create_connection((host, int(port)), timeout=10) as sock:  # a prompt client is unaffected
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert sock.recv(1024).startswith(b"HTTP/1.1 200")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            # after a refused body has been drained, the next request's headers are timed again
            sock.sendall(b"POST /v1/memories HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 4096\r\n\r\n" + b"x" * 4096)
            assert _read_head(sock).startswith(b"HTTP/1.1 413")
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            assert _closed_by_server(sock)


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
