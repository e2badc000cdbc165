"""BD3-LM (block diffusion): the 2L training mask against a hand-built reference, the one-pass loss against a
naive two-pass computation, the identities L' = 1 (AR of the same weights) and L' = L (MDLM), the block samplers
(fixed positions, honest nfe, cached = uncached, L' = L = MDLM's sampler), bad input, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor, nn

import dlm.process  # noqa: F401  (registers every family)
from dlm.data.batch import Batch
from dlm.data.specials import SpecialIds
from dlm.errors import DlmError
from dlm.model.masks import block_causal, block_diffusion_train, dense_mask
from dlm.process import ProcessConfig, get_process
from dlm.process.absorbing import ddpm, first_hitting
from dlm.process.base import SamplerOptions, SampleStart, scored_positions, token_logprobs
from dlm.process.bd3lm import BD3LMProcess
from dlm.process.bd3lm_sampling import BlockDenoiser, sample_blocks
from tests.helpers import sharp_tiny_model

K = 9  # tokenizer vocabulary; MASK is the appended id K
MASK = K
SPECIALS = SpecialIds(bos=0, eos=1, pad=2, mask=MASK, vocab_size=K)
L = 12


def make(**kw) -> BD3LMProcess:
    proc = get_process(ProcessConfig(name="bd3lm", **kw), SPECIALS)
    assert isinstance(proc, BD3LMProcess)
    return proc


def batch(B: int = 3, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, K, (B, L), generator=g)
    ids[:, 0] = SPECIALS.bos
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 9:] = False  # a padded row (padding inside the last block)
    ids[1, 9:] = SPECIALS.pad
    return Batch(ids, mask)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ the 2L mask


@pytest.mark.parametrize(("seq_len", "block"), [(8, 1), (8, 2), (8, 4), (8, 8), (12, 3), (12, 6)])
def test_the_training_mask_equals_a_block_matrix_built_by_hand(seq_len: int, block: int) -> None:
    """[[M_BD, M_OBC], [0, M_BC]] from Kronecker products of B x B block patterns with ones(L', L')."""
    n = seq_len // block
    ones = torch.ones(block, block, dtype=torch.bool)
    eye, lower = torch.eye(n, dtype=torch.bool), torch.ones(n, n).tril().bool()
    m_bd = torch.kron(eye.int(), ones.int()).bool()  # own noisy block
    m_obc = torch.kron((lower & ~eye).int(), ones.int()).bool()  # clean blocks strictly before
    m_bc = torch.kron(lower.int(), ones.int()).bool()  # clean blocks up to its own
    ref = torch.cat([torch.cat([m_bd, m_obc], 1), torch.cat([torch.zeros_like(m_bc), m_bc], 1)], 0)
    got = dense_mask(block_diffusion_train(seq_len, block), 2 * seq_len, 2 * seq_len)
    assert torch.equal(got, ref)
    # the sampling mask is the clean quadrant: block-causal
    assert torch.equal(dense_mask(block_causal(block), seq_len, seq_len), m_bc)


# ------------------------------------------------------------------------------------------- one pass = two


@torch.no_grad()
def two_pass_logits(model: nn.Module, z_BL: Tensor, x_BL: Tensor, block: int) -> Tensor:
    """Naive reference: per block, the noisy pass (z^b against the cached clean blocks < b, not stored), then
    the clean pass of x^b committing its keys/values (block-causal, positions continue from the cache)."""
    B, n = x_BL.shape[0], x_BL.shape[1] // block
    cache = model.init_cache(B, x_BL.shape[1])
    out = []
    for b in range(n):
        cols = slice(b * block, (b + 1) * block)
        out.append(model(z_BL[:, cols], attn=block_causal(block), cache=cache, commit=False))
        model(x_BL[:, cols], attn=block_causal(block), cache=cache, commit=True)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("block", [1, 3, 4, 12])
def test_the_one_pass_loss_equals_a_naive_two_pass_computation(block: int) -> None:
    proc, model, bt = make(block_size=block), sharp_tiny_model(K + 1, L), batch()
    t_BN, z_BL = proc.draw(bt, gen(5), clipped=True)
    one = proc.noisy_logits(model, z_BL, bt.ids_BL).detach()
    two = two_pass_logits(model, z_BL, bt.ids_BL, block)
    real = bt.mask_BL.bool()  # padding logits are never read
    assert torch.allclose(one[real], two[real], atol=1e-5)
    # the loss from the naive logits, by its equation, with the same t and z
    scored = (z_BL == MASK) & scored_positions(bt)
    sel = two[scored].double()
    sel[:, MASK] = float("-inf")
    w = (1.0 / t_BN).repeat_interleave(block, dim=1)[scored]  # loglinear: w(t) = 1/t
    ref = float((w * -token_logprobs(sel, bt.ids_BL[scored])).sum() / scored_positions(bt).sum())
    loss, stats = proc.loss(model, bt, gen(5))
    assert float(loss.detach()) == pytest.approx(ref, rel=1e-5) and stats["tokens"] == float(scored_positions(bt).sum())


def test_the_one_pass_forward_runs_the_head_on_the_noisy_half_only() -> None:
    """noisy_logits asks the backbone for the first L rows (head_rows = L): the output head sees [B, L, d], never
    the clean half, and the logits equal the first L rows of the full-head forward over z ⊕ x."""
    proc, model, bt = make(block_size=4), sharp_tiny_model(K + 1, L), batch()
    _, z_BL = proc.draw(bt, gen(5), clipped=True)
    rows: list[tuple[int, ...]] = []
    hook = model.head.register_forward_hook(lambda mod, inp, out: rows.append(tuple(inp[0].shape)))
    with torch.no_grad():
        got = proc.noisy_logits(model, z_BL, bt.ids_BL)
    hook.remove()
    assert rows == [(3, L, 32)] and got.shape == (3, L, K + 1)
    pos_2L = torch.arange(L).repeat(2)
    with torch.no_grad():
        full = model(torch.cat([z_BL, bt.ids_BL], 1), attn=block_diffusion_train(L, 4), pos=pos_2L)
    assert full.shape[1] == 2 * L and torch.allclose(got, full[:, :L], atol=1e-6)


# ------------------------------------------------------------------------------------------------ identities


def test_one_token_blocks_at_the_all_mask_level_give_the_AR_nll_of_the_same_weights() -> None:
    """L' = 1, linear schedule: a 1-token block's bound is int_0^1 (1/t) t CE dt = CE, and the masked-count
    estimate is exactly that for every draw (one mask, weight s_1 - s_0 = 1), so ``nll`` equals
    sum_l -log p_theta(x^l | m at l, x^{<l}) with no Monte-Carlo noise, for any generator.

    "The same network" as an AR model: p_AR(x^l | x^{<l}) = softmax of f_theta([x^0 .. x^{l-1}, m]) under causal
    attention (block-causal with L' = 1), read at the last position (the MASK token sitting at position l, rotary
    position l), with the MASK logit removed (SUBS). This computes it directly, one causal forward per position,
    and sums in float64.
    """
    proc, model, bt = make(block_size=1, schedule="linear"), sharp_tiny_model(K + 1, L), batch()
    x = bt.ids_BL
    got = proc.nll(model, bt, gen(0)).nats_B
    assert torch.equal(got, proc.nll(model, bt, gen(1)).nats_B)
    ref = torch.zeros(x.shape[0], dtype=torch.float64)
    scored = scored_positions(bt)
    for b in range(x.shape[0]):
        for pos in range(1, L):
            if scored[b, pos]:
                inp = torch.cat([x[b, :pos], torch.tensor([MASK])])[None]
                with torch.no_grad():
                    logits = model(inp, attn="causal")[0, -1].double()
                logits[MASK] = float("-inf")
                ref[b] -= token_logprobs(logits[None], x[b, pos : pos + 1])[0]
    assert float((got - ref).abs().max()) < 1e-5


def test_a_single_block_is_mdlm_for_the_same_weights_and_time_samples() -> None:
    mdlm = get_process(ProcessConfig(name="mdlm", eval_t_samples=3), SPECIALS)
    proc, model, bt = make(block_size=L, eval_t_samples=3), sharp_tiny_model(K + 1, L), batch()
    ours, theirs = proc.nll(model, bt, gen(3)), mdlm.nll(model, bt, gen(3))
    assert ours.exact is False and torch.equal(ours.tokens_B, theirs.tokens_B)
    assert float((ours.nats_B - theirs.nats_B).abs().max()) < 1e-5
    with torch.no_grad():
        assert float(proc.loss(model, bt, gen(4))[0]) == pytest.approx(float(mdlm.loss(model, bt, gen(4))[0]), rel=1e-5)


def test_the_bound_is_unclipped_and_the_clipped_training_times_stay_in_the_window() -> None:
    proc = make(block_size=4, clip_beta=0.3, clip_omega=0.8, schedule="cosine")
    t = proc.block_times(4000, gen(0), torch.device("cpu"), clipped=True)
    rate = 1.0 - proc.schedule.alpha(t)
    assert float(rate.min()) >= 0.3 - 1e-9 and float(rate.max()) <= 0.8 + 1e-9
    assert abs(float(rate.mean()) - 0.55) < 0.01  # uniform mask rate on [0.3, 0.8]
    full = proc.block_times(4000, gen(0), torch.device("cpu"))
    assert float(full.min()) < 0.01 and float(full.max()) > 0.99


# ------------------------------------------------------------------------------------------------- sampling


class Counting(nn.Module):
    """Wraps a model and counts its forward calls."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0
        self.cfg = model.cfg

    def init_cache(self, *a, **kw):
        return self.model.init_cache(*a, **kw)

    def forward(self, *a, **kw) -> Tensor:
        self.calls += 1
        return self.model(*a, **kw)


@pytest.mark.parametrize("sampler", ["ddpm", "ddpm_cache", "first_hitting"])
def test_block_sampling_keeps_fixed_positions_counts_nfe_and_cached_equals_uncached(sampler: str) -> None:
    proc = make(block_size=4)
    fixed = torch.full((L,), -1, dtype=torch.int64)
    fixed[5], fixed[10] = 7, 4
    runs = {}
    for cached in (True, False):
        model = Counting(sharp_tiny_model(K + 1, L))
        out = proc.sample(
            model, 3, L, sampler=sampler, prompt_ids=[0, 5], fixed_ids=fixed, steps=9, generator=gen(2),
            use_cache=cached, return_trajectory=True,
        )  # fmt: skip
        assert out.nfe == model.calls  # every forward counted (cached: the commit rides on the next call)
        runs[cached] = out
    out = runs[True]
    assert torch.equal(out.ids_NL, runs[False].ids_NL) and out.nfe == runs[False].nfe
    assert torch.equal(out.trajectory_NL, runs[False].trajectory_NL)
    assert out.ids_NL[:, :2].tolist() == [[0, 5]] * 3 and bool((out.ids_NL[:, 5] == 7).all())
    assert bool((out.ids_NL[:, 10] == 4).all()) and bool(((out.ids_NL >= 0) & (out.ids_NL < K)).all())
    if sampler != "first_hitting":
        assert out.nfe <= 9
    traj = out.trajectory_NL
    assert traj[:, [0, 1, 5, 10]].eq(-1).all()
    for b in range(1, 3):  # a block is finished before the next one starts
        prev, cur = traj[:, (b - 1) * 4 : b * 4], traj[:, b * 4 : (b + 1) * 4]
        assert int(cur[cur >= 0].min()) > int(prev[prev >= 0].max())


def test_a_single_block_samples_as_mdlm() -> None:
    mdlm = get_process(ProcessConfig(name="mdlm"), SPECIALS)
    proc, model = make(block_size=L), sharp_tiny_model(K + 1, L)
    for sampler in ("ddpm", "first_hitting"):
        a = proc.sample(model, 4, L, sampler=sampler, prompt_ids=[0], steps=6, generator=gen(1))
        b = mdlm.sample(model, 4, L, sampler=sampler, prompt_ids=[0], steps=6, generator=gen(1))
        assert torch.equal(a.ids_NL, b.ids_NL) and a.nfe == b.nfe


def test_ddpm_spreads_the_steps_over_the_blocks_to_generate() -> None:
    proc, model = make(block_size=4), Counting(sharp_tiny_model(K + 1, L))
    out = proc.sample(model, 2, L, sampler="ddpm", steps=3, use_cache=False, generator=gen(0))
    assert out.nfe == 3  # one step per block: each block resolved in one call
    fixed = torch.tensor([0, 3, 4, 5] + [-1] * 8)  # block 0 fully given: two blocks to generate
    out = proc.sample(model, 2, L, sampler="ddpm", fixed_ids=fixed, steps=2, generator=gen(0))
    assert out.nfe == 2 and out.ids_NL[:, :4].tolist() == [[0, 3, 4, 5]] * 2


def test_generation_past_the_context_slides_the_window_and_cached_equals_uncached() -> None:
    """Context 12, L' = 2, 24 tokens: the window keeps keep = 3 blocks and restarts positions at 0 (class doc)."""
    proc, model = make(block_size=2), Counting(sharp_tiny_model(K + 1, L))
    fixed = torch.full((2, 24), -1, dtype=torch.int64)
    fixed[:, 0] = 0
    start = SampleStart(fixed, 1)
    runs = {}
    for cached in (True, False):
        model.calls = 0
        opts = SamplerOptions(steps=24, temperature=1.0, use_cache=cached)
        runs[cached] = sample_blocks(proc, model, start, opts, gen(7), ddpm, uses_steps=True)
        assert runs[cached].nfe == model.calls
    assert torch.equal(runs[True].ids_NL, runs[False].ids_NL) and runs[True].nfe == runs[False].nfe
    assert bool(((runs[True].ids_NL >= 0) & (runs[True].ids_NL < K)).all()) and runs[True].ids_NL.shape == (2, 24)
    den = BlockDenoiser(proc, model, 1, 24, cached=True)
    assert (den.keep, den.context) == (3, 12)


def test_after_a_slide_a_block_is_drawn_as_if_the_kept_window_were_a_prompt() -> None:
    """Greedy (temperature 0) with one step per block is deterministic: block b = argmax f(window ⊕ MASKs). The
    first block after a slide (block 6: blocks 3..5 kept, at positions 0..5) must equal a fresh sample whose
    prompt is the kept window."""
    proc, model = make(block_size=2), sharp_tiny_model(K + 1, L)
    fixed = torch.full((2, 20), -1, dtype=torch.int64)
    fixed[:, 0] = 0
    out = sample_blocks(
        proc, model, SampleStart(fixed, 1), SamplerOptions(steps=10, temperature=0.0), gen(0), ddpm, True
    )
    window = out.ids_NL[:, 6:12]
    for row in range(2):
        fresh = proc.sample(model, 1, 8, prompt_ids=window[row].tolist(), steps=1, temperature=0.0, generator=gen(1))
        assert fresh.ids_NL[0, 6:].tolist() == out.ids_NL[row, 12:14].tolist()
    # and before the first slide the window is the whole row: block 5 continues blocks 0..4 in place
    fresh = proc.sample(
        model,
        2,
        12,
        prompt_ids=[0],
        fixed_ids=out.ids_NL[:, :12].clone().index_fill_(1, torch.arange(10, 12), -1),
        steps=1,
        temperature=0.0,
        generator=gen(1),
    )
    assert torch.equal(fresh.ids_NL, out.ids_NL[:, :12])


def test_first_hitting_runs_past_the_context_too() -> None:
    proc, model = make(block_size=4), sharp_tiny_model(K + 1, L)
    fixed = torch.full((1, 20), -1, dtype=torch.int64)
    fixed[:, :2] = torch.tensor([0, 5])
    a = sample_blocks(proc, model, SampleStart(fixed, 2), SamplerOptions(), gen(3), first_hitting, False)
    b = sample_blocks(proc, model, SampleStart(fixed, 2), SamplerOptions(use_cache=False), gen(3), first_hitting, False)
    assert torch.equal(a.ids_NL, b.ids_NL) and a.nfe == b.nfe == 18 and a.ids_NL[0, :2].tolist() == [0, 5]


def _one_line(fn, match: str) -> None:
    with pytest.raises(DlmError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


def test_bad_input_is_refused_in_one_line() -> None:
    from dlm.config import load_config

    for overrides, match in [
        (["--process.block_size", "0"], "block_size"),
        (["--process.clip_beta", "0.6", "--process.clip_omega", "0.5"], "clip"),
        (["--process.clip_omega", "1.5"], "clip"),
        (["--process.time_cond", "true"], "time conditioning"),
    ]:
        _one_line(lambda o=overrides: load_config(None, ["--process.name", "bd3lm", *o]), match)
    proc, model = make(block_size=5), sharp_tiny_model(K + 1, L)
    _one_line(lambda: proc.loss(model, batch()), r"L' = 5\).*length \(12\)")
    _one_line(lambda: proc.nll(model, batch()), r"L' = 5\).*length \(12\)")
    proc = make(block_size=4)
    _one_line(lambda: proc.sample(model, 1, 10), r"L' = 4\).*length \(10\)")
    _one_line(lambda: proc.sample(model, 1, L, steps=2), "number of blocks to generate")


def test_fields_it_reads_change_the_hash_and_other_families_ignore_them() -> None:
    from dlm.config import config_hash, load_config

    base = load_config(None, ["--process.name", "bd3lm"])
    for change in (["--process.block_size", "8"], ["--process.clip_beta", "0.3"], ["--process.clip_omega", "0.8"]):
        assert config_hash(base) != config_hash(load_config(None, ["--process.name", "bd3lm", *change]))
        for other in ("ar", "mdlm"):
            plain = load_config(None, ["--process.name", other])
            assert config_hash(plain) == config_hash(load_config(None, ["--process.name", other, *change]))


# ------------------------------------------------------------------------------------------------------ CLI


def test_train_eval_and_sample_from_the_cli(tiny_data, tmp_path, capsys) -> None:
    from dlm.cli import main

    run = tmp_path / "bd3lm"
    tiny = [
        "--model.n_layer", "1", "--model.d_model", "32", "--model.n_head", "2", "--model.context", "32",
        "--train.batch_size", "4", "--train.max_steps", "3", "--train.warmup_steps", "1", "--train.device", "cpu",
        "--train.val_every", "3", "--train.val_batches", "1", "--train.ckpt_every", "3",
    ]  # fmt: skip
    argv = ["train", "--data.dir", str(tiny_data), "--run-dir", str(run), "--process.name", "bd3lm"]
    bad = ["train", "--data.dir", str(tiny_data), "--run-dir", str(tmp_path / "bad"), "--process.name", "bd3lm"]
    assert main([*bad, "--process.block_size", "5", *tiny]) == 2  # 5 does not divide the rows of 32
    assert "(L' = 5) must divide the sequence length (32)" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before the run directory is written
    assert main([*argv, "--process.block_size", "4", *tiny]) == 0
    assert json.loads((run / "config.json").read_text())["process"]["block_size"] == 4
    capsys.readouterr()
    assert main(["eval", str(run), "--split", "validation"]) == 0
    assert "NLL ≤" in capsys.readouterr().out
    for sampler in ("ddpm", "ddpm_cache", "first_hitting"):
        assert main(["sample", str(run), "--n", "1", "--sampler", sampler, "--steps", "8"]) == 0
    assert len(list((run / "samples").glob("*.jsonl"))) == 3
    assert main(["sample", str(run), "--n", "1", "--length", "30"]) == 2  # 4 does not divide 30
