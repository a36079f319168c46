"""Generation speed: ours against Hugging Face transformers' ``generate`` on the same weights, in one run.

A randomly initialised SwiGLU GPT of a realistic small size (no training: speed does not depend
on what the weights say) is exported with ``scalelab export``'s code and loaded back with
transformers. Both then decode greedily from the same prompts:

- time to first token (TTFT): a request for one new token (prefill plus the first sample);
- decode tokens/s: ``batch * (N - 1) / (time for N tokens - time for 1 token)``, i.e. the
  steady-state decode rate with the prefill taken out.

At batch 1 we time our paths: the one-prompt sampler (scalelab.infer.sample.generate) and the
batched engine (scalelab.infer.engine.Engine), eager and with ``compile=True`` (a torch.compile'd
static-shape decode step); at batch 16, the engine against HF with 16 different prompts of the
same length (so HF needs no padding). HF runs twice: its default ``generate`` (dynamic cache, eager)
and its fastest setting we found on CPU, a static cache with its own torch.compile of the decode
step (``--no-hf-compile`` skips it). The warm-up absorbs every compile. "vs HF" compares with HF's
default, "vs best HF" with the faster of its two rows. A last, serving-like case gives 16 requests
of different prompt and answer lengths to both. Each time is the best of ``--repeats`` round-robin
runs after a warm-up. Results are appended to bench/results/generate.md.

    python bench/generate.py [--depth 6] [--n-embd 384] [--new-tokens 64] [--prompt-len 64]

``--run RUN`` benchmarks a run folder's model instead, e.g. a real checkpoint brought in with
``scalelab import`` (docs/real_models.md); the prompts are then its tokenizer's encoding of the corpus.
``--gguf FILE ...`` adds llama.cpp (``llama-cpp-python``) rows at batch 1 for those GGUF files of the
same model (the published Q4_1 file, or an f32/q8_0 conversion of the run's HF export), fed the same
prompt token ids, greedy, on the same number of threads; its greedy tokens are compared with ours.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from results_file import append_results
from scalelab.infer.export_hf import export_hf
from scalelab.infer.sample import SamplingParams, generate
from scalelab.model.gpt import GPT, GPTConfig
from scalelab.tokenizer import build_tokenizer, load_tokenizer
from scalelab.checkpoint import load_model

HF_COMPILED = "HF generate, static cache + torch.compile"
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def corpus() -> list[str]:
    if SHAKESPEARE.is_file():
        text = SHAKESPEARE.read_text(encoding="utf-8")
        return [p for p in text.split("\n\n") if p.strip()]
    from scalelab.data.world import World, WorldConfig

    return World(WorldConfig()).pretraining_documents()


def random_model(vocab_size: int, depth: int, n_embd: int, head_dim: int = 64, block: int = 512,
                 qk_norm: bool = False) -> GPT:
    """A seeded random SwiGLU GPT: speed does not depend on what the weights say."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=vocab_size, block_size=block, depth=depth, n_embd=n_embd, head_dim=head_dim,
                    mlp="swiglu", qk_norm=qk_norm)
    model = GPT(cfg).eval()
    with torch.no_grad():  # the zero-initialised output projections would make every block the identity
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    return model


def decode_bench_setup(vocab: int, depth: int, n_embd: int, batch: int = 16, prompt_len: int = 64):
    """(tokenizer, random model, ``batch`` prompts of ``prompt_len`` tokens): the decode benches' common start."""
    docs = corpus()
    tok = build_tokenizer("bpe", docs, vocab)
    model = random_model(tok.vocab_size, depth, n_embd)
    stream = [t for doc in docs[:2000] for t in tok.encode(doc)]
    return tok, model, [stream[i * prompt_len : (i + 1) * prompt_len] for i in range(batch)]


def compiled_engine(model, tok, max_batch: int, options: dict, warm):
    """An Engine(compile=True) whose graph is compiled with these inductor options, warmed by ``warm(engine)``."""
    import scalelab.infer.engine as engine_module
    from scalelab.infer.engine import Engine

    shipped = engine_module._INDUCTOR_OPTIONS
    engine_module._INDUCTOR_OPTIONS = options  # read when the graph compiles, on the first decode step
    try:
        engine = Engine(model, tok, max_batch=max_batch, compile=True)
        warm(engine)
    finally:
        engine_module._INDUCTOR_OPTIONS = shipped
    assert engine.compiled
    return engine


def stream_read_gb_s(n_bytes: int, repeats: int = 5) -> float:
    """Best rate of summing a float32 buffer of ``n_bytes`` (a plain streaming read)."""
    x = torch.ones(n_bytes // 4)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return n_bytes / best / 1e9


def decode_step_bytes(model, batch: int, span: float) -> tuple[int, float]:
    """(weight bytes, key and value bytes) one decode step of ``batch`` rows reads at key span ``span``:
    every weight matrix but the embedding table (of which it reads one row per token)."""
    c = model.config.resolved()
    weights = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                  if p.dim() == 2 and name != "embed.weight")
    itemsize = next(model.parameters()).element_size()
    return weights, 2 * c.depth * batch * c.n_kv_head * c.head_dim * itemsize * span


def cache_state(step_bytes: float) -> str:
    """The host's read rate over a buffer the size of a decode step's bytes and over a buffer 2.5x that.

    This VM shares its last-level cache with other tenants, and how much of it the VM gets moves
    from minute to minute. When the step's bytes fit, the first rate is about twice the second;
    when they do not, the two are close, and a memory-bound decode step is slower.
    """
    fit, big = stream_read_gb_s(int(step_bytes)), stream_read_gb_s(int(2.5 * step_bytes))
    return f"{step_bytes / 1e6:.0f} MB {fit:.1f} GB/s, {2.5 * step_bytes / 1e6:.0f} MB {big:.1f} GB/s"


def best_times(fns: dict, repeats: int) -> dict:
    """Best-of-``repeats`` wall time of each function, run round-robin.

    Round-robin spreads other people's load on a shared machine evenly over the paths compared,
    and the best run is the one least disturbed by it.
    """
    for fn in fns.values():
        fn()  # warm-up: allocator, BLAS threads, lazy init
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def llama_cpp_runner(path: str, prompt: list[int], threads: int, context: int):
    """A function n -> the first n greedy tokens llama.cpp decodes after ``prompt``, re-reading the prompt each call."""
    from llama_cpp import Llama  # optional: only the --gguf rows need llama-cpp-python

    llm = Llama(model_path=path, n_ctx=context, n_threads=threads, n_threads_batch=threads, verbose=False)

    def run(n):
        out = []
        for t in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(t)
            if len(out) == n:
                return out
        raise AssertionError("llama.cpp stopped early")

    return run


def yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def rates(t1: float, tn: float, batch: int, new_tokens: int) -> dict:
    return {"ttft_ms": 1000 * t1, "decode_tok_s": batch * (new_tokens - 1) / max(tn - t1, 1e-9),
            "total_tok_s": batch * new_tokens / tn}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=384)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: on a shared 2-core machine more threads thrash, for both sides)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="both sides run in this dtype")
    ap.add_argument("--qk-norm", action="store_true", help="export as Qwen3 instead of Llama")
    ap.add_argument("--no-hf-compile", action="store_true", help="skip HF's static cache + torch.compile rows")
    ap.add_argument("--run", default=None, help="benchmark this run folder's model (e.g. an imported checkpoint)")
    ap.add_argument("--gguf", nargs="*", default=[], help="GGUF files of the same model: llama.cpp rows at batch 1")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results" / "generate.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers
    from transformers import CompileConfig
    from scalelab.infer.engine import Engine, GenerationParams

    docs = corpus()
    if args.run:
        tok, model = load_tokenizer(Path(args.run) / "tokenizer"), load_model(args.run)
    else:
        tok = build_tokenizer("bpe", docs, args.vocab)
        model = random_model(tok.vocab_size, args.depth, args.n_embd, args.head_dim, args.block, args.qk_norm)
    with tempfile.TemporaryDirectory() as d:
        export_hf(model, tok, Path(d) / "hf")
        dtype = getattr(torch, args.dtype)
        hf = transformers.AutoModelForCausalLM.from_pretrained(Path(d) / "hf", dtype=dtype).eval()
    model = model.to(dtype)

    stream = [t for doc in docs[:2000] for t in tok.encode(doc)]
    max_batch = max(int(b) for b in args.batches.split(","))
    prompts = [stream[i * args.prompt_len : (i + 1) * args.prompt_len] for i in range(max_batch)]
    # no stop tokens anywhere: every path must produce exactly N tokens
    greedy = SamplingParams(temperature=0.0, stop_token_ids=())

    def ours_sampler(n):
        return generate(model, prompts[0], SamplingParams(**{**greedy.__dict__, "max_new_tokens": n}))

    engines = {}

    def get_engine(batch, compile=False):
        if (batch, compile) not in engines:
            engines[batch, compile] = Engine(model, tok, max_batch=batch, compile=compile)
        return engines[batch, compile]

    def ours_engine(batch, compile=False):
        engine = get_engine(batch, compile)

        def run(n):
            out = engine.generate(prompts[:batch], GenerationParams(**{**greedy.__dict__, "max_new_tokens": n}))
            assert engine.compiled == compile  # a compiled engine that fell back to eager would mislabel its row
            return out

        return run

    # HF compiles only with a static cache, and only on GPUs unless told to; "reduce-overhead" is CUDA graphs
    hf_compile = CompileConfig(mode="default")
    hf_compile._compile_all_devices = True

    def theirs(batch, compiled=False):
        ids = torch.tensor(prompts[:batch])
        mask = torch.ones_like(ids)
        extra = {"cache_implementation": "static", "compile_config": hf_compile} if compiled else {}

        def run(n):
            with torch.inference_mode():
                out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=tok.bos_id, **extra)
            assert out.shape[1] == ids.shape[1] + n
            return out

        return run

    # same weights, same greedy decoding: the tokens must agree before the speeds mean anything
    n_check = 32
    mine = ours_sampler(n_check)[0]
    engine_out = ours_engine(max_batch)(n_check)
    compiled_out = ours_engine(max_batch, compile=True)(n_check)
    hf_out = theirs(max_batch)(n_check)[:, args.prompt_len:].tolist()
    agree_b1 = mine == hf_out[0]
    agree_bn = [c.tokens for c in engine_out] == hf_out
    agree_compiled = [c.tokens for c in compiled_out] == hf_out
    agree_hf_compiled = None
    if not args.no_hf_compile:
        agree_hf_compiled = theirs(max_batch, compiled=True)(n_check)[:, args.prompt_len:].tolist() == hf_out

    llama_cpp = {f"llama.cpp, {Path(g).name}": llama_cpp_runner(g, prompts[0], args.threads,
                                                                  args.prompt_len + args.new_tokens + 8)
                 for g in args.gguf}
    # how many of the first n_check greedy tokens equal ours (quantized weights drift apart after a while)
    llama_cpp_agree = {}
    for name, run in llama_cpp.items():
        theirs_tokens = run(n_check)
        llama_cpp_agree[name] = next((i for i, (a, b) in enumerate(zip(theirs_tokens, mine)) if a != b), n_check)

    def mixed_ours(compile=False):
        engine = get_engine(max_batch, compile)
        reqs = [engine.submit(mixed_prompts[i], GenerationParams(**{**greedy.__dict__, "max_new_tokens": n}))
                for i, n in enumerate(mixed_new)]
        while not all(r.done for r in reqs):
            engine.step()
        assert sum(len(c.tokens) for r in reqs for c in r.wait()) == sum(mixed_new)

    def mixed_theirs():
        # one static batch, left-padded; every row decodes until the longest request is done
        width = max(len(p) for p in mixed_prompts)
        ids = torch.full((len(mixed_prompts), width), tok.bos_id)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(mixed_prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.inference_mode():
            hf.generate(ids, attention_mask=mask, max_new_tokens=max(mixed_new), min_new_tokens=max(mixed_new),
                        do_sample=False, pad_token_id=tok.bos_id)

    # a serving-like batch: prompt and answer lengths differ from request to request
    g = torch.Generator().manual_seed(0)
    mixed_new = torch.randint(8, args.new_tokens + 1, (max_batch,), generator=g).tolist()
    mixed_lens = torch.randint(args.prompt_len // 4, args.prompt_len * 2 + 1, (max_batch,), generator=g).tolist()
    mixed_prompts = [stream[i * 4 * args.prompt_len :][:n] for i, n in enumerate(mixed_lens)]

    weight_bytes, kv_bytes = decode_step_bytes(model, max_batch, args.prompt_len + args.new_tokens / 2)
    state_before = cache_state(weight_bytes + kv_bytes)
    rows = []
    N = args.new_tokens
    for batch in (int(b) for b in args.batches.split(",")):
        paths = {"HF transformers generate": theirs(batch)}
        if not args.no_hf_compile:
            paths[HF_COMPILED] = theirs(batch, compiled=True)
        if batch == 1:
            paths["scalelab sample.generate"] = ours_sampler
        paths["scalelab Engine"] = ours_engine(batch)
        paths["scalelab Engine, compile=True"] = ours_engine(batch, compile=True)
        if batch == 1:
            paths.update(llama_cpp)
        fns = {(name, n): (lambda run=run, n=n: run(n)) for name, run in paths.items() for n in (1, N)}
        t = best_times(fns, args.repeats)
        r = {name: rates(t[name, 1], t[name, N], batch, N) for name in paths}
        ref = r["HF transformers generate"]["decode_tok_s"]
        best_hf = max(v["decode_tok_s"] for name, v in r.items() if name.startswith("HF"))
        for name in paths:
            rows.append((name, batch, r[name], ref, best_hf))

    useful = sum(mixed_new)
    t = best_times({"theirs": mixed_theirs, "ours": mixed_ours, "ours compiled": lambda: mixed_ours(True)},
                   args.repeats)
    t_theirs, t_ours, t_compiled = t["theirs"], t["ours"], t["ours compiled"]
    state_after = cache_state(weight_bytes + kv_bytes)

    c = model.config
    lines = [
        f"model: depth {c.depth}, width {c.n_embd}, heads {c.n_head} (head_dim {c.head_dim}), mlp swiglu, "
        f"qk_norm {c.qk_norm}, vocab {c.vocab_size}; {model.num_params():,} parameters"
        + (f" (run {args.run})" if args.run else "") + f"; {args.dtype}, exported as "
        f"{type(hf).__name__} (transformers {transformers.__version__}, torch {torch.__version__})",
        f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, no stop tokens; "
        f"best of {args.repeats} round-robin runs after a warm-up; torch threads {torch.get_num_threads()}",
        f"same greedy tokens as HF ({n_check} new): batch 1 {yes(agree_b1)}, batch {max_batch} {yes(agree_bn)}, "
        f"batch {max_batch} compiled engine {yes(agree_compiled)}"
        + ("" if agree_hf_compiled is None else f", HF static cache + compile {yes(agree_hf_compiled)}"),
        *[f"{name}: its first {agree} greedy tokens equal ours (of {n_check})" for name, agree in llama_cpp_agree.items()],
        "the CPU is shared with other jobs, so single numbers are noisy; compare rows of one run",
        f"a batch-{max_batch} decode step reads {weight_bytes / 1e6:.1f} MB of weights and {kv_bytes / 1e6:.1f} MB of "
        f"keys and values (mean span); host streaming read before the timings: {state_before}; after: {state_after}",
        "",
        "| path | batch | time to first token (ms) | decode tokens/s | total tokens/s | decode vs HF | vs best HF |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, batch, r, ref, best_hf in rows:
        lines.append(f"| {name} | {batch} | {r['ttft_ms']:.1f} | {r['decode_tok_s']:.0f} | {r['total_tok_s']:.0f} "
                     f"| {r['decode_tok_s'] / ref:.2f}× | {r['decode_tok_s'] / best_hf:.2f}× |")
    lines += [
        "",
        f"mixed batch of {max_batch} requests: prompts of {min(mixed_lens)}-{max(mixed_lens)} tokens, "
        f"{min(mixed_new)}-{max(mixed_new)} new tokens each ({useful} in all); wall time to finish all, "
        "useful tokens/s (HF: one left-padded static batch run to the longest answer; "
        "ours: each request leaves the batch when done)",
        "",
        "| path | wall time (s) | useful tokens/s | vs HF |",
        "|---|---|---|---|",
        f"| HF transformers generate | {t_theirs:.2f} | {useful / t_theirs:.0f} | 1.00× |",
        f"| scalelab Engine | {t_ours:.2f} | {useful / t_ours:.0f} | {t_theirs / t_ours:.2f}× |",
        f"| scalelab Engine, compile=True | {t_compiled:.2f} | {useful / t_compiled:.0f} "
        f"| {t_theirs / t_compiled:.2f}× |",
    ]
    print("\n".join(lines))
    split = lines.index("")  # the bullet lines, then the tables
    append_results(args.results, lines[:split])
    with open(args.results, "a", encoding="utf-8") as f:
        f.write("\n" + "\n".join(lines[split + 1:]) + "\n")


if __name__ == "__main__":
    main()
