"""The benchmarks' own inputs and bookkeeping: decode option overrides, the byte count they report, and the
throughput bench's time breakdown."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import compiled_decode_ab  # noqa: E402
import pretrain_throughput  # noqa: E402
from generate import decode_step_bytes, random_model  # noqa: E402
from scalelab.model.gpt import GPTConfig  # noqa: E402


def test_option_overrides_parse_and_bad_ones_fail_in_one_line():
    assert compiled_decode_ab.parse_options(["cpp.enable_concat_linear=true", "freezing=false"]) == {
        "cpp.enable_concat_linear": True, "freezing": False}
    for bad, why in (("cpp.no_such=true", "is not an inductor option"), ("nope", "is not KEY=VALUE")):
        with pytest.raises(SystemExit, match=why):
            compiled_decode_ab.parse_options([bad])
    # from the command line: refused before any model is built, one line, non-zero exit
    proc = subprocess.run([sys.executable, str(BENCH / "compiled_decode_ab.py"), "--b", "cpp.no_such=true"],
                          capture_output=True, text=True, cwd=BENCH, timeout=120)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
        "error: 'cpp.no_such' is not an inductor option (torch._inductor.config)"]


def test_decode_step_bytes_counts_every_matrix_but_the_embedding():
    model = random_model(vocab_size=64, depth=2, n_embd=32, head_dim=16, block=32)
    weights, kv = decode_step_bytes(model, batch=3, span=5)
    c = model.config.resolved()
    assert weights == 4 * (model.num_params() - sum(p.numel() for n, p in model.named_parameters()
                                                    if p.dim() == 1 or n == "embed.weight"))
    assert kv == 2 * c.depth * 3 * c.n_kv_head * c.head_dim * 4 * 5


def test_throughput_breakdown_counts_the_matrix_products_flops():
    cfg = GPTConfig(vocab_size=64, block_size=16, depth=1, n_embd=32, n_head=2)
    tok_s, model, split = pretrain_throughput.train_throughput(cfg, batch=2, steps=2, warmup=1, breakdown=True)
    assert tok_s > 0 and set(split["seconds"]) == {"matmul", "attention", "optimizer", "other"}
    assert split["seconds"]["matmul"] > 0
    # every linear layer's forward product and its two backward ones, over 2 x 16 tokens: 6 FLOPs per weight and
    # token (the embedding is a lookup, not a product); attention's own products run inside SDPA's kernel
    linear_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and n != "embed.weight")
    assert split["matmul_flops"] == pytest.approx(6 * linear_params * 2 * 16, rel=0.01)


def test_throughput_variants_run_side_by_side_and_reject_unknown_knobs():
    cfg = GPTConfig(vocab_size=64, block_size=16, depth=1, n_embd=32, n_head=2)
    lines = pretrain_throughput.compare_variants(cfg, batch=2, steps=2, compile=False,
                                                 variants=["default", "sdpa_math+fused_adamw"], rounds=2)
    assert lines[1].startswith("default: ") and "x1.000 (range 1.000-1.000)" in lines[1]
    assert lines[2].startswith("sdpa_math+fused_adamw: ")
    with pytest.raises(SystemExit, match="unknown variant knob"):
        pretrain_throughput.parse_variant("default+flash3")
