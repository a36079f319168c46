"""Sentence embeddings from a pretrained GPT: pooled hidden states, zero-shot cosine labels, a linear probe.

Texts are encoded as BOS + tokens and right-padded. The model is causal, so a real token never
attends to the padding after it: pooling over the real positions only gives every text the same
embedding alone or in any batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scalelab.errors import ScalelabError

POOLS = ("mean", "last")


def encode_texts(tokenizer, texts: list[str], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T), mask (B, T)): BOS + tokens of each text, cut to ``block_size``, right-padded with BOS."""
    if not texts:
        raise ScalelabError("no texts to embed")
    rows = [([tokenizer.bos_id] + tokenizer.encode(t))[:block_size] for t in texts]
    return pad_token_rows(rows, tokenizer.bos_id)


def pad_token_rows(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return ids, mask


def check_layer(model, layer: int) -> int:
    """``layer`` as a block index (negative counts from the end, -1 = the last block)."""
    depth = len(model.blocks)
    if not -depth <= layer < depth:
        raise ScalelabError(f"--layer {layer} is out of range for a model with {depth} blocks (use {-depth}..{depth - 1})")
    return layer % depth


def layer_hidden_states(model, ids: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """Hidden states (B, T, n_embd) after block ``layer``, through the final norm.

    The last block is exactly ``GPT.hidden_states``. An earlier block is read with a forward hook,
    which keeps the model file free of adapter code (the later blocks still run; the models are small).
    """
    k = check_layer(model, layer)
    if k == len(model.blocks) - 1:
        return model.hidden_states(ids)
    seen = {}
    handle = model.blocks[k].register_forward_hook(lambda _m, _inp, out: seen.__setitem__("h", out))
    try:
        model.hidden_states(ids)
    finally:
        handle.remove()
    # The final norm puts every layer on the scale the LM head reads (the "logit lens" convention).
    return model.final_norm(seen["h"])


def pool_hidden(h: torch.Tensor, mask: torch.Tensor, pool: str = "mean") -> torch.Tensor:
    """(B, D): the mean over real tokens, or the last real token's state."""
    if pool == "mean":
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)
    if pool == "last":
        last = mask.long().sum(1) - 1
        return h[torch.arange(h.shape[0], device=h.device), last]
    raise ScalelabError(f"unknown pooling {pool!r} (choose from {', '.join(POOLS)})")


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str], pool: str = "mean", normalize: bool = True, layer: int = -1,
                batch_size: int = 64) -> torch.Tensor:
    """(N, n_embd) float32 embeddings of ``texts`` on the CPU, unit length when ``normalize``."""
    if pool not in POOLS:
        raise ScalelabError(f"unknown pooling {pool!r} (choose from {', '.join(POOLS)})")
    if not texts:
        raise ScalelabError("no texts to embed")
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for i in range(0, len(texts), batch_size):
            ids, mask = encode_texts(tokenizer, texts[i : i + batch_size], model.config.block_size)
            h = layer_hidden_states(model, ids.to(device), layer)
            out.append(pool_hidden(h.float(), mask.to(device), pool).cpu())
    finally:
        model.train(was)
    emb = torch.cat(out)
    return F.normalize(emb, dim=-1) if normalize else emb


# -- classification on frozen features --------------------------------------------------------------------------


def cosine_classify(text_emb: torch.Tensor, label_emb: torch.Tensor) -> torch.Tensor:
    """Zero-shot labels: for each text, the index of the label description it is most cosine-similar to."""
    return (F.normalize(text_emb, dim=-1) @ F.normalize(label_emb, dim=-1).T).argmax(-1)


class LinearProbe:
    """Multinomial logistic regression on frozen features, in torch (full-batch L-BFGS with an L2 penalty).

    Written here rather than taken from scikit-learn, which the project does not depend on; the
    features are standardised with the training set's statistics first so one penalty fits every layer.
    """

    def __init__(self, l2: float = 1e-3, max_iter: int = 200):
        self.l2, self.max_iter = l2, max_iter

    def fit(self, x: torch.Tensor, y: torch.Tensor, n_classes: int | None = None) -> "LinearProbe":
        if len(x) == 0 or len(x) != len(y):
            raise ScalelabError(f"linear probe needs as many labels as feature rows, got {len(x)} rows and {len(y)} labels")
        x, y = x.double(), y.long()
        k = int(n_classes if n_classes is not None else y.max().item() + 1)
        self.mean, self.std = x.mean(0), x.std(0, unbiased=False).clamp(min=1e-6)
        z = (x - self.mean) / self.std
        self.weight = torch.zeros(z.shape[1], k, dtype=torch.float64, requires_grad=True)
        self.bias = torch.zeros(k, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([self.weight, self.bias], max_iter=self.max_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(z @ self.weight + self.bias, y) + self.l2 * self.weight.square().sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return self

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return (((x.double() - self.mean) / self.std) @ self.weight + self.bias).argmax(-1)


def accuracy(pred: torch.Tensor, y) -> float:
    y = torch.as_tensor(y)
    return float((pred.cpu() == y.cpu()).float().mean()) if len(y) else float("nan")
