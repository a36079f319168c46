"""Serving under abuse: does `scalelab serve` keep answering its well-behaved users?

One server on loopback (``--max-batch 8``, default queue and per-caller limits, six API keys:
two well-behaved users, four hostile). Each well-behaved user streams 16-token greedy
/v1/completions requests one after another, first alone (the quiet baseline), then while, at the
same time:

- a burst of 10x the queue limit arrives at once from the hostile keys (non-streaming, 32 tokens);
- hostile clients loop on 200-token requests, half streaming and half not, and half of them
  leave mid-request (a stream closed after a few chunks, or a client timeout);
- slow-header connections trickle a header byte at a time and never finish;
- slow-body connections send their headers, then trickle the body a byte at a time;
- one client uploads a 200 MB chunked body to /v1/memories.

Reported: p50/p99 latency of the well-behaved requests, quiet and under abuse; the share of
hostile requests answered 429 (by reason, from /metrics); any 5xx; the server's RSS before,
at its peak during, and after the abuse; whether every admitted request got a complete answer
(the well-behaved ones: the same text as in the quiet run, greedy; they run in a process of their own, so the
hostile clients' work in this one does not delay their timing); slow-header connections the
server closed; how the upload ended. Every loop is bounded in time and count, and the server is
stopped at the end.

    python bench/serve_faults.py [--duration 20] [--run RUN_DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx

from results_file import append_results
import serve_load
from serve_load import build_run

GOOD_KEYS = ["good-0", "good-1"]
HOSTILE_KEYS = [f"hostile-{i}" for i in range(4)]
PROMPTS = ["Alice was born in", "The capital of", "Bob works as a", "Carol lives in"]
MAX_BATCH = 8
HEADER_TIMEOUT_S = 3
BODY_TIMEOUT_S = 10  # above what a 1 MiB body needs on a loaded host, so only the trickled ones meet it
UPLOAD_BYTES = 200 << 20


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def start_server(run: Path):
    keys = sum((["--api-key", k] for k in [*GOOD_KEYS, *HOSTILE_KEYS]), [])
    proc, url = serve_load.start_server(run, MAX_BATCH, *keys, "--header-timeout", str(HEADER_TIMEOUT_S),
                                         "--body-timeout", str(BODY_TIMEOUT_S))
    return proc, url, int(url.rsplit(":", 1)[1])


class Tally:
    def __init__(self):
        self.status: dict[int, int] = {}
        self.incomplete: list[str] = []
        self.complete = 0

    def saw(self, status: int) -> None:
        self.status[status] = self.status.get(status, 0) + 1


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


async def good_client(client, model: str, stop_at: float, max_requests: int, reference: dict, latencies: list,
                      tally: Tally, cid: int) -> None:
    """Streams, so the wait for a batch slot (time to the first token) shows apart from the decoding."""
    for i in range(max_requests):
        if time.perf_counter() >= stop_at:
            return
        prompt = PROMPTS[(cid + i) % len(PROMPTS)]
        body = {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        t0, started = time.perf_counter(), time.time()
        first, texts, usage, done = None, [], None, False
        async with client.stream("POST", "/v1/completions", json=body, headers=_auth(GOOD_KEYS[cid])) as r:
            tally.saw(r.status_code)
            if r.status_code != 200:
                await r.aread()
                continue
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if chunk.get("choices"):
                        first = first or time.perf_counter() - t0
                        texts.append(chunk["choices"][0]["text"])
                    usage = chunk.get("usage") or usage
        latencies.append((time.perf_counter() - t0, first, started))
        text = reference.setdefault(prompt, "".join(texts))  # the quiet run fixes each prompt's answer
        if not done or "".join(texts) != text or not usage or usage["completion_tokens"] != 16:
            tally.incomplete.append(f"good: {prompt!r} gave {''.join(texts)!r}, quiet gave {text!r}")
        else:
            tally.complete += 1


async def hostile_request(client, model: str, key: str, max_tokens: int, stream: bool, leave: bool, tally: Tally,
                          seed: int) -> None:
    body = {"model": model, "prompt": PROMPTS[seed % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.8,
            "seed": seed, "stream": stream}
    try:
        if stream:
            async with client.stream("POST", "/v1/completions", json=body, headers=_auth(key)) as r:
                tally.saw(r.status_code)
                if r.status_code != 200:
                    await r.aread()
                    return
                chunks, done, finish = 0, False, None
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        tally.incomplete.append(f"stream error: {chunk['error']['message']}")
                        return
                    finish = chunk["choices"][0]["finish_reason"] or finish
                    chunks += 1
                    if leave and chunks == 3:
                        return  # closing the stream mid-way: the client left
                if done and finish in ("length", "stop"):
                    tally.complete += 1
                else:
                    tally.incomplete.append(f"stream ended with done={done}, finish={finish}")
        else:
            timeout = 0.5 if leave else 300
            r = await client.post("/v1/completions", json=body, headers=_auth(key), timeout=timeout)
            tally.saw(r.status_code)
            if r.status_code == 200:
                choice, used = r.json()["choices"][0], r.json()["usage"]["completion_tokens"]
                # a tool call's output is fed back whole, so a reply that ends on "length" may pass max_tokens
                if choice["finish_reason"] == "stop" or (choice["finish_reason"] == "length" and used >= max_tokens):
                    tally.complete += 1
                else:
                    tally.incomplete.append(f"non-stream: {choice['finish_reason']} after {used} of {max_tokens} "
                                            "tokens")
    except httpx.TimeoutException:
        if not leave:
            tally.incomplete.append("a staying client timed out")
    except httpx.TransportError as e:  # the server closed or reset a connection with a request on it
        tally.incomplete.append(f"connection error: {type(e).__name__}")


async def disconnect_loop(client, model: str, key: str, stop_at: float, max_requests: int, tally: Tally,
                          cid: int) -> None:
    for i in range(max_requests):
        if time.perf_counter() >= stop_at:
            return
        await hostile_request(client, model, key, 200, stream=bool(cid % 2), leave=bool(i % 2), tally=tally,
                              seed=10_000 * cid + i)
        await asyncio.sleep(0.05)  # a rejected client does not spin


async def slow_headers(port: int, count: int, stop_at: float) -> int:
    """Connections that send a header byte every 0.5 s and never finish; returns how many the server closed."""
    async def one() -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        header = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 1000
        try:
            for byte in header:
                if time.perf_counter() >= stop_at:
                    return False
                writer.write(bytes([byte]))
                await writer.drain()
                try:
                    if await asyncio.wait_for(reader.read(1), timeout=0.5) == b"":
                        return True  # closed by the server
                except asyncio.TimeoutError:
                    pass
            return False
        except (ConnectionError, OSError):
            return True
        finally:
            writer.close()

    return sum(await asyncio.gather(*(one() for _ in range(count))))


async def slow_bodies(port: int, count: int, stop_at: float) -> dict[str, int]:
    """Connections that send whole headers, then a body byte every 0.5 s; how each ended (408, closed, open)."""
    async def one() -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = (f"POST /v1/memories HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {HOSTILE_KEYS[1]}\r\n"
                "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n").encode()
        try:
            writer.write(head)
            while time.perf_counter() < stop_at:
                writer.write(b"x")
                await writer.drain()
                try:
                    answer = await asyncio.wait_for(reader.read(64), timeout=0.5)
                except asyncio.TimeoutError:
                    continue
                return "408" if answer.startswith(b"HTTP/1.1 408") else "closed" if answer == b"" else "other"
            return "open"
        except (ConnectionError, OSError):
            return "closed"
        finally:
            writer.close()

    ends: dict[str, int] = {}
    for end in await asyncio.gather(*(one() for _ in range(count))):
        ends[end] = ends.get(end, 0) + 1
    return ends


async def chunked_upload(url: str) -> str:
    sent = 0

    async def body():
        nonlocal sent
        yield b'{"text": "'
        chunk = b"x" * (1 << 16)
        while sent < UPLOAD_BYTES:
            sent += len(chunk)
            yield chunk
        yield b'"}'

    t0 = time.perf_counter()
    try:
        async with httpx.AsyncClient(timeout=120) as c:
            r = await c.post(url + "/v1/memories", content=body(),
                             headers={**_auth(HOSTILE_KEYS[0]), "Content-Type": "application/json"})
        return f"HTTP {r.status_code} ({r.json()['error']['code']}) after {sent / 2**20:.0f} MiB sent, " \
               f"{time.perf_counter() - t0:.1f} s"
    except httpx.HTTPError as e:
        return f"{type(e).__name__} after {sent / 2**20:.0f} MiB sent"


async def abuse(url: str, port: int, model: str, duration: float, queue_limit: int, tally: Tally) -> dict:
    stop_at = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        burst = [hostile_request(client, model, HOSTILE_KEYS[i % len(HOSTILE_KEYS)], 32, False, False, tally, i)
                 for i in range(10 * queue_limit)]
        loops = [disconnect_loop(client, model, HOSTILE_KEYS[c % len(HOSTILE_KEYS)], stop_at, 200, tally, c)
                 for c in range(16)]
        results = await asyncio.gather(slow_headers(port, 50, stop_at), slow_bodies(port, 20, stop_at),
                                       chunked_upload(url), *burst, *loops)
    return {"slow_closed": results[0], "slow_bodies": results[1], "upload": results[2]}


def well_behaved(url: str, model: str, duration: float, reference: dict) -> tuple[list, Tally, dict]:
    """The two well-behaved users, run in a process of their own: the hostile clients' work on this side
    must not delay the timing of theirs."""
    latencies, tally = [], Tally()

    async def users():
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            stop_at = time.perf_counter() + duration
            await asyncio.gather(*(good_client(client, model, stop_at, 400, reference, latencies, tally, c)
                                   for c in range(len(GOOD_KEYS))))

    asyncio.run(users())
    return latencies, tally, reference


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="run folder to serve (default: a demo-shaped model trained for 10 steps)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of the quiet run, and of the abuse")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results" / "serve_faults.md"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(1) as users:
        run = Path(args.run) if args.run else build_run(Path(tmp))
        proc, url, port = start_server(run)
        try:
            model = httpx.get(url + "/v1/models", headers=_auth(GOOD_KEYS[0])).json()["data"][0]["id"]
            queue_limit = httpx.get(url + "/health").json()["queue_limit"]
            # a warm-up, which also fixes each prompt's reference answer
            _, _, reference = users.submit(well_behaved, url, model, 3.0, {}).result()
            rss_before = rss_mb(proc.pid)
            load_quiet = os.getloadavg()[0]
            quiet_lat, quiet_tally, _ = users.submit(well_behaved, url, model, args.duration, reference).result()
            hostile = Tally()
            peak = [rss_before]

            async def watch_rss(stop: asyncio.Event):
                while not stop.is_set():
                    peak.append(rss_mb(proc.pid))
                    await asyncio.sleep(0.2)

            async def abuse_with_rss():
                stop = asyncio.Event()
                watcher = asyncio.create_task(watch_rss(stop))
                out = await abuse(url, port, model, args.duration, queue_limit, hostile)
                stop.set()
                await watcher
                return out

            t0, abuse_started = time.perf_counter(), time.time()
            during = users.submit(well_behaved, url, model, args.duration, reference)
            out = asyncio.run(abuse_with_rss())
            abuse_lat, good_tally, _ = during.result()
            abuse_wall = time.perf_counter() - t0
            load_abuse = os.getloadavg()[0]
            deadline = time.time() + 60
            while time.time() < deadline:
                h = httpx.get(url + "/health").json()
                if not (h["running"] or h["waiting"] or h["in_flight"]):
                    break
                time.sleep(0.2)
            time.sleep(2.0)
            rss_after = rss_mb(proc.pid)
            m = metrics(url)
        finally:
            proc.terminate()
            proc.wait(30)

    statuses = {}
    for t in (quiet_tally, good_tally, hostile):
        for s, n in t.status.items():
            statuses[s] = statuses.get(s, 0) + n
    fives = sum(n for s, n in statuses.items() if s >= 500)
    hostile_total = sum(hostile.status.values())
    share_429 = hostile.status.get(429, 0) / max(1, hostile_total)
    reasons = {k.split('"')[1]: int(v) for k, v in m.items() if k.startswith("scalelab_rejected_requests_total{")}
    slowest = sorted(abuse_lat, reverse=True)[:4]
    quiet_ttft, abuse_ttft = [f for _, f, _ in quiet_lat], [f for _, f, _ in abuse_lat]
    quiet_lat, abuse_lat = [t for t, _, _ in quiet_lat], [t for t, _, _ in abuse_lat]
    p99_ratio = pct(abuse_lat, 0.99) / pct(quiet_lat, 0.99)
    rss_change = rss_after / rss_before - 1
    incomplete = quiet_tally.incomplete + good_tally.incomplete + hostile.incomplete
    lines = [
        f"model: {'run ' + args.run if args.run else 'demo shape (depth 4, width 256, BPE 2048, context 256), 10 training steps'}; "
        f"server `scalelab serve --max-batch {MAX_BATCH} --header-timeout {HEADER_TIMEOUT_S} --body-timeout "
        f"{BODY_TIMEOUT_S}` with 6 API keys, "
        f"default limits (queue {queue_limit}, per caller {2 * MAX_BATCH}, queue timeout 60 s, body 1 MiB); "
        f"{args.duration:.0f} s quiet, then {args.duration:.0f} s of abuse ({abuse_wall:.1f} s until its last "
        "request ended)",
        f"abuse: a burst of {10 * queue_limit} requests (10x the queue limit, 32 tokens) from 4 hostile keys; 16 hostile "
        "clients looping on 200-token requests, half streaming, every other request left mid-way; 50 slow-header "
        f"connections; 20 slow-body connections; one {UPLOAD_BYTES >> 20} MB chunked upload to /v1/memories",
        f"well-behaved 16-token requests (2 users with a key each, one request at a time, greedy, streamed): quiet {len(quiet_lat)} requests, p50 "
        f"{pct(quiet_lat, 0.5):.3f} s, p99 {pct(quiet_lat, 0.99):.3f} s; under abuse {len(abuse_lat)} requests, "
        f"p50 {pct(abuse_lat, 0.5):.3f} s, p99 {pct(abuse_lat, 0.99):.3f} s; p99 ratio {p99_ratio:.2f}x "
        f"(target < 3x: {'met' if p99_ratio < 3 else 'NOT met'}); well-behaved requests refused: "
        f"{sum(n for s, n in good_tally.status.items() if s != 200)}; their time to first token (the wait for a "
        f"slot, and the prefill): quiet p50 {pct(quiet_ttft, 0.5):.3f} s, p99 {pct(quiet_ttft, 0.99):.3f} s, "
        f"under abuse p50 {pct(abuse_ttft, 0.5):.3f} s, p99 {pct(abuse_ttft, 0.99):.3f} s; the slowest under abuse "
        f"(latency / first token, started at +s into the abuse): "
        + ", ".join(f"{t:.2f}/{f:.2f} s at +{at - abuse_started:.1f}" for t, f, at in slowest),
        f"hostile requests: {hostile_total} answered, {share_429:.0%} of them 429; rejections by reason (server "
        f"counters): {', '.join(f'{k} {v}' for k, v in sorted(reasons.items()))}; client disconnects the server saw: "
        f"{int(m.get('scalelab_client_disconnects_total', 0))}; sequences parked to give a caller its share: "
        f"{int(m.get('scalelab_preemptions_total', 0))}",
        f"HTTP statuses seen by clients: {dict(sorted(statuses.items()))}; 5xx: {fives} (target 0: "
        f"{'met' if fives == 0 else 'NOT met'})",
        f"admitted requests with a complete, correct answer: {quiet_tally.complete + good_tally.complete} "
        f"well-behaved (same text as the quiet run) and {hostile.complete} hostile that stayed; incomplete or "
        f"wrong: {len(incomplete)}" + (f" (e.g. {incomplete[:3]})" if incomplete else ""),
        f"server RSS: {rss_before:.0f} MB before, {max(peak):.0f} MB peak during, {rss_after:.0f} MB after "
        f"({rss_change:+.1%}; target within 10%: {'met' if abs(rss_change) <= 0.10 else 'NOT met'})",
        f"slow-header connections closed by the server: {out['slow_closed']} of 50; slow-body connections: "
        f"{out['slow_bodies']} (408: answered and closed; open: still open when the abuse ended); "
        f"chunked upload: {out['upload']}",
        f"host load average (1 min): {load_quiet:.1f} as the quiet run began, {load_abuse:.1f} as the abuse ended; "
        "the CPU (2 cores) is shared with other engineers' jobs, and the clients run on the same cores "
        "as the server: latencies are noisy",
    ]
    print("\n".join(lines))
    append_results(args.results, lines)
    if fives or incomplete:
        sys.exit(1)


if __name__ == "__main__":
    main()
