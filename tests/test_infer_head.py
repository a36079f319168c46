"""The engine's output layer: prepacked on CPU, equal to the layer's own output, repacked when the weight changes."""

import pytest
import torch
from torch import nn

from scalelab.infer.head import OutputHead, prepacking_applies


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
def test_prepacked_head_matches_the_layer_and_follows_weight_updates():
    torch.manual_seed(0)
    linear = nn.Linear(48, 300, bias=False)
    head = OutputHead(linear)
    assert head.prepacked
    for shape in [(1, 48), (5, 48), (3, 2, 48)]:
        h = torch.randn(*shape)
        with torch.inference_mode():
            out = head(h)
        assert out.shape == (*shape[:-1], 300)
        torch.testing.assert_close(out, linear(h).detach(), rtol=1e-4, atol=1e-4)
    h = torch.randn(4, 48)
    with torch.no_grad():
        before = head(h)
        linear.weight.mul_(-2.0)  # an in-place update, as an optimizer step makes between rollouts
        after = head(h)
    torch.testing.assert_close(after, -2.0 * before, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        linear.weight = nn.Parameter(torch.zeros(300, 48))  # a new tensor, as a loaded checkpoint may bring
        assert head(h).abs().max() == 0


def test_head_calls_the_layer_where_prepacking_does_not_apply():
    wrapped = nn.Sequential(nn.Linear(8, 4))  # stands for an adapter-wrapped layer: its output is not its weight's
    assert not prepacking_applies(wrapped)
    h = torch.randn(2, 8)
    torch.testing.assert_close(OutputHead(wrapped)(h), wrapped(h))
    bf16 = nn.Linear(8, 4).to(torch.bfloat16)
    assert not prepacking_applies(bf16)
    linear = nn.Linear(8, 4)
    out = OutputHead(linear)(h)  # grad enabled: the plain layer, so gradients flow
    out.sum().backward()
    assert linear.weight.grad is not None
