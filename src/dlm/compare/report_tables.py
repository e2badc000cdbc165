"""The report's tables of the further evaluations (issue 15): zero-shot likelihood on other corpora; kept apart
from ``dlm.compare.report`` (the document, its core tables and its renderings), which places them.

Every number is labelled as in the rest of the report: ``=`` exact, ``≤`` an upper bound, ``mean ± std`` over
seeds (sample std, n-1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dlm.compare.figures import aggregates, arm_order

__all__ = ["zero_shot_section"]


def _relation(results: Mapping[str, Any], kind: str, arm: str, corpus: str | None = None) -> str:
    rels = {
        r.get("relation")
        for r in results["rows"]
        if r.get("kind") == kind and r["arm"] == arm and (corpus is None or r.get("corpus") == corpus)
    }
    return "=" if rels == {"="} else "≤"


def _batches(max_batches: Any) -> str:
    return "scored whole" if not max_batches else f"its first {max_batches} batches scored"


def zero_shot_section(results: Mapping[str, Any]) -> tuple[str, Any] | None:
    """(note, ``report.Table``) of the zero-shot likelihoods: one row per (corpus, arm), NLL (= / ≤, mean ± std
    over seeds), PPL, bits per byte, tokens scored, the in-domain NLL beside it and the shift; None without
    zero-shot rows."""
    from dlm.compare.report import Table, mean_std  # the report module places these tables (imported lazily)

    aggs = aggregates(results, "zeroshot")
    if not aggs:
        return None
    indomain = {a["arm"]: a for a in aggregates(results, "likelihood")}
    corpora = {z["name"]: z for z in (results.get("protocol") or {}).get("zero_shot") or []}
    head = ["corpus", "arm", "split", "NLL nats/token (mean ± std over seeds)", "PPL = exp(mean NLL)", "bits/byte"]
    head += ["tokens scored", "in-domain NLL", "shift (zero-shot − in-domain)", "seeds"]
    table = Table("zeroshot", "zeroshot", head)
    order = {a: i for i, a in enumerate(arm_order(results))}
    for a in sorted(aggs, key=lambda a: (str(a.get("evaluation")), order.get(a["arm"], 0))):
        name = str(a.get("evaluation") or "").removeprefix("zeroshot:")
        split = next((r.get("split") for r in results["rows"] if r.get("evaluation") == a.get("evaluation")), None)
        rel = _relation(results, "zeroshot", a["arm"], name)
        ind = indomain.get(a["arm"])
        shift = "–"
        if ind is not None and isinstance(a.get("nll"), Mapping) and isinstance(ind.get("nll"), Mapping):
            shift = f"{a['nll']['mean'] - ind['nll']['mean']:+.4f}"
        cells = [name, a["arm"], str(split), f"{rel} {mean_std(a, 'nll')}", mean_std(a, "ppl", 2)]
        cells += [mean_std(a, "bits_per_byte"), mean_std(a, "tokens", 0)]
        cells += [f"{_relation(results, 'likelihood', a['arm'])} {mean_std(ind, 'nll')}", shift, str(a["n_seeds"])]
        table.rows.append((f"zeroshot-{name}-{a['arm']}", cells))
    described = "; ".join(
        f"{n}: {z.get('source')} {' '.join(z.get('source_options') or [])} ({z.get('split')} split of "
        f"{z.get('tokens')} tokens, {_batches(z.get('max_batches'))}, tokenizer {z.get('tokenizer')}"
        + (", reused from the comparison corpus)" if z.get("tokenizer_from") else ")")
        for n, z in corpora.items()
    )
    note = (
        "Zero-shot likelihood: every run scored on each further corpus with its own tokenizer (a trained one "
        "reused, not retrained), the same estimator, seed and scored positions as in-domain; '=' exact, '≤' a "
        f"bound; mean ± std over seeds. {described or ''}"
    ).strip()
    return note, table
