"""Variance tooling (dlm.eval.variance, ``dlm variance``): every figure against a direct computation or an identity."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest
import torch

import dlm.process  # noqa: F401  (registers every family)
from dlm.cli import main
from dlm.data.batch import Batch
from dlm.data.specials import SpecialIds
from dlm.errors import DlmError
from dlm.eval.variance import (
    DEFINITIONS,
    VectorMoments,
    batch_elbo_variance,
    gradient_variance,
    likelihood_variance,
    pick_window,
    variance_run,
)
from dlm.model import ModelConfig, build_model
from dlm.process import Process, ProcessConfig, available_processes, get_process
from dlm.process.base import scored_positions
from tests.helpers import assert_refused

K, L = 11, 8
SPECIALS = SpecialIds(bos=0, eos=1, pad=2, mask=K, vocab_size=K)
FAMILIES = [
    ProcessConfig(name="ar"),
    ProcessConfig(name="mdlm"),
    ProcessConfig(name="d3pm", T=8),
    ProcessConfig(name="sedd"),
    ProcessConfig(name="sedd", transition="uniform"),
    ProcessConfig(name="bd3lm", block_size=4),
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _model(proc: Process, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=proc.vocab_size, context=L, n_layer=1, d_model=16, n_head=2, time_cond=proc.time_conditioned
    )
    return build_model(cfg)


def _batches(m: int = 3, b: int = 4) -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(m):
        ids = torch.randint(3, K, (b, L), generator=g)
        ids[:, 0] = SPECIALS.bos
        mask = torch.ones(b, L, dtype=torch.bool)
        mask[1, 5 - i :] = False  # a padded row (different scored counts per batch)
        ids[1, 5 - i :] = SPECIALS.pad
        out.append(Batch(ids, mask))
    return out


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ likelihood


def test_exact_likelihood_has_zero_variance_and_the_exact_nll():
    proc = get_process(ProcessConfig(name="ar"), SPECIALS)
    model, data = _model(proc), _batches()
    out = likelihood_variance(proc, model, data, t_samples=5, generator=_gen(0))
    assert out["likelihood"] == "exact" and out["t_samples"] == 1
    assert out["seq_var"] == 0.0 and out["seq_var_per_token"] == 0.0 and out["batch_elbo_var_t"] == 0.0
    with torch.no_grad():
        res = [proc.nll(model, b) for b in data]
    nats = torch.cat([r.nats_B for r in res])
    toks = torch.cat([r.tokens_B for r in res])
    assert out["nll_per_token"] == pytest.approx(float(nats.sum() / toks.sum()), rel=1e-12)
    per_batch = [float(r.nats_B.sum() / r.tokens_B.sum()) for r in res]  # the variance over batches alone
    assert out["batch_elbo_var"] == pytest.approx(statistics.variance(per_batch), rel=1e-9)
    assert out["batch_elbo_var"] > 0
    again = [proc.nll(model, b).nats_B for b in data]  # the claim behind "0 by definition": nll is deterministic
    assert all(torch.equal(r.nats_B, a) for r, a in zip(res, again, strict=True))


def test_bound_variance_equals_a_direct_computation():
    proc = get_process(ProcessConfig(name="mdlm", eval_t_samples=4), SPECIALS)
    model, data, Kt = _model(proc), _batches(), 5
    out = likelihood_variance(proc, model, data, t_samples=Kt, generator=_gen(3))
    single, g = get_process(ProcessConfig(name="mdlm", eval_t_samples=1), SPECIALS), _gen(3)
    rows, toks, batch_means = [], [], []
    with torch.no_grad():
        for b in data:
            draws = torch.stack([single.nll(model, b, generator=g).nats_B for _ in range(Kt)])  # [K, B]
            t = scored_positions(b).sum(1)
            rows.append(draws)
            toks.append(t)
            batch_means += [float(d.sum() / t.sum()) for d in draws]
    a_KS, t_S = torch.cat(rows, 1), torch.cat(toks).double()
    var_S = torch.tensor([statistics.variance(a_KS[:, s].tolist()) for s in range(a_KS.shape[1])], dtype=torch.float64)
    assert out["t_samples"] == Kt and out["sequences"] == a_KS.shape[1]
    assert out["seq_var"] == pytest.approx(float(var_S.mean()), rel=1e-9)
    assert out["seq_var_per_token"] == pytest.approx(float((var_S / t_S**2).mean()), rel=1e-9)
    assert out["seq_var"] > 0  # a one-time-sample bound is random
    assert out["nll_per_token"] == pytest.approx(float(a_KS.mean(0).sum() / t_S.sum()), rel=1e-12)
    assert out["batch_elbo_var"] == pytest.approx(statistics.variance(batch_means), rel=1e-9)
    per_batch_t = [statistics.variance(batch_means[i * Kt : (i + 1) * Kt]) for i in range(len(data))]
    assert out["batch_elbo_var_t"] == pytest.approx(statistics.mean(per_batch_t), rel=1e-9)


def test_a_bound_needs_two_time_samples():
    proc = get_process(ProcessConfig(name="mdlm"), SPECIALS)
    with pytest.raises(DlmError, match="t_samples"):
        likelihood_variance(proc, _model(proc), _batches(), t_samples=1, generator=None)


# -------------------------------------------------------------------------------------------- gradient


def test_vector_moments_match_the_definition_and_survive_a_large_mean():
    g = torch.Generator().manual_seed(0)
    d_MP = torch.randn(6, 50, dtype=torch.float64, generator=g)
    exact = float(((d_MP - d_MP.mean(0)) ** 2).sum()) / 5
    mom = VectorMoments()
    for d in d_MP:
        mom.add(d)
    assert mom.variance() == pytest.approx(exact, rel=1e-12)
    assert mom.mean_sq_norm() == pytest.approx(float(d_MP.mean(0) @ d_MP.mean(0)), rel=1e-12)
    shifted = VectorMoments()  # g_m = c + d_m with |c| = 1e8 |d|: the variance is unchanged by the shift
    for d in d_MP:
        shifted.add(1e8 + d)
    assert shifted.variance() == pytest.approx(exact, rel=1e-6)
    naive = (float((1e8 + d_MP).pow(2).sum()) - 6 * float((1e8 + d_MP.mean(0)).pow(2).sum())) / 5
    assert abs(naive - exact) > 1e-3 * exact  # the textbook form would have lost it


@pytest.mark.parametrize("cfg", FAMILIES, ids=lambda c: f"{c.name}-{c.transition}")
def test_gradient_variance_is_eq9_computed_directly(cfg):
    proc = get_process(cfg, SPECIALS)
    model, data = _model(proc), _batches(m=4)
    out = gradient_variance(proc, model, data, generator=_gen(7))
    params = [p for p in model.parameters() if p.requires_grad]
    g, grads = _gen(7), []
    for b in data:  # store every g_m
        loss, _ = proc.loss(model, b, generator=g)
        gs = torch.autograd.grad(loss, params, allow_unused=True)
        grads.append(
            torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1).double() for p, x in zip(params, gs)])
        )
    G_MP = torch.stack(grads)
    gbar = G_MP.mean(0)
    direct = float(sum(float((gm - gbar) @ (gm - gbar)) for gm in G_MP)) / (len(data) - 1)
    assert out["grad_var"] == pytest.approx(direct, rel=1e-9)
    assert out["grad_mean_sq_norm"] == pytest.approx(float(gbar @ gbar), rel=1e-9)
    assert out["grad_noise_ratio"] == pytest.approx(direct / float(gbar @ gbar), rel=1e-9)
    assert out["grad_params"] == sum(p.numel() for p in params) and out["grad_var"] > 0
    assert all(p.grad is None for p in params)  # the model's .grad is left alone


def test_every_family_gives_finite_likelihood_figures():
    assert {cfg.name for cfg in FAMILIES} == set(available_processes())  # a new family joins these checks
    for cfg in FAMILIES:
        proc = get_process(cfg, SPECIALS)
        out = likelihood_variance(proc, _model(proc), _batches(m=2), t_samples=2, generator=_gen(0))
        assert all(v is None or v == v for v in out.values() if isinstance(v, float)), cfg
        assert (out["seq_var"] == 0) == proc.exact_likelihood, cfg


# ------------------------------------------------------------------------------- clipped-schedule search


def test_batch_elbo_variance_is_the_sample_variance():
    xs = [3.1, 2.7, 3.9, 3.3, 2.2]
    assert batch_elbo_variance(xs) == pytest.approx(statistics.variance(xs), rel=1e-12)
    assert batch_elbo_variance([1e9 + x for x in xs]) == pytest.approx(statistics.variance(xs), rel=1e-6)
    for bad in ([], [1.0], [1.0, float("nan")]):
        with pytest.raises(DlmError):
            batch_elbo_variance(bad)


def test_pick_window_finds_the_minimum_with_its_tie_rule():
    table = {(0.0, 0.5): 7.90, (0.3, 0.8): 3.62, (0.5, 1.0): 3.63, (0.0, 1.0): 7.39}  # table 2, L' = 16
    assert pick_window(table) == (0.3, 0.8)
    assert pick_window({**table, (0.2, 0.4): 1.0}) == (0.2, 0.4)
    tie = {(0.3, 0.8): 2.0, (0.1, 0.9): 2.0, (0.5, 1.0): 2.0, (0.2, 0.6): 5.0}
    assert pick_window(tie) == (0.1, 0.9)  # equal variances: the widest window
    assert pick_window({(0.5, 1.0): 2.0, (0.0, 0.5): 2.0}) == (0.0, 0.5)  # equally wide: the smallest beta


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ({}, "no windows"),
        ({(0.5, 0.5): 1.0}, "beta < omega"),
        ({(0.6, 0.4): 1.0}, "beta < omega"),
        ({(-0.1, 0.5): 1.0}, "beta < omega"),
        ({(0.2, 1.5): 1.0}, "beta < omega"),
        ({(0.2, 0.5): float("nan")}, "finite"),
        ({(0.2, 0.5): -1.0}, "finite"),
    ],
)
def test_pick_window_refuses_bad_tables(table, match):
    with pytest.raises(DlmError, match=match) as exc:
        pick_window(table)
    assert "\n" not in str(exc.value)


# ------------------------------------------------------------------------------------------------ a run


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def test_variance_run_writes_reuses_and_forces(tiny_mdlm_run, tmp_path):
    run = _copy(tiny_mdlm_run, tmp_path)
    logs: list[str] = []
    record, path = variance_run(run, batches=2, split=None, t_samples=3, seed=0, log=logs.append)
    assert path.parent == run / "eval" and path.name.startswith("variance-test-step20-")
    assert json.loads(path.read_text()) == record
    assert set(record) - {"definitions"} == set(record["definitions"]) and set(record["definitions"]) <= set(
        DEFINITIONS
    )
    assert record["likelihood"] == "upper bound (NELBO)" and record["t_samples"] == 3 and record["batches"] == 2
    assert record["seq_var"] > 0 and record["grad_var"] > 0
    again, path2 = variance_run(run, batches=2, split=None, t_samples=3, seed=0, log=logs.append)
    assert path2 == path and again == record and logs and "reused" in logs[0]
    forced, _ = variance_run(run, batches=2, split=None, t_samples=3, seed=0, force=True)
    assert forced["created"] >= record["created"] and forced["seq_var"] == record["seq_var"]  # same seed, same draws
    other, path3 = variance_run(run, batches=2, split=None, t_samples=3, seed=1)
    assert path3 != path and other["seq_var"] != record["seq_var"]


def test_dlm_variance_on_an_ar_run(tiny_ar_run, tmp_path, capsys):
    run = _copy(tiny_ar_run, tmp_path)
    assert (
        main(["variance", str(run), "--batches", "2", "--t-samples", "1", "--split", "validation", "--batch-size", "4"])
        == 0
    )
    out = capsys.readouterr().out
    assert "ar (exact)" in out and "per-sequence estimator variance:         0 nats^2" in out
    path = Path(out.strip().splitlines()[-1].split("result file: ")[1])
    record = json.loads(path.read_text())
    assert record["seq_var"] == 0.0 and record["t_samples"] == 1 and record["split"] == "validation"
    assert record["batch_size"] == 4 and record["sequences"] == 8
    assert record["grad_var"] > 0 and record["batch_elbo_var"] > 0


def test_dlm_variance_refuses_bad_input(tiny_mdlm_run, tmp_path, capsys):
    run = _copy(tiny_mdlm_run, tmp_path)
    assert_refused(capsys, ["variance", str(run), "--batches", "1"], "--batches must be an integer >= 2", run)
    assert_refused(capsys, ["variance", str(run), "--t-samples", "1"], "the mdlm bound", run)
    assert_refused(capsys, ["variance", str(run), "--batch-size", "0"], "--batch-size must be an integer >= 1", run)
    assert_refused(capsys, ["variance", str(run), "--split", "nope"], "no split 'nope'", run)
    assert_refused(capsys, ["variance", str(run), "--batches", "100000"], "fewer than 100000", run)


def test_variance_run_on_a_sedd_run(tiny_data, tmp_path):
    from dlm.config import load_config
    from dlm.train import train
    from tests.conftest import tiny_run_args

    args = [a for a in tiny_run_args(tiny_data, "sedd") if not a.startswith("--train.max_steps")]
    train(load_config(None, [*args, "--train.max_steps=2", "--train.warmup_steps=1"]), tmp_path / "run")
    record, path = variance_run(tmp_path / "run", batches=2, split="validation", t_samples=2, seed=0)
    assert record["family"] == "sedd" and record["likelihood"] == "upper bound (NELBO)" and path.exists()
    assert record["seq_var"] > 0 and record["grad_var"] > 0 and record["batch_elbo_var"] > 0


def test_a_searched_bd3lm_run_is_loaded_and_measured_with_its_searched_window(
    tiny_data, tiny_mdlm_run, tmp_path, monkeypatch, capsys
):
    """The trainer checkpoints the window the clip search picked; load_run gives the process that window (and
    says which search picked it), and dlm variance uses it for the gradient figures and states it in its JSON.
    Hand-made search tables (step 2 picks [0.3, 0.8], step 4 [0.5, 1]); the configured window is [0, 1]."""
    from dataclasses import replace

    from dlm.config import load_config
    from dlm.data.loader import Loader
    from dlm.data.shards import open_split
    from dlm.rundir import load_run
    from dlm.train import loop as train_loop
    from dlm.train import train
    from tests.conftest import tiny_run_args

    tables = iter(
        [{(0.0, 0.5): 3.0, (0.3, 0.8): 1.0, (0.5, 1.0): 2.0}, {(0.0, 0.5): 3.0, (0.3, 0.8): 2.0, (0.5, 1.0): 1.0}]
    )
    monkeypatch.setattr(train_loop, "clip_search", lambda *a: next(tables))
    extra = ["--train.max_steps=4", "--train.val_every=2", "--train.ckpt_every=2", "--train.keep_last=4"]
    args = tiny_run_args(
        tiny_data, "bd3lm", *extra, "--train.val_batches=2", "--process.clip_search=0,0.5,0.3,0.8,0.5,1"
    )
    run = tmp_path / "run"
    train(load_config(None, args), run)

    got = {w: (load_run(run, which=w).process.clip_window, load_run(run, which=w).clip_window_source) for w in (2, 4)}
    assert got == {2: ((0.3, 0.8), "search at step 2"), 4: ((0.5, 1.0), "search at step 4")}
    plain = tmp_path / "plain"  # no search: the configured window
    train(load_config(None, tiny_run_args(tiny_data, "bd3lm", "--train.max_steps=1", "--train.ckpt_every=1")), plain)
    assert (load_run(plain).process.clip_window, load_run(plain).clip_window_source) == ((0.0, 1.0), "config")
    assert load_run(tiny_mdlm_run).clip_window_source is None  # a family without a clipped window

    argv = ["variance", str(run), "--batches", "2", "--t-samples", "2", "--split", "validation", "--batch-size", "4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "training window of the gradients:        U[0.5, 1] (search at step 4)" in out
    record = json.loads(Path(out.strip().splitlines()[-1].split("result file: ")[1]).read_text())
    assert record["clip_window"] == [0.5, 1.0] and record["clip_window_source"] == "search at step 4"
    assert record["settings"]["clip_window"] == [0.5, 1.0]
    # the gradient figures are those of the searched window's loss, not the configured one's
    loaded = load_run(run)
    rows = Loader(open_split(Path(loaded.cfg.data.dir), "validation"), 4, seed=0, shuffle=False, infinite=False)
    batches = [b for _, b in zip(range(2), rows, strict=False)]
    for window, same in (((0.5, 1.0), True), ((0.0, 1.0), False)):
        proc = get_process(
            replace(loaded.process.cfg, clip_beta=window[0], clip_omega=window[1]), loaded.process.specials
        )
        direct = gradient_variance(proc, loaded.model, batches, generator=torch.Generator().manual_seed(1))
        assert (direct["grad_var"] == pytest.approx(record["grad_var"], rel=1e-9)) is same
