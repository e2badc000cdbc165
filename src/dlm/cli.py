"""The ``dlm`` command: prepare, train, evaluate, sample, compare, report and export runs.

Bad input ends in one line ``dlm: error: ...`` on stderr and exit status 2. Hub access is off
unless the user sets ``DLM_ONLINE=1`` (needed only to fetch a Hugging Face dataset or model).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import textwrap
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from dlm.cli_compare import add_commands, checkpoint_arg
from dlm.errors import DlmError

_USER_TOKENIZERS_PARALLELISM = "TOKENIZERS_PARALLELISM" in os.environ


def _offline_env() -> None:
    if os.environ.get("DLM_ONLINE") != "1":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _parse_kv(items: Sequence[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in items:
        if "=" not in item:
            raise DlmError(f"expected KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


# ----------------------------------------------------------------------------- prepare


def cmd_prepare(args: argparse.Namespace) -> int:
    from dlm.data.shards import prepare
    from dlm.data.sources import get_source

    if not _USER_TOKENIZERS_PARALLELISM:
        # prepare forks nothing after tokenizing, so HF tokenizers may use every core here
        # (bpe:4096 on Shakespeare: 14.1 s -> 6.9 s on 2 cores, docs/LOG.md)
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
    source = get_source(args.source, **_parse_kv(args.source_opt))
    out = prepare(
        source,
        args.tokenizer,
        seq_len=args.seq_len,
        mode=args.mode,
        dtype=args.dtype,
        out_dir=args.out,
        data_root=args.data_root,
        tokenizer_from=args.tokenizer_from,
    )
    print_data_summary(out)
    return 0


def print_data_summary(data_dir: Path) -> None:
    from dlm.data.shards import read_meta

    meta = read_meta(data_dir)
    tok = meta["tokenizer"]
    print(
        f"{meta['source']['spec']} | tokenizer {tok['name']} (K={tok['vocab_size']}) | mode {meta['mode']} "
        f"| L={meta['seq_len']} | {meta['dtype']}"
    )
    print(f"{'split':<11}{'documents':>11}{'tokens':>13}{'rows':>10}{'bytes/token':>13}")
    for name, s in meta["splits"].items():
        bpt = s["bytes"] / max(s["tokens"], 1)
        print(f"{name:<11}{s['documents']:>11,}{s['tokens']:>13,}{s['rows']:>10,}{bpt:>13.2f}")
    print(f"data directory: {data_dir}")


# ----------------------------------------------------------------------------- train / eval / sample


def _timestamp() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def cmd_train(args: argparse.Namespace) -> int:
    from dlm.config import apply_overrides, load_config
    from dlm.rundir import read_run_config
    from dlm.train import TrainingInterrupted, train

    if args.resume:
        if args.run_dir is None:
            raise DlmError("--resume needs --run-dir RUN")
        cfg = apply_overrides(read_run_config(args.run_dir), list(args.overrides)).validate()
        run_dir = args.run_dir
    else:
        cfg = load_config(args.config or args.preset, list(args.overrides))
        run_dir = (
            args.run_dir or Path("runs") / f"{Path(args.config or args.preset).stem}-{cfg.process.name}-{_timestamp()}"
        )
    if cfg.data.dir:
        cfg.data.dir = str(Path(cfg.data.dir).resolve())  # eval/sample may run from another directory
    try:
        summary = train(cfg, run_dir, resume=args.resume)
    except TrainingInterrupted as e:  # SIGINT / SIGTERM: a checkpoint at the current step was written
        print(f"dlm: interrupted by {e}", file=sys.stderr)
        return e.exit_status
    if summary.get("val_nll") is not None:
        print(f"validation NLL {summary['val_nll']:.4f} nats/token at step {summary['step']}")
    if summary["stopped"] == "already_done":
        print(
            f"nothing to train: the run is already at step {summary['step']} of {summary['total_steps']} "
            "(extend it with --train.max_steps N)"
        )
    if summary["stopped"] == "time_limit":
        print(
            f"stopped early at step {summary['step']} of {summary['total_steps']} (time limit); "
            f"continue with dlm train --run-dir {run_dir} --resume"
        )
    print(f"run directory: {run_dir}")
    return 0


def _num(x: float | None) -> str:
    return "overflow" if x is None else f"{x:.2f}"


def print_eval(record: dict, path: Path) -> None:
    se = record["nll_se"]
    se_txt = f" ± {se:.4f}" if se is not None else ""
    rel = "=" if record["exact"] else "≤"
    bpb = record["bits_per_byte"]
    bpb_txt = "undefined" if bpb is None else f"{bpb:.3f}"
    where = f"zero-shot {record['source']} {record['split']}" if record.get("zero_shot") else record["split"]
    print(
        f"{where}: NLL {rel} {record['nll']:.4f}{se_txt} nats/token ({record['likelihood']}) | "
        f"BPT {record['bpt']:.3f} | PPL {rel} {_num(record['ppl'])} | {bpb_txt} bits/byte | "
        f"{record['tokens']:,} tokens, {record['sequences']} sequences | step {record['checkpoint_step']} | "
        f"train seed {record.get('train_seed', 'unknown')}, eval seed {record.get('eval_seed', record['seed'])}"
    )
    print(f"  result file: {path}")


def print_generation(record: dict, path: Path) -> None:
    def pm(value: float | None, se: float | None, fmt: str) -> str:
        if value is None:
            return "undefined"
        return f"{value:{fmt}}" + (f" ± {se:{fmt}}" if se is not None else "")

    steps = "" if record["steps"] is None else f" {record['steps']} steps,"
    opt = record["ter_optimal"]
    print(
        f"generation: TER {pm(record['ter'], record['ter_se'], '.4f')}"
        + (f" (optimal {opt:.4f})" if opt is not None else "")
        + f" | SER {pm(record['ser'], record['ser_se'], '.4f')} | N={record['n_sequences']}, L={record['length']} | "
        f"{record['family']} {record['sampler']},{steps} NFE {record['nfe']:.1f} | "
        f"{1e3 * record['wall_s_per_sequence']:.2f} ms/sequence | step {record['checkpoint_step']} | "
        f"seed {record['seed']}"
    )
    if record["non_symbol_sequences"]:
        print(f"  {record['non_symbol_sequences']} sequences hold a non-symbol token (counted as out of support)")
    print(f"  result file: {path}")


def cmd_eval(args: argparse.Namespace) -> int:
    from dlm.eval.progress import Progress
    from dlm.eval.run import evaluate_run

    if args.generation:
        from dlm.eval.formal import evaluate_generation

        if args.split is not None or args.max_batches is not None or args.data is not None:
            raise DlmError("--split, --max-batches and --data belong to likelihood evaluation, not to --generation")
        record, path = evaluate_generation(
            args.run,
            n=1000 if args.n is None else args.n,
            sampler=args.sampler,
            steps=args.steps,
            seed=0 if args.seed is None else args.seed,
            batch_size=16 if args.batch_size is None else args.batch_size,
            which=checkpoint_arg(args.checkpoint),
            ema=not args.no_ema,
            device=args.device,
            force=args.force,
            log=print,
            progress=Progress("sampling", "sequences"),
        )
        print_generation(record, path)
        return 0
    for flag in ("n", "sampler", "steps"):
        if getattr(args, flag) is not None:
            raise DlmError(f"--{flag} belongs to --generation (add --generation to sample and score a formal run)")
    record, path = evaluate_run(
        args.run,
        split=args.split,
        which=checkpoint_arg(args.checkpoint),
        ema=not args.no_ema,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        seed=args.seed,
        device=args.device,
        force=args.force,
        data=args.data,
        log=print,
        progress=Progress("eval", "batches"),
    )
    print_eval(record, path)
    return 0


def print_samples(records: list[dict], path: Path) -> None:
    for r in records:
        head = f"--- sample {r['index']} ({r['generated_tokens']} tokens, {r['sampler']}, NFE {r['nfe']})"
        print(head)
        print((r["prompt"] or "") + r["text"])
    if records:
        wall = sum({r.get("batch", 0): r["wall_s_batch"] for r in records}.values())  # one time per batch
        print(f"--- {len(records)} samples in {wall:.1f}s, written to {path}")


def _sampler_opts(args: argparse.Namespace) -> dict:
    """Sampler options shared by `dlm sample` and `dlm infill`; steps only when given (AR has none)."""
    opts = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    given = {name: getattr(args, name) for name in ("steps", *_UNMASKING_OPTIONS)}  # only those the user set:
    return opts | {k: v for k, v in given.items() if v is not None}  # other samplers refuse an unknown option


# The remasking / ordered-unmasking samplers' options (``SamplerOptions``; dlm.process.unmasking).
_UNMASKING_OPTIONS = (
    "remask_strategy", "remask_eta", "remask_t_on", "remask_t_off", "unmask_score", "entropy_bound", "unmask_threshold"
)  # fmt: skip


def cmd_sample(args: argparse.Namespace) -> int:
    from dlm.eval.progress import Progress
    from dlm.eval.run import sample_run

    records, path = sample_run(
        args.run,
        n=args.n,
        length=args.length,
        prompt=args.prompt,
        sampler=args.sampler,
        seed=args.seed,
        which=checkpoint_arg(args.checkpoint),
        ema=not args.no_ema,
        device=args.device,
        batch_size=args.batch_size,
        progress=Progress("sampling", "sequences"),
        **_sampler_opts(args),
        **({"return_trajectory": True} if args.trajectory else {}),
        **({"stop_at_eos": True} if args.stop_at_eos else {}),
        **({"stop_entropy": args.stop_entropy} if args.stop_entropy is not None else {}),
    )
    print_samples(records, path)
    return 0


def cmd_infill(args: argparse.Namespace) -> int:
    from dlm.eval.run import infill_run

    records, path = infill_run(
        args.run,
        args.pattern,
        n=args.n,
        span=args.span,
        sampler=args.sampler,
        seed=args.seed,
        which=checkpoint_arg(args.checkpoint),
        ema=not args.no_ema,
        device=args.device,
        **_sampler_opts(args),
    )
    for r in records:
        print(f"--- infill {r['index']} ({len(r['filled_positions'])} positions, {r['sampler']}, NFE {r['nfe']})")
        print(r["text"])
    print(f"--- written to {path}")
    return 0


# ----------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the embedded corpus: prepare, train a tiny AR model, evaluate, sample."""
    from dlm.config import load_config
    from dlm.data.shards import prepare
    from dlm.data.sources import get_source
    from dlm.eval.run import evaluate_run, sample_run
    from dlm.train import train

    if not _USER_TOKENIZERS_PARALLELISM:
        os.environ["TOKENIZERS_PARALLELISM"] = "true"  # only while preparing, see cmd_prepare
    print(f"== 1/4 prepare: Shakespeare, tokenizer {args.tokenizer}, rows of {args.seq_len} tokens")
    data_dir = prepare(get_source("shakespeare"), args.tokenizer, seq_len=args.seq_len, data_root=args.data_root)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    print_data_summary(data_dir)
    overrides = ["--data.dir", str(data_dir.resolve()), *args.overrides]  # model.context 0: the data's L
    if args.steps:
        overrides += ["--train.max_steps", str(args.steps)]
    cfg = load_config("tiny-cpu", overrides)
    run_dir = args.run_dir or Path(args.runs_root) / f"demo-{_timestamp()}"
    print(f"\n== 2/4 train: AR transformer (preset tiny-cpu), {cfg.train.max_steps} steps -> {run_dir}")
    train(cfg, run_dir)
    print("\n== 3/4 evaluate (exact AR likelihood)")
    for split in ("validation", "test"):
        print_eval(*evaluate_run(run_dir, split=split))
    print(f"\n== 4/4 sample: {args.samples} samples, temperature 1.0, top-p {args.top_p}")
    records, path = sample_run(run_dir, n=args.samples, length=args.sample_length, seed=0, top_p=args.top_p)
    print_samples(records, path)
    print(f"\nrun directory: {run_dir}")
    return 0


# ----------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose epilog may be a function, called only when help is printed: the config and
    process registries import torch, which `dlm prepare` and every other parse do not need."""

    def format_help(self) -> str:
        if callable(self.epilog):
            self.epilog = self.epilog()
        return super().format_help()


def config_help(preset: str | None = None, width: int = 100) -> str:
    """Every config field (``describe_config``: type, default, docstring) grouped by section, with the
    value the bundled ``preset`` gives it where that differs from the default."""
    from dlm.config import describe_config, load_config

    given = {} if preset is None else load_config(preset).to_dict()
    lines = ["config fields: override any of them with --section.field VALUE or --section.field=VALUE"]
    section = None
    for key, type_label, default, text in describe_config():
        if key.partition(".")[0] != section:
            section = key.partition(".")[0]
            lines.append(f"\n  {section}:")
        value = given.get(section, {}).get(key.partition(".")[2], default)
        by_preset = "" if value == default else f"; preset {preset}: {json.dumps(value)}"
        lines.append(f"    --{key} {type_label} (default {json.dumps(default)}{by_preset})")
        indent = " " * 8
        lines += textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False)
    return "\n".join(lines)


def samplers_help() -> str:
    """The samplers of every registered process (its ``samplers``, ``default_sampler`` marked *), per
    process.transition where they differ, and whether the family's network is time-conditioned by default."""
    from dlm.data.specials import SpecialIds
    from dlm.process import ProcessConfig, available_processes, get_process

    specials = SpecialIds(bos=0, eos=1, pad=1, mask=8, vocab_size=8)  # any small vocabulary builds a process
    lines = ["samplers (--sampler of sample, infill and eval --generation; * = the default):"]
    for name in available_processes():
        by_transition: dict[str, str] = {}
        time_cond = False
        for transition in ("absorbing", "uniform"):  # the values of process.transition
            try:
                process = get_process(ProcessConfig(name=name, transition=transition), specials)
            except DlmError:
                continue
            time_cond |= process.time_conditioned
            names = [s + "*" if s == process.default_sampler else s for s in process.samplers]
            by_transition[transition] = ", ".join(names)
        if len(set(by_transition.values())) == 1:
            text = next(iter(by_transition.values()))
        else:
            text = "; ".join(f"{transition}: {names}" for transition, names in by_transition.items())
        lines.append(f"  {name:<6}{text}" + ("  (time-conditioned by default)" if time_cond else ""))
    lines.append(
        "ddpm_cache reuses the network's output across steps: it needs a time-independent network\n"
        "(--process.time_cond false)."
    )
    return "\n".join(lines)


_RAW = argparse.RawDescriptionHelpFormatter  # epilogs keep their line breaks


def _config_epilog() -> str:
    return f"{samplers_help()}\n\n{config_help(preset='tiny-cpu')}"  # train's default preset, demo's one


def _run_args(q: argparse.ArgumentParser) -> None:
    q.add_argument("run", type=Path, help="run directory")
    q.add_argument("--checkpoint", default="last", help="last (default), best, or a step number")
    q.add_argument("--no-ema", action="store_true", help="use the trained weights even if an EMA exists")
    q.add_argument("--device", default="cpu", help="cpu (default) or cuda")


def _sampler_args(q: argparse.ArgumentParser) -> None:
    q.add_argument("--sampler", default=None, help="a sampler of the run's family, listed below (default: *)")
    q.add_argument("--steps", type=int, default=None, help="denoising steps S of a diffusion sampler")
    q.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1.0)")
    q.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default: all)")
    q.add_argument("--top-p", type=float, default=None, help="nucleus: smallest set of mass >= p (default: all)")
    q.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    g = q.add_argument_group("remasking and ordered unmasking (remdm, confidence, llada, entropy_bounded, threshold)")
    g.add_argument("--remask-strategy", default=None, help="remdm: cap | rescale | conf (default cap)")
    g.add_argument("--remask-eta", type=float, default=None, help="remdm: eta in [0, 1] of cap / rescale (0.02)")
    g.add_argument("--remask-t-on", type=float, default=None, help="remdm loop window: 1 >= t_on > t_off >= 0")
    g.add_argument("--remask-t-off", type=float, default=None, help="remdm loop window (with --remask-t-on)")
    g.add_argument(
        "--unmask-score",
        default=None,
        help="confidence / entropy_bounded / threshold: confidence | margin | entropy | drawn",
    )
    g.add_argument("--entropy-bound", type=float, default=None, help="entropy_bounded: gamma >= 0 nats (0.1)")
    g.add_argument(
        "--unmask-threshold",
        type=float,
        default=None,
        help="threshold: reveal every masked position whose score exceeds tau in [0, 1] (0.9)",
    )


def _add_prepare(sub: Any) -> None:
    """dlm prepare SOURCE: tokenize a corpus into a data directory."""
    pp = sub.add_parser("prepare", help="tokenize a corpus into shards")
    pp.add_argument(
        "source",
        nargs="?",
        default="shakespeare",
        help="shakespeare (default), a text file/directory/glob, or hf:NAME / a known dataset name",
    )
    pp.add_argument("--tokenizer", default="gpt2", help="gpt2 | bert-base-uncased | bytes | chars | bpe:N")
    pp.add_argument("--seq-len", type=int, default=256, help="row length L (default 256)")
    pp.add_argument("--mode", default="wrap", help="wrap (concatenate and cut) or pad (one document per row)")
    pp.add_argument("--dtype", default=None, help="uint16 | uint32 (default: smallest that fits)")
    pp.add_argument("--out", type=Path, default=None, help="data directory (default: DATA_ROOT/<name>-<hash>)")
    pp.add_argument("--data-root", type=Path, default=Path("data"), help="where default data dirs go")
    pp.add_argument(
        "--tokenizer-from", type=Path, default=None, metavar="DIR",
        help="reuse the trained tokenizer (chars, bpe:N) of the prepared directory DIR, e.g. to score a run zero-shot",
    )  # fmt: skip
    pp.add_argument(
        "--source-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="source option, e.g. unit=paragraph",
    )
    pp.set_defaults(func=cmd_prepare)


def _add_train(sub: Any) -> None:
    """dlm train: a preset or YAML config and dotted overrides into a run directory."""
    pt = sub.add_parser(
        "train",
        help="train a model of any registered family (--process.name; fields and samplers: dlm train --help)",
        description="Train a model: a preset or YAML config, then any config field as a dotted override\n"
        "(--model.n_layer 4 --train.lr=3e-4 --process.name mdlm). Every field and each family's samplers follow.",
        epilog=_config_epilog,
        formatter_class=_RAW,
    )
    pt.add_argument("--preset", default="tiny-cpu", help="bundled preset: tiny-cpu (default), gpt2-small")
    pt.add_argument("--config", type=Path, default=None, help="YAML config file (instead of a preset)")
    pt.add_argument("--run-dir", type=Path, default=None, help="run directory (default runs/<preset>-<family>-<time>)")
    pt.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    pt.set_defaults(func=cmd_train, accepts_overrides=True)


def _add_eval(sub: Any) -> None:
    """dlm eval RUN: likelihood on a split, or --generation TER/SER."""
    pe = sub.add_parser(
        "eval",
        help="likelihood of a run on a split, or --generation: TER/SER of samples -> RUN/eval/*.json",
        epilog=samplers_help,
        formatter_class=_RAW,
    )
    _run_args(pe)
    pe.add_argument("--split", default=None, help="split to evaluate (default: the run's eval.split)")
    pe.add_argument(
        "--data",
        default=None,
        metavar="DIR",
        help="zero-shot: score a split of another prepared corpus (same tokenizer, rows <= the model context) "
        "-> RUN/eval/zeroshot-*.json",
    )
    pe.add_argument(
        "--batch-size", type=int, default=None, help="rows per batch (--generation: rows sampled at once, default 16)"
    )
    pe.add_argument("--max-batches", type=int, default=None, help="evaluate only this many batches")
    pe.add_argument(
        "--force", action="store_true", help="recompute a result that RUN/eval already holds for the same settings"
    )
    pe.add_argument("--seed", type=int, default=None, help="seed of the evaluation noise / of the samples (0)")
    pe.add_argument(
        "--generation",
        action="store_true",
        help="runs on a formal: corpus: sample --n sequences and score TER and SER with the true language",
    )
    pe.add_argument("--n", type=int, default=None, help="--generation: number of sequences (default 1000)")
    pe.add_argument("--sampler", default=None, help="--generation: sampler of the family (default: its default)")
    pe.add_argument("--steps", type=int, default=None, help="--generation: denoising steps (diffusion; default L)")
    pe.set_defaults(func=cmd_eval)


def _add_sample(sub: Any) -> None:
    """dlm sample RUN: draw samples."""
    ps = sub.add_parser(
        "sample", help="draw samples from a run -> RUN/samples/*.jsonl", epilog=samplers_help, formatter_class=_RAW
    )
    _run_args(ps)
    ps.add_argument("--n", type=int, default=4, help="number of samples (default 4)")
    ps.add_argument("--length", type=int, default=None, help="total tokens incl. the prompt (default: row length)")
    ps.add_argument("--prompt", default=None, help="text the samples continue")
    ps.add_argument("--batch-size", type=int, default=16, help="rows sampled at once (default 16)")
    _sampler_args(ps)
    ps.add_argument(
        "--trajectory", action="store_true", help="save the step at which each position was revealed (diffusion)"
    )
    ps.add_argument("--stop-at-eos", action="store_true", help="bd3lm: end a row after its first generated EOS "
                    "(AR always does); what stopped each row is saved as 'stop'")  # fmt: skip
    ps.add_argument("--stop-entropy", type=float, default=None, help="bd3lm: end a row after a block whose mean "
                    "per-token entropy is below this many nats (default off)")  # fmt: skip
    ps.set_defaults(func=cmd_sample)


def _add_infill(sub: Any) -> None:
    """dlm infill RUN PATTERN: fill [MASK] spans."""
    pi = sub.add_parser(
        "infill",
        help='fill [MASK] spans with a diffusion run: "The [MASK] sat on the [MASK:3] ."',
        epilog=samplers_help,
        formatter_class=_RAW,
    )
    _run_args(pi)
    pi.add_argument("pattern", help="text with [MASK] (span of --span tokens) or [MASK:n] (n tokens)")
    pi.add_argument("--span", type=int, default=1, help="tokens per plain [MASK] (default 1)")
    pi.add_argument("--n", type=int, default=2, help="number of infills (default 2)")
    _sampler_args(pi)
    pi.set_defaults(func=cmd_infill)


def _add_demo(sub: Any) -> None:
    """dlm demo: prepare, train, evaluate and sample on the embedded corpus."""
    pd = sub.add_parser(
        "demo",
        help="the main job on the embedded corpus: prepare, train a tiny AR model, evaluate, sample",
        description="Prepare Shakespeare, train the tiny-cpu preset (AR), evaluate and sample; any config field\n"
        "may be overridden with a dotted flag (--train.max_steps 50).",
        epilog=_config_epilog,
        formatter_class=_RAW,
    )
    pd.add_argument("--tokenizer", default="bpe:4096", help="tokenizer of the demo data (default bpe:4096)")
    pd.add_argument("--seq-len", type=int, default=256, help="row length L and model.context (default 256)")
    pd.add_argument("--steps", type=int, default=0, help="training steps (default: the tiny-cpu preset's)")
    pd.add_argument("--data-root", type=Path, default=Path("data"), help="where the data directory goes (data)")
    pd.add_argument("--runs-root", type=Path, default=Path("runs"), help="where the run directory goes (runs)")
    pd.add_argument("--run-dir", type=Path, default=None, help="run directory (default RUNS_ROOT/demo-<time>)")
    pd.add_argument("--samples", type=int, default=3, help="samples printed at the end (default 3)")
    pd.add_argument("--sample-length", type=int, default=160, help="tokens per sample (default 160)")
    pd.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling of the samples (default 0.95)")
    pd.set_defaults(func=cmd_demo, accepts_overrides=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlm", description=__doc__.splitlines()[0], allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_prepare, _add_train, _add_eval, _add_sample, _add_infill, _add_demo):
        add(sub)
    add_commands(sub)  # compare, report, experiment
    for module in ("cli_export", "cli_lmeval", "cli_condgen"):  # export; lm-eval; condgen (each imports lazily)
        importlib.import_module(f"dlm.{module}").add_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    _offline_env()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return int(args.func(args) or 0)
    except DlmError as e:
        print(f"dlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
