"""Sampling speed under one protocol for every family: warm-up first, device synchronised, median of repeats.

Two measurements, both through the one entry point ``Process.sample`` (AR decodes with its KV cache by default):

- ``measure_sampling``: latency / throughput of one (sampler, steps, batch size, length) setting. ``warmup``
  untimed calls, then ``n_repeats`` timed calls, each bracketed by a device synchronisation and
  ``time.perf_counter``. Every call (warm-up included) uses a fresh generator seeded with ``generator_seed``, so
  the repeats do identical work (same draws, same EOS stops, same NFE) and their spread is the machine's.
- ``thesis_protocol``: the thesis's generation-speed protocol, batches of 4 until a token target is reached,
  reported as batches/s and tokens/s.

Generated tokens (the numerator of tokens/s) count, per row, the positions the sampler produced:

    generated = sum_n (lengths_N[n] - prompt_len)

``lengths_N`` includes the EOS that stopped an AR row (``stop_at_eos``), so an EOS-stopped row counts the tokens up
to and including its EOS and not the pad ids after it; a diffusion row counts every non-prompt position.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed calls (the peak statistics are reset
after the warm-up); on CPU the process's peak resident set size from ``resource.getrusage`` (process-wide, since
the process started, so it includes everything the process did before: labelled as such).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from dlm.errors import DlmError
from dlm.process.base import Process, SampleResult

THESIS_BATCH_SIZE = 4
THESIS_TOKEN_TARGET = 100_000


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work so that a wall-clock interval covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generated_tokens(result: SampleResult) -> int:
    """Tokens a sampler produced: sum_n (lengths_N[n] - prompt_len) (an AR row stopped by EOS counts its EOS)."""
    return int((result.lengths_N - result.prompt_len).clamp(min=0).sum().item())


def _peak_memory_start(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> tuple[int | None, str]:
    """(peak bytes, what the number is): CUDA allocator peak of the timed calls, or the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated over the timed calls"
    try:
        import resource
    except ImportError:  # not on this platform (Windows)
        return None, "unavailable on this platform"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux kilobytes
    return int(rss) * scale, "process-wide peak RSS since process start (resource.getrusage)"


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DlmError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _sample_call(
    process: Process,
    model: torch.nn.Module,
    *,
    batch_size: int,
    length: int,
    sampler: str | None,
    steps: int | None,
    prompt_ids: list[int] | None,
) -> tuple[str, Any]:
    """The sampler's name and a function gen -> SampleResult, after checking the arguments once."""
    _check_int("batch_size", batch_size, 1)
    _check_int("length", length, 1)
    name = process.resolve_sampler(sampler)
    takes_steps = process.sampler_specs()[name].takes_steps
    if steps is not None and not takes_steps:
        raise DlmError(
            f"the {process.name} sampler {name!r} takes no steps (one network call per token); give steps=None"
        )
    opts: dict[str, Any] = {} if steps is None else {"steps": steps}

    def call(generator: torch.Generator) -> SampleResult:
        return process.sample(
            model, batch_size, length, sampler=name, prompt_ids=prompt_ids, generator=generator, **opts
        )

    return name, call


def measure_sampling(
    process: Process,
    model: torch.nn.Module,
    *,
    batch_size: int,
    length: int,
    sampler: str | None,
    steps: int | None,
    n_repeats: int,
    warmup: int,
    device: torch.device | str,
    generator_seed: int,
    prompt_ids: list[int] | None = None,
) -> dict[str, Any]:
    """Time ``process.sample`` for one setting: ``warmup`` untimed calls, then ``n_repeats`` timed ones.

    Each timed call i is  t_i = perf_counter() after sync - perf_counter() before, with the device synchronised
    before and after the call. Reported (median over the repeats, ``statistics.median``):

        median_s              = median_i t_i
        seconds_per_sequence  = median_s / batch_size
        tokens_per_s          = generated_tokens / median_s,  generated_tokens = sum_n (lengths_N[n] - prompt_len)
        nfe                   = network calls of one call (``SampleResult.nfe``; the same in every repeat)

    plus every t_i (``times_s``), the NFE and generated tokens of every repeat, and the peak memory (see the
    module docstring for what it covers). ``steps`` is None for a sampler without steps (AR) or to use the
    family's default. Bad arguments (batch_size or n_repeats < 1, warmup < 0, a sampler the process lacks, steps
    for a sampler without steps) raise a one-line ``DlmError`` before any call.
    """
    device = torch.device(device)
    _check_int("n_repeats", n_repeats, 1)
    _check_int("warmup", warmup, 0)
    name, call = _sample_call(
        process, model, batch_size=batch_size, length=length, sampler=sampler, steps=steps, prompt_ids=prompt_ids
    )

    def seeded() -> torch.Generator:
        return torch.Generator(device=device).manual_seed(generator_seed)

    for _ in range(warmup):
        call(seeded())
    _sync(device)
    _peak_memory_start(device)
    times_s, nfe_R, tokens_R, prompt_len = _timed_calls(call, seeded, n_repeats, device)
    peak, scope = _peak_memory(device)
    median_s = statistics.median(times_s)
    tokens = int(statistics.median(tokens_R))
    return {
        "sampler": name,
        "steps": steps,
        "batch_size": batch_size,
        "length": length,
        "prompt_len": prompt_len,
        "warmup": warmup,
        "n_repeats": n_repeats,
        "generator_seed": generator_seed,
        "device": str(device),
        "times_s": times_s,
        "median_s": median_s,
        "seconds_per_sequence": median_s / batch_size,
        "generated_tokens": tokens,
        "generated_tokens_per_repeat": tokens_R,
        "tokens_per_s": tokens / median_s if median_s > 0 else float("inf"),
        "nfe": nfe_R[0],
        "nfe_per_repeat": nfe_R,
        "peak_memory_bytes": peak,
        "peak_memory_scope": scope,
    }


def _timed_calls(
    call: Callable[[torch.Generator], SampleResult],
    seeded: Callable[[], torch.Generator],
    n_repeats: int,
    device: torch.device,
) -> tuple[list[float], list[int], list[int], int]:
    """``n_repeats`` calls, each with a fresh generator from ``seeded`` and the device synchronised before and
    after it: (seconds of each call, its NFE, its generated tokens, the prompt length)."""
    times_s: list[float] = []
    nfe_R: list[int] = []
    tokens_R: list[int] = []
    prompt_len = 0
    for _ in range(n_repeats):
        gen = seeded()
        _sync(device)
        t0 = time.perf_counter()
        result = call(gen)
        _sync(device)
        times_s.append(time.perf_counter() - t0)
        nfe_R.append(int(result.nfe))
        tokens_R.append(generated_tokens(result))
        prompt_len = result.prompt_len
    return times_s, nfe_R, tokens_R, prompt_len


def thesis_protocol(
    process: Process,
    model: torch.nn.Module,
    *,
    length: int,
    sampler: str | None,
    steps: int | None,
    device: torch.device | str,
    generator_seed: int,
    token_target: int = THESIS_TOKEN_TARGET,
    batch_size: int = THESIS_BATCH_SIZE,
    warmup: int = 1,
    prompt_ids: list[int] | None = None,
) -> dict[str, Any]:
    """The thesis's generation-speed protocol: batches of 4 until ``token_target`` (100,000) tokens, in batches/s.

    The thesis (../shared/papers/thesis-d3pm-vs-ar-wikitext103.txt, the introduction of chapter 4 "Results"): "the
    number of generated tokens was limited to 100,000 per model to ensure uniformity in performance comparison.
    Additionally, a batch size of 4 was consistently used across all evaluations ... batch processing speed
    (i.e., batches per second)";
    the abstract: "generating 100,000 tokens per model with a fixed batch size of four". The thesis does not say
    how a last partial batch or warm-up was handled; here ``warmup`` untimed calls come first and batches are
    drawn until the running total first reaches the target (the last batch is kept whole):

        batches         = min { k : sum_{j<=k} tokens_j >= token_target }
        total_s         = sum_{j<=batches} t_j           (each t_j device-synchronised, as in measure_sampling)
        batches_per_s   = batches / total_s
        tokens_per_s    = sum_j tokens_j / total_s,       tokens_j = sum_n (lengths_N[n] - prompt_len)

    One generator seeded with ``generator_seed`` runs through all batches (distinct samples per batch).
    """
    device = torch.device(device)
    _check_int("token_target", token_target, 1)
    _check_int("warmup", warmup, 0)
    name, call = _sample_call(
        process, model, batch_size=batch_size, length=length, sampler=sampler, steps=steps, prompt_ids=prompt_ids
    )
    for _ in range(warmup):
        call(torch.Generator(device=device).manual_seed(generator_seed))
    gen = torch.Generator(device=device).manual_seed(generator_seed)
    times_s: list[float] = []
    nfe_total = 0
    total = 0
    while total < token_target:
        _sync(device)
        t0 = time.perf_counter()
        result = call(gen)
        _sync(device)
        times_s.append(time.perf_counter() - t0)
        produced = generated_tokens(result)
        if produced == 0:
            raise DlmError(f"a batch of length {length} generated no tokens (prompt of {result.prompt_len} tokens)")
        total += produced
        nfe_total += int(result.nfe)
    total_s = sum(times_s)
    batches = len(times_s)
    return {
        "sampler": name,
        "steps": steps,
        "batch_size": batch_size,
        "length": length,
        "token_target": token_target,
        "warmup": warmup,
        "generator_seed": generator_seed,
        "device": str(device),
        "batches": batches,
        "generated_tokens": total,
        "total_s": total_s,
        "times_s": times_s,
        "batches_per_s": batches / total_s if total_s > 0 else float("inf"),
        "tokens_per_s": total / total_s if total_s > 0 else float("inf"),
        "nfe_total": nfe_total,
    }


def _cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | str) -> dict[str, Any]:
    """The machine a speed was measured on: CPU model, cores, torch threads, torch version, device name, load.

    The benchmark scripts record it too (benchmarks/common.py calls this function).
    """
    device = torch.device(device)
    return {
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
