"""Aggregation of a comparison (dlm.compare.results) on hand-made rows: mean / std over seeds, overlap notes,
matched-TER speedups, the CSV layout."""

from __future__ import annotations

import csv
import io
import math

import pytest

from dlm.compare.results import aggregate, matched, overlaps, to_csv


def _lik(arm: str, seed: int, nll: float | None, family: str = "mdlm") -> dict:
    return {"arm": arm, "family": family, "seed": seed, "kind": "likelihood", "split": "test", "relation": "≤",
            "nll": nll, "tokens": 100, "file": f"runs/{arm}-seed{seed}/eval/x.json"}  # fmt: skip


def test_aggregate_mean_std_min_max_over_seeds_and_nulls_left_out() -> None:
    rows = [_lik("a", 0, 2.0), _lik("a", 1, 3.0), _lik("a", 2, 7.0), _lik("b", 0, 1.0), _lik("b", 1, None)]
    agg = {a["arm"]: a for a in aggregate(rows)}
    a = agg["a"]["nll"]
    assert a["mean"] == 4.0 and a["min"] == 2.0 and a["max"] == 7.0 and a["n"] == 3
    assert a["std"] == pytest.approx(math.sqrt(((2 - 4) ** 2 + (3 - 4) ** 2 + (7 - 4) ** 2) / 2))
    assert agg["a"]["seeds"] == [0, 1, 2] and agg["a"]["relation"] == "≤"
    b = agg["b"]["nll"]
    assert b == {"mean": 1.0, "std": None, "min": 1.0, "max": 1.0, "n": 1}  # the null seed is not counted
    assert agg["b"]["n_seeds"] == 2
    assert "file" not in agg["a"] and agg["a"]["tokens"]["mean"] == 100


def test_overlap_notes_only_for_overlapping_intervals() -> None:
    rows = [_lik("a", 0, 2.0), _lik("a", 1, 2.2), _lik("b", 0, 2.1), _lik("b", 1, 2.3), _lik("c", 0, 9.0),
            _lik("c", 1, 9.1)]  # fmt: skip
    notes = overlaps(aggregate(rows))
    assert len(notes) == 1 and "arms a and b overlap" in notes[0]
    assert overlaps(aggregate([_lik("a", 0, 2.0)])) == []  # one seed: no std, nothing claimed


def _sample(arm: str, family: str, steps: int | None, ter: float, se: float, wall: float, nfe: float) -> dict:
    return {"arm": arm, "family": family, "seed": 0, "kind": "samples", "sampler": "s", "steps": steps, "ter": ter,
            "ter_se": se, "ser": 0.0, "ser_se": 0.0, "wall_s_per_sequence": wall, "nfe": nfe}  # fmt: skip


def test_matched_speedup_per_seed_and_arm() -> None:
    """AR TER 1.50 ± 0.01; the arm's 8 steps are 2.00 (no match), 16 steps 1.52 ± 0.01: 1.52 <= 1.50 +
    2 sqrt(0.01^2 + 0.01^2) = 1.5283, so 16 matches, speedup 0.8 / 0.2 = 4, NFE ratio 64 / 16 = 4."""
    rows = [_sample("ar", "ar", None, 1.50, 0.01, 0.8, 64), _sample("mdlm", "mdlm", 8, 2.0, 0.01, 0.1, 8),
            _sample("mdlm", "mdlm", 16, 1.52, 0.01, 0.2, 16)]  # fmt: skip
    (m,) = matched(rows)
    assert (m["arm"], m["ar_arm"], m["seed"]) == ("mdlm", "ar", 0)
    t = m["matched_ter"]
    assert t["steps"] == 16 and t["threshold"] == pytest.approx(1.50 + 2 * math.hypot(0.01, 0.01))
    assert t["speedup"] == pytest.approx(4.0) and t["nfe_ratio"] == pytest.approx(4.0)
    assert m["matched_ser"]["steps"] == 8  # SER 0 everywhere: the smallest step count matches
    assert matched([{**r, "ter": None, "ser": None} for r in rows]) == []  # natural text: nothing to match


def test_csv_has_seed_then_aggregate_rows_under_one_header() -> None:
    rows = [_lik("a", 0, 2.0), _lik("a", 1, 3.0)]
    agg = aggregate(rows)
    table = list(csv.DictReader(io.StringIO(to_csv(rows, agg))))
    assert [r["row_type"] for r in table] == ["seed", "seed", "aggregate"]
    assert table[2]["nll_mean"] == "2.5" and table[2]["seeds"] == "0;1" and table[0]["nll"] == "2.0"


def test_rows_of_each_temperature_and_corpus_stay_apart() -> None:
    """The sweep's temperatures and the zero-shot corpora are group keys: never averaged together."""
    samples = [{"arm": "m", "family": "mdlm", "seed": s, "kind": "samples", "sampler": "ddpm", "steps": 8,
                "temperature": t, "gen_ppl_seq_mean": 10.0 * t + s} for s in (0, 1) for t in (0.8, 1.0)]  # fmt: skip
    zs = [{**_lik("m", s, 3.0 + s + (c == "b")), "kind": "zeroshot", "evaluation": f"zeroshot:{c}", "corpus": c}
          for s in (0, 1) for c in ("a", "b")]  # fmt: skip
    agg = aggregate([_lik("m", 0, 1.0), _lik("m", 1, 2.0), *samples, *zs])
    got = {(a["kind"], a["temperature"], a["evaluation"]): a for a in agg}
    assert set(got) == {("likelihood", None, None), ("samples", 0.8, None), ("samples", 1.0, None),
                        ("zeroshot", None, "zeroshot:a"), ("zeroshot", None, "zeroshot:b")}  # fmt: skip
    assert got["samples", 0.8, None]["gen_ppl_seq_mean"]["mean"] == pytest.approx(8.5)
    assert (
        got["zeroshot", None, "zeroshot:b"]["nll"]["mean"] == 4.5
        and got["likelihood", None, None]["nll"]["mean"] == 1.5
    )


def test_build_rows_of_the_further_evaluations(tmp_path) -> None:
    """A run's zero-shot, condgen and downstream records become rows naming their evaluation, with the records'
    numbers (file paths relative to DIR)."""
    from pathlib import Path

    from dlm.compare.results import build_rows
    from dlm.compare.runner import RunRecord

    lik = {"split": "test", "exact": False, "nll": 3.0, "nll_se": 0.1, "bpt": 4.3, "ppl": 20.1, "tokens": 50,
           "sequences": 2, "settings": {"process": {"eval_t_samples": 4}}}  # fmt: skip
    cond = {"mode": "keep-c", "settings": {"sampler": "ddpm", "steps": 16, "prompt_len": 4, "cont_len": 4,
            "n_prompts": 8}, "continuation_ppl": {"mean": 12.0, "se": 1.5}, "human_ppl": {"mean": 9.0},
            "mauve": {"missing": "pip install 'dlm[mauve]'"}, "diversity": {"entropy_mean": {"mean": 1.2}},
            "nfe": 16.0, "wall_s_per_continuation": 0.01}  # fmt: skip
    tasks = {"k": 4, "exact": False, "tasks": {"quiz": {"metrics": {"acc": 0.75, "acc_stderr": 0.2}, "documents": 4,
             "requests": 12, "mean_request_se": 0.3}}}  # fmt: skip
    r = RunRecord("mdlm", "mdlm", 0, tmp_path / "runs" / "mdlm-seed0")
    r.zero_shot = [("folio", lik, tmp_path / "runs/mdlm-seed0/eval/zeroshot-x.json")]
    r.condgen = [("keep-c", cond, tmp_path / "runs/mdlm-seed0/eval/condgen-x.json")]
    r.downstream = (tasks, tmp_path / "runs/mdlm-seed0/eval/lmeval-x.json")
    rows = {row["kind"]: row for row in build_rows([r], Path(tmp_path))}
    z, c, d = rows["zeroshot"], rows["condgen"], rows["downstream"]
    assert (z["evaluation"], z["corpus"], z["relation"], z["nll"], z["t_samples"]) == (
        "zeroshot:folio",
        "folio",
        "≤",
        3.0,
        4,
    )
    assert z["file"] == "runs/mdlm-seed0/eval/zeroshot-x.json"
    assert (c["evaluation"], c["continuation_ppl"], c["continuation_ppl_se"], c["human_ppl"]) == (
        "condgen:keep-c",
        12.0,
        1.5,
        9.0,
    )
    assert c["mauve"] is None and c["mauve_missing"] == "pip install 'dlm[mauve]'" and c["entropy_mean"] == 1.2
    assert (d["evaluation"], d["task"], d["acc"], d["acc_stderr"], d["k"], d["scoring"]) == (
        "task:quiz",
        "quiz",
        0.75,
        0.2,
        4,
        "bound",
    )
