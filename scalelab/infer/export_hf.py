"""Export a scalelab model to a Hugging Face ``transformers`` folder.

Our GPT maps onto three HF architectures without any approximation:

- ``mlp = "swiglu"``, ``qk_norm = false`` -> ``LlamaForCausalLM``
- ``mlp = "swiglu"``, ``qk_norm = true``  -> ``Qwen3ForCausalLM`` (Llama plus a per-head RMSNorm on
  q and k, applied after the projection and before RoPE, exactly where ours is)
- ``mlp = "swiglu"``, ``attn_bias = true`` (imported Qwen2 models) -> ``Qwen2ForCausalLM``
  (Llama plus biases on q, k and v)

``scalelab import`` (:mod:`scalelab.infer.import_hf`) is the inverse and uses the same names.

Why these are exact: both use pre-norm blocks without biases, RMSNorm as ``x / rms(x) * w`` (not
``1 + w``) with one eps everywhere, rotate-half RoPE with ``inv_freq = theta^(-2i/d)``, attention
scaled by ``head_dim ** -0.5``, ``down(silu(gate(x)) * up(x))``, no embedding, logit or residual
scaling, and an optional tied lm_head. ReLU² and GELU MLPs have no gate, which neither HF class can
express, so they are refused with the setting that would work.

Written files: ``config.json``, ``model.safetensors``, ``generation_config.json`` and, for a BPE
tokenizer, ``tokenizer.json`` / ``tokenizer_config.json`` / ``special_tokens_map.json`` (what
``AutoTokenizer.from_pretrained`` reads). Nothing here imports ``transformers``: exporting needs only
safetensors; loading the result is the consumer's business.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import save_file

from scalelab.errors import ScalelabError
from scalelab.model.gpt import GPT, GPTConfig
from scalelab.run import WORLD_FILE, Run
from scalelab.tokenizer.tokenizers import SPECIAL_TOKENS, Tokenizer

# GPTConfig fields this mapping understands. A field added to GPTConfig later (a softcap, a bias,
# a new norm) is refused until someone checks how it maps, instead of silently exporting a
# model that computes something else.
_KNOWN_FIELDS = {
    "vocab_size", "block_size", "depth", "aspect_ratio", "head_dim", "n_embd", "n_head", "n_kv_head",
    "mlp", "mlp_hidden", "qk_norm", "tie_embeddings", "rope_theta", "norm_eps", "init_std",
    "attn_bias", "attn_dim", "rope_scaling", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
    "rope_original_context",
}

_RENAMES = [
    (r"^embed\.weight$", "model.embed_tokens.weight"),
    (r"^final_norm\.weight$", "model.norm.weight"),
    (r"^lm_head\.weight$", "lm_head.weight"),
    (r"^blocks\.(\d+)\.attn_norm\.weight$", r"model.layers.\1.input_layernorm.weight"),
    (r"^blocks\.(\d+)\.mlp_norm\.weight$", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"^blocks\.(\d+)\.attn\.([qkvo]_proj|q_norm|k_norm)\.weight$", r"model.layers.\1.self_attn.\2.weight"),
    (r"^blocks\.(\d+)\.attn\.([qkv]_proj)\.bias$", r"model.layers.\1.self_attn.\2.bias"),
    (r"^blocks\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$", r"model.layers.\1.mlp.\2.weight"),
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_architecture(cfg: GPTConfig) -> str:
    """The HF class that computes exactly what ``cfg`` computes, or a ScalelabError saying why none does."""
    unknown = sorted(f.name for f in fields(cfg) if f.name not in _KNOWN_FIELDS
                     and getattr(cfg, f.name) != f.default)
    if unknown:
        raise ScalelabError(f"cannot export to hf: model.{unknown[0]} has no known Hugging Face equivalent yet")
    if cfg.mlp != "swiglu":
        raise ScalelabError(
            f"cannot export to hf: model.mlp={cfg.mlp} has no exact Llama/Qwen3 equivalent "
            "(their MLPs are gated); train with model.mlp=\"swiglu\""
        )
    if cfg.attn_bias and cfg.qk_norm:
        raise ScalelabError("cannot export to hf: model.attn_bias with model.qk_norm matches no Hugging Face class")
    if cfg.attn_bias:
        return "Qwen2ForCausalLM"
    return "Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"


_MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}


def hf_weight_name(name: str) -> str:
    """The Hugging Face name of one of our weights (``blocks.0.attn.q_proj.weight`` -> ``model.layers.0...``)."""
    for pattern, repl in _RENAMES:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    raise ScalelabError(f"cannot export to hf: no Hugging Face name for weight {name!r}")


def _rope_parameters(c: GPTConfig) -> dict:
    params = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling == "llama3":
        params.update(rope_type="llama3", factor=c.rope_factor, low_freq_factor=c.rope_low_freq_factor,
                      high_freq_factor=c.rope_high_freq_factor, original_max_position_embeddings=c.rope_original_context)
    return params


def hf_config(model: GPT, tokenizer: Tokenizer | None, dtype: str = "float32") -> dict:
    c = model.config
    arch = hf_architecture(c)
    special = tokenizer.special_ids if tokenizer is not None else {}
    bos = special.get("<|bos|>")
    # A base model ends a document where the next BOS starts; a chat model ends its turn.
    eos = [i for i in (bos, special.get("<|assistant_end|>")) if i is not None] or None
    if tokenizer is not None and tokenizer.kind == "hf":  # an imported checkpoint keeps its own stop tokens
        eos = list(tokenizer.stop_ids)
    cfg = {
        "architectures": [arch],
        "model_type": _MODEL_TYPES[arch],
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "intermediate_size": c.mlp_hidden,
        "num_hidden_layers": c.depth,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_kv_head,
        "head_dim": c.head_dim,  # explicit: Qwen3's default (128) is not hidden/heads
        "hidden_act": "silu",
        "max_position_embeddings": c.block_size,
        "rms_norm_eps": c.norm_eps,
        # transformers >= 5 reads rope_parameters; 4.x reads rope_theta
        "rope_theta": c.rope_theta,
        "rope_parameters": _rope_parameters(c),
        "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": c.init_std,
        "use_cache": True,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if c.rope_scaling:
        cfg["rope_scaling"] = cfg["rope_parameters"]  # transformers 4.x reads the scaling from here
    if arch.startswith("Qwen"):
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.depth)
    else:
        cfg.update(mlp_bias=False, pretraining_tp=1)
    return cfg


def hf_state_dict(model: GPT, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("rope_"):
            continue  # recomputed buffers, not weights
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue  # HF ties it back to embed_tokens (tie_word_embeddings)
        out[hf_weight_name(name)] = tensor.detach().to("cpu", dtype).contiguous()
    return out


def export_checkpoint_tokenizer(tokenizer, out: Path, max_length: int) -> None:
    """An imported checkpoint's tokenizer goes back as it came: tokenizer.json, its special tokens, its template."""
    tokenizer.hf.save(str(out / "tokenizer.json"))
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **tokenizer.special_tokens, "model_max_length": max_length,
               "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    if tokenizer.chat_template is not None:
        (out / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")


def export_tokenizer(tokenizer: Tokenizer, out: Path, max_length: int) -> None:
    if tokenizer.kind == "hf":
        return export_checkpoint_tokenizer(tokenizer, out, max_length)
    if tokenizer.kind != "bpe":
        raise ScalelabError(
            f"cannot export a {tokenizer.kind} tokenizer to hf (only BPE has a tokenizer.json); "
            "pass --no-tokenizer to export the weights alone"
        )
    tokenizer.hf.save(str(out / "tokenizer.json"))
    specials = {"bos_token": "<|bos|>", "eos_token": "<|assistant_end|>"}
    extra = [s for s in SPECIAL_TOKENS if s not in specials.values()]
    (out / "special_tokens_map.json").write_text(
        json.dumps({**specials, "additional_special_tokens": extra}, indent=2), encoding="utf-8"
    )
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "additional_special_tokens": extra,
        "model_max_length": max_length,
        "add_bos_token": False,  # ours adds BOS only when asked, so HF must not add one either
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2), encoding="utf-8")


def export_hf(
    model: GPT,
    tokenizer: Tokenizer | None,
    out_dir: str | Path,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (and its tokenizer, unless None) as a transformers folder; returns the folder."""
    if dtype not in DTYPES:
        raise ScalelabError(f"unknown export dtype {dtype!r} (use {', '.join(DTYPES)})")
    config = hf_config(model, tokenizer, dtype)  # refuses unmappable models before touching disk
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ScalelabError(f"export folder {out} already exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id") if config[k] is not None}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
    # transformers refuses safetensors files without format metadata
    save_file(hf_state_dict(model, DTYPES[dtype]), str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        export_tokenizer(tokenizer, out, model.config.block_size)
    return out


def export_run(
    run_dir: str | Path, out_dir: str | Path, dtype: str = "float32", with_tokenizer: bool = True,
    overwrite: bool = False,
) -> Path:

    run = Run.open(run_dir)
    model = run.load_model("cpu")
    tokenizer = None
    if with_tokenizer:
        if not run.tokenizer_dir.is_dir():
            raise ScalelabError(f"no tokenizer found for {run.path} (looked for tokenizer/); "
                                "pass --no-tokenizer to skip it")
        tokenizer = run.tokenizer
        if tokenizer.vocab_size != model.config.vocab_size:
            raise ScalelabError(f"tokenizer in {run.tokenizer_dir} has {tokenizer.vocab_size} tokens but the model "
                                f"expects {model.config.vocab_size}")
    folder = export_hf(model, tokenizer, out_dir, dtype=dtype, overwrite=overwrite)
    # The synthetic world travels along so `scalelab eval` can run the world tasks on the export too.
    if run.world_file.is_file():
        shutil.copy2(run.world_file, Path(folder) / WORLD_FILE)
    return folder
