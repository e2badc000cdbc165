"""dlm's AR training step against a nanoGPT-style model of the same shape, timed step by step, interleaved.

The dlm side is the step ``dlm train`` takes for a preset (default tiny-cpu, process ar): the configuration is
loaded and checked as ``dlm.train.train`` does, ``prepare_session`` builds model, optimizer, loader and noise
generator, and each step is the loop's ``lr_at`` / ``set_lr`` / ``_train_step`` (data from the loader,
process.loss, backward, gradient clipping, AdamW, the per-step loss and norm read back). The references
(``--ref``) are written in nanoGPT's style, with the same V, L, layers, heads, width, batch, AdamW settings,
learning-rate schedule and gradient clip, each reading its rows from its own loader over the same split:

  gpt2   ``nanogpt_ref.RefGPT``: GPT-2 architecture (learned positions, LayerNorm, GELU MLP, fused QKV, SDPA
         causal, tied head): dlm's framework and its choice of block together.
  llama  ``nanogpt_ref.RefLlama``: dlm's own block (RMSNorm, rotary, SwiGLU; exactly dlm's parameter count,
         checked) in plain modules and autograd: dlm's framework alone.
  both   the two in one run, interleaved three ways.

Protocol: ``warmup`` untimed steps of each, then ``rounds`` rounds of ``steps`` steps of each model; the order
of the models rotates by one each step (with one reference: dlm first in even steps, the reference first in
odd ones). Per round and model the median step time gives tokens/s = B L / median; per reference X the round's
ratio is

    ratio_X = tok/s(dlm) / tok/s(X) = median_s(X) / median_s(dlm)

and the spread over rounds (min, median, max) is reported, for wall time and (``cpu_ratio_X``) for the
process's CPU time, which on a machine shared with other jobs is not inflated by time spent descheduled (with one
torch thread it is the step's compute time; with more it sums the threads). The fields of one-reference runs
(``ref_s``, ``ratio``, ``cpu_ratio``, ...) hold the first reference's. FLOP/s use ``dlm.model.flops_per_token``
of each model (gpt2 counted as the GELU, LayerNorm shape), so a ratio of FLOP/s corrects for the MLPs' slightly
different widths. ``--profile N`` adds a torch.profiler table of N steps of each (CPU ops by self time).

    OMP_NUM_THREADS=1 python benchmarks/train_vs_nanogpt.py            # ~3 minutes on one core
    python benchmarks/train_vs_nanogpt.py --ref both --rounds 3 --steps 9 --profile 3

The data: ``--data DIR``, or the Shakespeare corpus prepared as ``dlm prepare shakespeare --tokenizer bpe:4096
--seq-len 256`` does (into data/, reused when present). Writes benchmarks/results/train_vs_nanogpt.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common import machine_info, matmul_seconds, write_result  # benchmarks/common.py (run as a script)
from dlm.config import RunConfig, load_config
from dlm.data.loader import Loader
from dlm.data.shards import open_split, prepare
from dlm.data.sources import get_source
from dlm.model import ModelConfig, count_params, flops_per_token
from dlm.train.loop import _train_step
from dlm.train.optim import lr_at, set_lr
from dlm.train.runtime import Runtime, setup_runtime
from dlm.train.setup import Session, prepare_session
from nanogpt_ref import REF_MODELS, RefConfig, RefStep, ref_optimizer

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
        _train_step(
            s.fwd, s.model, s.process, s.loader, s.gen, s.optimizer, s.ema, s.grad_accum, t.grad_clip, rt, s.loss_fn
        )
        s.prog.step += 1

    return step


def ref_step_fn(s: Session, rt: Runtime, arch: str) -> tuple[Callable[[], None], nn.Module, ModelConfig]:
    """The nanoGPT-style step (``arch``: "gpt2" for ``RefGPT``, "llama" for ``RefLlama``) of the same shape and
    settings as session ``s``; its model and its dlm-shaped config (for the FLOP count). The llama arm has
    exactly dlm's parameter count (checked)."""
    m, t = s.cfg.model, s.cfg.train
    split = open_split(s.cfg.data.dir, s.cfg.data.train_split)
    torch.manual_seed(t.seed)
    cfg = RefConfig(m.vocab_size, split.seq_len, m.n_layer, m.n_head, m.d_model, m.mlp_hidden, m.rope_base, m.norm_eps)
    model = REF_MODELS[arch](cfg).to(rt.device)
    model.train()
    if arch == "llama" and count_params(model) != count_params(s.model):
        raise SystemExit(f"llama reference has {count_params(model)} parameters, dlm {count_params(s.model)}")
    opt = ref_optimizer(model, t.lr, tuple(t.betas), t.eps, t.weight_decay, rt.device)
    run = RefStep(model, opt, t.grad_clip, amp_dtype=rt.amp_dtype, compile_=t.compile)
    loader = Loader(split, t.batch_size, seed=t.seed + 1)
    counter = [0]

    def step() -> None:
        set_lr(opt, lr_at(counter[0], t, s.total_steps))
        run(next(loader).ids_BL.to(rt.device))
        counter[0] += 1

    shape = dataclasses.replace(m, context=split.seq_len)
    if arch == "gpt2":
        shape = dataclasses.replace(shape, mlp="gelu", norm="layernorm", vocab_multiple=1)
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
    arms: dict[str, Callable[[], None]], rounds: int, steps: int, warmup: int, device: torch.device
) -> list[dict[str, Any]]:
    """Per round: the step times of every arm ("dlm" first, then the references), the order rotating by one each
    step (with two arms: dlm first in even steps, the reference in odd ones). Per reference X the round has
    ``X_s``, ``X_cpu_s``, their medians and ``ratio_X`` / ``cpu_ratio_X`` (module docstring)."""
    names = list(arms)
    for _ in range(warmup):
        for name in names:
            arms[name]()
    out = []
    for r in range(rounds):
        wall: dict[str, list[float]] = {n: [] for n in names}
        cpu: dict[str, list[float]] = {n: [] for n in names}
        for i in range(steps):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                w, c = timed(arms[name], device)
                wall[name].append(w)
                cpu[name].append(c)
        row: dict[str, Any] = {"round": r}
        for n in names:
            row.update({f"{n}_s": wall[n], f"{n}_cpu_s": cpu[n]})
            row.update({f"{n}_median_s": statistics.median(wall[n]), f"{n}_cpu_median_s": statistics.median(cpu[n])})
        msg = f"round {r}: dlm {row['dlm_median_s'] * 1e3:.1f} ms/step"
        for n in names[1:]:
            row[f"ratio_{n}"] = row[f"{n}_median_s"] / row["dlm_median_s"]
            row[f"cpu_ratio_{n}"] = row[f"{n}_cpu_median_s"] / row["dlm_cpu_median_s"]
            msg += (
                f", {n} {row[f'{n}_median_s'] * 1e3:.1f} ms/step, ratio {row[f'ratio_{n}']:.3f} "
                f"(CPU time {row[f'cpu_ratio_{n}']:.3f})"
            )
        out.append(row)
        print(msg, flush=True)
    return out


def legacy_fields(row: dict[str, Any], ref: str) -> None:
    """The field names of runs with one reference arm (``ref_s``, ``ratio``, ...), copied from arm ``ref``."""
    for suffix in ("_s", "_cpu_s", "_median_s", "_cpu_median_s"):
        row[f"ref{suffix}"] = row[f"{ref}{suffix}"]
    row["ratio"], row["cpu_ratio"] = row[f"ratio_{ref}"], row[f"cpu_ratio_{ref}"]


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def profile_table(fn: Callable[[], None], n: int, rows: int = 25) -> tuple[str, dict[str, float]]:
    """torch.profiler over ``n`` calls of ``fn``: CPU ops sorted by self time, and per step the seconds of
    all ops (``total_s``), of the matmuls (``mm_s``: MATMUL_OPS) and of attention (``attn_s``: every op whose
    name holds ``scaled_dot_product`` or ``flex``), self times."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    mm = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    attn = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key or "flex" in e.key)
    per_step = {"total_s": total / n / 1e6, "mm_s": mm / n / 1e6, "attn_s": attn / n / 1e6}
    return events.table(sort_by="self_cpu_time_total", row_limit=rows), per_step


def sgemm_peak(device: torch.device, n: int = 2048, reps: int = 5) -> float:
    """The machine's measured float32 matmul rate, FLOP/s: the median of ``reps`` [n, n] @ [n, n] products."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    matmul_seconds(a, b)  # warm-up
    return 2 * n**3 / statistics.median(matmul_seconds(a, b) for _ in range(reps))


def ceiling(costs: dict[str, dict[str, float]], tokens: int, params: dict[str, int], peak: float) -> dict[str, Any]:
    """What the profile says about the ratio's reach at equal FLOPs. Per arm: the matmuls' share of the step
    and their rate, about 6 P T FLOP per step (P parameters, all in matmuls but the norms', T tokens) over the
    matmul seconds, as a fraction of the measured ``peak``. Per reference X: ``ceiling_X`` = X's profiled step /
    dlm's matmul and attention seconds, the ratio dlm would reach if all its other work took no time."""
    out: dict[str, Any] = {"sgemm_peak_flop_s": peak}
    for name, c in costs.items():
        rate = 6 * params[name] * tokens / c["mm_s"] if c["mm_s"] > 0 else float("nan")
        out[name] = {**c, "mm_share": c["mm_s"] / c["total_s"], "mm_flop_s": rate, "mm_of_peak": rate / peak}
    floor = costs["dlm"]["mm_s"] + costs["dlm"]["attn_s"]
    for name in costs:
        if name != "dlm" and floor > 0:
            out[f"ceiling_{name}"] = costs[name]["total_s"] / floor
    return out


def summarize(
    rounds: list[dict[str, Any]], arms: list[str], refs: list[str], tokens: int, flops: dict[str, float]
) -> dict[str, float]:
    """Per reference the ratios' min / median / max over rounds (wall and CPU time) and the median FLOP/s ratio,
    printed; the first reference's also under the one-reference names. Adds tok/s and legacy fields to the rounds."""
    summary: dict[str, float] = {}
    for r in rounds:
        legacy_fields(r, refs[0])
        r.update({f"{n}_tok_s": tokens / r[f"{n}_median_s"] for n in [*arms, "ref"]})
    for ref in refs:
        for key in (f"ratio_{ref}", f"cpu_ratio_{ref}"):
            q = [r[key] for r in rounds]
            summary.update({f"{key}_min": min(q), f"{key}_median": statistics.median(q), f"{key}_max": max(q)})
            print(
                f"dlm / nanoGPT-style {ref} tok/s ({'CPU time' if key.startswith('cpu') else 'wall time'}): "
                f"median {statistics.median(q):.3f} (min {min(q):.3f}, max {max(q):.3f}) over {len(rounds)} rounds"
            )
        summary[f"flop_ratio_{ref}_median"] = summary[f"ratio_{ref}_median"] * flops["dlm"] / flops[ref]
    for key in ("ratio", "cpu_ratio"):  # the first reference under the field names of one-reference runs
        for stat in ("min", "median", "max"):
            summary[f"{key}_{stat}"] = summary[f"{key}_{refs[0]}_{stat}"]
    summary["flop_ratio_median"] = summary[f"flop_ratio_{refs[0]}_median"]
    print("FLOP/s ratio (wall, median): " + ", ".join(f"{r} {summary[f'flop_ratio_{r}_median']:.3f}" for r in refs))
    return summary


def print_ceiling(reach: dict[str, Any], arms: list[str], refs: list[str]) -> None:
    """The profile's matmul accounting per arm and the ceiling per reference (``ceiling``)."""
    print(f"\nmeasured float32 matmul peak (2048^3): {reach['sgemm_peak_flop_s'] / 1e9:.1f} GFLOP/s")
    for name in arms:
        r = reach[name]
        print(
            f"{name}: step {r['total_s'] * 1e3:.0f} ms (profiled), matmuls {r['mm_s'] * 1e3:.0f} ms "
            f"({r['mm_share']:.0%}) at ~{r['mm_flop_s'] / 1e9:.1f} GFLOP/s ({r['mm_of_peak']:.0%} of peak), "
            f"attention {r['attn_s'] * 1e3:.0f} ms"
        )
    for ref in refs:
        print(
            f"ceiling vs {ref}: {reach[f'ceiling_{ref}']:.3f} (its step / dlm's matmuls + attention: the ratio "
            "if all dlm's other work took no time)"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny-cpu")
    p.add_argument("--data", type=Path, default=None, help="a prepared data directory (default: Shakespeare bpe:4096)")
    p.add_argument("--ref", default="gpt2", choices=["gpt2", "llama", "both"], help="the reference arm(s)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="timed steps of each model per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--profile", type=int, default=0, help="profile N steps of each model after timing")
    p.add_argument("--label", default="", help="a tag stored with the result (e.g. 'before', 'after')")
    p.add_argument("--out", type=Path, default=RESULTS / "train_vs_nanogpt.json")
    a, overrides = p.parse_known_args()  # the rest: dotted config overrides, e.g. --train.compile=true
    if a.threads:
        torch.set_num_threads(a.threads)
    refs = ["gpt2", "llama"] if a.ref == "both" else [a.ref]
    seq_len = 256
    with contextlib.ExitStack() as held:
        data = a.data or default_data(seq_len)
        s, rt = dlm_session(a.preset, data, overrides, held)
        device = rt.device
        arms = {"dlm": dlm_step_fn(s, rt)}
        models, shapes = {}, {}
        for ref in refs:
            arms[ref], models[ref], shapes[ref] = ref_step_fn(s, rt, ref)
        B, L = s.cfg.train.batch_size, open_split(data, s.cfg.data.train_split).seq_len
        tokens = B * L
        flops = {"dlm": flops_per_token(s.cfg.model, L - 1)["train"]}
        flops.update({ref: flops_per_token(shapes[ref], L - 1)["train"] for ref in refs})
        params = {"dlm": count_params(s.model), **{ref: count_params(models[ref]) for ref in refs}}
        print(
            f"{a.preset}: B {B} x L {L}, V {s.cfg.model.vocab_size}, {s.cfg.model.n_layer} layers, d "
            f"{s.cfg.model.d_model}; params (M): "
            + ", ".join(f"{k} {v / 1e6:.3f}" for k, v in params.items())
            + f"; {torch.get_num_threads()} threads, {device}",
            flush=True,
        )
        rounds = interleaved(arms, a.rounds, a.steps, a.warmup, device)
        profiles = {name: profile_table(fn, a.profile) for name, fn in arms.items()} if a.profile else {}
        peak = sgemm_peak(device) if a.profile else float("nan")
    tables = {name: table for name, (table, _) in profiles.items()}
    reach = ceiling({name: c for name, (_, c) in profiles.items()}, tokens, params, peak) if profiles else {}
    summary = summarize(rounds, list(arms), refs, tokens, flops)
    for name, table in tables.items():
        print(f"\nprofile: {name}, {a.profile} steps\n{table}")
    if reach:
        print_ceiling(reach, list(arms), refs)
    out = {
        "benchmark": "train_vs_nanogpt",
        "label": a.label,
        "machine": machine_info(device),
        "source": source_state(),
        "preset": a.preset,
        "overrides": overrides,
        "refs": refs,
        "batch": B,
        "seq_len": L,
        "params": {**params, "ref": params[refs[0]]},
        "train_flops_per_token": {**flops, "ref": flops[refs[0]]},
        "protocol": {"rounds": a.rounds, "steps": a.steps, "warmup": a.warmup},
        "rounds": rounds,
        "summary": summary,
        "profiles": tables,
        "profile_costs": reach,
    }
    write_result(a.out, out)


if __name__ == "__main__":
    main()
