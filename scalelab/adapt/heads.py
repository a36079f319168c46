"""Task heads on a pretrained GPT backbone: sequence classification, token classification, span QA, generation.

Each head is a small nn.Module holding the project's GPT as ``backbone`` and reading its final-norm
hidden states (``GPT.hidden_states``); the generation head is the LM head itself. Every head has
the same three methods, so one training loop (finetune.py) serves them all:

- ``collate(rows) -> batch`` (a dict of tensors) from the rows that scalelab.adapt.data builds;
- ``loss(batch)`` a scalar to minimise;
- ``score(batch) -> dict`` summed counts for the task's metrics (see ``finish``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from scalelab.adapt.embed import pad_token_rows, pool_hidden
from scalelab.errors import ScalelabError


def _linear(n_in: int, n_out: int) -> nn.Linear:
    layer = nn.Linear(n_in, n_out)
    nn.init.normal_(layer.weight, std=0.02)
    nn.init.zeros_(layer.bias)
    return layer


def _pad_labels(rows: list[list[int]], width: int, fill: int = -1) -> torch.Tensor:
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


class TaskHead(nn.Module):
    uses_lm_head = False  # whether the backbone's lm_head is part of this head's computation

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    @property
    def device(self):
        return next(self.backbone.parameters()).device

    @property
    def pad_id(self) -> int:
        return 0  # padding is masked out of every loss and pool; its id does not matter

    def head_parameters(self) -> list[nn.Parameter]:
        """The parameters the head adds on top of the backbone."""
        return [p for n, p in self.named_parameters() if not n.startswith("backbone.")]


class SequenceClassifier(TaskHead):
    """Pooled hidden state (mean over real tokens, or the last real token) -> linear -> class logits."""

    def __init__(self, backbone, n_classes: int, pool: str = "mean"):
        super().__init__(backbone)
        if n_classes < 2:
            raise ScalelabError(f"a classifier needs at least 2 classes, got {n_classes}")
        self.pool = pool
        self.classifier = _linear(backbone.config.n_embd, n_classes)

    def forward(self, ids, mask):
        return self.classifier(pool_hidden(self.backbone.hidden_states(ids), mask, self.pool))

    def collate(self, rows):
        ids, mask = pad_token_rows([r[0] for r in rows], self.pad_id)
        return {"ids": ids, "mask": mask, "labels": torch.tensor([r[1] for r in rows], dtype=torch.long)}

    def loss(self, b):
        return F.cross_entropy(self(b["ids"], b["mask"]), b["labels"])

    @torch.no_grad()
    def score(self, b):
        pred = self(b["ids"], b["mask"]).argmax(-1)
        return {"correct": int((pred == b["labels"]).sum()), "n": len(pred)}

    @staticmethod
    def finish(s):
        return {"accuracy": s["correct"] / max(1, s["n"])}


class TokenClassifier(TaskHead):
    """A tag per token from its own hidden state. Labels of -1 (BOS, padding) are ignored."""

    def __init__(self, backbone, n_tags: int = 2):
        super().__init__(backbone)
        self.tagger = _linear(backbone.config.n_embd, n_tags)

    def forward(self, ids):
        return self.tagger(self.backbone.hidden_states(ids))

    def collate(self, rows):
        ids, _ = pad_token_rows([r[0] for r in rows], self.pad_id)
        return {"ids": ids, "labels": _pad_labels([r[1] for r in rows], ids.shape[1])}

    def loss(self, b):
        logits = self(b["ids"])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["labels"].reshape(-1), ignore_index=-1)

    @torch.no_grad()
    def score(self, b):
        pred, y = self(b["ids"]).argmax(-1), b["labels"]
        real = y >= 0
        return {"correct": int(((pred == y) & real).sum()), "n": int(real.sum()),
                "tp": int(((pred == 1) & (y == 1)).sum()), "fp": int(((pred == 1) & (y == 0)).sum()),
                "fn": int(((pred != 1) & (y == 1)).sum())}

    @staticmethod
    def finish(s):
        p = s["tp"] / max(1, s["tp"] + s["fp"])
        r = s["tp"] / max(1, s["tp"] + s["fn"])
        return {"token_accuracy": s["correct"] / max(1, s["n"]), "name_f1": 2 * p * r / (p + r) if p + r else 0.0}


class SpanQA(TaskHead):
    """Extractive QA: a start and an end vector score every context token; the answer is the best
    (start, end) pair with start <= end < start + max_answer_tokens, inside the context."""

    def __init__(self, backbone, max_answer_tokens: int = 16):
        super().__init__(backbone)
        self.max_answer_tokens = max_answer_tokens
        self.span = _linear(backbone.config.n_embd, 2)

    def forward(self, ids, context_mask):
        """(start logits, end logits), each (B, T), -inf outside the context."""
        logits = self.span(self.backbone.hidden_states(ids)).float()
        logits = logits.masked_fill(~context_mask.unsqueeze(-1), float("-inf"))
        return logits[..., 0], logits[..., 1]

    def collate(self, rows):
        ids, mask = pad_token_rows([r["ids"] for r in rows], self.pad_id)
        context = mask.clone()
        for i, r in enumerate(rows):
            context[i, : r["context_start"]] = False
        return {"ids": ids, "context": context, "start": torch.tensor([r["start"] for r in rows]),
                "end": torch.tensor([r["end"] for r in rows])}

    def loss(self, b):
        s, e = self(b["ids"], b["context"])
        return (F.cross_entropy(s, b["start"]) + F.cross_entropy(e, b["end"])) / 2

    @torch.no_grad()
    def predict(self, ids, context_mask) -> tuple[torch.Tensor, torch.Tensor]:
        s, e = self(ids, context_mask)
        T = ids.shape[1]
        pos = torch.arange(T, device=ids.device)
        allowed = (pos[None, :] >= pos[:, None]) & (pos[None, :] < pos[:, None] + self.max_answer_tokens)
        pair = (s.unsqueeze(2) + e.unsqueeze(1)).masked_fill(~allowed, float("-inf"))  # (B, start, end)
        best = pair.reshape(len(ids), -1).argmax(-1)
        return best // T, best % T

    @torch.no_grad()
    def score(self, b):
        start, end = self.predict(b["ids"], b["context"])
        exact = (start == b["start"]) & (end == b["end"])
        # token-overlap F1 between the predicted and the true span
        overlap = (torch.minimum(end, b["end"]) - torch.maximum(start, b["start"]) + 1).clamp(min=0).float()
        p = overlap / (end - start + 1).float()
        r = overlap / (b["end"] - b["start"] + 1).float()
        f1 = torch.where(overlap > 0, 2 * p * r / (p + r), torch.zeros_like(p))
        return {"exact": int(exact.sum()), "f1": float(f1.sum()), "n": len(start)}

    @staticmethod
    def finish(s):
        return {"exact_match": s["exact"] / max(1, s["n"]), "span_f1": s["f1"] / max(1, s["n"])}


class GenerationHead(TaskHead):
    """The LM head itself, tuned on prompt -> answer text (loss on the answer tokens only).

    Scored by teacher-forced exact match: every answer token (and the newline that ends it) is the
    model's argmax given the true prefix, which is exactly when greedy decoding writes the answer.
    """

    uses_lm_head = True

    def head_parameters(self):
        return []

    def collate(self, rows):
        """rows: (prompt ids, answer ids)."""
        seqs = [p + a for p, a in rows]
        ids, _ = pad_token_rows(seqs, self.pad_id)
        targets = torch.full_like(ids, -1)
        for i, (p, a) in enumerate(rows):
            targets[i, len(p) - 1 : len(p) + len(a) - 1] = torch.tensor(a, dtype=torch.long)
        return {"ids": ids, "targets": targets}

    def loss(self, b):
        return self.backbone(b["ids"], targets=b["targets"])

    @torch.no_grad()
    def score(self, b):
        pred = self.backbone(b["ids"]).argmax(-1)
        scored = b["targets"] >= 0
        token_ok = (pred == b["targets"]) | ~scored
        return {"exact": int(token_ok.all(-1).sum()), "tokens_ok": int((token_ok & scored).sum()),
                "tokens": int(scored.sum()), "n": len(pred)}

    @staticmethod
    def finish(s):
        return {"exact_match": s["exact"] / max(1, s["n"]), "answer_token_accuracy": s["tokens_ok"] / max(1, s["tokens"])}


HEADS = {"sequence": SequenceClassifier, "token": TokenClassifier, "span": SpanQA, "generation": GenerationHead}
