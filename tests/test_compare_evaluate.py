"""The per-run evaluation stages of dlm compare (dlm.compare.evaluate): samples identical to the sampler called
directly, reuse and force, the AR run as its own judge against process.nll by hand, the tokenizer refusal, TER/SER
of a formal run, speed files, and bad input refused before anything is written."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dlm.compare.evaluate import (
    JudgeEvaluator,
    TrueLanguageEvaluator,
    judge_from_run,
    quality_set,
    sample_set,
)
from dlm.compare.speedset import speed_set
from dlm.data.batch import Batch
from dlm.errors import DlmError
from dlm.eval.diversity import diversity_summary, unigram_entropy
from dlm.eval.formal import formal_generation_metrics
from dlm.eval.run import evaluate_run, run_tokenizer, start_ids
from dlm.eval.speed import machine_info
from dlm.rundir import load_run
from tests.conftest import TINY_SEQ_LEN, tiny_run_args

SAMPLES_FIELDS = {
    "kind", "settings", "family", "sampler", "steps", "temperature", "n", "length", "seed", "batch_size",
    "checkpoint_step", "nfe", "wall_s", "wall_s_per_sequence", "created", "samples",
}  # fmt: skip
SAMPLE_FIELDS = {"index", "batch", "ids", "text", "tokens", "nfe", "wall_s_batch", "stop", "reveal_step", "pieces"}
QUALITY_FIELDS = {
    "kind", "settings", "samples_file", "sampler", "steps", "nfe", "wall_s_per_sequence", "evaluator", "gen_ppl",
    "diversity", "formal", "per_sample", "created",
}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture
def ar_run(tiny_ar_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_ar_run, tmp_path / "ar"))


@pytest.fixture
def mdlm_run(tiny_mdlm_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_mdlm_run, tmp_path / "mdlm"))


def _direct(run_dir: Path, sampler: str, n: int, batch_size: int, seed: int, **opts: Any) -> list[Any]:
    """process.sample called batch by batch with one generator, as sample_set should."""
    run = load_run(run_dir)
    prompt = start_ids(run.data_meta, run_tokenizer(run), None)
    gen = torch.Generator().manual_seed(seed)
    return [
        run.process.sample(run.model, min(batch_size, n - s), TINY_SEQ_LEN, sampler=sampler, prompt_ids=prompt,
                           generator=gen, **opts)
        for s in range(0, n, batch_size)
    ]  # fmt: skip


def _eval_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "eval").glob("*.json")) if (run_dir / "eval").is_dir() else []


def test_ar_samples_equal_the_sampler_called_directly(ar_run: Path) -> None:
    rec, path = sample_set(ar_run, sampler=None, steps=None, n=4, seed=7, temperature=1.0, batch_size=2)
    assert path.parent == ar_run / "eval" and path.name.startswith("samples-ancestral-stepsnone-step20-")
    assert json.loads(path.read_text()) == rec
    assert set(rec) >= SAMPLES_FIELDS and rec["kind"] == "samples"
    assert rec["steps"] is None and rec["length"] == TINY_SEQ_LEN and rec["family"] == "ar"
    direct = _direct(ar_run, "ancestral", 4, 2, 7, temperature=1.0)
    eos = load_run(ar_run).process.specials.eos
    tok = run_tokenizer(load_run(ar_run))
    assert rec["nfe"] == (direct[0].nfe + direct[1].nfe) / 2
    stops = set()
    for s in rec["samples"]:
        assert set(s) == SAMPLE_FIELDS and s["reveal_step"] is None
        r, i = direct[s["index"] // 2], s["index"] % 2
        assert s["batch"] == s["index"] // 2 and s["nfe"] == r.nfe
        assert s["ids"] == r.ids_NL[i, r.prompt_len : int(r.lengths_N[i])].tolist() and s["tokens"] == len(s["ids"])
        assert s["pieces"] == [tok.decode([t]) for t in s["ids"]]
        assert eos not in s["ids"][:-1]  # the boundary token is not in the ids; a row ends at its first EOS
        if s["stop"] == "eos":
            assert s["ids"][-1] == eos and s["tokens"] < TINY_SEQ_LEN - 1
        else:
            assert s["stop"] == "length" and s["tokens"] == TINY_SEQ_LEN - 1
        stops.add(s["stop"])
    assert stops == {"eos", "length"}  # both kinds of row occur with this seed (sample 3 stops after 11 tokens)


def test_mdlm_samples_trajectory_and_nfe(mdlm_run: Path) -> None:
    rec, path = sample_set(mdlm_run, sampler="ddpm", steps=8, n=3, seed=1, temperature=1.0, batch_size=2)
    assert path.name.startswith("samples-ddpm-steps8-step20-") and rec["steps"] == 8
    direct = _direct(mdlm_run, "ddpm", 3, 2, 1, steps=8, temperature=1.0, return_trajectory=True)
    assert rec["nfe"] == (direct[0].nfe + direct[1].nfe) / 2
    for s in rec["samples"]:
        r, i = direct[s["index"] // 2], s["index"] % 2
        P = r.prompt_len
        assert s["ids"] == r.ids_NL[i, P:].tolist() and s["stop"] == "length" and s["nfe"] == r.nfe <= 8
        assert s["reveal_step"] == r.trajectory_NL[i, P:].tolist()
        assert len(s["reveal_step"]) == TINY_SEQ_LEN - 1 and all(0 <= t < 8 for t in s["reveal_step"])


def test_samples_reused_unless_forced_other_settings_another_file(mdlm_run: Path) -> None:
    lines: list[str] = []
    kw: dict[str, Any] = {"sampler": "ddpm", "steps": 4, "n": 2, "seed": 0, "temperature": 1.0, "batch_size": 2}
    rec, path = sample_set(mdlm_run, **kw, log=lines.append)
    mtime = path.stat().st_mtime_ns
    again, path2 = sample_set(mdlm_run, **kw, log=lines.append)
    assert path2 == path and again == rec and path.stat().st_mtime_ns == mtime
    assert lines[-1] == f"reused {path}: a result with the same settings (--force recomputes it)"
    forced, _ = sample_set(mdlm_run, **kw, force=True)
    assert path.stat().st_mtime_ns != mtime and forced["samples"][0]["ids"] == rec["samples"][0]["ids"]
    _, other = sample_set(mdlm_run, **{**kw, "seed": 1})
    _, hotter = sample_set(mdlm_run, **{**kw, "temperature": 0.5})
    assert len({path, other, hotter}) == 3


@pytest.mark.parametrize(
    ("family", "kw", "match"),
    [
        ("ar", {"n": 0}, "number of samples"),
        ("ar", {"batch_size": 0}, "batch size"),
        ("ar", {"steps": 4}, "takes no steps"),
        ("ar", {"sampler": "ddpm"}, "unknown sampler"),
        ("mdlm", {"steps": 0}, "steps"),
        ("mdlm", {"temperature": -1.0}, "temperature"),
    ],
)
def test_bad_sample_input_refused_before_writing(
    family: str, kw: dict[str, Any], match: str, ar_run: Path, mdlm_run: Path
) -> None:
    run = ar_run if family == "ar" else mdlm_run
    args: dict[str, Any] = {"sampler": None, "steps": None, "n": 2, "seed": 0, "temperature": 1.0, "batch_size": 2}
    with pytest.raises(DlmError, match=match):
        sample_set(run, **{**args, **kw})
    assert _eval_files(run) == []


def test_ar_run_as_its_own_judge_equals_process_nll(ar_run: Path) -> None:
    lik, _ = evaluate_run(ar_run, max_batches=1)
    judge = judge_from_run(ar_run, batch_size=3)
    rec, spath = sample_set(ar_run, sampler=None, steps=None, n=5, seed=2, temperature=1.0, batch_size=5)
    q, qpath = quality_set(spath, evaluator=judge)
    assert qpath.parent == spath.parent and qpath.name.startswith("quality-ancestral-stepsnone-step20-")
    assert json.loads(qpath.read_text()) == q and set(q) >= QUALITY_FIELDS and q["formal"] is None
    info = q["evaluator"]
    assert info["kind"] == "judge-ar" and info["tokenizer"] == "bytes" and info["likelihood"] == lik
    assert info["retokenisation"] == "none: the judge shares the arms' tokenizer"
    assert q["settings"]["samples_file"] == spath.name and q["settings"]["evaluator"]["checkpoint_step"] == 20
    # by hand: each sample alone as the row (boundary, ids), scored by the AR process
    run = load_run(ar_run)
    head = start_ids(run.data_meta, run_tokenizer(run), None)
    ids_list = [s["ids"] for s in rec["samples"]]
    a, t = [], []
    for ids in ids_list:
        row = torch.tensor([head + ids])
        res = run.process.nll(run.model, Batch(row, torch.ones_like(row, dtype=torch.bool)))
        a.append(float(res.nats_B[0]))
        t.append(int(res.tokens_B[0]))
    assert t == [len(ids) for ids in ids_list]
    g = q["gen_ppl"]
    assert g["gen_ppl_pooled"] == pytest.approx(math.exp(sum(a) / sum(t)), rel=1e-5)
    assert g["gen_ppl_seq_mean"] == pytest.approx(sum(math.exp(x / n) for x, n in zip(a, t)) / len(a), rel=1e-5)
    assert [p["judge_nll"] for p in q["per_sample"]] == pytest.approx(a, rel=1e-5)
    assert [p["judge_tokens"] for p in q["per_sample"]] == t
    assert [p["entropy"] for p in q["per_sample"]] == [unigram_entropy(ids) for ids in ids_list]
    assert q["diversity"] == diversity_summary(ids_list, 100)
    # reused with the same judge; another window gives another file
    mtime = qpath.stat().st_mtime_ns
    assert quality_set(spath, evaluator=judge) == (q, qpath) and qpath.stat().st_mtime_ns == mtime
    q5, q5path = quality_set(spath, evaluator=judge, window=5)
    assert q5path != qpath and q5["diversity"] == diversity_summary(ids_list, 5)


class _RetokenisingJudge:
    """Stands for a judge with its own tokenizer: 2 nats on each of len(ids) tokens."""

    retokenises = True

    def token_nll(self, ids_list: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.tensor([len(ids) for ids in ids_list], dtype=torch.int64)
        return 2.0 * tokens.to(torch.float64), tokens


def test_judge_with_another_tokenizer_refused_unless_it_retokenises(ar_run: Path, tmp_path: Path) -> None:
    _, spath = sample_set(ar_run, sampler=None, steps=None, n=3, seed=0, temperature=1.0, batch_size=3)
    other = Path(shutil.copytree(ar_run, tmp_path / "judge"))
    info = json.loads((other / "run.json").read_text())
    info["data_meta"]["tokenizer"]["fingerprint"] = "another-vocabulary"
    (other / "run.json").write_text(json.dumps(info))
    before = _eval_files(ar_run)
    with pytest.raises(DlmError, match="fingerprints differ") as e:
        quality_set(spath, evaluator=judge_from_run(other))
    assert "\n" not in str(e.value) and _eval_files(ar_run) == before
    meta = {"kind": "hf", "name": "fake", "tokenizer": "other", "retokenisation": "re-encoded", "likelihood": None}
    q, qpath = quality_set(spath, evaluator=JudgeEvaluator(_RetokenisingJudge(), meta))
    assert q["gen_ppl"]["gen_ppl_pooled"] == pytest.approx(math.exp(2.0))
    assert q["evaluator"] == meta and q["settings"]["evaluator"] == {k: v for k, v in meta.items() if k != "likelihood"}
    with pytest.raises(DlmError, match="lacks likelihood"):
        JudgeEvaluator(_RetokenisingJudge(), {k: v for k, v in meta.items() if k != "likelihood"})
    with pytest.raises(DlmError, match="repetition window"):
        quality_set(spath, evaluator=JudgeEvaluator(_RetokenisingJudge(), meta), window=0)
    edited = json.loads(spath.read_text())  # the same settings, other ids (a forced resample on another device)
    edited["samples"][0]["ids"] = edited["samples"][0]["ids"][:-1]
    spath.write_text(json.dumps(edited))
    q2, q2path = quality_set(spath, evaluator=JudgeEvaluator(_RetokenisingJudge(), meta))
    assert q2path != qpath and q2["gen_ppl"]["tokens"] == q["gen_ppl"]["tokens"] - 1
    with pytest.raises(DlmError, match="not a samples file"):
        quality_set(ar_run / "config.json", evaluator=JudgeEvaluator(_RetokenisingJudge(), meta))


@pytest.fixture
def formal_run(tmp_path: Path) -> Path:
    """A 5-step AR run on formal:2gram-cpu (L = 6, chars, pad rows [BOS] x_1..x_6 [EOS])."""
    from dlm.config import load_config
    from dlm.data.shards import prepare
    from dlm.data.sources import get_source
    from dlm.train import train

    source = get_source("formal:2gram-cpu", n_train=64, n_valid=8, n_test=8, length=6, seed=3)
    data = prepare(source, "chars", seq_len=8, mode="pad", out_dir=tmp_path / "fdata", log=lambda s: None)
    train(load_config(None, tiny_run_args(data, "ar", "--train.max_steps=5", "--train.log_every=5")), tmp_path / "f")
    return tmp_path / "f"


def test_true_language_ter_ser(formal_run: Path, ar_run: Path) -> None:
    ev = TrueLanguageEvaluator(formal_run)
    lang, L = ev.language, ev.length
    assert L == 6 and ev.info["kind"] == "true-language" and ev.info["likelihood"] is None
    to_id = {int(sym): i for i, sym in enumerate(ev.table) if sym >= 0}
    x = lang.sample(2, L, np.random.default_rng(0))  # samples of the language: in its support
    rows = [[to_id[int(v)] for v in seq] for seq in x]
    bos = load_run(formal_run).process.specials.bos
    samples = [[*rows[0], ev.eos], rows[1], [*rows[0][:-1], ev.eos], [rows[1][0], bos, *rows[1][2:], ev.eos]]
    sym = ev.symbols(samples)
    assert sym[:2].tolist() == x.tolist() and (sym[2] == -1).all() and sym[3, 1] == -1  # wrong length; BOS
    f = ev.score(samples).formal
    assert f is not None and f["ser"] == 0.5 and f["in_support"] == 2 and f["non_symbol_sequences"] == 2
    assert f["ter"] == pytest.approx(formal_generation_metrics(lang, x, reference_values=False)["ter"])
    # the whole stage on the run's own samples
    rec, spath = sample_set(formal_run, sampler=None, steps=None, n=4, seed=0, temperature=1.0, batch_size=4)
    q, _ = quality_set(spath, evaluator=ev)
    assert q["gen_ppl"] is None and q["formal"]["n_sequences"] == 4 and "ter_optimal" in q["formal"]
    assert q["formal"]["ser"] == ev.score([s["ids"] for s in rec["samples"]]).formal["ser"]
    assert q["diversity"]["samples"] == 4 and all(p["judge_nll"] is None for p in q["per_sample"])
    _, other = sample_set(ar_run, sampler=None, steps=None, n=1, seed=0, temperature=1.0, batch_size=1)
    with pytest.raises(DlmError, match="own language"):
        quality_set(other, evaluator=ev)


def test_speed_file(ar_run: Path, mdlm_run: Path) -> None:
    lines: list[str] = []
    rec, path = speed_set(
        ar_run, settings=[(None, None)], batch_sizes=[1, 2], repeats=1, protocol_tokens=40, warmup=0, log=lines.append
    )
    assert path.parent == ar_run / "eval" and path.name.startswith("speed-step20-")
    assert json.loads(path.read_text()) == rec and rec["kind"] == "speed" and len(lines) == 3
    assert set(rec["machine"]) == set(machine_info("cpu")) and rec["settings"]["settings"] == [["ancestral", None]]
    assert [(r["sampler"], r["steps"], r["batch_size"]) for r in rec["rows"]] == [
        ("ancestral", None, b) for b in (1, 2)
    ]
    assert all(r["length"] == TINY_SEQ_LEN and r["prompt_len"] == 1 for r in rec["rows"])
    assert len(rec["protocol"]) == 1 and rec["protocol"][0]["generated_tokens"] >= 40
    mtime = path.stat().st_mtime_ns
    assert speed_set(
        ar_run, settings=[(None, None)], batch_sizes=[1, 2], repeats=1, protocol_tokens=40, warmup=0
    ) == (rec, path) and path.stat().st_mtime_ns == mtime  # fmt: skip
    m, _ = speed_set(mdlm_run, settings=[("ddpm", 4), ("ddpm", 8)], batch_sizes=[2], repeats=2, protocol_tokens=0)
    assert [(r["steps"], r["n_repeats"]) for r in m["rows"]] == [(4, 2), (8, 2)] and m["protocol"] == []
    assert all(r["nfe"] <= r["steps"] for r in m["rows"])


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"settings": [(None, 4)]}, "takes no steps"),
        ({"settings": [("ddpm", None)]}, "unknown sampler"),
        ({"settings": []}, "at least one"),
        ({"settings": [(None, None), ("ancestral", None)]}, "repeat"),
        ({"batch_sizes": [0]}, "batch size"),
        ({"repeats": 0}, "repeats"),
        ({"protocol_tokens": -1}, "protocol tokens"),
    ],
)
def test_bad_speed_input_refused_before_writing(kw: dict[str, Any], match: str, ar_run: Path) -> None:
    args: dict[str, Any] = {"settings": [(None, None)], "batch_sizes": [1], "repeats": 1, "protocol_tokens": 0}
    with pytest.raises(DlmError, match=match):
        speed_set(ar_run, **{**args, **kw})
    assert _eval_files(ar_run) == []


def test_pad_mode_rows_end_at_their_first_eos_for_every_family():
    """Pad-mode data: a diffusion row that writes EOS then PAD is cut after the EOS (kept), as AR stops there; a
    row without EOS keeps its full returned length; wrap mode (eos None) cuts nothing."""
    from dlm.compare.evaluate import _sample_rows
    from dlm.process.base import SampleResult

    eos, pad = 7, 8
    ids_NL = torch.tensor([[0, 3, 4, eos, pad, pad], [0, 3, 4, 5, 6, 2], [0, eos, 3, eos, 2, 2]])
    traj_NL = torch.tensor([[-1, 0, 1, 2, 3, 3], [-1, 0, 0, 1, 1, 2], [-1, 2, 0, 1, 1, 0]])
    result = SampleResult(ids_NL, torch.full((3,), 6), nfe=4, prompt_len=1, trajectory_NL=traj_NL)
    rows = _sample_rows(result, lambda ids: " ".join(map(str, ids)), start=0, batch=0, wall_s=0.5, length=6, eos=eos)
    assert [r["ids"] for r in rows] == [[3, 4, eos], [3, 4, 5, 6, 2], [eos]]
    assert [r["stop"] for r in rows] == ["eos", "length", "eos"]
    assert [r["reveal_step"] for r in rows] == [[0, 1, 2], [0, 0, 1, 1, 2], [2]]
    assert [r["tokens"] for r in rows] == [3, 5, 1]
    whole = _sample_rows(result, str, start=0, batch=0, wall_s=0.5, length=6, eos=None)
    assert [len(r["ids"]) for r in whole] == [5, 5, 5] and {r["stop"] for r in whole} == {"length"}
