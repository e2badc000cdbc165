"""The comparison report (``dlm report DIR``): report.md, a self-contained report.html and figures/*.png, from
files alone (docs/COMPARE.md): DIR/results.json, DIR/spec.yaml, each run's metrics.jsonl and the samples files
that results.json's rows name. No training code is imported.

Every number is labelled: ``=`` an exact likelihood, ``≤`` an upper bound; ``mean ± std`` is over seeds
(sample std, n-1; one seed shows no std) with the seed count; ``± SE`` a standard error over sequences.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlm.compare.figures import (
    FigureFile,
    aggregates,
    arm_order,
    draw_figures,
    point_label,
    speed_quality_points,
    stat,
    temperature,
)
from dlm.compare.report_tables import matched_items, suite_items, variance_items, zero_shot_items
from dlm.errors import DlmError
from dlm.io import write_text_atomic
from dlm.rundir import read_metrics

__all__ = ["build_report", "fmt", "load_results", "mean_std", "summary_lines", "trajectory_frames", "visible"]

RESULTS_FILE = "results.json"
SPEC_FILE = "spec.yaml"
FIGURES_DIR = "figures"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
UNREVEALED = "░"
_VISIBLE = {c: 0x2400 + c for c in range(32)} | {10: ord("↵"), 9: ord("→"), 127: 0x2421}
_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;padding:0 1em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.4em;font-size:13px}
th,td{border:1px solid #bbb;padding:3px 7px;text-align:right;vertical-align:top;white-space:nowrap}
th{background:#eef1f5;white-space:normal}div.table{overflow-x:auto}td:first-child,th:first-child{text-align:left}
table.protocol td,table.protocol th,table.samples td,table.definitions td{text-align:left;white-space:normal}
table.samples th,table.trajectory th,table.definitions th{text-align:left}
table.samples td:last-child,table.trajectory td:last-child{font-family:monospace;white-space:pre-wrap;text-align:left}
figure{display:inline-block;width:48%;margin:0 1% 1em 0;vertical-align:top}figure img{width:100%}
img{border:1px solid #ddd}p.missing{color:#a33}p.note{color:#555;font-size:13px}"""


@dataclass
class Table:
    """A table of the report: ``id`` and ``cls`` in HTML, each row ``(row id, cells)``."""

    id: str
    cls: str
    header: list[str]
    rows: list[tuple[str, list[str]]] = field(default_factory=list)


@dataclass
class Block:
    """A heading (``h2``), paragraph (``p``), note (``note``) or list (``ul``, text = items joined by \\n)."""

    kind: str
    text: str


# ----------------------------------------------------------------------------- reading


def load_results(compare_dir: str | Path) -> dict[str, Any]:
    """DIR/results.json, checked to be a comparison's results (rows and aggregate lists); DlmError otherwise."""
    path = Path(compare_dir) / RESULTS_FILE
    if not path.is_file():
        raise DlmError(f"{compare_dir}: no {RESULTS_FILE} (run dlm compare first)")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DlmError(f"unreadable {path}: {' '.join(str(e).split())}") from None
    if not isinstance(results, dict) or not all(isinstance(results.get(k), list) for k in ("rows", "aggregate")):
        raise DlmError(f"{path}: not a dlm compare results file (no 'rows' and 'aggregate' lists)")
    for key, needed in (("rows", ("kind", "arm", "seed")), ("aggregate", ("kind", "arm")), ("runs", ("arm", "seed"))):
        for i, entry in enumerate(results.get(key) or []):
            if not isinstance(entry, dict) or any(k not in entry for k in needed):
                raise DlmError(f"{path}: {key}[{i}] lacks one of {', '.join(needed)} (see docs/COMPARE.md)")
    return results


def _read_samples(compare_dir: Path, rel: str | None) -> list[dict[str, Any]] | str:
    """The ``samples`` list of a samples file (path relative to DIR), or why it cannot be read."""
    if not rel:
        return "no samples file named"
    try:
        body = json.loads((compare_dir / rel).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{rel} unreadable ({type(e).__name__})"
    samples = body.get("samples") if isinstance(body, dict) else None
    return samples if isinstance(samples, list) else f"{rel} holds no samples list"


# ----------------------------------------------------------------------------- formatting


def fmt(x: Any, nd: int = 4) -> str:
    """A number with ``nd`` decimals (scientific when very large or small), '–' for null."""
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return "–"
    if isinstance(x, int):
        return str(x)
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 10**-nd):
        return f"{x:.{max(nd - 1, 1)}e}"
    return f"{x:.{nd}f}"


def mean_std(agg: Mapping[str, Any] | None, name: str, nd: int = 4, scale: float = 1.0) -> str:
    """``mean ± std`` over seeds of an aggregate field times ``scale`` (``mean`` alone for one seed; the count
    when fewer seeds than the group's have a value), '–' when absent."""
    mean = None if agg is None else stat(agg, name)
    if mean is None:
        return "–"
    std, n, seeds = stat(agg, name, "std"), stat(agg, name, "n"), agg.get("n_seeds")
    fewer = f" (n={n:.0f} of {seeds} seeds)" if n is not None and isinstance(seeds, int) and n < seeds else ""
    return fmt(mean * scale, nd) + ("" if std is None else f" ± {fmt(std * scale, nd)}") + fewer


def _steps(s: Any) -> str:
    return "–" if s is None else str(s)


def _relation(results: Mapping[str, Any], arm: str) -> str:
    """'=' when every likelihood row of ``arm`` is exact, else '≤' (an upper bound)."""
    rels = {r.get("relation") for r in results["rows"] if r.get("kind") == "likelihood" and r["arm"] == arm}
    return "=" if rels == {"="} else "≤"


# ----------------------------------------------------------------------------- tables


def likelihood_tables(results: Mapping[str, Any]) -> list[Table]:
    """The likelihood aggregate per arm (= exact, ≤ bound; mean ± std over seeds) and the per-seed rows (± SE)."""
    head = ["arm", "family", "split", "NLL nats/token (mean ± std over seeds)", "BPT", "PPL = exp(mean NLL)"]
    agg = Table("likelihood", "likelihood", [*head, "PPL (mean of per-sequence exp)", "bits/byte", "seeds"])
    split = next((r.get("split") for r in results["rows"] if r.get("kind") == "likelihood"), None)
    for a in aggregates(results, "likelihood"):
        cells = [a["arm"], str(a.get("family")), str(split), f"{_relation(results, a['arm'])} {mean_std(a, 'nll')}"]
        cells += [mean_std(a, "bpt"), mean_std(a, "ppl", 2), mean_std(a, "ppl_seq_mean", 2)]
        cells += [mean_std(a, "bits_per_byte"), str(a.get("n_seeds"))]
        agg.rows.append((f"likelihood-{a['arm']}", cells))
    head = ["arm", "seed", "split", "NLL nats/token ± SE", "BPT", "PPL", "PPL (seq mean)", "bits/byte", "tokens"]
    seeds = Table("likelihood-seeds", "likelihood-seeds", [*head, "sequences", "K draws"])
    for r in _sorted_rows(results, "likelihood"):
        nll = f"{r.get('relation')} {fmt(r.get('nll'))}" + ("" if r.get("nll_se") is None else f" ± {fmt(r['nll_se'])}")
        cells = [r["arm"], str(r["seed"]), str(r.get("split")), nll, fmt(r.get("bpt")), fmt(r.get("ppl"), 2)]
        cells += [fmt(r.get("ppl_seq_mean"), 2), fmt(r.get("bits_per_byte")), fmt(r.get("tokens"))]
        cells += [fmt(r.get("sequences")), fmt(r.get("t_samples"))]
        seeds.rows.append((f"likelihood-{r['arm']}-seed{r['seed']}", cells))
    return [agg, seeds]


def _sorted_rows(results: Mapping[str, Any], kind: str) -> list[Mapping[str, Any]]:
    order = {a: i for i, a in enumerate(arm_order(results))}
    rows = [r for r in results["rows"] if r.get("kind") == kind]
    return sorted(rows, key=lambda r: (order.get(r["arm"], 0), r.get("seed", 0), str(r.get("sampler"))))


def quality_table(results: Mapping[str, Any]) -> Table:
    """Arm x sampler x steps: gen PPL both ways, entropy, distinct-1/2, repetition, NFE, s/sequence (mean ± std
    over seeds); TER/SER columns on a formal corpus."""
    formal = any((stat(a, "ter"), stat(a, "ser")) != (None, None) for a in aggregates(results, "samples"))
    temps = any(temperature(a) not in (None, 1.0) for a in aggregates(results, "samples"))
    table = Table(
        "quality",
        "quality",
        ["arm", "sampler", "steps"]
        + (["temperature"] if temps else [])
        + ["samples × seeds", "gen PPL (mean of per-sample exp)", "gen PPL (exp pooled)"]
        + ["entropy (nats)", "distinct-1", "distinct-2", "repetition rate", "NFE", "s/sequence (sampling)"]
        + (["TER", "SER"] if formal else []),
    )
    for a in aggregates(results, "samples"):
        n = next((r.get("n") for r in results["rows"] if r.get("kind") == "samples" and r["arm"] == a["arm"]), None)
        t = temperature(a)
        cells = [a["arm"], str(a.get("sampler")), _steps(a.get("steps"))] + ([fmt(t, 2)] if temps else [])
        cells += [f"{n} × {a.get('n_seeds')}", mean_std(a, "gen_ppl_seq_mean", 2), mean_std(a, "gen_ppl_pooled", 2)]
        cells += [mean_std(a, "entropy_mean")]
        cells += [mean_std(a, "distinct_1", 3), mean_std(a, "distinct_2", 3), mean_std(a, "repetition_rate", 3)]
        cells += [mean_std(a, "nfe", 1), mean_std(a, "wall_s_per_sequence")]
        cells += [mean_std(a, "ter"), mean_std(a, "ser", 3)] if formal else []
        tid = "" if t in (None, 1.0) else f"-t{t:g}"
        table.rows.append((f"quality-{a['arm']}-{a.get('sampler')}-{_steps(a.get('steps'))}{tid}", cells))
    return table


def speed_tables(results: Mapping[str, Any]) -> list[Table]:
    """Latency/throughput per arm x sampler x steps x batch size, and the thesis protocol (batch 4) if run."""
    head = ["arm", "sampler", "steps", "batch", "median s/batch", "s/sequence", "tokens/s (generated)", "NFE"]
    speed = Table("speed", "speed", [*head, "peak memory MiB", "seeds"])
    for a in aggregates(results, "speed"):
        cells = [a["arm"], str(a.get("sampler")), _steps(a.get("steps")), str(a.get("batch_size"))]
        cells += [mean_std(a, "median_s"), mean_std(a, "seconds_per_sequence"), mean_std(a, "tokens_per_s", 1)]
        cells += [mean_std(a, "nfe", 1), mean_std(a, "peak_memory_bytes", 1, scale=2.0**-20), str(a.get("n_seeds"))]
        speed.rows.append(
            (f"speed-{a['arm']}-{a.get('sampler')}-{_steps(a.get('steps'))}-b{a.get('batch_size')}", cells)
        )
    proto = Table(
        "speed-protocol",
        "speed",
        ["arm", "sampler", "steps", "batches/s (batch 4)", "tokens/s", "batches", "generated tokens", "seeds"],
    )
    for a in aggregates(results, "speed_protocol"):
        cells = [a["arm"], str(a.get("sampler")), _steps(a.get("steps")), mean_std(a, "batches_per_s")]
        cells += [mean_std(a, "tokens_per_s", 1), mean_std(a, "batches", 1), mean_std(a, "generated_tokens", 0)]
        proto.rows.append(
            (f"protocol-{a['arm']}-{a.get('sampler')}-{_steps(a.get('steps'))}", [*cells, str(a["n_seeds"])])
        )
    return [speed] + ([proto] if proto.rows else [])


def speed_quality_table(results: Mapping[str, Any]) -> Table:
    """Per arm and step count: gen PPL (mean of per-sample exp; TER on a formal corpus), ± std over seeds, and
    seconds per sequence."""
    head = ["arm", "sampler", "steps", "quality", "quality (mean ± std over seeds)", "s/sequence", "measured by"]
    table = Table("speed-quality", "speed-quality", head)
    for p in speed_quality_points(results):
        q = {"q": {"mean": p["quality"], "std": p["quality_std"]}}
        name = "gen PPL (seq mean)" if p["quality_name"] == "gen PPL" else "TER"
        cells = [p["arm"], str(p["sampler"]), _steps(p["steps"]), name, mean_std(q, "q", 2 if name != "TER" else 4)]
        cells += [fmt(p["seconds_per_sequence"]), p["source"]]
        table.rows.append((f"sq-{p['arm']}-{p['sampler']}-{_steps(p['steps'])}", cells))
    return table


def protocol_table(results: Mapping[str, Any]) -> Table:
    """What was compared, how: data, split, budget, samples, evaluator, machine, versions, commit, created."""
    p = results.get("protocol") or {}
    table = Table("protocol", "protocol", ["item", "value"])

    def add(key: str, value: Any) -> None:
        if isinstance(value, Mapping):
            value = ", ".join(f"{k}: {_plain(v)}" for k, v in value.items())
        table.rows.append((f"protocol-{key}", [key, _plain(value)]))

    add("name", results.get("name"))
    add("created", results.get("created"))
    add("spec hash", results.get("spec_hash"))
    for key in ("data", "likelihood", "budget", "samples", "evaluator", "machine", "versions"):
        add(key, {k: v for k, v in (p.get(key) or {}).items() if k != "likelihood"})
    add("git commit", p.get("git_commit"))
    judge = results.get("judge") or {}
    if judge:
        lik = judge.get("likelihood") or {}
        add(
            "judge",
            {k: v for k, v in judge.items() if k != "likelihood"} | {"NLL": lik.get("nll"), "split": lik.get("split")},
        )
    add("wall time (s)", results.get("wall_s"))
    return table


def _plain(v: Any) -> str:
    if isinstance(v, float):
        return fmt(v)
    if isinstance(v, Mapping | list):
        return json.dumps(v, ensure_ascii=False, sort_keys=True)
    return "–" if v is None else str(v)


# ----------------------------------------------------------------------------- samples and trajectory


def _samples_rows(results: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Per arm, the samples row shown: temperature 1 when swept, the largest step count (no steps for AR), the
    lowest seed."""
    best: dict[str, Mapping[str, Any]] = {}
    for r in _sorted_rows(results, "samples"):
        cur = best.get(r["arm"])
        if cur is None or (temperature(r) in (None, 1.0), r.get("steps") or 0) > (
            temperature(cur) in (None, 1.0),
            cur.get("steps") or 0,
        ):
            best[r["arm"]] = r
    return best


def sample_table(results: Mapping[str, Any], samples: Mapping[str, list | str]) -> tuple[Table, list[str]]:
    """The first two samples per arm (largest step count, lowest seed); notes for unreadable samples files."""
    table = Table("samples", "samples", ["arm", "sampler", "steps", "seed", "sample", "text"])
    notes = []
    for arm, r in _samples_rows(results).items():
        got = samples.get(r.get("file") or "", "no samples file named")
        if isinstance(got, str):
            notes.append(f"{arm}: {got}")
            continue
        for s in got[:2]:
            cells = [arm, str(r.get("sampler")), _steps(r.get("steps")), str(r.get("seed")), str(s.get("index"))]
            table.rows.append((f"sample-{arm}-{s.get('index')}", [*cells, visible(str(s.get("text", "")))]))
    return table, notes


def visible(text: str) -> str:
    """``text`` with each control character shown as one visible character (newline ↵, tab →, others as their
    Unicode control picture), so a sample keeps its length and a table its rows."""
    return text.translate(_VISIBLE)


def _pieces(sample: Mapping[str, Any]) -> list[str] | None:
    """One display string per generated id: the sample's ``pieces`` when saved, else the characters of its text
    when there is one per id (byte/character tokenizers), else None."""
    ids = sample.get("ids") or []
    if isinstance(sample.get("pieces"), list) and len(sample["pieces"]) == len(ids):
        return [visible(str(p)) for p in sample["pieces"]]
    text = str(sample.get("text", ""))
    return list(visible(text)) if len(text) == len(ids) else None


def trajectory_frames(
    reveal_step: Sequence[int], pieces: Sequence[str], steps: int, fractions: Iterable[float] = (0.25, 0.5, 0.75, 1.0)
) -> list[tuple[int, int, str]]:
    """The sample as it stood after each fraction f of the ``steps`` sampling steps: (step t = ceil(f S), tokens
    revealed, text) where token i shows if ``reveal_step[i] <= t``, else ``UNREVEALED``."""
    assert len(reveal_step) == len(pieces), "one reveal step per token"
    out = []
    for f in fractions:
        t = math.ceil(f * steps)
        shown = [p if r is not None and r <= t else UNREVEALED for r, p in zip(reveal_step, pieces, strict=True)]
        out.append((t, sum(1 for r in reveal_step if r is not None and r <= t), "".join(shown)))
    return out


def trajectory_table(results: Mapping[str, Any], samples: Mapping[str, list | str]) -> Table | str:
    """The denoising trajectory of one diffusion sample (the first with a saved ``reveal_step``), or why none."""
    for arm, r in _samples_rows(results).items():
        got = samples.get(r.get("file") or "")
        if r.get("steps") is None or not isinstance(got, list):
            continue
        for s in got:
            pieces = _pieces(s)
            if isinstance(s.get("reveal_step"), list) and pieces and len(pieces) == len(s["reveal_step"]):
                table = Table("trajectory", "trajectory", ["after step", "tokens revealed", "text"])
                head = f"{arm}, {r.get('sampler')}, S = {r['steps']}, seed {r.get('seed')}, sample {s.get('index')}"
                for t, n, text in trajectory_frames(s["reveal_step"], pieces, int(r["steps"])):
                    table.rows.append((f"trajectory-{t}", [f"{t} / {r['steps']}", f"{n} / {len(pieces)}", text]))
                table.header[0] = f"after step ({head})"
                return table
    return "no diffusion sample with a saved reveal_step and one display string per token"


# ----------------------------------------------------------------------------- the document

Item = Block | Table | FigureFile


def _document(
    results: Mapping[str, Any], figures: list[FigureFile], samples: Mapping[str, list | str], spec_text: str
) -> list[Item]:
    """The report's content in order, shared by the Markdown and HTML renderings."""
    lik = results.get("protocol", {}).get("likelihood") or {}
    evaluator = results.get("protocol", {}).get("evaluator") or {}
    doc: list[Item] = [
        Block("h1", f"dlm compare: {results.get('name')}"),
        Block(
            "note",
            f"results.json created {results.get('created')}; spec hash {results.get('spec_hash')}. "
            "'=' exact likelihood, '≤' upper bound; 'mean ± std' over seeds (sample std, n-1), '± SE' over "
            "sequences; '–' not measured.",
        ),
        Block("h2", "Protocol"),
        protocol_table(results),
        Block("h2", "Likelihood"),
        Block(
            "note",
            f"split {lik.get('split')}, K = {lik.get('t_samples')} Monte-Carlo draws per sequence for the "
            f"diffusion bounds, {_batches_text(lik.get('max_batches'))}; scored: {lik.get('scored')}.",
        ),
        *likelihood_tables(results),
        *zero_shot_items(results),
        *variance_items(results),
        Block("h2", "Sample quality"),
        Block(
            "note",
            f"evaluator {evaluator.get('kind')} ({evaluator.get('name')}), retokenisation: "
            f"{evaluator.get('retokenisation')}. gen PPL: mean over samples of exp(per-sample NLL) and exp of the "
            "pooled mean NLL; mean ± std over seeds.",
        ),
        quality_table(results),
        *suite_items(results),
        Block("h2", "Speed"),
        Block("note", "median of repeats after warm-up, device synchronised; mean ± std over seeds."),
        *speed_tables(results),
        Block("h2", "Speed–quality"),
        speed_quality_table(results),
        *matched_items(results),
        Block("h2", "Overlap notes"),
        Block("ul", "\n".join(results.get("overlaps") or ["none recorded"])),
        Block("h2", "Figures"),
        *figures,
        Block("h2", "Samples"),
    ]
    table, notes = sample_table(results, samples)
    doc += [table, *(Block("missing", n) for n in notes)]
    doc.append(Block("h2", "Denoising trajectory"))
    traj = trajectory_table(results, samples)
    doc.append(traj if isinstance(traj, Table) else Block("missing", traj))
    defs = Table("definitions", "definitions", ["field", "definition"])
    defs.rows = [(f"def-{k}", [k, str(v)]) for k, v in (results.get("definitions") or {}).items()]
    doc += [Block("h2", "Definitions"), defs, Block("h2", "Spec (spec.yaml)"), Block("pre", spec_text)]
    return doc


def _batches_text(max_batches: Any) -> str:
    """``evaluation.likelihood.max_batches`` in words (0 = the whole split)."""
    return "the whole split" if not max_batches else f"its first {max_batches} batches"


def _md_cell(s: str) -> str:
    return html.escape(s, quote=False).replace("|", "\\|").replace("\n", " ")


def render_markdown(doc: Sequence[Item]) -> str:
    """GitHub-flavoured Markdown; figures as relative links to figures/NAME.png."""
    out: list[str] = []
    for item in doc:
        if isinstance(item, Table):
            out.append("| " + " | ".join(_md_cell(h) for h in item.header) + " |")
            out.append("|" + "---|" * len(item.header))
            out += ["| " + " | ".join(_md_cell(c) for c in cells) + " |" for _, cells in item.rows]
        elif isinstance(item, FigureFile):
            if item.path is None:
                out.append(f"*{item.title}: not drawn: {item.missing}.*")
            else:
                out.append(f"![{item.title}]({FIGURES_DIR}/{item.path.name})\n\n*{item.title}: {item.caption}.*")
        elif item.kind in ("h1", "h2"):
            out.append(("# " if item.kind == "h1" else "## ") + item.text)
        elif item.kind == "ul":
            out.append("\n".join(f"- {line}" for line in item.text.splitlines()))
        elif item.kind == "pre":
            out.append(f"```yaml\n{item.text.rstrip()}\n```")
        elif item.kind == "missing":
            out.append(f"**Not available:** {item.text}")
        else:
            out.append(item.text)
        out.append("")
    return "\n".join(out)


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
    body = "".join(
        f'<tr id="{html.escape(rid)}">' + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
        for rid, cells in t.rows
    )
    return (
        f'<table class="{t.cls}" id="{html.escape(t.id)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    )


def render_html(doc: Sequence[Item], title: str) -> str:
    """One self-contained page: inline CSS, figures as base64 PNG data URIs, no script, no external URL."""
    parts = [f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>']
    parts.append(f"<style>{_CSS}</style></head><body>")
    for item in doc:
        if isinstance(item, Table):
            parts.append(f'<div class="table">{_html_table(item)}</div>')
        elif isinstance(item, FigureFile):
            if item.path is None:
                parts.append(f'<p class="missing" id="fig-{item.name}">{html.escape(item.title)}: not drawn: '
                             f"{html.escape(item.missing)}.</p>")  # fmt: skip
            else:
                data = base64.b64encode(item.path.read_bytes()).decode("ascii")
                parts.append(f'<figure id="fig-{item.name}"><img alt="{html.escape(item.title)}" '
                             f'src="data:image/png;base64,{data}"><figcaption>{html.escape(item.title)}: '
                             f"{html.escape(item.caption)}.</figcaption></figure>")  # fmt: skip
        elif item.kind in ("h1", "h2"):
            parts.append(f"<{item.kind}>{html.escape(item.text)}</{item.kind}>")
        elif item.kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in item.text.splitlines()) + "</ul>")
        elif item.kind == "pre":
            parts.append(f"<pre>{html.escape(item.text)}</pre>")
        else:
            cls = {"note": "note", "missing": "missing"}.get(item.kind, "text")
            parts.append(f'<p class="{cls}">{html.escape(item.text)}</p>')
    parts.append("</body></html>\n")
    return "\n".join(parts)


def build_report(compare_dir: str | Path) -> dict[str, Path]:
    """Write DIR/figures/*.png, DIR/report.md and DIR/report.html (each atomically) from DIR's files alone.

    DlmError (nothing written) when DIR has no results.json or it is not a comparison's results. Rebuilding
    from the same files gives the same report.md (no clock is read)."""
    root = Path(compare_dir)
    results = load_results(root)
    spec_path = root / SPEC_FILE
    spec_text = spec_path.read_text(encoding="utf-8", errors="replace") if spec_path.is_file() else "(no spec.yaml)"
    metrics = {
        (r["arm"], r["seed"]): read_metrics(root / r["run_dir"]) for r in results.get("runs", []) if r.get("run_dir")
    }
    samples = {r["file"]: _read_samples(root, r.get("file")) for r in _samples_rows(results).values() if r.get("file")}
    figures = draw_figures(results, metrics, root / FIGURES_DIR)
    doc = _document(results, figures, samples, spec_text)
    write_text_atomic(root / REPORT_MD, render_markdown(doc))
    write_text_atomic(root / REPORT_HTML, render_html(doc, f"dlm compare: {results.get('name')}"))
    return {"md": root / REPORT_MD, "html": root / REPORT_HTML, "figures": root / FIGURES_DIR}


def summary_lines(results: Mapping[str, Any]) -> list[str]:
    """The terminal summary: per arm its likelihood (= / ≤, mean ± std over seeds, n seeds), its zero-shot
    likelihoods, then per sampler x steps (x temperature) gen PPL (mean of per-sample exp; TER on a formal
    corpus), entropy and seconds per sequence."""
    lik = {a["arm"]: a for a in aggregates(results, "likelihood")}
    split = (results.get("protocol", {}).get("likelihood") or {}).get("split")
    lines = [f"{results.get('name')}: likelihood NLL nats/token on {split} ('=' exact, '≤' bound; ± std over seeds)"]
    points = {(p["arm"], p["sampler"], p["steps"], p["temperature"]): p for p in speed_quality_points(results)}
    for arm in arm_order(results):
        a = lik.get(arm)
        n = f"({a.get('n_seeds')} seeds)" if a else ""
        lines.append(f"{arm:<14} NLL {_relation(results, arm)} {mean_std(a, 'nll')} {n}".rstrip())
        for z in (z for z in aggregates(results, "zeroshot") if z["arm"] == arm):
            lines.append(f"  zero-shot {str(z.get('evaluation')).removeprefix('zeroshot:')}: NLL "
                         f"{_relation(results, arm)} {mean_std(z, 'nll')}")  # fmt: skip
        for s in (s for s in aggregates(results, "samples") if s["arm"] == arm):
            p = points[(arm, s.get("sampler"), s.get("steps"), temperature(s))]
            quality = f"gen PPL {mean_std(s, 'gen_ppl_seq_mean', 2)} (seq mean)"
            if (stat(s, "ter"), stat(s, "ser")) != (None, None):
                quality = f"TER {mean_std(s, 'ter')}, SER {mean_std(s, 'ser', 3)}"
            entropy = mean_std(s, "entropy_mean", 3)
            sps = fmt(p["seconds_per_sequence"])
            at = point_label(p) or f"S={_steps(s.get('steps'))}"
            lines.append(f"  {s.get('sampler')} {at}: {quality}, entropy {entropy}, {sps} s/seq")
    return lines
