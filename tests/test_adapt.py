"""Adaptation: pooling, zero-shot and probe classification, task heads, fine-tuning modes, LoRA, the
``scalelab embed`` command and a tiny end-to-end study (seconds, on a tiny random model)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from posttrain_util import WORLD, make_init_run, one_thread, tiny_model  # noqa: F401 (fixture)
from scalelab.adapt import data
from scalelab.adapt.embed import LinearProbe, cosine_classify, embed_texts, encode_texts, layer_hidden_states
from scalelab.adapt.finetune import base_weights_unchanged, evaluate_head, set_mode, train_head, trainable_parameters
from scalelab.adapt.heads import GenerationHead, SequenceClassifier, SpanQA, TokenClassifier
from scalelab.cli import main
from scalelab.config import OptimConfig, load_config
from scalelab.data.world import World
from scalelab.errors import ScalelabError
from scalelab.tokenizer import ByteTokenizer, train_bpe

TOK = ByteTokenizer()
# what the adaptation preset's [sft.optim] gives: warmup, cosine to 5% of the rate, no weight decay, clip 1
HEAD_OPTIM = OptimConfig(warmup_steps=10, min_lr_ratio=0.05, weight_decay=0.0)


def _model(seed=0, **kw):
    m = tiny_model(TOK.vocab_size, 128, seed, **kw)
    # A freshly initialised GPT zeroes its residual outputs; random ones make every token's state differ.
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0, 0.05)
    return m.eval()


# -- embeddings ------------------------------------------------------------------------------------------------


def test_mean_pooling_ignores_padding_and_last_token_is_last_real_token():
    model = _model()
    short, long = "Aria B. Castellano", "Mira K. Holloway works for Cobalt Analytics in Port Alder."
    for pool in ("mean", "last"):
        alone = embed_texts(model, TOK, [short], pool=pool, normalize=False)
        batched = embed_texts(model, TOK, [short, long, "x"], pool=pool, normalize=False)
        assert torch.allclose(alone[0], batched[0], atol=1e-5)
    ids, mask = encode_texts(TOK, [short], 128)
    h = model.hidden_states(ids)[0]
    assert torch.allclose(embed_texts(model, TOK, [short], pool="mean", normalize=False)[0], h.mean(0), atol=1e-5)
    batched = embed_texts(model, TOK, [long, short], pool="last", normalize=False)
    assert torch.allclose(batched[1], h[-1], atol=1e-5)  # the last real token, not padding
    assert not torch.allclose(batched[1], h[0], atol=1e-3)
    unit = embed_texts(model, TOK, [short, long])
    assert torch.allclose(unit.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_layer_choice_and_bad_inputs():
    model = _model()
    ids, _ = encode_texts(TOK, ["hello there"], 128)
    assert torch.allclose(layer_hidden_states(model, ids, -1), model.hidden_states(ids))
    assert torch.allclose(layer_hidden_states(model, ids, 1), model.hidden_states(ids))
    first = layer_hidden_states(model, ids, 0)
    assert first.shape == (1, ids.shape[1], model.config.n_embd) and not torch.allclose(first, model.hidden_states(ids))
    with pytest.raises(ScalelabError, match="out of range"):
        embed_texts(model, TOK, ["a"], layer=2)
    with pytest.raises(ScalelabError, match="no texts"):
        embed_texts(model, TOK, [])
    with pytest.raises(ScalelabError, match="unknown pooling"):
        embed_texts(model, TOK, ["a"], pool="max")


def test_cosine_zero_shot_by_hand():
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[2.0, 0.1], [0.2, 3.0], [0.9, 0.8], [-1.0, 0.1]])
    # [-1, 0.1] is closer in angle to label 1 (cos 0.1/|.|) than to label 0 (negative cosine)
    assert cosine_classify(texts, labels).tolist() == [0, 1, 0, 1]


def test_linear_probe_fits_a_separable_set():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    w = torch.tensor([1.0, -2.0, 0.5, 0.0, 1.0])
    y = (x @ w > 0).long()
    probe = LinearProbe(l2=1e-4).fit(x, y)
    assert (probe.predict(x) == y).float().mean() == 1.0
    three = torch.cat([torch.randn(30, 2, generator=g) * 0.1 + torch.tensor(c) for c in ([0.0, 3.0], [3.0, 0.0], [-3.0, -3.0])])
    labels = torch.arange(3).repeat_interleave(30)
    assert (LinearProbe().fit(three, labels).predict(three) == labels).all()
    with pytest.raises(ScalelabError, match="as many labels"):
        LinearProbe().fit(x, y[:10])


# -- data ------------------------------------------------------------------------------------------------------


def test_world_tasks_are_deterministic_and_tags_align_with_plain_encoding():
    world = World(WORLD)
    train, test = data.split_people(world, 0.3, seed=0)
    assert set(train).isdisjoint(test) and len(train) + len(test) == len(world.people)
    assert data.attribute_examples(world, train, 20, 1) == data.attribute_examples(world, train, 20, 1)
    texts, labels = data.sentiment_examples(world, train, 200, 2, negation=0.5)
    for t, y in zip(texts, labels):
        positive = any(f" {w}" in t for w in data.POSITIVE)
        assert y == int(positive != (" not " in t))
    # Byte-level BPE merges across a space, so segment-wise encoding must cut where the whole string is cut.
    bpe = train_bpe(world.pretraining_documents(), 400)
    for tok in (TOK, bpe):
        for ex in data.name_tag_examples(world, train, 20, 3):
            ids, tags = data.encode_segments(tok, ex.segments)
            assert ids == tok.encode(ex.text)
            name = [p.name for p in world.people if p.name in ex.text][0]
            assert tok.decode([i for i, t in zip(ids, tags) if t == data.NAME]).strip().startswith(name)
        items = data.qa_examples(world, train, 20, 4)
        for row, it in zip(data.span_rows(tok, items, 512), items):
            assert tok.decode(row["ids"][row["start"] : row["end"] + 1]).strip() == it["answer"]
            assert row["context_start"] <= row["start"] <= row["end"]
            assert row["ids"] == [tok.bos_id] + tok.encode(f"Question: {it['question']}\nContext: {it['context'].text}")


# -- heads -----------------------------------------------------------------------------------------------------


def _head_rows(kind):
    world = World(WORLD)
    people = list(range(len(world.people)))
    if kind == "sequence":
        texts, labels = data.sentiment_examples(world, people, 16, 0)
        return [([TOK.bos_id] + TOK.encode(t), y) for t, y in zip(texts, labels)]
    if kind == "token":
        return data.tagging_rows(TOK, data.name_tag_examples(world, people, 16, 0, n_sentences=1), 128)
    items = data.qa_examples(world, people, 16, 0, n_sentences=1)
    if kind == "span":
        return data.span_rows(TOK, items, 128)
    return [([TOK.bos_id] + TOK.encode(f"Q: {it['question'][:40]}\nA:"), TOK.encode(" " + it["answer"][:12] + "\n"))
            for it in items]


@pytest.mark.parametrize("kind", ["sequence", "token", "span", "generation"])
def test_heads_shapes_and_a_few_steps_lower_the_loss(kind):
    model = _model()
    head = {"sequence": lambda: SequenceClassifier(model, 2), "token": lambda: TokenClassifier(model, 2),
            "span": lambda: SpanQA(model), "generation": lambda: GenerationHead(model)}[kind]()
    rows = _head_rows(kind)
    assert len(rows) >= 8
    b = head.collate(rows[:4])
    if kind == "sequence":
        assert head(b["ids"], b["mask"]).shape == (4, 2)
    elif kind == "token":
        assert head(b["ids"]).shape == (*b["ids"].shape, 2)
    elif kind == "span":
        s, e = head(b["ids"], b["context"])
        assert s.shape == e.shape == b["ids"].shape
    else:
        assert head.backbone(b["ids"]).shape == (*b["ids"].shape, TOK.vocab_size)
    set_mode(head, "full")
    before = evaluate_head(head, rows)["loss"]
    train_head(head, rows, steps=15, optim=replace(HEAD_OPTIM, lr=3e-3, warmup_steps=2), batch_size=8, seed=0)
    after = evaluate_head(head, rows)["loss"]
    assert after < before


def test_span_prediction_lies_in_the_context_with_start_before_end():
    model = _model(seed=3)
    head = SpanQA(model, max_answer_tokens=5).eval()
    rows = _head_rows("span")
    b = head.collate(rows)
    start, end = head.predict(b["ids"], b["context"])
    for i, r in enumerate(rows):
        assert r["context_start"] <= start[i] <= end[i] < min(start[i] + 5, len(r["ids"]))
    m = evaluate_head(head, rows)
    assert 0 <= m["exact_match"] <= m["span_f1"] <= 1


# -- fine-tuning modes -----------------------------------------------------------------------------------------


def test_trainable_parameter_counts_per_mode():
    c = _model().config
    d, hidden = c.n_embd, c.mlp_hidden
    head_params = d * 2 + 2
    block = sum(p.numel() for p in _model().blocks[0].parameters())
    counts = {}
    for mode in ("full", "last_k", "frozen", "lora"):
        head = SequenceClassifier(_model(), 2)
        set_mode(head, mode, last_k=1, lora_rank=4, lora_targets=["q_proj", "v_proj", "up_proj"])
        counts[mode] = trainable_parameters(head)
    assert counts["frozen"] == head_params
    assert counts["last_k"] == block + head_params
    # q_proj and v_proj are d -> d, up_proj d -> hidden, in each of the 2 blocks
    assert counts["lora"] == c.depth * 4 * ((d + d) + (d + d) + (d + hidden)) + head_params
    m = _model()
    assert counts["full"] == m.num_params() - m.lm_head.weight.numel() + head_params  # lm_head is unused
    gen = GenerationHead(_model())
    set_mode(gen, "frozen")
    assert trainable_parameters(gen) == c.vocab_size * d  # the LM head is the generation head
    with pytest.raises(ScalelabError, match="unknown fine-tuning mode"):
        set_mode(SequenceClassifier(_model(), 2), "half")
    with pytest.raises(ScalelabError, match="last_k"):
        set_mode(SequenceClassifier(_model(), 2), "last_k", last_k=3)
    with pytest.raises(ScalelabError, match="no 'gate_proj'"):
        set_mode(SequenceClassifier(_model(), 2), "lora", lora_targets=["gate_proj"])


def test_lora_trains_and_leaves_the_base_weights_untouched():
    original = _model()
    head = SequenceClassifier(_model(), 2)
    set_mode(head, "lora", lora_rank=4, lora_targets=["q_proj", "v_proj"])
    rows = _head_rows("sequence")
    lora_before = {n: p.clone() for n, p in head.named_parameters() if ".lora_B" in n}
    train_head(head, rows, steps=5, optim=replace(HEAD_OPTIM, lr=1e-2), batch_size=8)
    assert base_weights_unchanged(head.backbone, original)
    assert any(not torch.equal(lora_before[n], p) for n, p in head.named_parameters() if n in lora_before)
    full = SequenceClassifier(_model(), 2)
    set_mode(full, "full")
    train_head(full, rows, steps=2, optim=replace(HEAD_OPTIM, lr=1e-2), batch_size=8)
    assert not base_weights_unchanged(full.backbone, original)


# -- the command and the study -------------------------------------------------------------------------------


def test_embed_cli_end_to_end(tmp_path, capsys):
    run = make_init_run(tmp_path / "run")
    texts = tmp_path / "lines.txt"
    texts.write_text("Aria was born in Port Alder.\n\nMira works for Cobalt Analytics.\n")
    out = tmp_path / "emb.npy"
    assert main(["embed", str(run), "--text", "hello", "--file", str(texts), "--out", str(out)]) == 0
    arr = np.load(out)
    assert arr.shape == (3, 64) and np.allclose(np.linalg.norm(arr, axis=1), 1, atol=1e-5)
    assert "cosine similarity" in capsys.readouterr().out
    jl = tmp_path / "emb.jsonl"
    assert main(["embed", str(run), "-t", "hello", "--pool", "last", "--layer", "0", "--no-normalize", "-o", str(jl)]) == 0
    rec = [json.loads(line) for line in jl.read_text().splitlines()]
    assert rec[0]["text"] == "hello" and len(rec[0]["embedding"]) == 64


@pytest.mark.parametrize("argv,message", [
    (["embed", "{tmp}/nope", "--text", "a"], "run folder not found"),
    (["embed", "{run}"], "no texts to embed"),
    (["embed", "{run}", "--text", "  "], "no texts to embed"),
    (["embed", "{run}", "--file", "{tmp}/missing.txt"], "text file not found"),
    (["embed", "{run}", "--text", "a", "--layer", "7"], "out of range"),
    (["embed", "{run}", "--text", "a", "--out", "{tmp}/e.csv"], "must end in .npy or .jsonl"),
])
def test_embed_cli_bad_input(tmp_path, capsys, argv, message):
    run = make_init_run(tmp_path / "run")
    argv = [a.format(tmp=tmp_path, run=run) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("scalelab: error:") and message in err and "\n" not in err


def test_tiny_study_end_to_end(tmp_path):
    from scalelab.experiments.adaptation import AdaptationConfig, run_adaptation

    run = make_init_run(tmp_path / "base")
    cfg = load_config(None, ["sft.batch_size=8", "sft.optim.warmup_steps=10", "sft.optim.min_lr_ratio=0.05",
                             "sft.optim.weight_decay=0.0"])
    a = AdaptationConfig(out_dir=str(tmp_path / "study"), base_run=str(run), n_train=24, n_test=12, n_sentences=1,
                         heads_steps=3, finetune_steps=3, pools=["mean", "last"])
    result = run_adaptation(cfg, a)
    out = tmp_path / "study"
    for name in ("summary.md", "results.json", "embeddings.png", "finetune.png"):
        assert (out / name).is_file()
    assert set(result["modes"]) == {"full", "last_k", "frozen", "lora"}
    assert result["modes"]["lora"]["base_weights_unchanged"]
    assert result["modes"]["frozen"]["trainable_params"] < result["modes"]["lora"]["trainable_params"] \
        < result["modes"]["full"]["trainable_params"]
    assert "Fine-tuning modes" in (out / "summary.md").read_text()
    assert result["modes"]["lora"]["lr"] == a.lr_lora and result["sft"]["optim"]["warmup_steps"] == 10
    with pytest.raises(ScalelabError, match="already holds results.json"):
        run_adaptation(cfg, a)
    with pytest.raises(ScalelabError, match="adaptation.modes"):
        run_adaptation(cfg, AdaptationConfig(out_dir=str(tmp_path / "x"), base_run=str(run), modes=["half"]))
