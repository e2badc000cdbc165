"""`dlm prepare` from the command line: summary output, and one clear line + exit 2 on bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dlm.cli import main
from tests.helpers import write_corpus


def test_prepare_prints_counts(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c")
    assert main(["prepare", str(corpus), "--tokenizer", "bytes", "--seq-len", "32", "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    for word in ("train", "validation", "test", "tokens", "data directory"):
        assert word in out
    assert (tmp_path / "d" / "meta.json").exists()


def _bad(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n\n")
    notext = tmp_path / "notext"
    notext.mkdir()
    (notext / "a.csv").write_text("x,y\n")
    corpus = write_corpus(tmp_path / "c")
    return [
        (["prepare", str(tmp_path / "missing.txt")], "not found"),
        (["prepare", str(empty)], "empty"),
        (["prepare", str(notext)], "notext"),
        (["prepare", str(corpus), "--tokenizer", "wordpiece9"], "unknown tokenizer"),
        (["prepare", "hf:no-such-dataset-xyz"], "no-such-dataset-xyz"),
        (["prepare", str(corpus), "--tokenizer", "bytes", "--seq-len", "1"], "sequence length"),
        (["prepare", str(corpus), "--tokenizer", "bytes", "--mode", "chunks"], "mode"),
    ]


@pytest.mark.parametrize("case", range(7))
def test_bad_input_one_line_exit_2(tmp_path, capsys, case):
    argv, needle = _bad(tmp_path)[case]
    argv = [*argv, "--data-root", str(tmp_path / "data")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dlm: error:") and "\n" not in err and needle in err
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


@pytest.mark.slow
def test_console_script_exit_status(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "dlm.cli", "prepare", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not found" in r.stderr


@pytest.mark.slow
def test_prepare_formal_language_from_a_fresh_process(tmp_path):
    """`formal:` registers itself on first use: the CLI needs no import of dlm.data.formal beforehand."""
    out = tmp_path / "formal"
    r = subprocess.run(
        [sys.executable, "-m", "dlm", "prepare", "formal:2gram-cpu", "--tokenizer", "chars", "--mode", "pad",
         "--seq-len", "66", "--out", str(out), "--source-opt", "n_train=300", "--source-opt", "n_valid=20",
         "--source-opt", "n_test=20"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    meta = (out / "meta.json").read_text()
    assert '"2gram-cpu"' in meta and '"chars"' in meta


def test_tokenizer_from_reuses_a_trained_tokenizer(tmp_path, capsys):
    """--tokenizer-from DIR: a second corpus gets DIR's trained bpe ids (same fingerprint); without it, its own."""
    from dlm.data.shards import read_meta

    a, b = write_corpus(tmp_path / "a"), tmp_path / "b"
    b.mkdir()
    (b / "train.txt").write_text("Thou art more lovely and more temperate.\n\n" * 40)
    (b / "validation.txt").write_text("Rough winds do shake the darling buds of May.\n")
    (b / "test.txt").write_text("And summer's lease hath all too short a date.\n")
    common = ["--tokenizer", "bpe:300", "--seq-len", "32"]
    assert main(["prepare", str(a), *common, "--out", str(tmp_path / "da")]) == 0
    reuse = ["--tokenizer-from", str(tmp_path / "da")]
    assert main(["prepare", str(b), *common, "--out", str(tmp_path / "db"), *reuse]) == 0
    assert main(["prepare", str(b), *common, "--out", str(tmp_path / "own")]) == 0
    capsys.readouterr()
    fp = {d: read_meta(tmp_path / d)["tokenizer"]["fingerprint"] for d in ("da", "db", "own")}
    assert fp["db"] == fp["da"] != fp["own"]
