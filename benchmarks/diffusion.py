"""Diffusion families against AR: training throughput, sampler overhead, and ``ddpm_cache`` against ``ddpm``.

Three parts, each measured side by side in one process on one machine (which the JSON names); compare the
ratios, not absolute numbers across machines.

1. Training tokens/s of MDLM, D3PM and SEDD (absorbing) relative to AR on the same backbone (tiny-cpu shape:
   V = 4096, + 1 MASK for the absorbing families, L = 256, B = 16, 4 layers, d = 256, fp32). D3PM and SEDD
   are time-conditioned by default (adaLN); the rows ``d3pm:t0`` / ``sedd:t0`` run them with time_cond false,
   which separates the cost of the conditioning from the family's own. A step is process.loss + backward +
   AdamW step; the processes take turns step by step (so load from other jobs hits them alike) and each row
   reports the median after one warm-up step, and the fastest step and its ratio to AR's fastest (less
   sensitive to other jobs on a shared machine).
   Target: ratio to AR >= 0.95.
2. MDLM ``ddpm`` sampler at L = 1024, V = 50257 (+ MASK), batch 1, on two backbones: the GPT-2-small shape
   (12 layers, d = 768: what a V = 50257, L = 1024 model is in practice) and a small one (2 layers, d = 128, so
   the vocabulary work dominates): time per step split into the network forward (a timing wrapper around the
   model) and everything else (reveal decisions, the float64 draws at revealed positions, bookkeeping). Few
   steps (S = L / 256 or L / 128) reveal many positions per step, which is the expensive end for the sampler.
   Target: non-network share <= 10% of the step.
3. MDLM ``ddpm_cache`` against ``ddpm`` at L = 256 for S in --steps-list (time-independent tiny model with
   random weights, batch 1, same seed): NFE and wall time of each. For S >> L most steps reveal nothing, so
   ``ddpm_cache`` makes at most L network calls (NFE <= min(S, L)) while ``ddpm`` makes S.

    python benchmarks/diffusion.py                       # S in {64, 256, 1024} (2 idle CPU cores: ~3 min)
    python benchmarks/diffusion.py --steps-list 64 256 1024 4096   # the full list (2 idle cores: ~4 min)
    python benchmarks/diffusion.py --device cuda

Prints a table per part and writes benchmarks/results/diffusion.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from common import load_avg, machine_info, sync, write_result  # benchmarks/common.py (run as a script)
from dlm.data.batch import Batch
from dlm.data.specials import SpecialIds
from dlm.model import ModelConfig, build_model
from dlm.process import ProcessConfig, available_processes, get_process
from dlm.process.base import Process

TRAIN_SHAPE = dict(vocab_size=4096, n_layer=4, n_head=4, d_model=256)  # tiny-cpu, as in train_throughput.py
SAMPLER_SHAPES = {  # name: (backbone, ddpm steps timed)
    "gpt2-small": (dict(vocab_size=50257, n_layer=12, n_head=12, d_model=768), 4),
    "2L-d128": (dict(vocab_size=50257, n_layer=2, n_head=2, d_model=128), 8),
}
CACHE_SHAPE = dict(vocab_size=4096, n_layer=2, n_head=2, d_model=128)


def specials_for(vocab_size: int) -> SpecialIds:
    """BOS/EOS/PAD at 0/1/2 and an appended MASK (id K): absorbing networks then have K + 1 outputs."""
    return SpecialIds(bos=0, eos=1, pad=2, mask=vocab_size, vocab_size=vocab_size)


def build_for(process: Process, shape: dict, context: int, device: torch.device) -> nn.Module:
    """The backbone of ``shape`` with the vocabulary and time conditioning the process asks for."""
    torch.manual_seed(0)
    kw = {**shape, "vocab_size": process.vocab_size}
    cfg = ModelConfig(context=context, time_cond=process.time_conditioned, **kw)
    return build_model(cfg).to(device)


class TimedModel(nn.Module):
    """Forwards to ``inner`` and adds the wall time of every call (synchronised on CUDA) to ``seconds``."""

    def __init__(self, inner: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.inner = inner
        self.cfg = getattr(inner, "cfg", None)
        self.device_ = device
        self.seconds = 0.0
        self.calls = 0

    def forward(self, *args, **kwargs):
        sync(self.device_)
        t0 = time.perf_counter()
        out = self.inner(*args, **kwargs)
        sync(self.device_)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


# ---------------------------------------------------------------------------------------------- part 1


def train_rows(names: list[str], batch: int, seq_len: int, steps: int, device: torch.device) -> list[dict]:
    sp = specials_for(TRAIN_SHAPE["vocab_size"])
    ids = torch.randint(3, sp.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    data = Batch(ids.to(device), torch.ones(batch, seq_len, dtype=torch.bool, device=device))
    runs = []
    for name in names:  # "sedd:t0" = sedd with time_cond false (isolates the adaLN cost from the family's own)
        family, _, variant = name.partition(":")
        cfg = ProcessConfig(name=family, time_cond=False if variant == "t0" else None)
        process = get_process(cfg, sp)
        model = build_for(process, TRAIN_SHAPE, seq_len, device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        gen = torch.Generator(device=device).manual_seed(0)
        runs.append(dict(name=name, process=process, model=model, opt=opt, gen=gen, times=[]))

    def step(r: dict) -> float:
        sync(device)
        t0 = time.perf_counter()
        loss, _ = r["process"].loss(r["model"], data, r["gen"])
        loss.backward()
        r["opt"].step()
        r["opt"].zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - t0

    for r in runs:  # warm-up
        r["first_step_s"] = step(r)
    for _ in range(steps):  # round robin: each timed round gives every process one step
        for r in runs:
            r["times"].append(step(r))
    rows = []
    for r in runs:
        step_s = statistics.median(r["times"])
        rows.append(
            dict(
                process=r["name"],
                time_cond=r["process"].time_conditioned,
                vocab_size=r["process"].vocab_size,
                batch=batch,
                seq_len=seq_len,
                step_s=step_s,
                tok_s=batch * seq_len / step_s,
                min_step_s=min(r["times"]),
                first_step_s=r["first_step_s"],
                steps_timed=steps,
                step_times_s=r["times"],
            )
        )
    ar = next(r for r in rows if r["process"] == "ar")
    for r in rows:
        r["ratio_to_ar"] = r["tok_s"] / ar["tok_s"]
        r["ratio_to_ar_best"] = ar["min_step_s"] / r["min_step_s"]  # less sensitive to other jobs' load
    return rows


# ---------------------------------------------------------------------------------------------- part 2


def sampler_split(shape_name: str, length: int, device: torch.device) -> dict:
    shape, steps = SAMPLER_SHAPES[shape_name]
    sp = specials_for(shape["vocab_size"])
    process = get_process(ProcessConfig(name="mdlm"), sp)
    model = TimedModel(build_for(process, shape, length, device), device)

    def run(n_steps: int) -> tuple[float, int]:
        model.seconds, model.calls = 0.0, 0
        gen = torch.Generator(device=device).manual_seed(0)
        sync(device)
        t0 = time.perf_counter()
        out = process.sample(model, 1, length, sampler="ddpm", steps=n_steps, generator=gen)
        sync(device)
        return time.perf_counter() - t0, out.nfe

    run(1)  # warm-up
    wall, nfe = run(steps)
    net = model.seconds
    row = dict(
        shape=shape_name,
        **shape,
        process="mdlm",
        sampler="ddpm",
        length=length,
        batch=1,
        steps=steps,
        revealed_per_step=length / steps,
        nfe=nfe,
        wall_s=wall,
        step_s=wall / steps,
        network_s_per_step=net / steps,
        other_s_per_step=(wall - net) / steps,
        non_network_share=(wall - net) / wall,
    )
    row["vocab_size"] = process.vocab_size
    return row


# ---------------------------------------------------------------------------------------------- part 3


def cache_rows(length: int, steps_list: list[int], device: torch.device) -> list[dict]:
    sp = specials_for(CACHE_SHAPE["vocab_size"])
    process = get_process(ProcessConfig(name="mdlm"), sp)
    assert not process.time_conditioned
    model = build_for(process, CACHE_SHAPE, length, device)
    process.sample(model, 1, length, sampler="ddpm", steps=4)  # warm-up
    rows = []
    for S in steps_list:
        res = {}
        for sampler in ("ddpm", "ddpm_cache"):
            gen = torch.Generator(device=device).manual_seed(0)
            sync(device)
            t0 = time.perf_counter()
            out = process.sample(model, 1, length, sampler=sampler, steps=S, generator=gen)
            sync(device)
            res[sampler] = (time.perf_counter() - t0, out.nfe, out.ids_NL)
            print(f"  S={S:<6}{sampler:<12}nfe {out.nfe:>6}  {res[sampler][0]:8.2f} s", flush=True)
        (w_d, n_d, ids_d), (w_c, n_c, ids_c) = res["ddpm"], res["ddpm_cache"]
        rows.append(
            dict(
                length=length,
                steps=S,
                ddpm_nfe=n_d,
                ddpm_wall_s=w_d,
                cache_nfe=n_c,
                cache_wall_s=w_c,
                speedup=w_d / w_c,
                nfe_ratio=n_d / n_c,
                identical_samples=bool(torch.equal(ids_d, ids_c)),
            )
        )
    return rows


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--parts", nargs="+", type=int, default=[1, 2, 3], choices=[1, 2, 3])
    p.add_argument("--train-steps", type=int, default=5, help="part 1: timed steps per process (median)")
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--train-length", type=int, default=256)
    p.add_argument("--sampler-length", type=int, default=1024)
    p.add_argument("--sampler-shapes", nargs="+", default=list(SAMPLER_SHAPES), choices=list(SAMPLER_SHAPES))
    p.add_argument("--cache-length", type=int, default=256)
    p.add_argument(
        "--steps-list",
        nargs="+",
        type=int,
        default=[64, 256, 1024],
        help="part 3: S values (4096 adds ~1.5 min on 2 idle cores, far more when busy)",
    )
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "diffusion.json")
    a = p.parse_args()
    device = torch.device(a.device)
    load_before = load_avg()
    t_start = time.perf_counter()

    train, split, cache = [], [], []
    if 1 in a.parts:
        names = ["ar", "mdlm", "d3pm", "d3pm:t0", "sedd", "sedd:t0"]
        print(f"part 1: training {', '.join(names)} ...", flush=True)
        train = train_rows(names, a.train_batch, a.train_length, a.train_steps, device)
    if 2 in a.parts:
        print("part 2: ddpm sampler split ...", flush=True)
        split = [sampler_split(name, a.sampler_length, device) for name in a.sampler_shapes]
    if 3 in a.parts:
        print("part 3: ddpm_cache vs ddpm ...", flush=True)
        cache = cache_rows(a.cache_length, a.steps_list, device)

    print(
        f"\n({device}, {torch.get_num_threads()} threads, torch {torch.__version__}, load avg at start {load_before})"
    )
    if train:
        print(f"\n1. training, tiny-cpu shape (B={a.train_batch}, L={a.train_length}, fp32, eager); target >= 0.95x AR")
        print(
            f"{'process':<9}{'time_cond':<11}{'V':>6}{'tok/s':>10}{'s/step':>9}{'vs AR':>8}"
            f"{'best s':>9}{'best vs AR':>12}"
        )
        for r in train:
            print(
                f"{r['process']:<9}{r['time_cond']!s:<11}{r['vocab_size']:>6}{r['tok_s']:>10.0f}"
                f"{r['step_s']:>9.3f}{r['ratio_to_ar']:>7.2f}x{r['min_step_s']:>9.3f}{r['ratio_to_ar_best']:>11.2f}x"
            )
    if split:
        print(
            f"\n2. MDLM ddpm step, L={a.sampler_length}, V={split[0]['vocab_size']}, batch 1; target non-network <= 10%"
        )
        print(f"{'backbone':<12}{'S':>4}{'nfe':>5}{'network s':>11}{'other s':>9}{'step s':>8}{'non-network':>13}")
        for r in split:
            print(
                f"{r['shape']:<12}{r['steps']:>4}{r['nfe']:>5}{r['network_s_per_step']:>11.3f}"
                f"{r['other_s_per_step']:>9.3f}{r['step_s']:>8.3f}{r['non_network_share']:>12.1%}"
            )
    if cache:
        print(f"\n3. MDLM ddpm_cache vs ddpm, L={a.cache_length}, batch 1, 2 layers d=128, V=4097, random weights")
        print(f"{'S':>6}{'ddpm nfe':>10}{'ddpm s':>9}{'cache nfe':>11}{'cache s':>9}{'speedup':>9}{'same':>6}")
        for r in cache:
            print(
                f"{r['steps']:>6}{r['ddpm_nfe']:>10}{r['ddpm_wall_s']:>9.2f}{r['cache_nfe']:>11}"
                f"{r['cache_wall_s']:>9.2f}{r['speedup']:>8.1f}x{'yes' if r['identical_samples'] else 'no':>6}"
            )
    total = time.perf_counter() - t_start
    print(f"\ntotal {total:.0f} s")

    out = {
        "benchmark": "diffusion",
        "machine": machine_info(device, load_avg_start=load_before, load_avg_end=load_avg()),
        "config": {
            "train_shape": {**TRAIN_SHAPE, "batch": a.train_batch, "seq_len": a.train_length, "precision": "fp32"},
            "train_steps": a.train_steps,
            "sampler_shapes": {k: {**SAMPLER_SHAPES[k][0], "steps": SAMPLER_SHAPES[k][1]} for k in a.sampler_shapes},
            "sampler_length": a.sampler_length,
            "cache_shape": {**CACHE_SHAPE, "length": a.cache_length, "steps_list": a.steps_list},
            "available_processes": available_processes(),
        },
        "train": train,
        "sampler_split": split,
        "ddpm_cache": cache,
        "total_s": total,
    }
    write_result(a.out, out)


if __name__ == "__main__":
    main()
