"""The run-directory layer (dlm.rundir): evaluation and reports read run directories through it, never through
the trainer; its readers on a real run and on damaged files."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch

import dlm
import dlm.train.checkpoint as checkpoint
from dlm import rundir
from dlm.errors import DlmError

SRC = Path(dlm.__file__).resolve().parent


def _imported_modules(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import statement in a source file, at any depth (lazy imports included)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(f"{path}: relative import (the project uses absolute ones)")
    return out


def _is_train(module: str) -> bool:
    return module == "dlm.train" or module.startswith("dlm.train.")


def test_readers_of_run_directories_never_import_the_trainer():
    """eval/, report/ (when it exists), experiment/report.py and dlm.rundir itself read files, not the trainer."""
    files = [SRC / "rundir.py", SRC / "experiment" / "report.py", *sorted((SRC / "eval").glob("*.py"))]
    files += sorted((SRC / "report").glob("*.py")) if (SRC / "report").is_dir() else []
    assert len(files) >= 6
    offenders = [f"{f.relative_to(SRC)}: {m}" for f in files for m, _ in _imported_modules(f) if _is_train(m)]
    assert offenders == []


def test_the_experiment_uses_the_trainer_only_to_train():
    """The formal experiment trains its arms (train, resolve_data); everything it reads comes from dlm.rundir."""
    used = {
        (m, n)
        for f in sorted((SRC / "experiment").glob("*.py"))
        for m, names in _imported_modules(f)
        if _is_train(m)
        for n in names
    }
    assert used <= {("dlm.train", "train"), ("dlm.train.loop", "resolve_data")}


def test_the_trainer_reexports_the_readers():
    """``from dlm.train.checkpoint import load_run`` (and the other readers) keeps working: the same objects."""
    for name in ("load_run", "LoadedRun", "find_checkpoint", "list_checkpoints", "read_info", "read_run_config"):
        assert getattr(checkpoint, name) is getattr(rundir, name)
    from dlm.train import load_run

    assert load_run is rundir.load_run


def test_load_run_and_readers_on_a_trained_run(tiny_ar_run: Path):
    cfg = rundir.read_run_config(tiny_ar_run)
    info = rundir.read_run_info(tiny_ar_run)
    assert cfg.process.name == "ar" and info["data_meta"]["seq_len"] == 32
    ((step, path),) = rundir.list_checkpoints(tiny_ar_run)
    assert step == 20 and path.name == rundir.step_dir_name(20)
    assert rundir.find_checkpoint(tiny_ar_run, "last") == rundir.find_checkpoint(tiny_ar_run, 20) == (step, path)
    assert rundir.read_info(path)["step"] == 20
    assert "ranks" in rundir.read_state(path)
    metrics = rundir.read_metrics(tiny_ar_run)
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 21))
    run = rundir.load_run(tiny_ar_run)
    cfg2, model, process, step2, meta = run
    assert (step2, meta, cfg2) == (20, info["data_meta"], cfg) and not model.training and process.name == "ar"
    weights = rundir.read_weights(path / "model.safetensors")
    for name, t in model.state_dict().items():
        if name in weights:
            assert torch.equal(t, weights[name])


def test_readers_refuse_damaged_files_in_one_line(tiny_ar_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(tiny_ar_run, run)
    ((_, ckpt),) = rundir.list_checkpoints(run)
    with (run / rundir.METRICS_FILE).open("a") as f:
        f.write('{"step": 21, "lo')  # a torn last line, as a killed process leaves it
    assert len(rundir.read_metrics(run)) == len(rundir.read_metrics(tiny_ar_run))
    with pytest.raises(DlmError, match="no checkpoint at step 7"):
        rundir.find_checkpoint(run, 7)
    with pytest.raises(DlmError, match="'last', 'best' or a step number"):
        rundir.find_checkpoint(run, "newest")
    (ckpt / "model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(DlmError, match="truncated or corrupt"):
        rundir.load_run(run, ema=False)
    (run / rundir.CONFIG_FILE).write_text("{")
    with pytest.raises(DlmError, match="corrupt") as e:
        rundir.read_run_config(run)
    assert "\n" not in str(e.value)
    with pytest.raises(DlmError, match="not a run directory"):
        rundir.read_run_config(tmp_path)
    (run / rundir.RUN_FILE).unlink()
    with pytest.raises(DlmError, match="not a complete run directory"):
        rundir.read_run_info(run)


def test_match_state_names_the_mismatch(tiny_ar_run: Path):
    run = rundir.load_run(tiny_ar_run)
    sd = {k: v.clone() for k, v in run.model.state_dict().items()}
    aliases = rundir.tied_aliases(run.model)
    stored = {k: v for k, v in sd.items() if k not in aliases}  # tied weights are stored once
    assert set(rundir.match_state(run.model, stored, "x")) == set(sd)
    name = next(k for k in stored if k not in aliases.values())  # not a tied one: only it goes missing
    with pytest.raises(DlmError, match=f"ckpt does not match the model: missing \\['{name}'\\]"):
        rundir.match_state(run.model, {k: v for k, v in stored.items() if k != name}, "ckpt")
    bad = dict(stored)
    bad[name] = torch.zeros(3, 1)
    with pytest.raises(DlmError, match="has shape"):
        rundir.match_state(run.model, bad, "ckpt")
    assert json.loads((tiny_ar_run / rundir.CONFIG_FILE).read_text())["process"]["name"] == "ar"
