"""Serving load test: N concurrent streaming clients against `scalelab serve` on loopback.

The same workload runs twice for a bounded time each: with continuous batching
(``--max-batch N``) and with one request at a time (``--max-batch 1``). Reported
per run: requests/s, generated tokens/s, p50/p99 request latency and time to
first token, and errors (must be 0). The headline is the throughput ratio; the
target is at least 3x.

The model comes from ``--run`` (any run folder), or else a model of the demo's
shape (depth 4, width 256, BPE 2048, context 256) trained for a few steps into a
temporary folder: throughput does not depend on how well it writes.

    python bench/serve_load.py [--clients 8] [--duration 20] [--max-tokens 48] [--run RUN_DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from results_file import append_results

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["Alice was born in", "The capital of", "12 + 30 =", "Bob works as a", "Once upon a time",
           "Carol lives in", "The weather today", "Question: who is Dan? Answer:"]


def scalelab(*args: str) -> list[str]:
    return [sys.executable, "-m", "scalelab", *args]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def build_run(folder: Path) -> Path:
    run = folder / "serve_bench"
    sets = {
        "run.out_dir": f'"{run}"', "run.progress": "false", "data.world.n_people": "200",
        "data.world.bios_per_person": "2", "tokenizer.vocab_size": "2048", "model.depth": "4",
        "model.n_embd": "256", "model.block_size": "256", "train.steps": "10", "train.batch_size": "8",
        "train.optim.warmup_steps": "2", "train.eval_every": "10", "train.eval_batches": "1",
    }
    args = sum((["--set", f"{k}={v}"] for k, v in sets.items()), [])
    subprocess.run(scalelab("pretrain", "--skip-eval", *args), env=env(), check=True, capture_output=True)
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, max_batch: int, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(scalelab("serve", str(run), "--port", str(port), "--max-batch", str(max_batch), *extra),
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read())
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


async def one_request(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, seed: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens, done = None, 0, False
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if not done:
        raise RuntimeError("stream ended without [DONE]")
    latency = time.perf_counter() - t0
    return {"latency": latency, "ttft": first if first is not None else latency, "tokens": tokens}


async def load(url: str, model: str, clients: int, duration: float, max_tokens: int) -> dict:
    results, errors = [], []
    t_start = time.perf_counter()
    stop_at = t_start + duration

    async def client_loop(cid: int, client: httpx.AsyncClient):
        i = 0
        while time.perf_counter() < stop_at:  # no new request after the deadline; in-flight ones finish
            try:
                results.append(await one_request(client, model, PROMPTS[(cid + i) % len(PROMPTS)], max_tokens,
                                                 seed=1000 * cid + i))
            except Exception as e:  # every failure is counted, none ends the run
                errors.append(repr(e))
            i += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await asyncio.gather(*(client_loop(c, client) for c in range(clients)))
    elapsed = time.perf_counter() - t_start
    lat = sorted(r["latency"] for r in results)
    ttft = sorted(r["ttft"] for r in results)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    return {
        "requests": len(results), "errors": len(errors), "error_examples": errors[:3], "elapsed": elapsed,
        "req_s": len(results) / elapsed, "tok_s": sum(r["tokens"] for r in results) / elapsed,
        "p50": pct(lat, 0.50), "p99": pct(lat, 0.99), "ttft_p50": pct(ttft, 0.50), "ttft_p99": pct(ttft, 0.99),
    }


def measure(run: Path, max_batch: int, args) -> dict:
    proc, url = start_server(run, max_batch)
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        asyncio.run(load(url, model, args.clients, 3.0, args.max_tokens))  # warm-up, not counted
        return asyncio.run(load(url, model, args.clients, args.duration, args.max_tokens))
    finally:
        proc.terminate()
        proc.wait(30)


def describe(name: str, r: dict) -> str:
    return (f"{name}: {r['requests']} requests in {r['elapsed']:.1f} s = {r['req_s']:.2f} req/s, "
            f"{r['tok_s']:.0f} tokens/s; latency p50 {r['p50']:.2f} s, p99 {r['p99']:.2f} s; "
            f"first token p50 {r['ttft_p50']:.2f} s, p99 {r['ttft_p99']:.2f} s; errors {r['errors']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="run folder to serve (default: a demo-shaped model trained for 10 steps)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent streaming clients (and the batched max-batch)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load per configuration")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--results", default=str(Path(__file__).parent / "results" / "serve_load.md"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else build_run(Path(tmp))
        batched = measure(run, args.clients, args)
        serial = measure(run, 1, args)
    ratio = batched["tok_s"] / serial["tok_s"]
    lines = [
        f"model: {'run ' + args.run if args.run else 'demo shape (depth 4, width 256, BPE 2048, context 256), 10 training steps'}; "
        f"{args.clients} concurrent streaming clients on loopback, /v1/completions, max_tokens {args.max_tokens}, "
        f"temperature 0.8, {args.duration:.0f} s per configuration after a 3 s warm-up",
        describe(f"continuous batching (max-batch {args.clients})", batched),
        describe("one request at a time (max-batch 1)", serial),
        f"throughput ratio (tokens/s): {ratio:.2f}x (target >= 3x: {'met' if ratio >= 3 else 'NOT met'}); "
        f"requests/s ratio {batched['req_s'] / serial['req_s']:.2f}x",
        "server: scalelab serve with its default --threads 1; the CPU is shared with other jobs and the clients run on "
        "the same 2 cores as the server: numbers are noisy",
    ]
    for r in (batched, serial):
        if r["errors"]:
            lines.append(f"errors: {r['error_examples']}")
    print("\n".join(lines))
    append_results(args.results, lines)
    if batched["errors"] or serial["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
