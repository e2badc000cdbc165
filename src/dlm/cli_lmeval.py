"""``dlm lm-eval RUN --tasks a,b``: downstream tasks through lm-eval-harness (registered by ``dlm.cli.build_parser``
through ``add_commands``); ``dlm lm-eval [RUN] --make-tasks OUT --data DATA``: multiple-choice tasks made from a
prepared corpus (``dlm.eval.localtasks``), then scored when RUN is given. Parsing imports nothing heavy: torch and
lm_eval are imported when the command runs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dlm.cli_compare import checkpoint_arg
from dlm.errors import DlmError


def make_tasks(args: argparse.Namespace) -> list[str]:
    """Write the local tasks of ``--make-tasks`` (data: ``--data``, else the run's data directory); their names."""
    from dlm.eval.localtasks import write_tasks

    data = args.data
    if data is None:
        from dlm.rundir import read_export_config, read_run_config

        if args.run is None or read_export_config(args.run) is not None:
            raise DlmError("--make-tasks needs --data DATA_DIR (a prepared corpus) when no training run is given")
        data = read_run_config(args.run).data.dir
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    return write_tasks(
        data, args.make_tasks, split=args.split, n=args.n, context_tokens=args.context_tokens,
        span_tokens=args.span_tokens, seed=args.task_seed, kinds=kinds, log=print,
    )  # fmt: skip


def cmd_lmeval(args: argparse.Namespace) -> int:
    """Make the local tasks (``--make-tasks``); score the run on the tasks, print one line per task and metric,
    and the result file."""
    tasks, task_dir = args.tasks, args.task_dir
    if args.make_tasks is not None:
        if task_dir is not None:
            raise DlmError("--make-tasks writes the task directory itself: leave out --task-dir")
        names = make_tasks(args)
        tasks, task_dir = tasks or ",".join(names), args.make_tasks
        if args.run is None:
            print(f"  tasks {', '.join(names)} in {Path(args.make_tasks).resolve()} (lm-eval --task-dir)")
            return 0
    elif args.run is None or tasks is None:
        raise DlmError("give a run directory and --tasks a,b (or --make-tasks OUT_DIR --data DATA_DIR)")
    from dlm.eval.lmeval_tasks import evaluate_tasks

    record, path = evaluate_tasks(
        args.run,
        tasks,
        k=args.k,
        limit=args.limit,
        batch_size=args.batch_size,
        seed=args.seed,
        draws=args.draws,
        task_dir=task_dir,
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
        "Hugging Face cache or local files; nothing downloads unless --online. --make-tasks OUT writes offline "
        "multiple-choice tasks (dlm_cloze, dlm_lastword; 4 choices, chance 0.25) made from a prepared corpus's "
        "held-out split, the same questions for every run. Needs pip install 'dlm[lmeval]'.",
    )
    p.add_argument("run", type=Path, nargs="?", default=None, help="run directory (optional with --make-tasks)")
    p.add_argument("--tasks", default=None, help="comma-separated task names (lm-eval's, or from --task-dir)")
    p.add_argument("--task-dir", type=Path, default=None, help="directory of task YAML files (lm-eval include_path)")
    p.add_argument("--k", type=int, default=4, help="K, Monte-Carlo draws per request of a diffusion bound (4)")
    p.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    p.add_argument("--batch-size", type=int, default=32, help="rows through the network at once (32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bound's draws and few-shot choices (0)")
    p.add_argument(
        "--draws",
        choices=["common", "independent"],
        default="common",
        help="a bound's draws: common (default; each request seeded by its context, so a question's choices share "
        "their random numbers and a score does not depend on the other requests) or independent (one stream)",
    )
    p.add_argument("--checkpoint", type=checkpoint_arg, default="last", help="last (default), best, or a step")
    p.add_argument("--no-ema", action="store_true", help="use the trained weights even if an EMA exists")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--force", action="store_true", help="recompute a result RUN/eval already holds")
    p.add_argument("--online", action="store_true", help="let lm-eval download task data from the Hugging Face hub")
    g = p.add_argument_group("local tasks made from a prepared corpus (dlm.eval.localtasks)")
    g.add_argument(
        "--make-tasks",
        type=Path,
        default=None,
        metavar="OUT_DIR",
        help="write the tasks into OUT_DIR (reused when made from the same data and settings), then "
        "score RUN on them when RUN is given (all of them unless --tasks)",
    )
    g.add_argument("--data", type=Path, default=None, help="prepared data directory (default: the run's own)")
    g.add_argument("--split", default="test", help="held-out split the questions come from (test)")
    g.add_argument("--n", type=int, default=100, help="questions per task (100)")
    g.add_argument("--context-tokens", type=int, default=64, help="tokens of context per question (64)")
    g.add_argument("--span-tokens", type=int, default=8, help="tokens of each dlm_cloze choice (8)")
    g.add_argument("--task-seed", type=int, default=0, help="seed of the questions, apart from --seed (0)")
    g.add_argument(
        "--kinds", default="cloze,lastword", help="task kinds to make (cloze,lastword; also lastword_greedy)"
    )
    p.set_defaults(func=cmd_lmeval)
