import ast
import math

import pytest
import torch

from scalelab.infer import tools
from scalelab.infer.engine import Engine, GenerationParams
from scalelab.infer.sample import SamplingParams
from scalelab.infer.tools import (
    MAX_INT_DIGITS,
    MAX_DEPTH,
    ToolCall,
    ToolError,
    evaluate_expression,
    handle_tool_call,
    engine_generate_fn,
    run_with_tools,
    sampler_generate_fn,
)
from scalelab.model.gpt import GPT, GPTConfig
from scalelab.tokenizer import ByteTokenizer


@pytest.mark.parametrize(
    "expr, value",
    [("1+2", "3"), ("12 * (3 + 4)", "84"), ("8/2", "4"), ("0.1 + 0.2", "0.3"), ("2**10", "1024"), ("-3**2", "-9"),
     ("7 // 2", "3"), ("7 % 3", "1"), ("2 ** -2", "0.25"), ("((((5))))", "5"), ("1e3 * 2", "2000")],
)
def test_calculator_arithmetic(expr, value):
    assert evaluate_expression(expr) == value


@pytest.mark.parametrize(
    "expr, reason",
    [
        ("__import__('os').system('echo hi')", "function call"),
        ("().__class__.__bases__[0].__subclasses__()", "not allowed"),
        ("x + 1", "the name 'x'"),
        ("open", "the name 'open'"),
        ("'a' * 10", "not a real number"),
        ("[1, 2]", "not allowed"),
        ("lambda: 1", "not allowed"),
        ("1 << 1000", "LShift"),
        ("2 ** 10 ** 10", "exponent too large"),
        ("9 ** 9 ** 9", "exponent too large"),
        ("10.0 ** 400", "exponent too large"),
        ("1e308 * 10", "too large"),
        ("(10 ** 60) * (10 ** 60)", "more than 100 digits"),
        ("(-8) ** 0.5", "not a real number"),
        ("1 / 0", "division by zero"),
        ("True + 1", "not a real number"),
        ("-" * (MAX_DEPTH + 5) + "1", "nested deeper"),
        ("(1+" * 40 + "1" + ")" * 40, "nested deeper"),
        ("1+" * 150 + "1", "longer than"),
        ("", "empty"),
        ("1 +", "not a valid"),
    ],
)
def test_calculator_refuses(expr, reason, arithmetic_log):
    with pytest.raises(ToolError, match=reason) as info:
        evaluate_expression(expr)
    assert "\n" not in str(info.value)  # refused up front: arithmetic_log fails the test on any big operation


def _int_digits(x) -> float:
    return x.bit_length() * math.log10(2) if isinstance(x, int) else 0.0


def _result_digits(op, a, b) -> float:
    """An upper bound on the digits of ``op(a, b)``, found without computing it (floats cost nothing)."""
    if not (isinstance(a, int) and isinstance(b, int)):
        return 0.0
    if op is ast.Pow:
        return b * _int_digits(a) if b > 0 and abs(a) > 1 else 1.0
    if op is ast.Mult:
        return _int_digits(a) + _int_digits(b) + 1
    return max(_int_digits(a), _int_digits(b)) + 1


# The biggest honest step: two 100-digit operands multiplied. Anything bigger is big-number work.
SMALL_OP_DIGITS = 2 * MAX_INT_DIGITS + 1


@pytest.fixture
def arithmetic_log(monkeypatch):
    """Every binary operation the calculator performs, as (op, a, b, result digits bound).

    An operation over SMALL_OP_DIGITS is stopped before it runs (and fails the test), so a missing
    limit check shows as a failure naming the operation rather than as a hang.
    """
    log = []
    for op, fn in list(tools._BINARY.items()):
        def recorded(a, b, op=op, fn=fn):
            digits = _result_digits(op, a, b)
            log.append((op, a, b, digits))
            if digits > SMALL_OP_DIGITS:
                raise AssertionError(f"the calculator started big-number work: {op.__name__} on {a!r}, {b!r}")
            return fn(a, b)
        monkeypatch.setitem(tools._BINARY, op, recorded)
    return log


def test_huge_power_is_refused_before_the_power_runs(arithmetic_log):
    with pytest.raises(ToolError, match="exponent too large"):
        evaluate_expression("2 ** 10 ** 10")
    assert [(op, a, b) for op, a, b, _ in arithmetic_log] == [(ast.Pow, 10, 10)]  # 2 ** 10**10 never called


def test_operation_log_sees_the_calculators_work(arithmetic_log):
    """The log the refusal tests rely on does record what runs (it is not silently empty)."""
    assert evaluate_expression("(10 ** 60) * 3 + 1") == str(3 * 10**60 + 1)
    assert [op for op, *_ in arithmetic_log] == [ast.Pow, ast.Mult, ast.Add]


def test_calculator_time_limit():
    with pytest.raises(ToolError, match="time limit"):
        evaluate_expression("1+1", timeout_s=-1.0)


class _Memory:
    def __init__(self):
        self.items = []

    def add(self, text):
        self.items.append(text)
        return len(self.items)


def test_handle_tool_call_dispatch():
    mem = _Memory()
    assert handle_tool_call("bio: likes tea", memory=mem) == "saved memory #1"
    assert mem.items == ["likes tea"]
    assert handle_tool_call(" calc: 6*7 ") == "42"
    assert handle_tool_call("6*7") == "42"
    with pytest.raises(ToolError, match="memory is not enabled"):
        handle_tool_call("bio: x")


def test_bio_refusal_from_the_store_is_a_tool_error(tmp_path):
    from scalelab.serve.memory import MemoryStore

    with MemoryStore(tmp_path / "m.sqlite") as store:
        with pytest.raises(ToolError, match="bio: memory text is empty"):
            handle_tool_call("bio:   ", memory=store)


class _ScriptedGPT(GPT):
    """A real (tiny, random) GPT whose argmax after token ``a`` is forced to ``script[a]``.

    It runs the real forward pass and KV cache (the sampler's or the engine's); only the argmax is
    steered, which stands in for a model trained to call tools. A map from the last token is enough
    because the scripted texts below use each character once.
    """

    def __init__(self, cfg, script: dict[int, int]):
        super().__init__(cfg)
        self.script = script

    def forward(self, idx, targets=None, cache=None, reduction="mean"):
        logits = super().forward(idx, targets, cache, reduction)
        for b, row in enumerate(idx.tolist()):
            for t, tok in enumerate(row):
                if tok in self.script:
                    logits[b, t, self.script[tok]] += 1e4
        return logits


def _scripted_model(tok, call_text: str, answer: str = " ok"):
    """After '?': <|tool_call_start|>CALL<|tool_call_end|>; after the tool output: ANSWER, then BOS (stop)."""
    chain = [tok.encode("?")[0], tok.token_id("<|tool_call_start|>"), *tok.encode(call_text),
             tok.token_id("<|tool_call_end|>")]
    reply = [tok.token_id("<|tool_output_end|>"), *tok.encode(answer), tok.bos_id]
    script = dict(zip(chain[:-1], chain[1:])) | dict(zip(reply[:-1], reply[1:]))
    assert len(script) == len(chain) + len(reply) - 2, "scripted texts must not repeat a token"
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=128, depth=1, n_embd=32, head_dim=16, mlp="swiglu")
    return _ScriptedGPT(cfg, script)


def test_tool_loop_with_real_sampler_feeds_result_back():
    tok = ByteTokenizer()
    model = _scripted_model(tok, "12*(3+4)")
    prompt = [tok.bos_id] + tok.encode("Q: what is that?")
    params = SamplingParams(max_new_tokens=60, temperature=0.0, stop_token_ids=(tok.bos_id,))
    run = run_with_tools(sampler_generate_fn(model, tok), prompt, tok, params)
    assert run.calls == [ToolCall(request="12*(3+4)", output="84", ok=True)]
    assert tok.decode(run.tokens) == (
        "<|tool_call_start|>12*(3+4)<|tool_call_end|><|tool_output_start|>84<|tool_output_end|> ok"
    )
    assert run.finish_reason == "stop"


def test_tool_loop_with_batched_engine():
    tok = ByteTokenizer()
    engine = Engine(_scripted_model(tok, "6*7", answer=" yes"), tok, max_batch=2)
    params = GenerationParams(max_new_tokens=60, temperature=0.0, stop_token_ids=(tok.bos_id,))
    run = run_with_tools(engine_generate_fn(engine), [tok.bos_id] + tok.encode("Sum?"), tok, params)
    assert run.calls == [ToolCall(request="6*7", output="42", ok=True)]
    assert tok.decode(run.tokens).endswith("<|tool_output_start|>42<|tool_output_end|> yes")


def test_tool_loop_refuses_malicious_call_and_continues():
    tok = ByteTokenizer()
    model = _scripted_model(tok, "open(1)", answer=" sad")
    params = SamplingParams(max_new_tokens=200, temperature=0.0, stop_token_ids=(tok.bos_id,))
    run = run_with_tools(sampler_generate_fn(model, tok), [tok.bos_id] + tok.encode("hi?"), tok, params)
    assert len(run.calls) == 1 and not run.calls[0].ok
    assert run.calls[0].output.startswith("error: calculator: a function call is not allowed")
    assert tok.decode(run.tokens).endswith("<|tool_output_end|> sad")


def test_tool_loop_contract_with_fake_generator():
    """The loop against a bare generate_fn: the shape the batched engine plugs into."""
    tok = ByteTokenizer()
    start, end = tok.token_id("<|tool_call_start|>"), tok.token_id("<|tool_call_end|>")
    calls = []

    def fake_generate(tokens, params):
        calls.append((list(tokens), params))
        assert end in params.stop_token_ids
        if len(calls) <= 3:  # keeps calling the tool
            return tok.encode("x ") + [start] + tok.encode(f"{len(calls)}+1") + [end, 999]  # junk after end is cut
        return tok.encode("done")

    prompt = [tok.bos_id]
    run = run_with_tools(fake_generate, prompt, tok, SamplingParams(max_new_tokens=200), max_tool_calls=2)
    assert [c.output for c in run.calls] == ["2", "3"]
    assert run.finish_reason == "tool_limit"
    # the second request saw the first answer in its context
    assert tok.decode(calls[1][0]).endswith("<|tool_output_start|>2<|tool_output_end|>")
    assert 999 not in run.tokens

    # the token budget covers the whole run, tool outputs included
    calls.clear()
    run = run_with_tools(fake_generate, prompt, tok, SamplingParams(max_new_tokens=15), max_tool_calls=5)
    assert run.finish_reason == "length" and len(run.tokens) <= 15 + 4


def test_tool_loop_bio_call_saves_memory():
    tok = ByteTokenizer()
    start, end = tok.token_id("<|tool_call_start|>"), tok.token_id("<|tool_call_end|>")
    mem = _Memory()
    outputs = iter([[start] + tok.encode("bio: name is Ada") + [end], tok.encode("noted")])
    run = run_with_tools(lambda t, p: next(outputs), [tok.bos_id], tok, SamplingParams(max_new_tokens=100),
                         handler=lambda text: handle_tool_call(text, memory=mem))
    assert mem.items == ["name is Ada"]
    assert run.calls[0].output == "saved memory #1"
