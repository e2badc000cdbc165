"""Zero-shot likelihood: ``dlm eval RUN --data OTHER_PREPARED_DIR`` (issue 15).

The run's own data directory given as ``--data`` must reproduce the in-domain figure exactly (same rows, same
seed, same estimator) while landing in another result file; another corpus gives another figure and file; every
bad ``--data`` is refused with one line before any work.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dlm.cli import main
from dlm.data.shards import prepare
from dlm.data.sources import get_source
from dlm.eval.results import find_results
from dlm.eval.run import SCORED_RULE, evaluate_run
from tests.conftest import TINY_SEQ_LEN
from tests.helpers import assert_refused, write_corpus


def _corpus(root: Path, tokenizer: str = "bytes", seq_len: int = TINY_SEQ_LEN, seed: int = 7) -> Path:
    """A second small prepared corpus, from text files written here (another seed: other paragraphs)."""
    text = write_corpus(root / "corpus", n_docs=20, seed=seed)
    return prepare(get_source(str(text)), tokenizer, seq_len=seq_len, out_dir=root / "data", log=lambda s: None)


@pytest.fixture(scope="module")
def other_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _corpus(tmp_path_factory.mktemp("zeroshot_other"))


@pytest.mark.parametrize("family", ["ar", "mdlm"])
def test_own_data_as_zero_shot_equals_in_domain(family, tiny_data, tiny_ar_run, tiny_mdlm_run, tmp_path, capsys):
    run = Path(shutil.copytree(tiny_ar_run if family == "ar" else tiny_mdlm_run, tmp_path / "run"))
    inside, inside_path = evaluate_run(run, split="validation", seed=3)
    assert main(["eval", str(run), "--split", "validation", "--seed", "3", "--data", str(tiny_data)]) == 0
    assert "zero-shot" in capsys.readouterr().out
    [(zs_path, zs)] = find_results(run, "zeroshot")
    assert zs["nll"] == inside["nll"] and zs["tokens"] == inside["tokens"] and zs["sequences"] == inside["sequences"]
    assert zs["nll_se"] == inside["nll_se"] and zs["exact"] == inside["exact"] == (family == "ar")
    assert zs_path != inside_path and zs_path.name.startswith("zeroshot-validation-")
    assert zs["zero_shot"] is True and inside["zero_shot"] is False
    assert zs["data"]["zero_shot"] and zs["data"]["dir"] == str(tiny_data.resolve()) == zs["data"]["trained_on"]
    assert zs["settings"]["data"]["zero_shot"] is True and "zero_shot" not in inside["settings"]["data"]
    assert zs["scored"] == inside["scored"] == SCORED_RULE and zs["metric"] == inside["metric"] == "likelihood"
    assert [p for p, _ in find_results(run, "likelihood")] == [inside_path]  # in-domain readers never see it
    logs: list[str] = []
    again, again_path = evaluate_run(run, split="validation", seed=3, data=tiny_data, log=logs.append)
    assert again_path == zs_path and again == zs and logs and logs[0].startswith("reused")


def test_other_corpus_gives_another_figure_and_file(tiny_data, tiny_ar_run, other_data, tmp_path):
    run = Path(shutil.copytree(tiny_ar_run, tmp_path / "run"))
    own, own_path = evaluate_run(run, split="test", data=tiny_data)
    other, other_path = evaluate_run(run, split="test", data=other_data)
    assert other_path != own_path and other["nll"] != own["nll"]
    assert other["data"]["dir"] == str(other_data.resolve()) != other["data"]["trained_on"]
    assert other["data_dir"] == str(other_data.resolve())
    assert other["settings"]["data"]["source"] != own["settings"]["data"]["source"]
    assert other["settings"]["data"]["tokenizer"] == own["settings"]["data"]["tokenizer"]
    assert other["data"]["source_fingerprint"] == other["settings"]["data"]["source"]
    assert len(find_results(run, "zeroshot")) == 2


def test_not_a_prepared_corpus_is_refused(tiny_ar_run, tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hello\n")
    argv = ["eval", str(tiny_ar_run), "--data", str(tmp_path / "plain")]
    assert_refused(capsys, argv, "not a prepared data directory", tiny_ar_run)
    argv = ["eval", str(tiny_ar_run), "--data", str(tmp_path / "missing")]
    assert_refused(capsys, argv, "not a prepared data directory", tiny_ar_run)


def test_missing_split_is_refused(tiny_ar_run, other_data, capsys):
    argv = ["eval", str(tiny_ar_run), "--data", str(other_data), "--split", "dev"]
    assert_refused(capsys, argv, "has no split 'dev'", tiny_ar_run)


def test_other_tokenizer_is_refused(tiny_ar_run, tmp_path, capsys):
    chars = _corpus(tmp_path, tokenizer="chars")
    line = assert_refused(capsys, ["eval", str(tiny_ar_run), "--data", str(chars)], "tokenizer chars", tiny_ar_run)
    assert str(chars.resolve()) in line and "bytes the run was trained on" in line


def test_rows_longer_than_the_context_are_refused(tiny_ar_run, tmp_path, capsys):
    long_rows = _corpus(tmp_path, seq_len=2 * TINY_SEQ_LEN)
    argv = ["eval", str(tiny_ar_run), "--data", str(long_rows)]
    assert_refused(capsys, argv, f"longer than the model context of {TINY_SEQ_LEN}", tiny_ar_run)


def test_data_with_generation_is_refused(tiny_ar_run, other_data, capsys):
    argv = ["eval", str(tiny_ar_run), "--generation", "--data", str(other_data)]
    assert_refused(capsys, argv, "--data belong to likelihood evaluation", tiny_ar_run)
