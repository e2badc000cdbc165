"""The captured denoiser (dlm.model.graphs, absorbing.capture_denoiser): the samplers draw identical samples through
the wrapper's CPU path (static input and output buffers, eager forward) and without it, for ddpm, ddpm_cache and
first_hitting and through MDLM and SEDD; the wrapper's output is one buffer that the next call overwrites; when the
samplers wrap by default; refusals; on CUDA the captured samples equal the eager ones. And ``train.compile_loss``
(the loss compiled with the forward): the trainer's plumbing on CPU, the compiled step's values on CUDA (compiling
takes minutes on 2 CPU cores), and the static-shape row selection of ``losses.rows_weighted_loss`` that a compiled
region uses."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from torch import Tensor

import dlm.process.mdlm  # registers "mdlm"
import dlm.process.sedd  # noqa: F401  (registers "sedd")
from dlm.config import RunConfig, config_hash
from dlm.data.batch import Batch
from dlm.data.specials import SpecialIds
from dlm.errors import DlmError
from dlm.model import ModelConfig, build_model
from dlm.model.graphs import DenoiserGraph, capturable, is_capturable
from dlm.process import ProcessConfig, absorbing, get_process, losses
from dlm.process.absorbing import capture_denoiser, ddpm, ddpm_cache, first_hitting
from dlm.process.schedules import get_schedule
from dlm.process.unmasking import confidence, entropy_bounded, remdm, threshold
from dlm.train.setup import training_loss
from tests.helpers import smoke_train

K = 5  # tokens 0..K-1, MASK = K
MASK = K
# table_denoiser is so peaked at the all-MASK start that threshold at tau = 0.9 would take only 2 calls
THRESHOLD = partial(threshold, unmask_threshold=0.99)
SAMPLERS = [ddpm, ddpm_cache, first_hitting, remdm, confidence, entropy_bounded, THRESHOLD]
IDS = ["ddpm", "ddpm_cache", "first_hitting", "remdm", "confidence", "entropy_bounded", "threshold"]


def table_denoiser(seed: int = 0):
    """Time- and state-dependent logits (onehot(z) W + its neighbour's row + 3 t W_0); records the z buffer it saw."""
    W = torch.randn(K + 1, K + 1, generator=torch.Generator().manual_seed(seed))
    seen: list[int] = []

    def denoise(z_BL: Tensor, t_B: Tensor) -> Tensor:
        seen.append(z_BL.data_ptr())
        e = torch.nn.functional.one_hot(z_BL, K + 1).float()
        return e @ W + e.roll(1, 1) @ W.T + 3 * t_B[:, None, None].float() * W[0]

    return denoise, seen


@pytest.mark.parametrize("sampler", SAMPLERS, ids=IDS)
def test_samplers_draw_the_same_samples_through_the_wrapper(sampler) -> None:
    z0 = torch.full((3, 12), MASK)
    z0[:, 5] = 2
    kw = dict(mask_id=MASK, temperature=0.8, top_p=0.9, return_trajectory=True)
    outs, buffers = {}, {}
    for capture in (False, True):
        denoise, seen = table_denoiser()
        g = torch.Generator().manual_seed(3)
        outs[capture] = sampler(denoise, z0, get_schedule("cosine"), 8, g, z0 != MASK, capture=capture, **kw)
        buffers[capture] = set(seen)
    off, on = outs[False], outs[True]
    assert torch.equal(on.ids_BL, off.ids_BL) and torch.equal(on.trajectory_BL, off.trajectory_BL)
    assert on.nfe == off.nfe >= 3
    assert len(buffers[True]) == 1 < len(buffers[False])  # the wrapper fed one static z buffer every call
    other = sampler(table_denoiser()[0], z0, get_schedule("cosine"), 8, torch.Generator().manual_seed(4),
                    z0 != MASK, capture=True, **kw)  # fmt: skip
    assert not torch.equal(other.ids_BL, on.ids_BL)  # the ids depend on the stream: the equality above can fail


def _tiny_model(time_cond: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = dict(time_cond=True, cond_dim=16) if time_cond else {}
    cfg = ModelConfig(vocab_size=K + 1, context=16, n_layer=1, n_head=2, d_model=32, **extra)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random weights (adaLN's zero init too): the draws depend on z and t
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if p.ndim == 1 else noise * 0.15)
    return model.eval()


@pytest.mark.parametrize(
    "family, sampler, time_cond",
    [
        ("mdlm", "ddpm", True),
        ("mdlm", "ddpm_cache", False),
        ("mdlm", "first_hitting", True),
        ("sedd", "euler", True),
        ("sedd", "analytic", True),
    ],
)
def test_processes_sample_the_same_through_the_wrapper(family, sampler, time_cond, monkeypatch) -> None:
    """The process-wide switch ``absorbing.CAPTURE_DENOISER`` routes every family's sampler through the wrapper."""
    specials = SpecialIds(bos=0, eos=1, pad=1, mask=MASK, vocab_size=K)
    proc = get_process(ProcessConfig(name=family, time_cond=time_cond), specials)
    model = _tiny_model(time_cond)
    calls = {"n": 0}
    original = DenoiserGraph.__call__

    def counted(self, z_BL, t_B):
        calls["n"] += 1
        return original(self, z_BL, t_B)

    monkeypatch.setattr(DenoiserGraph, "__call__", counted)
    outs = {}
    for mode in (False, True):
        monkeypatch.setattr(absorbing, "CAPTURE_DENOISER", mode)
        calls["n"] = 0
        g = torch.Generator().manual_seed(1)
        outs[mode] = proc.sample(model, 3, 12, sampler=sampler, steps=6, prompt_ids=[0, 4], generator=g,
                                 temperature=0.9)  # fmt: skip
        assert calls["n"] == (outs[mode].nfe if mode else 0)
    assert torch.equal(outs[True].ids_NL, outs[False].ids_NL) and outs[True].nfe == outs[False].nfe >= 2


def test_wrapper_output_is_one_buffer_overwritten_by_the_next_call() -> None:
    denoise, _ = table_denoiser()
    z1, z2 = torch.full((2, 4), MASK), torch.zeros(2, 4, dtype=torch.long)
    t = torch.full((2,), 0.5, dtype=torch.float64)
    graph = DenoiserGraph(denoise, z1, t)
    assert not graph.captured  # CPU: eager on the static buffers
    a = graph(z1, t)
    a_copy = a.clone()
    b = graph(z2, t)
    assert a.data_ptr() == b.data_ptr() and torch.equal(a, denoise(z2, t))  # the first output is gone
    assert not torch.equal(a_copy, b) and torch.equal(a_copy, denoise(z1, t))


def test_when_the_samplers_wrap(monkeypatch) -> None:
    denoise, _ = table_denoiser()
    z, t = torch.full((2, 4), MASK), torch.ones(2, dtype=torch.float64)
    assert not is_capturable(denoise) and capturable(denoise) is denoise and is_capturable(denoise)
    assert capture_denoiser(denoise, z, t, 10, None) is denoise  # CPU: nothing to gain by default
    assert isinstance(capture_denoiser(denoise, z, t, 10, True), DenoiserGraph)
    assert capture_denoiser(denoise, z, t, 0, True) is denoise  # no call, nothing to wrap
    monkeypatch.setattr(absorbing, "CAPTURE_DENOISER", True)
    assert isinstance(capture_denoiser(denoise, z, t, 10, None), DenoiserGraph)
    assert capture_denoiser(denoise, z, t, 10, False) is denoise  # an explicit argument wins


def test_wrapper_refusals() -> None:
    denoise, _ = table_denoiser()
    z, t = torch.full((2, 4), MASK), torch.ones(2, dtype=torch.float64)
    with pytest.raises(DlmError, match="CUDA"):
        DenoiserGraph(denoise, z, t, capture=True)
    graph = DenoiserGraph(denoise, z, t)
    with pytest.raises(DlmError, match="fixed inputs"):
        graph(torch.full((2, 5), MASK), t)
    with pytest.raises(DlmError, match="fixed inputs"):
        graph(z, t.float())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sampler", SAMPLERS, ids=IDS)
def test_captured_samples_equal_eager_on_cuda(sampler) -> None:
    """A tiny dlm Transformer as a capturable MDLM denoiser on CUDA: the replayed graph draws the eager ids."""
    model = _tiny_model(time_cond=sampler is not ddpm_cache).cuda()
    specials = SpecialIds(bos=0, eos=1, pad=1, mask=MASK, vocab_size=K)
    proc = get_process(ProcessConfig(name="mdlm", time_cond=sampler is not ddpm_cache), specials)
    z0 = torch.full((4, 16), MASK, device="cuda")
    z0[:, 0] = 0
    outs = {}
    for capture in (False, True):
        g = torch.Generator("cuda").manual_seed(0)
        denoise = capturable(proc.denoiser(model))
        with torch.no_grad():
            outs[capture] = sampler(denoise, z0, proc.schedule, 12, g, z0 != MASK, mask_id=MASK,
                                    temperature=0.9, capture=capture)  # fmt: skip
    assert torch.equal(outs[True].ids_BL, outs[False].ids_BL) and outs[True].nfe == outs[False].nfe
    denoise = capturable(proc.denoiser(model))
    t = torch.ones(4, dtype=torch.float64, device="cuda")
    graph = capture_denoiser(denoise, z0, t, 5, None)
    assert isinstance(graph, DenoiserGraph)  # a capturable denoiser on CUDA is wrapped by default
    with torch.no_grad():
        first, second = graph(z0, t).clone(), graph(z0, t)
        assert graph.captured
        torch.testing.assert_close(second, first, rtol=0, atol=1e-5)
        torch.testing.assert_close(second, denoise(z0, t), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------- the loss in the compiled region


def test_compile_loss_reaches_the_training_step_and_leaves_the_run_hash(tmp_path: Path, monkeypatch) -> None:
    """``--train.compile_loss`` hands ``torch.compile`` the family's loss (not the model) and every micro-batch
    goes through what it returns (torch.compile replaced by a counting pass-through: compiling takes minutes
    here); the key is operational, so the run's hash is that of the same run without it."""
    compiled, calls = [], {"n": 0}

    def fake_compile(fn, *args, **kwargs):
        compiled.append(fn)

        def run(*a, **kw):
            calls["n"] += 1
            return fn(*a, **kw)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    smoke_train(tmp_path, ["--process.name=mdlm", "--train.compile_loss=true"], steps=3, val_every=3)
    assert len(compiled) == 1 and compiled[0].__name__ == "loss" and calls["n"] == 3
    a, b = RunConfig(), RunConfig()
    b.train.compile_loss = True
    assert config_hash(a) == config_hash(b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["ar", "mdlm"])
def test_compiled_loss_equals_the_eager_loss_on_cuda(family) -> None:
    """One step's loss and gradients through ``training_loss(process, True)`` equal the eager loss's (fp32)."""
    specials = SpecialIds(bos=0, eos=1, pad=1, mask=MASK, vocab_size=K)
    proc = get_process(ProcessConfig(name=family), specials)
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=proc.vocab_size, context=32, n_layer=2, n_head=2, d_model=64)).cuda()
    ids = torch.randint(2, K, (8, 32), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    batch = Batch(ids, torch.ones_like(ids, dtype=torch.bool))
    results = []
    for compile_loss in (False, True):
        model.zero_grad(set_to_none=True)
        loss, _ = training_loss(proc, compile_loss)(model, batch, generator=torch.Generator("cuda").manual_seed(1))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (a, grads_a), (b, grads_b) = results
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False], ids=["fused_head", "full_logits"])
def test_static_row_selection_equals_the_gathered_loss_and_gradients(fused, monkeypatch) -> None:
    """Every row through the head with weight 0 off the selection (static shapes) = the gathered rows: the loss
    and every gradient, with an excluded column that unselected rows hold as their target (else 0 * inf)."""
    model = _tiny_model(time_cond=False)
    g = torch.Generator().manual_seed(5)
    z = torch.randint(0, K + 1, (4, 12), generator=g)
    targets = torch.randint(0, K, (4, 12), generator=g)
    rows = torch.rand(4, 12, generator=g) < 0.5
    targets[~rows & (torch.rand(4, 12, generator=g) < 0.5)] = MASK  # outside the rows: the excluded column
    u = torch.rand(4, 12, generator=g)

    def run(hidden: bool) -> Tensor:
        return model(z, attn="bidirectional", return_hidden=hidden)

    owner = model if fused else (lambda *a, **kw: model(*a, **kw))  # a plain callable has no fused head
    assert (losses.fused_head(owner) is not None) == fused
    results = []
    for static in (False, True):
        model.zero_grad(set_to_none=True)
        loss = losses.rows_weighted_loss(owner, run, targets, u, rows, exclude=MASK, static=static)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (a, grads_a), (b, grads_b) = results
    assert torch.isfinite(b) and float(a) > 0
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-7)
    other = losses.rows_weighted_loss(owner, run, targets, u, ~rows & (targets != MASK), exclude=MASK, static=True)
    assert not torch.allclose(other, a)  # another selection, another loss: the equality above can fail


def test_static_rows_by_default_inside_a_compiled_region_only(monkeypatch) -> None:
    """``STATIC_ROWS = None``: the gather (one nonzero) in eager code, the static form while dynamo traces."""
    model = _tiny_model(time_cond=False)
    z = torch.full((2, 6), MASK)
    rows, u = torch.rand(2, 6) < 0.5, torch.ones(2, 6)
    seen = {"nonzero": 0}
    original = torch.Tensor.nonzero

    def counted(self, *a, **kw):
        seen["nonzero"] += 1
        return original(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "nonzero", counted)

    def run(hidden: bool) -> Tensor:
        return model(z, attn="bidirectional", return_hidden=hidden)

    with torch.no_grad():
        eager = losses.rows_weighted_loss(model, run, z.clamp(max=K - 1), u, rows, exclude=MASK)
        assert seen["nonzero"] == 1
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        traced = losses.rows_weighted_loss(model, run, z.clamp(max=K - 1), u, rows, exclude=MASK)
        assert seen["nonzero"] == 1
        monkeypatch.setattr(losses, "STATIC_ROWS", False)  # the switch wins over the compiled-region default
        losses.rows_weighted_loss(model, run, z.clamp(max=K - 1), u, rows, exclude=MASK)
        assert seen["nonzero"] == 2
    torch.testing.assert_close(traced, eager, rtol=1e-6, atol=1e-6)
