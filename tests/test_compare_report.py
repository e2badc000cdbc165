"""The comparison report (dlm.compare.report, dlm.compare.figures) from a fake comparison directory."""

from __future__ import annotations

import base64
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from dlm.compare.figures import pareto_front
from dlm.compare.report import (
    build_report,
    load_results,
    mean_std,
    quality_table,
    summary_lines,
    trajectory_frames,
    visible,
)
from dlm.errors import DlmError
from tests.compare_fixture import SAMPLE_LEN, STEPS, likelihood_nll, make_compare_dir, parse_html

ARMS = ("ar", "mdlm")
SEEDS = (0, 1)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = make_compare_dir(tmp_path_factory.mktemp("report"), arms=ARMS, seeds=SEEDS)
    return root, build_report(root)


def test_files_written(built: tuple[Path, dict[str, Path]]) -> None:
    root, paths = built
    assert paths == {"md": root / "report.md", "html": root / "report.html", "figures": root / "figures"}
    names = sorted(p.name for p in paths["figures"].iterdir())
    assert names == sorted(
        f"{n}.png"
        for n in ("training_loss", "learning_rate", "validation_nll", "genppl_steps", "genppl_entropy", "speed_quality")
    )
    assert all(p.read_bytes().startswith(PNG) for p in paths["figures"].iterdir())
    assert not any(p.name.startswith(".") for p in root.rglob("*")), "no temporary file left behind"


def test_likelihood_rows_carry_relation_and_mean_std_over_seeds(built: tuple[Path, dict[str, Path]]) -> None:
    _, paths = built
    tables, _ = parse_html(paths["html"].read_text())
    rows = tables["likelihood"]
    assert set(rows) == {f"likelihood-{a}" for a in ARMS}
    for i, arm in enumerate(ARMS):
        nll = [likelihood_nll(i, s) for s in SEEDS]
        rel = "=" if arm == "ar" else "≤"
        assert rows[f"likelihood-{arm}"][3] == f"{rel} {statistics.fmean(nll):.4f} ± {statistics.stdev(nll):.4f}"
        assert rows[f"likelihood-{arm}"][-1] == str(len(SEEDS))
        for s in SEEDS:
            cell = tables["likelihood-seeds"][f"likelihood-{arm}-seed{s}"][3]
            assert cell == f"{rel} {likelihood_nll(i, s):.4f} ± 0.0100"
    # by hand: AR's seeds 2.00 and 2.03 -> mean 2.015, sample std 0.03 / sqrt(2) = 0.02121
    assert rows["likelihood-ar"][3] == "= 2.0150 ± 0.0212"
    md = paths["md"].read_text()
    assert "| ar | ar | test | = 2.0150 ± 0.0212 |" in md


def test_quality_speed_and_sample_tables(built: tuple[Path, dict[str, Path]]) -> None:
    _, paths = built
    text = paths["html"].read_text()
    tables, _ = parse_html(text)
    assert set(tables["quality"]) == {"quality-ar-ar-–"} | {f"quality-mdlm-ddpm_cache-{s}" for s in STEPS}
    # gen PPL (seq mean) of mdlm at S=4: seeds 14 + 16 and 14.5 + 16 -> 30.25 ± 0.5/sqrt(2)
    assert tables["quality"]["quality-mdlm-ddpm_cache-4"][4] == "30.25 ± 0.35"
    assert len(tables["speed"]) == 3 * 2  # (AR + 2 step counts) x 2 batch sizes
    assert tables["speed-quality"]["sq-mdlm-ddpm_cache-16"][-1] == "speed protocol, batch 1"
    assert {r.split("-")[1] for r in tables["samples"]} == set(ARMS)
    assert "&lt;b&gt;&amp;x0" in text and "<b>&x0" not in text, "sample text is HTML-escaped"


def test_trajectory_view(built: tuple[Path, dict[str, Path]]) -> None:
    tables, _ = parse_html(built[1]["html"].read_text())
    frames = list(tables["trajectory"].values())
    assert [f[0] for f in frames] == ["4 / 16", "8 / 16", "12 / 16", "16 / 16"]
    assert "░" in frames[0][2] and "░" not in frames[-1][2]
    assert frames[-1][1] == f"{SAMPLE_LEN} / {SAMPLE_LEN}"


def test_trajectory_frames_by_hand() -> None:
    frames = trajectory_frames([1, 3, 2, 4], list("abcd"), steps=4)
    assert frames == [(1, 1, "a░░░"), (2, 2, "a░c░"), (3, 3, "abc░"), (4, 4, "abcd")]


def test_visible_keeps_one_character_per_character() -> None:
    assert visible("a\nb\tc\x00d\x7f") == "a↵b→c␀d␡"
    assert len(visible("".join(map(chr, range(40))))) == 40


def test_mean_std_labels() -> None:
    agg = {"n_seeds": 3, "ppl": {"mean": 2.0, "std": 0.5, "n": 2}, "nll": {"mean": 1.25, "std": None, "n": 1}}
    assert mean_std(agg, "ppl") == "2.0000 ± 0.5000 (n=2 of 3 seeds)"
    assert mean_std({"n_seeds": 1, "nll": agg["nll"]}, "nll", 2) == "1.25"
    assert mean_std(agg, "bpt") == "–"
    assert mean_std({"n_seeds": 1, "m": {"mean": 3 * 2**20, "std": None, "n": 1}}, "m", 1, scale=2.0**-20) == "3.0"


def test_pareto_front_by_hand() -> None:
    pts = [(1.0, 30.0), (2.0, 10.0), (3.0, 20.0), (0.5, 50.0), (2.0, 12.0)]
    assert pareto_front(pts) == [(0.5, 50.0), (1.0, 30.0), (2.0, 10.0)]


def test_html_is_self_contained(built: tuple[Path, dict[str, Path]]) -> None:
    _, paths = built
    text = paths["html"].read_text()
    _, links = parse_html(text)
    imgs = [v for tag, k, v in links if tag == "img"]
    assert len(imgs) == len(list(paths["figures"].iterdir())) == 6
    assert all(v.startswith("data:image/png;base64,") for v in imgs)
    assert base64.b64decode(imgs[0].split(",", 1)[1]).startswith(PNG)
    assert not [v for _, _, v in links if v.startswith(("http://", "https://"))]
    assert "<script" not in text


def test_formal_corpus_ter_ser_and_missing_figures_said(tmp_path: Path) -> None:
    root = make_compare_dir(tmp_path, arms=("ar", "mdlm"), seeds=(0,), formal=True)
    paths = build_report(root)
    assert (paths["figures"] / "ter_ser.png").exists()
    assert not (paths["figures"] / "genppl_steps.png").exists()
    text = paths["html"].read_text()
    tables, links = parse_html(text)
    assert len([1 for tag, _, _ in links if tag == "img"]) == len(list(paths["figures"].iterdir()))
    assert 'id="fig-genppl_steps"' in text and "Gen PPL against sampling steps: not drawn" in text
    # one seed: a mean without ± std; TER of mdlm at S=4 by hand: 1.2 + 8/4 + 0.1 = 3.3
    assert tables["quality"]["quality-mdlm-ddpm_cache-4"][-2] == "3.3000"
    # speed–quality on a formal corpus: TER against seconds per sequence (table and Pareto figure)
    assert tables["speed-quality"]["sq-mdlm-ddpm_cache-4"][3:5] == ["TER", "3.3000"]
    assert (paths["figures"] / "speed_quality.png").exists()
    assert "not drawn" in paths["md"].read_text()


def test_ser_without_ter_still_shown(tmp_path: Path) -> None:
    """A formal corpus where no sample is all symbols: TER undefined (null) everywhere, SER still reported."""
    results = load_results(make_compare_dir(tmp_path, seeds=(0,), formal=True))
    for entry in [*results["rows"], *results["aggregate"]]:
        entry.pop("ter", None)
    table = quality_table(results)
    assert table.header[-2:] == ["TER", "SER"]
    assert table.rows[0][1][-2:] == ["–", "0.100"]
    assert any(line.startswith("  ar S=–: TER –, SER 0.100") for line in summary_lines(results))


def test_missing_or_corrupt_results_refused_and_nothing_written(tmp_path: Path) -> None:
    with pytest.raises(DlmError, match="no results.json .run dlm compare first") as e:
        build_report(tmp_path)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "results.json").write_text('{"rows": [')
    with pytest.raises(DlmError, match="unreadable") as e:
        build_report(tmp_path)
    assert "\n" not in str(e.value)
    (tmp_path / "results.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(DlmError, match="not a dlm compare results file"):
        build_report(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"rows": [{"kind": "likelihood", "seed": 0}], "aggregate": []}))
    with pytest.raises(DlmError, match=r"rows\[0\] lacks one of kind, arm, seed"):
        build_report(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_rebuild_is_idempotent(built: tuple[Path, dict[str, Path]]) -> None:
    root, paths = built
    md, html_text = paths["md"].read_text(), paths["html"].read_text()
    build_report(root)
    assert paths["md"].read_text() == md
    assert paths["html"].read_text() == html_text
    assert "2026-01-02T03:04:05Z" in md  # results.json's created, not the clock


def test_summary_lines(built: tuple[Path, dict[str, Path]]) -> None:
    lines = summary_lines(load_results(built[0]))
    arm_lines = [line for line in lines if not line.startswith((" ", "fixture"))]
    assert [line.split()[0] for line in arm_lines] == list(ARMS)
    assert "NLL = 2.0150 ± 0.0212 (2 seeds)" in arm_lines[0]
    assert arm_lines[1].split("NLL ")[1].startswith("≤ ")
    assert sum(line.startswith("  ddpm_cache S=") for line in lines) == len(STEPS)
    assert any("gen PPL 30.25 ± 0.35 (seq mean)" in line and "s/seq" in line for line in lines)


def test_import_leaves_training_code_out() -> None:
    code = (
        "import sys, dlm.compare.report\n"
        "bad = [m for m in ('dlm.train', 'dlm.compare.runner') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]


def _with_sweep_and_zero_shot(root: Path) -> dict:
    """The fixture's results with a zero-shot corpus (NLL = in-domain + 0.5 + 0.1 seed) and every diffusion samples
    row also at temperature 0.8 (gen PPL 0.7x, entropy - 0.3), aggregated by dlm.compare.results."""
    from dlm.compare.results import aggregate

    r = json.loads((root / "results.json").read_text())
    extra = []
    for x in r["rows"]:
        if x["kind"] == "likelihood":
            extra.append({**x, "kind": "zeroshot", "evaluation": "zeroshot:folio", "corpus": "folio",
                          "nll": x["nll"] + 0.5 + 0.1 * x["seed"]})  # fmt: skip
        if x["kind"] == "samples" and x["steps"] is not None:
            g = x["gen_ppl_seq_mean"]
            extra.append({**x, "temperature": 0.8, "gen_ppl_seq_mean": None if g is None else 0.7 * g,
                          "entropy_mean": x["entropy_mean"] - 0.3})  # fmt: skip
    r["rows"] += extra
    r["aggregate"] = aggregate(r["rows"])
    r["protocol"]["zero_shot"] = [{"name": "folio", "source": "shakespeare-folio", "split": "test", "tokens": 999,
                                   "tokenizer": "bytes", "max_batches": 0}]  # fmt: skip
    (root / "results.json").write_text(json.dumps(r))
    return r


def test_zero_shot_table_temperature_column_and_frontier(tmp_path: Path) -> None:
    root = make_compare_dir(tmp_path, arms=ARMS, seeds=SEEDS)
    _with_sweep_and_zero_shot(root)
    paths = build_report(root)
    tables, _ = parse_html(paths["html"].read_text())
    z = tables["zeroshot"]
    assert set(z) == {f"zeroshot-folio-{a}" for a in ARMS}
    for i, arm in enumerate(ARMS):
        nll = [likelihood_nll(i, s) + 0.5 + 0.1 * s for s in SEEDS]
        rel = "=" if arm == "ar" else "≤"
        row = z[f"zeroshot-folio-{arm}"]
        assert row[3] == f"{rel} {statistics.fmean(nll):.4f} ± {statistics.stdev(nll):.4f}"
        shift = statistics.fmean(nll) - statistics.fmean([likelihood_nll(i, s) for s in SEEDS])
        assert row[8] == f"{shift:+.4f}" and row[2] == "test"
    q = tables["quality"]
    assert "quality-mdlm-ddpm_cache-4-t0.8" in q and q["quality-mdlm-ddpm_cache-4-t0.8"][3] == "0.80"
    assert q["quality-mdlm-ddpm_cache-4"][3] == "1.00"  # the temperature column, once a temperature differs
    assert (paths["figures"] / "genppl_entropy.png").read_bytes().startswith(PNG)
    assert "Zero-shot likelihood" in paths["md"].read_text()
    nll = statistics.fmean([likelihood_nll(1, s) + 0.5 + 0.1 * s for s in SEEDS])
    assert any(line.startswith(f"  zero-shot folio: NLL ≤ {nll:.4f} ± ") for line in summary_lines(load_results(root)))


def test_formal_frontier_figure(tmp_path: Path) -> None:
    root = make_compare_dir(tmp_path, arms=("ar", "mdlm"), seeds=(0,), formal=True)
    _with_sweep_and_zero_shot(root)
    paths = build_report(root)
    assert (paths["figures"] / "frontier_formal.png").read_bytes().startswith(PNG)
    assert 'id="fig-frontier_formal"' in paths["html"].read_text()


def test_frontier_curves_hold_every_step_and_temperature_of_a_sampler(tmp_path: Path) -> None:
    """One curve per (arm, sampler) over steps x temperatures, ordered by entropy; AR's point apart."""
    from dlm.compare.figures import _sweep_curves, point_label, speed_quality_points

    r = _with_sweep_and_zero_shot(make_compare_dir(tmp_path, arms=ARMS, seeds=SEEDS))
    curves = _sweep_curves(speed_quality_points(r), "entropy", "gen_ppl")
    assert set(curves) == {("ar", "ar"), ("mdlm", "ddpm_cache")}
    pts = curves[("mdlm", "ddpm_cache")]
    assert sorted((p["steps"], p["temperature"]) for p in pts) == [(s, t) for s in STEPS for t in (0.8, 1.0)]
    assert [p["entropy"] for p in pts] == sorted(p["entropy"] for p in pts)
    assert {point_label(p) for p in pts} == {f"S={s}" for s in STEPS} | {f"S={s},T=0.8" for s in STEPS}
