"""An imported checkpoint is an ordinary run folder: serving (OpenAI client, streaming, multi-turn),
terminal chat, SFT and DPO open it unchanged and use its own chat template."""

import json
import subprocess

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import scalelab_cmd, subprocess_env  # noqa: E402
from scalelab.config import load_config  # noqa: E402
from scalelab.infer.chat import render_chat  # noqa: E402
from scalelab.infer.import_hf import import_checkpoint  # noqa: E402
from scalelab.posttrain.dpo import run_dpo  # noqa: E402
from scalelab.posttrain.sft import run_sft  # noqa: E402
from scalelab.tokenizer import load_tokenizer  # noqa: E402
from scalelab.train.metrics import read_metrics  # noqa: E402
from test_import_hf import _hf_model, _hf_tokenizer, _save_hf  # noqa: E402

CHAT = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 is 4."}]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("imported")
    tok = _hf_tokenizer()
    src = _save_hf(root / "hf", _hf_model("qwen2", tok.get_vocab_size(), hidden_size=64, intermediate_size=96), tok)
    return import_checkpoint(src, root / "run")


def _overrides(out, **extra):
    base = {"run.out_dir": f'"{out}"', "run.progress": "false", "train.log_every": "1"}
    return [f"{k}={v}" for k, v in {**base, **extra}.items()]


def _sft_config(tmp_path, out, **extra):
    torch.set_num_threads(1)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": CHAT}) + "\n" for _ in range(8)))
    return load_config(None, _overrides(out, **{"sft.data": '"jsonl"', "sft.path": f'"{data}"', "sft.steps": "12",
                                               "sft.batch_size": "4", "sft.optim.lr": "3e-3", "sft.optim.warmup_steps": "2",
                                               "sft.val_fraction": "0.0", "sft.pack": "false", **extra}))


def test_sft_on_imported_run_learns_its_template(tmp_path, imported):
    out = tmp_path / "sft"
    run_sft(_sft_config(tmp_path, out), imported)
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert losses[-1] < 0.5 * losses[0]
    # the SFT run is a run folder with the same tokenizer and template; the model now answers in the template
    from scalelab.infer.engine import Engine, GenerationParams
    from scalelab.checkpoint import load_model

    tok = load_tokenizer(out / "tokenizer")
    engine = Engine(load_model(out), tok, max_batch=1)
    reply = engine.generate([render_chat(tok, CHAT[:1])], GenerationParams(max_new_tokens=16, temperature=0.0,
                                                                          stop_token_ids=tok.stop_ids))[0]
    assert reply.text == "2 + 2 is 4." and reply.finish_reason == "stop"


def test_dpo_on_imported_run(tmp_path, imported):
    torch.set_num_threads(1)
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": "What is 2 + 2?", "chosen": "4.", "rejected": "5."}) + "\n"
                            for _ in range(6)))
    out = tmp_path / "dpo"
    cfg = load_config(None, _overrides(out, **{"dpo.data": '"jsonl"', "dpo.path": f'"{data}"', "dpo.steps": "6",
                                              "dpo.batch_size": "2", "dpo.optim.lr": "1e-3", "dpo.val_fraction": "0.0"}))
    summary = run_dpo(cfg, imported)
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert losses[-1] < losses[0]
    assert summary["steps"] == 6


def test_terminal_chat_uses_the_template(tmp_path, imported):
    r = subprocess.run(scalelab_cmd("chat", str(imported), "--max-new-tokens", "4"), input="hi\nwhat?\n",
                       capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 2  # one reply line per user line


def test_serve_imported_run_with_openai_client(imported):
    openai = pytest.importorskip("openai")
    from serve_util import Server

    server = Server(imported, "--max-batch", "2")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        tok = load_tokenizer(imported / "tokenizer")
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fox."},
                    {"role": "assistant", "content": "Ada."}, {"role": "user", "content": "And a dog?"}]
        full = client.chat.completions.create(model=server.model, messages=messages, max_tokens=8, temperature=0)
        assert full.usage.prompt_tokens == len(render_chat(tok, messages))
        chunks = client.chat.completions.create(model=server.model, messages=messages, max_tokens=8, temperature=0,
                                                stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == full.choices[0].message.content
    finally:
        server.stop()


def test_report_card_and_harness_open_an_imported_run(tmp_path, imported):
    from scalelab.report import collect_run

    info = collect_run(imported)
    assert info.stage == "import" and info.metrics["params"] > 0
    r = subprocess.run(scalelab_cmd("eval", str(imported), "--tasks", "addition", "--n", "3"),
                       capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "| addition | 0 | 3 | exact_match" in r.stdout


def test_lora_sft_saves_a_mergeable_adapter(tmp_path, imported):
    pytest.importorskip("peft")
    from scalelab.posttrain.lora import ADAPTER_FILE, merge_adapter
    from scalelab.checkpoint import load_model

    out = tmp_path / "lora"
    summary = run_sft(_sft_config(tmp_path, out, **{"sft.optim.lr": "1e-2", "sft.lora_rank": "4"}), imported)
    base = load_model(imported)
    assert 0 < summary["trainable_params"] < base.num_params() / 4 and summary["peak_rss_mb"] > 0
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert losses[-1] < 0.7 * losses[0]
    tuned = load_model(out)  # the run's checkpoint is the merged model
    merged = merge_adapter(base, out / ADAPTER_FILE)
    assert all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), tuned.state_dict().values()))
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed and all(k.endswith("_proj.weight") for k in changed)  # only adapted layers moved


def test_merged_lora_model_computes_what_the_adapted_one_does():
    pytest.importorskip("peft")
    from scalelab.model.gpt import GPT, GPTConfig
    from scalelab.posttrain.lora import attach, merged_model

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, depth=2, n_embd=32, head_dim=8, mlp="swiglu"))
    attach(model, rank=2, alpha=6.0, targets=["q_proj", "down_proj"])
    with torch.no_grad():  # peft starts lora_B at zero, which would hide a wrong merge
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.normal_(0, 0.5)
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        assert (model(ids) - merged_model(model, 2, 6.0)(ids)).abs().max() < 1e-5


def test_grpo_runs_on_an_imported_run(tmp_path, imported):
    r = subprocess.run(scalelab_cmd("grpo", "--config", "configs/grpo.toml", "--init", str(imported), *sum((
        ["--set", o] for o in _overrides(tmp_path / "grpo", **{
            "run.progress": "false", "grpo.steps": "2", "grpo.prompts_per_step": "2", "grpo.group_size": "2",
            "grpo.max_new_tokens": "8", "grpo.eval_every": "2", "grpo.eval_problems": "4",
            "grpo.dynamic_sampling": "false"})), [])),
        capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "grpo" / "summary.json").is_file()
