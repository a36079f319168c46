"""LoRA for the post-training stages: adapters on a GPT's Linear layers (through ``peft``), saved on
their own and merged back into plain weights.

A LoRA run still writes an ordinary checkpoint, of the *merged* model (W + alpha/r · B A for every
adapted layer), so every command that opens a run works on it. The adapter alone is saved next to
it as ``lora_adapter.safetensors`` (lora_A / lora_B per layer, rank and alpha in the metadata): a few
MB instead of the whole model, and :func:`merge_adapter` puts it onto the base model again.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from scalelab.adapt.finetune import add_lora
from scalelab.errors import ScalelabError
from scalelab.model.gpt import GPT
from scalelab.checkpoint import read_safetensors

ADAPTER_FILE = "lora_adapter.safetensors"
_PEFT_ADAPTER = "default"  # the adapter name peft gives an injected adapter


def attach(model: GPT, rank: int, alpha: float, targets: list[str]) -> int:
    """Inject adapters into ``model`` and freeze everything else; returns the trainable parameter count."""
    add_lora(model, rank, alpha, targets)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_state(model: GPT) -> dict[str, torch.Tensor]:
    """lora_A / lora_B of every adapted layer, named ``<layer>.lora_A`` (no peft adapter name)."""
    out = {}
    for name, p in model.named_parameters():
        if ".lora_" in name:
            layer, rest = name.split(".lora_", 1)
            out[f"{layer}.lora_{rest.split('.')[0]}"] = p.detach().cpu().contiguous()
    return out


def _merge(weights: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], scale: float) -> dict:
    out = dict(weights)
    for key in adapter:
        if not key.endswith(".lora_A"):
            continue
        layer = key.removesuffix(".lora_A")
        if f"{layer}.weight" not in out or f"{layer}.lora_B" not in adapter:
            raise ScalelabError(f"LoRA adapter layer {layer} does not fit the model")
        out[f"{layer}.weight"] = out[f"{layer}.weight"] + scale * (adapter[f"{layer}.lora_B"] @ adapter[key])
    return out


def merged_model(model: GPT, rank: int, alpha: float) -> GPT:
    """A plain GPT with the adapters of ``model`` folded into its weights."""
    base = {k.replace(".base_layer.", "."): v.detach() for k, v in model.state_dict().items() if ".lora_" not in k}
    plain = GPT(model.config)
    plain.load_state_dict(_merge(base, adapter_state(model), alpha / rank), strict=False)
    return plain.to(next(model.parameters()).device)


def save_adapter(model: GPT, path: str | Path, rank: int, alpha: float) -> Path:
    save_file(adapter_state(model), str(path), metadata={"rank": str(rank), "alpha": str(alpha), "format": "scalelab-lora"})
    return Path(path)


def merge_adapter(base: GPT, path: str | Path) -> GPT:
    """``base`` with the adapter file at ``path`` merged in (a new model; ``base`` is left as it was)."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "scalelab-lora":
        raise ScalelabError(f"{path} is not a scalelab LoRA adapter")
    scale = float(meta["alpha"]) / int(meta["rank"])
    merged = GPT(base.config)
    merged.load_state_dict(_merge(base.state_dict(), read_safetensors(path), scale))
    return merged.eval()
