"""Data parallelism: 2 CPU ranks (gloo) with 4 rows each follow the loss curve of 1 process with 8 rows."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dlm.config import RunConfig, load_config
from dlm.data.shards import prepare
from dlm.data.sources import get_source
from tests.helpers import write_corpus
from tests.test_resume import DRIVER


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cfg: RunConfig, run_dir: Path, world_size: int) -> None:
    """torchrun's environment by hand: one process per rank, rendezvous on a free local port."""
    cfg_file = run_dir.parent / f"{run_dir.name}.cfg.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        if world_size == 1:
            for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(key)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", DRIVER, str(cfg_file), str(run_dir), "0"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err


def config(data_dir: Path, batch_size: int, dist: str) -> RunConfig:
    return load_config(
        None,
        [
            f"--data.dir={data_dir}",
            "--model.n_layer=2",
            "--model.d_model=32",
            "--model.n_head=2",
            "--model.context=32",
            "--train.device=cpu",
            f"--train.dist={dist}",
            f"--train.batch_size={batch_size}",
            "--train.max_steps=5",
            "--train.warmup_steps=2",
            "--train.lr=3e-3",
            "--train.ckpt_every=0",
            "--train.val_every=5",
            "--train.val_batches=3",
            "--train.log_every=1",
        ],
    )


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_two_cpu_ranks_match_one_process_with_the_global_batch(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", n_docs=60, seed=2)
    data = prepare(get_source(str(corpus)), "bytes", seq_len=32, out_dir=tmp_path / "data", log=lambda s: None)
    launch(config(data, 8, "none"), tmp_path / "single", 1)
    launch(config(data, 4, "ddp"), tmp_path / "ddp", 2)

    def lines(run: str) -> list[dict]:
        return [json.loads(s) for s in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    single, ddp = lines("single"), lines("ddp")
    assert [r["step"] for r in single] == [r["step"] for r in ddp] == [1, 2, 3, 4, 5, 5]
    for a, b in zip(single, ddp):
        for key in ("loss", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
        if "val_nll" in a:
            # after the last update: Adam's g / sqrt(v) magnifies rounding differences of near-zero gradients
            assert b["val_nll"] == pytest.approx(a["val_nll"], rel=1e-3)
        for key in ("tokens", "lr"):
            if key in a:
                assert a[key] == b[key]
    run = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert run["world_size"] == 2
    assert {p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()} == {"step-0000005"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP2 runs on CUDA devices")
def test_fsdp_single_gpu_trains(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", n_docs=60, seed=2)
    data = prepare(get_source(str(corpus)), "bytes", seq_len=32, out_dir=tmp_path / "data", log=lambda s: None)
    cfg = config(data, 8, "fsdp")
    cfg.train.device = "cuda"
    launch(cfg, tmp_path / "fsdp", 1)
    assert (tmp_path / "fsdp" / "checkpoints" / "step-0000005" / "model.safetensors").exists()


def test_fsdp_on_cpu_is_a_clear_error(tmp_path: Path) -> None:
    from dlm.errors import DlmError
    from dlm.train.runtime import setup_runtime

    cfg = load_config(None, ["--train.device=cpu", "--train.dist=fsdp"])
    with pytest.raises(DlmError, match="fsdp"):
        setup_runtime(cfg.train)
