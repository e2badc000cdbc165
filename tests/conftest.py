"""Test-wide settings (offline, deterministic, CPU) and the shared tiny fixtures.

Session-scoped, so the tests that use them prepare and train once per test session:

- ``tiny_data``: a byte-level data directory (``tests.helpers.write_corpus(n_docs=40, seed=1)``, rows of
  ``TINY_SEQ_LEN`` tokens, wrap mode).
- ``tiny_ar_run`` / ``tiny_mdlm_run``: a finished 20-step run of a 1-layer, d 32 model on ``tiny_data``
  (``tiny_run_args``). Tests must not modify them: copy one (``shutil.copytree``) to change it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_SEQ_LEN = 32


def tiny_run_args(data: Path, process: str, *extra: str) -> list[str]:
    """Overrides for a tiny CPU run: 1 layer, d 32, 2 heads, batch 8, 20 steps, a loss line every step."""
    return [
        f"--data.dir={data}",
        f"--process.name={process}",
        "--model.n_layer=1",
        "--model.d_model=32",
        "--model.n_head=2",
        f"--model.context={TINY_SEQ_LEN}",
        "--train.device=cpu",
        "--train.seed=1234",
        "--train.batch_size=8",
        "--train.max_steps=20",
        "--train.warmup_steps=5",
        "--train.lr=3e-3",
        "--train.val_every=0",
        "--train.ckpt_every=0",
        "--train.log_every=1",
        *extra,
    ]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dlm.data.shards import prepare
    from dlm.data.sources import get_source
    from tests.helpers import write_corpus

    root = tmp_path_factory.mktemp("tiny_data")
    corpus = write_corpus(root / "corpus", n_docs=40, seed=1)
    return prepare(get_source(str(corpus)), "bytes", seq_len=TINY_SEQ_LEN, out_dir=root / "data", log=lambda s: None)


def _tiny_run(data: Path, process: str, root: Path) -> Path:
    import torch

    from dlm.config import load_config
    from dlm.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the golden losses were measured with one thread
    try:
        train(load_config(None, tiny_run_args(data, process)), root / "run")
    finally:
        torch.set_num_threads(threads)
    return root / "run"


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One torch thread for the test (restored after): tiny models are fastest on one thread, and two threads
    spin against other jobs on the shared 2-core machine. Modules use it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_ar_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_run(tiny_data, "ar", tmp_path_factory.mktemp("tiny_ar"))


@pytest.fixture(scope="session")
def tiny_mdlm_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_run(tiny_data, "mdlm", tmp_path_factory.mktemp("tiny_mdlm"))
