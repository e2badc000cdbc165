"""Golden loss curves: the first 20 training losses of a tiny AR and a tiny MDLM run on CPU (byte data from
``tests.helpers.write_corpus``, 1 layer, d 32, seed 1234, one torch thread; ``tests/conftest.py``) are
pinned. They were measured at commit b6e0641, before the issue-11 refactors; a change of the mathematics of
a loss, the model, the optimizer, the schedule or the data order moves them. Relative tolerance 1e-4 leaves
room for floating-point differences between CPUs and torch builds, not for a changed equation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

GOLDEN = {
    "ar": [
        5.573864459991455, 5.555694580078125, 5.490803241729736, 5.415232181549072, 5.26318359375,
        5.097757339477539, 4.960323333740234, 4.799488067626953, 4.700913429260254, 4.584804534912109,
        4.450145244598389, 4.363489627838135, 4.263947486877441, 4.237774848937988, 4.1752424240112305,
        4.072446823120117, 4.066373825073242, 4.01212215423584, 3.9761931896209717, 3.985048294067383,
    ],
    "mdlm": [
        4.317464351654053, 4.833630561828613, 6.0975871086120605, 5.333813667297363, 6.133903980255127,
        5.202721118927002, 5.850817680358887, 4.133568286895752, 4.263278007507324, 4.436946868896484,
        3.569180488586426, 4.244405269622803, 6.633935928344727, 3.015958547592163, 5.362186431884766,
        4.1752400398254395, 3.960155725479126, 3.8665249347686768, 3.847425699234009, 3.3141705989837646,
    ],
}  # fmt: skip


def losses(run: Path) -> list[float]:
    rows = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r and "split" not in r]


@pytest.mark.parametrize("family", ["ar", "mdlm"])
def test_the_first_20_losses_match_the_golden_curve(family: str, request: pytest.FixtureRequest) -> None:
    run = request.getfixturevalue(f"tiny_{family}_run")
    assert losses(run) == pytest.approx(GOLDEN[family], rel=1e-4)
