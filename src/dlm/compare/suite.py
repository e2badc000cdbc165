"""Conditional generation and downstream tasks in ``dlm compare`` (issue 15): the per-run stages and their results
rows. Each stage calls the evaluation that owns the protocol and its file (reused per settings):

- conditional (``evaluation.conditional``, n > 0): ``dlm.eval.condgen.condgen_run`` per run and mode (gen-c, keep-c),
  the comparison's judge-ar judge scoring; the family's default sampler (``steps``: 0 = its default step count).
  Row kind ``condgen``, evaluation ``condgen:MODE``.
- downstream (``evaluation.downstream``, tasks listed or ``task_dir: auto``): ``dlm.eval.lmeval_tasks.evaluate_tasks``
  per run, one row per task (kind ``downstream``, evaluation ``task:NAME``): accuracy (and length-normalised
  accuracy) with lm-eval's standard errors; ``scoring`` exact (AR) or the bound with K draws. ``task_dir: auto``
  builds the tasks from the comparison corpus's likelihood split once, into DIR/tasks (``resolve_tasks``;
  ``dlm.eval.localtasks``: dlm_cloze, dlm_lastword, ...; ``limit`` questions per task, 100 when null).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from dlm.compare.spec import CompareSpec

__all__ = ["condgen_rows", "condgen_stage", "downstream_rows", "downstream_stage", "resolve_tasks"]

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


AUTO_TASKS_N = 100  # questions per task built with task_dir auto when evaluation.downstream.limit is null


def resolve_tasks(root: Path, spec: CompareSpec, data_dir: Path, log: Log) -> tuple[list[str], Path | None] | None:
    """(task names, task directory) of ``evaluation.downstream``, or None when it is off. ``task_dir: auto``: the
    tasks named (dlm_KIND; none listed: dlm_cloze and dlm_lastword) are written once from the comparison corpus's
    likelihood split into ``root/tasks`` (reused on rerun; a different request there is refused)."""
    d = spec.evaluation.downstream
    if d.task_dir != "auto":
        return (list(d.tasks), None if d.task_dir is None else Path(d.task_dir)) if d.tasks else None
    from dlm.eval.localtasks import DEFAULT_KINDS, write_tasks

    kinds = [t.removeprefix("dlm_") for t in d.tasks] or list(DEFAULT_KINDS)
    n = d.limit or AUTO_TASKS_N
    names = write_tasks(data_dir, root / "tasks", split=spec.evaluation.likelihood.split, n=n, kinds=kinds, log=log)
    log(f"== downstream tasks {', '.join(names)}: {n} questions each from the {spec.evaluation.likelihood.split} "
        f"split -> {root / 'tasks'}")  # fmt: skip
    return list(d.tasks) or names, root / "tasks"


def downstream_stage(
    run_dir: Path, spec: CompareSpec, tasks: tuple[list[str], Path | None], device: str, log: Log
) -> tuple[dict[str, Any], Path]:
    """(record, path) of the run's lm-eval tasks (``evaluation.downstream``; ``tasks`` from ``resolve_tasks``)."""
    from dlm.eval.lmeval_tasks import evaluate_tasks

    d = spec.evaluation.downstream
    names, task_dir = tasks
    rec, path = evaluate_tasks(run_dir, names, task_dir=task_dir, k=d.k, limit=d.limit, seed=0,
                               device=device)  # fmt: skip
    how = "exact" if rec["exact"] else f"bound, K = {rec['k']}, {rec['settings'].get('draws', 'independent')} draws"
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
    of a request's bound over its K draws (None when exact), K, the scoring (exact / bound) and the draws (common /
    independent; "exact" for an exact family)."""
    rows = []
    for name, t in (rec.get("tasks") or {}).items():
        mt = t.get("metrics") or {}
        rows.append({
            **base, "kind": "downstream", "evaluation": f"task:{name}", "task": name,
            **{k: mt.get(k) for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")},
            "documents": t.get("documents"), "requests": t.get("requests"),
            "mean_request_se": t.get("mean_request_se"), "k": rec.get("k"),
            "scoring": "exact" if rec.get("exact") else "bound",
            "draws": (rec.get("settings") or {}).get("draws", "independent"), "file": rel(path),
        })  # fmt: skip
    return rows
