"""Sampling speed under one protocol (dlm.eval.speed): AR with its KV cache against MDLM ``ddpm`` and ``ddpm_cache``.

Side by side in one process, on one tiny random-weight backbone per family (V = 256 + MASK for MDLM, 2 layers,
d = 64, L = 64; MDLM without time conditioning, so ``ddpm_cache`` is exact), at batch 1 (latency) and batch 8
(throughput), MDLM at several step counts: seconds per sequence, generated tokens/s, NFE (``measure_sampling``:
warm-up calls first, each timed call device-synchronised, median of the repeats). Then the thesis protocol
(``thesis_protocol``: batch 4 until a token target, batches/s) with a small target. Random weights: AR rows may
stop at an EOS early, so AR's tokens/s counts generated tokens only (up to and including the EOS); AR starts
from BOS (L - 1 tokens per row at most), MDLM unconditioned generates all L positions.

    python benchmarks/sampling_speed.py                     # 2 idle CPU cores: well under a minute
    python benchmarks/sampling_speed.py --device cuda --length 256 --thesis-tokens 100000

Prints a table and writes benchmarks/results/sampling_speed.json. Compare ratios, not absolute numbers across
machines; other jobs on the machine disturb timings (the JSON records the load average).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from common import write_result  # benchmarks/common.py (run as a script)
from dlm.data.specials import SpecialIds
from dlm.eval.speed import machine_info, measure_sampling, thesis_protocol
from dlm.model import ModelConfig, build_model
from dlm.process import ProcessConfig, get_process
from dlm.process.base import Process

SHAPE = dict(vocab_size=256, n_layer=2, n_head=2, d_model=64)


def build_for(process: Process, context: int, device: torch.device) -> nn.Module:
    """The tiny backbone with the vocabulary and time conditioning the process asks for (seeded weights)."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        context=context, time_cond=process.time_conditioned, **{**SHAPE, "vocab_size": process.vocab_size}
    )
    return build_model(cfg).to(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--steps-list", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--thesis-tokens", type=int, default=2000, help="token target of the thesis protocol (0: skip)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sampling_speed.json")
    a = p.parse_args()
    device = torch.device(a.device)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    V = SHAPE["vocab_size"]
    sp = SpecialIds(bos=0, eos=1, pad=2, mask=V, vocab_size=V)
    ar = get_process(ProcessConfig(name="ar"), sp)
    mdlm = get_process(ProcessConfig(name="mdlm"), sp)
    models = {"ar": build_for(ar, a.length, device), "mdlm": build_for(mdlm, a.length, device)}
    settings = [("ar", ar, None, None)] + [
        ("mdlm", mdlm, sampler, S) for S in a.steps_list for sampler in ("ddpm", "ddpm_cache")
    ]
    common_kw = dict(length=a.length, n_repeats=a.repeats, warmup=a.warmup, device=device, generator_seed=0)
    rows = []
    for B in a.batch_sizes:
        for family, process, sampler, S in settings:
            r = measure_sampling(process, models[family], batch_size=B, sampler=sampler, steps=S, **common_kw)
            rows.append({"family": family, **r})
            print(f"  B={B} {family} {r['sampler']} S={S}: {r['median_s']:.3f} s", flush=True)
    thesis = []
    if a.thesis_tokens > 0:
        mid = a.steps_list[len(a.steps_list) // 2]
        for family, process, sampler, S in [
            ("ar", ar, None, None),
            ("mdlm", mdlm, "ddpm", mid),
            ("mdlm", mdlm, "ddpm_cache", mid),
        ]:
            r = thesis_protocol(
                process, models[family], length=a.length, sampler=sampler, steps=S, device=device,
                generator_seed=0, token_target=a.thesis_tokens,
            )  # fmt: skip
            thesis.append({"family": family, **r})

    print(f"\nsampling speed, L={a.length}, V={V}, 2 layers d=64, random weights, {device}, median of {a.repeats}")
    print(
        f"{'B':>3} {'family':<7}{'sampler':<12}{'S':>5}{'s/seq':>10}{'min s/seq':>11}{'tokens/s':>11}{'NFE':>6}"
        f"{'gen tok':>9}"
    )
    for r in rows:
        S = "-" if r["steps"] is None else r["steps"]
        print(
            f"{r['batch_size']:>3} {r['family']:<7}{r['sampler']:<12}{S:>5}{r['seconds_per_sequence']:>10.4f}"
            f"{min(r['times_s']) / r['batch_size']:>11.4f}{r['tokens_per_s']:>11.0f}{r['nfe']:>6}"
            f"{r['generated_tokens']:>9}"
        )
    if thesis:
        print(f"\nthesis protocol: batch 4 until {a.thesis_tokens} tokens")
        print(f"{'family':<7}{'sampler':<12}{'S':>5}{'batches':>9}{'batches/s':>11}{'tokens/s':>11}")
        for r in thesis:
            S = "-" if r["steps"] is None else r["steps"]
            print(
                f"{r['family']:<7}{r['sampler']:<12}{S:>5}{r['batches']:>9}{r['batches_per_s']:>11.2f}"
                f"{r['tokens_per_s']:>11.0f}"
            )
    result = {
        "machine": machine_info(device),
        "shape": {**SHAPE, "length": a.length, "mdlm_time_cond": mdlm.time_conditioned},
        "protocol": {"repeats": a.repeats, "warmup": a.warmup, "generator_seed": 0, "thesis_tokens": a.thesis_tokens},
        "measure_sampling": rows,
        "thesis_protocol": thesis,
    }
    write_result(a.out, result)


if __name__ == "__main__":
    main()
