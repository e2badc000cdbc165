"""dlm's AR training step against a nanoGPT-style model of the same shape, timed step by step, interleaved.

The dlm side is the step ``dlm train`` takes for a preset (default tiny-cpu, process ar): the configuration is
loaded and checked as ``dlm.train.train`` does, ``prepare_session`` builds model, optimizer, loader and noise
generator, and each step is the loop's ``lr_at`` / ``set_lr`` / ``_train_step`` (data from the loader,
process.loss, backward, gradient clipping, AdamW, the per-step loss and norm read back). The reference is
``nanogpt_ref.RefGPT`` (GPT-2 architecture: learned positions, LayerNorm, GELU MLP, fused QKV, SDPA causal, tied
head) with the same V, L, layers, heads, width, batch, AdamW settings, learning-rate schedule and gradient clip,
reading its rows from its own loader over the same split.

Protocol: ``warmup`` untimed steps of each, then ``rounds`` rounds of ``steps`` pairs; a pair times one step of
each model (order alternating: dlm first in even pairs, the reference first in odd ones). Per round and model
the median step time gives tokens/s = B L / median; the round's ratio is

    ratio = tok/s(dlm) / tok/s(ref) = median_s(ref) / median_s(dlm)

and the spread over rounds (min, median, max) is reported, for wall time and (``cpu_ratio``) for the process's
CPU time, which on a machine shared with other jobs is not inflated by time spent descheduled (with one torch
thread it is the step's compute time; with more it sums the threads). FLOP/s use ``dlm.model.flops_per_token`` of each
model (the reference counted as the GELU, LayerNorm shape), so a ratio of FLOP/s corrects for the MLPs' slightly
different widths. ``--profile N`` adds a torch.profiler table of N steps of each (CPU ops by self time).

    OMP_NUM_THREADS=1 python benchmarks/train_vs_nanogpt.py            # ~3 minutes on one core
    python benchmarks/train_vs_nanogpt.py --rounds 3 --steps 8 --profile 3

The data: ``--data DIR``, or the Shakespeare corpus prepared as ``dlm prepare shakespeare --tokenizer bpe:4096
--seq-len 256`` does (into data/, reused when present). Writes benchmarks/results/train_vs_nanogpt.json.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common import machine_info, write_result  # benchmarks/common.py (run as a script)
from dlm.config import RunConfig, load_config
from dlm.data.loader import Loader
from dlm.data.shards import open_split, prepare
from dlm.data.sources import get_source
from dlm.model import ModelConfig, count_params, flops_per_token
from dlm.train.loop import _train_step
from dlm.train.optim import lr_at, set_lr
from dlm.train.runtime import Runtime, setup_runtime
from dlm.train.setup import Session, prepare_session
from nanogpt_ref import RefConfig, RefGPT, RefStep, ref_optimizer

RESULTS = Path(__file__).parent / "results"


def default_data(seq_len: int) -> Path:
    """The Shakespeare corpus with a 4096-token BPE at ``seq_len`` (prepared into data/ once, then reused)."""
    return prepare(get_source("shakespeare"), "bpe:4096", seq_len=seq_len, data_root="data", log=lambda s: None)


def dlm_session(preset: str, data: Path, overrides: list[str], held: contextlib.ExitStack) -> tuple[Session, Runtime]:
    """The training session ``dlm train --preset PRESET --data.dir DATA --process.name ar`` would run."""
    cfg = load_config(preset, [f"--data.dir={data}", "--process.name=ar", *overrides])
    cfg = RunConfig.from_dict(cfg.to_dict()).validate()
    rt = setup_runtime(cfg.train)
    run_dir = Path(held.enter_context(tempfile.TemporaryDirectory())) / "run"
    s = prepare_session(cfg, run_dir, False, rt, held)
    s.model.train()
    return s, rt


def dlm_step_fn(s: Session, rt: Runtime) -> Callable[[], None]:
    """One step of ``dlm.train.loop._run`` without its logging, validation and checkpoint schedule."""
    t = s.cfg.train

    def step() -> None:
        set_lr(s.optimizer, lr_at(s.prog.step, t, s.total_steps))
        _train_step(s.fwd, s.model, s.process, s.loader, s.gen, s.optimizer, s.ema, s.grad_accum, t.grad_clip, rt)
        s.prog.step += 1

    return step


def ref_step_fn(s: Session, rt: Runtime) -> tuple[Callable[[], None], RefGPT, ModelConfig]:
    """The nanoGPT-style step of the same shape and settings as session ``s``; its model and dlm-shaped config."""
    m, t = s.cfg.model, s.cfg.train
    split = open_split(s.cfg.data.dir, s.cfg.data.train_split)
    torch.manual_seed(t.seed)
    model = RefGPT(RefConfig(m.vocab_size, split.seq_len, m.n_layer, m.n_head, m.d_model)).to(rt.device)
    model.train()
    opt = ref_optimizer(model, t.lr, tuple(t.betas), t.eps, t.weight_decay, rt.device)
    run = RefStep(model, opt, t.grad_clip, amp_dtype=rt.amp_dtype, compile_=t.compile)
    loader = Loader(split, t.batch_size, seed=t.seed + 1)
    counter = [0]

    def step() -> None:
        set_lr(opt, lr_at(counter[0], t, s.total_steps))
        run(next(loader).ids_BL.to(rt.device))
        counter[0] += 1

    shape = ModelConfig(
        vocab_size=m.vocab_size,
        context=split.seq_len,
        n_layer=m.n_layer,
        n_head=m.n_head,
        d_model=m.d_model,
        mlp="gelu",
        norm="layernorm",
    )
    return step, model, shape


def source_state() -> dict[str, Any]:
    """The git commit and the files under src/ that differ from it (their edits are measured too)."""

    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.rstrip() if r.returncode == 0 else None

    dirty = git("status", "--porcelain", "--", "../src")
    return {"commit": git("rev-parse", "HEAD"), "src_modified": dirty.splitlines() if dirty else []}


def timed(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of ``fn()``, device-synchronised."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def interleaved(
    dlm: Callable[[], None], ref: Callable[[], None], rounds: int, steps: int, warmup: int, device: torch.device
) -> list[dict[str, Any]]:
    """Per round: the step times of both models, pairs alternating which goes first (module docstring)."""
    for _ in range(warmup):
        dlm()
        ref()
    out = []
    for r in range(rounds):
        t_dlm, t_ref = [], []
        for i in range(steps):
            first, second = (dlm, ref) if i % 2 == 0 else (ref, dlm)
            a, b = timed(first, device), timed(second, device)
            t_dlm.append(a if i % 2 == 0 else b)
            t_ref.append(b if i % 2 == 0 else a)
        row: dict[str, Any] = {"round": r, "dlm_s": [w for w, _ in t_dlm], "ref_s": [w for w, _ in t_ref]}
        row.update(dlm_cpu_s=[c for _, c in t_dlm], ref_cpu_s=[c for _, c in t_ref])
        for k in ("dlm_s", "ref_s", "dlm_cpu_s", "ref_cpu_s"):
            row[k.replace("_s", "_median_s")] = statistics.median(row[k])
        row["ratio"] = row["ref_median_s"] / row["dlm_median_s"]
        row["cpu_ratio"] = row["ref_cpu_median_s"] / row["dlm_cpu_median_s"]
        out.append(row)
        print(
            f"round {r}: dlm {row['dlm_median_s'] * 1e3:.1f} ms/step, ref {row['ref_median_s'] * 1e3:.1f} ms/step, "
            f"ratio {row['ratio']:.3f} (CPU time: {row['cpu_ratio']:.3f})",
            flush=True,
        )
    return out


def profile_table(fn: Callable[[], None], n: int, rows: int = 25) -> str:
    """torch.profiler over ``n`` calls of ``fn``: CPU ops sorted by self time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny-cpu")
    p.add_argument("--data", type=Path, default=None, help="a prepared data directory (default: Shakespeare bpe:4096)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="timed pairs per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--profile", type=int, default=0, help="profile N steps of each model after timing")
    p.add_argument("--label", default="", help="a tag stored with the result (e.g. 'before', 'after')")
    p.add_argument("--out", type=Path, default=RESULTS / "train_vs_nanogpt.json")
    a, overrides = p.parse_known_args()  # the rest: dotted config overrides, e.g. --train.compile=true
    if a.threads:
        torch.set_num_threads(a.threads)
    seq_len = 256
    with contextlib.ExitStack() as held:
        data = a.data or default_data(seq_len)
        s, rt = dlm_session(a.preset, data, overrides, held)
        device = rt.device
        dlm = dlm_step_fn(s, rt)
        ref, ref_model, ref_shape = ref_step_fn(s, rt)
        B, L = s.cfg.train.batch_size, open_split(data, s.cfg.data.train_split).seq_len
        tokens = B * L
        fl_dlm = flops_per_token(s.cfg.model, L - 1)["train"]
        fl_ref = flops_per_token(ref_shape, L - 1)["train"]
        print(
            f"{a.preset}: B {B} x L {L}, V {s.cfg.model.vocab_size}, {s.cfg.model.n_layer} layers, d "
            f"{s.cfg.model.d_model}; dlm {count_params(s.model) / 1e6:.2f}M params, ref "
            f"{count_params(ref_model) / 1e6:.2f}M; {torch.get_num_threads()} threads, {device}",
            flush=True,
        )
        rounds = interleaved(dlm, ref, a.rounds, a.steps, a.warmup, device)
        tables = {}
        if a.profile:
            tables = {"dlm": profile_table(dlm, a.profile), "ref": profile_table(ref, a.profile)}
    for r in rounds:
        r.update(dlm_tok_s=tokens / r["dlm_median_s"], ref_tok_s=tokens / r["ref_median_s"])
    summary: dict[str, float] = {}
    for key in ("ratio", "cpu_ratio"):
        q = [r[key] for r in rounds]
        summary.update({f"{key}_min": min(q), f"{key}_median": statistics.median(q), f"{key}_max": max(q)})
        print(
            f"dlm / nanoGPT-style tok/s ({'CPU time' if key == 'cpu_ratio' else 'wall time'}): median "
            f"{statistics.median(q):.3f} (min {min(q):.3f}, max {max(q):.3f}) over {a.rounds} rounds"
        )
    summary["flop_ratio_median"] = summary["ratio_median"] * fl_dlm / fl_ref
    print(f"FLOP/s ratio (wall, median): {summary['flop_ratio_median']:.3f}")
    for name, table in tables.items():
        print(f"\nprofile: {name}, {a.profile} steps\n{table}")
    out = {
        "benchmark": "train_vs_nanogpt",
        "label": a.label,
        "machine": machine_info(device),
        "source": source_state(),
        "preset": a.preset,
        "overrides": overrides,
        "batch": B,
        "seq_len": L,
        "params": {"dlm": count_params(s.model), "ref": count_params(ref_model)},
        "train_flops_per_token": {"dlm": fl_dlm, "ref": fl_ref},
        "protocol": {"rounds": a.rounds, "steps": a.steps, "warmup": a.warmup},
        "rounds": rounds,
        "summary": summary,
        "profiles": tables,
    }
    write_result(a.out, out)


if __name__ == "__main__":
    main()
