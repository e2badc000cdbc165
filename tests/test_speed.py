"""The speed protocol (dlm.eval.speed): warm-up untimed, n_repeats timed, median and tokens/s under a fake clock,
the thesis protocol's stop rule, one-line errors. No timing assertions: the clock is faked."""

from __future__ import annotations

import statistics
from typing import Any

import pytest
import torch

from dlm.data.specials import SpecialIds
from dlm.errors import DlmError
from dlm.eval import speed
from dlm.eval.speed import generated_tokens, machine_info, measure_sampling, thesis_protocol
from dlm.model import ModelConfig, build_model
from dlm.process import ProcessConfig, get_process
from dlm.process.base import Process, SampleResult

V = 16
SPECIALS = SpecialIds(bos=0, eos=1, pad=2, mask=V, vocab_size=V)


class FakeClock:
    """perf_counter that only advances when the fake sampler runs (by the scripted duration of that call)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """Replaces ``process.sample``: records each call, advances the clock by durations[i], returns lengths[i]."""

    def __init__(self, clock: FakeClock, durations: list[float], lengths: list[list[int]], nfe: int = 7) -> None:
        self.clock, self.durations, self.lengths, self.nfe = clock, durations, lengths, nfe
        self.calls: list[dict[str, Any]] = []

    def __call__(self, model: torch.nn.Module, n: int, length: int, **kw: Any) -> SampleResult:
        i = len(self.calls)
        self.calls.append({"n": n, "length": length, **kw})
        self.clock.now += self.durations[i]
        lengths_N = torch.tensor(self.lengths[i], dtype=torch.int64)
        assert lengths_N.shape == (n,)
        return SampleResult(
            ids_NL=torch.zeros(n, length, dtype=torch.int64), lengths_N=lengths_N, nfe=self.nfe, prompt_len=1
        )


def fake(monkeypatch: pytest.MonkeyPatch, family: str, durations: list[float], lengths: list[list[int]]):
    clock = FakeClock()
    monkeypatch.setattr(speed.time, "perf_counter", clock)
    process = get_process(ProcessConfig(name=family), SPECIALS)
    rec = Recorder(clock, durations, lengths)
    monkeypatch.setattr(process, "sample", rec)
    return process, rec


def test_warmup_is_untimed_and_median_and_tokens_per_s_are_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    # 2 warm-up calls (durations 50, 60 must not appear), then 5 repeats
    durations = [50.0, 60.0, 0.5, 0.25, 2.0, 0.75, 1.0]
    lengths = [[8, 8]] * len(durations)  # prompt_len 1: 7 generated tokens per row, 14 per call
    process, rec = fake(monkeypatch, "mdlm", durations, lengths)
    out = measure_sampling(
        process, None, batch_size=2, length=8, sampler="ddpm", steps=4, n_repeats=5, warmup=2,
        device="cpu", generator_seed=3,
    )  # fmt: skip
    assert len(rec.calls) == 7
    assert all(c["sampler"] == "ddpm" and c["steps"] == 4 and c["n"] == 2 for c in rec.calls)
    assert out["times_s"] == durations[2:]
    assert out["median_s"] == statistics.median(durations[2:]) == 0.75
    assert out["seconds_per_sequence"] == 0.75 / 2
    assert out["generated_tokens"] == 14
    assert out["tokens_per_s"] == 14 / 0.75
    assert out["nfe"] == 7 and out["nfe_per_repeat"] == [7] * 5
    assert out["peak_memory_bytes"] > 0 and "process-wide" in out["peak_memory_scope"]


def test_every_call_gets_a_fresh_generator_with_the_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    process, rec = fake(monkeypatch, "mdlm", [1.0] * 3, [[8]] * 3)
    measure_sampling(
        process, None, batch_size=1, length=8, sampler=None, steps=None, n_repeats=2, warmup=1,
        device="cpu", generator_seed=11,
    )  # fmt: skip
    first = [c["generator"].initial_seed() for c in rec.calls]
    assert first == [11, 11, 11]
    assert len({id(c["generator"]) for c in rec.calls}) == 3
    assert "steps" not in rec.calls[0]  # steps=None: the family's default, not passed


def test_eos_stopped_rows_count_up_to_their_eos() -> None:
    res = SampleResult(
        ids_NL=torch.zeros(3, 10, dtype=torch.int64), lengths_N=torch.tensor([10, 4, 2]), nfe=9, prompt_len=1
    )
    assert generated_tokens(res) == 9 + 3 + 1


@pytest.mark.parametrize("target,batches", [(30, 3), (31, 4), (40, 4), (1, 1)])
def test_thesis_protocol_stops_at_the_first_batch_reaching_the_target(
    monkeypatch: pytest.MonkeyPatch, target: int, batches: int
) -> None:
    # warm-up 1 (duration 99, untimed); each batch of 4 rows generates 10 tokens (lengths 3+3+3+5 - 4*1)
    durations = [99.0, 0.5, 1.5, 1.0, 1.0, 9.0]
    lengths = [[3, 3, 3, 5]] * len(durations)
    process, rec = fake(monkeypatch, "ar", durations, lengths)
    out = thesis_protocol(
        process, None, length=8, sampler=None, steps=None, device="cpu", generator_seed=0, token_target=target
    )
    assert len(rec.calls) == 1 + batches
    assert all(c["n"] == 4 for c in rec.calls)
    assert out["batches"] == batches and out["generated_tokens"] == 10 * batches
    total = sum(durations[1 : 1 + batches])
    assert out["total_s"] == total
    assert out["batches_per_s"] == batches / total
    assert out["tokens_per_s"] == 10 * batches / total
    # one generator runs through all timed batches
    assert len({id(c["generator"]) for c in rec.calls[1:]}) == 1


def test_thesis_protocol_defaults_are_the_thesis() -> None:
    assert speed.THESIS_BATCH_SIZE == 4 and speed.THESIS_TOKEN_TARGET == 100_000


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"n_repeats": 0}, "n_repeats must be an integer >= 1"),
        ({"warmup": -1}, "warmup must be an integer >= 0"),
        ({"sampler": "nope"}, "unknown sampler 'nope'"),
        ({"steps": 4}, "takes no steps"),
    ],
)
def test_bad_arguments_are_one_line_errors(monkeypatch: pytest.MonkeyPatch, kwargs: dict, message: str) -> None:
    process, rec = fake(monkeypatch, "ar", [1.0] * 4, [[8]] * 4)
    args = dict(batch_size=1, length=8, sampler=None, steps=None, n_repeats=1, warmup=0, device="cpu")
    with pytest.raises(DlmError, match=message) as e:
        measure_sampling(process, None, generator_seed=0, **{**args, **kwargs})
    assert "\n" not in str(e.value)
    assert rec.calls == []  # refused before any call


def test_thesis_protocol_refuses_a_zero_target(monkeypatch: pytest.MonkeyPatch) -> None:
    process, _ = fake(monkeypatch, "ar", [1.0], [[8]])
    with pytest.raises(DlmError, match="token_target"):
        thesis_protocol(
            process, None, length=8, sampler=None, steps=None, device="cpu", generator_seed=0, token_target=0
        )


def tiny(process: Process) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(
        context=12, time_cond=process.time_conditioned, vocab_size=process.vocab_size, n_layer=1, n_head=2, d_model=16
    )
    return build_model(cfg)


@pytest.mark.parametrize("family,sampler,steps", [("ar", None, None), ("mdlm", "ddpm", 3), ("mdlm", "ddpm_cache", 3)])
def test_real_tiny_models(family: str, sampler: str | None, steps: int | None) -> None:
    process = get_process(ProcessConfig(name=family), SPECIALS)
    model = tiny(process)
    out = measure_sampling(
        process, model, batch_size=3, length=12, sampler=sampler, steps=steps, n_repeats=2, warmup=1,
        device="cpu", generator_seed=5,
    )  # fmt: skip
    ref = process.sample(
        model, 3, 12, sampler=sampler, generator=torch.Generator().manual_seed(5), **({"steps": steps} if steps else {})
    )
    assert out["generated_tokens"] == generated_tokens(ref) and out["nfe"] == ref.nfe
    assert out["generated_tokens_per_repeat"] == [generated_tokens(ref)] * 2
    assert len(out["times_s"]) == 2 and out["sampler"] == process.resolve_sampler(sampler)
    if family == "mdlm":
        assert out["generated_tokens"] == 3 * (12 - ref.prompt_len)
        assert out["nfe"] <= steps


def test_machine_info_names_the_machine() -> None:
    info = machine_info("cpu")
    assert info["cpu_count"] >= 1 and info["torch"] == torch.__version__ and info["device"] == "cpu"
    assert isinstance(info["cpu_model"], str)
