"""Import of Hugging Face checkpoints (folders and GGUF): tiny random models built with transformers'
own config classes, so nothing is downloaded. Each must compute what transformers computes."""

import json
import subprocess

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import scalelab_cmd, subprocess_env  # noqa: E402
from scalelab.errors import ScalelabError  # noqa: E402
from scalelab.infer.chat import render_chat  # noqa: E402
from scalelab.infer.engine import Engine, GenerationParams  # noqa: E402
from scalelab.infer.export_hf import export_run  # noqa: E402
from scalelab.infer.import_hf import import_checkpoint  # noqa: E402
from scalelab.posttrain.chat import render_training, reply_ids  # noqa: E402
from scalelab.tokenizer import load_tokenizer  # noqa: E402
from scalelab.checkpoint import latest_checkpoint, load_model, read_safetensors  # noqa: E402

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama-3 style: BOS from the variable, trimmed content, a header per turn
LLAMA3 = ("{{ bos_token }}{% for message in messages %}"
          "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
TEXTS = [f"the quick brown fox jumps over the lazy dog {i} times, said {n}. What is {i} + {i}?"
         for i in range(40) for n in ("Ada", "Bo")]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}],
    [{"role": "user", "content": "Name a fox."}, {"role": "assistant", "content": "Ada the fox."},
     {"role": "user", "content": "And a dog?"}, {"role": "assistant", "content": " Bo, the lazy dog. "}],
]


def _hf_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer=trainer)
    return tok


@pytest.fixture(scope="module")
def hf_tok():
    return _hf_tokenizer()


def _write_tokenizer(folder, tok, template=CHATML, bos="<|im_start|>", eos="<|im_end|>"):
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "pad_token": eos}
    if template is not None:
        cfg["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


ARCHS = {
    # llama3 RoPE scaling with a small theta, so some frequencies fall in the interpolated band
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        tie_word_embeddings=True, rope_parameters={"rope_type": "llama3", "rope_theta": 100.0, "factor": 4.0,
                                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 64})),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=False)),
    # head_dim 16 while hidden/heads is 8: q/k/v are wider than the residual stream
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=16, rms_norm_eps=1e-5,
                                                                            tie_word_embeddings=True)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=None,
                                                                                  rope_theta=5000.0)),
}


def _reference_tokenizer(folder):
    # The folder's tokenizer.json as written. (AutoTokenizer in transformers 5 rebuilds the pre-tokenizer
    # of some model types, e.g. qwen2, from its own defaults; real checkpoints ship the same rules.)
    return transformers.PreTrainedTokenizerFast.from_pretrained(folder)


def _hf_model(arch, vocab, **extra):
    config_cls, model_cls, kw = ARCHS[arch]
    sizes = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    cfg = config_cls(**{**sizes, **kw, **extra})
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # every weight distinct from its init default, so a mapping slip shows
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.3)
    return model


def _save_hf(folder, model, tok, **save_kw):
    model.save_pretrained(folder, **save_kw)
    _write_tokenizer(folder, tok)
    return folder


def _greedy_hf(model, prompt, new, eos):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_import_matches_transformers(tmp_path, hf_tok, arch):
    hf = _hf_model(arch, hf_tok.get_vocab_size())
    # mistral is saved in shards, with an index, to cover that reader too
    src = _save_hf(tmp_path / "hf", hf, hf_tok, **({"max_shard_size": "20KB"} if arch == "mistral" else {}))
    if arch == "mistral":
        assert (src / "model.safetensors.index.json").is_file()
    run = import_checkpoint(src, tmp_path / "run")
    model = load_model(run)
    tok = load_tokenizer(run / "tokenizer")

    prompt = render_chat(tok, CONVERSATIONS[2][:3])
    ids = torch.tensor([prompt])
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4

    new = 20
    engine = Engine(model, tok, max_batch=2)
    mine = engine.generate([prompt, prompt[:5]], GenerationParams(max_new_tokens=new, temperature=0.0,
                                                                  stop_token_ids=()))
    assert mine[0].tokens == _greedy_hf(hf, prompt, new, eos=-1)[: len(mine[0].tokens)]
    assert mine[1].tokens == _greedy_hf(hf, prompt[:5], new, eos=-1)[: len(mine[1].tokens)]
    assert len(mine[0].tokens) == new

    # import -> export -> import gives the same weights, bit for bit, and the same model config
    exported = export_run(run, tmp_path / "exported")
    again = import_checkpoint(exported, tmp_path / "run2")
    a = read_safetensors(latest_checkpoint(run / "checkpoints") / "model.safetensors")
    b = read_safetensors(latest_checkpoint(again / "checkpoints") / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_model(again).config == model.config
    assert load_tokenizer(again / "tokenizer").chat_template == tok.chat_template


def test_imported_tokenizer_is_the_checkpoints_own(tmp_path, hf_tok):
    src = _save_hf(tmp_path / "hf", _hf_model("llama", hf_tok.get_vocab_size()), hf_tok)
    tok = load_tokenizer(import_checkpoint(src, tmp_path / "run") / "tokenizer")
    ref = _reference_tokenizer(src)
    text = "the lazy dog said <|im_end|> 42 times"
    # special-token strings in plain text stay text (as transformers' split_special_tokens=True)
    assert tok.encode(text) == ref.encode(text, split_special_tokens=True, add_special_tokens=False)
    assert tok.token_id("<|assistant_end|>") not in tok.encode(text)
    assert tok.encode("the lazy dog") == hf_tok.encode("the lazy dog").ids
    assert tok.decode(tok.encode(text)) == text
    assert tok.bos_id == ref.bos_token_id and tok.token_id("<|assistant_end|>") == ref.eos_token_id
    assert tok.stop_ids == (ref.eos_token_id,)
    assert tok.token_byte_lengths()[tok.bos_id] == 0 and tok.token_byte_lengths().sum() > 0
    with pytest.raises(ScalelabError, match="no scalelab token '<|user_start|>'"):
        tok.token_id("<|user_start|>")


@pytest.mark.parametrize("template, bos, eos", [(CHATML, "<|im_start|>", "<|im_end|>"),
                                                (LLAMA3, "<|endoftext|>", "<|eot_id|>")])
def test_chat_template_renders_like_transformers(tmp_path, hf_tok, template, bos, eos):
    src = _save_hf(tmp_path / "hf", _hf_model("qwen2", hf_tok.get_vocab_size()), hf_tok)
    _write_tokenizer(src, hf_tok, template, bos, eos)
    tok = load_tokenizer(import_checkpoint(src, tmp_path / "run") / "tokenizer")
    ref = _reference_tokenizer(src)
    for messages in CONVERSATIONS:
        for gen in (True, False):
            want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            ids = render_chat(tok, messages, add_generation_prompt=gen)
            assert tok.decode(ids) == want  # byte for byte
            assert ids == list(ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen,
                                                       return_dict=False))


def test_training_mask_covers_exactly_the_assistant_replies(tmp_path, hf_tok):
    src = _save_hf(tmp_path / "hf", _hf_model("qwen2", hf_tok.get_vocab_size()), hf_tok)
    tok = load_tokenizer(import_checkpoint(src, tmp_path / "run") / "tokenizer")
    ids, mask = render_training(tok, CONVERSATIONS[2])
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    assert trained == "Ada the fox.<|im_end|>\n Bo, the lazy dog. <|im_end|>\n"
    # prompt + reply tokens (DPO rows) equal the rendered conversation
    prompt = CONVERSATIONS[2][:3]
    assert render_chat(tok, prompt) + reply_ids(tok, " Bo, the lazy dog. ", prompt) == ids
    assert tok.decode(reply_ids(tok, "Ada the fox.", "Name a fox.")) == "Ada the fox.<|im_end|>\n"


def test_model_without_template_needs_one_for_chat(tmp_path, hf_tok):
    src = _save_hf(tmp_path / "hf", _hf_model("llama", hf_tok.get_vocab_size()), hf_tok)
    _write_tokenizer(src, hf_tok, template=None)
    tok = load_tokenizer(import_checkpoint(src, tmp_path / "run") / "tokenizer")
    assert tok.encode("the dog") == hf_tok.encode("the dog").ids  # plain text still works
    with pytest.raises(ScalelabError, match="no chat template.*--chat-template"):
        render_chat(tok, CONVERSATIONS[0])
    (tmp_path / "chatml.jinja").write_text(CHATML)
    tok = load_tokenizer(import_checkpoint(src, tmp_path / "run2", chat_template_file=tmp_path / "chatml.jinja")
                         / "tokenizer")
    assert tok.decode(render_chat(tok, CONVERSATIONS[0])).endswith("<|im_start|>assistant\n")


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, message", [
    (dict(architectures=["GPTNeoXForCausalLM"]), r"architectures=\['GPTNeoXForCausalLM'\] is not supported"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "rope_type='linear'"),
    (dict(architectures=["MistralForCausalLM"], sliding_window=16), "sliding_window=16"),
    (dict(num_local_experts=8), "num_local_experts=8"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(attention_bias=True), "attention_bias=true"),
])
def test_unsupported_config_is_refused_by_field(tmp_path, hf_tok, changes, message):
    src = _save_hf(tmp_path / "hf", _hf_model("llama", hf_tok.get_vocab_size()), hf_tok)
    _edit_config(src, **changes)
    with pytest.raises(ScalelabError, match=message):
        import_checkpoint(src, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary folder left either


def test_missing_shard_and_missing_config_are_refused(tmp_path, hf_tok):
    src = _save_hf(tmp_path / "hf", _hf_model("mistral", hf_tok.get_vocab_size()), hf_tok, max_shard_size="20KB")
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ScalelabError, match=f"lists shard {shard.name}, which is missing"):
        import_checkpoint(src, tmp_path / "run")
    (src / "config.json").unlink()
    with pytest.raises(ScalelabError, match="has no config.json"):
        import_checkpoint(src, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cli_import_then_sample(tmp_path, hf_tok):
    src = _save_hf(tmp_path / "hf", _hf_model("qwen3", hf_tok.get_vocab_size()), hf_tok)
    env = subprocess_env()
    r = subprocess.run(scalelab_cmd("import", str(src), "--out", str(tmp_path / "run"), "--block-size", "48"),
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "Qwen3ForCausalLM" in r.stdout
    assert load_model(tmp_path / "run").config.block_size == 48
    r = subprocess.run(scalelab_cmd("sample", str(tmp_path / "run"), "--prompt", "the quick", "-n", "1",
                                    "--max-new-tokens", "5"), capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("--- sample ---\nthe quick")
    r = subprocess.run(scalelab_cmd("import", str(src), "--out", str(tmp_path / "run")),
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "already exists" in r.stderr


# -- GGUF ----------------------------------------------------------------------------------------------------


def _permute_for_gguf(w, n_head):
    # llama.cpp stores Llama's q/k rows interleaved per head; transformers undoes this when reading
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, hf, tok):
    gguf = pytest.importorskip("gguf")
    c = hf.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t, _ in vocab])
    merges = json.loads(tok.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tok.token_to_id("<|im_start|>"))
    w.add_eos_token_id(tok.token_to_id("<|im_end|>"))
    w.add_chat_template(CHATML)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, t in hf.state_dict().items():
        t = t.detach().float()
        if name.startswith("model.layers."):
            layer, rest = name.split(".")[2], ".".join(name.split(".")[3:]).removesuffix(".weight")
            if rest == "self_attn.q_proj":
                t = _permute_for_gguf(t, c.num_attention_heads)
            elif rest == "self_attn.k_proj":
                t = _permute_for_gguf(t, c.num_key_value_heads)
            gname = f"blk.{layer}.{per_layer[rest]}.weight"
        else:
            gname = names[name]
        w.add_tensor(gname, t.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_import_matches(tmp_path, hf_tok):
    hf = _hf_model("llama", hf_tok.get_vocab_size(), tie_word_embeddings=False, rope_parameters=None)
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, hf, hf_tok)
    run = import_checkpoint(path, tmp_path / "run")
    assert json.loads((run / "summary.json").read_text())["format"].startswith("gguf")
    model, tok = load_model(run), load_tokenizer(run / "tokenizer")
    prompt = render_chat(tok, CONVERSATIONS[0])
    assert tok.decode(prompt) == transformers.AutoTokenizer.from_pretrained(
        tmp_path, gguf_file=path.name).apply_chat_template(CONVERSATIONS[0], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4
