"""``dlm lm-eval RUN --tasks a,b``: downstream tasks through lm-eval-harness (registered by ``dlm.cli.build_parser``
through ``add_commands``). Parsing imports nothing heavy: torch and lm_eval are imported when the command runs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dlm.cli_compare import checkpoint_arg


def cmd_lmeval(args: argparse.Namespace) -> int:
    """Score the run on the tasks, print one line per task and metric, and the result file."""
    from dlm.eval.lmeval import evaluate_tasks

    record, path = evaluate_tasks(
        args.run,
        args.tasks,
        k=args.k,
        limit=args.limit,
        batch_size=args.batch_size,
        seed=args.seed,
        task_dir=args.task_dir,
        which=args.checkpoint,
        ema=not args.no_ema,
        device=args.device,
        force=args.force,
        online=args.online,
        log=print,
    )
    print(f"{record['family']} step {record['checkpoint_step']}: {record['likelihood']}; {record['requests']} "
          f"requests, lm-eval {record['lm_eval_version']}")  # fmt: skip
    for name, task in record["tasks"].items():
        metrics = task["metrics"]
        for metric, value in metrics.items():
            if metric.endswith("_stderr") or value is None:
                continue
            se = metrics.get(f"{metric}_stderr")
            print(f"  {name:<24} {metric:<10} {value:.4f}" + ("" if se is None else f" ± {se:.4f}"))
    print(f"  result file: {path}")
    return 0


def add_commands(sub: Any) -> None:
    """Register ``lm-eval`` on the ``dlm`` subparsers."""
    p = sub.add_parser(
        "lm-eval",
        help="downstream tasks through lm-eval-harness -> RUN/eval/lmeval-*.json (extra: dlm[lmeval])",
        description="Accuracy on lm-eval-harness tasks by the likelihood of each continuation: exact for AR, the "
        "family's lower bound with K Monte-Carlo draws (and their SE) for diffusion. Task data comes from the local "
        "Hugging Face cache or local files; nothing downloads unless --online. Needs pip install 'dlm[lmeval]'.",
    )
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--tasks", required=True, help="comma-separated task names (lm-eval's, or from --task-dir)")
    p.add_argument("--task-dir", type=Path, default=None, help="directory of task YAML files (lm-eval include_path)")
    p.add_argument("--k", type=int, default=4, help="K, Monte-Carlo draws per request of a diffusion bound (4)")
    p.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    p.add_argument("--batch-size", type=int, default=32, help="rows through the network at once (32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bound's draws and few-shot choices (0)")
    p.add_argument("--checkpoint", type=checkpoint_arg, default="last", help="last (default), best, or a step")
    p.add_argument("--no-ema", action="store_true", help="use the trained weights even if an EMA exists")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--force", action="store_true", help="recompute a result RUN/eval already holds")
    p.add_argument("--online", action="store_true", help="let lm-eval download task data from the Hugging Face hub")
    p.set_defaults(func=cmd_lmeval)
