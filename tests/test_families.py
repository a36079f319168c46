"""Decoder / prefix-LM / masked-LM families: masks by perturbation, the 80/10/10 rule by statistics,
FLOPs by hand, a few training steps per family, and the study end to end on a tiny preset."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from posttrain_util import one_thread  # noqa: F401 (autouse fixture)

from scalelab.cli import main
from scalelab.errors import ScalelabError
from scalelab.experiments import families as study
from scalelab.model import families as fam
from scalelab.model.gpt import GPT, GPTConfig

TINY = GPTConfig(depth=2, n_embd=32, head_dim=16, block_size=16)
V = 40




def _random_weights(model: GPT) -> GPT:
    # GPT zero-initialises residual outputs (blocks start as the identity): a perturbation test needs
    # every path live, so every weight is drawn at random.
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def test_prefix_lm_mask_by_perturbation():
    model = _random_weights(fam.build_model("prefix_lm", TINY, V))
    T, P = 10, 4
    idx = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(0))
    mask = fam.prefix_lm_mask(torch.tensor([P]), T)
    base = fam.hidden_with_mask(model, idx, mask)[0]
    for j in range(T):
        changed = idx.clone()
        changed[0, j] = (changed[0, j] + 1) % V
        moved = (fam.hidden_with_mask(model, changed, mask)[0] - base).abs().amax(dim=-1) > 1e-6
        if j < P:  # a prefix token reaches every prefix position, earlier ones included, and everything after
            assert moved.all(), (j, moved)
        else:  # outside the prefix: nothing before j may depend on token j
            assert not moved[:j].any() and moved[j:].all(), (j, moved)


def test_prefix_lm_targets_skip_what_the_prefix_sees():
    y = torch.arange(1, 7)[None].repeat(2, 1)
    t = fam.prefix_targets(y, torch.tensor([1, 4]))
    assert t.tolist() == [[1, 2, 3, 4, 5, 6], [-1, -1, -1, 4, 5, 6]]


def test_decoder_path_is_gpt_unchanged():
    cfg = GPTConfig(**{**TINY.__dict__, "vocab_size": V})
    torch.manual_seed(0)
    reference = GPT(cfg)
    torch.manual_seed(0)
    decoder = fam.build_model("decoder", TINY, V)
    idx = torch.randint(0, V, (2, 12))
    assert torch.equal(reference(idx), decoder(idx))
    _random_weights(decoder)
    # the explicit-mask route with a causal mask is the same function as gpt.py's is_causal path
    torch.testing.assert_close(fam.hidden_with_mask(decoder, idx, fam.causal_mask(12)), decoder.hidden_states(idx))
    # and a prefix-LM whose prefix is one token is a decoder
    torch.testing.assert_close(fam.hidden_with_mask(decoder, idx, fam.prefix_lm_mask(torch.tensor([1, 1]), 12)),
                               decoder.hidden_states(idx))
    assert fam.model_vocab_size("mlm", V) == V + 1 and fam.model_vocab_size("decoder", V) == V
    with pytest.raises(ScalelabError, match="unknown model family"):
        fam.build_model("encoder_decoder", TINY, V)


def test_mlm_masking_rule_statistics():
    vocab, mask_id = 1000, 1000
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, vocab, (200, 1000), generator=g)
    tokens[:, ::50] = 0  # a protected id, like BOS
    inputs, targets = fam.mlm_corrupt(tokens, mask_id, torch.arange(1, vocab), g, 0.15, torch.tensor([0]))
    selected = targets != -1
    eligible = tokens != 0
    assert not selected[~eligible].any()
    assert abs(selected.sum() / eligible.sum() - 0.15) < 0.005
    assert torch.equal(targets[selected], tokens[selected])
    assert torch.equal(inputs[~selected], tokens[~selected])
    n = selected.sum()
    masked = (inputs == mask_id) & selected
    replaced = (inputs != mask_id) & (inputs != tokens) & selected
    kept = (inputs == tokens) & selected
    assert abs(masked.sum() / n - 0.8) < 0.01
    # a random replacement draws the original token 1 time in 999; it then counts as kept
    assert abs(replaced.sum() / n - 0.1) < 0.01
    assert abs(kept.sum() / n - 0.1) < 0.01
    assert not ((inputs == mask_id) & ~selected).any()


def test_mlm_loss_counts_masked_positions_only():
    model = _random_weights(fam.build_model("mlm", TINY, V))
    x = torch.randint(1, V, (3, 12))
    inputs, targets = fam.mlm_corrupt(x, V, torch.arange(1, V), torch.Generator().manual_seed(3))
    logits = model.lm_head(fam.hidden_with_mask(model, inputs, None))
    sel = targets != -1
    by_hand = F.cross_entropy(logits[sel], x[sel])
    torch.testing.assert_close(fam.mlm_loss(model, inputs, targets), by_hand)
    # the unselected positions' targets play no part: any label there gives the same loss
    other = torch.where(sel, targets, torch.full_like(targets, -1))
    torch.testing.assert_close(fam.mlm_loss(model, inputs, other), by_hand)
    assert 0 < sel.sum() < sel.numel()
    with pytest.raises(ScalelabError, match="no position carries a loss"):
        fam.head_loss(model, torch.zeros(1, 2, 32), torch.full((1, 2), -1))


def test_flops_per_token_by_hand():
    # depth 1, width 16, 2 heads of 8, ReLU² MLP of 64, vocab 10, sequence 4
    model = fam.build_model("decoder", GPTConfig(depth=1, n_embd=16, head_dim=8, block_size=4), 10)
    body = 4 * 16 * 16 + 2 * 16 * 64  # q, k, v, o + up, down = 3072
    head = 10 * 16
    assert fam.training_flops_per_token(model, "decoder", 4) == 6 * body + 6 * head + 12 * 16 * 2.5  # 19872
    assert fam.training_flops_per_token(model, "mlm", 4, 0.15) == pytest.approx(6 * body + 6 * head * 0.15 + 12 * 16 * 4)
    # prefix P in {1, 2, 3}: visible keys 10, 11, 13 (of 12 queries); scored positions 4, 3, 2 (of 12)
    assert fam.mean_visible_keys("prefix_lm", 4) == pytest.approx(34 / 12)
    assert fam.loss_fraction("prefix_lm", 4) == pytest.approx(9 / 12)
    assert fam.training_flops_per_token(model, "prefix_lm", 4) == pytest.approx(18432 + 720 + 16 * 34)
    # the MLM's extra [MASK] row is its own: 6 × 16 × 0.15 more FLOPs than with the shared vocab
    mlm = fam.build_model("mlm", GPTConfig(depth=1, n_embd=16, head_dim=8, block_size=4), 10)
    assert fam.training_flops_per_token(mlm, "mlm", 4, 0.15) == pytest.approx(6 * body + 6 * 11 * 16 * 0.15 + 768)


@pytest.mark.parametrize("family", fam.FAMILIES)
def test_a_few_steps_lower_each_familys_loss(family):
    torch.manual_seed(0)
    model = fam.build_model(family, TINY, V)
    # a repeating pattern: learnable both left to right and from both sides
    x = (torch.arange(17)[None] * 3 + torch.arange(8)[:, None]) % 20 + 1
    x, y = x[:, :-1], x[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def loss(seed):
        g = torch.Generator().manual_seed(seed)
        if family == "decoder":
            return model(x, y)
        if family == "prefix_lm":
            return fam.prefix_lm_loss(model, x, y, fam.sample_prefix_lens(8, 16, g))
        return fam.mlm_loss(model, *fam.mlm_corrupt(x, V, torch.arange(1, V), g))

    with torch.no_grad():
        before = float(loss(123))
    for step in range(30):
        opt.zero_grad()
        loss(step).backward()
        opt.step()
    with torch.no_grad():
        assert float(loss(123)) < 0.7 * before


def test_mlm_and_prefix_lm_generate_and_score():
    torch.manual_seed(0)
    mlm = _random_weights(fam.build_model("mlm", TINY, V))
    out = fam.greedy_generate(mlm, "mlm", [1, 2, 3], 5, mask_id=V)
    assert len(out) == 5 and V not in out
    plm = _random_weights(fam.build_model("prefix_lm", TINY, V))
    assert len(fam.greedy_generate(plm, "prefix_lm", [1, 2, 3], 40)) == TINY.block_size - 3  # stops at the context
    w = torch.randint(1, V, (2, 16))
    fill = study.continuation_nats(mlm, "mlm", w, 8, V, "fill")
    pll = study.continuation_nats(mlm, "mlm", w, 8, V, "pll")
    assert fill.shape == pll.shape == (2, 8) and not torch.allclose(fill, pll)
    # the prefix-LM's scores of the second half do not depend on what comes after each scored token
    a = study.continuation_nats(plm, "prefix_lm", w, 8, V)
    w2 = w.clone()
    w2[:, -1] = (w2[:, -1] + 1) % V
    b = study.continuation_nats(plm, "prefix_lm", w2, 8, V)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])


def _tiny_sets(out):
    return {
        "run.seed": "1", "run.progress": "false", "run.device": '"cpu"',
        "data.val_fraction": "0.1", "data.world.n_people": "16", "data.world.bios_per_person": "2",
        "data.world.extra_tasks": "{}", "tokenizer.vocab_size": "300",
        "model.depth": "1", "model.n_embd": "32", "model.head_dim": "16", "model.block_size": "32",
        "train.steps": "12", "train.batch_size": "8", "train.optim.warmup_steps": "2", "train.log_every": "5",
        "families.out_dir": f'"{out}"', "families.qa_examples": "4", "families.max_new_tokens": "5",
        "families.bpb_windows": "2", "families.probe_steps": "10", "families.val_batches": "2",
    }


def _argv(sets: dict) -> list[str]:
    return ["experiments", "families", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]


def test_study_end_to_end_tiny(tmp_path):
    out = tmp_path / "fam"
    assert main(_argv(_tiny_sets(out))) == 0
    result = json.loads((out / "results.json").read_text())
    assert set(result["families"]) == set(fam.FAMILIES)
    budget = result["flops_budget"]
    for name, r in result["families"].items():
        for metric in (*study.METRICS, "val_objective_loss", "train_flops", "steps", "flops_per_token"):
            assert metric in r, (name, metric)
        # equal FLOPs: every family spends the budget, short of it by less than one step
        one_step = 8 * 32 * r["flops_per_token"]
        assert budget - one_step < r["train_flops"] <= budget
    assert "pll_bpb_not_comparable" in result["families"]["mlm"]
    assert set(result["winners"]) == set(study.METRICS)
    assert (out / "summary.md").read_text().startswith("# Decoder-only vs prefix-LM")
    assert (out / "families.png").stat().st_size > 1000
    assert main(_argv(_tiny_sets(out))) == 2  # results exist and no --overwrite


@pytest.mark.parametrize("key,value,message", [
    ("families.families", '["decoder", "encoder"]', "unknown model family 'encoder'"),
    ("families.mask_rate", "1.5", "families.mask_rate"),
    ("families.bpb_prefix_fraction", "0", "bpb_prefix_fraction"),
    ("families.no_such_knob", "1", "unknown config key 'families.no_such_knob'"),
])
def test_bad_config_is_a_scalelab_error(tmp_path, capsys, key, value, message):
    sets = _tiny_sets(tmp_path / "bad") | {key: value}
    assert main(_argv(sets)) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(ScalelabError):
        study.validate(study.FamiliesConfig(mask_rate=0.0))
