"""MDLM ``ddpm`` / ``ddpm_cache`` cost per sample and per network call: the per-step code against the up-front
reveal steps (issue 14), side by side in one process.

The per-step code is ``src/dlm/process/absorbing.py`` as it was at ``--baseline`` (default 7b5208e, the commit
before the up-front reveal steps), read with ``git show`` and loaded as a module next to today's; both get the same
denoiser, schedule and seed, take turns repeat by repeat (the order alternates), and each row reports the median
of the repeats. ``--baseline none`` measures today's code alone.

1. sampler: the denoiser returns fixed random logits [B, L, V] (no network), so the time is the sampler's own
   work per call: reveal decisions, float64 draws at the revealed positions, bookkeeping and, on a GPU, the host
   synchronisations. tiny-cpu's sampling shape: V = 4096 + MASK, L = 256.
   Batch B in {1, 8}, S in {32, 64, 256}, 3 repeats; and ``first_hitting`` (nfe = L).
2. network: the tiny-cpu backbone (4 layers, d = 256, V = 4096 + MASK, random weights, no time conditioning, so
   ``ddpm_cache`` is exact) at L = --net-length (64); ``net ms`` is the time inside the forward per call,
   ``other ms`` the rest. B x S in {1 x 32, 1 x 64, 8 x 32} and one repeat by default (a forward is 0.07 s at
   B = 1 and 0.36 s at B = 8 on one thread of the CPU measured).

About 3 minutes on one thread of a shared 2-core CPU.

    python benchmarks/diffusion_sampling.py                      # CPU, 1 thread
    python benchmarks/diffusion_sampling.py --device cuda --net-settings 1x32 1x64 1x256 8x32 8x64 8x256

Prints a table and writes benchmarks/results/diffusion_sampling.json (device named; compare the rows of one run).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from common import load_avg, machine_info, sync, write_result  # benchmarks/common.py (run as a script)
from dlm.model import ModelConfig, build_model
from dlm.process import absorbing
from dlm.process.schedules import get_schedule

ROOT = Path(__file__).resolve().parent.parent
PER_STEP_REF = "7b5208e"  # the last commit with the per-step reveal decisions
V, MASK = 4097, 4096  # tiny-cpu: bpe:4096 + an appended MASK
NET_SHAPE = dict(n_layer=4, n_head=4, d_model=256)


def load_baseline(ref: str) -> ModuleType:
    """``absorbing.py`` at git ``ref`` as a module of its own (it imports today's ``dlm.process.sampling``)."""
    src = subprocess.run(
        ["git", "show", f"{ref}:src/dlm/process/absorbing.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    name = "absorbing_at_" + ref.replace("^", "_").replace("~", "_")
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look the module up while the class is built
    exec(compile(src, f"{ref}:src/dlm/process/absorbing.py", "exec"), module.__dict__)
    return module


class Timed:
    """Wraps a denoiser; counts its calls and the seconds spent inside (device-synchronised)."""

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], device: torch.device) -> None:
        self.fn, self.device, self.calls, self.seconds = fn, device, 0, 0.0

    def __call__(self, z_BL: Tensor, t_B: Tensor) -> Tensor:
        sync(self.device)
        t0 = time.perf_counter()
        out = self.fn(z_BL, t_B)
        sync(self.device)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def run_once(impl: ModuleType, sampler: str, denoise: Timed, B: int, L: int, S: int, device: torch.device) -> dict:
    """One sample of B rows from all-MASK; wall seconds, nfe and the seconds inside the denoiser."""
    gen = torch.Generator(device=device).manual_seed(0)
    z0 = torch.full((B, L), MASK, dtype=torch.int64, device=device)
    denoise.calls, denoise.seconds = 0, 0.0
    sync(device)
    t0 = time.perf_counter()
    out = getattr(impl, sampler)(denoise, z0, get_schedule("loglinear"), S, gen, mask_id=MASK)
    sync(device)
    wall = time.perf_counter() - t0
    assert out.nfe == denoise.calls and not bool((out.ids_BL == MASK).any())
    return {"wall_s": wall, "nfe": out.nfe, "net_s": denoise.seconds}


def measure(
    impls: dict[str, ModuleType],
    part: str,
    denoise: Timed,
    B: int,
    L: int,
    S: int,
    repeats: int,
    dev: torch.device,
    samplers: tuple[str, ...] = ("ddpm", "ddpm_cache"),
) -> list[dict[str, Any]]:
    """Rows for the samplers and every implementation: median wall / net seconds over the repeats (after one
    warm-up sample each when repeats > 1)."""
    rows = []
    for sampler in samplers:
        runs: dict[str, list[dict]] = {k: [] for k in impls}
        names = list(impls)
        for name in names if repeats > 1 else []:  # warm-up (allocator, first-call costs)
            run_once(impls[name], sampler, denoise, B, L, S, dev)
        for r in range(repeats):
            for name in names if r % 2 == 0 else names[::-1]:
                runs[name].append(run_once(impls[name], sampler, denoise, B, L, S, dev))
        for name, rs in runs.items():
            wall = statistics.median(x["wall_s"] for x in rs)
            net = statistics.median(x["net_s"] for x in rs)
            nfe = rs[0]["nfe"]
            rows.append({
                "part": part, "code": name, "sampler": sampler, "B": B, "L": L, "S": S, "nfe": nfe,
                "s_per_sample": wall / B, "ms_per_call": 1e3 * wall / nfe, "net_ms_per_call": 1e3 * net / nfe,
                "other_ms_per_call": 1e3 * (wall - net) / nfe, "wall_s": wall, "repeats": repeats,
                "wall_min_s": min(x["wall_s"] for x in rs), "other_min_s": min(x["wall_s"] - x["net_s"] for x in rs),
            })  # fmt: skip
    return rows


def fixed_logits(B: int, L: int, device: torch.device) -> Callable[[Tensor, Tensor], Tensor]:
    logits = torch.randn(B, L, V, generator=torch.Generator().manual_seed(1)).to(device)
    return lambda z_BL, t_B: logits


def network(L: int, device: torch.device) -> Callable[[Tensor, Tensor], Tensor]:
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=V, context=L, **NET_SHAPE)).to(device).eval()

    @torch.no_grad()
    def denoise(z_BL: Tensor, t_B: Tensor) -> Tensor:
        return model(z_BL, attn="bidirectional")

    denoise(torch.full((1, L), MASK, device=device), torch.ones(1, device=device))  # warm-up
    return denoise


def print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'part':8} {'code':9} {'sampler':10} {'B':>2} {'L':>4} {'S':>4} {'nfe':>4} {'s/sample':>9} "
    print(head + f"{'ms/call':>8} {'net ms':>7} {'other ms':>8} {'old/new':>7}  (medians; old/new of the wall)")
    base = {(r["part"], r["sampler"], r["B"], r["L"], r["S"]): r for r in rows if r["code"] == "per-step"}
    for r in rows:
        old = base.get((r["part"], r["sampler"], r["B"], r["L"], r["S"]))
        ratio = f"{old['wall_s'] / r['wall_s']:7.2f}" if old is not None and r["code"] == "up-front" else ""
        print(
            f"{r['part']:8} {r['code']:9} {r['sampler']:10} {r['B']:>2} {r['L']:>4} {r['S']:>4} {r['nfe']:>4} "
            f"{r['s_per_sample']:9.4f} {r['ms_per_call']:8.3f} {r['net_ms_per_call']:7.3f} "
            f"{r['other_ms_per_call']:8.3f} {ratio}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--baseline", default=PER_STEP_REF, help="git ref of the per-step absorbing.py, or 'none'")
    p.add_argument("--length", type=int, default=256, help="L of the sampler part")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, nargs="+", default=[32, 64, 256])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--net-length", type=int, default=64, help="L of the network part")
    p.add_argument("--net-settings", nargs="*", default=["1x32", "1x64", "8x32"], help="BxS of the network part")
    p.add_argument("--net-repeats", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "diffusion_sampling.json")
    a = p.parse_args()
    device = torch.device(a.device)
    torch.set_num_threads(a.threads)
    impls = {"up-front": absorbing}
    if a.baseline != "none":
        impls = {"per-step": load_baseline(a.baseline), **impls}
    t_start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for B in a.batches:
        den = Timed(fixed_logits(B, a.length, device), device)
        for S in a.steps:
            rows += measure(impls, "sampler", den, B, a.length, S, a.repeats, device)
        rows += measure(impls, "sampler", den, B, a.length, a.length, a.repeats, device, ("first_hitting",))
    settings = [tuple(int(v) for v in s.split("x")) for s in a.net_settings]
    net = network(a.net_length, device) if settings else None
    for B, S in settings:
        assert net is not None
        rows += measure(impls, "network", Timed(net, device), B, a.net_length, S, a.net_repeats, device)
    print_table(rows)
    info = machine_info(device)
    print(f"{info['device_name']}, {torch.get_num_threads()} thread(s), {time.perf_counter() - t_start:.0f} s")
    write_result(a.out, {
        "benchmark": "diffusion_sampling", "machine": info, "load_avg_after": load_avg(),
        "baseline": a.baseline, "vocab": V, "network_shape": NET_SHAPE, "rows": rows,
        "wall_s": time.perf_counter() - t_start,
    })  # fmt: skip


if __name__ == "__main__":
    main()
