"""The comparison directory: spec.yaml / compare.json, refusals that change nothing, the lock, run statuses."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from dlm.compare.spec import CompareSpec, arm_run_config, dump_spec, load_compare_spec, spec_hash
from dlm.compare.state import RunState, open_compare_dir, spec_differences
from dlm.errors import DlmError
from dlm.io import exclusive_lock, write_json_atomic
from tests.helpers import tree_state


@pytest.fixture(scope="module")
def smoke() -> CompareSpec:
    return load_compare_spec("smoke")


def _changed(spec: CompareSpec) -> CompareSpec:
    other = copy.deepcopy(spec)
    other.budget.steps = 30
    other.seeds = (0, 1, 2)
    return other


def _fake_run(run_dir: Path, ckpts: dict[int, dict]) -> None:
    """A run directory with config.json and checkpoints/step-N/state.json holding ``ckpts[N]``."""
    write_json_atomic(run_dir / "config.json", {})
    for step, info in ckpts.items():
        write_json_atomic(run_dir / "checkpoints" / f"step-{step:07d}" / "state.json", {"step": step, **info})


def test_new_dir_gets_spec_and_compare_json(tmp_path: Path, smoke: CompareSpec) -> None:
    out = tmp_path / "cmp" / "deep"
    with open_compare_dir(out, smoke, force=False) as cdir:
        assert cdir.created
        assert (out / ".lock").is_file()
    assert not (out / ".lock").exists()
    info = json.loads((out / "compare.json").read_text())
    assert info["spec_hash"] == spec_hash(smoke)
    assert set(info) == {"spec_hash", "created", "dlm_version"}
    assert (out / "spec.yaml").read_text() == dump_spec(smoke)
    assert spec_hash(load_compare_spec(str(out / "spec.yaml"))) == spec_hash(smoke)


def test_same_spec_reopens_unchanged(tmp_path: Path, smoke: CompareSpec) -> None:
    with open_compare_dir(tmp_path, smoke, force=False):  # an existing, empty directory counts as new
        pass
    before = tree_state(tmp_path)
    with open_compare_dir(tmp_path, copy.deepcopy(smoke), force=False) as cdir:
        assert not cdir.created and cdir.previous_spec_hashes == []
    assert tree_state(tmp_path) == before


def test_changed_spec_refused_naming_fields(tmp_path: Path, smoke: CompareSpec) -> None:
    with open_compare_dir(tmp_path, smoke, force=False):
        pass
    (tmp_path / "runs" / "ar-seed0").mkdir(parents=True)
    before = tree_state(tmp_path)
    with pytest.raises(DlmError) as e, open_compare_dir(tmp_path, _changed(smoke), force=False):
        pass
    msg = str(e.value)
    assert "\n" not in msg
    assert "fields that differ: seeds, budget.steps" in msg and "--force" in msg
    assert tree_state(tmp_path) == before


def test_force_rewrites_and_records_previous_hash(tmp_path: Path, smoke: CompareSpec) -> None:
    with open_compare_dir(tmp_path, smoke, force=False):
        pass
    (tmp_path / "runs" / "ar-seed0").mkdir(parents=True)
    other = _changed(smoke)
    with open_compare_dir(tmp_path, other, force=True) as cdir:
        assert cdir.previous_spec_hashes == [spec_hash(smoke)]
    info = json.loads((tmp_path / "compare.json").read_text())
    assert info["spec_hash"] == spec_hash(other)
    assert info["previous_spec_hashes"] == [spec_hash(smoke)]
    assert (tmp_path / "spec.yaml").read_text() == dump_spec(other)
    assert (tmp_path / "runs" / "ar-seed0").is_dir()  # run directories are never deleted
    with open_compare_dir(tmp_path, smoke, force=True) as cdir:  # and back: the history grows
        assert cdir.previous_spec_hashes == [spec_hash(smoke), spec_hash(other)]


def test_locked_dir_refused(tmp_path: Path, smoke: CompareSpec) -> None:
    with open_compare_dir(tmp_path, smoke, force=False):
        pass
    with exclusive_lock(tmp_path / ".lock", tmp_path):
        before = tree_state(tmp_path)
        with (
            pytest.raises(DlmError, match="in use by another dlm process"),
            open_compare_dir(tmp_path, smoke, force=False),
        ):
            pass
        assert tree_state(tmp_path) == before


@pytest.mark.parametrize("content", ["file", "compare_json_corrupt"])
def test_non_comparison_dir_refused(tmp_path: Path, smoke: CompareSpec, content: str) -> None:
    if content == "file":
        (tmp_path / "notes.txt").write_text("mine\n")
        match = "not empty and holds no comparison"
    else:
        (tmp_path / "compare.json").write_text("{not json")
        match = "corrupt"
    before = tree_state(tmp_path)
    with pytest.raises(DlmError, match=match), open_compare_dir(tmp_path, smoke, force=True):
        pass
    assert tree_state(tmp_path) == before


def test_cut_setup_is_fresh(tmp_path: Path, smoke: CompareSpec) -> None:
    """A set-up killed after spec.yaml but before compare.json is simply redone."""
    (tmp_path / "spec.yaml").write_text("name: half\n")
    with open_compare_dir(tmp_path, smoke, force=False) as cdir:
        assert cdir.created
    assert (tmp_path / "spec.yaml").read_text() == dump_spec(smoke)


def test_spec_differences() -> None:
    old = {"a": 1, "b": {"c": 2, "d": [1]}, "e": [1, 2]}
    new = {"a": 1, "b": {"c": 3, "d": [1]}, "e": [1], "f": 0}
    assert spec_differences(old, new) == ["b.c", "e", "f"]
    assert spec_differences(old, old) == []


def test_layout_and_statuses_steps_budget(tmp_path: Path, smoke: CompareSpec) -> None:
    assert smoke.budget.steps == 20
    with open_compare_dir(tmp_path, smoke, force=False) as cdir:
        assert cdir.run_dir("mdlm", 1) == tmp_path / "runs" / "mdlm-seed1"
        assert cdir.data_dir == tmp_path / "data"
        with pytest.raises(DlmError, match="no arm named"):
            cdir.run_dir("gpt9", 0)
        _fake_run(cdir.run_dir("ar", 0), {10: {"tokens": 1280}, 20: {"tokens": 2560, "stopped": None}})
        _fake_run(cdir.run_dir("ar", 1), {10: {"tokens": 1280, "stopped": "signal"}})
        _fake_run(cdir.run_dir("mdlm", 0), {})  # config written, killed before the first checkpoint
        plan = cdir.plan()
        assert [(a, s) for a, s, _ in plan] == [(a, s) for a in ("ar", "mdlm", "d3pm", "sedd") for s in (0, 1)]
        got = {(a, s): st for a, s, st in plan}
        assert got[("ar", 0)] == "finished"
        assert got[("ar", 1)] == "partial"
        assert got[("mdlm", 0)] == "partial"
        assert got[("sedd", 1)] == "missing"
        assert cdir.status("ar", 0) == "finished"
        assert plan[1].line() == "arm ar seed 1: resume from step 10"
        assert plan[3].line() == "arm mdlm seed 1: train from scratch"
        assert plan[0].step == 20


def test_statuses_tokens_and_minutes_budget(tmp_path: Path, smoke: CompareSpec) -> None:
    tokens = copy.deepcopy(smoke)
    tokens.budget.steps, tokens.budget.tokens = None, 2000  # 128 tokens a step: finished at step 16 (2048)
    with open_compare_dir(tmp_path / "t", tokens, force=False) as cdir:
        _fake_run(cdir.run_dir("ar", 0), {15: {"tokens": 1920}})
        _fake_run(cdir.run_dir("ar", 1), {16: {"tokens": 2048}})
        assert cdir.status("ar", 0) == "partial"
        assert cdir.state("ar", 1) == RunState("ar", 1, "finished", 16, 2048)

    minutes = copy.deepcopy(smoke)
    minutes.budget.steps, minutes.budget.minutes = None, 1.0
    with open_compare_dir(tmp_path / "m", minutes, force=False) as cdir:
        max_steps = arm_run_config(minutes, minutes.arm("mdlm"), 1).train.max_steps  # the base config's length
        assert max_steps > 7
        _fake_run(cdir.run_dir("ar", 0), {7: {"tokens": 896, "stopped": "time_limit"}})
        _fake_run(cdir.run_dir("ar", 1), {7: {"tokens": 896, "stopped": "signal"}})
        _fake_run(cdir.run_dir("mdlm", 1), {max_steps: {"tokens": 128 * max_steps, "stopped": None}})
        assert cdir.status("ar", 0) == "finished"
        assert cdir.status("ar", 1) == "partial"
        assert cdir.status("mdlm", 0) == "missing"
        assert cdir.status("mdlm", 1) == "finished"


def test_statuses_of_a_real_run(tmp_path: Path, smoke: CompareSpec, tiny_ar_run: Path) -> None:
    """The trainer's own state.json: the tiny run did 20 steps of 8 rows x 32 tokens = 5120 tokens."""
    cases = [({"steps": 20}, "finished"), ({"steps": 21}, "partial"), ({"tokens": 5120}, "finished")]
    cases.append(({"tokens": 5121}, "partial"))
    for i, (budget, expected) in enumerate(cases):
        spec = copy.deepcopy(smoke)
        spec.budget.steps = None
        for key, value in budget.items():
            setattr(spec.budget, key, value)
        with open_compare_dir(tmp_path / str(i), spec, force=False) as cdir:
            shutil.copytree(tiny_ar_run, cdir.run_dir("ar", 0))
            state = cdir.state("ar", 0)
            assert (state.status, state.step, state.tokens) == (expected, 20, 5120), budget


def test_a_spec_written_before_a_field_existed_is_the_same_spec(tmp_path: Path, smoke: CompareSpec) -> None:
    """A DIR made by an older dlm whose spec lacked a field (here evaluation.variance, at its default now) reopens
    as the same comparison: its spec.yaml and compare.json are rewritten with today's hash; a real change is
    still refused."""
    import yaml

    from dlm.compare.spec import VarianceEval

    spec = copy.deepcopy(smoke)
    spec.evaluation.variance = VarianceEval()  # the defaults
    with open_compare_dir(tmp_path, spec):
        pass
    old = yaml.safe_load((tmp_path / "spec.yaml").read_text())
    del old["evaluation"]["variance"]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    write_json_atomic(tmp_path / "compare.json", {"spec_hash": "0" * 64, "created": "then", "dlm_version": "0.0"})
    with open_compare_dir(tmp_path, spec) as cdir:
        assert cdir.previous_spec_hashes == []
    assert json.loads((tmp_path / "compare.json").read_text())["spec_hash"] == spec_hash(spec)
    assert "variance" in yaml.safe_load((tmp_path / "spec.yaml").read_text())["evaluation"]
    other = copy.deepcopy(spec)
    other.evaluation.variance.batches = 4
    with pytest.raises(DlmError, match="evaluation.variance.batches"), open_compare_dir(tmp_path, other):
        pass
