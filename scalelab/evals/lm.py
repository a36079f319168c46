"""One small interface over every model the harness can score: a scalelab run or a Hugging Face export.

A :class:`ScorableLM` tokenises, detokenises, gives the log-likelihood of a continuation after a
prompt, and decodes greedily until a stop string. Tasks and metrics only ever talk to this, so a run
folder and its ``scalelab export`` folder are scored by the same code and must give the same numbers.

Conventions shared with scalelab/evals/emergence.py: the model sees ``BOS + encode(prompt)``; the
continuation is tokenised on its own (``encode(continuation)``), which is exactly the token sequence
greedy decoding would have to emit after the prompt's tokens. A prompt too long for the context is
cut from the left; the continuation is kept whole.
"""

from __future__ import annotations

from pathlib import Path

import torch

from scalelab.data.world import World
from scalelab.errors import ScalelabError
from scalelab.infer.sample import SamplingParams
from scalelab.infer.sample import generate as sample_generate
from scalelab.run import WORLD_FILE, Run
from scalelab.tokenizer import load_tokenizer


class ScorableLM:
    """Subclasses set ``name``, ``bos_id``, ``context_length`` and implement encode/decode/_logits."""

    name: str = "model"
    bos_id: int
    context_length: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _logits(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, V) next-token logits."""
        raise NotImplementedError

    def prompt_ids(self, prompt: str) -> list[int]:
        return [self.bos_id] + self.encode(prompt)

    @torch.no_grad()
    def continuation_logprobs(self, pairs: list[tuple[str, str]], batch_size: int = 16) -> list[list[float]]:
        """Per (prompt, continuation): log p of each continuation token given everything before it.

        Sequences are right-padded, which a causal model never attends to, so a batch gives the same
        numbers as one pass per pair. An empty continuation gives [].
        """
        ctx = self.context_length
        # A continuation longer than half the context is scored in windows, each seeing at least
        # half a context of what precedes it (the usual strided evaluation of long text).
        stride = max(1, ctx // 2)
        items: list[tuple[int, list[int], list[int]]] = []  # (pair index, context, scored tokens)
        for n, (prompt, cont) in enumerate(pairs):
            p, t = self.prompt_ids(prompt), self.encode(cont)
            if len(t) + 1 <= ctx:
                if t:
                    items.append((n, p[-(ctx - len(t)):], t))
                continue
            for s in range(0, len(t), stride):
                piece = t[s : s + stride]
                items.append((n, (p + t[:s])[-(ctx - len(piece)):], piece))
        out: list[list[float]] = [[] for _ in pairs]
        for s in range(0, len(items), batch_size):
            chunk = items[s : s + batch_size]
            seqs = [c + t for _, c, t in chunk]
            width = max(len(q) for q in seqs)
            idx = torch.full((len(seqs), width), self.bos_id, dtype=torch.long)
            for r, q in enumerate(seqs):
                idx[r, : len(q)] = torch.tensor(q)
            logp = self._logits(idx).float().log_softmax(-1)
            for r, (n, c, t) in enumerate(chunk):
                # the logits at position k predict token k + 1
                pos = torch.arange(len(c) - 1, len(c) - 1 + len(t))
                out[n] += logp[r, pos, torch.tensor(t)].tolist()
        return out

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int = 16, stop: tuple[str, ...] = ("\n",)) -> str:
        """Greedy continuation of ``BOS + prompt``, cut before the first stop string (or BOS)."""
        ids = self.prompt_ids(prompt)
        ids = ids[-(self.context_length - 1):]
        new: list[int] = []
        # A plain loop without a KV cache: the same for every backend, and the models here are tiny.
        for _ in range(max(0, min(max_new_tokens, self.context_length - len(ids)))):
            nxt = int(self._logits(torch.tensor([ids + new]))[0, -1].argmax())
            if nxt == self.bos_id:
                break
            new.append(nxt)
            text = self.decode(new)
            if any(s and s in text for s in stop):
                break
        return _cut(self.decode(new), stop)


def _cut(text: str, stop) -> str:
    cut = len(text)
    for s in stop:
        i = text.find(s) if s else -1
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


class ScalelabLM(ScorableLM):
    """A model trained by scalelab, with its own tokenizer."""
    def __init__(self, model, tokenizer, name: str = "scalelab"):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.bos_id = tokenizer.bos_id
        self.context_length = model.config.block_size
        self.device = next(model.parameters()).device

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def _logits(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx.to(self.device)).cpu()

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int = 16, stop: tuple[str, ...] = ("\n",)) -> str:
        # The KV-cache sampler decodes the same greedy tokens much faster than the plain loop.

        ids = self.prompt_ids(prompt)[-(self.context_length - 1):]
        budget = min(max_new_tokens, self.context_length - len(ids))
        if budget <= 0:
            return ""
        params = SamplingParams(max_new_tokens=budget, temperature=0.0, stop_token_ids=(self.bos_id,),
                                stop_strings=tuple(stop))
        out = sample_generate(self.model, ids, params, decode=self.decode)[0]
        return _cut(self.decode(out), stop)


class HFLM(ScorableLM):
    """A folder in Hugging Face format (what ``scalelab export`` writes), loaded with transformers."""

    def __init__(self, folder: str | Path, name: str = "hf"):
        try:
            # deferred: transformers is an optional extra (pip install scalelab[transformers])
            import transformers
        except ImportError:
            raise ScalelabError("scoring a Hugging Face folder needs transformers (pip install transformers)") from None
        folder = Path(folder)
        self.name = name
        key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        self.model = transformers.AutoModelForCausalLM.from_pretrained(folder, **{key: torch.float32}).eval()
        self.context_length = int(self.model.config.max_position_embeddings)
        if (folder / "tokenizer.json").is_file():
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
            self._hf_tokenizer = True
            self.bos_id = self.tokenizer.bos_token_id
        elif (folder / "tokenizer" / "tokenizer_meta.json").is_file():
            # an export made with --no-tokenizer (byte/char tokenizers), with the run's tokenizer copied beside it
            self.tokenizer = load_tokenizer(folder / "tokenizer")
            self._hf_tokenizer = False
            self.bos_id = self.tokenizer.bos_id
        else:
            raise ScalelabError(f"no tokenizer in {folder}: need tokenizer.json or a scalelab tokenizer/ folder")
        if self.bos_id is None:
            raise ScalelabError(f"the tokenizer in {folder} has no BOS token")

    def encode(self, text: str) -> list[int]:
        if self._hf_tokenizer:
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def _logits(self, idx: torch.Tensor) -> torch.Tensor:
        # Explicit mask: HF would otherwise guess padding from the pad id, which may equal a real token.
        return self.model(idx, attention_mask=torch.ones_like(idx)).logits


def is_hf_folder(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and (p / "model.safetensors").is_file()


def load_lm(path: str | Path, device: str = "cpu") -> ScorableLM:
    """A run folder (or checkpoint folder) of scalelab, or a Hugging Face folder, as a ScorableLM."""
    p = Path(path)
    if not p.exists():
        raise ScalelabError(f"run folder not found: {p}")
    if is_hf_folder(p):
        return HFLM(p, name=p.name)

    run = Run.open(p)
    return ScalelabLM(run.load_model(device), run.tokenizer, name=p.name)


def find_world(path: str | Path):
    """The synthetic world a run was trained on, or None (``scalelab export`` copies world.json along)."""
    p = Path(path)
    if is_hf_folder(p):
        return World.load(p / WORLD_FILE) if (p / WORLD_FILE).is_file() else None
    return Run.open(p).world
