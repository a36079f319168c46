"""bench/gpu_pretrain.py without a GPU: the device/dtype selection, the peak table, and a tiny fp32 run."""

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import gpu_pretrain  # noqa: E402


def test_selection_picks_bf16_and_flash_on_a_bf16_gpu_and_fp32_on_cpu():
    gpu = gpu_pretrain.select_precision("auto", cuda_available=True, bf16_supported=True)
    assert gpu.device.type == "cuda" and gpu.autocast_dtype == torch.bfloat16 and gpu.flash
    old = gpu_pretrain.select_precision("auto", cuda_available=True, bf16_supported=False)
    assert old.autocast_dtype == torch.float16 and not old.flash
    cpu = gpu_pretrain.select_precision("auto", cuda_available=False, bf16_supported=False)
    assert cpu.device.type == "cpu" and cpu.autocast_dtype is None and not cpu.flash
    forced = gpu_pretrain.select_precision("cpu", cuda_available=True, bf16_supported=True)
    assert forced.device.type == "cpu" and forced.autocast_dtype is None
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu_pretrain.select_precision("cuda", cuda_available=False, bf16_supported=False)


def test_peak_table_matches_device_names():
    assert gpu_pretrain.bf16_peak("NVIDIA H200") == 989e12
    assert gpu_pretrain.bf16_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_pretrain.bf16_peak("Some Future GPU") is None


def test_default_model_is_gpt2_small_class():
    cfg = gpu_pretrain.model_config(50304, 12, 768, 1024).resolved()
    assert (cfg.depth, cfg.n_embd, cfg.n_head) == (12, 768, 12)


def test_tiny_cpu_run_reports_throughput_and_no_mfu(tmp_path):
    out = gpu_pretrain.run(gpu_pretrain_args(tmp_path))
    assert out["device"] == "cpu" and out["tok_s"] > 0 and out["mfu"] is None and out["dtype"] == "None"


def gpu_pretrain_args(tmp_path):
    import argparse

    return argparse.Namespace(device="cpu", depth=1, width=64, vocab=128, block=32, batch=2, steps=2, warmup=1,
                              compile=False, optim="muon", results=str(tmp_path / "r.md"), no_results=True)
