"""`dlm train | eval | sample | demo` from the command line, on tiny models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dlm.cli import main
from dlm.eval.results import find_results
from tests.helpers import write_corpus

TINY = [
    "--model.n_layer", "1", "--model.d_model", "32", "--model.n_head", "2", "--model.context", "32",
    "--train.batch_size", "4", "--train.max_steps", "4", "--train.warmup_steps", "1",
    "--train.val_every", "2", "--train.val_batches", "2", "--train.ckpt_every", "2", "--train.log_every", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    corpus = write_corpus(root / "corpus")
    data = root / "data"
    assert main(["prepare", str(corpus), "--tokenizer", "bytes", "--seq-len", "32", "--out", str(data)]) == 0
    run = root / "run"
    assert main(["train", "--data.dir", str(data), "--run-dir", str(run), *TINY]) == 0
    return data, run


def test_train_writes_a_run(trained):
    data, run = trained
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["n_layer"] == 1 and cfg["data"]["dir"] == str(data.resolve())
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x][-1] == 4


def test_eval_json_is_complete_and_consistent(trained, capsys):
    data, run = trained
    assert main(["eval", str(run), "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "test: NLL =" in out and "exact" in out
    ((_, rec),) = find_results(run, "likelihood", split="test", checkpoint_step=4, max_batches=None)
    train_seed = json.loads((run / "config.json").read_text())["train"]["seed"]
    assert rec["train_seed"] == train_seed and rec["eval_seed"] == rec["seed"]
    assert f"train seed {train_seed}, eval seed {rec['eval_seed']}" in out
    for key in ("split", "checkpoint_step", "seed", "tokens", "sequences", "nll_se", "bits_per_byte", "mode"):
        assert key in rec
    assert rec["exact"] is True and rec["bound"] == "=" and rec["family"] == "ar"
    assert rec["bpt"] == pytest.approx(rec["nll"] / math.log(2))
    assert rec["ppl"] == pytest.approx(math.exp(rec["nll"]))
    meta = json.loads((data / "meta.json").read_text())["splits"]["test"]
    # every family scores every real position but the first of each row
    assert rec["tokens"] == meta["tokens"] - meta["rows"] and rec["sequences"] == meta["rows"]
    # bits per byte: the nats over the UTF-8 bytes of exactly the scored tokens (bytes tokenizer: ids < 256)
    from dlm.data.shards import open_split

    s = open_split(data, "test")
    ids, real = s.rows(np.arange(len(s)))
    n_bytes = int(((ids < 256) & real & (np.arange(ids.shape[1]) >= 1)).sum())
    assert rec["bytes"] == n_bytes
    assert rec["bits_per_byte"] == pytest.approx(rec["nats"] / (math.log(2) * n_bytes), rel=1e-12)


def test_sample_is_deterministic_and_saved(trained, capsys):
    _, run = trained
    args = ["sample", str(run), "--n", "2", "--length", "24", "--prompt", "The cat", "--seed", "3", "--top-p", "0.9"]
    assert main(args) == 0
    first = capsys.readouterr().out.split("\n--- 2 samples in")[0]  # the rest is wall time and the path
    assert main(args) == 0
    assert capsys.readouterr().out.split("\n--- 2 samples in")[0] == first
    files = sorted((run / "samples").glob("*.jsonl"))
    assert len(files) == 2  # a second call never overwrites the first
    recs = [json.loads(x) for x in files[-1].read_text().splitlines()]
    assert len(recs) == 2 and recs[0]["top_p"] == 0.9 and recs[0]["seed"] == 3 and recs[0]["nfe"] >= 1
    assert all(len(r["ids"]) <= 24 and r["prompt"] == "The cat" for r in recs)


@pytest.mark.parametrize(
    "argv_tail, needle",
    [
        (["--model.n_layers", "3"], "n_layer"),
        (["--model.n_layer", "abc"], "model.n_layer"),
        (["--model.d_model", "-8"], "d_model"),
        (["--model.context", "16"], "shorter than the data rows"),
    ],
)
def test_train_bad_input(trained, tmp_path, capsys, argv_tail, needle):
    data, _ = trained
    run = tmp_path / "r"
    assert main(["train", "--data.dir", str(data), "--run-dir", str(run), *TINY, *argv_tail]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dlm: error:") and "\n" not in err and needle in err
    assert not run.exists() or not any(run.iterdir())


def test_existing_run_is_not_overwritten(trained, capsys):
    data, run = trained
    before = (run / "metrics.jsonl").read_bytes()
    assert main(["train", "--data.dir", str(data), "--run-dir", str(run), *TINY]) == 2
    assert "already" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_bytes() == before


def test_eval_and_sample_bad_input(trained, tmp_path, capsys):
    _, run = trained
    assert main(["eval", str(tmp_path)]) == 2
    assert main(["eval", str(run), "--split", "dev"]) == 2
    assert main(["sample", str(run), "--prompt", ""]) == 2
    assert main(["sample", str(run), "--top-p", "1.5"]) == 2
    errs = capsys.readouterr().err.strip().splitlines()
    assert len(errs) == 4 and all(e.startswith("dlm: error:") for e in errs)
    assert "tokenizes to nothing" in errs[2]


def test_demo_end_to_end(tmp_path, capsys):
    argv = [
        "demo", "--tokenizer", "bytes", "--seq-len", "32", "--steps", "2", "--samples", "1",
        "--sample-length", "12", "--data-root", str(tmp_path / "data"), "--runs-root", str(tmp_path / "runs"),
        "--model.n_layer", "1", "--model.d_model", "32", "--model.n_head", "2",
        "--train.batch_size", "4", "--train.val_batches", "2",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "validation: NLL" in out and "test: NLL" in out and "run directory:" in out
    (run,) = (tmp_path / "runs").iterdir()
    names = sorted(p.name for p in (run / "eval").iterdir())
    assert len(names) == 2 and names[0].startswith("likelihood-test-step2-")
    assert names[1].startswith("likelihood-validation-step2-")


def test_gpt2_backbone_trains_and_evaluates(trained, tmp_path, capsys):
    pytest.importorskip("transformers")
    data, _ = trained
    run = tmp_path / "g2"
    assert main(["train", "--data.dir", str(data), "--run-dir", str(run), *TINY, "--model.backbone", "gpt2-hf"]) == 0
    assert main(["eval", str(run), "--split", "validation"]) == 0
    ((_, rec),) = find_results(run, "likelihood", split="validation")
    assert rec["exact"] and math.isfinite(rec["nll"]) and rec["nll"] < math.log(259) + 1


def test_ar_sampler_refuses_diffusion_steps(trained, capsys):
    _, run = trained
    assert main(["sample", str(run), "--n", "1", "--length", "8", "--steps", "4"]) == 2
    assert "steps" in capsys.readouterr().err
