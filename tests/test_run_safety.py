"""Run and data directories are never lost or mixed: locks, checks before the first write, strict JSON,
the umask, early stops that say so and resume, signals that checkpoint, one-line errors for broken files."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from dlm.cli import main
from dlm.config import load_config
from dlm.errors import DlmError
from dlm.io import exclusive_lock, write_json_atomic
from dlm.train import list_checkpoints, load_run
from dlm.train.loop import validate
from dlm.train.optim import lr_at
from dlm.train.runtime import Runtime
from tests.helpers import assert_refused, write_corpus

TIMING = ("tok_s", "mfu", "elapsed")


def tiny_args(data: Path, *extra: str) -> list[str]:
    """Overrides of a 1-layer, d 32 model on byte rows of 32: a few steps take a second or two."""
    return [
        f"--data.dir={data}",
        "--model.n_layer=1",
        "--model.d_model=32",
        "--model.n_head=2",
        "--model.context=32",
        "--train.device=cpu",
        "--train.batch_size=4",
        "--train.max_steps=6",
        "--train.warmup_steps=2",
        "--train.lr=3e-3",
        "--train.ckpt_every=3",
        "--train.val_every=3",
        "--train.val_batches=1",
        "--train.log_every=1",
        *extra,
    ]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "c", n_docs=40, seed=1)


@pytest.fixture(scope="module")
def data(tiny_data: Path) -> Path:
    """The session's tiny byte data (tests/conftest.py): the same corpus as ``corpus``, rows of 32."""
    return tiny_data


@pytest.fixture(scope="module")
def run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 6-step AR run (checkpoints at 3 and 6)."""
    run_dir = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", "--run-dir", str(run_dir), *tiny_args(data)]) == 0
    return run_dir


def copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def metric_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in lines]


# ----------------------------------------------------------------------------- item 5: non-finite, strict JSON


def test_a_checkpoint_with_non_finite_weights_is_refused_by_eval_sample_and_load_run(
    run: Path, tmp_path: Path, capsys
) -> None:
    run_dir = copy_run(run, tmp_path)
    weights = run_dir / "checkpoints" / "step-0000006" / "model.safetensors"
    sd = load_file(weights)
    name = sorted(sd)[1]
    sd[name].view(-1)[3] = float("nan")  # a bit flip in an exponent
    save_file(sd, weights, metadata={"format": "pt"})
    with pytest.raises(DlmError, match=f"{weights} is corrupt: tensor {name} holds non-finite values"):
        load_run(run_dir)
    for argv in (["eval", str(run_dir), "--max-batches", "1"], ["sample", str(run_dir), "--n", "1"]):
        assert_refused(capsys, argv, f"tensor {name} holds non-finite values", run_dir)


def test_json_is_strict_and_an_overflowing_perplexity_is_null(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not JSON compliant"):
        write_json_atomic(tmp_path / "x.json", {"nll": float("nan")})
    assert not (tmp_path / "x.json").exists()

    class Huge:  # a process whose bound is beyond exp's range: 800 nats per token
        exact_likelihood = True

        def nll(self, model, batch, generator=None):
            return SimpleNamespace(nats_B=torch.tensor([800.0]), tokens_B=torch.tensor([1.0]), exact=True)

    batch = SimpleNamespace(to=lambda device: None)
    v = validate(torch.nn.Linear(1, 1), Huge(), [batch], Runtime(torch.device("cpu")), seed=0)
    assert v["val_nll"] == 800.0 and v["val_ppl"] is None
    json.dumps(v, allow_nan=False)


# ----------------------------------------------------------------------------- item 7: locks

HOLD = """
import sys, time
from dlm.io import exclusive_lock
with exclusive_lock(sys.argv[1], "x"):
    print("held", flush=True)
    time.sleep(60)
"""


def hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding ``path``'s lock (until killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.slow
def test_a_second_train_into_a_run_in_use_is_refused(run: Path, data: Path, tmp_path: Path, capsys) -> None:
    assert not (run / ".lock").exists()  # released when the run ended
    run_dir = copy_run(run, tmp_path)
    holder = hold_lock(run_dir / ".lock")
    try:
        msg = f"{run_dir} is in use by another dlm process (pid {holder.pid})"
        assert_refused(capsys, ["train", "--run-dir", str(run_dir), "--resume"], msg, run_dir)
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        with exclusive_lock(fresh / ".lock", fresh):  # held by this process: the CLI opens it anew
            assert_refused(capsys, ["train", "--run-dir", str(fresh), *tiny_args(data)], "is in use", fresh)
    finally:
        holder.kill()
        holder.wait()
    assert main(["train", "--run-dir", str(run_dir), "--resume", "--train.max_steps=7"]) == 0  # free again


@pytest.mark.slow
def test_a_second_prepare_of_the_same_target_is_refused(corpus: Path, tmp_path: Path, capsys) -> None:
    root = tmp_path / "data"
    root.mkdir()
    holder = hold_lock(root / ".d.lock")
    try:
        argv = ["prepare", str(corpus), "--tokenizer", "bytes", "--seq-len", "24", "--out", str(root / "d")]
        assert_refused(capsys, argv, f"{root / 'd'} is in use by another dlm process (pid {holder.pid})", root)
    finally:
        holder.kill()
        holder.wait()
    assert main(argv) == 0 and sorted(p.name for p in root.iterdir()) == ["d"]  # the killed holder's lock reused


# ----------------------------------------------------------------------------- item 8: check before writing


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--process.name=mdlm", "--model.backbone=gpt2-hf"], "supports only attn='causal'"),
        (["--model.attn_backend=flex"], "flex attention needs CUDA"),
        (["--train.batch_size=100000000"], "train.batch_size 100000000 x 1 rank(s) exceeds the"),
        (["--train.lr=inf"], "train.lr must be a finite number, got inf"),
    ],
)
def test_bad_configurations_are_refused_before_the_run_directory_is_written(
    data: Path, tmp_path: Path, capsys, extra: list[str], match: str
) -> None:
    if "--model.backbone=gpt2-hf" in extra:
        pytest.importorskip("transformers")
    parent = tmp_path / "runs"
    parent.mkdir()
    assert_refused(capsys, ["train", "--run-dir", str(parent / "r"), *tiny_args(data, *extra)], match, parent)


# ----------------------------------------------------------------------------- item 9: umask


def modes(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        for p in [root, *root.rglob("*")]:
            out[str(p.relative_to(root.parent))] = oct(stat.S_IMODE(p.stat().st_mode))
    return out


@pytest.mark.slow
def test_files_honour_the_umask(corpus: Path, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        data_dir, run_dir = tmp_path / "data", tmp_path / "run"
        argv = ["prepare", str(corpus), "--tokenizer", "chars", "--seq-len", "24", "--out", str(data_dir)]
        assert main(argv) == 0
        assert main(["train", "--run-dir", str(run_dir), *tiny_args(data_dir, "--train.ema=0.9")]) == 0
        assert main(["eval", str(run_dir), "--max-batches", "1"]) == 0
        assert main(["sample", str(run_dir), "--n", "1", "--length", "8"]) == 0
    finally:
        os.umask(old)
    found = modes(data_dir, run_dir)
    for kind in ("chars.json", "meta.json", "config.json", "run.json", "state.json", "model.safetensors", "ema."):
        assert any(kind in name for name in found), kind
    assert any(name.startswith("run/eval/") and name.endswith(".json") for name in found)
    assert any(name.startswith("run/samples/") for name in found)
    wrong = {name: mode for name, mode in found.items() if mode != ("0o755" if (tmp_path / name).is_dir() else "0o644")}
    assert not wrong, wrong


# ----------------------------------------------------------------------------- item 10: early stops, extension


@pytest.mark.slow
def test_a_time_limited_run_says_it_stopped_early_and_resumes(data: Path, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    assert main(["train", "--run-dir", str(run_dir), *tiny_args(data, "--train.time_limit_min=1e-6")]) == 0
    out = capsys.readouterr().out
    hint = f"stopped early at step 1 of 6 (time limit); continue with dlm train --run-dir {run_dir} --resume"
    assert out.count(hint) == 2  # the trainer's note and the CLI's last word
    ((step, path),) = list_checkpoints(run_dir)
    assert step == 1 and json.loads((path / "state.json").read_text())["stopped"] == "time_limit"
    assert main(["train", "--run-dir", str(run_dir), "--resume", "--train.time_limit_min=1000"]) == 0
    assert "stopped early" not in capsys.readouterr().out
    assert [s for s, _ in list_checkpoints(run_dir)][-1] == 6
    assert json.loads((run_dir / "checkpoints" / "step-0000006" / "state.json").read_text())["stopped"] is None


@pytest.mark.slow
def test_extending_a_finished_run_recomputes_the_schedule_and_says_so(run: Path, tmp_path: Path, capsys) -> None:
    run_dir = copy_run(run, tmp_path)
    assert main(["train", "--run-dir", str(run_dir), "--resume", "--train.max_steps=10"]) == 0
    out = capsys.readouterr().out
    cfg = load_config(None, ["--train.max_steps=10", "--train.warmup_steps=2", "--train.lr=3e-3"]).train
    old, new = lr_at(5, cfg, 6), lr_at(6, cfg, 10)
    assert (
        f"the run's length changes from 6 to 10 steps: the cosine LR schedule is recomputed over 10 steps, "
        f"so the LR jumps from {old:.3e} to {new:.3e} at step 7"
    ) in out
    train_lines = [r for r in metric_lines(run_dir) if "split" not in r]
    assert [r["step"] for r in train_lines] == list(range(1, 11))
    assert train_lines[6]["lr"] == new and new > old
    assert json.loads((run_dir / "config.json").read_text())["train"]["max_steps"] == 10


def test_resuming_a_finished_run_says_there_is_nothing_to_train(run: Path, tmp_path: Path, capsys) -> None:
    run_dir = copy_run(run, tmp_path)
    before = list_checkpoints(run_dir)
    capsys.readouterr()
    assert main(["train", "--run-dir", str(run_dir), "--resume"]) == 0
    assert "nothing to train: the run is already at step 6 of 6 (extend it with --train.max_steps N)" in (
        capsys.readouterr().out
    )
    assert list_checkpoints(run_dir) == before


def test_a_run_cannot_be_shortened_below_its_step(run: Path, tmp_path: Path, capsys) -> None:
    run_dir = copy_run(run, tmp_path)
    argv = ["train", "--run-dir", str(run_dir), "--resume", "--train.max_steps=3"]
    assert_refused(capsys, argv, "it is already at step 6 (a run can be extended, not shortened)", run_dir)


# SIGTERM / SIGINT: the CLI in a fresh interpreter; with slow=True 0.1 s per batch (timing only) so the
# parent can signal it mid-run
SLOW_CLI = """
import os, sys, time
if os.environ.get("DLM_TEST_SLOW"):
    from dlm.data.loader import Loader
    _next = Loader.__next__
    def _slow_next(self):
        time.sleep(0.1)
        return _next(self)
    Loader.__next__ = _slow_next
from dlm.cli import main
for argv in " ".join(sys.argv[1:]).split(" --then "):  # several commands in one interpreter
    if rc := main(argv.split()):
        sys.exit(rc)
"""


def run_cli(argv: list[str], slow: bool = True) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "DLM_TEST_SLOW"} | ({"DLM_TEST_SLOW": "1"} if slow else {})
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_CLI, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )


def signal_after_first_step(proc: subprocess.Popen, run_dir: Path, sig: int) -> str:
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 90
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "no step was logged in time"
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    return err.strip()


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_the_resumed_run_is_exact(data: Path, tmp_path: Path) -> None:
    args = tiny_args(data, "--process.name=mdlm", "--model.dropout=0.1", "--train.max_steps=10", "--train.val_every=2")
    stopped, reference = tmp_path / "stopped", tmp_path / "reference"
    err = signal_after_first_step(run_cli(["train", "--run-dir", str(stopped), *args]), stopped, signal.SIGTERM)
    step = list_checkpoints(stopped)[-1][0]
    assert 1 <= step < 10
    assert err == (
        f"dlm: interrupted by SIGTERM at step {step} of 10: checkpoint written; "
        f"continue with dlm train --run-dir {stopped} --resume"
    )
    proc = run_cli(
        ["train", "--run-dir", str(stopped), "--resume", "--then", "train", "--run-dir", str(reference), *args],
        slow=False,
    )
    assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""
    assert metric_lines(stopped) == metric_lines(reference)  # floats compared exactly


@pytest.mark.slow
def test_sigint_checkpoints_and_exits_130(data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(
        ["train", "--run-dir", str(run_dir), *tiny_args(data, "--train.max_steps=50", "--train.val_every=0")]
    )
    err = signal_after_first_step(proc, run_dir, signal.SIGINT)
    step = list_checkpoints(run_dir)[-1][0]
    assert err.startswith(f"dlm: interrupted by SIGINT at step {step} of 50: checkpoint written")
    assert not (run_dir / ".lock").exists()


# ----------------------------------------------------------------------------- item 11: one line, not a traceback


@pytest.mark.slow
@pytest.mark.parametrize("writer", ["save_file", "torch.save"])
def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_temp_dir(
    data: Path, tmp_path: Path, capsys, monkeypatch, writer: str
) -> None:
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if writer == "save_file":
        monkeypatch.setattr("dlm.train.checkpoint.save_file", full)
    else:
        monkeypatch.setattr(torch, "save", full)
    run_dir = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", "--run-dir", str(run_dir), *tiny_args(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"dlm: error: cannot write checkpoint {run_dir / 'checkpoints' / 'step-0000003'}: No space left on device; "
        "the last complete checkpoint is kept"
    )
    assert list((run_dir / "checkpoints").iterdir()) == []
    assert not (run_dir / ".lock").exists()


def test_a_zero_byte_state_file_is_one_line(run: Path, tmp_path: Path, capsys) -> None:
    run_dir = copy_run(run, tmp_path)
    (run_dir / "checkpoints" / "step-0000006" / "state.pt").write_bytes(b"")
    assert_refused(
        capsys, ["train", "--run-dir", str(run_dir), "--resume"], "state.pt is truncated or corrupt", run_dir
    )
    assert load_run(run_dir).step == 6  # evaluation does not need state.pt


def test_prepare_into_an_existing_file_is_one_line(corpus: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "file"
    target.write_text("mine")
    argv = ["prepare", str(corpus), "--tokenizer", "bytes", "--out", str(target)]
    assert_refused(capsys, argv, f"{target} exists and is not a directory", tmp_path)


def test_prepare_removes_temp_dirs_of_killed_prepares(corpus: Path, tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    root = tmp_path / "data"
    stale = root / f".d.tmp-{dead.pid}"
    stale.mkdir(parents=True)
    (stale / "train.bin").write_bytes(b"half")
    alive = root / f".d.tmp-{os.getppid()}"  # a running process's directory is left alone
    alive.mkdir()
    assert main(["prepare", str(corpus), "--tokenizer", "bytes", "--seq-len", "24", "--out", str(root / "d")]) == 0
    assert sorted(p.name for p in root.iterdir()) == [alive.name, "d"]


# ----------------------------------------------------------------------------- item 12: silent coercions


def test_ddp_without_torchrun_is_refused(data: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    parent = tmp_path / "runs"
    parent.mkdir()
    argv = ["train", "--run-dir", str(parent / "r"), *tiny_args(data, "--train.dist=ddp")]
    assert_refused(capsys, argv, "train.dist 'ddp' needs one process per device: launch with torchrun", parent)


def test_resume_with_another_process_says_the_configuration_differs(run: Path, tmp_path: Path, capsys) -> None:
    run_dir = copy_run(run, tmp_path)
    argv = ["train", "--run-dir", str(run_dir), "--resume", "--process.name=mdlm"]
    assert_refused(capsys, argv, "the configuration differs (process.name: 'ar' -> 'mdlm')", run_dir)
    assert math.isfinite(json.loads((run_dir / "checkpoints" / "step-0000006" / "state.json").read_text())["loss"])


def test_a_full_disk_while_preparing_is_one_line_and_leaves_nothing(
    corpus: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    from dlm.data import shards

    def full(self, rows):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shards._RowWriter, "write", full)
    root = tmp_path / "data"
    root.mkdir()
    argv = ["prepare", str(corpus), "--tokenizer", "bytes", "--seq-len", "24", "--out", str(root / "d")]
    assert_refused(capsys, argv, f"cannot write {root / 'd'}: No space left on device", root)


def test_a_run_directory_that_cannot_be_created_is_one_line(data: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    argv = ["train", "--run-dir", str(blocker / "run"), *tiny_args(data)]
    assert_refused(capsys, argv, f"cannot create the run directory {blocker / 'run'}: Not a directory", tmp_path)
