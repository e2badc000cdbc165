"""Training throughput and MFU of the backbone, and AR decoding speed with and without the KV cache.

MFU = achieved training FLOP/s (``flops_per_token(cfg, L)["train"]`` x tokens/s) divided by the matmul peak of
the same precision, measured in this run (the best of square matmuls of a few sizes). Everything is measured
side by side in one process on one machine, which the JSON names; compare ratios, not absolute numbers
across machines.

    python benchmarks/train_throughput.py                  # everything (CPU: ~15 minutes on 2 cores)
    python benchmarks/train_throughput.py --shapes tiny-cpu --no-compile
    python benchmarks/train_throughput.py --device cuda    # on a GPU

Prints a table and writes benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import machine_info, sync, write_result  # benchmarks/common.py (run as a script)
from dlm.data.specials import SpecialIds
from dlm.model import ModelConfig, build_model, flops_per_token
from dlm.process import ProcessConfig, get_process

SHAPES = {
    # name: (model config, batch, seq_len)
    "tiny-cpu": (dict(vocab_size=4096, n_layer=4, n_head=4, d_model=256), 16, 256),
    "124M": (dict(vocab_size=50257, n_layer=12, n_head=12, d_model=768, mlp="gelu", norm="layernorm"), 1, 256),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_peak(dtype: torch.dtype, device: torch.device, sizes: tuple[int, ...], seconds: float = 1.0) -> float:
    """Best FLOP/s of n x n x n matmuls over ``sizes`` (each timed for about ``seconds``)."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        a @ b
        sync(device)
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or reps < 2:
            a @ b
            reps += 1
        sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def train_step_rate(
    cfg: ModelConfig, batch: int, seq_len: int, precision: str, compile_: bool, steps: int, warmup: int, device
) -> dict:
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    step_model = torch.compile(model) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device=device)
    times = []
    t_first = None
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = step_model(ids[:, :-1], attn="causal")
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        dt = time.perf_counter() - t0
        if i == 0:
            t_first = dt
        if i >= warmup:
            times.append(dt)
    step_s = statistics.median(times)
    return {"step_s": step_s, "tok_s": batch * seq_len / step_s, "first_step_s": t_first, "steps_timed": steps}


def decode_rate(cfg: ModelConfig, batch: int, length: int, use_cache: bool, device) -> dict:
    torch.manual_seed(0)
    model = build_model(cfg).to(device).eval()
    sp = SpecialIds(bos=0, eos=1, pad=2, mask=cfg.vocab_size, vocab_size=cfg.vocab_size)
    process = get_process(ProcessConfig(name="ar"), sp)
    gen = torch.Generator().manual_seed(0)
    sync(device)
    t0 = time.perf_counter()
    out = process.sample(model, batch, length, prompt_ids=[0], generator=gen, use_cache=use_cache, stop_at_eos=False)
    sync(device)
    dt = time.perf_counter() - t0
    new_tokens = int((out.lengths_N - out.prompt_len).sum())
    return {"wall_s": dt, "tok_s": new_tokens / dt, "nfe": out.nfe, "new_tokens": new_tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--steps", type=int, default=3, help="timed steps per row (median)")
    p.add_argument("--slow-steps", type=int, default=1, help="timed steps for rows slower than 20 s/step")
    p.add_argument("--decode-length", type=int, default=512)
    p.add_argument("--decode-batch", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_throughput.json")
    a = p.parse_args()
    device = torch.device(a.device)

    peaks = {}
    for prec in a.precisions:
        sizes = (512, 1024, 2048) if prec == "fp32" or device.type == "cuda" else (256, 512)
        peaks[prec] = matmul_peak(DTYPES[prec], device, sizes)
        print(f"matmul peak {prec}: {peaks[prec] / 1e9:.1f} GFLOP/s", flush=True)

    rows = []
    for shape in a.shapes:
        kw, batch, seq_len = SHAPES[shape]
        cfg = ModelConfig(context=max(seq_len, a.decode_length), **kw)
        fl = flops_per_token(cfg, seq_len)["train"]
        for compile_ in [False] if a.no_compile else [False, True]:
            for prec in a.precisions:
                # a probe step decides how many steps this row can afford
                probe = train_step_rate(cfg, batch, seq_len, prec, compile_, 1, 1, device)
                steps = a.steps if probe["step_s"] < 20 else a.slow_steps
                r = probe if steps == 1 else train_step_rate(cfg, batch, seq_len, prec, compile_, steps, 1, device)
                r.update(shape=shape, batch=batch, seq_len=seq_len, precision=prec, compile=compile_)
                r["train_flops_per_token"] = fl
                r["achieved_flop_s"] = r["tok_s"] * fl
                r["mfu"] = r["achieved_flop_s"] / peaks[prec]
                rows.append(r)
                print(
                    f"{shape:<9}{prec:<6}{'compiled' if compile_ else 'eager':<10}{r['tok_s']:>10.0f} tok/s"
                    f"{r['mfu'] * 100:>8.1f}% MFU  ({r['step_s']:.2f} s/step)",
                    flush=True,
                )

    decode = []
    kw, _, _ = SHAPES["tiny-cpu"]
    cfg = ModelConfig(context=a.decode_length, **kw)
    for use_cache in (True, False):
        r = decode_rate(cfg, a.decode_batch, a.decode_length, use_cache, device)
        r.update(shape="tiny-cpu", batch=a.decode_batch, length=a.decode_length, kv_cache=use_cache)
        decode.append(r)
    speedup = decode[0]["tok_s"] / decode[1]["tok_s"]

    print(f"\ntraining ({device}, {torch.get_num_threads()} threads); MFU against the measured matmul peak")
    print(f"{'shape':<10}{'prec':<6}{'mode':<10}{'tok/s':>10}{'GFLOP/s':>10}{'MFU':>8}{'s/step':>9}")
    for r in rows:
        print(
            f"{r['shape']:<10}{r['precision']:<6}{'compiled' if r['compile'] else 'eager':<10}{r['tok_s']:>10.0f}"
            f"{r['achieved_flop_s'] / 1e9:>10.1f}{r['mfu'] * 100:>7.1f}%{r['step_s']:>9.2f}"
        )
    print("matmul peaks: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()))
    print(f"\nAR decoding, tiny-cpu shape, batch {a.decode_batch}, {a.decode_length} tokens")
    for r in decode:
        print(f"  {'KV cache' if r['kv_cache'] else 'recompute':<10}{r['tok_s']:>9.0f} tok/s  ({r['wall_s']:.1f} s)")
    print(f"  KV-cache speedup: {speedup:.1f}x")

    out = {
        "benchmark": "train_throughput",
        "machine": machine_info(device),
        "matmul_peak_flop_s": peaks,
        "train": rows,
        "decode": decode,
        "kv_cache_speedup": speedup,
    }
    write_result(a.out, out)


if __name__ == "__main__":
    main()
