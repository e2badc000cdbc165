"""`dlm eval | sample | infill` never lose or mix results, refuse bad input in one line before any work, and
report progress on long work (issue 10, items 6, 11, 12 and 15)."""

from __future__ import annotations

import json
import shutil
import tempfile
import tracemalloc

import pytest
import torch

import dlm.eval.progress
from dlm.cli import main
from dlm.data.loader import Loader
from dlm.data.shards import open_split
from dlm.data.tokenizers import CharTokenizer, build_tokenizer
from dlm.errors import DlmError
from dlm.eval.likelihood import evaluate_nll
from dlm.eval.results import find_results
from dlm.eval.run import encode_text, infill_ids
from dlm.rundir import load_run
from tests.helpers import assert_refused, write_corpus

TINY = [
    "--model.n_layer", "1", "--model.d_model", "32", "--model.n_head", "2", "--model.context", "32",
    "--train.batch_size", "4", "--train.max_steps", "2", "--train.warmup_steps", "1",
    "--train.val_every", "2", "--train.val_batches", "1", "--train.ckpt_every", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def mdlm(tmp_path_factory):
    """A tiny MDLM on character-level data (the chars tokenizer has an UNK id for unknown characters)."""
    root = tmp_path_factory.mktemp("safety")
    corpus = write_corpus(root / "corpus", n_docs=40)
    data = root / "data"
    assert main(["prepare", str(corpus), "--tokenizer", "chars", "--seq-len", "32", "--out", str(data)]) == 0
    run = root / "run"
    assert main(["train", "--data.dir", str(data), "--run-dir", str(run), "--process.name", "mdlm", *TINY]) == 0
    return run


@pytest.fixture
def run_copy(mdlm, tmp_path):
    """A private copy of the run (tests below change or break its directories)."""
    run = tmp_path / "run"
    shutil.copytree(mdlm, run, ignore=shutil.ignore_patterns("eval", "samples"))
    return run


# ----------------------------------------------------------------------------- item 6: one file per setting


def test_results_with_other_settings_coexist_and_a_rerun_reuses(run_copy, capsys):
    run = run_copy
    assert main(["eval", str(run), "--split", "validation", "--max-batches", "1"]) == 0
    assert main(["eval", str(run), "--split", "validation"]) == 0
    capsys.readouterr()
    results = find_results(run, "likelihood", split="validation")
    assert len(results) == 2  # the whole-split result did not replace the one-batch result
    (one,) = [r for _, r in results if r["settings"]["max_batches"] == 1]
    (whole_path, whole) = next((p, r) for p, r in results if r["settings"]["max_batches"] is None)
    assert one["sequences"] == 4 and whole["sequences"] > 4 and whole["whole_split"] is True
    assert whole_path.name.startswith("likelihood-validation-step2-")
    for key in ("split", "checkpoint_step", "ema", "seed", "batch_size", "process", "data", "device"):
        assert key in whole["settings"], key
    trained = json.loads((run / "run.json").read_text())["data_meta"]["tokenizer"]["fingerprint"]
    assert whole["settings"]["data"]["tokenizer"] == trained

    # the same settings again (--max-batches beyond the split is the whole split): reused, file untouched
    before = whole_path.stat().st_mtime_ns, whole_path.read_bytes()
    assert main(["eval", str(run), "--split", "validation", "--max-batches", "1000"]) == 0
    out = capsys.readouterr().out
    assert "reused" in out and "--force" in out and str(whole_path) in out
    assert (whole_path.stat().st_mtime_ns, whole_path.read_bytes()) == before
    assert len(find_results(run, "likelihood")) == 2

    # --force recomputes into the same file; the same seed gives the same figures
    assert main(["eval", str(run), "--split", "validation", "--force"]) == 0
    assert "reused" not in capsys.readouterr().out
    again = json.loads(whole_path.read_text())
    assert whole_path.stat().st_mtime_ns != before[0] and again["nll"] == whole["nll"]

    # another batch size or seed changes the diffusion noise draws: a third and a fourth file
    assert main(["eval", str(run), "--split", "validation", "--batch-size", "3"]) == 0
    assert main(["eval", str(run), "--split", "validation", "--seed", "5"]) == 0
    capsys.readouterr()
    assert len(find_results(run, "likelihood", split="validation")) == 4
    assert len(find_results(run, "likelihood", split="validation", batch_size=3)) == 1


# ----------------------------------------------------------------------------- item 15: progress


def test_evaluate_nll_reports_every_batch(mdlm):
    run = load_run(mdlm)
    split = open_split(run.cfg.data.dir, "validation")
    n = len(Loader(split, 4, shuffle=False, infinite=False))
    assert n >= 3
    for max_batches, total in ((None, n), (2, 2)):
        calls = []
        loader = Loader(split, 4, shuffle=False, infinite=False)
        evaluate_nll(
            run.process,
            run.model,
            loader,
            max_batches=max_batches,
            generator=torch.Generator().manual_seed(0),
            progress=lambda done, tot, calls=calls: calls.append((done, tot)),
        )
        assert calls == [(i, total) for i in range(1, total + 1)]


def test_cli_prints_progress_lines_when_asked(run_copy, capsys, monkeypatch):
    assert main(["eval", str(run_copy), "--split", "validation", "--batch-size", "2"]) == 0
    assert capsys.readouterr().err == ""  # short work in a log (tests): quiet
    monkeypatch.setattr(dlm.eval.progress, "LOG_EVERY_S", 0.0)
    assert main(["eval", str(run_copy), "--split", "validation", "--batch-size", "4", "--force"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("eval: 1/") and "batches/s" in err[0] and "ETA" in err[0]
    n = int(err[0].split("/")[1].split()[0])
    assert len(err) == n and err[-1].startswith(f"eval: {n}/{n} batches")
    assert main(["sample", str(run_copy), "--n", "3", "--batch-size", "2", "--length", "8", "--steps", "2"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [e.split(",")[0] for e in err] == ["sampling: 2/3 sequences", "sampling: 3/3 sequences"]


# ----------------------------------------------------------------------------- item 11: one line, before the work


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", [["eval"], ["sample"], ["infill", "the [MASK] sat"]])
def test_cuda_without_cuda_is_one_line(run_copy, capsys, command):
    argv = [command[0], str(run_copy), *command[1:], "--device", "cuda"]
    assert_refused(capsys, argv, "no CUDA device", run_copy)


@pytest.mark.parametrize(
    "command, out", [(["eval"], "eval"), (["sample"], "samples"), (["infill", "a [MASK]"], "samples")]
)
def test_output_directory_that_is_a_file_is_refused_before_the_work(run_copy, capsys, command, out):
    (run_copy / out).write_text("not a directory\n")
    assert_refused(capsys, [command[0], str(run_copy), *command[1:]], "not a directory", run_copy)


def test_unwritable_run_directory_is_refused_before_the_work(run_copy, capsys, monkeypatch):
    """A read-only run directory. chmod does not stop root, so as root the file system's refusal to create a
    file is simulated where every writer creates its files (tempfile.mkstemp)."""
    import os

    if os.geteuid() == 0:

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    else:
        run_copy.chmod(0o555)
    try:
        for argv in (["eval", str(run_copy)], ["sample", str(run_copy)], ["infill", str(run_copy), "a [MASK]"]):
            assert_refused(capsys, argv, "Permission denied", run_copy)
    finally:
        run_copy.chmod(0o755)


@pytest.mark.parametrize("n", ["-1", "0"])
def test_infill_count_must_be_positive(run_copy, capsys, n):
    assert_refused(capsys, ["infill", str(run_copy), "a [MASK]", "--n", n], "--n", run_copy)


def test_huge_mask_span_is_refused_before_anything_is_built(run_copy, capsys):
    tok = CharTokenizer(list(" abc"))
    with pytest.raises(DlmError, match="longer than the model context of 32"):
        infill_ids("a [MASK:1000000000] b", tok, [5], 1, max_len=32)
    with pytest.raises(DlmError, match="longer than the model context"):
        infill_ids("a [MASK] b", tok, [5], 10**9, max_len=32)
    tracemalloc.start()
    try:
        assert_refused(capsys, ["infill", str(run_copy), "a [MASK:100000000] b"], "longer than the model", run_copy)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50e6  # a list of 1e8 positions would take 800 MB


# ----------------------------------------------------------------------------- item 12: no silent coercions


@pytest.mark.parametrize(
    "tail, needle",
    [
        (["--length", "0"], "length must be a positive integer"),
        (["--length", "-3"], "length must be a positive integer"),
        (["--length", "1"], "leaves no token to generate"),  # the document boundary only
        (["--length", "4", "--prompt", "the"], "leaves no token to generate"),
        (["--batch-size", "0"], "batch size"),
    ],
)
def test_sample_lengths_are_not_coerced(run_copy, capsys, tail, needle):
    assert_refused(capsys, ["sample", str(run_copy), *tail], needle, run_copy)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["eval", "{run}", "--generation", "--batch-size", "0"], "batch size"),
        (["eval", "{run}", "--generation", "--n", "0"], "number of samples"),
        (["eval", "{run}", "--batch-size", "0"], "batch size"),
        (["eval", "{run}", "--max-batches", "0"], "max batches"),
    ],
)
def test_eval_sizes_are_not_coerced(run_copy, capsys, argv, needle):
    assert_refused(capsys, [a.format(run=run_copy) for a in argv], needle, run_copy)


def test_prompt_characters_outside_the_vocabulary_are_named(run_copy, capsys):
    line = assert_refused(
        capsys, ["sample", str(run_copy), "--prompt", "the ☃ cat§"], "outside the vocabulary", run_copy
    )
    assert "'☃'" in line and "'§'" in line and "'t'" not in line
    assert_refused(capsys, ["infill", str(run_copy), "the ☃ [MASK]"], "'☃'", run_copy)


def test_encode_text_finds_unk_of_wordpiece():
    try:
        bert = build_tokenizer("bert-base-uncased")
    except DlmError:
        pytest.skip("bert-base-uncased is not installed")
    with pytest.raises(DlmError, match="'☃'"):
        encode_text(bert, "hello ☃ world", "prompt")
    assert encode_text(bert, "hello [UNK] world", "prompt") == bert.encode("hello [UNK] world")  # literal text
    assert encode_text(build_tokenizer("bytes"), "☃", "prompt") == list("☃".encode())  # bytes represent all


def test_sample_and_infill_refuse_a_foreign_tokenizer_of_the_same_size(run_copy, tmp_path, capsys):
    cfg = json.loads((run_copy / "config.json").read_text())
    data = tmp_path / "foreign-data"
    shutil.copytree(cfg["data"]["dir"], data)
    chars = json.loads((data / "chars.json").read_text())
    alphabet = chars["alphabet"]
    chars["alphabet"] = "".join(sorted(alphabet.replace(alphabet[1], "§")))  # the same size, other ids
    (data / "chars.json").write_text(json.dumps(chars))
    cfg["data"]["dir"] = str(data)
    (run_copy / "config.json").write_text(json.dumps(cfg))
    assert_refused(capsys, ["sample", str(run_copy), "--n", "1"], "fingerprints differ", run_copy, data)
    assert_refused(capsys, ["infill", str(run_copy), "the [MASK]"], "fingerprints differ", run_copy, data)
