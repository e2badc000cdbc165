"""Aggregation of a comparison: DIR/results.json and DIR/results.csv from the per-run result files.

One row per (arm, seed, evaluation) (likelihood; zeroshot = the likelihood on one zero-shot corpus, evaluation
"zeroshot:NAME"; samples = one sampler x step count x temperature with its quality; speed = one sampler x step
count x batch size; speed_protocol = the thesis protocol), then one aggregate row per (kind, arm, sampler, steps,
temperature, batch size, evaluation) over the seeds: for every numeric field

    mean = (1/n) sum_i x_i,   std = sqrt( sum_i (x_i - mean)^2 / (n - 1) )  (null for n = 1),   min, max

over the n seeds with a value (a null value, e.g. an overflowing PPL, is left out and n says how many were
used). ``overlaps`` notes pairs of arms whose intervals mean ± std overlap (likelihood NLL; gen PPL at the same
sampler step count): with few seeds such a difference is not resolved. Schema: docs/COMPARE.md.
"""

from __future__ import annotations

import csv
import io
import math
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import dlm
from dlm.compare.suite import condgen_rows, downstream_rows
from dlm.io import write_json_atomic, write_text_atomic

__all__ = ["DEFINITIONS", "aggregate", "overlaps", "write_results"]

RESULTS_FILE = "results.json"
CSV_FILE = "results.csv"
VARIANCE_FIELDS = ("t_samples", "batches", "nll_per_token", "seq_var_per_token", "batch_elbo_var", "grad_var",
                   "grad_mean_sq_norm", "grad_noise_ratio")  # fmt: skip
GROUP_KEYS = ("kind", "arm", "family", "sampler", "steps", "temperature", "batch_size", "evaluation")
_ROW_IDENTITY = {"kind", "arm", "family", "seed", "sampler", "steps", "batch_size", "split", "file", "relation"}
_ROW_IDENTITY |= {"temperature", "evaluation", "corpus", "sampler_name", "mode", "task", "scoring", "draws"}
_ROW_IDENTITY |= {"mauve_missing"}

DEFINITIONS: dict[str, str] = {
    "kind": "likelihood | zeroshot | samples | speed | speed_protocol | variance | condgen | downstream",
    "evaluation": "zeroshot:NAME (likelihood on the zero-shot corpus NAME), condgen:MODE (conditional generation, "
    "gen-c or keep-c), task:NAME (a downstream task); null for the other kinds",
    "continuation_ppl": "condgen: exp of the judge's NLL per continuation token given boundary + prompt (pooled over "
    "prompts), mean over sampling seeds; continuation_ppl_se: its SE over them (null for one seed)",
    "human_ppl": "condgen: the same for the human continuations of the same prompts (the reference level)",
    "mauve": "condgen: MAUVE(generated, human continuations) on the judge's last hidden state, mean over MAUVE seeds "
    "(of the mean over sampling seeds); mauve_se: SE over MAUVE seeds; mauve_missing: why there is none",
    "acc": "downstream: accuracy, the choice of highest log-likelihood (exact for AR, the bound for diffusion) "
    "(lm-eval's acc; acc_norm: per-byte normalised); acc_stderr: lm-eval's standard error over documents",
    "scoring": "downstream: exact (AR log-likelihood) or bound (the diffusion ELBO, mean of K draws)",
    "draws": "downstream: a bound's draws, common (shared by a question's choices: seeded by the context) or "
    "independent; exact for AR",
    "corpus": "zeroshot: the zero-shot corpus's name; its directory, source and split in protocol.zero_shot",
    "temperature": "samples: softmax temperature of the sampler (one point of the sweep)",
    "sampler": "samples, speed: the sweep entry's label (the sampler's name unless the entry sets options)",
    "sampler_name": "samples: the family's sampler that drew them (the label's sampler)",
    "seq_var_per_token": "variance: mean over sequences of the variance of the per-token likelihood estimate over "
    "K single-draw estimates, (nats/token)^2; 0 for AR (exact)",
    "batch_elbo_var": "variance: variance of the per-batch mean NLL estimate over batches and time draws",
    "grad_var": "variance: the BD3-LM paper's eq. 9, (1/(M-1)) sum_m ||g_m - g_bar||^2 over M batches",
    "grad_mean_sq_norm": "variance: ||g_bar||^2, the squared norm of the mean gradient",
    "grad_noise_ratio": "variance: grad_var / grad_mean_sq_norm",
    "relation": "'=' exact likelihood (AR), '≤' an upper bound on the NLL (diffusion: NELBO, K draws per sequence)",
    "nll": "NLL in nats per scored token on the split (exact or the bound); scored tokens: protocol.likelihood",
    "nll_se": "standard error of nll over sequences (delta method; includes the Monte-Carlo noise of a bound)",
    "bpt": "nll / ln 2, bits per token",
    "ppl": "exp(nll), exp of the mean (a bound for diffusion)",
    "ppl_seq_mean": "mean over sequences of exp(per-sequence NLL per token)",
    "bits_per_byte": "total nats / (ln 2 x UTF-8 bytes of the scored tokens)",
    "t_samples": "K, Monte-Carlo draws per sequence of a diffusion bound (1 for AR, exact)",
    "nfe": "network calls per sampled batch (every call counted)",
    "wall_s_per_sequence": "sampling wall seconds of all batches / n (the samples' own run, not the speed stage)",
    "gen_ppl_seq_mean": "mean over samples of exp(judge NLL per judge token of the sample)",
    "gen_ppl_pooled": "exp(sum of judge NLL / sum of judge tokens) over the samples",
    "judge_nll": "the judge's pooled NLL per judge token (nats)",
    "judge_nll_se": "delta-method standard error of judge_nll over samples",
    "entropy_mean": "mean over samples of the unigram entropy of the sample (nats)",
    "entropy_se": "standard error of entropy_mean over samples",
    "distinct_1": "distinct unigrams / unigrams, pooled over the samples",
    "distinct_2": "distinct bigrams / bigrams, pooled over the samples (bigrams within a sample)",
    "repetition_rate": "share of tokens equal to one of the previous 100 tokens of their sample, pooled",
    "ter": "token error rate: generative perplexity under the true language (formal corpora only)",
    "ser": "sequence error rate: share of samples with probability 0 under the true language (formal only)",
    "median_s": "median over timed repeats of the wall seconds of one sampling call (device synchronised)",
    "seconds_per_sequence": "median_s / batch_size",
    "tokens_per_s": "generated tokens / median_s (speed) or / total seconds (speed_protocol)",
    "peak_memory_bytes": "peak device memory of the timed calls (CUDA) or peak RSS growth (CPU); see the file",
    "batches_per_s": "thesis protocol: batches of 4 until the token target, batches / total seconds",
    "matched": "formal corpora: per seed, the smallest step count S of a diffusion arm whose TER (SER) is within "
    "2 sqrt(se_AR^2 + se_S^2) of AR's, and speedup = AR wall_s_per_sequence / the arm's at S (null: none matches)",
    "mean": "mean over the seeds with a value",
    "std": "sample standard deviation over seeds (n - 1); null for one seed",
    "n": "seeds with a value (null values, e.g. an overflowing PPL, are left out)",
}


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _likelihood_row(base: dict[str, Any], rec: dict[str, Any], path: Path, root: Path) -> dict[str, Any]:
    process = rec.get("settings", {}).get("process") or {}
    return {
        **base,
        "kind": "likelihood",
        "split": rec["split"],
        "exact": rec["exact"],
        "relation": "=" if rec["exact"] else "≤",
        **{k: rec.get(k) for k in ("nll", "nll_se", "bpt", "ppl", "ppl_seq_mean", "bits_per_byte")},
        "tokens": rec["tokens"],
        "sequences": rec["sequences"],
        # K: the process's eval_t_samples for a bound, 1 for an exact likelihood
        "t_samples": 1 if rec["exact"] else int(process.get("eval_t_samples", 1)),
        "file": _rel(path, root),
    }


def _samples_row(
    base: dict[str, Any], srec: dict[str, Any], spath: Path, qrec: dict[str, Any], root: Path
) -> dict[str, Any]:
    g = qrec.get("gen_ppl") or {}
    d = qrec.get("diversity") or {}
    f = qrec.get("formal") or {}
    return {
        **base,
        "kind": "samples",
        "sampler": srec.get("label") or srec["sampler"],
        "sampler_name": srec["sampler"],
        "steps": srec["steps"],
        "temperature": srec["temperature"],
        "n": srec["n"],
        "nfe": srec["nfe"],
        "wall_s_per_sequence": srec["wall_s_per_sequence"],
        "gen_ppl_seq_mean": g.get("gen_ppl_seq_mean"),
        "gen_ppl_pooled": g.get("gen_ppl_pooled"),
        "judge_nll": g.get("nll"),
        "judge_nll_se": g.get("nll_se"),
        **{k: d.get(k) for k in ("entropy_mean", "entropy_se", "distinct_1", "distinct_2", "repetition_rate")},
        **{k: f.get(k) for k in ("ter", "ter_se", "ser", "ser_se")},
        "file": _rel(spath, root),
    }


def _speed_rows(base: dict[str, Any], rec: dict[str, Any], path: Path, root: Path) -> list[dict[str, Any]]:
    rows = []
    for r in rec.get("rows", []):
        rows.append({
            **base, "kind": "speed", "sampler": r["sampler"], "steps": r["steps"], "batch_size": r["batch_size"],
            **{k: r.get(k) for k in ("median_s", "seconds_per_sequence", "tokens_per_s", "nfe", "peak_memory_bytes")},
            "file": _rel(path, root),
        })  # fmt: skip
    for r in rec.get("protocol", []):
        rows.append({
            **base, "kind": "speed_protocol", "sampler": r["sampler"], "steps": r["steps"],
            "batch_size": r["batch_size"],
            **{k: r.get(k) for k in ("batches_per_s", "tokens_per_s", "batches", "generated_tokens")},
            "file": _rel(path, root),
        })  # fmt: skip
    return rows


def build_rows(records: Iterable[Any], root: Path) -> list[dict[str, Any]]:
    """The per-seed rows of every evaluated run (``dlm.compare.runner.RunRecord``s)."""
    rows: list[dict[str, Any]] = []
    for r in records:
        base = {"arm": r.arm, "family": r.family, "seed": r.seed}
        if r.likelihood is not None:
            rows.append(_likelihood_row(base, *r.likelihood, root))
        for name, zrec, zpath in getattr(r, "zero_shot", []):
            row = _likelihood_row(base, zrec, zpath, root)
            rows.append({**row, "kind": "zeroshot", "evaluation": f"zeroshot:{name}", "corpus": name})
        for srec, spath, qrec, _ in r.samples:
            rows.append(_samples_row(base, srec, spath, qrec, root))
        rows += condgen_rows(base, getattr(r, "condgen", []), lambda p: _rel(p, root))
        if getattr(r, "downstream", None) is not None:
            rows += downstream_rows(base, *r.downstream, lambda p: _rel(p, root))
        if r.speed is not None:
            rows += _speed_rows(base, *r.speed, root)
        if r.variance is not None:
            vrec, vpath = r.variance
            rows.append({**base, "kind": "variance", **{k: vrec.get(k) for k in VARIANCE_FIELDS},
                         "file": _rel(vpath, root)})  # fmt: skip
    return rows


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _stats(values: list[float]) -> dict[str, Any]:
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n}


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (kind, arm, family, sampler, steps, batch_size): mean, std, min, max, n over seeds of every
    numeric field (module docstring); groups in the order they first appear."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in GROUP_KEYS), []).append(row)
    out = []
    for key, members in groups.items():
        agg: dict[str, Any] = dict(zip(GROUP_KEYS, key, strict=True))
        agg["seeds"] = [m["seed"] for m in members]
        agg["n_seeds"] = len(members)
        if members[0].get("relation"):
            agg["relation"] = members[0]["relation"]
        fields = [k for k in members[0] if k not in _ROW_IDENTITY and k not in agg]
        for f in fields:
            values = [m[f] for m in members if _number(m.get(f))]
            if values:
                agg[f] = _stats([float(v) for v in values])
        out.append(agg)
    return out


def _interval(a: dict[str, Any], field: str) -> tuple[float, float] | None:
    s = a.get(field)
    if not isinstance(s, dict) or s.get("std") is None:
        return None
    return s["mean"] - s["std"], s["mean"] + s["std"]


def overlaps(agg: list[dict[str, Any]]) -> list[str]:
    """Notes for pairs of arms whose mean ± std (over seeds) intervals overlap: likelihood NLL, and gen PPL
    (seq-mean) of two arms at the same step count."""
    notes = []
    like = [a for a in agg if a["kind"] == "likelihood"]
    pairs = [(a, b, "nll", "likelihood NLL") for i, a in enumerate(like) for b in like[i + 1 :]]
    samp = [a for a in agg if a["kind"] == "samples"]
    pairs += [
        (a, b, "gen_ppl_seq_mean", f"gen PPL at {a['steps']} steps")
        for i, a in enumerate(samp)
        for b in samp[i + 1 :]
        if a["arm"] != b["arm"]
        and a["steps"] == b["steps"]
        and a["steps"] is not None
        and a.get("temperature") == b.get("temperature")
    ]
    for a, b, field, what in pairs:
        ia, ib = _interval(a, field), _interval(b, field)
        if ia is not None and ib is not None and ia[0] <= ib[1] and ib[0] <= ia[1]:
            notes.append(
                f"{what}: arms {a['arm']} and {b['arm']} overlap within one std over seeds "
                f"({a[field]['mean']:.4g} ± {a[field]['std']:.2g} vs {b[field]['mean']:.4g} ± {b[field]['std']:.2g})"
            )
    return notes


def matched(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Formal corpora (samples rows with TER): per seed, each diffusion arm x sampler against each AR arm, the
    smallest step count whose TER (and SER) matches AR's and the wall-time speedup there
    (``dlm.eval.formal.matched_speedup``: within ``MATCH_K`` standard errors of the difference)."""
    from dlm.eval.formal import matched_speedup

    samples = [r for r in rows if r["kind"] == "samples" and (r.get("ter") is not None or r.get("ser") is not None)]
    out = []
    for ar in (r for r in samples if r["family"] == "ar"):
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in samples:
            same = r["seed"] == ar["seed"] and r.get("temperature") == ar.get("temperature")
            if r["family"] != "ar" and same and r["steps"] is not None:
                groups.setdefault((r["arm"], r["sampler"]), []).append(r)
        for (arm, sampler), group in groups.items():
            out.append({
                "arm": arm, "sampler": sampler, "seed": ar["seed"], "ar_arm": ar["arm"],
                "temperature": ar.get("temperature"),
                "matched_ter": matched_speedup(ar, group, "ter"), "matched_ser": matched_speedup(ar, group, "ser"),
            })  # fmt: skip
    return out


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(dlm.__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _suite_protocol(spec: Any) -> dict[str, Any]:
    """The conditional-generation and downstream settings, for the evaluations the spec runs."""
    from dataclasses import asdict

    e = spec.evaluation
    out = {"conditional": asdict(e.conditional)} if e.conditional.n else {}
    return out | ({"downstream": asdict(e.downstream)} if e.downstream.tasks else {})


def _zero_shot_protocol(cdir: Any, zdirs: dict[str, Path]) -> list[dict[str, Any]]:
    """Per zero-shot corpus: its directory, source, tokenizer, the split scored and its size."""
    from dlm.compare.zeroshot import zero_shot_split
    from dlm.data.shards import read_meta

    out = []
    for z in cdir.spec.evaluation.zero_shot:
        meta = read_meta(zdirs[z.name])
        split = zero_shot_split(cdir.spec, z)
        sp = meta["splits"].get(split) or {}
        out.append({
            "name": z.name, "dir": _rel(zdirs[z.name], cdir.root), "source": meta["source"].get("spec"),
            "source_options": list(z.source_options), "tokenizer": meta["tokenizer"]["name"],
            "tokenizer_from": meta["tokenizer"].get("from"), "seq_len": meta["seq_len"], "mode": meta["mode"],
            "split": split, "documents": sp.get("documents"), "tokens": sp.get("tokens"),
            "max_batches": z.max_batches if z.max_batches is not None else cdir.spec.evaluation.likelihood.max_batches,
        })  # fmt: skip
    return out


def _protocol(cdir: Any, data_dir: Path, evaluator: dict[str, Any] | None, device: str) -> dict[str, Any]:
    import torch

    from dlm.data.shards import read_meta
    from dlm.eval.run import SCORED_RULE
    from dlm.eval.speed import machine_info

    spec = cdir.spec
    meta = read_meta(data_dir)
    lk, sm, sp = spec.evaluation.likelihood, spec.evaluation.samples, spec.evaluation.speed
    b = spec.budget
    return {
        "data": {
            "dir": _rel(data_dir, cdir.root),
            "source": meta["source"].get("spec"),
            "tokenizer": meta["tokenizer"]["name"],
            "vocab_size": meta["tokenizer"]["vocab_size"],
            "seq_len": meta["seq_len"],
            "mode": meta["mode"],
            "splits": {k: {"documents": v["documents"], "tokens": v["tokens"]} for k, v in meta["splits"].items()},
        },
        "likelihood": {
            "split": lk.split,
            "t_samples": lk.t_samples,
            "max_batches": lk.max_batches,
            "scored": SCORED_RULE,
        },
        "budget": {k: getattr(b, k) for k in ("steps", "tokens", "minutes") if getattr(b, k) is not None},
        "samples": {"n": sm.n, "steps": list(sm.steps), "temperature": sm.temperature, "seed": sm.seed}
        | ({"temperatures": list(sm.temperatures)} if sm.temperatures else {}),
        "speed": {
            "batch_sizes": list(sp.batch_sizes),
            "repeats": sp.repeats,
            "protocol_tokens": sp.protocol_tokens,
            "runs": "each arm's first seed (speed does not depend on the weights' values)",
        },
        "evaluator": evaluator,
        "machine": machine_info(device),
        "versions": {"dlm": dlm.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "git_commit": _git_commit(),
    }


def _runs(cdir: Any, records: list[Any]) -> list[dict[str, Any]]:
    from dlm.rundir import list_checkpoints, read_info, read_run_info

    out = []
    for r in records:
        ckpts = list_checkpoints(r.run_dir)
        info = read_info(ckpts[-1][1]) if ckpts else {}
        out.append({
            "arm": r.arm, "family": r.family, "seed": r.seed, "run_dir": _rel(r.run_dir, cdir.root),
            "params": read_run_info(r.run_dir).get("params"), "step": ckpts[-1][0] if ckpts else 0,
            "tokens": info.get("tokens"), "train_wall_s": info.get("elapsed"), "stopped": info.get("stopped"),
        })  # fmt: skip
    return out


def to_csv(rows: list[dict[str, Any]], agg: list[dict[str, Any]]) -> str:
    """The seed rows then the aggregate rows (``<field>_mean``, ``_std``, ``_n``), one header, a ``row_type``."""
    flat = [{"row_type": "seed", **r} for r in rows]
    for a in agg:
        row: dict[str, Any] = {"row_type": "aggregate"}
        for k, v in a.items():
            if isinstance(v, dict):
                row.update({f"{k}_mean": v["mean"], f"{k}_std": v["std"], f"{k}_n": v["n"]})
            else:
                row[k] = ";".join(map(str, v)) if isinstance(v, list) else v
        flat.append(row)
    header: list[str] = []
    for r in flat:
        header += [k for k in r if k not in header]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    w.writeheader()
    w.writerows(flat)
    return buf.getvalue()


def write_results(
    cdir: Any,
    data_dir: Path,
    records: list[Any],
    judge_dir: Path | None,
    judge_likelihood: tuple[dict[str, Any], Path] | None,
    wall: dict[str, float],
    device: str,
    zdirs: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """Write DIR/results.json and DIR/results.csv (atomically) and return the results; ``zdirs``: the zero-shot
    corpora's directories by name (``protocol.zero_shot``)."""
    import datetime as _dt

    from dlm.compare.spec import spec_hash

    root = Path(cdir.root)
    rows = build_rows(records, root)
    agg = aggregate(rows)
    evaluator = next((q.get("evaluator") for r in records for (_s, _sp, q, _qp) in r.samples), None)
    judge: dict[str, Any] = {"kind": cdir.spec.evaluation.evaluator}
    if judge_dir is not None:
        judge["run_dir"] = _rel(judge_dir, root)
    if judge_likelihood is not None:
        base = {"arm": "judge", "family": "ar", "seed": cdir.spec.evaluation.judge.seed}
        judge["likelihood"] = _likelihood_row(base, *judge_likelihood, root)
    if cdir.spec.evaluation.evaluator.startswith("hf:"):
        judge["hf_dir"] = cdir.spec.evaluation.evaluator[3:]
    results = {
        "name": cdir.spec.name,
        "spec_hash": spec_hash(cdir.spec),
        "spec": cdir.spec.to_dict(),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "wall_s": wall,
        "protocol": _protocol(cdir, data_dir, evaluator, device)
        | ({"zero_shot": _zero_shot_protocol(cdir, zdirs)} if zdirs else {})
        | _suite_protocol(cdir.spec),
        "runs": _runs(cdir, records),
        "rows": rows,
        "aggregate": agg,
        "judge": judge,
        "overlaps": overlaps(agg),
        "matched": matched(rows),
        "definitions": dict(DEFINITIONS),
    }
    write_json_atomic(root / RESULTS_FILE, results)
    write_text_atomic(root / CSV_FILE, to_csv(rows, agg))
    return results
