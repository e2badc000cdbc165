"""Conditional generation and downstream tasks in ``dlm compare`` (issue 15): the per-run stages and their results
rows. Each stage calls the evaluation that owns the protocol and its file (reused per settings):

- conditional (``evaluation.conditional``, n > 0): ``dlm.eval.condgen.condgen_run`` per run and mode (gen-c, keep-c),
  the comparison's judge-ar judge scoring; the family's default sampler (``steps``: 0 = its default step count).
  Row kind ``condgen``, evaluation ``condgen:MODE``.
- downstream (``evaluation.downstream``, tasks listed): ``dlm.eval.lmeval.evaluate_tasks`` per run, one row per
  task (kind ``downstream``, evaluation ``task:NAME``): accuracy (and length-normalised accuracy) with lm-eval's
  standard errors; ``scoring`` exact (AR) or the bound with K draws.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from dlm.compare.spec import CompareSpec

__all__ = ["condgen_rows", "condgen_stage", "downstream_rows", "downstream_stage"]

Log = Callable[[str], None]


def _takes_steps(cfg: Any) -> bool:
    """Whether the family's default sampler takes steps (AR's does not: one network call per token)."""
    from dlm.data.specials import SpecialIds
    from dlm.process import get_process

    process = get_process(cfg.process, SpecialIds(bos=0, eos=1, pad=2, mask=8, vocab_size=8))
    return process.sampler_specs()[process.resolve_sampler(None)].takes_steps


def condgen_stage(
    run_dir: Path, cfg: Any, spec: CompareSpec, judge_dir: Path, device: str, log: Log
) -> list[tuple[str, dict[str, Any], Path]]:
    """(mode, record, path) of the run's conditional generation in each mode of ``evaluation.conditional``."""
    from dlm.eval.condgen import condgen_run

    c = spec.evaluation.conditional
    steps = (c.steps or None) if _takes_steps(cfg) else None
    out = []
    for mode in c.modes:
        rec, path = condgen_run(
            run_dir, judge_dir, split=c.split or spec.evaluation.likelihood.split, prompt_len=c.prompt_len,
            cont_len=c.cont_len, n_prompts=c.n, mode=mode, steps=steps, seeds=list(c.seeds),
            mauve_seeds=list(c.mauve_seeds), batch_size=c.batch_size, device=device, prompt_from=c.prompt_from,
        )  # fmt: skip
        m = rec["mauve"]
        if "mean" in m:
            mauve = f"MAUVE {m['mean']:.3f}" + (f" ± {m['se']:.3f}" if m.get("se") is not None else "")
        else:  # the extra is not installed: the record says why
            mauve = f"MAUVE missing ({m.get('missing')})"
        log(f"  condgen {mode}: continuation PPL {rec['continuation_ppl']['mean']:.2f} (human "
            f"{rec['human_ppl']['mean']:.2f}), {mauve}, NFE {rec['nfe']:.0f}")  # fmt: skip
        out.append((mode, rec, path))
    return out


def downstream_stage(run_dir: Path, spec: CompareSpec, device: str, log: Log) -> tuple[dict[str, Any], Path]:
    """(record, path) of the run's lm-eval tasks (``evaluation.downstream``)."""
    from dlm.eval.lmeval import evaluate_tasks

    d = spec.evaluation.downstream
    rec, path = evaluate_tasks(run_dir, list(d.tasks), task_dir=d.task_dir, k=d.k, limit=d.limit, seed=0,
                               device=device)  # fmt: skip
    how = "exact" if rec["exact"] else f"bound, K = {rec['k']}"
    for name, t in rec["tasks"].items():
        acc = t["metrics"].get("acc")
        shown = "–" if acc is None else f"{acc:.3f}"
        log(f"  task {name}: acc {shown} over {t.get('documents')} documents ({how})")
    return rec, path


def _stat(d: Any, key: str = "mean") -> Any:
    return d.get(key) if isinstance(d, dict) else None


def condgen_rows(base: dict[str, Any], items: list[tuple[str, dict[str, Any], Path]], rel: Any) -> list[dict]:
    """One row per mode: continuation PPL (mean over sampling seeds, its SE), the human level, MAUVE (mean over
    MAUVE seeds, its SE, or why it is missing), diversity of the continuations, NFE, seconds per continuation."""
    rows = []
    for mode, rec, path in items:
        st, m, div = rec.get("settings") or {}, rec.get("mauve") or {}, rec.get("diversity") or {}
        rows.append({
            **base, "kind": "condgen", "evaluation": f"condgen:{mode}", "mode": mode, "sampler": st.get("sampler"),
            "steps": st.get("steps"), "prompt_len": st.get("prompt_len"), "cont_len": st.get("cont_len"),
            "n_prompts": st.get("n_prompts"), "prompt_from": st.get("prompt_from"),
            "continuation_ppl": _stat(rec.get("continuation_ppl")),
            "continuation_ppl_se": _stat(rec.get("continuation_ppl"), "se"),
            "human_ppl": _stat(rec.get("human_ppl")), "mauve": m.get("mean"), "mauve_se": m.get("se"),
            "mauve_missing": m.get("missing"),
            **{k: _stat(div.get(k)) for k in ("entropy_mean", "distinct_2", "repetition_rate")},
            "nfe": rec.get("nfe"), "wall_s_per_continuation": rec.get("wall_s_per_continuation"), "file": rel(path),
        })  # fmt: skip
    return rows


def downstream_rows(base: dict[str, Any], rec: dict[str, Any], path: Path, rel: Any) -> list[dict[str, Any]]:
    """One row per task: acc, acc_stderr, acc_norm, acc_norm_stderr (lm-eval's), documents, requests, the mean SE
    of a request's bound over its K draws (None when exact), K and the scoring (exact / bound)."""
    rows = []
    for name, t in (rec.get("tasks") or {}).items():
        mt = t.get("metrics") or {}
        rows.append({
            **base, "kind": "downstream", "evaluation": f"task:{name}", "task": name,
            **{k: mt.get(k) for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")},
            "documents": t.get("documents"), "requests": t.get("requests"),
            "mean_request_se": t.get("mean_request_se"), "k": rec.get("k"),
            "scoring": "exact" if rec.get("exact") else "bound", "file": rel(path),
        })  # fmt: skip
    return rows
