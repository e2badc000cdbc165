"""A fake comparison directory (docs/COMPARE.md layout) for report tests, and the headless-browser helper.

``make_compare_dir`` writes a schema-complete ``results.json`` (rows, aggregates over seeds, protocol, overlaps,
definitions), ``spec.yaml``, ``runs/{arm}-seed{seed}/metrics.jsonl`` and the samples files named by the sample
rows, with numbers chosen by hand so that tests can recompute every aggregate. No training, no torch.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

STEPS = (4, 16)  # sampling step counts of the diffusion arms
N_SAMPLES = 3
SAMPLE_LEN = 12
BATCH_SIZES = (1, 4)
_NON_NUMERIC = {"kind", "arm", "family", "seed", "sampler", "steps", "batch_size", "split", "relation", "file"}


def likelihood_nll(arm_index: int, seed: int) -> float:
    """The fixture's NLL (nats/token) of arm number ``arm_index`` and ``seed``: distinct per arm and seed."""
    return round(2.0 + 0.5 * arm_index + 0.03 * seed + 0.01 * arm_index * seed, 6)


def gen_ppl(arm_index: int, seed: int, steps: int | None) -> float:
    """The fixture's per-sample-mean gen PPL: falls with the step count, AR (steps None) lowest."""
    base = 10.0 + 4.0 * arm_index + 0.5 * seed
    return round(base if steps is None else base + 64.0 / steps, 6)


def _aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean, sample std (n-1; None for one seed), min, max and n (seeds with a value) over seeds of every numeric
    field, per (kind, arm, sampler, steps, batch_size); a field without values is left out."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        key = (r["kind"], r["arm"], r.get("sampler"), r.get("steps"), r.get("batch_size"))
        groups.setdefault(key, []).append(r)
    out = []
    for (kind, arm, sampler, steps, batch), grp in groups.items():
        agg: dict[str, Any] = {"kind": kind, "arm": arm, "family": grp[0]["family"], "sampler": sampler}
        agg |= {"steps": steps, "batch_size": batch, "seeds": [r["seed"] for r in grp], "n_seeds": len(grp)}
        for f, v in grp[0].items():
            if f in _NON_NUMERIC or isinstance(v, bool) or not isinstance(v, int | float):
                continue
            vals = [r[f] for r in grp if r[f] is not None]
            if vals:
                std = statistics.stdev(vals) if len(vals) > 1 else None
                agg[f] = {
                    "mean": statistics.fmean(vals),
                    "std": std,
                    "min": min(vals),
                    "max": max(vals),
                    "n": len(vals),
                }
        out.append(agg)
    return out


def _samplers(family: str) -> list[tuple[str, int | None]]:
    return [("ar", None)] if family == "ar" else [("ddpm_cache", s) for s in STEPS]


def _samples_file(root: Path, rel: str, family: str, sampler: str, steps: int | None, seed: int) -> None:
    """A samples file: ``N_SAMPLES`` byte-level texts; diffusion samples reveal token i at step 1 + i mod S."""
    samples = []
    for i in range(N_SAMPLES):
        text = f"s{seed} <b>&x{i} yz"[:SAMPLE_LEN].ljust(SAMPLE_LEN, ".")
        ids = [ord(c) for c in text]
        reveal = None if steps is None else [1 + (j * 7 + i) % steps for j in range(len(ids))]
        samples.append(
            {"index": i, "batch": 0, "ids": ids, "text": text, "tokens": len(ids), "nfe": steps or len(ids)}
            | {"wall_s_batch": 0.01, "stop": "length", "reveal_step": reveal}
        )
    body = {"kind": "samples", "settings": {}, "family": family, "sampler": sampler, "steps": steps}
    body |= {"temperature": 1.0, "n": N_SAMPLES, "length": SAMPLE_LEN + 1, "seed": 0, "batch_size": N_SAMPLES}
    body |= {"checkpoint_step": 20, "nfe": steps or SAMPLE_LEN, "wall_s": 0.03, "wall_s_per_sequence": 0.01}
    body |= {"created": "2026-01-01T00:00:00Z", "samples": samples}
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=1))


def _metrics(run: Path, arm_index: int, seed: int) -> None:
    """Training lines every 5 steps (512 tokens a step) and validation lines at steps 10 and 20."""
    lines = []
    for step in range(5, 21, 5):
        loss = 5.0 - 0.1 * step + 0.2 * arm_index + 0.01 * seed
        lines.append({"step": step, "tokens": 512 * step, "loss": loss, "lr": 1e-3 * min(1.0, step / 10)})
        if step % 10 == 0:
            lines.append({"step": step, "split": "validation", "val_nll": loss + 0.1, "val_tokens": 256})
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def _run_rows(root: Path, arm: str, i: int, seed: int, formal: bool) -> list[dict[str, Any]]:
    """The likelihood, samples and speed rows of one (arm, seed), with their samples files written."""
    family = arm.split("-")[0]
    nll = likelihood_nll(i, seed)
    exact = family == "ar"
    base = {"arm": arm, "family": family, "seed": seed}
    rows: list[dict[str, Any]] = [
        {"kind": "likelihood", **base, "split": "test", "exact": exact, "relation": "=" if exact else "≤"}
        | {"nll": nll, "nll_se": 0.01, "bpt": nll / 0.6931471805599453, "ppl": 2.718281828459045**nll}
        | {"ppl_seq_mean": 2.718281828459045**nll * 1.1, "bits_per_byte": nll / 0.6931471805599453}
        | {"tokens": 1024, "sequences": 32, "t_samples": None if exact else 1, "file": "x.json"}
    ]
    for sampler, steps in _samplers(family):
        rel = f"runs/{arm}-seed{seed}/eval/samples-{sampler}-steps{steps or 'none'}-step20-abc.json"
        _samples_file(root, rel, family, sampler, steps, seed)
        g = gen_ppl(i, seed, steps)
        row = {"kind": "samples", **base, "sampler": sampler, "steps": steps, "temperature": 1.0, "n": N_SAMPLES}
        row |= {"nfe": steps or SAMPLE_LEN, "wall_s_per_sequence": 0.001 * (steps or SAMPLE_LEN) * (1 + i)}
        row |= {"gen_ppl_seq_mean": None if formal else g, "gen_ppl_pooled": None if formal else g * 0.9}
        row |= {"judge_nll": None if formal else 2.3, "judge_nll_se": None if formal else 0.05}
        row |= {"entropy_mean": 2.0 + (steps or 32) / 64 + 0.01 * seed, "entropy_se": 0.02}
        row |= {"distinct_1": 0.5, "distinct_2": 0.8, "repetition_rate": 0.3}
        ter = (1.2 + 8.0 / steps if steps else 1.1) + 0.01 * seed + 0.1 * i
        row |= {"ter": ter if formal else None, "ter_se": 0.02 if formal else None}
        row |= {"ser": 0.1 + 0.01 * seed if formal else None, "ser_se": 0.01 if formal else None, "file": rel}
        rows.append(row)
        for b in BATCH_SIZES:
            sps = 0.002 * (steps or SAMPLE_LEN) * (1 + i) / b
            rows.append(
                {"kind": "speed", **base, "sampler": sampler, "steps": steps, "batch_size": b, "median_s": sps * b}
                | {"seconds_per_sequence": sps, "tokens_per_s": SAMPLE_LEN / sps, "nfe": steps or SAMPLE_LEN}
                | {"peak_memory_bytes": None, "file": "speed.json"}
            )
    return rows


def make_compare_dir(
    tmp_path: Path, *, arms: tuple[str, ...] = ("ar", "mdlm"), seeds: tuple[int, ...] = (0, 1), formal: bool = False
) -> Path:
    """Write a fake finished comparison into ``tmp_path / "cmp"`` and return that directory."""
    root = Path(tmp_path) / "cmp"
    root.mkdir(parents=True)
    (root / "spec.yaml").write_text(f"name: fixture\narms: {list(arms)}\nseeds: {list(seeds)}\nbudget: {{steps: 20}}\n")
    rows: list[dict[str, Any]] = []
    runs = []
    for i, arm in enumerate(arms):
        for seed in seeds:
            run = f"runs/{arm}-seed{seed}"
            _metrics(root / run, i, seed)
            family = arm.split("-")[0]
            runs.append({"arm": arm, "family": family, "seed": seed, "run_dir": run, "params": 12345})
            runs[-1] |= {"step": 20, "tokens": 10240, "train_wall_s": 1.5, "status": "finished"}
            rows += _run_rows(root, arm, i, seed, formal)
    evaluator = {"kind": "true-language" if formal else "judge-ar", "name": "judge", "tokenizer": "bytes"}
    evaluator |= {"retokenisation": "none: same tokenizer", "likelihood": None}
    protocol = {
        "data": {"source": "formal:2gram" if formal else "shakespeare", "tokenizer": "bytes", "vocab_size": 258}
        | {"seq_len": 32, "mode": "wrap", "splits": {"train": {"documents": 9, "tokens": 9000}}},
        "likelihood": {"split": "test", "t_samples": 1, "max_batches": 2, "scored": "every position after BOS"},
        "budget": {"steps": 20},
        "samples": {"n": N_SAMPLES, "steps": list(STEPS), "temperature": 1.0, "seed": 0},
        "evaluator": evaluator,
        "machine": {"cpu_model": "Fake CPU <x86>", "cpu_count": 2, "device": "cpu"},
        "versions": {"dlm": "0.1.0", "torch": "2.x", "python": "3.11"},
        "git_commit": "0123abcd",
    }
    results = {
        "name": "fixture",
        "spec_hash": "deadbeef",
        "spec": {"name": "fixture", "arms": [{"family": a.split("-")[0], "name": a} for a in arms]},
        "created": "2026-01-02T03:04:05Z",
        "wall_s": {"train": 10.0, "total": 20.0},
        "protocol": protocol,
        "runs": runs,
        "rows": rows,
        "aggregate": _aggregate(rows),
        "judge": {"kind": evaluator["kind"], "run_dir": None if formal else "judge", "likelihood": None},
        "overlaps": [f"likelihood: arms {arms[0]} and {arms[-1]} do not overlap within one std over seeds"],
        "definitions": {"nll": "mean negative log-likelihood per scored token, nats", "bpt": "nll / ln 2"},
    }
    (root / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    return root


# ----------------------------------------------------------------------------- headless browser


def find_chromium() -> tuple[str | None, str]:
    """The path of a Chromium binary (installing Debian's package when root with apt-get), or (None, why not)."""
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path, ""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None, "chromium is not on PATH and it cannot be installed here (not root or no apt-get)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "chromium"]
    try:
        if subprocess.run(install, env=env, timeout=900, capture_output=True).returncode != 0:
            # stale package lists on a fresh machine: refresh them once and retry
            subprocess.run(["apt-get", "update", "-q"], env=env, timeout=300, capture_output=True)
            subprocess.run(install, env=env, timeout=900, capture_output=True)
    except (subprocess.TimeoutExpired, OSError) as e:
        return None, f"installing chromium failed: {e}"
    path = shutil.which("chromium")
    return (path, "") if path else (None, "apt-get install chromium did not provide a chromium binary")


def chromium(binary: str, profile: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run headless Chromium with its own profile directory and ``args`` (e.g. ``--dump-dom URL``); stdout
    captured as text."""
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}"]
    cmd += args
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


# ----------------------------------------------------------------------------- reading the HTML back


class _Tables(HTMLParser):
    """Tables by id -> {row id: [cell texts]}, and every (tag, attribute, value) of src/href attributes."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, dict[str, list[str]]] = {}
        self.links: list[tuple[str, str, str]] = []
        self._table: str | None = None
        self._row: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.links += [(tag, k, v or "") for k, v in attrs if k in ("src", "href")]
        if tag == "table":
            self._table = a.get("id") or ""
            self.tables[self._table] = {}
        elif tag == "tr" and self._table is not None and a.get("id"):
            self._row = a["id"]
            self.tables[self._table][self._row] = []
        elif tag == "td" and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._table is not None and self._row is not None:
            self.tables[self._table][self._row].append("".join(self._cell))
            self._cell = None
        elif tag == "tr":
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse_html(text: str) -> tuple[dict[str, dict[str, list[str]]], list[tuple[str, str, str]]]:
    """(tables by id: {row id: cell texts}, [(tag, "src"|"href", value)]) of an HTML document."""
    parser = _Tables()
    parser.feed(text)
    parser.close()
    return parser.tables, parser.links
