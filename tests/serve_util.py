"""A tiny trained run and a real `scalelab serve` process for the server and web chat tests."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from conftest import scalelab_cmd, subprocess_env, tiny_overrides

API_KEY = "test-key"


def train_tiny_run(run: Path) -> Path:
    """30 steps: enough that the model writes text rather than special tokens, in seconds."""
    overrides = tiny_overrides(run, steps=30, **{"model.block_size": "128"})
    r = subprocess.run(scalelab_cmd("pretrain", "--skip-eval", *sum((["--set", o] for o in overrides), [])),
                       env=subprocess_env(1), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, run: Path, *args: str, threads: int = 1):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = run.name
        cmd = scalelab_cmd("serve", str(run), "--port", str(self.port), *args)
        self.proc = subprocess.Popen(cmd, env=subprocess_env(threads), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        deadline = time.time() + 90
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError("server did not become ready in 90 s")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def serve_in_thread(app, port: int | None = None, **config):
    """``app`` on a real uvicorn in this process (a thread): yields its base URL."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
