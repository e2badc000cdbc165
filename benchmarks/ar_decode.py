"""AR decoding speed: the growing-slice KV-cache path against the static-shape decode step, side by side in one run.

Both paths sample with ``ARProcess.sample`` from [BOS] for ``--new-tokens`` tokens (stop_at_eos off, so every row
generates them all), random weights, on two shapes: tiny-cpu (4 layers, d 256, swiglu, V 4096) and GPT-2-small
(12 layers, d 768, gelu, layernorm, V 50257). "growing" is the path before issue 14 (``model.static_decode =
False``: a fresh mask plan and key slices of a new length at every step, a host check per token); "static" is the
default (``Transformer.decode_step`` through ``Decoder``: fixed shapes, a CUDA graph on CUDA, a stop check every
16 tokens). For each (shape, B) the two paths alternate: one warm-up call each, then ``--repeats`` timed calls
each, interleaved; median wall time, device-synchronised. Both must draw identical ids (checked, recorded).

    python benchmarks/ar_decode.py                   # 1 CPU thread: about 2 minutes
    python benchmarks/ar_decode.py --device cuda --new-tokens 1023 --batch-sizes 1 64

Prints a table and writes benchmarks/results/ar_decode.json (machine named). Compare the ratio, not absolute
numbers across machines; other jobs on the machine disturb timings (the JSON records the load average).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from common import machine_info, sync, write_result  # benchmarks/common.py (run as a script)
from dlm.data.specials import SpecialIds
from dlm.model import ModelConfig, build_model, count_params
from dlm.process import ProcessConfig, get_process

SHAPES = {
    "tiny-cpu": dict(vocab_size=4096, n_layer=4, n_head=4, d_model=256),
    "gpt2-small": dict(vocab_size=50257, n_layer=12, n_head=12, d_model=768, mlp="gelu", norm="layernorm"),
}
PATHS = ("growing", "static")


def timed_sample(process: Any, model: torch.nn.Module, path: str, B: int, length: int, device: torch.device) -> tuple:
    """(seconds, result) of one sampling call on ``path``, seed 0, device-synchronised."""
    model.static_decode = path == "static"
    generator = torch.Generator(device).manual_seed(0)
    sync(device)
    t0 = time.perf_counter()
    out = process.sample(model, B, length, generator=generator, stop_at_eos=False)
    sync(device)
    return time.perf_counter() - t0, out


def measure(shape: str, B: int, new_tokens: int, repeats: int, device: torch.device) -> dict[str, Any]:
    cfg = ModelConfig(context=new_tokens + 1, **SHAPES[shape])
    torch.manual_seed(0)
    model = build_model(cfg).to(device).eval()
    V = cfg.vocab_size
    process = get_process(ProcessConfig(name="ar"), SpecialIds(bos=0, eos=1, pad=2, mask=V, vocab_size=V))
    length = new_tokens + 1
    outs = {path: timed_sample(process, model, path, B, length, device)[1] for path in PATHS}  # warm-up
    times: dict[str, list[float]] = {path: [] for path in PATHS}
    for _ in range(repeats):
        for path in PATHS:
            times[path].append(timed_sample(process, model, path, B, length, device)[0])
    same = torch.equal(outs["growing"].ids_NL, outs["static"].ids_NL)
    row: dict[str, Any] = {"shape": shape, "params": count_params(model), "batch_size": B, "new_tokens": new_tokens}
    for path in PATHS:
        median = statistics.median(times[path])
        row[path] = {"times_s": times[path], "median_s": median, "tokens_per_s": B * new_tokens / median}
    row["speedup"] = row["growing"]["median_s"] / row["static"]["median_s"]
    row["identical_ids"] = same
    row["nfe"] = {path: outs[path].nfe for path in PATHS}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ar_decode.json")
    a = p.parse_args()
    device = torch.device(a.device)
    torch.set_num_threads(a.threads)
    rows = []
    with torch.no_grad():
        for shape in a.shapes:
            for B in a.batch_sizes:
                rows.append(measure(shape, B, a.new_tokens, a.repeats, device))
                r = rows[-1]
                print(f"  {shape} B={B}: x{r['speedup']:.2f}", flush=True)
    machine = machine_info(device)
    print(f"\nAR decoding, {a.new_tokens} new tokens from [BOS], random weights, {machine['device_name']}, ", end="")
    print(f"{a.threads} thread(s), median of {a.repeats} interleaved calls")
    print(f"{'shape':<12}{'B':>3}{'growing tok/s':>15}{'static tok/s':>14}{'ratio':>8}{'same ids':>10}")
    for r in rows:
        print(
            f"{r['shape']:<12}{r['batch_size']:>3}{r['growing']['tokens_per_s']:>15.1f}"
            f"{r['static']['tokens_per_s']:>14.1f}{r['speedup']:>8.2f}{r['identical_ids']!s:>10}"
        )
    protocol = {"new_tokens": a.new_tokens, "repeats": a.repeats, "warmup": 1, "generator_seed": 0, "interleaved": True}
    write_result(a.out, {"machine": machine, "protocol": protocol, "rows": rows})


if __name__ == "__main__":
    main()
