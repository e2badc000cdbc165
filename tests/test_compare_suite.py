"""``evaluation.downstream.task_dir: auto`` in ``dlm compare``: the multiple-choice tasks are built once from the
comparison corpus (``dlm.eval.localtasks``) into DIR/tasks and reused; only buildable task names are accepted."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dlm.compare.spec import load_compare_spec
from dlm.compare.suite import resolve_tasks
from dlm.data.shards import prepare
from dlm.data.sources import get_source
from dlm.errors import DlmError

pytest.importorskip("lm_eval", reason="the lmeval extra is not installed")


def _spec(tmp_path: Path, downstream: dict) -> Path:
    d = load_compare_spec("smoke").to_dict()
    d["evaluation"] = {**d["evaluation"], "downstream": downstream}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_auto_builds_the_tasks_once_from_the_corpus(tmp_path: Path) -> None:
    data = prepare(get_source("shakespeare"), "bytes", seq_len=32, data_root=tmp_path / "data", log=lambda s: None)
    spec = load_compare_spec(_spec(tmp_path, {"task_dir": "auto", "limit": 5}))
    logged: list[str] = []
    names, task_dir = resolve_tasks(tmp_path, spec, data, logged.append)
    assert names == ["dlm_cloze", "dlm_lastword"] and task_dir == tmp_path / "tasks"
    assert {p.name for p in task_dir.glob("*.yaml")} == {"dlm_cloze.yaml", "dlm_lastword.yaml"}
    questions = (task_dir / "dlm_cloze.jsonl").read_text().splitlines()
    assert len(questions) == 5 and "5 questions each from the test split" in logged[-1]
    before = {p.name: p.read_bytes() for p in task_dir.iterdir()}
    assert resolve_tasks(tmp_path, spec, data, logged.append) == (names, task_dir)  # reused as they are
    assert {p.name: p.read_bytes() for p in task_dir.iterdir()} == before
    one = load_compare_spec(_spec(tmp_path, {"task_dir": "auto", "tasks": ["dlm_lastword"], "limit": 5}))
    assert resolve_tasks(tmp_path / "other", one, data, logged.append)[0] == ["dlm_lastword"]
    off = load_compare_spec(_spec(tmp_path, {}))
    assert resolve_tasks(tmp_path, off, data, logged.append) is None


def test_auto_refuses_a_task_it_cannot_build(tmp_path: Path) -> None:
    with pytest.raises(DlmError) as e:
        load_compare_spec(_spec(tmp_path, {"task_dir": "auto", "tasks": ["hellaswag"]}))
    assert "hellaswag" in str(e.value) and "dlm_cloze" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DlmError, match="not a directory"):
        load_compare_spec(_spec(tmp_path, {"task_dir": str(tmp_path / "missing"), "tasks": ["x"]}))
