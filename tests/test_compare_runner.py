"""``dlm compare`` end to end on the ``smoke`` spec: files, aggregation, rerun, resume, refusals (issue 12).

One smoke comparison (4 arms x 2 seeds, 20 steps each) is run once per module; the other tests copy it.
"""

from __future__ import annotations

import fcntl
import json
import math
import shutil
import signal
from pathlib import Path

import pytest

from dlm.cli import main
from tests.compare_fixture import parse_html
from tests.helpers import assert_refused, tree_state

# the smoke spec, a little smaller still: one speed batch size, two sampling step counts; two temperatures (the sweep)
FAST = ["--evaluation.speed.batch_sizes", "1", "--evaluation.samples.steps", "4,8"]
FAST += ["--evaluation.samples.temperatures", "0.9,1.0"]


def _compare(out: Path, *extra: str) -> int:
    return main(["compare", "smoke", "--out", str(out), *FAST, *extra])


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(DIR, stdout) of one finished smoke comparison."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("smoke") / "cmp"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert _compare(out) == 0
    return out, buf.getvalue()


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _eval_files(out: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(out.glob("runs/*/eval/*.json"))}


def test_smoke_writes_every_file_and_row(smoke: tuple[Path, str]) -> None:
    out, log = smoke
    for name in ("spec.yaml", "compare.json", "results.json", "results.csv", "report.md", "report.html"):
        assert (out / name).is_file(), name
    assert (out / "judge" / "config.json").is_file()
    r = _results(out)
    arms = [a["name"] for a in r["spec"]["arms"]]
    assert arms == ["ar", "mdlm", "d3pm", "sedd"]
    assert sorted((x["arm"], x["seed"]) for x in r["runs"]) == sorted((a, s) for a in arms for s in (0, 1))
    assert all(x["step"] == 20 for x in r["runs"])
    like = [x for x in r["rows"] if x["kind"] == "likelihood"]
    assert len(like) == 8
    assert {x["arm"]: x["relation"] for x in like} == {"ar": "=", "mdlm": "≤", "d3pm": "≤", "sedd": "≤"}
    samples = [x for x in r["rows"] if x["kind"] == "samples"]
    # per seed and temperature: AR one sampler without steps; mdlm two entries, d3pm and sedd their default
    # sampler, each at 4 and 8 steps
    assert len(samples) == 2 * 2 * (1 + 2 * 2 + 2 * 2)
    assert {x["steps"] for x in samples if x["arm"] == "ar"} == {None}
    assert {x["steps"] for x in samples if x["arm"] == "mdlm"} == {4, 8}
    assert all(x["gen_ppl_seq_mean"] > 1 and x["entropy_mean"] > 0 and x["n"] == 2 for x in samples)
    speed = [x for x in r["rows"] if x["kind"] == "speed"]
    assert {x["seed"] for x in speed} == {0} and {x["batch_size"] for x in speed} == {1}
    assert r["judge"]["likelihood"]["relation"] == "="
    assert "arm ar seed 0: train from scratch" in log and "ETA" in log
    assert "report:" in log


def test_zero_shot_corpus_and_sampler_sweep(smoke: tuple[Path, str]) -> None:
    """The smoke spec's further evaluations: every run scored on the First Folio prepared with the comparison's
    tokenizer (a zeroshot row per run, the report's table), and the sweep (2 sampler entries of mdlm, one with a
    sampler option, x steps x 2 temperatures): rows keyed by label and temperature, plain entries' files as before
    the sweep (no options or label in their settings), speed for plain entries only."""
    from dlm.data.shards import read_meta

    out, log = smoke
    r = _results(out)
    zs = [x for x in r["rows"] if x["kind"] == "zeroshot"]
    assert sorted((x["arm"], x["seed"]) for x in zs) == sorted(
        (a, s) for a in ("ar", "mdlm", "d3pm", "sedd") for s in (0, 1)
    )
    assert {x["evaluation"] for x in zs} == {"zeroshot:folio"} and all(x["tokens"] > 0 for x in zs)
    assert {x["arm"]: x["relation"] for x in zs} == {"ar": "=", "mdlm": "≤", "d3pm": "≤", "sedd": "≤"}
    for x in zs:
        rec = json.loads((out / x["file"]).read_text())
        assert rec["zero_shot"] and Path(rec["data"]["dir"]) == (out / "zeroshot" / "folio").resolve()
        assert rec["nll"] == x["nll"] and rec["split"] == "test"
    meta, data = read_meta(out / "zeroshot" / "folio"), read_meta(out / "data")
    assert meta["source"]["spec"] == "shakespeare-folio" and meta["tokenizer"] == data["tokenizer"]
    (p,) = r["protocol"]["zero_shot"]
    assert p["name"] == "folio" and p["split"] == "test" and p["tokens"] == meta["splits"]["test"]["tokens"]
    zagg = [a for a in r["aggregate"] if a["kind"] == "zeroshot"]
    assert len(zagg) == 4 and all(a["evaluation"] == "zeroshot:folio" and a["n_seeds"] == 2 for a in zagg)
    assert "zero-shot folio (test): NLL = " in log
    samples = [x for x in r["rows"] if x["kind"] == "samples"]
    mdlm = {(x["sampler"], x["sampler_name"], x["steps"], x["temperature"]) for x in samples if x["arm"] == "mdlm"}
    sweep = (("ddpm", "ddpm"), ("remdm-0.05", "remdm"))
    assert mdlm == {(lab, name, s, t) for lab, name in sweep for s in (4, 8) for t in (0.9, 1.0)}
    for x in samples:
        settings = json.loads((out / x["file"]).read_text())["settings"]
        assert settings["temperature"] == x["temperature"]
        if x["sampler"] == "remdm-0.05":
            assert settings["options"] == {"remask_eta": 0.05} and settings["label"] == "remdm-0.05"
            assert "remdm-0.05-steps" in x["file"]
        else:
            assert "options" not in settings and "label" not in settings
        assert ("-temp0.9-" in x["file"]) == (x["temperature"] == 0.9)
    speed = {x["sampler"] for x in r["rows"] if x["kind"] == "speed" and x["arm"] == "mdlm"}
    assert speed == {"ddpm"}
    sagg = [a for a in r["aggregate"] if a["kind"] == "samples" and a["arm"] == "mdlm"]
    assert len(sagg) == 8 and all(a["n_seeds"] == 2 for a in sagg)
    tables, _ = parse_html((out / "report.html").read_text())
    assert set(tables["zeroshot"]) == {f"zeroshot-folio-{a}" for a in ("ar", "mdlm", "d3pm", "sedd")}
    assert tables["zeroshot"]["zeroshot-folio-ar"][3].startswith("= ")
    assert "quality-mdlm-remdm-0.05-4-t0.9" in tables["quality"]
    assert (out / "figures" / "genppl_entropy.png").is_file()


def test_conditional_generation_and_downstream_tasks(smoke: tuple[Path, str], tmp_path: Path, capsys) -> None:
    """The smoke comparison narrowed to ar and mdlm at seed 0 (--force keeps their runs), with conditional generation
    (gen-c and keep-c, 3 MAUVE seeds) and a local multiple-choice task: condgen and downstream rows per run, MAUVE
    or why it is missing, the report's tables."""
    import yaml

    pytest.importorskip("lm_eval", reason="the lmeval extra is not installed")
    from tests.test_lmeval import _write_task

    out = tmp_path / "cmp"
    shutil.copytree(smoke[0], out)
    d = yaml.safe_load((out / "spec.yaml").read_text())
    d["arms"], d["seeds"] = [a for a in d["arms"] if a["name"] in ("ar", "mdlm")], [0]
    ev = d["evaluation"]
    ev["conditional"] = {"n": 4, "prompt_len": 4, "cont_len": 4, "seeds": [0], "mauve_seeds": [0, 1, 2]}
    ev["downstream"] = {"tasks": ["dlm_quiz"], "task_dir": str(_write_task(tmp_path / "tasks")), "k": 2, "limit": 3}
    spec = tmp_path / "suite.yaml"
    spec.write_text(yaml.safe_dump(d))
    capsys.readouterr()
    assert main(["compare", str(spec), "--out", str(out), "--force"]) == 0
    log = capsys.readouterr().out
    assert "train from scratch" not in log and "condgen keep-c: continuation PPL" in log
    r = _results(out)
    cg = {(x["arm"], x["mode"]): x for x in r["rows"] if x["kind"] == "condgen"}
    assert set(cg) == {(a, m) for a in ("ar", "mdlm") for m in ("gen-c", "keep-c")}
    for (_arm, mode), x in cg.items():
        rec = json.loads((out / x["file"]).read_text())
        assert x["evaluation"] == f"condgen:{mode}" and rec["mode"] == mode and rec["settings"]["n_prompts"] == 4
        assert x["continuation_ppl"] == rec["continuation_ppl"]["mean"] > 1 and x["human_ppl"] > 1
        assert (x["mauve"] is None) == (x["mauve_missing"] is not None)
        assert x["mauve"] is None or 0 < x["mauve"] <= 1
    assert cg[("ar", "gen-c")]["steps"] is None and cg[("mdlm", "gen-c")]["steps"] is not None
    ds = [x for x in r["rows"] if x["kind"] == "downstream"]
    assert {(x["arm"], x["task"], x["scoring"], x["k"]) for x in ds} == {("ar", "dlm_quiz", "exact", 1),
                                                                          ("mdlm", "dlm_quiz", "bound", 2)}  # fmt: skip
    assert all(0 <= x["acc"] <= 1 and x["documents"] == 3 for x in ds)
    assert r["protocol"]["conditional"]["n"] == 4 and r["protocol"]["downstream"]["tasks"] == ["dlm_quiz"]
    tables, _ = parse_html((out / "report.html").read_text())
    assert set(tables["condgen"]) >= {f"condgen-{a}-{m}" for a in ("ar", "mdlm") for m in ("gen-c", "keep-c")}
    assert set(tables["condgen-modes"]) == {"condgen-modes-ar", "condgen-modes-mdlm"}
    assert set(tables["downstream"]) == {"downstream-dlm_quiz-ar", "downstream-dlm_quiz-mdlm"}
    assert tables["downstream"]["downstream-dlm_quiz-mdlm"][2] == "bound, K = 2, common draws"


def test_aggregate_is_the_mean_and_std_of_the_seed_rows(smoke: tuple[Path, str]) -> None:
    r = _results(smoke[0])
    for agg in r["aggregate"]:
        if agg["kind"] != "likelihood":
            continue
        values = [x["nll"] for x in r["rows"] if x["kind"] == "likelihood" and x["arm"] == agg["arm"]]
        mean = sum(values) / 2
        assert agg["nll"]["mean"] == pytest.approx(mean, rel=1e-12)
        assert agg["nll"]["std"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values)), rel=1e-9)
        assert agg["nll"]["n"] == 2 and agg["seeds"] == [0, 1]
    csv_text = (smoke[0] / "results.csv").read_text().splitlines()
    assert csv_text[0].startswith("row_type,") and sum(line.startswith("aggregate,") for line in csv_text) == len(
        r["aggregate"]
    )


def test_rerun_reuses_everything(smoke: tuple[Path, str], tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    shutil.copytree(smoke[0], out)
    before = _eval_files(out)
    capsys.readouterr()
    assert _compare(out, "--no-report") == 0
    log = capsys.readouterr().out
    assert "train from scratch" not in log and "resume" not in log
    assert log.count("finished (step 20)") == 8
    assert _eval_files(out) == before  # nothing re-evaluated
    old, new = _results(smoke[0]), _results(out)
    assert [x for x in new["rows"] if x["kind"] != "speed"] == [x for x in old["rows"] if x["kind"] != "speed"]


def test_a_cut_run_is_resumed_to_the_same_result(smoke: tuple[Path, str], tmp_path: Path, capsys) -> None:
    """Remove the last checkpoint of one run (as if the process had been killed after step 10): the rerun resumes
    that run only, and exact resumption gives the same likelihood as the uninterrupted run."""
    out = tmp_path / "cmp"
    shutil.copytree(smoke[0], out)
    run = out / "runs" / "mdlm-seed1"
    last = sorted(p for p in (run / "checkpoints").iterdir() if p.is_dir())[-1]
    shutil.rmtree(last)
    shutil.rmtree(run / "eval")
    capsys.readouterr()
    assert _compare(out, "--no-report") == 0
    log = capsys.readouterr().out
    assert "arm mdlm seed 1: resume from step 10" in log
    assert log.count("train from scratch") == 0 and log.count("finished (step 20)") == 7

    def nll(path: Path) -> float:
        return next(x["nll"] for x in _results(path)["rows"] if x["kind"] == "likelihood" and x["arm"] == "mdlm"
                    and x["seed"] == 1)  # fmt: skip

    assert nll(out) == nll(smoke[0])


def test_a_changed_spec_is_refused_then_forced(smoke: tuple[Path, str], tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    shutil.copytree(smoke[0], out)
    argv = ["compare", "smoke", "--out", str(out), *FAST, "--evaluation.samples.n", "3"]
    assert_refused(capsys, argv, "fields that differ: evaluation.samples.n", out)
    assert main([*argv, "--force", "--no-report"]) == 0
    log = capsys.readouterr().out
    assert "train from scratch" not in log  # the runs still match their arms: kept
    r = _results(out)
    assert {x["n"] for x in r["rows"] if x["kind"] == "samples"} == {3}
    assert json.loads((out / "compare.json").read_text())["previous_spec_hashes"] == [_results(smoke[0])["spec_hash"]]


def test_a_budget_shortened_by_force_moves_the_longer_runs_aside(smoke: tuple[Path, str], tmp_path: Path, capsys):
    """--force with a smaller steps budget: a run that trained past it cannot stand for the new budget; it is moved to
    DIR/replaced/ (kept, never deleted) and trained again. A spec with the ar arm only keeps the test short."""
    import yaml

    out = tmp_path / "cmp"
    shutil.copytree(smoke[0], out)
    d = yaml.safe_load((out / "spec.yaml").read_text())
    d["arms"] = [a for a in d["arms"] if a["family"] == "ar"]
    d["budget"] = {"steps": 10}
    spec = tmp_path / "ar-only.yaml"
    spec.write_text(yaml.safe_dump(d))
    argv = ["compare", str(spec), "--out", str(out), "--no-report"]
    assert_refused(capsys, argv, "fields that differ: arms, budget.steps", out)
    assert main([*argv, "--force"]) == 0
    log = capsys.readouterr().out
    assert log.count("trained 20 steps, past the budget of 10") == 3  # the judge and two ar runs
    moved = sorted(p.name.rsplit("-", 2)[0] for p in (out / "replaced").iterdir())
    assert moved == ["ar-seed0", "ar-seed1", "judge"]
    assert all((p / "checkpoints").is_dir() for p in (out / "replaced").iterdir())
    assert {(x["arm"], x["step"]) for x in _results(out)["runs"]} == {("ar", 10)}
    assert (out / "runs" / "mdlm-seed0" / "config.json").is_file()  # runs of arms the spec left are not touched


def test_a_locked_dir_is_refused(smoke: tuple[Path, str], tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    shutil.copytree(smoke[0], out)
    with open(out / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert_refused(capsys, ["compare", "smoke", "--out", str(out), *FAST], "in use", out)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--arms.ar.family", "nope"], "unknown family 'nope'"),
        (["--seeds", "0,0"], "duplicated seed"),
        (["--budget.steps", "0"], "budget.steps must be > 0"),
        (["--evaluation.samples.n", "0"], "evaluation.samples.n must be >= 1"),
    ],
)
def test_bad_specs_are_refused_before_any_work(tmp_path: Path, capsys, extra: list[str], match: str) -> None:
    out = tmp_path / "cmp"
    assert_refused(capsys, ["compare", "smoke", "--out", str(out), *extra], match, tmp_path)
    assert not out.exists()


def test_empty_arm_list_refused(tmp_path: Path, capsys) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: x\narms: []\nbudget: {steps: 5}\n")
    assert_refused(capsys, ["compare", str(spec), "--out", str(tmp_path / "cmp")], "arm list is empty", tmp_path)


def test_hf_evaluators_that_cannot_judge_are_refused(tiny_data: Path, tmp_path: Path, capsys) -> None:
    """hf:DIR that is not a causal LM, and one whose tokenizer cannot write the corpus (it lower-cases): one line,
    exit 2, nothing written in DIR (the corpus is a prepared directory, so the probe runs before DIR is opened)."""
    from tests.test_hfjudge import _bert_dir

    not_lm = tmp_path / "vit"
    not_lm.mkdir()
    (not_lm / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTModel"]}))
    out = tmp_path / "cmp"
    base = ["compare", "smoke", "--out", str(out), "--corpus.data_dir", str(tiny_data)]
    assert_refused(capsys, [*base, "--evaluation.evaluator", f"hf:{not_lm}"], "causal", tmp_path)
    lower = _bert_dir(tmp_path / "bert", is_decoder=True, bos="[CLS]")
    state = tree_state(tmp_path)
    assert_refused(capsys, [*base, "--evaluation.evaluator", f"hf:{lower}"], "cannot represent", tmp_path)
    assert tree_state(tmp_path) == state and not out.exists()


def test_report_rebuilds_from_files_and_refuses_a_dir_without_results(smoke, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    shutil.copytree(smoke[0], out)
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").read_text() == (smoke[0] / "report.html").read_text()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_refused(capsys, ["report", str(empty)], "results.json", empty)


def test_a_minutes_budget_spans_the_sessions_of_a_run(tiny_ar_run: Path) -> None:
    """A resumed run under a minutes budget gets the budget less the wall time its last checkpoint records."""
    from dlm.compare.runner import _remaining_minutes
    from dlm.rundir import list_checkpoints, read_info, read_run_config

    cfg = read_run_config(tiny_ar_run)
    elapsed = read_info(list_checkpoints(tiny_ar_run)[-1][1])["elapsed"]
    assert elapsed > 0
    cfg.train.time_limit_min = 10.0
    left = _remaining_minutes(cfg, tiny_ar_run)
    assert left.train.time_limit_min == pytest.approx(10.0 - elapsed / 60, abs=1e-12)
    assert cfg.train.time_limit_min == 10.0  # the caller's config is not changed
    cfg.train.time_limit_min = elapsed / 120  # already spent: a minimal positive limit, the run stops at once
    assert _remaining_minutes(cfg, tiny_ar_run).train.time_limit_min == 1e-3
    cfg.train.time_limit_min = None
    assert _remaining_minutes(cfg, tiny_ar_run).train.time_limit_min is None


@pytest.mark.slow
def test_sigterm_ends_the_comparison_with_a_checkpoint_and_the_lock_released(tmp_path: Path) -> None:
    """SIGTERM while the judge trains: exit 143, one line saying how to resume, the run checkpointed (partial), and
    DIR's lock free again (the same spec opens at once)."""
    from dlm.compare.spec import judge_run_config, load_compare_spec
    from dlm.compare.state import open_compare_dir, run_state
    from tests.test_run_safety import run_cli, signal_after_first_step

    out = tmp_path / "cmp"
    argv = ["compare", "smoke", "--out", str(out), *FAST, "--budget.steps", "500"]
    err = signal_after_first_step(run_cli(argv), out / "judge", signal.SIGTERM)
    assert err.splitlines()[-1].startswith("dlm: SIGTERM stopped the comparison at step ")
    assert "rerun the same dlm compare command to resume" in err
    spec = load_compare_spec("smoke", [*FAST, "--budget.steps", "500"])
    with open_compare_dir(out, spec) as cdir:  # not refused: the lock was released
        state = run_state(out / "judge", judge_run_config(spec), "judge")
        assert state.status == "partial" and 0 < state.step < 500
        assert cdir.root == out


def test_likelihood_rows_state_k_and_the_report_the_batches(smoke: tuple[Path, str], tmp_path: Path) -> None:
    """K in every likelihood row is the bound's time samples (1 for the exact AR), and the report says how much
    of the split was scored (smoke: its first 2 batches; 0 would read 'the whole split')."""
    from dlm.compare.report import _batches_text

    r = _results(smoke[0])
    k = {(x["arm"], x["seed"]): x["t_samples"] for x in r["rows"] if x["kind"] == "likelihood"}
    assert set(k.values()) == {1} and r["spec"]["evaluation"]["likelihood"]["t_samples"] == 1
    out = tmp_path / "cmp"
    shutil.copytree(smoke[0], out)
    assert main(["compare", "smoke", "--out", str(out), *FAST, "--evaluation.likelihood.t_samples", "3",
                 "--force", "--no-report"]) == 0  # fmt: skip
    k = {x["arm"]: x["t_samples"] for x in _results(out)["rows"] if x["kind"] == "likelihood"}
    assert k == {"ar": 1, "mdlm": 3, "d3pm": 3, "sedd": 3}
    assert "its first 2 batches" in (smoke[0] / "report.md").read_text()
    assert _batches_text(0) == "the whole split"
