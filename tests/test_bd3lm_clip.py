"""BD3-LM's data-driven clipped schedule (paper §5.3): process.clip_search, ``dlm.train.loop.clip_search``."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest
import torch

from dlm.config import config_hash, load_config
from dlm.data.loader import Loader
from dlm.errors import DlmError
from dlm.model import build_model
from dlm.process.bd3lm import BD3LMProcess, check_clip_grid
from dlm.train import loop as train_loop
from dlm.train import train
from dlm.train.checkpoint import list_checkpoints, read_state, read_weights
from dlm.train.runtime import derive_seed, setup_runtime
from dlm.train.setup import resolve_data
from tests.conftest import tiny_run_args

GRID = "0,0.5,0.3,0.8,0.5,1"  # table 2's clipped windows, without U[0, 1] (the window before the first search)
WINDOWS = [(0.0, 0.5), (0.3, 0.8), (0.5, 1.0)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _args(data: Path, *extra: str) -> list[str]:
    return tiny_run_args(data, "bd3lm", "--train.val_batches=2", *extra)


def _metrics(run: Path, split: str | None = None) -> list[dict]:
    rows = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if split is None or r.get("split") == split]


# ------------------------------------------------------------------------------------------------- grid


def test_grid_parses_pairs_and_refuses_bad_ones() -> None:
    assert check_clip_grid("") == [] and check_clip_grid(" ") == []
    assert check_clip_grid(GRID) == WINDOWS == check_clip_grid("[0 0.5, 0.3 0.8, 0.5 1]")
    for bad, says in [
        ("0,0.5", "at least two windows"),
        ("0,0.5,0.3", "got 3 number(s)"),
        ("0,0.5,0.6,0.6", "window [0.6, 0.6]"),
        ("0,0.5,0.3,1.2", "window [0.3, 1.2]"),
        ("-0.1,0.5,0.3,0.8", "window [-0.1, 0.5]"),
        ("0,0.5,0,0.5", "lists a window twice"),
        ("0,0.5,a,0.8", "must hold numbers"),
        ((0.0, 0.5, 0.3, 0.8), "must be a string"),
    ]:
        with pytest.raises(DlmError) as e:
            check_clip_grid(bad)
        assert says in str(e.value) and "\n" not in str(e.value)


def test_the_option_is_hashed_only_when_set() -> None:
    plain = load_config(None, ["--process.name", "bd3lm"])
    assert plain.process.clip_search == ""
    assert config_hash(plain) == config_hash(load_config(None, ["--process.name", "bd3lm", "--process.clip_search="]))
    searched = load_config(None, ["--process.name", "bd3lm", "--process.clip_search", GRID])
    assert config_hash(plain) != config_hash(searched)
    mdlm = load_config(None, ["--process.name", "mdlm"])  # a family without the field: it does not count
    with_grid = load_config(None, ["--process.name", "mdlm", "--process.clip_search", GRID])
    assert config_hash(mdlm) == config_hash(with_grid)


# ----------------------------------------------------------------------------------------------- search


def test_search_variances_equal_a_direct_computation(tiny_data: Path, monkeypatch) -> None:
    import dlm.process.bd3lm as bd3lm_module

    draws = []  # (window, the uniforms u in [0, 1) behind each batch's block times)
    sample_times = bd3lm_module.sample_times

    def recording_sample_times(n, generator, antithetic, device, t_min=0.0, t_max=1.0):
        out = sample_times(n, generator, antithetic=antithetic, device=device, t_min=t_min, t_max=t_max)
        draws.append(((t_min, t_max), (out - t_min) / (t_max - t_min)))
        return out

    monkeypatch.setattr(bd3lm_module, "sample_times", recording_sample_times)
    cfg = load_config(None, _args(tiny_data)).validate()
    _, val_split, process = resolve_data(cfg)
    assert isinstance(process, BD3LMProcess)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    batches = list(Loader(val_split, 4, seed=0, shuffle=False, infinite=False))[:4]
    assert len(batches) == 4
    rt = setup_runtime(cfg.train)
    table = train_loop.clip_search(process, model, batches, WINDOWS, rt, seed=11)
    assert process.clip_window == (0.0, 1.0) and model.training  # left as it was
    # common random numbers: batch m draws the same uniforms under every window, mapped into it
    assert [w for w, _ in draws] == [w for w in WINDOWS for _ in batches]
    for m in range(len(batches)):
        u = [draws[k * len(batches) + m][1] for k in range(len(WINDOWS))]
        assert all(torch.allclose(u[0], other, rtol=0, atol=1e-12) for other in u[1:])
    assert not torch.allclose(draws[0][1], draws[1][1])  # and different ones for different batches
    monkeypatch.undo()

    model.eval()
    direct = {}
    for window in WINDOWS:  # L_m by hand: the training loss under the window, batch m seeded by (seed, m)
        process.clip_window = window
        losses = []
        for m, batch in enumerate(batches):
            gen = torch.Generator().manual_seed(derive_seed(11, "clip_search", m))
            with torch.no_grad():
                losses.append(float(process.loss(model, batch, generator=gen)[0]))
        direct[window] = statistics.variance(losses)
    assert table.keys() == direct.keys()
    for window in WINDOWS:
        assert table[window] == pytest.approx(direct[window], rel=1e-9, abs=0.0)
    assert len({round(v, 12) for v in table.values()}) == 3  # the windows really differ
    assert train_loop.pick_window(table) == min(direct, key=direct.__getitem__)


def test_training_follows_the_window_of_least_variance(tiny_data: Path, tmp_path: Path, monkeypatch) -> None:
    """A hand-made variance table per validation: each picks its minimum, the next steps train on it, one
    metrics line records it, and the checkpoint carries it."""
    tables = iter(
        [
            {(0.0, 0.5): 3.0, (0.3, 0.8): 1.0, (0.5, 1.0): 2.0},  # step 2: [0.3, 0.8]
            {(0.0, 0.5): 0.5, (0.3, 0.8): 1.0, (0.5, 1.0): 2.0},  # step 4: [0, 0.5]
        ]
    )
    calls = []

    def fake_search(process, model, batches, windows, rt, seed):
        calls.append((len(batches), windows))
        return next(tables)

    used = []  # the window of every training draw (clipped=True), in order
    draw = BD3LMProcess.draw

    def recording_draw(self, batch, generator, clipped):
        if clipped:
            used.append(self.clip_window)
        return draw(self, batch, generator, clipped)

    monkeypatch.setattr(train_loop, "clip_search", fake_search)
    monkeypatch.setattr(BD3LMProcess, "draw", recording_draw)
    run = tmp_path / "run"
    extra = ["--train.max_steps=4", "--train.val_every=2", "--train.ckpt_every=4", "--process.clip_search", GRID]
    train(load_config(None, _args(tiny_data, *extra)), run)

    assert calls == [(2, WINDOWS), (2, WINDOWS)]
    assert used == [(0.0, 1.0)] * 2 + [(0.3, 0.8)] * 2
    lines = _metrics(run, "clip_search")
    assert lines == [
        {"step": 2, "split": "clip_search", "windows": [[0.0, 0.5, 3.0], [0.3, 0.8, 1.0], [0.5, 1.0, 2.0]],
         "chosen": [0.3, 0.8]},
        {"step": 4, "split": "clip_search", "windows": [[0.0, 0.5, 0.5], [0.3, 0.8, 1.0], [0.5, 1.0, 2.0]],
         "chosen": [0.0, 0.5]},
    ]  # fmt: skip
    assert read_state(list_checkpoints(run)[-1][1])["clip_window"] == [0.0, 0.5]


def test_off_by_default_nothing_searched_or_stored(tiny_data: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(train_loop, "clip_search", lambda *a: pytest.fail("searched without clip_search"))
    run = tmp_path / "run"
    train(load_config(None, _args(tiny_data, "--train.max_steps=2", "--train.val_every=1")), run)
    assert _metrics(run, "clip_search") == []
    assert "clip_window" not in read_state(list_checkpoints(run)[-1][1])


def test_resumed_run_equals_the_uninterrupted_one(tiny_data: Path, tmp_path: Path) -> None:
    """8 steps with a search every 2 vs the same run resumed from its step-4 checkpoint: the same weights, bit for
    bit, and the same metrics. The grid lacks the starting window [0, 1], so a resumption that forgot the
    searched window would train steps 5..8 on another objective."""
    extra = ["--train.max_steps=8", "--train.val_every=2", "--train.ckpt_every=4", "--train.keep_last=5"]
    cfg = load_config(None, _args(tiny_data, *extra, "--process.clip_search", GRID))
    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    train(cfg, ref)
    shutil.copytree(ref, resumed)
    shutil.rmtree(dict(list_checkpoints(resumed))[8])
    assert read_state(dict(list_checkpoints(resumed))[4])["clip_window"] != [0.0, 1.0]
    train(cfg, resumed, resume=True)

    last_ref, last_res = dict(list_checkpoints(ref))[8], dict(list_checkpoints(resumed))[8]
    w_ref, w_res = read_weights(last_ref / "model.safetensors"), read_weights(last_res / "model.safetensors")
    assert w_ref.keys() == w_res.keys() and all(torch.equal(w_ref[k], w_res[k]) for k in w_ref)

    def numbers(run: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in ("tok_s", "mfu", "elapsed")} for r in _metrics(run)]

    assert numbers(resumed) == numbers(ref)
    assert [r["step"] for r in _metrics(ref, "clip_search")] == [2, 4, 6, 8]


# ------------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--process.clip_search", "0,0.5,0.4"], "process.clip_search takes pairs"),
        (["--process.clip_search", "0,0.5,0.8,0.3"], "window [0.8, 0.3]"),
        (["--process.clip_search", GRID, "--train.val_batches=1"], "at least 2 validation batches"),
        (["--process.clip_search", GRID, "--process.name=mdlm"], "the mdlm process has no clipped training window"),
    ],
)
def test_bad_input_refused_before_the_run_directory(tiny_data: Path, tmp_path: Path, capsys, extra, says) -> None:
    from dlm.cli import main

    run = tmp_path / "bad"
    assert main(["train", "--run-dir", str(run), *_args(tiny_data, "--train.max_steps=2", *extra)]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1, err
    assert not run.exists()
