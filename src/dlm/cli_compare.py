"""The comparison commands of ``dlm``: compare, report, experiment and variance (registered by
``dlm.cli.build_parser``).

Parsing imports nothing heavy: the comparison modules (torch, matplotlib) are imported when a command runs.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from dlm.errors import DlmError

_RAW = argparse.RawDescriptionHelpFormatter


def _preset_lines() -> list[str]:
    """``name: first comment line`` of every bundled comparison preset (read as text: no torch)."""
    lines = []
    folder = resources.files("dlm") / "compare" / "presets"
    for p in sorted(folder.iterdir(), key=lambda p: p.name):
        if p.name.endswith(".yaml"):
            first = p.read_text().splitlines()[0] if p.read_text() else ""
            lines.append(f"  {p.name[:-5]:<20}{first.lstrip('# ').split(': ', 1)[-1]}")
    return lines


def _compare_epilog() -> str:
    return "\n".join([
        "bundled specs (SPEC):",
        *_preset_lines(),
        "",
        "override any spec field with a dotted flag: --seeds 0,1,2  --budget.steps 50  --evaluation.samples.n 32",
        "  --evaluation.samples.steps 8,32  --arms.mdlm.overrides.process.T 100  --shared.train.lr 3e-4",
        "  --arms.mdlm.samplers ddpm,remdm  --evaluation.samples.temperatures 0.8,1.0 (the sampler sweep)",
        "(an arm by name or index; a list is comma-separated). Sampler options, zero-shot corpora, conditional",
        "generation and downstream tasks are set in a spec file. The spec's fields and their meaning:",
        "src/dlm/compare/spec.py and spec_suite.py; the files written: docs/COMPARE.md.",
    ])  # fmt: skip


def cmd_compare(args: argparse.Namespace) -> int:
    from dlm.compare.runner import run_compare
    from dlm.compare.spec import load_compare_spec

    spec = load_compare_spec(args.spec, list(args.overrides))
    out = args.out or Path("runs") / f"compare-{spec.name}"
    print(f"comparison {spec.name!r}: arms {', '.join(a.name for a in spec.arms)} x seeds "
          f"{', '.join(map(str, spec.seeds))} -> {out}")  # fmt: skip
    from dlm.train import TrainingInterrupted

    try:
        run_compare(spec, out, force=args.force, report=not args.no_report)
    except TrainingInterrupted as e:  # a checkpoint of the current step was written
        name = signal.Signals(e.signum).name
        print(f"dlm: {name} stopped the comparison at step {e.step} of a run (a checkpoint was written); rerun "
              f"the same dlm compare command to resume", file=sys.stderr)  # fmt: skip
        return e.exit_status
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from dlm.compare.report import build_report

    paths = build_report(args.dir)
    print(f"report: {paths['html']} (and {paths['md']})")
    return 0


def _add_compare(sub: Any) -> None:
    pc = sub.add_parser(
        "compare",
        help="the comparison: train every family over seeds on one budget, evaluate, write a report",
        description="Train every arm x seed of SPEC on one corpus with one budget, evaluate likelihood (exact for "
        "AR, a bound for diffusion), samples (gen PPL by a judge, diversity; TER/SER on formal languages) and "
        "sampling speed under one protocol, aggregate over seeds and write DIR/report.html. A rerun resumes: "
        "finished work is reused, cut runs are resumed.",
        epilog=_compare_epilog,
        formatter_class=_RAW,
    )
    pc.add_argument("spec", help="a bundled spec name (listed below) or a YAML file")
    pc.add_argument("--out", type=Path, default=None, help="comparison directory (default runs/compare-NAME)")
    pc.add_argument("--force", action="store_true", help="replace the spec held by DIR (runs that no longer match "
                    "are moved to DIR/replaced/, never deleted)")  # fmt: skip
    pc.add_argument("--no-report", action="store_true", help="stop after results.json (dlm report DIR later)")
    pc.set_defaults(func=cmd_compare, accepts_overrides=True)


def _add_report(sub: Any) -> None:
    pr = sub.add_parser(
        "report",
        help="rebuild a comparison's report.md / report.html from its files",
        description="Rebuild DIR/report.md, DIR/report.html and DIR/figures/ from DIR/results.json and the run "
        "directories' files (no training code is imported).",
    )
    pr.add_argument("dir", type=Path, help="a comparison directory (dlm compare --out)")
    pr.set_defaults(func=cmd_report)


# ----------------------------------------------------------------------------- experiment formal


def _int_list(values: Sequence[str]) -> list[int]:
    out = []
    for v in values:
        for part in v.replace(",", " ").split():
            try:
                out.append(int(part))
            except ValueError:
                raise DlmError(f"--steps takes integers like 8 16 32 or 8,16,32, got {v!r}") from None
    return out


def cmd_experiment_formal(args: argparse.Namespace) -> int:
    """AR vs MDLM on a formal language: TER and SER against MDLM sampling steps."""
    from dlm.experiment.formal import default_config, run_formal_experiment

    cfg = default_config(
        args.language,
        temp_mode=args.temp_mode,
        language_seed=args.language_seed,
        length=args.length,
        seed=args.seed,
        n_train=args.n_train,
        n_layer=args.n_layer,
        d_model=args.d_model,
        n_head=args.n_head,
        train_steps=args.train_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        steps=_int_list(args.steps) if args.steps else None,
        n_samples=args.n_samples,
        sample_batch_size=args.sample_batch_size,
        device=args.device,
        threads=args.threads,
    )
    out = args.out or Path("runs") / f"formal-{cfg.language}-seed{cfg.seed}"
    run_formal_experiment(cfg, out, force=args.force)
    return 0


def _add_experiment(sub: Any) -> None:
    """dlm experiment formal: AR vs MDLM on a formal language."""
    px = sub.add_parser("experiment", help="named experiments: formal (AR vs MDLM, TER/SER vs sampling steps)")
    xsub = px.add_subparsers(dest="experiment", required=True)
    pf = xsub.add_parser(
        "formal",
        help="AR vs MDLM on a formal language: TER and SER against MDLM sampling steps (MDM theory paper, fig. 1)",
        description="Prepare a formal language, train an AR model and an MDLM with one backbone config, sample both "
        "(MDLM ddpm_cache over a sweep of step counts) and score TER/SER with the true language. Unset options "
        "come from the language's preset: -cpu languages get a CPU preset (under 20 minutes on 2 cores).",
    )
    pf.add_argument("--language", default="2gram-cpu", help="formal language preset (default 2gram-cpu)")
    pf.add_argument("--out", type=Path, default=None, help="output directory (default runs/formal-LANG-seedS)")
    pf.add_argument("--force", action="store_true", help="redo a finished experiment / replace pieces of others")
    pf.add_argument("--temp-mode", default=None, help="multiply (default: needed for SER > 0) or divide (SPEC)")
    pf.add_argument("--language-seed", type=int, default=None, help="seed of the language (default: preset's)")
    pf.add_argument("--length", type=int, default=None, help="symbols per sequence (default: the preset's)")
    pf.add_argument("--seed", type=int, default=None, help="seed of data, trainings and samples (default 0)")
    pf.add_argument("--n-train", type=int, default=None, help="training sequences")
    pf.add_argument("--n-layer", type=int, default=None, help="backbone blocks (both models)")
    pf.add_argument("--d-model", type=int, default=None, help="backbone width (both models)")
    pf.add_argument("--n-head", type=int, default=None, help="attention heads (both models)")
    pf.add_argument("--train-steps", type=int, default=None, help="optimizer steps of each training")
    pf.add_argument("--batch-size", type=int, default=None, help="training sequences per step")
    pf.add_argument("--lr", type=float, default=None, help="peak learning rate")
    pf.add_argument("--steps", nargs="+", default=None, help="MDLM step counts, e.g. 8 16 32 64 128")
    pf.add_argument("--n-samples", type=int, default=None, help="sequences sampled per setting")
    pf.add_argument("--sample-batch-size", type=int, default=None, help="rows sampled at once (16, as the paper)")
    pf.add_argument("--device", default=None, help="auto (default), cpu or cuda")
    pf.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU preset 1; 0 = torch's default)")
    pf.set_defaults(func=cmd_experiment_formal)


# ----------------------------------------------------------------------------- variance


def checkpoint_arg(value: str) -> str | int:
    """``--checkpoint``: a step number, or last / best (also used by dlm.cli)."""
    return int(value) if value.isdigit() else value


def cmd_variance(args: argparse.Namespace) -> int:
    """Variance of the likelihood estimator and of the training gradient (eq. 9) of a run."""
    from dlm.eval.variance import variance_run

    record, path = variance_run(
        args.run,
        batches=args.batches,
        split=args.split,
        t_samples=args.t_samples,
        seed=args.seed,
        device=args.device,
        force=args.force,
        log=print,
        which=checkpoint_arg(args.checkpoint),
        ema=not args.no_ema,
        batch_size=args.batch_size,
    )

    def num(x: float | None) -> str:
        return "undefined" if x is None else f"{x:.6g}"

    print(f"{record['family']} ({record['likelihood']}), split {record['split']}, step {record['checkpoint_step']}: "
          f"{record['batches']} batches of {record['batch_size']}, {record['sequences']} sequences, "
          f"K = {record['t_samples']} draws, seed {record['seed']}")  # fmt: skip
    print(f"  NLL per token:                           {num(record['nll_per_token'])} nats")
    print(f"  per-sequence estimator variance:         {num(record['seq_var'])} nats^2")
    print(f"  per-sequence variance, per-token:        {num(record['seq_var_per_token'])} (nats/token)^2 "
          f"(sd {num(record['seq_sd_per_token'])})")  # fmt: skip
    print(f"  per-batch ELBO variance (batches x t):   {num(record['batch_elbo_var'])} (nats/token)^2")
    print(f"  per-batch ELBO variance (t alone):       {num(record['batch_elbo_var_t'])} (nats/token)^2")
    print(f"  gradient variance (eq. 9):               {num(record['grad_var'])}")
    print(f"  squared norm of the mean gradient:       {num(record['grad_mean_sq_norm'])}")
    print(f"  gradient variance / squared mean norm:   {num(record['grad_noise_ratio'])}")
    if "clip_window" in record:
        beta, omega = record["clip_window"]
        print(f"  training window of the gradients:        U[{beta:g}, {omega:g}] ({record['clip_window_source']})")
    print(f"  result file: {path}")
    return 0


def _add_variance(sub: Any) -> None:
    pv = sub.add_parser(
        "variance",
        help="variance of the likelihood estimator and of the training gradient (eq. 9) -> RUN/eval/variance-*.json",
        description="On the first M batches of a split: the variance of the single-draw bound estimate per sequence "
        "(K draws; 0 for an exact likelihood, AR), of the per-batch ELBO estimate, and the gradient variance of the "
        "BD3-LM paper's eq. 9, (1/(M-1)) sum_m ||g_m - g_bar||^2. Every figure is defined in the JSON file.",
    )
    pv.add_argument("run", type=Path, help="run directory")
    pv.add_argument("--batches", type=int, default=16, help="M, batches from the start of the split (>= 2; 16)")
    pv.add_argument("--split", default=None, help="split (default: the run's eval.split)")
    pv.add_argument("--t-samples", type=int, default=8, help="K, Monte-Carlo draws per sequence of a bound (>= 2; 8)")
    pv.add_argument("--batch-size", type=int, default=None, help="rows per batch (default: eval.batch_size, else "
                    "train.batch_size)")  # fmt: skip
    pv.add_argument("--seed", type=int, default=0, help="seed of the time and noise draws (0)")
    pv.add_argument("--force", action="store_true", help="recompute a result RUN/eval already holds")
    pv.add_argument("--checkpoint", default="last", help="last (default), best, or a step number")
    pv.add_argument("--no-ema", action="store_true", help="use the trained weights even if an EMA exists")
    pv.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    pv.set_defaults(func=cmd_variance)


def add_commands(sub: Any) -> None:
    """Register compare, report, experiment and variance on the ``dlm`` subparsers."""
    for add in (_add_compare, _add_report, _add_experiment, _add_variance):
        add(sub)
