"""MAUVE (Pillutla et al. 2021) of generated against human continuations on given features, for
``dlm.eval.condgen``: the bucket rule for small sets, the frontier area computed along the divergence curve's own
order, one score per MAUVE seed and the record averaged over MAUVE seeds and sampling seeds. Needs the optional
``mauve-text`` package (the ``mauve`` extra); ``mauve_module()`` is None without it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dlm.errors import DlmError
from dlm.eval.diversity import mean_se

__all__ = ["MAUVE_MISSING", "frontier_area", "mauve_buckets", "mauve_module", "mauve_record", "mauve_score"]

MAUVE_SCALING = 5.0  # mauve's default c, as in the paper (default parameters)
MAUVE_MISSING = "pip install 'dlm[mauve]'"
BUCKETS_RULE = "k = max(2, round(N / 10)) k-means buckets, at most N (mauve's own rule, N the prompts per set)"


def mauve_buckets(n: int) -> int:
    """k-means buckets for N features per set: max(2, round(N / 10)), at most N (``BUCKETS_RULE``)."""
    return max(2, min(n, round(n / 10)))


def frontier_area(curve_M2: np.ndarray) -> float:
    """MAUVE from mauve's divergence curve, points (exp(-c KL(Q|R_w)), exp(-c KL(P|R_w))) in the order of
    the mixture weight w (the extreme points (1, 0) first, (0, 1) last):

        MAUVE = (1/2) (integral of y dx + integral of x dy)    along the curve, trapezoids in w order

    Equal to mauve-text 0.4.0's ``out.mauve`` when no two points tie; it sorts the points by each coordinate,
    so when the two histograms are equal (every middle point is (1, 1)) its sort puts (1, 0) before (1, 1)
    and it returns 0.75 instead of 1; the curve is monotone in w, so following w needs no sort.
    """
    x, y = np.asarray(curve_M2, dtype=np.float64).T
    x, y = x[::-1], y[::-1]  # x ascending: from (0, 1) to (1, 0)
    area_ydx = float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))
    xr, yr = x[::-1], y[::-1]  # y ascending
    area_xdy = float(np.sum(np.diff(yr) * (xr[1:] + xr[:-1]) / 2))
    return 0.5 * (area_ydx + area_xdy)


def mauve_module() -> Any | None:
    try:
        import mauve
    except ImportError:
        return None
    return mauve


def mauve_score(p_ND: np.ndarray, q_ND: np.ndarray, *, seed: int, num_buckets: int, scaling: float) -> dict:
    """MAUVE of generated (p) against human (q) features for one MAUVE seed: ``frontier_area`` of
    ``mauve.compute_mauve``'s curve (``mauve``) and the package's own figure (``mauve_package``).
    DlmError when mauve-text is not installed."""
    mauve = mauve_module()
    if mauve is None:
        raise DlmError(f"MAUVE needs the mauve-text package: {MAUVE_MISSING}")
    out = mauve.compute_mauve(
        p_features=np.asarray(p_ND, dtype=np.float32), q_features=np.asarray(q_ND, dtype=np.float32),
        num_buckets=num_buckets, mauve_scaling_factor=scaling, seed=seed, verbose=False,
    )  # fmt: skip
    return {"mauve": frontier_area(out.divergence_curve), "mauve_package": float(out.mauve), "seed": seed}


# ----------------------------------------------------------------------------- the evaluation


def mauve_record(per_seed: list[dict[str, Any]], mseeds: list[int], k: int, features: str) -> dict[str, Any]:
    """MAUVE averaged over sampling seeds per MAUVE seed; mean and SE over MAUVE seeds, SE over sampling seeds."""
    grid = np.array([[m["mauve"] for m in r["mauve"]["per_mauve_seed"]] for r in per_seed], dtype=np.float64)
    mean, se = mean_se(grid.mean(axis=0).tolist())
    _, se_seeds = mean_se(grid.mean(axis=1).tolist())
    return {
        "mean": mean,
        "se": se,
        "se_seeds": se_seeds,
        "n_mauve_seeds": len(mseeds),
        "n_seeds": len(per_seed),
        "se_over": "MAUVE seeds (of the mean over sampling seeds); se_seeds: over sampling seeds (of the mean over "
        "MAUVE seeds), null for one seed",
        "num_buckets": k,
        "buckets_rule": BUCKETS_RULE,
        "scaling_factor": MAUVE_SCALING,
        "features": features,
        "p": "generated continuations",
        "q": "human continuations",
        "area_rule": "frontier_area of mauve-text's divergence curve (its own figure per seed: mauve_package)",
    }
