"""The training loop and the run directory, on a tiny byte-level model (CPU)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dlm.config import RunConfig, load_config
from dlm.data.shards import prepare
from dlm.data.sources import get_source
from dlm.errors import DlmError
from dlm.process.ar import ARProcess
from dlm.train import list_checkpoints, load_run, train
from dlm.train.checkpoint import prune_checkpoints
from dlm.train.optim import lr_at
from tests.conftest import TINY_SEQ_LEN, tiny_run_args
from tests.helpers import write_corpus

TRAIN_FIELDS = {"step", "tokens", "loss", "lr", "grad_norm", "tok_s", "mfu", "elapsed", "skipped"}


def patch_ar_loss(monkeypatch: pytest.MonkeyPatch, hook) -> None:
    """Wrap ARProcess.loss for one test: hook(call_number, model, compute) -> loss, where compute() is the
    real loss (one call per step with grad_accum 1)."""
    original = ARProcess.loss
    calls = [0]

    def loss(self, model, batch, generator=None):
        calls[0] += 1
        stats = {}

        def compute():
            value, stats_ = original(self, model, batch, generator)
            stats.update(stats_)
            return value

        return hook(calls[0], model, compute), stats

    monkeypatch.setattr(ARProcess, "loss", loss)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train-data")
    corpus = write_corpus(root / "corpus", n_docs=80, seed=3)
    return prepare(get_source(str(corpus)), "bytes", seq_len=32, out_dir=root / "data", log=lambda s: None)


def tiny(data_dir: Path, *overrides: str) -> RunConfig:
    return load_config(
        None,
        [
            f"--data.dir={data_dir}",
            "--model.n_layer=2",
            "--model.d_model=32",
            "--model.n_head=2",
            "--model.context=32",
            "--train.device=cpu",
            "--train.batch_size=8",
            "--train.max_steps=20",
            "--train.warmup_steps=3",
            "--train.lr=3e-3",
            "--train.ckpt_every=5",
            "--train.val_every=5",
            "--train.val_batches=2",
            "--train.keep_last=2",
            "--train.log_every=1",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def base_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("base") / "run"
    summary = train(tiny(data_dir, "--train.ema=0.9"), run_dir)
    return run_dir, summary


def read_lines(run_dir: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "split" not in r], [r for r in lines if r.get("split") == "validation"]


def snapshot(path: Path) -> dict[str, str] | None:
    if not path.exists():
        return None
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in path.rglob("*") if p.is_file()
    }


@pytest.mark.slow
def test_run_directory_metrics_and_checkpoints(base_run: tuple[Path, dict], data_dir: Path) -> None:
    run_dir, summary = base_run
    assert summary["step"] == 20 and summary["stopped"] == "max_steps" and summary["nonfinite"] == 0

    cfg = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    assert cfg.model.vocab_size == 259  # filled from the data: bytes tokenizer, AR needs no MASK id
    run = json.loads((run_dir / "run.json").read_text())
    assert {"git_commit", "dlm_version", "data_meta"} <= set(run)
    assert run["data_meta"]["tokenizer"]["name"] == "bytes"

    train_lines, val_lines = read_lines(run_dir)
    assert [r["step"] for r in train_lines] == list(range(1, 21))
    assert all(set(r) >= TRAIN_FIELDS for r in train_lines)
    assert all(r["mfu"] is None for r in train_lines)  # CPU: no peak FLOP/s, no MFU
    assert [r["tokens"] for r in train_lines] == [8 * 32 * s for s in range(1, 21)]
    cfg_t = cfg.train
    assert [r["lr"] for r in train_lines] == [lr_at(s, cfg_t, 20) for s in range(20)]
    assert [r["step"] for r in val_lines] == [5, 10, 15, 20]
    for r in val_lines:
        assert r["val_bpt"] == pytest.approx(r["val_nll"] / math.log(2)) and r["ema"] is True

    # a learnable toy corpus: the loss falls well below log(259) = 5.56
    losses = [r["loss"] for r in train_lines]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5

    # keep_last=2 plus the best checkpoint by validation NLL
    best = min(val_lines, key=lambda r: r["val_nll"])["step"]
    steps = [s for s, _ in list_checkpoints(run_dir)]
    assert set(steps) == {15, 20} | {best}
    for _, path in list_checkpoints(run_dir):
        assert {p.name for p in path.iterdir()} == {"model.safetensors", "ema.safetensors", "state.pt", "state.json"}
        state = torch.load(path / "state.pt", weights_only=True)
        assert {"optimizer", "ranks", "loader"} <= set(state)
    info = json.loads((run_dir / "checkpoints" / "step-0000020" / "state.json").read_text())
    assert info["step"] == 20 and info["tokens"] == 20 * 256 and info["nonfinite"] == 0

    loaded = load_run(run_dir, "last")
    assert loaded.step == 20 and loaded.ema and not loaded.model.training
    _, _, _, step, meta = loaded  # the contract's tuple (cfg, model, process, step, data_meta)
    assert step == 20 and meta == run["data_meta"]
    assert loaded.data_meta["seq_len"] == 32 and loaded.process.name == "ar"
    assert load_run(run_dir, "best").step == best
    assert load_run(run_dir, 15, ema=False).ema is False
    with pytest.raises(DlmError, match="no checkpoint at step 3"):
        load_run(run_dir, 3)


@pytest.mark.slow
def test_validation_with_loaded_ema_model_reproduces_logged_val_nll(base_run: tuple[Path, dict]) -> None:
    from dlm.data.loader import Loader
    from dlm.data.shards import open_split
    from dlm.train.loop import validate
    from dlm.train.runtime import Runtime

    run_dir, _ = base_run
    loaded = load_run(run_dir, "last", ema=True)
    split = open_split(loaded.cfg.data.dir, "validation")
    batches = list(Loader(split, 8, shuffle=False, infinite=False))[:2]
    v = validate(loaded.model, loaded.process, batches, Runtime(torch.device("cpu")), loaded.cfg.train.seed)
    _, val_lines = read_lines(run_dir)
    assert v["val_nll"] == val_lines[-1]["val_nll"]


def test_prune_keeps_last_k_and_the_best(tmp_path: Path) -> None:
    for step, nll in [(10, 3.0), (20, 2.0), (30, 2.5), (40, 2.6), (50, None)]:
        d = tmp_path / "checkpoints" / f"step-{step:07d}"
        d.mkdir(parents=True)
        (d / "state.json").write_text(json.dumps({"step": step, "val_nll": nll}))
    prune_checkpoints(tmp_path, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [20, 40, 50]


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_and_counted(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    patch_ar_loss(monkeypatch, lambda call, model, compute: compute() * (float("nan") if call in (3, 7) else 1.0))
    summary = train(tiny(data_dir, "--train.max_steps=10"), tmp_path / "run")
    assert summary["nonfinite"] == 2 and summary["step"] == 10
    train_lines, _ = read_lines(tmp_path / "run")
    bad = [r for r in train_lines if r.get("nonfinite")]
    assert [r["step"] for r in bad] == [3, 7] and all(r["loss"] is None for r in bad)
    assert [r["skipped"] for r in train_lines] == [0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert all(r["loss"] is not None and math.isfinite(r["loss"]) for r in train_lines if not r.get("nonfinite"))
    for _, path in list_checkpoints(tmp_path / "run"):
        assert all(torch.isfinite(t).all() for t in load_file(path / "model.safetensors").values())


@pytest.mark.slow
def test_too_many_nonfinite_steps_stop_with_a_message(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    patch_ar_loss(monkeypatch, lambda call, model, compute: compute() * float("inf"))
    cfg = tiny(data_dir, "--train.max_nonfinite=2")
    with pytest.raises(DlmError, match=r"stopping at step 3: 3 steps had a non-finite .*max_nonfinite=2"):
        train(cfg, tmp_path / "run")
    assert list_checkpoints(tmp_path / "run") == []


@pytest.mark.slow
def test_non_finite_weights_are_never_checkpointed(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    def poison(call: int, model: torch.nn.Module, compute) -> torch.Tensor:
        if call == 4:  # an inf weight from step 4 on: every later step is skipped and the weights stay bad
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("inf")
        return compute()

    patch_ar_loss(monkeypatch, poison)
    cfg = tiny(data_dir, "--train.ckpt_every=3", "--train.max_nonfinite=50")
    with pytest.raises(DlmError, match="weights are not finite at step 6"):
        train(cfg, tmp_path / "run")
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [3]
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp-*"))


@pytest.mark.slow
def test_failed_starts_leave_the_run_directory_untouched(
    base_run: tuple[Path, dict], data_dir: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(base_run[0], run_dir)
    before = snapshot(run_dir)
    cfg = tiny(data_dir, "--train.ema=0.9")
    with pytest.raises(DlmError, match=f"run directory {run_dir} already has a run; use --resume"):
        train(cfg, run_dir)
    with pytest.raises(DlmError, match=r"cannot resume .*train.lr: 0.003 -> 0.001"):
        train(tiny(data_dir, "--train.ema=0.9", "--train.lr=1e-3"), run_dir, resume=True)
    with pytest.raises(DlmError, match=r"configuration differs \(model.context: 32 -> 16\)"):
        train(tiny(data_dir, "--train.ema=0.9", "--model.context=16"), run_dir, resume=True)
    corpus = write_corpus(tmp_path / "corpus2", n_docs=40, seed=9)
    other_data = prepare(get_source(str(corpus)), "bytes", seq_len=32, out_dir=tmp_path / "data2", log=lambda s: None)
    with pytest.raises(DlmError, match="holds different data than the run was trained on"):
        train(tiny(other_data, "--train.ema=0.9"), run_dir, resume=True)
    assert snapshot(run_dir) == before
    last = run_dir / "checkpoints" / "step-0000020" / "model.safetensors"
    last.write_bytes(last.read_bytes()[:1000])  # truncated
    before = snapshot(run_dir)
    with pytest.raises(DlmError, match="truncated or corrupt"):
        train(cfg, run_dir, resume=True)
    assert snapshot(run_dir) == before

    fresh = tmp_path / "fresh"
    with pytest.raises(DlmError, match=r"model.context 16 is shorter than the data rows \(32\)"):
        train(tiny(data_dir, "--model.context=16"), fresh)
    with pytest.raises(DlmError, match="no meta.json"):
        train(tiny(tmp_path / "nowhere"), fresh)
    with pytest.raises(DlmError, match="data.dir is not set"):
        train(tiny(data_dir, "--data.dir="), fresh)
    assert not fresh.exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(DlmError, match="is not empty"):
        train(tiny(data_dir), other)
    assert snapshot(other) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}


def test_load_run_errors(base_run: tuple[Path, dict], tmp_path: Path) -> None:
    with pytest.raises(DlmError, match="is not a run directory"):
        load_run(tmp_path)
    run_dir = tmp_path / "run"
    shutil.copytree(base_run[0], run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["model"]["vocab_size"] = 300
    (run_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DlmError, match=r"does not match the model config: .* \(259, 32\)"):
        load_run(run_dir)
    cfg["model"]["vocab_size"] = 259
    (run_dir / "config.json").write_text(json.dumps(cfg))
    weights = run_dir / "checkpoints" / "step-0000020" / "ema.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(DlmError, match="ema.safetensors is truncated or corrupt"):
        load_run(run_dir)
    (weights.parent / "model.safetensors").unlink()
    with pytest.raises(DlmError, match="checkpoint file missing: .*model.safetensors"):
        load_run(run_dir, ema=False)
    shutil.rmtree(run_dir / "checkpoints")
    with pytest.raises(DlmError, match="has no checkpoints"):
        load_run(run_dir)


@pytest.mark.slow
def test_time_limit_stops_with_a_checkpoint_and_resume_finishes(data_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    summary = train(tiny(data_dir, "--train.time_limit_min=1e-6", "--train.max_steps=6"), run_dir)
    assert summary["stopped"] == "time_limit" and summary["step"] == 1
    assert [s for s, _ in list_checkpoints(run_dir)] == [1]
    summary = train(tiny(data_dir, "--train.max_steps=6"), run_dir, resume=True)
    assert summary["step"] == 6 and summary["stopped"] == "max_steps"
    train_lines, _ = read_lines(run_dir)
    assert [r["step"] for r in train_lines] == list(range(1, 7))
    assert train(tiny(data_dir, "--train.max_steps=6"), run_dir, resume=True)["stopped"] == "already_done"


@pytest.mark.slow
def test_token_budget_bf16_on_cpu_and_optional_loggers(data_dir: Path, tmp_path: Path, capsys) -> None:
    cfg = tiny(
        data_dir,
        "--train.max_steps=0",
        "--train.max_tokens=700",
        "--train.precision=bf16",
        "--train.tensorboard",
        "--train.wandb",
    )
    summary = train(cfg, tmp_path / "run")
    assert summary["step"] == 3 and summary["tokens"] == 3 * 256 and summary["stopped"] == "max_tokens"
    assert math.isfinite(summary["loss"]) and math.isfinite(summary["val_nll"])
    out = capsys.readouterr().out
    for name in ("tensorboard", "wandb"):
        if importlib.util.find_spec(name) is not None:
            assert (tmp_path / "run" / name).is_dir()
        else:
            assert f"train.{name}: {name} is not installed" in out


@pytest.mark.slow
def test_context_0_is_the_data_row_length_and_a_resume_keeps_the_run_s(tiny_data: Path, tmp_path: Path) -> None:
    def run_context(run: Path) -> int:
        return json.loads((run / "config.json").read_text())["model"]["context"]

    fresh = tmp_path / "fresh"
    args = ("--model.context=0", "--train.max_steps=2", "--train.val_batches=1")
    train(load_config(None, tiny_run_args(tiny_data, "ar", *args)), fresh)
    assert run_context(fresh) == TINY_SEQ_LEN
    # a run given a longer context resumes with it when the resumption says 0 ("from the data")
    longer = tmp_path / "longer"
    train(load_config(None, tiny_run_args(tiny_data, "ar", *args, f"--model.context={TINY_SEQ_LEN + 8}")), longer)
    summary = train(load_config(None, tiny_run_args(tiny_data, "ar", *args, "--train.max_steps=3")), longer, True)
    assert summary["step"] == 3 and run_context(longer) == TINY_SEQ_LEN + 8


@pytest.mark.parametrize(("family", "copies"), [("ar", 1), ("mdlm", 1), ("bd3lm", 2)])
def test_mfu_counts_the_training_forward_of_each_family(tiny_data: Path, tmp_path: Path, monkeypatch, family, copies):
    """MFU = tok/s x FLOPs per data token / peak. Per data token, with N = n_layer (4 d^2 + 3 d h) (swiglu) and a
    training forward over c L input tokens (c = 1; BD3-LM's z_t ⊕ x: c = 2, the head on the L data rows only):

        train = 3 (c (2 N + 4 n_layer (c L) d) + 2 d V)

    (attention over all c L keys, masking not discounted). A fake peak makes the CPU log an MFU."""
    monkeypatch.setattr("dlm.train.setup.peak_flops", lambda device: 1e12)
    cfg = load_config(None, tiny_run_args(tiny_data, family, "--train.max_steps=2"))
    train(cfg, tmp_path / "run")
    m = RunConfig.from_dict(json.loads((tmp_path / "run" / "config.json").read_text())).model
    d, h, n, L, V = m.d_model, m.mlp_hidden, m.n_layer, TINY_SEQ_LEN, m.vocab_size
    by_hand = 3 * (copies * (2 * n * (4 * d * d + 3 * d * h) + 4 * n * copies * L * d) + 2 * d * V)
    lines = [r for r in read_lines(tmp_path / "run")[0] if r.get("tok_s")]
    assert lines and all(r["mfu"] * 1e12 / r["tok_s"] == pytest.approx(by_hand, rel=1e-9) for r in lines)
