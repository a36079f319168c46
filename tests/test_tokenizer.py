import pytest

from scalelab.errors import ScalelabError
from scalelab.tokenizer import (
    SPECIAL_TOKENS, BPETokenizer, ByteTokenizer, CharTokenizer, build_tokenizer, bytes_per_token, load_tokenizer,
    train_bpe,
)

CORPUS = ["The quick brown fox jumps over the lazy dog. " * 3, "Pack my box with five dozen liquor jugs.",
          "Sphinx of black quartz, judge my vow!"] * 20
NASTY = ["héllo wörld", "🌍🚀 emoji 👩‍👩‍👧", "世界 こんにちは", "e\u0301 combining", "\x00\x01\x7f control", "tab\tnew\nline\r\n",
         "", " leading and trailing  ", "\ufeffBOM", "<|bos|> fake <|assistant_start|> specials", "<|", "ß" * 50,
         "".join(SPECIAL_TOKENS), "<|<|bos|>|>", "\U0010ffff\u200b\u2028"]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(CORPUS, 300)


def all_kinds(bpe):
    # the char tokenizer is built on the test text itself: it only promises its own alphabet
    return [bpe, ByteTokenizer(), CharTokenizer.from_text(NASTY)]


@pytest.mark.parametrize("which", [0, 1, 2], ids=["bpe", "byte", "char"])
def test_round_trip_on_arbitrary_unicode(which, bpe):
    tok = all_kinds(bpe)[which]
    specials = set(tok.special_ids.values())
    for text in NASTY:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert not set(ids) & specials  # user text never yields special ids, even "<|bos|>" itself
    assert tok.encode_batch(NASTY) == [tok.encode(t) for t in NASTY]


def test_char_unknown_character_is_an_error():
    tok = CharTokenizer.from_text("abc 世界\n")
    assert tok.decode(tok.encode("世界 cab\n")) == "世界 cab\n"
    with pytest.raises(ScalelabError, match="'z' is not in this character tokenizer"):
        tok.encode("z")


def test_special_tokens_reserved_in_every_kind(bpe):
    for tok in all_kinds(bpe):
        assert set(tok.special_ids) == set(SPECIAL_TOKENS)
        assert len(set(tok.special_ids.values())) == len(SPECIAL_TOKENS)
        assert all(0 <= i < tok.vocab_size for i in tok.special_ids.values())
        assert tok.token_id("<|assistant_end|>") == tok.special_ids["<|assistant_end|>"]
        ids = tok.encode("ab", add_bos=True)
        assert ids[0] == tok.bos_id == tok.token_id("<|bos|>")
        assert tok.decode(ids) == "<|bos|>ab" and tok.decode(ids, skip_special=True) == "ab"
        # a real special id and the same string typed as text decode alike but encode differently
        forged = tok.encode("<|user_start|>")
        assert forged != [tok.token_id("<|user_start|>")]
        assert tok.decode([tok.token_id("<|user_start|>")]) == tok.decode(forged)
        with pytest.raises(ScalelabError, match="unknown special token"):
            tok.token_id("<|eos|>")


def test_special_ids_between_multibyte_pieces_decode_cleanly(bpe):
    for tok in (bpe, ByteTokenizer()):
        ids = tok.encode("世界") + [tok.bos_id] + tok.encode("🌍")
        assert tok.decode(ids) == "世界<|bos|>🌍"
        assert tok.decode(ids, skip_special=True) == "世界🌍"


@pytest.mark.parametrize("kind", ["bpe", "char", "byte"])
def test_save_load_gives_identical_encodings(kind, tmp_path):
    texts = CORPUS[:3] + ["<|bos|> typed by a user"]
    tok = build_tokenizer(kind, CORPUS + texts, 300)
    assert tok.kind == kind
    tok.save(tmp_path / kind)
    again = load_tokenizer(tmp_path / kind)
    assert type(again) is type(tok)
    assert again.vocab_size == tok.vocab_size and again.special_ids == tok.special_ids
    assert again.encode_batch(texts) == tok.encode_batch(texts)


def test_bpe_file_is_a_plain_hf_tokenizer(bpe, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    bpe.save(tmp_path)
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    # the export keeps HF's usual special-token matching, which chat templates rely on
    assert hf.encode("<|bos|>hi", add_special_tokens=False).ids[0] == bpe.bos_id
    assert hf.decode(bpe.encode("héllo 🌍")) == "héllo 🌍"


def test_bpe_training_is_deterministic(bpe):
    again = train_bpe(iter(CORPUS), 300)  # any iterable, not only lists
    assert again.hf.to_str() == bpe.hf.to_str()


def test_bpe_compresses_and_respects_vocab(bpe):
    assert isinstance(bpe, BPETokenizer) and bpe.vocab_size == 300
    assert max(max(ids) for ids in bpe.encode_batch(CORPUS)) < 300
    assert bytes_per_token(bpe, ["The lazy dog jumps over the quick brown fox."]) > 1.5
    assert bytes_per_token(ByteTokenizer(), ["abc", "é"]) == 1.0
    lengths = bpe.token_byte_lengths()
    text = CORPUS[0] + "世界"
    assert sum(lengths[i] for i in bpe.encode(text)) == len(text.encode("utf-8"))
    assert all(lengths[i] == 0 for i in bpe.special_ids.values())
    assert train_bpe(["ab"], 1000).vocab_size <= 1000  # a tiny corpus cannot fill the vocabulary


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ScalelabError, match="unknown tokenizer kind 'wordpiece'"):
        build_tokenizer("wordpiece", CORPUS)
    with pytest.raises(ScalelabError, match="at least"):
        train_bpe(CORPUS, 100)
    with pytest.raises(ScalelabError, match="empty corpus"):
        train_bpe(["", ""], 300)
    with pytest.raises(ScalelabError, match="empty corpus"):
        CharTokenizer.from_text("")
    with pytest.raises(ScalelabError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_meta.json").write_text('{"kind": "bpe"}')
    with pytest.raises(ScalelabError, match="missing tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_meta.json").write_text("{not json")
    with pytest.raises(ScalelabError, match="not valid JSON"):
        load_tokenizer(tmp_path)
    with pytest.raises(ScalelabError, match="empty text"):
        bytes_per_token(ByteTokenizer(), [""])
