"""Tokenizers: byte-level BPE, characters and raw bytes, with reserved chat and tool tokens."""

from scalelab.tokenizer.tokenizers import (
    SPECIAL_TOKENS,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    CheckpointTokenizer,
    Tokenizer,
    build_tokenizer,
    bytes_per_token,
    load_tokenizer,
    train_bpe,
)

__all__ = [
    "SPECIAL_TOKENS", "BPETokenizer", "ByteTokenizer", "CharTokenizer", "CheckpointTokenizer", "Tokenizer", "build_tokenizer",
    "bytes_per_token", "load_tokenizer", "train_bpe",
]
