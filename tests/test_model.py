import pytest
import torch

from scalelab.errors import ScalelabError
from scalelab.infer.sample import SamplingParams, filter_logits, generate
from scalelab.model.gpt import GPT, GPTConfig, KVCache


def make_model(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=61, block_size=32, depth=2, aspect_ratio=32, head_dim=16)
    cfg.update(kw)
    model = GPT(GPTConfig(**cfg))
    # zero-initialised output projections make every block the identity; randomise for meaningful tests
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 1}, {"mlp": "swiglu", "qk_norm": False}, {"tie_embeddings": True}])
def test_changing_a_future_token_leaves_past_logits_unchanged(kw):
    model = make_model(**kw)
    x = torch.randint(0, 61, (2, 20))
    y = x.clone()
    y[:, 12] = (y[:, 12] + 1) % 61
    a, b = model(x), model(y)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-4)


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 1}])
def test_kv_cache_forward_equals_full_recompute(kw):
    model = make_model(**kw)
    x = torch.randint(0, 61, (3, 17))
    full = model(x)
    cache = KVCache(model.config, 3, 32)
    parts = [model(x[:, :7], cache=cache), model(x[:, 7:12], cache=cache)]
    parts += [model(x[:, i : i + 1], cache=cache) for i in range(12, 17)]
    assert torch.allclose(full, torch.cat(parts, 1), atol=1e-5)


def test_kv_cache_generation_equals_greedy_full_recompute():
    model = make_model()
    prompt = [1, 5, 9, 2]
    cached = generate(model, prompt, SamplingParams(max_new_tokens=12, temperature=0.0))[0]
    seq = list(prompt)
    for _ in range(12):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert cached == seq[len(prompt):]


def test_sampling_is_seeded_and_samples_share_one_prefill():
    model = make_model()
    p = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    a = generate(model, [1, 2, 3], p, num_samples=4)
    b = generate(model, [1, 2, 3], p, num_samples=4)
    assert a == b and len(a) == 4
    assert len({tuple(s) for s in a}) > 1  # different samples from one shared prompt cache


def test_stop_token_ends_a_sample():
    model = make_model()
    greedy = generate(model, [1, 2], SamplingParams(max_new_tokens=8, temperature=0.0))[0]
    stop = greedy[3]
    cut = generate(model, [1, 2], SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=(stop,)))[0]
    assert cut == greedy[: greedy.index(stop)]


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, 1.0, 2, 1.0)[0, 2:]).all()
    probs = logits.softmax(-1)[0]
    kept = filter_logits(logits, 1.0, 0, float(probs[0] + probs[1]) - 1e-4)
    assert torch.isfinite(kept[0, :2]).all() and torch.isinf(kept[0, 2:]).all()
    assert torch.isfinite(filter_logits(logits, 1.0, 0, 1e-6)[0, 0])  # the top token always survives


def test_prompt_longer_than_context_is_a_clear_error():
    model = make_model()
    with pytest.raises(ScalelabError, match="longer than the model's context"):
        generate(model, list(range(40)), SamplingParams(max_new_tokens=1))


def test_exact_parameter_count_and_flops():
    model = make_model(depth=3, aspect_ratio=32, head_dim=16, vocab_size=50, block_size=16)
    c = model.config
    d, h, v, L = c.n_embd, c.mlp_hidden, c.vocab_size, c.depth
    per_block = 4 * d * d + 2 * d * h + 2 * d + 2 * c.head_dim  # attn, mlp, two norms, qk norms
    expected = v * d * 2 + L * per_block + d
    assert model.num_params() == expected
    assert model.num_params(include_embeddings=False) == expected - 2 * v * d
    matmul = L * (4 * d * d + 2 * d * h) + v * d
    assert model.flops_per_token() == 6 * matmul + 12 * L * c.n_head * c.head_dim * c.block_size
    tied = make_model(depth=3, aspect_ratio=32, head_dim=16, vocab_size=50, block_size=16, tie_embeddings=True)
    assert tied.num_params() == expected - v * d


def test_depth_dial_derives_width_and_heads():
    c = GPTConfig(vocab_size=10, depth=6).resolved()
    assert (c.n_embd, c.n_head, c.head_dim) == (384, 6, 64)
    c = GPTConfig(vocab_size=10, depth=6, n_embd=128, n_head=4).resolved()
    assert (c.n_embd, c.n_head, c.head_dim) == (128, 4, 32)
    with pytest.raises(ScalelabError, match="n_kv_head"):
        GPTConfig(vocab_size=10, depth=4, n_kv_head=3).resolved()


def test_no_weight_decay_on_norms_and_embeddings():
    model = make_model()
    decay, no_decay = model.optimizer_groups(0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" not in names[id(p)] and "embed" not in names[id(p)] for p in decay["params"])
    assert any(names[id(p)] == "embed.weight" for p in no_decay["params"])


def test_overfits_a_single_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=31, block_size=16, depth=2, aspect_ratio=32, head_dim=16))
    x = torch.randint(0, 31, (4, 16))
    y = torch.randint(0, 31, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_logit_softcap_bounds_the_logits():
    plain, capped = make_model(), make_model(logit_softcap=2.0)
    capped.load_state_dict(plain.state_dict())
    x = torch.randint(0, 61, (2, 20))
    with torch.no_grad():
        plain.lm_head.weight.mul_(20.0)  # push the raw logits well past the cap
        capped.lm_head.weight.mul_(20.0)
        a, b = plain(x), capped(x)
    assert a.abs().max() > 4.0 and b.abs().max() <= 2.0
    assert torch.allclose(b, 2.0 * torch.tanh(a / 2.0), atol=1e-5)
    # the loss and the KV-cache path read the same capped logits
    y = torch.randint(0, 61, (2, 20))
    assert capped(x, y).item() == pytest.approx(torch.nn.functional.cross_entropy(b.view(-1, 61), y.view(-1)).item(), rel=1e-5)
    cache = KVCache(capped.config, 2, 32)
    with torch.no_grad():
        assert torch.allclose(torch.cat([capped(x[:, :9], cache=cache), capped(x[:, 9:], cache=cache)], 1), b, atol=1e-5)


def test_negative_logit_softcap_is_a_clear_error():
    with pytest.raises(ScalelabError, match="logit_softcap must be 0"):
        make_model(logit_softcap=-1.0)
