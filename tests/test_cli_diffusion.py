"""`dlm eval | sample | infill` on a diffusion run (tiny MDLM): bounds are labelled, fixed positions are kept."""

from __future__ import annotations

import json

import pytest

from dlm.cli import main
from dlm.data.tokenizers import build_tokenizer
from dlm.eval.results import find_results
from dlm.eval.run import infill_ids
from tests.helpers import write_corpus

TINY = [
    "--model.n_layer", "1", "--model.d_model", "32", "--model.n_head", "2", "--model.context", "32",
    "--train.batch_size", "4", "--train.max_steps", "3", "--train.warmup_steps", "1",
    "--train.val_every", "3", "--train.val_batches", "1", "--train.ckpt_every", "3",
]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("diff")
    corpus = write_corpus(root / "corpus")
    data = root / "data"
    assert main(["prepare", str(corpus), "--tokenizer", "bytes", "--seq-len", "32", "--out", str(data)]) == 0
    out = {}
    for family in ("mdlm", "ar"):
        out[family] = root / family
        assert (
            main(["train", "--data.dir", str(data), "--run-dir", str(out[family]), "--process.name", family, *TINY])
            == 0
        )
    return out


def test_eval_labels_the_bound(runs, capsys):
    assert main(["eval", str(runs["mdlm"]), "--split", "validation"]) == 0
    assert "NLL ≤" in capsys.readouterr().out
    ((_, rec),) = find_results(runs["mdlm"], "likelihood", split="validation", checkpoint_step=3)
    assert rec["exact"] is False and rec["bound"] == "<=" and rec["process"]["name"] == "mdlm"
    assert rec["process"]["eval_t_samples"] == 1 and rec["process"]["schedule"] == "loglinear"


def test_infill_keeps_every_fixed_position(runs, capsys):
    pattern = "The [MASK:3] sat on [MASK]."
    assert main(["infill", str(runs["mdlm"]), pattern, "--n", "3", "--steps", "4", "--seed", "1"]) == 0
    capsys.readouterr()
    (path,) = (runs["mdlm"] / "samples").glob("infill-*.jsonl")
    fixed = infill_ids(pattern, build_tokenizer("bytes"), [257], 1)  # wrap data: a document starts after EOS
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        assert len(rec["ids"]) == len(fixed)
        assert all(got == want for got, want in zip(rec["ids"], fixed) if want >= 0)
        assert rec["filled_positions"] == [i for i, t in enumerate(fixed) if t < 0]
        assert all(0 <= rec["ids"][i] < 259 for i in rec["filled_positions"])


def test_ddpm_cache_sampler_from_the_cli(runs, capsys):
    assert (
        main(["sample", str(runs["mdlm"]), "--n", "2", "--length", "16", "--sampler", "ddpm_cache", "--steps", "64"])
        == 0
    )
    assert "ddpm_cache" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["infill", "{ar}", "a [MASK] b"], "diffusion family"),
        (["infill", "{mdlm}", "no span here"], "no [MASK]"),
        (["infill", "{mdlm}", "[MASK:40]"], "longer than the model context"),
        (["sample", "{mdlm}", "--steps", "0"], "steps"),
        (["sample", "{mdlm}", "--sampler", "euler"], "euler"),
        (["sample", "{mdlm}", "--sampler", "ddpm", "--remask-eta", "0.1"], "remask_eta"),
        (["sample", "{mdlm}", "--sampler", "remdm", "--remask-strategy", "sometimes"], "sometimes"),
    ],
)
def test_diffusion_bad_input(runs, capsys, argv, needle):
    argv = [a.format(ar=runs["ar"], mdlm=runs["mdlm"]) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dlm: error:") and "\n" not in err and needle in err


def test_sample_saves_the_trajectory(runs, capsys):
    argv = ["sample", str(runs["mdlm"]), "--n", "2", "--length", "16", "--steps", "5", "--trajectory", "--seed", "7"]
    assert main(argv) == 0
    capsys.readouterr()
    path = max((runs["mdlm"] / "samples").glob("samples-*.jsonl"), key=lambda p: p.stat().st_mtime_ns)
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        steps = rec["reveal_step"]
        assert len(steps) == len(rec["ids"]) == 16
        assert steps[0] == -1  # the document boundary the sample starts from is fixed
        assert all(0 <= s < 5 for s in steps[1:])  # every other position revealed at one of the 5 steps
    assert main(["sample", str(runs["ar"]), "--n", "1", "--length", "8", "--trajectory"]) == 2
    assert "return_trajectory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra",
    [
        ["--sampler", "remdm", "--remask-strategy", "rescale", "--remask-eta", "0.5"],
        ["--sampler", "confidence", "--unmask-score", "margin"],
        ["--sampler", "entropy_bounded", "--entropy-bound", "0.5"],
        ["--sampler", "threshold", "--unmask-threshold", "0.7"],
    ],
)
def test_unmasking_samplers_from_the_cli(runs, capsys, extra):
    """The remasking / ordered-unmasking options reach the sampler (recorded with the samples), prefix kept."""
    argv = ["sample", str(runs["mdlm"]), "--n", "2", "--length", "16", "--steps", "8", "--prompt", "The", *extra]
    assert main(argv) == 0
    assert extra[1] in capsys.readouterr().out
    path = max((runs["mdlm"] / "samples").glob("samples-*.jsonl"), key=lambda p: p.stat().st_mtime_ns)
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(recs) == 2 and all(len(r["ids"]) == 16 for r in recs)
    flat = json.dumps(recs[0])
    for name, value in zip(extra[2::2], extra[3::2]):
        assert name[2:].replace("-", "_") in flat and value in flat
