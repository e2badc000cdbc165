"""Variance of the likelihood estimator and of the training gradient, for every family (BD3-LM paper §4-5).

Three figures, each defined where it is computed and again in the ``definitions`` of the JSON
``RUN/eval/variance-{split}-step{N}-{hash}.json`` that :func:`variance_run` writes:

- :func:`likelihood_variance`: per sequence x, K independent single-time-sample estimates of its bound
  (nats); their sample variance, averaged over sequences (0 for an exact likelihood: AR), and the variance of
  the per-batch estimate (nats per token) over batches and time draws.
- :func:`gradient_variance`: the paper's eq. 9, (1/(M-1)) sum_m ||g_m - g_bar||^2 over M batches, with
  g_m the gradient of the training loss (``Process.loss``) on batch m.
- :func:`batch_elbo_variance` and :func:`pick_window`: the clipped-schedule search primitive (paper §5.3,
  table 2): the window [beta, omega] of mask rates whose per-batch ELBO estimates have the smallest variance.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dlm.data.batch import Batch
from dlm.data.loader import Loader
from dlm.data.shards import open_split
from dlm.errors import DlmError
from dlm.eval.results import check_device, check_writable, result_path, reuse
from dlm.eval.run import check_tokenizer
from dlm.io import write_json_atomic
from dlm.process.base import Process, get_process, model_device
from dlm.rundir import LoadedRun, load_run

#: Version of the variance protocol, part of every result's settings (bump it when old files become incomparable).
VARIANCE_PROTOCOL = 1

#: The meaning of every figure of a variance record (written into it).
DEFINITIONS: dict[str, str] = {
    "metric": "'variance'",
    "family": "the run's process",
    "likelihood": "'exact' (the estimator has no randomness: every variance over time samples is 0 by "
    "definition and nll() is evaluated once) or 'upper bound (NELBO)'",
    "batches": "M, the batches evaluated: the first M of the split, in order (as dlm eval reads them)",
    "batch_size": "rows per batch",
    "sequences": "N, sequences with at least one scored token (the others are left out of every figure)",
    "t_samples": "K, independent single-time-sample estimates of each sequence's bound (1 for an exact family)",
    "nll_per_token": "sum_s mean_k a_sk / sum_s T_s over all sequences: the NLL (bound) in nats per token, a_sk "
    "the k-th estimate of sequence s in nats, T_s its scored tokens",
    "seq_var": "(1/N) sum_s Var_k(a_sk), Var_k the sample variance over the K estimates (divisor K-1): the mean "
    "variance of one single-time-sample estimate of a sequence's bound, nats^2",
    "seq_var_per_token": "(1/N) sum_s Var_k(a_sk) / T_s^2: the same for the per-token estimate a_sk / T_s, "
    "(nats/token)^2",
    "seq_sd_per_token": "sqrt(seq_var_per_token)",
    "batch_elbo_var": "sample variance (divisor MK-1) of the M*K per-batch estimates "
    "L_mk = sum_{s in m} a_sk / sum_{s in m} T_s (nats/token; one time sample per sequence, the training "
    "loss's form): Var_{X,t} of the paper's table 2 (over batches X and time draws t)",
    "batch_elbo_var_t": "(1/M) sum_m Var_k(L_mk) (divisor K-1): the part of batch_elbo_var due to the time "
    "draws alone (null when K = 1)",
    "grad_var": "eq. 9 of the BD3-LM paper: (1/(M-1)) sum_m ||g_m - g_bar||^2, g_m the gradient of the "
    "training loss (Process.loss, nats/token) on batch m over every trainable parameter, g_bar = (1/M) sum_m "
    "g_m; float64, the model in eval mode (no dropout) so the draws come from the seed alone",
    "grad_mean_sq_norm": "||g_bar||^2",
    "grad_noise_ratio": "grad_var / ||g_bar||^2 (null when g_bar = 0)",
    "grad_params": "number of scalar parameters in g_m",
    "checkpoint_step": "training step of the evaluated checkpoint",
    "clip_window": "the clipped window [beta, omega] of mask rates of the training loss behind the gradient "
    "figures (families with one: BD3-LM; the likelihood figures always use the full bound)",
    "clip_window_source": "where clip_window came from: 'config' (process.clip_beta, clip_omega) or 'search at "
    "step N' (the window the data-driven search, process.clip_search, picked at step N, from the checkpoint)",
    "ema": "the EMA weights were evaluated",
    "seed": "seed of the time / noise draws (likelihood: seed; gradients: seed + 1)",
    "split": "the data split",
    "wall_s": "seconds spent computing",
    "created": "UTC time the record was written",
    "settings": "every setting that changes a figure; its hash names the file, a rerun with the same "
    "settings reuses it",
}


def _check_count(name: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise DlmError(f"{name} must be an integer >= {least}, got {value!r}")
    return value


def _sample_var(x: Tensor, dim: int) -> Tensor:
    """Sample variance (divisor n - 1) along ``dim`` in float64, two-pass (mean first: no cancellation)."""
    x = x.to(torch.float64)
    n = x.shape[dim]
    assert n >= 2, "a sample variance needs two values"
    d = x - x.mean(dim, keepdim=True)
    return (d * d).sum(dim) / (n - 1)


# ------------------------------------------------------------------------------------------ likelihood


def likelihood_variance(
    process: Process,
    model: torch.nn.Module,
    batches: Iterable[Batch],
    *,
    t_samples: int,
    generator: torch.Generator | None,
) -> dict[str, Any]:
    """Variance of the single-time-sample bound, per sequence and per batch (definitions: ``DEFINITIONS``).

    For a bound family, ``process`` is copied with ``eval_t_samples = 1`` and its ``nll`` called K times per
    batch with the one ``generator``, giving a_sk (float64 nats of sequence s, draw k; each row's time is
    marginally U[0, 1] and fresh in every call, so the K draws of a row are independent). Then

        seq_var           = (1/N) sum_s  1/(K-1) sum_k (a_sk - abar_s)^2
        seq_var_per_token = (1/N) sum_s  1/(K-1) sum_k (a_sk - abar_s)^2 / T_s^2      (Var of a_sk / T_s)
        L_mk              = sum_{s in m} a_sk / sum_{s in m} T_s,   batch_elbo_var = Var over all (m, k)

    An exact family (``exact_likelihood``: AR) is evaluated once per batch; its variances over time draws are
    exactly 0 and ``batch_elbo_var`` is the variance over batches alone. Runs without gradients in eval mode.
    """
    exact = process.exact_likelihood
    K = 1 if exact else _check_count("t_samples (for a bound)", t_samples, 2)
    single = process if exact else get_process(replace(process.cfg, eval_t_samples=1), process.specials)
    device = model_device(model)
    nats: list[Tensor] = []  # [K, B] per batch
    tokens: list[Tensor] = []  # [B] per batch
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                batch = batch.to(device)
                draws = [single.nll(model, batch, generator=generator) for _ in range(K)]
                nats.append(torch.stack([d.nats_B.detach().to("cpu", torch.float64) for d in draws]))
                tokens.append(draws[0].tokens_B.detach().to("cpu", torch.int64))
    finally:
        model.train(was_training)
    if not nats:
        raise DlmError("variance: the split gave no batches")
    return _likelihood_figures(nats, tokens, exact=exact)


def _likelihood_figures(nats: Sequence[Tensor], tokens: Sequence[Tensor], *, exact: bool) -> dict[str, Any]:
    """The figures of :func:`likelihood_variance` from per-batch a_KB (float64) and T_B."""
    a_KS, t_S = torch.cat(list(nats), dim=1), torch.cat(list(tokens))
    keep_S = t_S > 0
    if not bool(keep_S.any()):
        raise DlmError("variance: the batches hold no scored token")
    K = a_KS.shape[0]
    a_KS, t_S64 = a_KS[:, keep_S], t_S[keep_S].to(torch.float64)
    var_S = torch.zeros_like(t_S64) if exact else _sample_var(a_KS, 0)
    L_KM = torch.stack(
        [a.sum(1) / t.to(torch.float64).sum().clamp(min=1) for a, t in zip(nats, tokens, strict=True)], dim=1
    )  # per-batch estimates, [K, M]
    M = L_KM.shape[1]
    seq_var_tok = float((var_S / t_S64**2).mean())
    return {
        "likelihood": "exact" if exact else "upper bound (NELBO)",
        "batches": M,
        "sequences": int(keep_S.sum()),
        "t_samples": K,
        "nll_per_token": float(a_KS.mean(0).sum() / t_S64.sum()),
        "seq_var": float(var_S.mean()),
        "seq_var_per_token": seq_var_tok,
        "seq_sd_per_token": math.sqrt(seq_var_tok),
        "batch_elbo_var": batch_elbo_variance(L_KM.reshape(-1).tolist()) if K * M >= 2 else None,
        "batch_elbo_var_t": 0.0 if exact else float(_sample_var(L_KM, 0).mean()),
    }


# -------------------------------------------------------------------------------------------- gradient


class VectorMoments:
    """Running mean and scatter of vectors g_1..g_M in float64 (Welford, one coordinate at a time):

        mu_m = mu_{m-1} + (g_m - mu_{m-1}) / m
        S_m  = S_{m-1} + (g_m - mu_{m-1}) . (g_m - mu_m)        so that  S_M = sum_m ||g_m - g_bar||^2

    (the per-coordinate update M2_i += (g_i - mu_old_i)(g_i - mu_new_i) summed over i). The textbook form
    sum_m ||g_m||^2 - M ||g_bar||^2 subtracts two numbers of size M ||g_bar||^2 and loses every digit of the
    spread when ||g_bar|| is large compared with it; each term of S is a product of deviations, so it keeps them.
    Memory: one vector (mu) and a scalar, whatever M.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.scatter = 0.0

    def add(self, g: Tensor) -> None:
        """Add one vector (any shape; flattened, cast to float64)."""
        g = g.detach().reshape(-1).to(torch.float64)
        self.count += 1
        if self.mean is None:
            self.mean = g.clone()
            return
        assert g.shape == self.mean.shape, "every vector must have the same size"
        delta = g - self.mean
        self.mean += delta / self.count
        self.scatter += float(delta @ (g - self.mean))

    def variance(self) -> float:
        """S_M / (M - 1), eq. 9."""
        assert self.count >= 2, "the variance needs two vectors"
        return self.scatter / (self.count - 1)

    def mean_sq_norm(self) -> float:
        """||g_bar||^2."""
        assert self.mean is not None
        return float(self.mean @ self.mean)


def _flat_grad(process: Process, model: torch.nn.Module, batch: Batch, generator: torch.Generator | None) -> Tensor:
    """g = d loss / d theta over every trainable parameter, flattened and concatenated (float64; 0 for a
    parameter the loss does not reach)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise DlmError("gradient variance: the model has no trainable parameter")
    loss, _ = process.loss(model, batch, generator=generator)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat(
        [(torch.zeros_like(p) if g is None else g).reshape(-1).to(torch.float64) for p, g in zip(params, grads)]
    )


def gradient_variance(
    process: Process, model: torch.nn.Module, batches: Iterable[Batch], *, generator: torch.Generator | None
) -> dict[str, Any]:
    """The paper's eq. 9 over M batches, without storing the M gradients (:class:`VectorMoments`):

        grad_var = (1/(M-1)) sum_{m=1..M} || g_m - g_bar ||^2,   g_m = grad_theta Process.loss(X^m),
        g_bar = (1/M) sum_m g_m;  also ||g_bar||^2 and grad_var / ||g_bar||^2

    The loss is the family's training loss (nats per scored token, its noise drawn from ``generator``), taken
    with the model in eval mode (no dropout); ``torch.autograd.grad`` leaves every ``.grad`` as it was.
    """
    device = model_device(model)
    moments = VectorMoments()
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            moments.add(_flat_grad(process, model, batch.to(device), generator))
    finally:
        model.train(was_training)
    if moments.count < 2:
        raise DlmError(f"gradient variance needs at least 2 batches, got {moments.count}")
    var, sq = moments.variance(), moments.mean_sq_norm()
    return {
        "grad_var": var,
        "grad_mean_sq_norm": sq,
        "grad_noise_ratio": var / sq if sq > 0 else None,
        "grad_params": int(moments.mean.numel()) if moments.mean is not None else 0,
    }


# ------------------------------------------------------------------------------- clipped-schedule search


def batch_elbo_variance(values: Sequence[float]) -> float:
    """Sample variance of per-batch ELBO estimates L_1..L_n (divisor n - 1, float64, mean first):

        Var = 1/(n-1) sum_i (L_i - Lbar)^2,   Lbar = (1/n) sum_i L_i

    the quantity the clipped-schedule search minimises (paper §5.3). Fewer than 2 values or a non-finite one:
    ``DlmError``.
    """
    xs = [float(v) for v in values]
    if len(xs) < 2:
        raise DlmError(f"the variance of per-batch ELBO estimates needs at least 2 values, got {len(xs)}")
    if not all(math.isfinite(x) for x in xs):
        raise DlmError("per-batch ELBO estimates must be finite numbers")
    return float(_sample_var(torch.tensor(xs, dtype=torch.float64), 0))


def check_window(beta: float, omega: float) -> None:
    """A clipped window of mask rates U[beta, omega]: 0 <= beta < omega <= 1, else a one-line ``DlmError``."""
    ok = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (beta, omega))
    if not ok or not (0.0 <= beta < omega <= 1.0):
        raise DlmError(f"a clipped window [beta, omega] needs 0 <= beta < omega <= 1, got [{beta!r}, {omega!r}]")


def pick_window(table: Mapping[tuple[float, float], float]) -> tuple[float, float]:
    """The window (beta, omega) whose per-batch ELBO variance is smallest: argmin over ``table``.

    Ties (equal variances) go to the widest window (largest omega - beta: the least clipping, closest to the
    U[0, 1] of the bound), then to the smallest beta. An empty table, a window outside [0, 1] or with
    beta >= omega, or a variance that is negative or not finite: ``DlmError``.
    """
    if not table:
        raise DlmError("the clipped-schedule search got no windows")
    for (beta, omega), var in table.items():
        check_window(beta, omega)
        if not (isinstance(var, int | float) and math.isfinite(var) and var >= 0):
            raise DlmError(f"window [{beta}, {omega}] has variance {var!r}; it must be a finite number >= 0")
    return min(table, key=lambda w: (float(table[w]), -(w[1] - w[0]), w[0]))


# ------------------------------------------------------------------------------------------------ a run


def trained_window(run: LoadedRun) -> dict[str, Any]:
    """{"clip_window": [beta, omega], "clip_window_source": ...} of a family with a clipped training window (the
    one ``load_run`` gave its process: configured or searched), else {}."""
    window = getattr(run.process, "clip_window", None)
    if window is None:
        return {}
    return {"clip_window": [float(window[0]), float(window[1])], "clip_window_source": run.clip_window_source}


def variance_settings(run: LoadedRun, meta: Mapping[str, Any], **chosen: Any) -> dict[str, Any]:
    """Every setting that changes a variance figure (its hash names the file, :mod:`dlm.eval.results`); the
    training window a searched run carries (``trained_window``) is one, beside the configuration."""
    return {
        "protocol": VARIANCE_PROTOCOL,
        **chosen,
        "checkpoint_step": run.step,
        "ema": run.ema,
        **{k: v for k, v in trained_window(run).items() if k == "clip_window"},
        "process": asdict(run.cfg.process),
        "data": {
            "source": meta["source"]["fingerprint"],
            "tokenizer": meta["tokenizer"]["fingerprint"],
            "mode": meta["mode"],
            "seq_len": meta["seq_len"],
        },
        "device": model_device(run.model).type,
    }


def _first_batches(loader: Loader, n: int) -> list[Batch]:
    out: list[Batch] = []
    for batch in loader:
        if len(out) == n:
            break
        out.append(batch)
    return out


def variance_run(
    run_dir: str | Path,
    *,
    batches: int,
    split: str | None,
    t_samples: int,
    seed: int,
    device: str = "cpu",
    force: bool = False,
    log: Callable[[str], None] | None = None,
    which: str | int = "last",
    ema: bool = True,
    batch_size: int | None = None,
) -> tuple[dict[str, Any], Path]:
    """:func:`likelihood_variance` and :func:`gradient_variance` of a run's checkpoint on the first ``batches``
    batches of a split (default: the run's eval.split); rows per batch: ``batch_size``, else eval.batch_size,
    else train.batch_size (eq. 9 falls roughly as 1 / rows per batch). Returns (record, path of
    RUN/eval/variance-{split}-step{N}-{hash}.json).

    A file with the same settings is reused unless ``force``. Checked before any work, nothing written when
    refused (one-line ``DlmError``): batches >= 2, t_samples >= 2 for a bound family (>= 1 for an exact one),
    the device, the split, enough rows for ``batches`` batches, a writable RUN/eval.
    """
    _check_count("--batches", batches, 2)
    _check_count("--t-samples", t_samples, 1)
    if batch_size is not None:
        _check_count("--batch-size", batch_size, 1)
    check_device(device)
    run = load_run(run_dir, which=which, ema=ema, device=device)
    if not run.process.exact_likelihood:
        _check_count(f"--t-samples (the {run.process.name} bound)", t_samples, 2)
    split = split or run.cfg.eval.split
    s = open_split(Path(run.cfg.data.dir), split)
    check_tokenizer(run, s.meta["tokenizer"]["fingerprint"], s.meta["tokenizer"]["name"])
    bs = batch_size or run.cfg.eval.batch_size or run.cfg.train.batch_size
    loader = Loader(s, bs, seed=seed, shuffle=False, infinite=False)
    if len(loader) < batches:
        raise DlmError(f"split {split!r} holds {len(s)} rows: {len(loader)} batches of {bs}, fewer than {batches}")
    k = 1 if run.process.exact_likelihood else t_samples
    settings = variance_settings(run, s.meta, split=split, seed=seed, batch_size=bs, batches=batches, t_samples=k)
    path = result_path(run_dir, "variance", f"{split}-step{run.step}", settings)
    if (old := reuse(path, settings, force=force, log=log)) is not None:
        return old, path
    check_writable(path.parent)
    data = _first_batches(loader, batches)
    t0 = time.perf_counter()
    gen = torch.Generator(device=device)
    lik = likelihood_variance(run.process, run.model, data, t_samples=k, generator=gen.manual_seed(seed))
    grad = gradient_variance(run.process, run.model, data, generator=gen.manual_seed(seed + 1))
    record = {
        "metric": "variance",
        "family": run.process.name,
        **lik,
        **grad,
        "batch_size": bs,
        "checkpoint_step": run.step,
        **trained_window(run),
        "ema": run.ema,
        "seed": seed,
        "split": split,
        "wall_s": time.perf_counter() - t0,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": settings,
    }
    record["definitions"] = {key: DEFINITIONS[key] for key in record}
    write_json_atomic(path, record)
    return record, path
