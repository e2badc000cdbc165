"""`dlm eval --generation` (TER/SER of a formal run's samples) and `dlm experiment formal` (AR vs MDLM against
sampling steps), on tiny models; and the matched-TER speedup rule on hand-made numbers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dlm.cli import main
from dlm.data.formal import get_language
from dlm.data.tokenizers import CharTokenizer, build_tokenizer
from dlm.errors import DlmError
from dlm.eval.formal import symbol_table
from dlm.eval.results import find_results
from dlm.experiment.formal import RESULT_FILE, TEMP_MODE_DECISION, matched_speedup
from tests.helpers import write_corpus

L = 16  # symbols per sequence in these tests (rows of L + 2 tokens)
TINY = [
    "--model.n_layer", "1", "--model.d_model", "32", "--model.n_head", "2", "--model.context", str(L + 2),
    "--train.batch_size", "32", "--train.max_steps", "100", "--train.warmup_steps", "5", "--train.lr", "1e-2",
    "--train.val_every", "100", "--train.val_batches", "1", "--train.ckpt_every", "100", "--train.log_every", "50",
]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny AR model and a tiny MDLM on formal:2gram-cpu (temp_mode multiply, L = 16), and an AR model on text."""
    root = tmp_path_factory.mktemp("gen")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # micro models: 1 thread is as fast, and immune to oversubscription on a busy box
    try:
        return _train_runs(root)
    finally:
        torch.set_num_threads(threads)


def _train_runs(root):
    data = root / "formal"
    opts = ["n_train=400", "n_valid=20", "n_test=20", f"length={L}", "temp_mode=multiply"]
    argv = ["prepare", "formal:2gram-cpu", "--tokenizer", "chars", "--mode", "pad", "--seq-len", str(L + 2)]
    assert main([*argv, "--out", str(data), *(x for o in opts for x in ("--source-opt", o))]) == 0
    out = {}
    for family in ("ar", "mdlm"):
        out[family] = root / family
        argv = ["train", "--data.dir", str(data), "--run-dir", str(out[family]), "--process.name", family, *TINY]
        assert main(argv) == 0
    text = root / "text"
    assert main(["prepare", str(write_corpus(root / "corpus")), "--tokenizer", "bytes", "--out", str(text)]) == 0
    out["text"] = root / "text-run"
    argv = ["train", "--data.dir", str(text), "--run-dir", str(out["text"]), *TINY[:6], "--model.context", "256"]
    assert main([*argv, "--train.max_steps", "1", "--train.batch_size", "2", "--train.val_batches", "1"]) == 0
    return out


def _scored(rec: dict, n: int) -> None:
    """What every generation record must satisfy, whatever the model."""
    assert rec["n_sequences"] == n and rec["length"] == L and rec["metric"] == "formal_generation"
    assert 0.0 <= rec["ser"] <= 1.0 and rec["in_support"] == round(n * (1 - rec["ser"]))
    assert rec["ser_se"] == pytest.approx(math.sqrt(rec["ser"] * (1 - rec["ser"]) / n))
    assert rec["non_symbol_sequences"] <= n - rec["in_support"]  # a non-symbol row is never in the support
    assert rec["ter"] is not None and rec["ter"] >= 1.0 and rec["ter_se"] > 0
    assert rec["ter"] == pytest.approx(math.exp(rec["ter_nll"]))
    lang = get_language({**get_language("2gram-cpu").params(), "temp_mode": "multiply"})
    assert rec["language"] == lang.params() and rec["entropy_rate"] == pytest.approx(lang.entropy_rate(L)[0])
    assert rec["ter_optimal"] > math.exp(rec["entropy_rate"]) - 1e-9
    for key in ("ter", "ser", "nfe", "wall_s_per_sequence", "non_symbol_sequences"):
        assert key in rec["definitions"]
    assert rec["checkpoint_step"] == 100 and rec["wall_s_per_sequence"] == pytest.approx(rec["wall_s"] / n)


def test_generation_eval_of_a_tiny_ar_run(runs, capsys):
    assert main(["eval", str(runs["ar"]), "--generation", "--n", "40", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "generation: TER" in out and "SER" in out
    ((path, rec),) = find_results(runs["ar"], "generation", n=40, seed=3, checkpoint_step=100)
    assert path.name.startswith("generation-ancestral-n40-seed3-step100-")
    _scored(rec, 40)
    assert rec["family"] == "ar" and rec["steps"] is None and rec["seed"] == 3
    assert rec["nfe"] <= L  # one forward per generated position at most (fewer when every row stopped early)


def test_generation_eval_of_a_tiny_mdlm_run(runs, capsys):
    argv = ["eval", str(runs["mdlm"]), "--generation", "--n", "40", "--sampler", "ddpm_cache", "--steps", "12"]
    assert main([*argv, "--batch-size", "16"]) == 0
    capsys.readouterr()
    ((path, rec),) = find_results(runs["mdlm"], "generation", sampler="ddpm_cache", steps=12, n=40, batch_size=16)
    assert path.name.startswith("generation-ddpm_cache-steps12-n40-seed0-step100-")
    _scored(rec, 40)
    assert rec["family"] == "mdlm" and rec["steps"] == 12 and rec["sample_batch_size"] == 16
    assert len(rec["nfe_per_batch"]) == 3 and all(1 <= x <= 12 for x in rec["nfe_per_batch"])  # 16 + 16 + 8 rows


def test_generation_results_per_setting_reuse_and_force(runs, capsys):
    """One file per distinct setting: a rerun reuses it, --force redraws, another batch size is another file."""
    argv = ["eval", str(runs["mdlm"]), "--generation", "--n", "6", "--steps", "3", "--seed", "9"]
    assert main([*argv, "--batch-size", "3"]) == 0
    assert "reused" not in capsys.readouterr().out
    ((path, rec),) = find_results(runs["mdlm"], "generation", n=6, seed=9)
    assert rec["settings"]["batch_size"] == 3 and rec["settings"]["steps"] == 3
    before = path.stat().st_mtime_ns, path.read_bytes()
    assert main([*argv, "--batch-size", "3"]) == 0
    out = capsys.readouterr().out
    assert f"reused {path}" in out and "--force" in out
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before
    assert main([*argv, "--batch-size", "3", "--force"]) == 0
    assert "reused" not in capsys.readouterr().out and path.stat().st_mtime_ns != before[0]
    assert json.loads(path.read_text())["ter"] == rec["ter"]  # the same seed redraws the same samples
    assert main([*argv, "--batch-size", "2"]) == 0
    capsys.readouterr()
    assert len(find_results(runs["mdlm"], "generation", n=6, seed=9)) == 2


def test_generation_refuses_a_run_on_another_corpus(runs, capsys):
    assert main(["eval", str(runs["text"]), "--generation", "--n", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dlm: error:") and "\n" not in err and "formal" in err
    assert not (runs["text"] / "eval").exists()
    assert main(["eval", str(runs["ar"]), "--n", "5"]) == 2  # --n without --generation
    assert "--generation" in capsys.readouterr().err


def test_symbol_table_maps_letters_and_nothing_else():
    t = symbol_table(CharTokenizer(list("abcdefgh")), 8, 13)
    assert t[:8].tolist() == list(range(8)) and (t[8:] == -1).all()  # UNK, BOS, EOS, PAD, MASK
    b = symbol_table(build_tokenizer("bytes"), 4, 260)
    assert b[97:101].tolist() == [0, 1, 2, 3] and (np.delete(b, range(97, 101)) == -1).all()
    with pytest.raises(DlmError, match="one distinct token"):
        symbol_table(CharTokenizer(list("abc")), 4, 8)  # 'd' is UNK


def test_matched_speedup_on_hand_made_numbers():
    ar = {"ter": 2.0, "ter_se": 0.01, "ser": 0.0, "ser_se": 0.0, "nfe": 64, "wall_s_per_sequence": 0.010}
    keys = ("steps", "ter", "ter_se", "ser", "ser_se", "nfe", "wall_s_per_sequence")
    rows = [  # given out of order: the rule looks at the smallest matching step count
        dict(zip(keys, (32, 2.02, 0.01, 0.10, 0.01, 32, 0.005))),
        dict(zip(keys, (8, 2.50, 0.02, 0.90, 0.01, 8, 0.001))),
        dict(zip(keys, (16, 2.05, 0.01, 0.40, 0.02, 16, 0.002))),
        dict(zip(keys, (64, 2.00, 0.01, 0.01, 0.006, 64, 0.020))),
    ]
    m = matched_speedup(ar, rows, "ter")
    # 16 steps: 2.05 > 2.0 + 2 sqrt(2) 0.01 = 2.0283; 32 steps: 2.02 <= 2.0283
    assert m["steps"] == 32 and m["threshold"] == pytest.approx(2.0 + 2 * math.sqrt(2) * 0.01)
    assert m["speedup"] == pytest.approx(2.0) and m["nfe_ratio"] == pytest.approx(2.0) and m["value"] == 2.02
    s = matched_speedup(ar, rows, "ser")  # 64 steps: 0.01 <= 0 + 2 * 0.006
    assert s["steps"] == 64 and s["speedup"] == pytest.approx(0.5)
    assert matched_speedup(ar, rows, "ter", k=0.5)["steps"] == 64  # a stricter k needs more steps
    never = matched_speedup({**ar, "ter": 1.5}, rows, "ter")
    assert never["steps"] is None and never["speedup"] is None and never["nfe_ratio"] is None
    undefined = [{**r, "ter": None} for r in rows]
    assert matched_speedup(ar, undefined, "ter")["steps"] is None
    assert matched_speedup({**ar, "ter": None}, rows, "ter")["steps"] is None


MICRO = [
    "--language", "2gram-cpu", "--length", str(L), "--n-train", "300", "--n-layer", "1", "--d-model", "32",
    "--n-head", "2", "--train-steps", "30", "--batch-size", "32", "--lr", "1e-2", "--steps", "4,8", "--n-samples", "24",
    "--sample-batch-size", "8", "--device", "cpu",
]  # fmt: skip


def test_experiment_end_to_end_resume_and_refusals(tmp_path, capsys):
    out = tmp_path / "xp"
    assert main(["experiment", "formal", *MICRO, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mdlm ddpm_cache" in printed and "ar (KV cache)" in printed and "matched TER" in printed
    res = json.loads((out / RESULT_FILE).read_text())
    for key in (
        "language", "length", "temp_mode", "temp_mode_decision", "entropy_rate", "ter_optimal", "ar", "mdlm",
        "matched_ter", "matched_ser", "nll", "n_samples", "backbone", "config", "definitions", "wall_s", "machine",
    ):  # fmt: skip
        assert key in res, key
    assert res["temp_mode"] == "multiply" and res["temp_mode_decision"] == TEMP_MODE_DECISION
    assert res["length"] == L and res["n_samples"] == 24 and res["language"]["temp_mode"] == "multiply"
    assert [r["steps"] for r in res["mdlm"]] == [4, 8]
    for r in [res["ar"], *res["mdlm"]]:
        assert 0 <= r["ser"] <= 1 and r["nfe"] > 0 and r["wall_s_per_sequence"] > 0
        assert r["ter"] is None or r["ter"] >= 1
    for r in res["mdlm"]:
        assert r["nfe"] <= r["steps"]
        assert r["speedup_vs_ar"] == pytest.approx(res["ar"]["wall_s_per_sequence"] / r["wall_s_per_sequence"])
    for fam in ("ar", "mdlm"):
        n = res["nll"][fam]
        assert n["gap"] == pytest.approx(n["nll"] - res["entropy_rate"]) and n["sequences"] == 500
    assert res["nll"]["ar"]["exact"] is True and res["nll"]["mdlm"]["bound"] == "<="
    lang = get_language(res["language"])
    assert res["entropy_rate"] == pytest.approx(lang.entropy_rate(L)[0])
    assert abs(res["nll"]["true_model_nll"]["nll"] - res["entropy_rate"]) < 4 * res["nll"]["true_model_nll"]["nll_se"]
    assert res["backbone"]["params"]["mdlm"] - res["backbone"]["params"]["ar"] == 32  # one more embedding row
    assert (out / res["figure"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((out / "mdlm" / "eval").glob("generation-ddpm_cache-steps*-n24-seed0-step30-*.json"))) == 2
    assert len(find_results(out / "mdlm", "generation", n=24, batch_size=8)) == 2

    # a finished experiment is not overwritten
    mtime = (out / RESULT_FILE).stat().st_mtime_ns
    assert main(["experiment", "formal", *MICRO, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "finished experiment" in err and "--force" in err and "\n" not in err
    assert (out / RESULT_FILE).stat().st_mtime_ns == mtime

    # resume: without experiment.json the runs and the samples are reused, the results are the same
    (out / RESULT_FILE).unlink()
    assert main(["experiment", "formal", *MICRO, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "reusing the finished ar run" in printed and "reusing the finished mdlm run" in printed
    again = json.loads((out / RESULT_FILE).read_text())
    assert again["mdlm"] == res["mdlm"] and again["ar"] == res["ar"] and again["nll"]["ar"] == res["nll"]["ar"]

    # other settings in the same directory are refused without --force
    (out / RESULT_FILE).unlink()
    assert main(["experiment", "formal", *MICRO, "--train-steps", "31", "--out", str(out)]) == 2
    assert "other settings" in capsys.readouterr().err


def test_experiment_bad_input(tmp_path, capsys):
    for argv, needle in (
        (["--language", "5gram"], "unknown formal language"),
        (["--steps", "8,x"], "--steps"),
        (["--steps", "0"], "steps"),
        (["--temp-mode", "square"], "temp_mode"),
    ):
        assert main(["experiment", "formal", *argv, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("dlm: error:") and "\n" not in err and needle in err, err
        assert not (tmp_path / "x").exists()


def test_presets_follow_the_language():
    from dlm.experiment.formal import default_config

    cpu = default_config("hmm-cpu")
    assert cpu.length == 64 and max(cpu.steps) >= cpu.length and cpu.temp_mode == "multiply"
    paper = default_config("4gram")
    assert (paper.length, paper.n_layer, paper.d_model, paper.n_head) == (512, 10, 512, 8)  # paper table 2
    assert max(paper.steps) >= 512 and default_config("3gram").n_layer == 8
    mine = default_config("3gram-cpu", steps=[16, 8], train_steps=7, temp_mode=None)
    assert mine.steps == (16, 8) and mine.train_steps == 7 and mine.temp_mode == "multiply"
    with pytest.raises(DlmError, match="distinct"):
        default_config("2gram-cpu", steps=[8, 8])
