"""BD3-LM sampling through the public entry points: the stop rules between blocks (EOS, the low-entropy rule, the
requested length; what stopped a row is recorded and nothing is redrawn), the entropy each block records, rows
longer than the model context through ``Process.sample`` and ``dlm sample --length``, and bad stop options."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import dlm.process  # noqa: F401  (registers every family)
from dlm.data.specials import SpecialIds
from dlm.errors import DlmError
from dlm.model import ModelConfig, build_model
from dlm.process import ProcessConfig, available_processes, get_process
from dlm.process.absorbing import ddpm, ddpm_cache, first_hitting
from dlm.process.base import _REGISTRY, STOP_REASONS
from dlm.process.bd3lm import BD3LMProcess
from dlm.process.bd3lm_sampling import BlockDenoiser
from tests.helpers import sharp_tiny_model

K = 9  # tokenizer vocabulary; MASK is the appended id K
MASK, EOS, PAD = K, 1, 2
SPECIALS = SpecialIds(bos=0, eos=EOS, pad=PAD, mask=MASK, vocab_size=K)
LB = 4  # L'


def make(block_size: int = LB) -> BD3LMProcess:
    proc = get_process(ProcessConfig(name="bd3lm", block_size=block_size), SPECIALS)
    assert isinstance(proc, BD3LMProcess)
    return proc


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Stub(nn.Module):
    """A network whose logits are given per block: ``rule(b, N)`` -> logits [N, V] shared by the L' positions of
    block b. Uncached calls only, before any slide: the input is the window (b finished blocks) ⊕ z^b."""

    def __init__(self, rule: Callable[[int, int], Tensor], context: int = 64) -> None:
        super().__init__()
        self.rule, self.context, self.calls, self.blocks_seen = rule, context, 0, set()
        self.anchor = nn.Parameter(torch.zeros(1))  # the device of the model

    def forward(self, ids_BL: Tensor, attn=None, **kw) -> Tensor:
        assert not kw, "uncached calls only"
        self.calls += 1
        b = ids_BL.shape[1] // LB - 1
        self.blocks_seen.add(b)
        return self.rule(b, ids_BL.shape[0])[:, None, :].expand(-1, ids_BL.shape[1], -1).clone()


def no_eos_except(forced: dict[int, list[int]]) -> Callable[[int, int], Tensor]:
    """Uniform over the tokens other than EOS; in block b, rows forced[b] put all their mass on EOS."""

    def rule(b: int, n: int) -> Tensor:
        logits = torch.zeros(n, K + 1)
        logits[:, EOS] = -1e4
        for row in forced.get(b, []):
            logits[row, EOS] = 1e4
        return logits

    return rule


# --------------------------------------------------------------------------------------------------------- EOS


def test_an_eos_in_block_2_ends_the_row_after_it_and_nothing_is_redrawn() -> None:
    proc = make()
    model = Stub(no_eos_except({2: [0]}))
    kw = dict(prompt_ids=[0], steps=12, use_cache=False)
    out = proc.sample(model, 2, 24, stop_at_eos=True, generator=gen(3), **kw)
    free = proc.sample(model, 2, 24, stop_at_eos=False, generator=gen(3), **kw)  # the same stream, no rule
    assert out.stop_N == ["eos", "length"] and out.lengths_N.tolist() == [9, 24]
    assert out.ids_NL[0, 8] == EOS and bool((out.ids_NL[0, 9:] == PAD).all())  # block 2 starts at column 8
    assert bool((out.ids_NL[0, 1:8] != EOS).all())
    assert torch.equal(out.ids_NL[0, :9], free.ids_NL[0, :9]) and torch.equal(out.ids_NL[1], free.ids_NL[1])
    assert free.stop_N == ["length", "length"] and free.lengths_N.tolist() == [24, 24]  # off by default too
    assert free.stop_N == proc.sample(model, 2, 24, generator=gen(3), **kw).stop_N


def test_generation_ends_once_every_row_has_stopped() -> None:
    proc = make()
    model = Stub(no_eos_except({2: [0, 1]}))
    out = proc.sample(model, 2, 24, prompt_ids=[0], steps=12, use_cache=False, stop_at_eos=True, generator=gen(0))
    assert out.stop_N == ["eos", "eos"] and out.lengths_N.tolist() == [9, 9]
    assert model.blocks_seen == {0, 1, 2} and out.nfe == model.calls == 6  # 12 steps over 6 blocks: 2 per block
    assert bool((out.ids_NL[:, 9:] == PAD).all())


@pytest.mark.parametrize("cached", [True, False])
def test_past_the_context_each_row_is_the_unstopped_row_cut_after_its_first_generated_eos(cached: bool) -> None:
    """A direct computation of the rule on a real network (context 12, rows of 32: the window slides): the row
    with the rule = the row without it, for the same random stream, up to and including its first generated EOS."""
    proc, model = make(), sharp_tiny_model(K + 1, 12)
    kw = dict(prompt_ids=[0, EOS], steps=8, use_cache=cached)  # an EOS in the prompt never stops a row
    out = proc.sample(model, 8, 32, stop_at_eos=True, generator=gen(5), **kw)
    ref = proc.sample(model, 8, 32, stop_at_eos=False, generator=gen(5), **kw)
    reasons = []
    for i in range(8):
        hits = (ref.ids_NL[i, 2:] == EOS).nonzero()
        end = 2 + int(hits[0]) + 1 if len(hits) else 32
        reasons.append("eos" if len(hits) else "length")
        assert int(out.lengths_N[i]) == end
        assert torch.equal(out.ids_NL[i, :end], ref.ids_NL[i, :end]) and bool((out.ids_NL[i, end:] == PAD).all())
    assert out.stop_N == reasons and set(reasons) == {"eos", "length"}  # both cases occur
    assert set(out.stop_N) <= set(STOP_REASONS)


# ----------------------------------------------------------------------------------------------------- entropy


def sharp_in(block: int) -> Callable[[int, int], Tensor]:
    """Uniform over the K tokens (entropy ln K) except block ``block``: all mass on token 5 (entropy 0)."""

    def rule(b: int, n: int) -> Tensor:
        logits = torch.zeros(n, K + 1)
        if b == block:
            logits[:, 5] = 1e4
        return logits

    return rule


def test_the_entropy_rule_stops_at_the_block_whose_mean_entropy_falls_below_the_threshold() -> None:
    proc = make()
    kw = dict(prompt_ids=[0], steps=6, use_cache=False)
    out = proc.sample(Stub(sharp_in(2)), 2, 24, stop_entropy=1.0, generator=gen(1), **kw)
    assert out.stop_N == ["entropy"] * 2 and out.lengths_N.tolist() == [12, 12]  # block 2 kept, then cut
    assert out.ids_NL[:, 8:12].eq(5).all() and out.ids_NL[:, 12:].eq(PAD).all()
    # the uniform blocks have entropy ln K exactly: a threshold just above it stops after block 0, just below not
    ln_k = math.log(K)
    out = proc.sample(Stub(sharp_in(-1)), 2, 24, stop_entropy=ln_k + 1e-9, generator=gen(1), **kw)
    assert out.stop_N == ["entropy"] * 2 and out.lengths_N.tolist() == [4, 4]
    out = proc.sample(Stub(sharp_in(-1)), 2, 24, stop_entropy=ln_k - 1e-9, generator=gen(1), **kw)
    assert out.stop_N == ["length"] * 2 and out.lengths_N.tolist() == [24, 24]


def test_a_block_records_the_entropy_of_the_call_each_token_was_drawn_from() -> None:
    """Direct computation: every call returns fresh random logits; H_l must be the entropy (MASK excluded, float64)
    of the logits of the call at which position l was revealed (ddpm: call i = step i of the trajectory)."""
    proc = make()
    g = torch.Generator().manual_seed(0)
    outputs: list[Tensor] = []

    def rule(b: int, n: int) -> Tensor:
        outputs.append(torch.randn(n, K + 1, generator=g) * (1 + len(outputs)))
        return outputs[-1]

    den = BlockDenoiser(proc, Stub(rule), 3, 8, cached=False, track_entropy=True)
    den.start_block(3)
    z = torch.full((3, LB), MASK)
    fixed = torch.zeros(3, LB, dtype=torch.bool)
    res = ddpm(den, z, proc.schedule, 4, gen(2), fixed, mask_id=MASK, return_trajectory=True)
    assert len(outputs) == res.nfe >= 2
    for row in range(3):
        for col in range(LB):
            logits = outputs[int(res.trajectory_BL[row, col])][row].double()
            logits[MASK] = float("-inf")
            logp = torch.log_softmax(logits, -1)[:MASK]
            h = float(-(logp.exp() * logp).sum())
            assert float(den.entropy_NB[row, col]) == pytest.approx(h, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("inner", [ddpm, ddpm_cache, first_hitting], ids=["ddpm", "ddpm_cache", "first_hitting"])
def test_every_inner_sampler_records_the_entropy_of_the_call_a_token_came_from(inner) -> None:
    """Call c (0-based) puts uniform mass on its own set of c + 1 tokens (entropy ln(c + 1)), disjoint from the
    other calls' sets, so the token at a position names the call it was drawn from: H_l = ln |set of x^l|."""
    V = 16
    proc = get_process(ProcessConfig(name="bd3lm", block_size=LB), SpecialIds(0, 1, 2, V, V))
    calls = [0]
    first = [3 + c * (c + 1) // 2 for c in range(5)]  # call c: tokens first[c] .. first[c] + c

    def rule(b: int, n: int) -> Tensor:
        c = calls[0]
        calls[0] += 1
        logits = torch.full((n, V + 1), -1e4)
        logits[:, first[c] : first[c] + c + 1] = 0.0
        return logits

    den = BlockDenoiser(proc, Stub(rule), 3, 8, cached=False, track_entropy=True)
    den.start_block(3)
    res = inner(den, torch.full((3, LB), V), proc.schedule, 4, gen(6), torch.zeros(3, LB, dtype=torch.bool), mask_id=V)
    assert calls[0] >= 2
    size = {first[c] + j: c + 1 for c in range(5) for j in range(c + 1)}
    ref = torch.tensor([[math.log(size[int(t)]) for t in row] for row in res.ids_BL], dtype=torch.float64)
    assert torch.allclose(den.entropy_NB, ref, rtol=0, atol=1e-12)
    assert len(set(ref.flatten().tolist())) >= 2  # tokens from different calls


# ------------------------------------------------------------------------------------- past the model context


def test_process_sample_draws_rows_longer_than_the_context_only_for_a_family_that_can() -> None:
    proc, model = make(), sharp_tiny_model(K + 1, 12)
    runs = [proc.sample(model, 2, 32, prompt_ids=[0, 5], steps=8, use_cache=c, generator=gen(4)) for c in (1, 0)]
    out = runs[0]
    assert out.ids_NL.shape == (2, 32) and out.lengths_N.tolist() == [32, 32] and out.stop_N == ["length"] * 2
    assert out.ids_NL[:, :2].tolist() == [[0, 5]] * 2 and bool(((out.ids_NL >= 0) & (out.ids_NL < K)).all())
    assert torch.equal(out.ids_NL, runs[1].ids_NL) and out.nfe == runs[1].nfe == 8
    _one_line(lambda: proc.sample(model, 1, 30), r"L' = 4\) must divide the sample length \(30\)")
    refusing = [name for name in available_processes() if not _REGISTRY[name].beyond_context]
    assert "bd3lm" not in refusing and {"ar", "mdlm", "d3pm", "sedd"} <= set(refusing)
    for name in refusing:
        other = get_process(ProcessConfig(name=name, T=8), SPECIALS)
        net = build_model(ModelConfig(vocab_size=other.vocab_size, context=8, n_layer=1, d_model=16, n_head=2))
        opts = {"steps": 4} if other.sampler_specs()[other.default_sampler].takes_steps else {}
        for length in (9, 16):
            call = lambda p=other, m=net, n=length, o=opts: p.sample(m, 1, n, **o)  # noqa: E731
            _one_line(call, "exceeds the model context of 8 tokens")


# ------------------------------------------------------------------------------------------------- bad input


def _one_line(fn, match: str) -> None:
    with pytest.raises(DlmError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


def test_bad_stop_options_are_refused_in_one_line_and_infill_rows_stay_full_length() -> None:
    proc, model = make(), sharp_tiny_model(K + 1, 12)
    for bad in (0.0, -1.0, float("nan"), float("inf"), "low", True):
        _one_line(lambda b=bad: proc.sample(model, 1, 12, steps=3, stop_entropy=b), "stop_entropy")
    _one_line(lambda: proc.sample(model, 1, 12, steps=3, stop_at_eos="yes"), "stop_at_eos")
    fixed = torch.full((12,), -1)
    fixed[9] = 4
    for rule in ({"stop_at_eos": True}, {"stop_entropy": 0.5}):
        _one_line(lambda r=rule: proc.sample(model, 1, 12, fixed_ids=fixed, steps=3, **r), "infilling")
    out = proc.sample(model, 3, 12, prompt_ids=[0], fixed_ids=fixed, steps=3, generator=gen(0))
    assert out.lengths_N.tolist() == [12] * 3 and out.stop_N == ["length"] * 3 and bool((out.ids_NL[:, 9] == 4).all())
    mdlm = get_process(ProcessConfig(name="mdlm"), SPECIALS)
    _one_line(lambda: mdlm.sample(model, 1, 12, steps=3, stop_entropy=0.5), "unknown option")
    assert mdlm.sample(model, 1, 12, steps=3).stop_N is None  # families without stop rules record nothing


# ------------------------------------------------------------------------------------------------------- CLI


def test_dlm_sample_draws_past_the_context_and_records_what_stopped_each_row(tiny_data, tmp_path, capsys) -> None:
    from dlm.cli import main
    from dlm.eval.run import sample_run

    run = tmp_path / "bd3lm"
    argv = [
        "train", "--data.dir", str(tiny_data), "--run-dir", str(run), "--process.name", "bd3lm",
        "--process.block_size", "4", "--model.n_layer", "1", "--model.d_model", "32", "--model.n_head", "2",
        "--model.context", "32", "--train.batch_size", "4", "--train.max_steps", "2", "--train.warmup_steps", "1",
        "--train.device", "cpu", "--train.val_every", "0", "--train.ckpt_every", "2",
    ]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["sample", str(run), "--n", "2", "--length", "64", "--steps", "16"]) == 0  # context 32
    (path,) = (run / "samples").glob("*.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [len(r["ids"]) for r in records] == [64, 64] and [r["stop"] for r in records] == ["length"] * 2
    assert all(r["length"] == 64 and 60 <= r["generated_tokens"] < 64 for r in records)
    records, _ = sample_run(run, n=2, length=64, steps=16, stop_entropy=100.0)  # above ln V: the first block stops
    assert [r["stop"] for r in records] == ["entropy"] * 2 and [len(r["ids"]) for r in records] == [4, 4]
    assert main(["sample", str(run), "--n", "2", "--length", "64", "--steps", "16", "--stop-entropy", "100"]) == 0
    newest = max((run / "samples").glob("*.jsonl"), key=lambda p: p.stat().st_mtime_ns)
    assert [json.loads(line)["stop"] for line in newest.read_text().splitlines()] == ["entropy"] * 2
    assert main(["sample", str(run), "--n", "1", "--stop-entropy", "0"]) == 2  # a threshold must be > 0
    assert main(["sample", str(run), "--n", "1", "--stop-at-eos"]) == 0  # bd3lm accepts the EOS rule
    capsys.readouterr()
    assert main(["sample", str(run), "--n", "1", "--length", "66"]) == 2  # 4 does not divide 66
    assert "must divide the sample length (66)" in capsys.readouterr().err
