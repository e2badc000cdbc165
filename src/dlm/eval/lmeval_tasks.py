"""lm-eval tasks on a run (``dlm lm-eval RUN``): load the tasks offline, score them with ``dlm.eval.lmeval``'s
model, write ``RUN/eval/lmeval-step{N}-{hash}.json``.

The task runner imports lm_eval when called (the optional extra ``dlm[lmeval]``). What a request scores, and how a
diffusion bound draws its randomness (``draws``), is in ``dlm.eval.lmeval``'s docstring.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import random
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from dlm.errors import DlmError
from dlm.eval.lmeval import Scored, check_draws, import_lm_eval, lm_class, next_token_family, row_limit
from dlm.eval.results import check_device, check_writable, result_path, reuse
from dlm.eval.run import run_tokenizer
from dlm.io import write_json_atomic
from dlm.rundir import load_run

__all__ = ["LMEVAL_PROTOCOL", "evaluate_tasks", "parse_tasks", "run_tasks", "task_manager"]

#: Version of this adapter's scoring (row building, bound, tokenization); part of every result's settings.
LMEVAL_PROTOCOL = 2  # 2: common random numbers across a question's choices (the "draws" setting)


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """Task names from "a,b" or a list, in order, without blanks or repeats; DlmError when none is left."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = list(dict.fromkeys(t.strip() for t in items if t.strip()))
    if not names:
        raise DlmError("give at least one task name (--tasks a,b)")
    return names


def _dir_fingerprint(directory: Path) -> str:
    """sha256 over the relative paths and bytes of every file under ``directory`` (local task definitions)."""
    h = hashlib.sha256()
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(directory)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


@contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """HF_DATASETS_OFFLINE / HF_HUB_OFFLINE = 1 while the tasks load and run (``offline``), restored after; the
    datasets library reads them when first imported, so this holds for a process that has not imported it yet."""
    names = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    before = {n: os.environ.get(n) for n in names}
    for n in names:
        os.environ[n] = "1" if offline else "0"
    try:
        yield
    finally:
        for n, v in before.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def registry_manager(task_dir: Path | None) -> Any:
    """lm-eval's ``TaskManager`` over its whole registry (it indexes ~15,000 task files: seconds), ``task_dir``'s
    files on top."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=None if task_dir is None else str(task_dir))


def task_manager(names: list[str], task_dir: Path | None) -> Any:
    """A ``TaskManager`` that knows every name: the local directory alone when it holds them all (fast), else
    lm-eval's registry with the directory on top; DlmError for a name neither knows."""
    from lm_eval.tasks import TaskManager

    if task_dir is not None:
        local = TaskManager(include_path=str(task_dir), include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return local
    tm = registry_manager(task_dir)
    missing = [n for n in names if n not in tm.all_tasks]
    if missing:
        raise DlmError(
            f"unknown lm-eval task {', '.join(map(repr, missing))}: list the names with `lm-eval ls tasks`, or give "
            "a directory of task YAML files with --task-dir"
        )
    return tm


def check_choices(loaded: dict[str, Any], limit: int | None) -> None:
    """Every multiple-choice task names its choices (``doc_to_choice``) and each evaluated document has at least
    one; DlmError naming the task otherwise."""
    for name, task in loaded["tasks"].items():
        if task.get_config("output_type") != "multiple_choice":
            continue
        if task.get_config("doc_to_choice") is None:
            raise DlmError(f"task {name} is multiple_choice but its file gives no choices (doc_to_choice)")
        for i, doc in enumerate(itertools.islice(task.eval_docs, limit)):
            if not task.doc_to_choice(doc):
                raise DlmError(f"task {name}: document {i} has no choices (doc_to_choice gives an empty list)")


def run_tasks(lm: Any, loaded: dict[str, Any], *, limit: int | None, seed: int) -> dict[str, Any]:
    """lm-eval's ``evaluate`` on loaded tasks (zero-shot unless a task says otherwise, few-shot draws seeded):
    its ``results`` per task and the number of documents evaluated. (``simple_evaluate`` is not used: it spends
    seconds collecting environment information.)"""
    import numpy as np
    from lm_eval.evaluator import evaluate

    random.seed(seed)
    np.random.seed(seed)
    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=seed)
    out = evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=1000, log_samples=False)
    return {"results": out["results"], "n-samples": out.get("n-samples", {})}


def _metrics(values: dict[str, Any]) -> dict[str, float | None]:
    """lm-eval's ``{"acc,none": x, "acc_stderr,none": s, ...}`` as ``{"acc": x, "acc_stderr": s}`` (filters other
    than "none" kept in the name); "N/A" and other non-numbers become None."""
    out: dict[str, float | None] = {}
    for key, v in values.items():
        if "," not in key:
            continue
        metric, filt = key.split(",", 1)
        name = metric if filt == "none" else f"{metric},{filt}"
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        out[name] = float(v) if ok else None
    return out


def task_record(lm: Any, results: dict[str, Any], loaded: dict[str, Any]) -> dict[str, Any]:
    """Per task: its metrics with their standard errors (lm-eval's), documents, requests scored, the mean SE of a
    request's bound over the K draws (None when exact), requests whose context was left-truncated."""
    by_task: dict[str, list[Scored]] = defaultdict(list)
    for name, s in lm.scored:
        by_task[name].append(s)
    out = {}
    for name, values in results["results"].items():
        scored = by_task.get(name, [])
        ses = [s.se for s in scored if s.se is not None]
        task = loaded["tasks"].get(name)
        out[name] = {
            "metrics": _metrics(values),
            "documents": results["n-samples"].get(name, {}).get("effective"),
            "requests": len(scored),
            "mean_request_se": sum(ses) / len(ses) if ses else None,
            "truncated_requests": sum(s.truncated for s in scored),
            "output_type": None if task is None else task.get_config("output_type"),
        }
    return out


def _record(
    run: Any, lm: Any, results: Any, loaded: Any, settings: dict[str, Any], version: str, wall_s: float
) -> dict[str, Any]:
    """The lmeval-*.json record of one evaluate_tasks call (accuracies per task, K, the exact/bound label)."""
    exact = next_token_family(run.process)
    return {
        "metric": "lmeval",
        "family": run.process.name,
        "likelihood": "exact"
        if exact
        else f"lower bound: -(the family's NELBO), mean of K = {settings['k']} draws ({settings['draws']})",
        "exact": exact,
        "k": settings["k"],
        "tasks": task_record(lm, results, loaded),
        "requests": len(lm.scored),
        "lm_eval_version": version,
        "tokenization": "lm-eval's HF convention: encode(context + continuation) split after encode(context)",
        "truncation": f"rows of at most {row_limit(run)} tokens; longer contexts lose their oldest tokens",
        "checkpoint_step": run.step,
        "ema": run.ema,
        "seed": settings["seed"],
        "wall_s": wall_s,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": settings,
    }


def evaluate_tasks(
    run_dir: str | Path,
    tasks: str | Sequence[str],
    *,
    k: int = 4,
    limit: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    draws: str = "common",
    task_dir: str | Path | None = None,
    which: str | int = "last",
    ema: bool = True,
    device: str = "cpu",
    force: bool = False,
    online: bool = False,
    log: Any = None,
) -> tuple[dict[str, Any], Path]:
    """lm-eval tasks on a run's checkpoint; returns (record, path of ``RUN/eval/lmeval-step{N}-{hash}.json``).

    ``tasks``: names from lm-eval's registry or from ``task_dir`` (task YAML files, lm-eval's ``include_path``).
    ``k``: Monte-Carlo draws per request of a diffusion bound (an exact family scores once, K recorded as 1).
    ``draws``: "common" (common random numbers: the choices of one question share their draws; module
    docstring) or "independent".
    ``limit``: documents per task (None: all). Nothing downloads unless ``online`` (HF_*_OFFLINE=1 around the
    run): task data must be in the local Hugging Face cache or local files. A result with the same settings is
    reused (``log`` says so) unless ``force``. The numbers and the task directory are checked before the run is
    loaded, the task names and choices (they need lm-eval's task index) before anything is written.
    """
    names = parse_tasks(tasks)
    for what, v in (("K (Monte-Carlo draws per request)", k), ("batch size", batch_size), ("limit", limit)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise DlmError(f"{what} must be an integer >= 1, got {v!r}")
    check_draws(draws)
    check_device(device)
    folder = None if task_dir is None else Path(task_dir).resolve()
    if folder is not None and not folder.is_dir():
        raise DlmError(f"--task-dir {task_dir} is not a directory")
    lm_eval = import_lm_eval()
    run = load_run(run_dir, which=which, ema=ema, device=device)
    tok = run_tokenizer(run)
    exact = next_token_family(run.process)
    settings = {
        "protocol": LMEVAL_PROTOCOL,
        "tasks": names,
        "task_dir": None if folder is None else _dir_fingerprint(folder),
        "k": 1 if exact else k,
        "limit": limit,
        "batch_size": batch_size,
        "seed": seed,
        "draws": "exact" if exact else draws,
        "checkpoint_step": run.step,
        "ema": run.ema,
        "process": asdict(run.cfg.process),
        "lm_eval_version": lm_eval.__version__,
        "device": torch.device(device).type,
    }
    path = result_path(run_dir, "lmeval", f"step{run.step}", settings)
    if (old := reuse(path, settings, force=force, log=log)) is not None:
        return old, path
    check_writable(path.parent)
    t0 = time.perf_counter()
    with _hub_offline(not online):
        tm = task_manager(names, folder)
        try:
            loaded = tm.load(names)
        except (FileNotFoundError, ConnectionError) as e:
            raise DlmError(f"cannot load the data of task(s) {', '.join(names)} offline: {e}") from None
        check_choices(loaded, limit)
        lm = lm_class()(run, tok, k=settings["k"], batch_size=batch_size, seed=seed, draws=draws)
        results = run_tasks(lm, loaded, limit=limit, seed=seed)
    record = _record(run, lm, results, loaded, settings, lm_eval.__version__, time.perf_counter() - t0)
    write_json_atomic(path, record)
    return record, path
