"""The speed stage of ``dlm compare``: sampling speed of one run, measured the same way for every arm.

:func:`speed_set` times ``dlm.eval.speed.measure_sampling`` per (sampler, steps, batch size) and the thesis
protocol (``thesis_protocol``) per (sampler, steps), and writes ``RUN/eval/speed-step{N}-{hash}.json``; the
machine (CPU model / device name, torch version and threads) is part of the settings, so a speed measured on
another machine is another file, never mixed with this one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from dlm.compare.evaluate import Log, _check_int, _now, resolve_setting
from dlm.errors import DlmError
from dlm.eval.results import check_device, check_writable, result_path, reuse
from dlm.eval.run import run_tokenizer, start_ids
from dlm.eval.speed import machine_info, measure_sampling, thesis_protocol
from dlm.io import write_json_atomic
from dlm.rundir import LoadedRun, load_run

__all__ = ["SPEED_PROTOCOL", "speed_set"]

#: Version of the speed protocol, part of the settings (bump it when old files become incomparable).
SPEED_PROTOCOL = 1


def speed_set(
    run_dir: str | Path,
    *,
    settings: list[tuple[str | None, int | None]],
    batch_sizes: list[int],
    repeats: int,
    protocol_tokens: int,
    seed: int = 0,
    warmup: int = 1,
    device: str = "cpu",
    force: bool = False,
    log: Log = None,
) -> tuple[dict[str, Any], Path]:
    """Sampling speed of a run's last checkpoint: ``measure_sampling`` for each (sampler, steps) in ``settings``
    and each batch size, and ``thesis_protocol`` (batch 4 until ``protocol_tokens`` tokens) per (sampler, steps)
    when ``protocol_tokens`` > 0; rows of the data's row length continuing the document boundary.

    One file ``speed-step{N}-{hash}.json``; its settings hold the lists, repeats, warm-up, token target, seed,
    device type, checkpoint and the machine (CPU model, device name, torch version and threads), so a speed
    measured on another machine is another file. Returns (record, path); reuse as the other stages.
    """
    if not settings:
        raise DlmError("speed needs at least one (sampler, steps) setting")
    if not batch_sizes:
        raise DlmError("speed needs at least one batch size")
    for b in batch_sizes:
        _check_int("speed batch size", b, 1)
    _check_int("speed repeats", repeats, 1)
    _check_int("speed warmup", warmup, 0)
    _check_int("protocol tokens", protocol_tokens, 0)
    _check_int("speed seed", seed, 0)
    dev = check_device(device)
    run = load_run(run_dir, device=device)
    prompt = start_ids(run.data_meta, run_tokenizer(run), None)
    length = int(run.data_meta["seq_len"])
    resolved = [resolve_setting(run.process, s, st, length) for s, st in settings]
    if len(set(resolved)) != len(resolved):
        raise DlmError(f"speed settings repeat a (sampler, steps): {resolved}")
    machine = machine_info(dev)
    key = {
        "protocol": SPEED_PROTOCOL,
        "settings": [[name, steps] for name, steps in resolved],
        "batch_sizes": list(batch_sizes),
        "repeats": repeats,
        "warmup": warmup,
        "protocol_tokens": protocol_tokens,
        "seed": seed,
        "length": length,
        "device": dev.type,
        "checkpoint_step": run.step,
        "ema": run.ema,
        "process": asdict(run.cfg.process),
        "machine": {k: machine[k] for k in ("cpu_model", "device_name", "torch", "torch_threads")},
    }
    path = result_path(run_dir, "speed", f"step{run.step}", key)
    if (old := reuse(path, key, force=force, log=log)) is not None:
        return old, path
    check_writable(path.parent)
    rows, protocol = _measure(run, resolved, key, prompt, dev, log or (lambda line: None))
    record = {
        "kind": "speed",
        "settings": key,
        "family": run.process.name,
        "checkpoint_step": run.step,
        "machine": machine,
        "rows": [_finite(r) for r in rows],
        "protocol": [_finite(p) for p in protocol],
        "created": _now(),
    }
    write_json_atomic(path, record)
    return record, path


def _measure(
    run: LoadedRun,
    resolved: list[tuple[str, int | None]],
    key: dict[str, Any],
    prompt: list[int],
    dev: torch.device,
    log: Callable[[str], None],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``measure_sampling`` rows (sampler x steps x batch size) and ``thesis_protocol`` results (sampler x steps,
    when ``protocol_tokens`` > 0) of the speed settings ``key``; one log line per measurement."""
    common = {"length": key["length"], "device": dev, "generator_seed": key["seed"], "prompt_ids": prompt}
    family = run.process.name
    rows, protocol = [], []
    for name, steps in resolved:
        for b in key["batch_sizes"]:
            row = measure_sampling(
                run.process, run.model, batch_size=b, sampler=name, steps=steps, n_repeats=key["repeats"],
                warmup=key["warmup"], **common,
            )  # fmt: skip
            rows.append(row)
            log(
                f"speed {family} {name} steps {steps} batch {b}: {row['seconds_per_sequence']:.4f} s/sequence, "
                f"{row['tokens_per_s']:.0f} tokens/s, nfe {row['nfe']}"
            )
        if key["protocol_tokens"] > 0:
            p = thesis_protocol(
                run.process, run.model, sampler=name, steps=steps, token_target=key["protocol_tokens"],
                warmup=key["warmup"], **common,
            )  # fmt: skip
            protocol.append(p)
            log(
                f"speed protocol {family} {name} steps {steps}: {p['batches_per_s']:.2f} batches/s, "
                f"{p['tokens_per_s']:.0f} tokens/s over {p['generated_tokens']} tokens"
            )
    return rows, protocol


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    """A speed row with an infinite rate (a call timed at 0 s) written as null: the files are strict JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
