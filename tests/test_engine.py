"""The inference engine: batched and continuous batching equal one-at-a-time and full recompute."""

import threading

import pytest
import torch

from scalelab.errors import ScalelabError
from scalelab.infer.engine import Engine, GenerationParams, QueueFull, QueueTimeout, safe_text_end
from scalelab.infer.sample import SamplingParams, generate
from scalelab.model.gpt import GPT, GPTConfig
from scalelab.tokenizer import CharTokenizer

TOK = CharTokenizer(list("abcdefghijklmnopqrstuvwxyz "))


def make_model(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=TOK.vocab_size, block_size=48, depth=2, aspect_ratio=32, head_dim=16)
    cfg.update(kw)
    model = GPT(GPTConfig(**cfg))
    # large random weights: peaked logits, so greedy choices are not decided by last-bit rounding
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


PROMPTS = [TOK.encode(t, add_bos=True) for t in ("hello", "a much longer prompt than the others", "x", "the cat sat", "q")]


def greedy_full_recompute(model, prompt, n):
    seq, logps = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]))[0, -1]
            tok = int(logits.argmax())
            logps.append(float(logits.log_softmax(-1)[tok]))
            seq.append(tok)
    return seq[len(prompt):], logps


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 1, "mlp": "swiglu"}])
def test_batched_greedy_equals_alone_and_full_recompute(kw):
    model = make_model(**kw)
    params = GenerationParams(max_new_tokens=12, temperature=0.0, logprobs=True)
    # max_batch 3 < 5 prompts: later prompts join as earlier ones finish
    batched = Engine(model, TOK, max_batch=3).generate(PROMPTS, params)
    alone = Engine(model, TOK, max_batch=1)
    for prompt, out in zip(PROMPTS, batched):
        solo = alone.generate([prompt], params)[0]
        ref_tokens, ref_logps = greedy_full_recompute(model, prompt, min(12, 48 - len(prompt)))
        assert out.tokens == solo.tokens == ref_tokens
        assert out.logprobs == pytest.approx(ref_logps, abs=1e-4)
        assert out.finish_reason == "length" and out.text == TOK.decode(out.tokens)


def test_context_limit_ends_with_length():
    model = make_model()
    prompt = PROMPTS[1]  # 37 tokens in a context of 48
    out = Engine(model, TOK, max_batch=2).generate([prompt, PROMPTS[0]], GenerationParams(max_new_tokens=40, temperature=0))
    assert len(out[0].tokens) == 48 - len(prompt) and out[0].finish_reason == "length"
    assert out[0].tokens == greedy_full_recompute(model, prompt, 48 - len(prompt))[0]


def test_seeded_sampling_is_reproducible_and_independent_of_batch_mates():
    model = make_model()
    p = GenerationParams(max_new_tokens=15, temperature=1.0, top_k=10, top_p=0.9, seed=11, n=3)
    eng = Engine(model, TOK, max_batch=8)
    a = eng.generate([PROMPTS[0]], p)
    b = eng.generate([PROMPTS[2], PROMPTS[0]], p)[3:]  # same prompt, now sharing the batch with another
    assert [c.tokens for c in a] == [c.tokens for c in b]
    assert len({tuple(c.tokens) for c in a}) > 1  # the n samples differ
    # sample 0 keeps the request seed: it matches the single-prompt sampler draw for draw
    ref = generate(model, PROMPTS[0], SamplingParams(max_new_tokens=15, temperature=1.0, top_k=10, top_p=0.9, seed=11))
    assert a[0].tokens == ref[0]
    other = eng.generate([PROMPTS[0]], GenerationParams(**{**p.__dict__, "seed": 12}))
    assert [c.tokens for c in other] != [c.tokens for c in a]


def test_stop_strings_and_tokens_cut_exactly():
    model = make_model()
    eng = Engine(model, TOK, max_batch=4)
    full = eng.generate([PROMPTS[3]], GenerationParams(max_new_tokens=20, temperature=0))[0]
    text = full.text
    stop = text[6:8]
    want = text[: text.index(stop)]
    params = GenerationParams(max_new_tokens=20, temperature=0, stop_strings=(stop, "never"))
    out = eng.generate([PROMPTS[3]], params)[0]
    assert out.text == want and out.finish_reason == "stop"
    streamed = list(eng.stream(PROMPTS[3], params))
    assert "".join(e.text for e in streamed) == want
    assert [e.finish_reason for e in streamed].count("stop") == 1 and streamed[-1].finish_reason == "stop"
    stop_id = full.tokens[4]
    out = eng.generate([PROMPTS[3]], GenerationParams(max_new_tokens=20, temperature=0, stop_token_ids=(stop_id,)))[0]
    assert out.tokens == full.tokens[: full.tokens.index(stop_id)] and out.finish_reason == "stop"


def test_safe_text_end_holds_back_a_possible_stop_string():
    assert safe_text_end("hello wor", ["world"]) == 6
    assert safe_text_end("hello", ["xyz"]) == 5
    assert safe_text_end("ab\ufffd", []) == 2


def test_continuous_batching_gives_each_request_its_solo_tokens():
    model = make_model()
    greedy = GenerationParams(max_new_tokens=10, temperature=0)
    sampled = GenerationParams(max_new_tokens=10, temperature=0.8, seed=5)
    alone = Engine(model, TOK, max_batch=1)
    solo = {i: alone.generate([p], greedy if i % 2 else sampled)[0].tokens for i, p in enumerate(PROMPTS)}

    eng = Engine(model, TOK, max_batch=3)
    reqs, widths = {}, []
    for i, p in enumerate(PROMPTS):  # a new request every two steps: they join a batch mid-flight
        reqs[i] = eng.submit(p, greedy if i % 2 else sampled)
        eng.step()
        widths.append(eng.num_running)
        eng.step()
    while not all(r.done for r in reqs.values()):
        eng.step()
    assert max(widths) > 1
    for i, r in reqs.items():
        assert r.wait()[0].tokens == solo[i]


def test_background_thread_serves_concurrent_callers():
    model = make_model()
    params = GenerationParams(max_new_tokens=10, temperature=0)
    want = [Engine(model, TOK, max_batch=1).generate([p], params)[0].tokens for p in PROMPTS]
    eng = Engine(model, TOK, max_batch=4).start()
    got = [None] * len(PROMPTS)

    def run(i):
        got[i] = [e.token for e in eng.stream(PROMPTS[i], params) if e.token is not None]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    eng.stop()
    assert got == want


def test_streaming_events_add_up_and_cancel_frees_the_slot():
    model = make_model()
    eng = Engine(model, TOK, max_batch=1)
    params = GenerationParams(max_new_tokens=8, temperature=0)
    events = list(eng.stream(PROMPTS[0], params))
    final = eng.generate([PROMPTS[0]], params)[0]
    assert [e.token for e in events] == final.tokens
    assert "".join(e.text for e in events) == final.text
    assert [e.finish_reason for e in events] == [None] * 7 + ["length"]
    it = eng.stream(PROMPTS[0], params)
    next(it)
    it.close()  # a client that goes away
    eng.step()
    assert eng.num_running == 0
    assert eng.generate([PROMPTS[1]], params)[0].finish_reason == "length"  # the one slot is free again


def test_prompt_over_the_context_is_an_error_unless_truncation_is_asked_for():
    model = make_model()
    eng = Engine(model, TOK, max_batch=2)
    long = TOK.encode("abcdefghij" * 6, add_bos=True)  # 61 tokens, context 48
    with pytest.raises(ScalelabError, match="longer than the model's context of 48"):
        eng.generate([long], GenerationParams(max_new_tokens=4))
    with pytest.raises(ScalelabError, match="empty prompt"):
        eng.generate([[]], GenerationParams())
    out = eng.generate([long], GenerationParams(max_new_tokens=4, temperature=0, truncate_prompt=True))[0]
    assert out.prompt_tokens == 44
    assert out.tokens == eng.generate([long[-44:]], GenerationParams(max_new_tokens=4, temperature=0))[0].tokens
    assert eng.generate([PROMPTS[0]], GenerationParams(max_new_tokens=0))[0].tokens == []


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 1, "mlp": "swiglu"}])
def test_compiled_decode_gives_the_eager_tokens(kw):
    model = make_model(**kw)
    greedy = GenerationParams(max_new_tokens=10, temperature=0, logprobs=True)
    sampled = GenerationParams(max_new_tokens=10, temperature=0.8, top_k=8, seed=5, n=2, logprobs=True)

    def run(engine):  # requests join mid-flight, so steps run with free slots and rows of different lengths
        reqs = []
        for i, p in enumerate(PROMPTS):
            reqs.append(engine.submit(p, greedy if i % 2 else sampled))
            engine.step()
        while not all(r.done for r in reqs):
            engine.step()
        return [c for r in reqs for c in r.wait()]

    eager = run(Engine(model, TOK, max_batch=4))
    engine = Engine(model, TOK, max_batch=4, compile=True)
    compiled = run(engine)
    assert engine.compiled  # still compiled: it did not fall back to eager
    assert [c.tokens for c in compiled] == [c.tokens for c in eager]
    for a, b in zip(compiled, eager):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_compiled_decode_falls_back_to_eager_when_compiling_fails():
    model = make_model()
    params = GenerationParams(max_new_tokens=6, temperature=0)
    want = Engine(model, TOK, max_batch=2).generate(PROMPTS[:2], params)
    engine = Engine(model, TOK, max_batch=2, compile=True)

    def broken(*args):
        raise RuntimeError("no compiler here")

    engine._compiled = broken
    with pytest.warns(UserWarning, match="decoding eagerly"):
        got = engine.generate(PROMPTS[:2], params)
    assert not engine.compiled and [c.tokens for c in got] == [c.tokens for c in want]


def test_incremental_text_equals_a_full_decode_with_split_multibyte_characters():
    """Each step decodes only the tokens since the last character boundary; the text must not differ."""
    from scalelab.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, depth=1, aspect_ratio=32, head_dim=16)).eval()
    eng = Engine(model, tok, max_batch=4)
    # random bytes at temperature 1.5: incomplete and invalid UTF-8 sequences, and whole multi-byte characters
    prompt = tok.encode("héllo wörld ✓ ", add_bos=True)
    params = GenerationParams(max_new_tokens=40, temperature=1.5, seed=3, n=4, stop_token_ids=())
    for c in eng.generate([prompt], params):
        assert c.text == tok.decode(c.tokens)
    events = list(eng.stream(prompt, params))
    final = eng.generate([prompt], params)
    assert "".join(e.text for e in events if e.index == 0) == final[0].text == tok.decode(final[0].tokens)


def test_text_is_decoded_once_at_the_end_when_nobody_streams_it():
    """No stream and no stop string: no per-step detokenizing, and the same completion as a watched request."""
    calls = []

    class CountingTok(CharTokenizer):
        def decode(self, ids):
            calls.append(len(ids))
            return super().decode(ids)

    tok = CountingTok(list("abcdefghijklmnopqrstuvwxyz "))
    eng = Engine(make_model(), tok, max_batch=2)
    params = GenerationParams(max_new_tokens=12, temperature=0.8, seed=5, logprobs=True, stop_token_ids=())
    quiet = eng.submit(PROMPTS[0], params)
    while not quiet.done:
        eng.step()
    assert len(calls) == 1  # one decode, at the end
    calls.clear()
    watched = eng.submit(PROMPTS[0], params, on_event=lambda e: None)
    while not watched.done:
        eng.step()
    assert len(calls) == 12  # a streamed request decodes as it goes
    (a,), (b,) = quiet.wait(), watched.wait()
    assert (a.tokens, a.text, a.finish_reason, a.logprobs) == (b.tokens, b.text, b.finish_reason, b.logprobs)
    assert a.text == tok.decode(a.tokens)


def test_truncation_cuts_only_a_prompt_that_does_not_fit_and_leaves_room_for_the_reply():
    eng = Engine(make_model(), TOK, max_batch=2)
    short = PROMPTS[0]  # 6 tokens: fits, whatever the reply asks for
    assert eng.check(short, GenerationParams(max_new_tokens=48, truncate_prompt=True)) == short
    long = TOK.encode("abcdefghij" * 6, add_bos=True)
    # a reply asking for the whole context gets a quarter of it, not 1 token
    assert len(eng.check(long, GenerationParams(max_new_tokens=48, truncate_prompt=True))) == 48 - 12
    assert eng.check(long, GenerationParams(max_new_tokens=4, truncate_prompt=True)) == long[-44:]


def test_a_full_queue_refuses_new_requests_all_or_nothing():
    eng = Engine(make_model(), TOK, max_batch=1, max_waiting=2)  # not started: nothing leaves the queue
    params = GenerationParams(max_new_tokens=2)
    eng.submit(PROMPTS[0], params)
    with pytest.raises(QueueFull):
        eng.submit_many([(p, params, None, i) for i, p in enumerate(PROMPTS[:2])])
    assert eng.num_waiting == 1  # the refused pair left nothing behind
    eng.submit(PROMPTS[1], params)
    with pytest.raises(QueueFull, match="queue is full"):
        eng.submit(PROMPTS[2], params)
    cont = eng.submit(PROMPTS[2], params, over_limit=True)  # a request already accepted goes on
    assert eng.num_waiting == 3 and not cont.done


def test_cancelled_and_expired_requests_leave_the_queue_from_anywhere_in_it():
    eng = Engine(make_model(), TOK, max_batch=1, max_waiting=4)
    params = GenerationParams(max_new_tokens=3, temperature=0)
    first = eng.submit(PROMPTS[0], params)
    gone = eng.submit(PROMPTS[1], params)
    late = eng.submit(PROMPTS[2], params, queue_timeout=0.0)
    kept = eng.submit(PROMPTS[3], params, queue_timeout=3600)
    gone.cancel()
    eng.step()  # admits the first; the cancelled and the expired ones go, from behind the head
    assert gone.done and late.done and isinstance(late.error, QueueTimeout)
    assert eng.queue_timeouts == 1 and eng.num_waiting == 1 and not kept.done
    while not (first.done and kept.done):
        eng.step()
    assert kept.wait()[0].finish_reason == "length" and eng.tokens_generated == 6


def test_top_logprobs_are_the_likeliest_tokens_and_include_a_greedy_choice():
    model = make_model()
    params = GenerationParams(max_new_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    out = Engine(model, TOK, max_batch=2).generate([PROMPTS[0]], params)[0]
    assert len(out.top_logprobs) == len(out.tokens) == 5
    seq = list(PROMPTS[0])
    for tok, lp, top in zip(out.tokens, out.logprobs, out.top_logprobs):
        with torch.no_grad():
            ref = model(torch.tensor([seq]))[0, -1].log_softmax(-1)
        vals, ids = ref.topk(3)
        assert [t for t, _ in top] == ids.tolist() and top[0] == (tok, pytest.approx(lp, abs=1e-5))
        assert [v for _, v in top] == pytest.approx(vals.tolist(), abs=1e-4)
        seq.append(tok)
    plain = Engine(model, TOK, max_batch=2).generate([PROMPTS[0]], GenerationParams(max_new_tokens=5, temperature=0))
    assert plain[0].top_logprobs is None and plain[0].tokens == out.tokens


def test_a_free_slot_goes_to_the_owner_with_the_fewest_running():
    eng = Engine(make_model(), TOK, max_batch=2)
    params = GenerationParams(max_new_tokens=3, temperature=0)
    busy = [eng.submit(p, params, owner="busy") for p in PROMPTS[:4]]  # a backlog from one caller
    polite = eng.submit(PROMPTS[4], params, owner="polite")
    eng.step()  # two slots: the busy caller's first request, then the polite caller's, ahead of the backlog
    assert {s.req for s in eng._running} == {busy[0], polite}
    while not all(r.done for r in busy):
        eng.step()
    assert [r.wait()[0].tokens for r in busy] == [r[0].tokens for r in (eng.generate([p], params) for p in PROMPTS[:4])]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_sequence_parked_for_another_owner_resumes_exactly(temperature):
    model = make_model()
    eng = Engine(model, TOK, max_batch=2)
    params = GenerationParams(max_new_tokens=10, temperature=temperature, seed=7, logprobs=True)
    busy = [eng.submit(p, params, owner="busy") for p in PROMPTS[:2]]
    eng.step()  # both slots to the busy owner
    eng.step()
    polite = eng.submit(PROMPTS[3], params, owner="polite")
    eng.step()  # no slot free: one of busy's sequences is parked for the polite owner's first
    assert eng.preemptions == 1 and polite in {s.req for s in eng._running} and len(eng._parked) == 1
    while not all(r.done for r in (*busy, polite)):
        eng.step()
    assert eng.preemptions == 1 and not eng._parked and sorted(eng._free) == [0, 1]
    alone = Engine(model, TOK, max_batch=1)
    for req, prompt in zip((*busy, polite), (*PROMPTS[:2], PROMPTS[3])):
        got, want = req.wait()[0], alone.generate([prompt], params)[0]
        assert got.tokens == want.tokens and got.text == want.text and got.finish_reason == want.finish_reason
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)


def test_a_resumed_sequence_gets_its_cache_back_without_a_forward_pass():
    """A resume copies the parked keys and values back: re-running the model over its prompt and tokens
    (up to the whole context) on every resume stalled the whole batch."""
    model = make_model()
    eng = Engine(model, TOK, max_batch=2)
    params = GenerationParams(max_new_tokens=12, temperature=0.0)
    busy = [eng.submit(p, params, owner="busy") for p in PROMPTS[:2]]
    for _ in range(6):
        eng.step()
    polite = eng.submit(PROMPTS[4], GenerationParams(max_new_tokens=2, temperature=0.0), owner="polite")
    widths = []
    original = model.hidden_states  # the engine's forward pass (it applies the output layer itself)
    model.hidden_states = lambda idx, *a, **kw: widths.append(idx.shape[1]) or original(idx, *a, **kw)
    while not polite.done:
        eng.step()  # the polite request's prefill parks one busy sequence
    eng.step()  # the parked one resumes here
    assert eng.preemptions == 1 and not eng._parked and eng.num_running == 2
    assert widths.count(len(PROMPTS[4])) == 1 and all(w == 1 for w in widths if w != len(PROMPTS[4]))
    model.hidden_states = original
    while not all(r.done for r in busy):
        eng.step()
    assert [r.wait()[0].tokens for r in busy] == [Engine(model, TOK, max_batch=1).generate([p], params)[0].tokens
                                                 for p in PROMPTS[:2]]


def test_one_owner_is_never_parked_and_a_parked_sequence_can_be_cancelled():
    eng = Engine(make_model(), TOK, max_batch=2)
    params = GenerationParams(max_new_tokens=8, temperature=0)
    reqs = [eng.submit(p, params) for p in PROMPTS[:3]]  # no owners: first come, first served, nothing parked
    while not all(r.done for r in reqs):
        eng.step()
    assert eng.preemptions == 0
    hogs = [eng.submit(p, params, owner="a") for p in PROMPTS[:2]]
    eng.step()
    late = eng.submit(PROMPTS[3], params, owner="b")
    eng.step()
    [parked] = eng._parked
    parked.req.cancel()  # its client leaves while it has no slot
    while not all(r.done for r in (*hogs, late)):
        eng.step()
    assert parked.req.wait()[0].finish_reason == "cancelled" and late.wait()[0].finish_reason == "length"
    assert not eng._parked and eng.num_running == 0 and sorted(eng._free) == [0, 1]
