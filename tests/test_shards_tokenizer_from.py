"""A second corpus prepared with the first one's trained tokenizer (``prepare(..., tokenizer_from=DIR)``), and the
offline second corpus of the quickstart: the First Folio edition of the Shakespeare source."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from dlm.data.shards import FORMAT_VERSION, inputs_hash, open_split, prepare, read_meta
from dlm.data.sources import get_source
from dlm.errors import DlmError
from tests.helpers import write_corpus


def _quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """(corpus A prepared with bpe:300 and chars, corpus B's source) on different texts."""
    root = tmp_path_factory.mktemp("tf")
    a = get_source(str(write_corpus(root / "a", n_docs=40, seed=0)))
    b = get_source(str(write_corpus(root / "b", n_docs=30, seed=7)))
    bpe = prepare(a, "bpe:300", seq_len=32, out_dir=root / "a-bpe", log=_quiet)
    chars = prepare(a, "chars", seq_len=32, out_dir=root / "a-chars", log=_quiet)
    return root, a, b, bpe, chars


@pytest.mark.parametrize("tok", ["bpe:300", "chars"])
def test_second_corpus_gets_the_first_corpus_ids(two, tok):
    root, _a, b, bpe, chars = two
    first = bpe if tok == "bpe:300" else chars
    out = prepare(b, tok, seq_len=32, mode="pad", out_dir=root / f"b-{tok[:3]}", tokenizer_from=first, log=_quiet)
    meta, meta_a = read_meta(out), read_meta(first)
    assert meta["tokenizer"]["fingerprint"] == meta_a["tokenizer"]["fingerprint"]
    assert meta["tokenizer"]["from"] == str(first.resolve())
    # the rows hold B's documents in A's ids: decoding row i with A's tokenizer gives B's i-th document
    split, tok_a = open_split(out, "test"), open_split(first, "test").tokenizer()
    docs = [d for d in b.documents("test") if d.strip()]
    for i in range(3):
        ids = split.ids[i, : split.lengths[i]].astype(np.int64).tolist()  # [BOS] doc [EOS], cut at 32
        assert ids[0] == tok_a.specials.bos
        text = tok_a.decode(ids[1:])
        assert docs[i].startswith(text) and len(text) > 10
    # trained on B instead, the tokenizer is another one
    own = prepare(b, tok, seq_len=32, mode="pad", out_dir=root / f"b-own-{tok[:3]}", log=_quiet)
    assert read_meta(own)["tokenizer"]["fingerprint"] != meta_a["tokenizer"]["fingerprint"]
    assert "from" not in read_meta(own)["tokenizer"]
    assert read_meta(own)["inputs_hash"] != meta["inputs_hash"]


def test_inputs_hash_without_tokenizer_from_is_unchanged(two):
    _root, a, *_ = two
    key = {"format": FORMAT_VERSION, "source": a.fingerprint(), "tokenizer": "bpe:300", "seq_len": 32,
           "mode": "wrap", "dtype": None}  # fmt: skip
    old = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    assert inputs_hash(a, "bpe:300", 32, "wrap", None) == old
    assert inputs_hash(a, "bpe:300", 32, "wrap", None, "f" * 64) != old


def test_reuse_and_refusals(two, tmp_path):
    root, _a, b, bpe, chars = two
    out = prepare(b, "bpe:300", seq_len=32, out_dir=tmp_path / "b", tokenizer_from=bpe, log=_quiet)
    lines = []
    assert prepare(b, "bpe:300", seq_len=32, out_dir=out, tokenizer_from=bpe, log=lines.append) == out
    assert any("reusing" in line for line in lines)
    with pytest.raises(DlmError, match="different inputs"):  # its own trained tokenizer: other inputs
        prepare(b, "bpe:300", seq_len=32, out_dir=out, log=_quiet)
    with pytest.raises(DlmError, match="prepared with chars"):
        prepare(b, "bpe:300", seq_len=32, out_dir=tmp_path / "x", tokenizer_from=chars, log=_quiet)
    with pytest.raises(DlmError, match="no meta.json"):
        prepare(b, "bpe:300", seq_len=32, out_dir=tmp_path / "y", tokenizer_from=root, log=_quiet)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_tampered_tokenizer_files_refused(two, tmp_path):
    import shutil

    _root, _a, b, bpe, _chars = two
    copy = tmp_path / "copy"
    shutil.copytree(bpe, copy)
    meta = read_meta(copy)
    meta["tokenizer"]["fingerprint"] = "0" * 64
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DlmError, match="do not match its meta.json"):
        prepare(b, "bpe:300", seq_len=32, out_dir=tmp_path / "z", tokenizer_from=copy, log=_quiet)


def test_folio_edition():
    folio, modern = get_source("shakespeare", edition="folio"), get_source("shakespeare")
    assert folio.name == "shakespeare-folio"
    assert get_source("shakespeare", edition="gutenberg").fingerprint() == modern.fingerprint()
    assert folio.fingerprint() != modern.fingerprint()
    assert folio.works("test") == modern.works("test") == ("macbeth", "tempest")
    assert folio.works("validation") == ("julius_caesar", "twelfth_night")
    assert len(folio.works("train")) == 31  # no poems, no Pericles, no Troilus and Cressida
    assert set(folio.works("train")) <= set(modern.works("train"))
    docs = list(folio.documents("test"))
    # Macbeth: title + 28 scenes in the Folio (Actus I 7, II 4, III 6, IV 3, V 8; scenes counted by heading)
    macbeth = folio.work_documents("macbeth")
    assert macbeth[0] == "The Tragedie of Macbeth" and macbeth[1].startswith("Actus Primus. Scoena Prima.")
    assert all(d.splitlines()[0].startswith(("Actus", "Scena", "Scoena", "Scaena")) for d in macbeth[1:])
    assert "Vpon the Heath" in macbeth[1] and len(docs) > 2 * 10
    assert folio.describe()["edition"] == "folio" and "edition" not in modern.describe()
    with pytest.raises(DlmError, match="unknown edition"):
        get_source("shakespeare", edition="quarto")


def test_only_the_splits_asked_for(two, tmp_path):
    _root, _a, b, bpe, _chars = two
    out = prepare(b, "bpe:300", seq_len=32, out_dir=tmp_path / "t", tokenizer_from=bpe, splits=["test"], log=_quiet)
    meta = read_meta(out)
    assert list(meta["splits"]) == ["test"] and sorted(p.name for p in out.glob("*.bin")) == [
        "test.bin",
        "test.len.bin",
    ]
    assert meta["inputs_hash"] == inputs_hash(
        b, "bpe:300", 32, "wrap", None, meta["tokenizer"]["fingerprint"], ["test"]
    )
    assert meta["inputs_hash"] != read_meta(prepare(b, "bpe:300", seq_len=32, out_dir=tmp_path / "all",
                                                    tokenizer_from=bpe, log=_quiet))["inputs_hash"]  # fmt: skip
    with pytest.raises(DlmError, match="has no split dev"):
        prepare(b, "bytes", seq_len=32, out_dir=tmp_path / "x", splits=["test", "dev"], log=_quiet)
    with pytest.raises(DlmError, match="trained on the train split"):
        prepare(b, "bpe:300", seq_len=32, out_dir=tmp_path / "y", splits=["test"], log=_quiet)
    own = prepare(b, "bytes", seq_len=32, out_dir=tmp_path / "z", splits=["validation", "test"], log=_quiet)
    assert list(read_meta(own)["splits"]) == ["validation", "test"]
