"""Tokenizers: byte-level BPE (HF ``tokenizers``), characters, raw bytes, and an imported checkpoint's own.

The first three share one interface and reserve the same special tokens for chat and
tools (the fourth, :class:`CheckpointTokenizer`, maps what it can onto them). Special tokens are never produced from user text: ``encode`` treats a
string like "<|bos|>" inside text as ordinary characters, so data cannot forge
a turn boundary; special ids come only from ``token_id``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from tokenizers.pre_tokenizers import ByteLevel

from scalelab.errors import ScalelabError

SPECIAL_TOKENS = (
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|tool_call_start|>",
    "<|tool_call_end|>",
    "<|tool_output_start|>",
    "<|tool_output_end|>",
)
META_FILE = "tokenizer_meta.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


class Tokenizer:
    """Shared interface. ``encode`` never adds special ids except BOS on request; ``decode`` writes
    special ids back as their strings unless ``skip_special``; ``save`` writes a folder that
    ``load_tokenizer`` reads back."""

    kind = "base"
    vocab_size: int
    special_ids: dict[str, int]

    @property
    def bos_id(self) -> int:
        return self.special_ids["<|bos|>"]

    def token_id(self, special: str) -> int:
        if special not in self.special_ids:
            raise ScalelabError(f"unknown special token {special!r} (known: {', '.join(self.special_ids)})")
        return self.special_ids[special]

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids, skip_special: bool = False) -> str:
        raise NotImplementedError

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each token stands for (0 for special tokens)."""
        raise NotImplementedError

    def save(self, directory: str | Path) -> None:
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """The 256 byte values, then the special tokens: no training, no unknowns."""
    kind = "byte"

    def __init__(self):
        self.special_ids = {s: 256 + i for i, s in enumerate(SPECIAL_TOKENS)}
        self.vocab_size = 256 + len(SPECIAL_TOKENS)
        self._special_by_id = {v: k for k, v in self.special_ids.items()}

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id] + ids if add_bos else ids

    def decode(self, ids, skip_special: bool = False) -> str:
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special:
                out.append(self._special_by_id[i])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_byte_lengths(self) -> np.ndarray:
        return np.array([1] * 256 + [0] * len(SPECIAL_TOKENS), dtype=np.int64)

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / META_FILE).write_text(json.dumps({"kind": self.kind}), encoding="utf-8")


class CharTokenizer(Tokenizer):
    """One id per character of a fixed alphabet; characters outside it are an error, not a silent <unk>."""

    kind = "char"

    def __init__(self, chars: list[str]):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.special_ids = {s: len(self.chars) + i for i, s in enumerate(SPECIAL_TOKENS)}
        self.vocab_size = len(self.chars) + len(SPECIAL_TOKENS)
        self._special_by_id = {v: k for k, v in self.special_ids.items()}

    @classmethod
    def from_text(cls, text: str | Iterable[str]) -> "CharTokenizer":
        chars: set[str] = set()
        for t in [text] if isinstance(text, str) else text:
            chars.update(t)
        if not chars:
            raise ScalelabError("empty corpus: cannot build a character vocabulary from no text")
        return cls(sorted(chars))

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        try:
            ids = [self.stoi[c] for c in text]
        except KeyError as e:
            raise ScalelabError(f"character {e.args[0]!r} is not in this character tokenizer's alphabet") from None
        return [self.bos_id] + ids if add_bos else ids

    def decode(self, ids, skip_special: bool = False) -> str:
        n = len(self.chars)
        return "".join(
            self.chars[i] if i < n else ("" if skip_special else self._special_by_id[i]) for i in map(int, ids)
        )

    def token_byte_lengths(self) -> np.ndarray:
        return np.array([len(c.encode("utf-8")) for c in self.chars] + [0] * len(SPECIAL_TOKENS), dtype=np.int64)

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / META_FILE).write_text(json.dumps({"kind": self.kind, "chars": self.chars}, ensure_ascii=False), encoding="utf-8")


class BPETokenizer(Tokenizer):
    """Byte-level BPE from HF ``tokenizers``; saved as tokenizer.json, which HF transformers reads."""

    kind = "bpe"

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.vocab_size = hf_tokenizer.get_vocab_size()
        self.special_ids = {s: hf_tokenizer.token_to_id(s) for s in SPECIAL_TOKENS}
        if any(v is None for v in self.special_ids.values()):
            raise ScalelabError("tokenizer.json lacks scalelab's special tokens; it was not trained by scalelab")
        self._special_set = set(self.special_ids.values())
        # Without this HF would turn "<|bos|>" inside user text into the special id. The flag is a
        # runtime setting, not written to tokenizer.json, so an exported tokenizer still matches
        # special tokens the way HF chat templates expect.
        self.hf.encode_special_tokens = True

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_bos else ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets: same ids, less work
        encode = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            return self.hf.decode([i for i in ids if i not in self._special_set], skip_special_tokens=False)
        # decode runs of ordinary tokens together, so multi-byte characters split across tokens survive
        out, run = [], []
        for i in ids:
            if i in self._special_set:
                out.append(self.hf.decode(run, skip_special_tokens=False) if run else "")
                out.append(self.hf.id_to_token(i))
                run = []
            else:
                run.append(i)
        if run:
            out.append(self.hf.decode(run, skip_special_tokens=False))
        return "".join(out)

    def token_byte_lengths(self) -> np.ndarray:
        # The byte-level alphabet maps each byte to one printable character; count characters back to bytes.
        alphabet = set(ByteLevel.alphabet())
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token, idx in self.hf.get_vocab().items():
            if idx not in self._special_set:
                lengths[idx] = sum(1 for ch in token if ch in alphabet)
        return lengths

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(d / "tokenizer.json"))
        (d / META_FILE).write_text(json.dumps({"kind": self.kind}), encoding="utf-8")


class CheckpointTokenizer(Tokenizer):
    """A published checkpoint's own ``tokenizer.json`` (HF ``tokenizers``), used as shipped, never retrained.

    It has none of scalelab's chat tokens; its chat format is its Jinja ``chat_template``
    (:mod:`scalelab.tokenizer.chat_template`). Two scalelab names are mapped so that code written
    for scalelab's tokenizers runs unchanged: ``<|bos|>`` is the checkpoint's BOS token (its EOS when
    it has none, as GPT-2 and Qwen separate documents with it) and ``<|assistant_end|>`` its EOS,
    which chat models write to end their turn. ``stop_ids`` are every id that ends generation
    (``generation_config.json``'s eos_token_id list included).

    ``encode`` reads special-token strings inside text as plain text, like the other tokenizers;
    ``encode_chat`` parses them, since a rendered chat template writes them as text.
    """

    kind = "hf"

    def __init__(self, hf_tokenizer, meta: dict, chat_template: str | None = None):
        self.hf = hf_tokenizer
        self.hf.encode_special_tokens = True
        self._chat = HFTokenizer.from_str(hf_tokenizer.to_str())  # same vocabulary, special strings parsed
        self._chat.encode_special_tokens = False
        self.vocab_size = int(meta.get("vocab_size") or hf_tokenizer.get_vocab_size())
        self.special_tokens = {k: v for k, v in (meta.get("special_tokens") or {}).items() if isinstance(v, str)}
        self.chat_template = chat_template
        eos = self._id_of(self.special_tokens.get("eos_token"))
        bos = self._id_of(self.special_tokens.get("bos_token"))
        self.stop_ids = tuple(dict.fromkeys([i for i in [eos, *meta.get("stop_ids", [])] if i is not None]))
        if not self.stop_ids:
            raise ScalelabError("the checkpoint's tokenizer has no eos token: set eos_token in tokenizer_config.json")
        self.special_ids = {"<|bos|>": bos if bos is not None else self.stop_ids[0],
                            "<|assistant_end|>": eos if eos is not None else self.stop_ids[0]}
        self._special_set = {i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}

    def _id_of(self, token: str | None) -> int | None:
        if token is None:
            return None
        i = self.hf.token_to_id(token)
        if i is None:
            raise ScalelabError(f"special token {token!r} named in tokenizer_config.json is not in tokenizer.json")
        return i

    def token_id(self, special: str) -> int:
        if special not in self.special_ids:
            raise ScalelabError(
                f"this imported model's tokenizer has no scalelab token {special!r}: its chat format is its own chat "
                "template, and features built on scalelab's chat and tool tokens do not apply to it"
            )
        return self.special_ids[special]

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_bos else ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def encode_chat(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of rendered chat-template text (special strings become their ids) and each token's char span."""
        enc = self._chat.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_byte_lengths(self) -> np.ndarray:
        n = self.hf.get_vocab_size()
        pieces = self.hf.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        lengths[:n] = [len(p.encode("utf-8")) for p in pieces]
        lengths[[i for i in self._special_set if i < self.vocab_size]] = 0
        return lengths

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(d / "tokenizer.json"))
        meta = {"kind": self.kind, "vocab_size": self.vocab_size, "special_tokens": self.special_tokens,
                "stop_ids": list(self.stop_ids)}
        (d / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
        if self.chat_template is not None:
            (d / CHAT_TEMPLATE_FILE).write_text(self.chat_template, encoding="utf-8")


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """Train byte-level BPE: special tokens take ids 0..8, then the 256 bytes, then merges.

    The vocabulary has at most ``vocab_size`` entries (fewer only if the corpus runs out of pairs
    to merge). HF training is deterministic, so no seed is needed: same texts, same tokenizer.
    """
    n_base = 256 + len(SPECIAL_TOKENS)
    if vocab_size < n_base:
        raise ScalelabError(f"invalid config: tokenizer.vocab_size must be at least {n_base} for byte-level BPE")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any input round-trips
        show_progress=False,
    )
    seen = {"bytes": 0}

    def counted():
        # streamed into the trainer, which keeps word counts, not text: memory follows the vocabulary
        for t in texts:
            seen["bytes"] += len(t)
            yield t

    tok.train_from_iterator(counted(), trainer=trainer)
    if not seen["bytes"]:
        raise ScalelabError("empty corpus: no text to train the tokenizer on")
    return BPETokenizer(tok)


def build_tokenizer(kind: str, texts: Iterable[str], vocab_size: int = 2048) -> Tokenizer:
    if kind == "bpe":
        return train_bpe(texts, vocab_size)
    if kind == "char":
        return CharTokenizer.from_text(texts)
    if kind == "byte":
        return ByteTokenizer()
    raise ScalelabError(f"unknown tokenizer kind '{kind}' (use bpe, char or byte)")


def read_tokenizer_json(directory: Path, what: str = "tokenizer"):
    """The HF ``tokenizers`` object in ``directory/tokenizer.json``, or a one-line error."""
    hf_path = directory / "tokenizer.json"
    if not hf_path.is_file():
        raise ScalelabError(f"no {what} in {directory} (missing tokenizer.json)")
    try:
        return HFTokenizer.from_file(str(hf_path))
    except Exception as e:  # the Rust side raises a bare Exception for unparsable files
        raise ScalelabError(f"{hf_path} is not a readable tokenizers file ({e})") from None


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer that ``Tokenizer.save`` wrote to ``directory``."""
    d = Path(directory)
    meta_path = d / META_FILE
    if not meta_path.is_file():
        raise ScalelabError(f"no tokenizer in {d} (missing {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ScalelabError(f"{meta_path} is not valid JSON ({e})") from None
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        if not isinstance(meta.get("chars"), list):
            raise ScalelabError(f"{meta_path}: a char tokenizer needs a 'chars' list")
        return CharTokenizer(meta["chars"])
    if kind in ("bpe", "hf"):
        hf = read_tokenizer_json(d, "BPE tokenizer" if kind == "bpe" else "checkpoint tokenizer")
        if kind == "hf":
            template = d / CHAT_TEMPLATE_FILE
            return CheckpointTokenizer(hf, meta, template.read_text(encoding="utf-8") if template.is_file() else None)
        return BPETokenizer(hf)
    raise ScalelabError(f"{meta_path}: unknown tokenizer kind {kind!r}")


def bytes_per_token(tokenizer: Tokenizer, texts: Iterable[str]) -> float:
    """Compression on held-out text: UTF-8 bytes per token (higher is better)."""
    texts = list(texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
    if n_tokens == 0:
        raise ScalelabError("cannot measure compression on empty text")
    return n_bytes / n_tokens
