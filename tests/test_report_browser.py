"""report.html opened in headless Chromium: the DOM holds every arm's table rows and the figures, and a
screenshot shows a rendered page (not blank, with the figures' plotted colours)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dlm.compare.report import build_report
from tests.compare_fixture import STEPS, chromium, find_chromium, make_compare_dir, parse_html

ARMS = ("ar", "mdlm", "sedd")


@pytest.fixture(scope="module")
def browser() -> str:
    binary, why = find_chromium()
    if binary is None:
        pytest.skip(why)
    return binary


def test_report_renders_in_chromium(browser: str, tmp_path: Path) -> None:
    root = make_compare_dir(tmp_path, arms=ARMS, seeds=(0, 1))
    html_path = build_report(root)["html"]
    url = html_path.resolve().as_uri()

    dom = chromium(browser, tmp_path / "profile-dom", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    tables, links = parse_html(dom.stdout)
    assert set(tables["likelihood"]) == {f"likelihood-{a}" for a in ARMS}
    assert tables["likelihood"]["likelihood-ar"][3].startswith("= ")
    assert all(tables["likelihood"][f"likelihood-{a}"][3].startswith("≤ ") for a in ARMS[1:])
    assert len(tables["likelihood-seeds"]) == len(ARMS) * 2
    assert len(tables["quality"]) == 1 + (len(ARMS) - 1) * len(STEPS)
    assert len(tables["trajectory"]) == 4
    imgs = [v for tag, _, v in links if tag == "img"]
    assert len(imgs) == 6 and all(v.startswith("data:image/png;base64,") for v in imgs)

    shot = tmp_path / "shot.png"
    run = chromium(browser, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1200,2400", url)
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    rgb = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert rgb.shape[:2] == (2400, 1200)
    assert rgb.std() > 10, "the screenshot is blank"
    # the figures drew: pixels of matplotlib's C1 orange (255, 127, 14), a colour the page's CSS never uses
    orange = (np.abs(rgb - np.array([255.0, 127.0, 14.0])).max(axis=-1) < 30).sum()
    assert orange > 200, f"no plotted lines visible in the screenshot ({orange} orange pixels)"
