"""The report's sections beyond the core tables: zero-shot likelihood on other corpora, conditional generation and
downstream tasks (issue 15), estimator variances and matched quality on a formal corpus; kept apart from
``dlm.compare.report`` (the document, its core tables and its renderings), which places them. The report's
``Table``, ``Block`` and formatters are imported when a section is built (``report`` imports this module).

Every number is labelled as in the rest of the report: ``=`` exact, ``≤`` an upper bound, ``mean ± std`` over
seeds (sample std, n-1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dlm.compare.figures import aggregates, arm_order

__all__ = ["condgen_section", "downstream_section", "matched_items", "matched_table", "suite_items"]
__all__ += ["variance_items", "zero_shot_items", "zero_shot_section"]


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

    aggs = _ordered(results, "zeroshot")
    if not aggs:
        return None
    indomain = {a["arm"]: a for a in aggregates(results, "likelihood")}
    corpora = {z["name"]: z for z in (results.get("protocol") or {}).get("zero_shot") or []}
    head = ["corpus", "arm", "split", "NLL nats/token (mean ± std over seeds)", "PPL = exp(mean NLL)", "bits/byte"]
    head += ["tokens scored", "in-domain NLL", "shift (zero-shot − in-domain)", "seeds"]
    table = Table("zeroshot", "zeroshot", head)
    for a in aggs:
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


def _ordered(results: Mapping[str, Any], kind: str) -> list[dict[str, Any]]:
    order = {a: i for i, a in enumerate(arm_order(results))}
    return sorted(aggregates(results, kind), key=lambda a: (str(a.get("evaluation")), order.get(a["arm"], 0)))


def _first(results: Mapping[str, Any], a: Mapping[str, Any], key: str) -> Any:
    """``key`` of the first seed row of aggregate ``a`` (a non-numeric field: mode, task, scoring, ...)."""
    return next((r.get(key) for r in results["rows"] if r.get("kind") == a["kind"] and r["arm"] == a["arm"]
                 and r.get("evaluation") == a.get("evaluation")), None)  # fmt: skip


def condgen_section(results: Mapping[str, Any]) -> tuple[str, list[Any]] | None:
    """(note, tables) of conditional generation: per (arm, mode) MAUVE (mean ± std over training seeds; beside it
    the mean SE over MAUVE seeds), continuation PPL and the human level, diversity, NFE; and per arm gen-C
    against keep-C (keep-C minus gen-C); None without condgen rows."""
    from dlm.compare.report import Table, fmt, mean_std

    aggs = _ordered(results, "condgen")
    if not aggs:
        return None
    head = ["arm", "mode", "sampler", "steps", "MAUVE (mean ± std over seeds)", "MAUVE SE (over MAUVE seeds)"]
    head += ["continuation PPL", "human PPL", "entropy (nats)", "distinct-2", "NFE", "s/continuation", "seeds"]
    table = Table("condgen", "condgen", head)
    by: dict[tuple[str, str], Mapping[str, Any]] = {}
    for a in aggs:
        mode = str(_first(results, a, "mode"))
        by[(a["arm"], mode)] = a
        missing = _first(results, a, "mauve_missing")
        mauve = mean_std(a, "mauve", 3) if missing is None else f"missing: {missing}"
        cells = [a["arm"], mode, str(a.get("sampler")), "–" if a.get("steps") is None else str(a["steps"]), mauve]
        cells += [mean_std(a, "mauve_se", 3), mean_std(a, "continuation_ppl", 2), mean_std(a, "human_ppl", 2)]
        cells += [mean_std(a, "entropy_mean", 3), mean_std(a, "distinct_2", 3), mean_std(a, "nfe", 1)]
        cells += [mean_std(a, "wall_s_per_continuation"), str(a["n_seeds"])]
        table.rows.append((f"condgen-{a['arm']}-{mode}", cells))
    tables = [table]
    both = [arm for arm in arm_order(results) if (arm, "gen-c") in by and (arm, "keep-c") in by]
    if both:
        modes = Table("condgen-modes", "condgen", ["arm", "MAUVE keep-C − gen-C", "continuation PPL keep-C − gen-C"])
        for arm in both:
            g, k = by[(arm, "gen-c")], by[(arm, "keep-c")]
            diff = [_diff(k, g, "mauve", fmt, 3), _diff(k, g, "continuation_ppl", fmt, 2)]
            modes.rows.append((f"condgen-modes-{arm}", [arm, *diff]))
        tables.append(modes)
    p = next((r for r in results["rows"] if r.get("kind") == "condgen"), {})
    note = (
        f"Conditional generation: {p.get('n_prompts')} prompts of {p.get('prompt_len')} tokens from held-out "
        f"documents, continuations of {p.get('cont_len')} tokens; gen-c generates C tokens, keep-c generates the "
        "model context and keeps the first C (the SEDD study's comparison). Continuation PPL: the judge's, given "
        "the prompt; MAUVE on the judge's hidden states against the human continuations. mean ± std over training "
        "seeds; the MAUVE SE is over MAUVE's k-means seeds."
    )
    return note, tables


def _diff(a: Mapping[str, Any], b: Mapping[str, Any], key: str, fmt: Any, nd: int) -> str:
    x, y = a.get(key), b.get(key)
    if not isinstance(x, Mapping) or not isinstance(y, Mapping):
        return "–"
    return f"{'+' if x['mean'] >= y['mean'] else ''}{fmt(x['mean'] - y['mean'], nd)}"


def downstream_section(results: Mapping[str, Any]) -> tuple[str, Any] | None:
    """(note, table) of the downstream tasks: per (task, arm) accuracy (mean ± std over seeds), lm-eval's standard
    error (mean over seeds), length-normalised accuracy, documents, scoring; None without downstream rows."""
    from dlm.compare.report import Table, mean_std

    aggs = _ordered(results, "downstream")
    if not aggs:
        return None
    head = ["task", "arm", "scoring", "acc (mean ± std over seeds)", "acc stderr (lm-eval)", "acc_norm"]
    table = Table("downstream", "downstream", [*head, "documents", "seeds"])
    for a in aggs:
        task, scoring = _first(results, a, "task"), _first(results, a, "scoring")
        draws = _first(results, a, "draws")
        how = "exact" if scoring == "exact" else f"bound, K = {_first(results, a, 'k')}, {draws or 'independent'} draws"
        cells = [str(task), a["arm"], how, mean_std(a, "acc", 3), mean_std(a, "acc_stderr", 3)]
        cells += [mean_std(a, "acc_norm", 3), str(_first(results, a, "documents")), str(a["n_seeds"])]
        table.rows.append((f"downstream-{task}-{a['arm']}", cells))
    note = (
        "Downstream multiple-choice tasks through lm-eval: the choice of highest log-likelihood, exact for AR and "
        "the diffusion bound (mean of K draws) otherwise; task data local only. mean ± std over training seeds."
    )
    return note, table


# ----------------------------------------------------------------------------- sections placed by the report


def variance_items(results: Mapping[str, Any]) -> list[Any]:
    """The estimator-variance section (results.json rows of kind ``variance``), or nothing when not measured."""
    from dlm.compare.report import Block, Table, _relation, mean_std

    aggs = aggregates(results, "variance")
    if not aggs:
        return []
    head = ["arm", "likelihood", "var of per-token estimate (nats/token)^2", "var of batch estimate", "K"]
    head += ["gradient var (eq. 9)", "||mean gradient||^2", "ratio", "batches", "seeds"]
    table = Table("variance", "variance", head)
    for a in aggs:
        cells = [a["arm"], _relation(results, a["arm"]), mean_std(a, "seq_var_per_token", 6)]
        cells += [mean_std(a, "batch_elbo_var", 6), mean_std(a, "t_samples", 0), mean_std(a, "grad_var", 4)]
        cells += [mean_std(a, "grad_mean_sq_norm", 4), mean_std(a, "grad_noise_ratio", 3), mean_std(a, "batches", 0)]
        table.rows.append((f"variance-{a['arm']}", [*cells, str(a["n_seeds"])]))
    note = (
        "the likelihood estimator's variance over K single-draw estimates per sequence (0 for AR: exact) and "
        "the gradient variance of the training loss over M batches (BD3-LM paper, eq. 9); mean ± std over seeds."
    )
    return [Block("h2", "Estimator variance"), Block("note", note), table]


def matched_table(results: Mapping[str, Any]) -> Any:
    """Formal corpora: per seed and diffusion arm, the smallest step count matching AR's TER (SER) and the
    speedup there (results.json ``matched``); None when there is nothing to match."""
    from dlm.compare.report import Table, _steps, fmt

    rows = results.get("matched") or []
    if not rows:
        return None
    head = ["arm", "sampler", "seed", "vs", "metric", "AR value", "matched steps", "value", "speedup", "NFE ratio"]
    table = Table("matched", "matched", head)
    for r in rows:
        for key in ("matched_ter", "matched_ser"):
            m = r[key]
            cells = [r["arm"], str(r["sampler"]), str(r["seed"]), r["ar_arm"], m["metric"].upper()]
            cells += [fmt(m["ar_value"]), _steps(m["steps"]), fmt(m["value"]), fmt(m["speedup"], 2)]
            cells += [fmt(m["nfe_ratio"], 2)]
            table.rows.append((f"matched-{r['arm']}-{r['sampler']}-seed{r['seed']}-{m['metric']}", cells))
    return table


def zero_shot_items(results: Mapping[str, Any]) -> list[Any]:
    """The zero-shot section (heading, note, table), or nothing without zero-shot rows."""
    from dlm.compare.report import Block

    section = zero_shot_section(results)
    return [] if section is None else [Block("h2", "Zero-shot likelihood"), Block("note", section[0]), section[1]]


def suite_items(results: Mapping[str, Any]) -> list[Any]:
    """Conditional generation and downstream tasks, when measured."""
    from dlm.compare.report import Block

    out: list[Any] = []
    if (c := condgen_section(results)) is not None:
        out += [Block("h2", "Conditional generation"), Block("note", c[0]), *c[1]]
    if (d := downstream_section(results)) is not None:
        out += [Block("h2", "Downstream tasks"), Block("note", d[0]), d[1]]
    return out


def matched_items(results: Mapping[str, Any]) -> list[Any]:
    """The matched-quality section of a formal corpus, or nothing."""
    from dlm.compare.report import Block

    table = matched_table(results)
    if table is None:
        return []
    rule = (results.get("definitions") or {}).get("matched", "")
    return [Block("h2", "Matched quality: speedup over AR"), Block("note", rule), table]
