"""The loss path (issue 14): training step time and peak memory with full float32 logits vs the chunked head.

"full": the backbone returns float32 logits [B, L, V] and the loss takes the cross-entropy of the rows it needs
(the path before issue 14; every family still takes it for a backbone without ``head_weight``). "chunked": the
backbone returns hidden states and only the loss rows go through the head, chunk by chunk
(``dlm.process.losses``). The same model, batch and random stream on both paths; a step is forward, backward
and AdamW.

Step times: both paths interleaved step by step in one process (median of the timed steps). Peak memory of the
forward and backward (the AdamW update, the same on both paths, left out: its foreach temporaries would otherwise
set the peak): on CUDA ``max_memory_allocated`` in the same process; on CPU one subprocess per (family, shape,
path) reporting its peak resident set above what it holds after setup (weights and AdamW state).

    python benchmarks/loss_path.py                     # CPU, one thread: tiny-cpu and the GPT-2-like head
    python benchmarks/loss_path.py --device cuda

Prints a table and writes benchmarks/results/loss_path.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from common import machine_info, sync, write_result  # benchmarks/common.py (run as a script)
from dlm.data.batch import Batch
from dlm.data.specials import SpecialIds
from dlm.model import ModelConfig, build_model
from dlm.process import ProcessConfig, get_process

SHAPES = {
    # name: (K tokens, model config, batch, seq_len)
    "tiny-cpu": (4096, dict(n_layer=4, n_head=4, d_model=256), 16, 256),
    "gpt2-head": (50257, dict(n_layer=1, n_head=12, d_model=768), 4, 256),
}
FAMILIES = ("ar", "mdlm")
PATHS = ("full", "chunked")


class FullLogits(torch.nn.Module):
    """The backbone seen without its head capability: the losses take the full float32 logits."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.inner(*args, **kwargs)


def setup(family: str, shape: str, device: torch.device) -> dict[str, Any]:
    """Model, AdamW (state initialised), process and a fixed batch for one (family, shape)."""
    K, arch, B, L = SHAPES[shape]
    specials = SpecialIds(bos=K - 1, eos=K - 1, pad=K - 1, mask=K, vocab_size=K)
    process = get_process(ProcessConfig(name=family), specials)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=process.vocab_size, context=L, **arch)
    model = build_model(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # AdamW state allocated now, not inside the measured steps
    opt.zero_grad(set_to_none=True)
    ids = torch.randint(0, K - 1, (B, L), generator=torch.Generator().manual_seed(1)).to(device)
    batch = Batch(ids_BL=ids, mask_BL=torch.ones_like(ids, dtype=torch.bool))
    return {"model": model, "opt": opt, "process": process, "batch": batch, "device": device}


def step(r: dict[str, Any], path: str, seed: int, optimizer: bool = True) -> float:
    """One training step on ``path`` (without the AdamW update when not ``optimizer``); returns its wall seconds."""
    model = r["model"] if path == "chunked" else FullLogits(r["model"])
    gen = torch.Generator(device=r["device"]).manual_seed(seed)
    sync(r["device"])
    t0 = time.perf_counter()
    loss, _ = r["process"].loss(model, r["batch"], gen)
    loss.backward()
    if optimizer:
        r["opt"].step()
    r["opt"].zero_grad(set_to_none=True)
    sync(r["device"])
    return time.perf_counter() - t0


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def high_water_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def cpu_peak(family: str, shape: str, path: str, steps: int) -> int:
    """Child process: peak RSS over ``steps`` steps above the state after setup (bytes). The high-water mark is
    reset after setup (Linux: /proc/self/clear_refs), so the setup's own peak does not count."""
    r = setup(family, shape, torch.device("cpu"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = rss_bytes()
    for i in range(steps):
        step(r, path, i, optimizer=False)
    return high_water_bytes() - base


def peak_memory(family: str, shape: str, path: str, device: torch.device, r: dict[str, Any]) -> int:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(r, path, 0, optimizer=False)
        return torch.cuda.max_memory_allocated() - base
    cmd = [sys.executable, __file__, "--child", family, shape, path]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def measure(family: str, shape: str, device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    r = setup(family, shape, device)
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    for i in range(warmup + steps):
        for path in PATHS if i % 2 == 0 else PATHS[::-1]:  # interleaved, alternating which goes first
            seconds = step(r, path, i)
            if i >= warmup:
                times[path].append(seconds)
    row: dict[str, Any] = {"family": family, "shape": shape}
    for path in PATHS:
        row[f"{path}_step_s"] = statistics.median(times[path])
        row[f"{path}_peak_mb"] = peak_memory(family, shape, path, device, r) / 2**20
    row["speedup"] = row["full_step_s"] / row["chunked_step_s"]
    row["memory_ratio"] = row["chunked_peak_mb"] / row["full_peak_mb"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "loss_path.json")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(cpu_peak(*args.child, steps=2))
        return
    device = torch.device(args.device)
    rows = []
    for shape in args.shapes:
        for family in FAMILIES:
            row = measure(family, shape, device, args.steps, args.warmup)
            print(json.dumps(row))
            rows.append(row)
    print(f"{'shape':10} {'family':6} {'full s':>8} {'chunked s':>9} {'x':>5} {'full MB':>8} {'chunked MB':>10}")
    for r in rows:
        print(
            f"{r['shape']:10} {r['family']:6} {r['full_step_s']:8.3f} {r['chunked_step_s']:9.3f} "
            f"{r['speedup']:5.2f} {r['full_peak_mb']:8.1f} {r['chunked_peak_mb']:10.1f}"
        )
    info = machine_info(device, threads=args.threads, steps=args.steps, warmup=args.warmup)
    write_result(args.out, {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()
