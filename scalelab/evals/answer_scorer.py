"""A small learned judge: does a candidate answer agree with a reference, abstain, or disagree?

Used as the RL reward of the abstention experiment's condition (d), in place of the exact-match
rule. Its training pairs are generated from the world's attribute vocabularies, so no human
labels are involved; it never sees the RL policy's replies while training.

Inputs are bags of hashed character trigrams (lower-cased, so case is not evidence), which keeps
the judge independent of the policy's tokenizer and cheap enough to train in seconds.
"""

from __future__ import annotations

import random
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from scalelab.config import OptimConfig
from scalelab.data.world import CITIES, EMPLOYERS, MAJORS, MONTHS, UNIVERSITIES
from scalelab.train.optim import build_optimizer, optimizer_step

LABELS = ("agree", "abstain", "disagree")
N_BUCKETS = 4096
# Phrasings the judge learns as abstention; the policy is only ever taught the first one.
ABSTAIN_PHRASES = ("I don't know", "I do not know", "I'm not sure", "I am not sure", "Unknown", "No idea")


def trigrams(text: str) -> list[int]:
    t = f"^{text.strip().lower()}$"
    grams = [t[i : i + 3] for i in range(max(1, len(t) - 2))]
    return [zlib.crc32(g.encode()) % N_BUCKETS for g in grams]


class AnswerScorer(nn.Module):
    def __init__(self, dim: int = 64, hidden: int = 128):
        super().__init__()
        self.emb = nn.EmbeddingBag(N_BUCKETS, dim, mode="mean")
        # The candidate alone decides "abstain"; the pair's difference decides agree vs disagree.
        self.mlp = nn.Sequential(nn.Linear(4 * dim, hidden), nn.ReLU(), nn.Linear(hidden, len(LABELS)))

    def _bag(self, texts: list[str]) -> torch.Tensor:
        grams = [trigrams(t) for t in texts]
        flat = torch.tensor([g for gs in grams for g in gs], dtype=torch.long)
        offsets = torch.tensor([0] + [len(g) for g in grams[:-1]], dtype=torch.long).cumsum(0)
        return self.emb(flat, offsets)

    def forward(self, references: list[str], candidates: list[str]) -> torch.Tensor:
        r, c = self._bag(references), self._bag(candidates)
        return self.mlp(torch.cat([r, c, (r - c).abs(), r * c], dim=-1))

    @torch.no_grad()
    def judge(self, references: list[str], candidates: list[str]) -> list[str]:
        if not references:
            return []
        was = self.training
        self.eval()
        out = [LABELS[i] for i in self(references, candidates).argmax(-1).tolist()]
        self.train(was)
        return out


def _random_date(rng: random.Random) -> str:
    return f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1950, 2005)}"


def _near_miss(ref: str, pool: list[str], rng: random.Random) -> str:
    """A wrong answer that shares most of its characters with the reference."""
    words = ref.split()
    if len(words) > 1 and rng.random() < 0.5:
        other = rng.choice(pool).split()
        i = rng.randrange(len(words))
        words[i] = rng.choice(other)
        out = " ".join(words)
        if out.lower() != ref.lower():
            return out
    cut = rng.randint(1, max(1, len(ref) - 1))
    return ref[:cut].rstrip()


def generate_pairs(n: int, seed: int) -> list[tuple[str, str, int]]:
    """(reference, candidate, label index) triples, the three labels in equal shares."""
    rng = random.Random(f"scorer-pairs-{seed}")
    pools = [list(CITIES), list(UNIVERSITIES), list(MAJORS), list(EMPLOYERS), None]
    out = []
    for k in range(n):
        pool = rng.choice(pools)
        draw = (lambda: _random_date(rng)) if pool is None else (lambda p=pool: rng.choice(p))
        ref = draw()
        label = k % 3
        if label == 0:
            cand = rng.choice((ref, ref.lower(), ref + ".", ref.upper(), " " + ref))
        elif label == 1:
            phrase = rng.choice(ABSTAIN_PHRASES)
            cand = rng.choice((phrase, phrase + ".", phrase.lower()))
        else:
            kind = rng.random()
            if kind < 0.4:
                cand = draw()
            elif kind < 0.8:
                cand = _near_miss(ref, pool or [_random_date(rng) for _ in range(5)], rng)
            elif kind < 0.9:
                cand = rng.choice(rng.choice([p for p in pools if p is not None]))
            else:
                cand = ""
            if cand.strip().lower().rstrip(".") == ref.lower():
                cand = ref + " and " + draw()
        out.append((ref, cand, label))
    return out


def train_scorer(steps: int = 400, batch_size: int = 128, lr: float = 3e-3, seed: int = 0, n_pairs: int = 6000,
                 n_heldout: int = 600) -> tuple[AnswerScorer, dict]:
    """Train on generated pairs; returns the judge and its held-out accuracy (overall and per label)."""
    torch.manual_seed(seed)
    model = AnswerScorer()
    data = generate_pairs(n_pairs, seed)
    # a constant rate, no decay, and torch's default betas: the judge's recipe since it was first measured
    optim = OptimConfig(lr=lr, warmup_steps=0, schedule="constant", weight_decay=0.0, beta1=0.9, beta2=0.999,
                        grad_clip=0.0)
    opt = build_optimizer(model, optim)
    g = torch.Generator().manual_seed(seed)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        idx = torch.randint(len(data), (min(batch_size, len(data)),), generator=g).tolist()
        refs, cands, labels = zip(*(data[i] for i in idx))
        loss = F.cross_entropy(model(list(refs), list(cands)), torch.tensor(labels))
        optimizer_step(loss, opt, model.parameters(), optim)
    held = generate_pairs(n_heldout, seed + 7919)
    pred = model.judge([h[0] for h in held], [h[1] for h in held])
    stats = {"scorer_final_loss": float(loss.detach()), "scorer_heldout_accuracy": sum(LABELS[h[2]] == p for h, p in zip(held, pred)) / len(held)}
    for j, name in enumerate(LABELS):
        sel = [(h, p) for h, p in zip(held, pred) if h[2] == j]
        stats[f"scorer_heldout_accuracy/{name}"] = sum(LABELS[h[2]] == p for h, p in sel) / max(1, len(sel))
    return model.eval(), stats
