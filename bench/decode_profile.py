"""Where a compiled batch-16 decode step spends its time, and how many bytes it must read.

The engine (``compile=True``) decodes 16 prompts greedily under ``torch.profiler``. The step's time
is split into the matmuls (inductor's prepacked MKL linears), attention (the fused CPU flash
kernel), the other fused kernels, and the rest (dynamo's guard check, sampling, the engine's
Python). For the two big parts the benchmark also counts the bytes they must read each step
(every weight matrix but the embedding table; the keys and values up to each step's span) and
prints the rate that implies. When that rate is near what the host's memory delivers, the step
is bound by memory traffic, and only reading fewer bytes makes it faster.

A streaming read of a buffer larger than the step's working set gives the host's rate for
comparison. Two more measurements show where the host's caches end: the read rate over buffers
of 32 to 192 MB (it drops where a buffer no longer fits the cache this VM gets), and the step time
along one long generation, against the bytes that step reads (weights plus keys and values up to
its span). Results are appended to bench/results/decode_profile.md.

    python bench/decode_profile.py [--threads 2] [--depth 6] [--n-embd 384] [--vocab 4096]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import profile

from generate import compiled_engine, decode_bench_setup, decode_step_bytes, stream_read_gb_s
from results_file import append_results
import scalelab.infer.engine as engine_module
from scalelab.infer.engine import GenerationParams


def read_rate_by_size(sizes_mb=(32, 48, 64, 80, 96, 128, 192)) -> list[tuple[int, float]]:
    """(MB, GB/s) of a streaming read for each buffer size: the rate falls where a buffer outgrows the cache."""
    return [(mb, stream_read_gb_s(mb * 1_000_000)) for mb in sizes_mb]


def step_ms_by_span(engine, prompts, new_tokens: int, rounds: int = 3) -> list[float]:
    """Best time of each decode step (step i runs at key span prompt length + 1 + i) over ``rounds`` generations."""
    params = GenerationParams(max_new_tokens=new_tokens, temperature=0.0, stop_token_ids=())
    best: list[float] = []
    for _ in range(rounds):
        reqs = [engine.submit(p, params) for p in prompts]
        engine.step()  # the prefill
        i = 0
        while True:
            t0 = time.perf_counter()
            if not engine.step():
                break
            dt = (time.perf_counter() - t0) * 1e3
            if i == len(best):
                best.append(dt)
            else:
                best[i] = min(best[i], dt)
            i += 1
        assert all(r.done for r in reqs)
    return best


def packed_matmuls_alone_ms(model, batch: int, repeats: int = 30) -> tuple[float, float]:
    """The step's matmuls alone, with the same prepacked MKL weights the compiled graph uses: (ms, GFLOP/s)."""
    weights = [p.detach() for name, p in model.named_parameters() if p.dim() == 2 and name != "embed.weight"]
    packed = [torch.ops.mkl._mkl_reorder_linear_weight(w, batch) for w in weights]
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1]) for w in weights}

    def run():
        for w, pw in zip(weights, packed):
            torch.ops.mkl._mkl_linear(inputs[w.shape[1]], pw, w, None, batch)

    run()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    flops = sum(2 * batch * w.numel() for w in weights)
    return best * 1e3, flops / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=384)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--long-new-tokens", type=int, default=192, help="length of the generation timed step by step")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results" / "decode_profile.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tok, model, prompts = decode_bench_setup(args.vocab, args.depth, args.n_embd, args.batch, args.prompt_len)
    params = GenerationParams(max_new_tokens=args.new_tokens, temperature=0.0, stop_token_ids=())

    def warm(e):
        for _ in range(2):
            e.generate(prompts, params)  # compile, then warm

    shipped = dict(engine_module._INDUCTOR_OPTIONS)
    engine = compiled_engine(model, tok, args.batch, shipped, warm)

    def decode_steps(prof=None) -> tuple[int, float]:
        """Decode steps run and seconds per step, the prefill left out."""
        reqs = [engine.submit(p, params) for p in prompts]
        engine.step()  # the prefill and the first token: not a decode step
        if prof is not None:
            prof.start()
        n, t0 = 0, time.perf_counter()
        while engine.step():
            n += 1
        seconds = (time.perf_counter() - t0) / n
        if prof is not None:
            prof.stop()
        assert all(r.done for r in reqs)
        return n, seconds

    # the step time without the profiler's own overhead: best of a few rounds
    best = min(decode_steps()[1] for _ in range(5))
    # The profiler does not see the ops a C++-wrapper graph launches, so the split comes from the same
    # graph launched from Python (same kernels); the step time above is the shipped engine's.
    engine = compiled_engine(model, tok, args.batch, {k: v for k, v in shipped.items() if k != "cpp_wrapper"}, warm)
    prof = profile()
    n, _ = decode_steps(prof)
    ops = prof.key_averages()
    step_us = {"linear": 0.0, "attention": 0.0}
    for ev in ops:
        if ev.key == "mkl::_mkl_linear":
            step_us["linear"] += ev.self_cpu_time_total / n
        elif ev.key.startswith("aten::_scaled_dot_product"):
            step_us["attention"] += ev.self_cpu_time_total / n
    total_us = sum(ev.self_cpu_time_total for ev in ops) / n

    c = model.config.resolved()
    mean_span = args.prompt_len + args.new_tokens / 2  # decode steps run at spans prompt+1 .. prompt+new-1
    weight_bytes, kv_bytes = decode_step_bytes(model, args.batch, mean_span)
    working_set = weight_bytes + kv_bytes
    host = stream_read_gb_s(int(4 * working_set))

    alone_ms, alone_gflops = packed_matmuls_alone_ms(model, args.batch)
    lin_gb_s = weight_bytes / (step_us["linear"] * 1e-6) / 1e9
    att_gb_s = kv_bytes / (step_us["attention"] * 1e-6) / 1e9
    rest_us = total_us - step_us["linear"] - step_us["attention"]
    floor_ms = working_set / (host * 1e9) * 1e3
    lines = [
        f"model: depth {c.depth}, width {c.n_embd}, vocab {c.vocab_size}; {model.num_params():,} parameters, fp32; "
        f"batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens; torch threads {torch.get_num_threads()}",
        f"decode step (best of 5, no profiler): {best * 1e3:.2f} ms",
        f"under the profiler (Python-wrapper graph), per step: linears {step_us['linear'] / 1e3:.2f} ms, attention {step_us['attention'] / 1e3:.2f} ms, "
        f"everything else {rest_us / 1e3:.2f} ms (profiled total {total_us / 1e3:.2f} ms)",
        f"bytes read per step: weights {weight_bytes / 1e6:.1f} MB, keys and values {kv_bytes / 1e6:.1f} MB (mean span {mean_span:.0f})",
        f"implied read rate: linears {lin_gb_s:.1f} GB/s, attention {att_gb_s:.1f} GB/s; host streaming read of "
        f"{4 * working_set / 1e6:.0f} MB: {host:.1f} GB/s",
        f"the same matmuls alone, back to back (weights warm in cache): {alone_ms:.2f} ms, {alone_gflops:.0f} GFLOP/s",
        f"memory floor for one step at the host's streaming rate: {floor_ms:.2f} ms ({best * 1e3 / floor_ms:.2f}x of it used)",
    ]
    rates = read_rate_by_size()
    lines.append("host streaming read by buffer size: " + ", ".join(f"{mb} MB {r:.1f} GB/s" for mb, r in rates))
    # the long generation runs on the shipped (C++-wrapper) graph, like the step time above
    engine = compiled_engine(model, tok, args.batch, shipped, warm)
    per_step = step_ms_by_span(engine, prompts, args.long_new_tokens)
    kv_per_span = decode_step_bytes(model, args.batch, 1)[1]
    marks = []
    for i in range(0, len(per_step), 16):
        window = per_step[i : i + 16]
        span = args.prompt_len + 1 + i + len(window) // 2
        marks.append(f"span {span}: {(weight_bytes + kv_per_span * span) / 1e6:.0f} MB, {min(window):.2f} ms")
    lines.append(f"step time along one {args.long_new_tokens}-token generation (best step of each 16, over 3 rounds), "
                 "with the bytes that step reads: " + "; ".join(marks))
    print("\n".join(lines))
    append_results(args.results, lines)


if __name__ == "__main__":
    main()
