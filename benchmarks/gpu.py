"""dlm on one GPU: matmul peak, training tok/s and MFU against a nanoGPT-style model, AR decoding, diffusion calls.

One script, at most ~8 minutes on one GPU (each section has a deadline; what does not fit is marked skipped),
printing and writing the table of issue 14 (JSON with the device, torch / CUDA versions and git commit):

- peak:      bf16 matmul FLOP/s, measured: n x n x n matmuls (n = 8192 on a GPU), 2 n^3 / median time.
- train:     tok/s and MFU = tok/s x F_train / peak, F_train = ``dlm.model.flops_per_token(cfg, L)["train"]``,
             at 124M (preset gpt2-small) / L = 1024 / B = 16, bf16 autocast, torch.compile, fused AdamW, for
             AR and MDLM through dlm's own training step (``dlm.train.loop._train_step`` on the model, wrapper
             and optimizer that ``dlm train`` builds: ``build_model``, ``runtime.wrap_model``,
             ``optim.build_optimizer``), and the nanoGPT-style reference of the same shape
             (``nanogpt_ref.RefGPT``: loss inside the compiled forward, fused AdamW). Rows of L tokens, B L tokens
             per step as ``dlm train`` counts them; median step time after warm-up (the compile).
- decode:    AR ancestral sampling with the KV cache (``process.sample``), B = 1 and 64, [BOS] + 1023 new
             tokens, tok/s = new tokens / median wall time, on two paths: ``static`` (dlm's default: the
             preallocated cache and the decode step as a CUDA graph, ``model.decoder``) and ``growing`` (the
             forward with a growing cache and a host check after every token, ``model.static_decode = False``:
             the path every backbone had before issue 14), with whether their ids agree. A row whose full
             length does not fit its deadline (estimated from a short warm-up) is measured on fewer tokens and
             says so.
- diffusion: MDLM ``ddpm_cache`` (``process.sample``), B = 1 and 64, S in {32, 64, 256, 1024} at L = 1024:
             seconds per network call = median wall time / nfe, with the eager denoiser and with the denoiser
             captured as a CUDA graph (``dlm.model.graphs``; the row says whether the ids agree).

Every timing is bracketed by device synchronisation, after warm-up, the median of repeats; the sampling rows
use random weights (the speed does not depend on them). ``--smoke`` runs every section on tiny shapes (CPU,
eager, fp32, seconds) so a test can check the script and its JSON.

    python benchmarks/gpu.py                        # on a GPU: writes benchmarks/results/gpu.json
    python benchmarks/gpu.py --label before         # tag the run (e.g. before/after a change)
    python benchmarks/gpu.py --sections decode      # only some sections, in that order (the peak always)
    python benchmarks/gpu.py --budget-scale 0.7     # every section's deadline x 0.7 (a shorter device call)
    python benchmarks/gpu.py --smoke --out /tmp/gpu_smoke.json
"""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from common import machine_info, matmul_seconds, sync, write_result  # benchmarks/common.py (run as a script)
from dlm.config import RunConfig, load_config
from dlm.data.batch import Batch
from dlm.data.specials import SpecialIds
from dlm.model import ModelConfig, build_model, flops_per_token
from dlm.process import ProcessConfig, absorbing, get_process
from dlm.train.loop import _train_step
from dlm.train.optim import build_optimizer, lr_at, set_lr
from dlm.train.runtime import seed_everything, setup_runtime, wrap_model
from dlm.train.setup import training_loss
from nanogpt_ref import RefConfig, RefGPT, RefStep, ref_optimizer

RESULTS = Path(__file__).parent / "results"
GPT2_VOCAB = 50257


@dataclass
class Plan:
    """The shapes and budgets of one run (``full`` on a GPU, ``smoke`` on any device)."""

    device: torch.device
    precision: str  # "bf16" (autocast) | "fp32"
    compile: bool
    shape: dict[str, Any]  # model overrides: n_layer, n_head, d_model, context
    vocab: int
    batch: int
    seq_len: int
    train_steps: int
    train_warmup: int
    peak_n: int
    decode_batches: tuple[int, ...]
    decode_length: int
    diff_batches: tuple[int, ...]
    diff_steps: tuple[int, ...]
    diff_length: int
    repeats: int
    budgets: dict[str, float] = field(default_factory=dict)  # seconds per section


def full_plan(device: torch.device) -> Plan:
    return Plan(
        device, "bf16", True, dict(n_layer=12, n_head=12, d_model=768, context=1024), GPT2_VOCAB, 16, 1024,
        train_steps=20, train_warmup=3, peak_n=8192, decode_batches=(1, 64), decode_length=1024,
        diff_batches=(1, 64), diff_steps=(32, 64, 256, 1024), diff_length=1024, repeats=3,
        budgets=dict(peak=15, train=240, decode=100, diffusion=100),
    )  # fmt: skip


def smoke_plan(device: torch.device) -> Plan:
    return Plan(
        device, "fp32", False, dict(n_layer=1, n_head=2, d_model=32, context=32), 64, 2, 32,
        train_steps=2, train_warmup=1, peak_n=128, decode_batches=(1, 2), decode_length=12,
        diff_batches=(1, 2), diff_steps=(4, 8), diff_length=16, repeats=2,
        budgets=dict(peak=5, train=30, decode=20, diffusion=20),
    )  # fmt: skip


class Section:
    """A named section with a deadline; ``left()`` seconds remain."""

    def __init__(self, name: str, budget_s: float) -> None:
        self.name, self.budget_s = name, budget_s
        self.deadline = time.perf_counter() + budget_s

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of ``fn()`` bracketed by device synchronisation."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def matmul_peak(plan: Plan, sec: Section) -> dict[str, Any]:
    """2 n^3 / median seconds of one n x n x n matmul (bf16 on a GPU, fp32 otherwise); 20 matmuls per timing."""
    dtype = torch.bfloat16 if plan.device.type == "cuda" else torch.float32
    n = plan.peak_n
    a = torch.randn(n, n, dtype=dtype, device=plan.device)
    b = torch.randn(n, n, dtype=dtype, device=plan.device)
    times: list[float] = []
    matmul_seconds(a, b, inner=20)  # warm-up
    while len(times) < 5 and (sec.left() > 0 or len(times) < 1):
        times.append(matmul_seconds(a, b, inner=20))
    med = statistics.median(times)
    return {"dtype": str(dtype).removeprefix("torch."), "n": n, "times_s": times, "flop_s": 2 * n**3 / med}


# ------------------------------------------------------------------------------------------------ training


def run_config(plan: Plan, process: str) -> RunConfig:
    """The gpt2-small preset as ``dlm train`` loads it, at this plan's shape, batch, precision and device."""
    overrides = [f"--model.{k}={v}" for k, v in plan.shape.items()] + [
        f"--process.name={process}",
        f"--train.device={plan.device.type}",
        f"--train.precision={plan.precision}",
        f"--train.compile={str(plan.compile).lower()}",
        f"--train.batch_size={plan.batch}",
        "--train.global_batch=0",
        "--train.grad_accum=1",
    ]
    return RunConfig.from_dict(load_config("gpt2-small", overrides).to_dict()).validate()


def specials(vocab: int) -> SpecialIds:
    return SpecialIds(bos=vocab - 1, eos=vocab - 1, pad=vocab - 1, mask=vocab, vocab_size=vocab)


def random_batches(plan: Plan, n: int = 4) -> Iterator[Batch]:
    """An endless cycle of ``n`` random batches on the host (the trainer moves each to the device)."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, plan.vocab, (plan.batch, plan.seq_len), generator=g) for _ in range(n)]
    return itertools.cycle([Batch(r, torch.ones_like(r, dtype=torch.bool)) for r in rows])


def time_steps(step: Callable[[], Any], plan: Plan, sec: Section, share: float) -> dict[str, Any]:
    """Warm-up steps (the compile), then up to ``train_steps`` timed steps within ``share`` of what is left."""
    t_first, _ = timed(step, plan.device)
    for _ in range(plan.train_warmup - 1):
        step()
    stop = time.perf_counter() + share * max(sec.left(), 0.0)
    times: list[float] = []
    while len(times) < plan.train_steps and (time.perf_counter() < stop or len(times) < 3):
        times.append(timed(step, plan.device)[0])
    med = statistics.median(times)
    return {"first_step_s": t_first, "step_s": med, "times_s": times, "tok_s": plan.batch * plan.seq_len / med}


def dlm_train_row(plan: Plan, family: str, sec: Section, share: float, loss_compiled: bool = False) -> dict[str, Any]:
    """dlm's training step for ``family`` (ar | mdlm) as ``dlm train`` builds it, on random token rows.

    ``loss_compiled``: ``train.compile_loss`` (``setup.training_loss``: ``torch.compile(process.loss)`` over the
    plain model, so the loss is in the compiled region with the network, issue 14) instead of the compiled model."""
    cfg = run_config(plan, family)
    t = cfg.train
    process = get_process(cfg.process, specials(plan.vocab))
    cfg.model.vocab_size, cfg.model.time_cond = process.vocab_size, process.time_conditioned
    rt = setup_runtime(t)
    seed_everything(t.seed)
    model = build_model(cfg.model).to(rt.device)
    fwd = wrap_model(model, rt, compile=t.compile and not loss_compiled)
    loss_fn = training_loss(process, loss_compiled)
    opt = build_optimizer(model, t, rt.device)
    gen = torch.Generator(device=rt.device).manual_seed(0)
    loader = random_batches(plan)
    k = [0]

    def step() -> float:
        set_lr(opt, lr_at(k[0], t, t.max_steps))
        k[0] += 1
        return _train_step(fwd, model, process, loader, gen, opt, None, 1, t.grad_clip, rt, loss_fn)[0]  # type: ignore[arg-type]

    row = time_steps(step, plan, sec, share)
    row.update(model="dlm", family=family, vocab=cfg.model.vocab_size, flops_per_token=_train_flops(cfg.model, plan))
    row["loss_compiled"] = loss_compiled
    return row


def ref_train_row(plan: Plan, sec: Section, share: float) -> dict[str, Any]:
    """The nanoGPT-style reference (same shape; vocabulary padded to a multiple of 64 as nanoGPT pads 50257)."""
    cfg = run_config(plan, "ar")
    t, m = cfg.train, cfg.model
    ref_vocab = -(-plan.vocab // 64) * 64
    torch.manual_seed(t.seed)
    model = RefGPT(RefConfig(ref_vocab, plan.seq_len, m.n_layer, m.n_head, m.d_model)).to(plan.device)
    opt = ref_optimizer(model, t.lr, tuple(t.betas), t.eps, t.weight_decay, plan.device)
    amp = torch.bfloat16 if plan.precision == "bf16" else None
    run = RefStep(model, opt, t.grad_clip, amp_dtype=amp, compile_=plan.compile)
    loader = random_batches(plan)
    row = time_steps(lambda: run(next(loader).ids_BL.to(plan.device)), plan, sec, share)
    shape = ModelConfig(
        vocab_size=plan.vocab, context=plan.seq_len, n_layer=m.n_layer, n_head=m.n_head, d_model=m.d_model,
        mlp="gelu", norm="layernorm",
    )  # fmt: skip
    row.update(model="nanogpt_ref", family="ar", vocab=ref_vocab, flops_per_token=_train_flops(shape, plan))
    return row


def _train_flops(cfg: ModelConfig, plan: Plan) -> int:
    """Training FLOPs per token of the true vocabulary (a padded head's extra columns are not useful work)."""
    return flops_per_token(ModelConfig(**{**cfg.__dict__, "vocab_size": plan.vocab}), plan.seq_len)["train"]


def train_section(plan: Plan, sec: Section, peak: float | None) -> list[dict[str, Any]]:
    rows = []
    jobs: list[tuple[str, Callable[[float], dict[str, Any]]]] = [
        ("dlm ar", lambda s: dlm_train_row(plan, "ar", sec, s)),
        ("nanogpt_ref ar", lambda s: ref_train_row(plan, sec, s)),
        ("dlm mdlm", lambda s: dlm_train_row(plan, "mdlm", sec, s)),
    ]  # the AR pair first: if the deadline cuts a row, it is MDLM's or the experiment's
    if plan.compile:
        jobs.append(("dlm ar, loss compiled", lambda s: dlm_train_row(plan, "ar", sec, s, loss_compiled=True)))
    for i, (name, job) in enumerate(jobs):
        if sec.left() <= 0:
            rows.append({"name": name, "skipped": f"section deadline ({sec.budget_s:.0f} s) reached"})
            continue
        row = {"name": name, **job(0.3 / (len(jobs) - i))}
        row["mfu"] = row["tok_s"] * row["flops_per_token"] / peak if peak else None
        rows.append(row)
        print(f"  train {name:<16}{row['tok_s']:>12,.0f} tok/s  MFU {_pct(row['mfu'])}", flush=True)
        free_memory(plan.device)
    return rows


# ------------------------------------------------------------------------------------------------ sampling


def sampling_model(plan: Plan, family: str) -> tuple[Any, torch.nn.Module]:
    """The process and a random-weight model of the plan's shape in eval mode (fp32 weights, as ``dlm sample``)."""
    cfg = run_config(plan, family)
    process = get_process(ProcessConfig(name=family), specials(plan.vocab))
    cfg.model.vocab_size, cfg.model.time_cond = process.vocab_size, process.time_conditioned
    cfg.model.context = max(plan.decode_length, plan.diff_length)
    seed_everything(0)
    return process, build_model(cfg.model).to(plan.device).eval()


def _repeat(call: Callable[[], Any], plan: Plan, sec: Section, estimate_s: float) -> list[tuple[float, Any]]:
    """Up to ``plan.repeats`` timed calls, as many as fit the section (at least one)."""
    out = [timed(call, plan.device)]
    while len(out) < plan.repeats and sec.left() > estimate_s:
        out.append(timed(call, plan.device))
    return out


DECODE_PATHS = ("static", "growing")  # model.static_decode True / False (module docstring)


def decode_section(plan: Plan, sec: Section) -> list[dict[str, Any]]:
    """AR decoding tok/s: [BOS] + new tokens, KV cache, no EOS stop, per batch on each of DECODE_PATHS; the
    growing row says whether its ids equal the static row's (same generator seed; compared over the shorter)."""
    process, model = sampling_model(plan, "ar")
    rows: list[dict[str, Any]] = []
    static_ids: dict[int, torch.Tensor] = {}  # batch -> the static path's ids, for the growing row's check
    jobs = list(itertools.product(plan.decode_batches, DECODE_PATHS))
    for i, (n, path) in enumerate(jobs):

        def call(length: int, n: int = n, path: str = path) -> Any:
            gen = torch.Generator(device=plan.device).manual_seed(0)
            model.static_decode = path == "static"
            try:
                return process.sample(model, n, length, prompt_ids=[0], generator=gen, stop_at_eos=False)
            finally:
                model.static_decode = True

        if sec.left() <= 0:
            rows.append({"batch": n, "path": path, "skipped": f"section deadline ({sec.budget_s:.0f} s) reached"})
            continue
        short = min(17, plan.decode_length)
        t_short, _ = timed(partial(call, short), plan.device)  # warm-up; estimates the time per token
        per_token = t_short / (short - 1)
        length = plan.decode_length
        budget = sec.left() / (len(jobs) - i)
        if per_token * (length - 1) * 2 > budget:  # a warm-up and one timed call must fit
            length = max(short, min(length, int(budget / (2 * per_token))))
        timed(partial(call, length), plan.device)
        runs = _repeat(partial(call, length), plan, sec, per_token * length)
        new = int((runs[0][1].lengths_N - runs[0][1].prompt_len).sum())
        med = statistics.median(t for t, _ in runs)
        row = {
            "batch": n, "path": path, "length": length, "full_length": length == plan.decode_length,
            "new_tokens": new, "times_s": [t for t, _ in runs], "median_s": med, "tok_s": new / med,
            "ms_per_step": 1e3 * med / (length - 1), "nfe": runs[0][1].nfe,
        }  # fmt: skip
        ids = runs[0][1].ids_NL.cpu()
        if path == "static":
            static_ids[n] = ids
        elif n in static_ids:
            w = min(ids.shape[1], static_ids[n].shape[1])
            row["same_ids_as_static"] = bool(torch.equal(ids[:, :w], static_ids[n][:, :w]))
        rows.append(row)
        print(f"  decode B={n:<4} {path:<8}{new / med:>12,.0f} tok/s  ({med:.2f} s, {length - 1} steps)", flush=True)
    return rows


def diffusion_section(plan: Plan, sec: Section) -> list[dict[str, Any]]:
    """MDLM ddpm_cache seconds per network call for each (B, S) that fits the deadline: the eager denoiser
    (``s_per_call``) and the captured one (``captured_s_per_call``: ``absorbing.CAPTURE_DENOISER = True``, a CUDA
    graph replayed per call on a GPU, the static-buffer eager path on a CPU; the same samples)."""
    process, model = sampling_model(plan, "mdlm")
    L = plan.diff_length

    def call(n: int, steps: int, capture: bool = False) -> Any:
        gen = torch.Generator(device=plan.device).manual_seed(0)
        before, absorbing.CAPTURE_DENOISER = absorbing.CAPTURE_DENOISER, capture
        try:
            return process.sample(model, n, L, sampler="ddpm_cache", steps=steps, generator=gen)
        finally:
            absorbing.CAPTURE_DENOISER = before

    rows: list[dict[str, Any]] = []
    for n in plan.diff_batches:
        t_warm, res = timed(partial(call, n, 4), plan.device)  # warm-up; estimates the time of a call
        timed(partial(call, n, 4, True), plan.device)
        per_call = t_warm / max(1, res.nfe)
        for steps in plan.diff_steps:
            estimate = per_call * steps
            if sec.left() < 3 * estimate:  # eager: a warm-up and a timed call; captured: at most as long
                why = f"estimated {estimate:.1f} s per call set, {max(sec.left(), 0):.1f} s left in the section"
                rows.append({"batch": n, "steps": steps, "skipped": why})
                continue
            timed(partial(call, n, steps), plan.device)
            runs = _repeat(partial(call, n, steps), plan, sec, 2 * estimate)
            graphed = _repeat(partial(call, n, steps, True), plan, sec, estimate)
            med, nfe = statistics.median(t for t, _ in runs), runs[0][1].nfe
            med_g = statistics.median(t for t, _ in graphed)
            per_call = med / nfe
            rows.append({
                "batch": n, "steps": steps, "length": L, "nfe": nfe, "times_s": [t for t, _ in runs],
                "median_s": med, "s_per_call": per_call, "captured_times_s": [t for t, _ in graphed],
                "captured_s_per_call": med_g / nfe,
                "captured_same_ids": bool(torch.equal(graphed[0][1].ids_NL, runs[0][1].ids_NL)),
            })  # fmt: skip
            print(
                f"  ddpm_cache B={n:<3} S={steps:<5}{1e3 * per_call:>9.2f} ms/call eager, "
                f"{1e3 * med_g / nfe:.2f} captured  ({med:.2f} s, nfe {nfe})",
                flush=True,
            )
    return rows


SECTIONS: dict[str, Callable[[Plan, Section, float], list[dict[str, Any]]]] = {
    "train": train_section,
    "decode": lambda plan, sec, peak: decode_section(plan, sec),
    "diffusion": lambda plan, sec, peak: diffusion_section(plan, sec),
}


def _pct(x: float | None) -> str:
    return "  n/a" if x is None else f"{100 * x:.1f}%"


def print_table(out: dict[str, Any]) -> None:
    print(f"\n{out['device_name']} ({out['device']}), torch {out['torch']}, CUDA {out['cuda']}, commit {out['commit']}")
    print(f"matmul peak ({out['peak']['dtype']}, n={out['peak']['n']}): {out['peak']['flop_s'] / 1e12:.2f} TFLOP/s")
    for r in out["train"]:
        if "skipped" in r:
            print(f"train {r['name']:<16} skipped: {r['skipped']}")
        else:
            print(
                f"train {r['name']:<16}{r['tok_s']:>12,.0f} tok/s  MFU {_pct(r['mfu'])}  ({r['step_s'] * 1e3:.1f} ms)"
            )
    for r in out["decode"]:
        head = f"decode B={r['batch']:<4} {r.get('path', ''):<8}"
        if "skipped" in r:
            print(f"{head} skipped: {r['skipped']}")
        else:
            note = "" if r["full_length"] else f"  (only {r['length'] - 1} steps fit)"
            same = r.get("same_ids_as_static")
            note += "" if same is None else f"  ids {'=' if same else '!='} static"
            print(f"{head}{r['tok_s']:>12,.0f} tok/s  {r['ms_per_step']:.2f} ms/step{note}")
    for r in out["diffusion"]:
        head = f"ddpm_cache B={r['batch']:<3} S={r['steps']:<5}"
        if "skipped" in r:
            print(f"{head} skipped: {r['skipped']}")
        else:
            graphed = f"{1e3 * r['captured_s_per_call']:.2f} captured"
            print(f"{head}{1e3 * r['s_per_call']:>9.2f} ms/call eager, {graphed}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, eager fp32, seconds (any device)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--label", default="", help="a tag stored with the result (e.g. 'before', 'after')")
    p.add_argument(
        "--sections",
        nargs="+",
        default=list(SECTIONS),
        choices=list(SECTIONS),
        help="default: all; run in the order given (the peak always first)",
    )
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every section's deadline (1.0)")
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/results/gpu.json (gpu_smoke.json)")
    a = p.parse_args()
    if not a.budget_scale > 0:
        p.error(f"--budget-scale must be > 0, got {a.budget_scale}")
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    plan = smoke_plan(device) if a.smoke else full_plan(device)
    plan.budgets = {k: v * a.budget_scale for k, v in plan.budgets.items()}
    t0 = time.perf_counter()
    print(f"benchmarks/gpu.py on {device} ({'smoke' if a.smoke else 'full'}); budgets {plan.budgets}", flush=True)
    peak = matmul_peak(plan, Section("peak", plan.budgets["peak"]))
    print(f"  matmul peak {peak['flop_s'] / 1e12:.2f} TFLOP/s", flush=True)
    out: dict[str, Any] = {
        "benchmark": "gpu",
        "label": a.label,
        "smoke": a.smoke,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else machine_info(device)["cpu_model"],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": git_commit(),
        "machine": machine_info(device),
        "plan": {k: (str(v) if k == "device" else v) for k, v in plan.__dict__.items()},
        "peak": peak,
    }
    out["sections"] = list(dict.fromkeys(a.sections))
    out.update({name: [] for name in SECTIONS})
    for name in out["sections"]:  # in the order asked: what matters most first, should a call be cut short
        out[name] = SECTIONS[name](plan, Section(name, plan.budgets[name]), peak["flop_s"])
        free_memory(device)
    out["wall_s"] = time.perf_counter() - t0
    print_table(out)
    write_result(a.out or RESULTS / ("gpu_smoke.json" if a.smoke else "gpu.json"), out)


if __name__ == "__main__":
    main()
