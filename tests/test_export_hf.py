"""Export to Hugging Face transformers: the loaded model must compute what ours computes.

transformers is in the ``dev`` extra, so ``make test`` runs these; a bare install skips them locally (never under CI=true).
"""

import subprocess

import pytest
import torch

from conftest import dev_import, scalelab_cmd, subprocess_env
from scalelab.cli import main
from scalelab.config import Config, to_toml
from scalelab.errors import ScalelabError
from scalelab.infer.export_hf import export_hf, hf_architecture
from scalelab.infer.sample import SamplingParams, generate
from scalelab.model.gpt import GPT, GPTConfig
from scalelab.tokenizer import ByteTokenizer, build_tokenizer
from scalelab.checkpoint import save_checkpoint

transformers = dev_import("transformers")

TEXTS = [f"the quick brown fox jumps over the lazy dog {i} times, said {n}" for i in range(60) for n in ("Ada", "Bo")]


@pytest.fixture(scope="module")
def bpe():
    return build_tokenizer("bpe", TEXTS, 320)


def _model(vocab, **kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=vocab, block_size=64, depth=2, n_embd=64, head_dim=16, mlp="swiglu")
    cfg.update(kw)
    m = GPT(GPTConfig(**cfg))
    # Random init zeroes o_proj/down_proj and sets norms to 1: that would hide mapping mistakes
    # in those weights, so every weight gets a distinct random value.
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.2)
    return m.eval()


def _load_hf(path):
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return transformers.AutoModelForCausalLM.from_pretrained(path, **{key: torch.float32}).eval()


@pytest.mark.parametrize(
    "options, arch",
    [
        (dict(qk_norm=False, n_kv_head=2), "LlamaForCausalLM"),
        (dict(qk_norm=True, tie_embeddings=True, rope_theta=500.0, norm_eps=1e-5), "Qwen3ForCausalLM"),
    ],
)
def test_export_matches_logits_and_greedy(tmp_path, bpe, options, arch):
    model = _model(bpe.vocab_size, **options)
    out = export_hf(model, bpe, tmp_path / "hf")
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / f).is_file()
    hf = _load_hf(out)
    assert type(hf).__name__ == arch

    prompt = [bpe.bos_id] + bpe.encode("the quick brown fox said Ada")
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4

    new = 16
    mine = generate(model, prompt, SamplingParams(max_new_tokens=new, temperature=0.0))[0]
    # attention_mask given explicitly: HF would otherwise treat pad-id tokens in the prompt as padding
    with torch.no_grad():
        seq = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                          pad_token_id=bpe.bos_id)[0, len(prompt):].tolist()
    # HF stops at the exported eos ids (BOS, <|assistant_end|>); up to there the tokens must agree
    eos = {bpe.bos_id, bpe.token_id("<|assistant_end|>")}
    assert seq == mine[: len(seq)]
    assert len(seq) == new or seq[-1] in eos

    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "the lazy dog jumps 42 times"
    assert tok.encode(text) == bpe.encode(text)
    assert tok.decode(bpe.encode(text)) == text
    assert tok.bos_token_id == bpe.bos_id


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(mlp="relu2"), r'model.mlp=relu2 .*model.mlp="swiglu"'),
        (dict(mlp="gelu"), r"model.mlp=gelu"),
        (dict(mlp="swiglu", logit_softcap=15.0), r"model.logit_softcap has no known Hugging Face equivalent"),
    ],
)
def test_unmappable_config_is_refused(tmp_path, options, message):
    model = _model(300, **options)
    with pytest.raises(ScalelabError, match=message):
        export_hf(model, None, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()  # refused before writing anything


def test_unknown_future_option_is_refused(monkeypatch):
    cfg = GPTConfig(vocab_size=300, mlp="swiglu").resolved()
    monkeypatch.setattr("scalelab.infer.export_hf._KNOWN_FIELDS", {"vocab_size"})
    with pytest.raises(ScalelabError, match="no known Hugging Face equivalent"):
        hf_architecture(cfg)


def _fake_run(root, tokenizer, **model_kw):
    model = _model(tokenizer.vocab_size, **model_kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(root / "checkpoints", model, opt, step=1, loader_state={})
    tokenizer.save(root / "tokenizer")
    (root / "config.toml").write_text(to_toml(Config()))  # every run folder records its config
    return model


def test_cli_export_run_folder(tmp_path, bpe, capsys):
    run = tmp_path / "run"
    _fake_run(run, bpe, qk_norm=True)
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert "Qwen3ForCausalLM" in capsys.readouterr().out
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    # a second export to the same folder is refused unless asked
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(tmp_path / "hf"), "--overwrite", "--dtype", "bfloat16"]) == 0


def test_cli_export_byte_tokenizer_needs_no_tokenizer_flag(tmp_path, capsys):
    run = tmp_path / "run"
    _fake_run(run, ByteTokenizer())
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "byte tokenizer" in err and "--no-tokenizer" in err and err.count("\n") == 1
    assert main(["export", str(run), "--out", str(tmp_path / "hf2"), "--no-tokenizer"]) == 0
    assert (tmp_path / "hf2" / "config.json").is_file() and not (tmp_path / "hf2" / "tokenizer.json").exists()


def test_cli_export_missing_run_dir_exits_2_with_one_line(tmp_path):
    r = subprocess.run(scalelab_cmd("export", str(tmp_path / "nope"), "--out", str(tmp_path / "hf")),
                       capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "run folder not found" in r.stderr
