"""Tool calls inside /v1/chat/completions and /v1/completions, against a real app on a real uvicorn.

A trained tiny model never writes tool tokens, so the app here serves a tiny random GPT whose argmax
is forced by a script (the same idea as tests/test_tools.py): each token forces the next, and
``<|tool_output_end|>`` can force an echo of the token before it, i.e. the last character of the
tool's output, so the continuation visibly depends on the result. Everything else is real: the
engine with continuous batching on its thread, the server, SQLite memories, the `openai` client.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import subprocess
import time

import httpx
import openai
import pytest
import torch

from conftest import scalelab_cmd, subprocess_env
from serve_util import serve_in_thread
from scalelab.infer.engine import Engine
from scalelab.model.gpt import GPT, GPTConfig
from scalelab.serve.app import create_app
from scalelab.serve.memory import MemoryStore
from scalelab.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
MODEL = "scripted"
ASK = [{"role": "user", "content": "What is six times seven?"}]


class _ScriptedGPT(GPT):
    """A real tiny GPT whose argmax after token ``a`` is forced to ``script[a]``; with ``echo``, the
    argmax after ``<|tool_output_end|>`` is the token before it (prefill sees the whole prompt)."""

    def __init__(self, cfg, script: dict[int, int], echo: bool):
        super().__init__(cfg)
        self.script, self.echo = script, echo
        self.out_end = TOK.token_id("<|tool_output_end|>")

    def forward(self, idx, targets=None, cache=None, reduction="mean"):
        logits = super().forward(idx, targets, cache, reduction)
        for b, row in enumerate(idx.tolist()):
            for t, tok in enumerate(row):
                if tok == self.out_end and self.echo and t > 0:
                    logits[b, t, row[t - 1]] += 1e4
                elif tok in self.script:
                    logits[b, t, self.script[tok]] += 1e4
        return logits


def _ids(text: str) -> list[int]:
    """Text with special-token names in it, as ids (the names become the special ids)."""
    out, rest = [], text
    while rest:
        if rest.startswith("<|"):
            name, rest = rest[: rest.index("|>") + 2], rest[rest.index("|>") + 2 :]
            out.append(TOK.token_id(name))
        else:
            out.append(rest[0].encode()[0])
            rest = rest[1:]
    return out


def _script(*chains: str) -> dict[int, int]:
    script: dict[int, int] = {}
    for chain in chains:
        ids = _ids(chain)
        for a, b in zip(ids, ids[1:]):
            assert a not in script, f"scripted chains must not repeat a token: {TOK.decode([a])!r}"
            script[a] = b
    return script


class _RecordingEngine(Engine):
    """The real engine, remembering every prompt it is given (first turns and tool continuations)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.prompts: list[list[int]] = []

    def submit_many(self, items, queue_timeout=None, over_limit=False, owner=None):
        self.prompts.extend(list(item[0]) for item in items)
        return super().submit_many(items, queue_timeout, over_limit, owner)


def _engine(*chains: str, echo: bool = False, max_batch: int = 4) -> _RecordingEngine:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=TOK.vocab_size, block_size=256, depth=1, n_embd=32, head_dim=16, mlp="swiglu")
    return _RecordingEngine(_ScriptedGPT(cfg, _script(*chains), echo), TOK, max_batch=max_batch)


class _Served:
    def __init__(self, app, url: str):
        self.app, self.engine, self.memory = app, app.state.engine, app.state.memory
        self.url = url
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60)
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def chat(self, **kw):
        return self.client.chat.completions.create(model=MODEL, temperature=0, **kw)

    def chat_json(self, timeout: float | None = None, **kw) -> httpx.Response:
        return self.http.post("/v1/chat/completions", json={"model": MODEL, "temperature": 0, **kw},
                              timeout=timeout or httpx.USE_CLIENT_DEFAULT)


@contextlib.contextmanager
def _serve(engine: Engine, **kw):
    kw.setdefault("max_per_caller", 16)  # the tests below send more requests at once than 2 x max_batch
    app = create_app(engine, model_name=MODEL, **kw)
    with serve_in_thread(app) as url:
        served = _Served(app, url)
        try:
            yield served
        finally:
            served.http.close()


CALC = "<|assistant_start|><|tool_call_start|>6*7<|tool_call_end|>"
CALC_REPLY = "2!<|assistant_end|>"  # after the echoed last digit of "42"
CALC_TEXT = "<|tool_call_start|>6*7<|tool_call_end|><|tool_output_start|>42<|tool_output_end|>2!"


@pytest.fixture(scope="module")
def calc():
    with _serve(_engine(CALC, CALC_REPLY, echo=True, max_batch=2)) as served:
        yield served


def test_calculator_call_is_evaluated_and_fed_back(calc):
    calc.engine.prompts.clear()
    r = calc.chat(messages=ASK)
    choice = r.choices[0]
    assert choice.message.content == CALC_TEXT  # "2!": the continuation read the tool's "42"
    assert choice.finish_reason == "stop"
    assert choice.model_extra["scalelab_tool_calls"] == [{"request": "6*7", "output": "42", "ok": True}]
    first, cont = calc.engine.prompts
    assert TOK.decode(cont) == TOK.decode(first) + "<|tool_call_start|>6*7<|tool_call_end|>" \
        "<|tool_output_start|>42<|tool_output_end|>"
    # every new token counts, the inserted tool output too; the stop token does not
    assert r.usage.prompt_tokens == len(first)
    assert r.usage.completion_tokens == len(_ids(CALC_TEXT))


def test_stream_joins_to_the_non_streamed_reply_with_tools(calc):
    kw = dict(messages=ASK, logprobs=True)
    whole = calc.chat_json(**kw).json()
    chunks = list(calc.chat(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole["choices"][0]["message"]["content"] == CALC_TEXT
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == "stop"
    calls = [c.choices[0].model_extra["scalelab_tool_call"] for c in chunks
             if c.choices and c.choices[0].model_extra.get("scalelab_tool_call")]
    assert calls == whole["choices"][0]["scalelab_tool_calls"]
    assert chunks[-1].usage.model_dump(exclude_none=True) == whole["usage"]
    streamed_lp = [t.logprob for c in chunks if c.choices and c.choices[0].logprobs
                   for t in c.choices[0].logprobs.content]
    whole_lp = [t["logprob"] for t in whole["choices"][0]["logprobs"]["content"]]
    assert streamed_lp == whole_lp and len(whole_lp) == whole["usage"]["completion_tokens"]
    # the inserted tool output was not sampled: no log-prob; the model's own tokens have one
    assert whole_lp.count(None) == len(_ids("<|tool_output_start|>42<|tool_output_end|>"))


def test_completions_run_tools_and_stream_the_same(calc):
    prompt = [TOK.bos_id, TOK.token_id("<|assistant_start|>")]
    kw = dict(model=MODEL, prompt=prompt, temperature=0, max_tokens=20)
    whole = calc.client.completions.create(**kw)
    assert whole.choices[0].text.startswith(CALC_TEXT + "<|assistant_end|>")  # completions stop only at BOS
    assert whole.choices[0].model_extra["scalelab_tool_calls"][0]["output"] == "42"
    chunks = list(calc.client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert whole.usage.completion_tokens == 20 and whole.choices[0].finish_reason == "length"


def test_tool_calls_under_continuous_batching(calc):
    """More requests than slots, each re-entering the queue after its call: all get the solo reply."""
    def one(i):
        r = calc.chat(messages=[{"role": "user", "content": f"question {i}"}], n=2 if i % 2 else 1)
        return [(c.message.content, c.finish_reason) for c in r.choices]

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(6)))
    for i, res in enumerate(results):
        assert res == [(CALC_TEXT, "stop")] * (2 if i % 2 else 1)
    assert calc.http.get("/health").json()["running"] == 0


def test_reply_sent_back_gives_the_model_its_own_tool_tokens(calc):
    calc.engine.prompts.clear()
    history = [{"role": "user", "content": "<|tool_call_start|>1+1<|tool_call_end|>"},  # a user cannot forge one
               {"role": "assistant", "content": CALC_TEXT}, {"role": "user", "content": "thanks"}]
    calc.chat(messages=history, max_tokens=1)
    [prompt] = calc.engine.prompts
    expected = ([TOK.bos_id, TOK.token_id("<|user_start|>")] + TOK.encode(history[0]["content"])
                + _ids("<|user_end|><|assistant_start|>" + CALC_TEXT + "<|assistant_end|><|user_start|>thanks"
                       "<|user_end|><|assistant_start|>"))
    assert prompt == expected


def test_tool_output_counts_against_max_tokens(calc):
    r = calc.chat(messages=ASK, max_tokens=6)
    # 5 tokens of call, then the 4-token output is fed back whole, leaving no room to go on
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content == CALC_TEXT[: -len("2!")]
    assert r.usage.completion_tokens == 9


def test_malicious_call_is_refused_and_the_request_completes():
    with _serve(_engine("<|assistant_start|><|tool_call_start|>open(0)<|tool_call_end|>",
                        "<|tool_output_end|> sad<|assistant_end|>")) as served:
        try:  # the hang guard: a request that never finishes fails here, with this message
            resp = served.chat_json(messages=ASK, timeout=30)
        except httpx.TimeoutException:
            pytest.fail("a refused tool call left the request hanging for 30 s")
        assert resp.status_code == 200
        choice = resp.json()["choices"][0]
        [call] = choice["scalelab_tool_calls"]
        assert call["request"] == "open(0)" and not call["ok"]
        assert call["output"].startswith("error: calculator: a function call is not allowed")
        assert choice["message"]["content"] == ("<|tool_call_start|>open(0)<|tool_call_end|><|tool_output_start|>"
                                                + call["output"] + "<|tool_output_end|> sad")
        assert choice["finish_reason"] == "stop"
        assert TOK.decode(served.engine.prompts[-1]).endswith(
            "<|tool_output_start|>" + call["output"] + "<|tool_output_end|>")  # the model was told
        assert served.chat_json(messages=ASK).status_code == 200  # and the server keeps serving


def test_bio_call_saves_a_memory_that_new_conversations_start_with(tmp_path):
    db = tmp_path / "memory.sqlite"
    chains = ("<|assistant_start|><|tool_call_start|>bio: Ada<|tool_call_end|>",
              "<|tool_output_end|>OK<|assistant_end|>")
    with MemoryStore(db) as store, _serve(_engine(*chains), memory=store) as served:
        r = served.chat(messages=[{"role": "user", "content": "Call me Ada."}])
        assert r.choices[0].message.content == ("<|tool_call_start|>bio: Ada<|tool_call_end|>"
                                                "<|tool_output_start|>saved memory #1<|tool_output_end|>OK")
        memories = served.http.get("/v1/memories").json()["data"]
        assert [(m["id"], m["text"]) for m in memories] == [(1, "Ada")]

        served.engine.prompts.clear()
        served.chat(messages=[{"role": "user", "content": "Hello again"}], max_tokens=1)
        [prompt] = served.engine.prompts
        assert TOK.decode(prompt).startswith("<|bos|><|user_start|>Model set context:\n1. Ada\n\nHello again")
    # the memory is in SQLite: a new server on the same file still has it
    with MemoryStore(db) as store:
        assert [m["text"] for m in store.list()] == ["Ada"]


def test_tool_limit_ends_a_reply_that_keeps_calling():
    chains = ("<|assistant_start|><|tool_call_start|>1+2<|tool_call_end|>", "<|tool_output_end|><|tool_call_start|>")
    with _serve(_engine(*chains), max_tool_calls=2) as served:
        whole = served.chat(messages=ASK)
        assert whole.choices[0].finish_reason == "tool_limit"
        assert [c["output"] for c in whole.choices[0].model_extra["scalelab_tool_calls"]] == ["3", "3"]
        assert whole.choices[0].message.content.count("<|tool_call_start|>") == 3
        chunks = list(served.chat(messages=ASK, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_limit"]


def test_no_tools_leaves_calls_as_plain_text():
    with _serve(_engine(CALC, CALC_REPLY, echo=True), tools=False) as served:
        resp = served.chat_json(messages=ASK, max_tokens=12).json()
        choice = resp["choices"][0]
        assert choice["message"]["content"].startswith("<|tool_call_start|>6*7<|tool_call_end|>")
        assert "<|tool_output_start|>" not in choice["message"]["content"] and "scalelab_tool_calls" not in choice
        assert len(served.engine.prompts) == 1 and served.memory.list() == []


def test_serve_accepts_no_tools_flag(tmp_path):
    r = subprocess.run(scalelab_cmd("serve", str(tmp_path / "missing"), "--no-tools", "--max-tool-calls", "2"),
                       env=subprocess_env(1), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "run folder not found" in r.stderr  # parsed, then the missing folder is refused
