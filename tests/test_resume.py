"""Exact resume: a run killed with SIGKILL and resumed from its last checkpoint writes the same
metrics.jsonl, bit for bit (timing fields aside), as the same run left alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dlm.config import RunConfig, load_config
from dlm.data.shards import prepare
from dlm.data.sources import get_source
from dlm.process import available_processes
from tests.helpers import write_corpus

pytestmark = pytest.mark.slow  # training in subprocesses

# Runs train(config.json, run_dir, resume) in a fresh interpreter. DLM_TEST_SLOW=s sleeps s seconds per
# batch (timing only, no effect on the numbers) so the parent can kill it mid-run.
DRIVER = """
import json, os, sys, time
from pathlib import Path
from dlm.config import RunConfig
from dlm.train import train
slow = float(os.environ.get("DLM_TEST_SLOW", "0"))
if slow:
    from dlm.data.loader import Loader
    _next = Loader.__next__
    def _slow_next(self):
        time.sleep(slow)
        return _next(self)
    Loader.__next__ = _slow_next
cfg = RunConfig.from_dict(json.loads(Path(sys.argv[1]).read_text()))
train(cfg, Path(sys.argv[2]), resume=sys.argv[3] == "1")
"""

TIMING = ("tok_s", "mfu", "elapsed")


def start_driver(cfg: RunConfig, run_dir: Path, resume: bool = False, env: dict | None = None) -> subprocess.Popen:
    cfg_file = run_dir.parent / f"{run_dir.name}.cfg.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(cfg_file), str(run_dir), "1" if resume else "0"],
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_driver(cfg: RunConfig, run_dir: Path, resume: bool = False) -> None:
    proc = start_driver(cfg, run_dir, resume)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err


def metric_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in lines]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    corpus = write_corpus(root / "corpus", n_docs=80, seed=1)
    return prepare(get_source(str(corpus)), "bytes", seq_len=32, mode="wrap", out_dir=root / "data", log=lambda s: None)


def tiny_config(data_dir: Path, process: str) -> RunConfig:
    return load_config(
        None,
        [
            f"--data.dir={data_dir}",
            f"--process.name={process}",
            "--model.n_layer=2",
            "--model.d_model=32",
            "--model.n_head=2",
            "--model.context=32",
            "--model.dropout=0.1",  # exercises the torch RNG state
            "--train.device=cpu",
            "--train.seed=7",
            "--train.batch_size=4",
            "--train.grad_accum=2",
            "--train.max_steps=20",
            "--train.warmup_steps=3",
            "--train.lr=3e-3",
            "--train.ema=0.9",
            "--train.ckpt_every=5",
            "--train.val_every=4",
            "--train.val_batches=2",
            "--train.keep_last=2",
            "--train.log_every=1",
        ],
    )


# mdlm (when present) also exercises the process noise generator; ar does not use it.
PROCESSES = [p for p in ("ar", "mdlm") if p in available_processes()]


@pytest.mark.parametrize("process", PROCESSES)
def test_sigkill_and_resume_is_bitwise_identical(data_dir: Path, tmp_path: Path, process: str) -> None:
    cfg = tiny_config(data_dir, process)
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"

    proc = start_driver(cfg, run_dir, env={"DLM_TEST_SLOW": "0.1"})
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 90
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 9):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "the run did not reach step 7 in time"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_before = {r["step"] for r in metric_lines(run_dir)}
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "step-0000005" in ckpts and "step-0000020" not in ckpts, ckpts
    assert max(steps_before) < 20

    run_driver(cfg, run_dir, resume=True)
    run_driver(cfg, ref_dir)

    resumed, reference = metric_lines(run_dir), metric_lines(ref_dir)
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]  # killed lines were dropped
    assert resumed == reference  # floats compared exactly: loss, grad_norm, lr, tokens, val_nll
    assert sum(r.get("split") == "validation" for r in reference) >= 5
