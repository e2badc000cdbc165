"""The loss path (issue 14): the head on selected rows only, chunked cross-entropy with a recomputing backward.

Each chunked value and gradient is checked against the plain computation through full float32 logits
(``logits_cross_entropy(model.head_logits(h))``, autograd through the head), for several chunk sizes, tied and
untied heads, an excluded column and a padded vocabulary; the backbones' ``return_hidden`` + ``head_logits``
against their plain forward; every family's loss through the fused path against the full-logits path.
"""

from __future__ import annotations

import pytest
import torch

from dlm.data.batch import Batch
from dlm.data.specials import SpecialIds
from dlm.model import ModelConfig, build_model
from dlm.process import ProcessConfig, get_process
from dlm.process.losses import fused_head, head_cross_entropy, head_weighted_cross_entropy, logits_cross_entropy

V = 37


def make(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    base = dict(vocab_size=V, context=32, n_layer=1, n_head=2, d_model=32)
    return build_model(ModelConfig(**{**base, **overrides}))


def _hidden_and_targets(model: torch.nn.Module, N: int = 23, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h_ND = torch.randn(N, model.cfg.d_model, generator=g, dtype=torch.float32)
    targets_N = torch.randint(0, V - 1, (N,), generator=g)  # never the excluded column V - 1
    return h_ND, targets_N


def _ce_and_grads(model: torch.nn.Module, h_ND: torch.Tensor, ce_fn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ce, d(sum_n u_n ce_n)/dh and /dW_head for a fixed random weighting u (so every row's gradient differs)."""
    model.zero_grad(set_to_none=True)
    h = h_ND.clone().requires_grad_(True)
    ce_N = ce_fn(h)
    u_N = torch.linspace(0.5, 2.0, ce_N.shape[0])
    (u_N * ce_N).sum().backward()
    return ce_N.detach(), h.grad, model.head.weight.grad.clone()


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("vocab_multiple", [1, 16])
@pytest.mark.parametrize("exclude", [None, V - 1])
@pytest.mark.parametrize("chunk", [1, 5, 23, 1000, None])
def test_chunked_cross_entropy_equals_full_logits(tie: bool, vocab_multiple: int, exclude, chunk) -> None:
    model = make(tie_weights=tie, vocab_multiple=vocab_multiple)
    assert (model.head.weight is model.tok_emb.weight) == tie
    assert model.head.weight.shape[0] == (48 if vocab_multiple == 16 else V)
    h_ND, y_N = _hidden_and_targets(model)
    ref = _ce_and_grads(model, h_ND, lambda h: logits_cross_entropy(model.head_logits(h), y_N, exclude))
    got = _ce_and_grads(model, h_ND, lambda h: head_cross_entropy(model, h, y_N, exclude=exclude, chunk=chunk))
    for r, c in zip(ref, got, strict=True):
        torch.testing.assert_close(c, r, rtol=1e-5, atol=1e-5)
    assert float(got[2].abs().sum()) > 0
    if vocab_multiple > 1:  # padded head rows carry no logit, hence no gradient
        assert float(got[2][V:].abs().max()) == 0.0
    if exclude is not None:  # the excluded column is not in the softmax: its head row gets no gradient from ce
        assert float(got[2][exclude].abs().max()) == 0.0


def test_cross_entropy_equals_the_direct_formula_in_float64() -> None:
    """ce_n = log sum_{v != e} exp(W h)_v - (W h)_y by hand, in float64."""
    model = make(tie_weights=False)
    h_ND, y_N = _hidden_and_targets(model, N=9)
    ce = head_cross_entropy(model, h_ND, y_N, exclude=4, chunk=4)
    logits = h_ND.double() @ model.head.weight.detach().double().t()
    logits[:, 4] = float("-inf")
    direct = torch.logsumexp(logits, -1) - logits.gather(1, y_N[:, None]).squeeze(1)
    torch.testing.assert_close(ce.double(), direct, rtol=1e-5, atol=1e-5)


def test_backward_does_not_store_full_logits() -> None:
    """The forward saves h, W, targets and lse only: no [N, V] tensor is kept for the backward."""
    model = make(tie_weights=False)
    h_ND, y_N = _hidden_and_targets(model, N=40)
    h = h_ND.requires_grad_(True)
    saved: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        head_cross_entropy(model, h, y_N, chunk=8).sum()
    assert (40, V) not in saved and (8, V) not in saved
    assert {(40, 32), (V, 32), (40,)} <= set(saved)


def test_empty_selection_gives_zero_loss_and_gradient() -> None:
    model = make()
    h = torch.zeros(0, 32, requires_grad=True)
    ce = head_cross_entropy(model, h, torch.zeros(0, dtype=torch.int64))
    assert ce.shape == (0,)
    ce.sum().backward()
    assert h.grad is not None and model.head.weight.grad is not None


@pytest.mark.parametrize("time_cond", [False, True])
def test_return_hidden_then_head_equals_forward(time_cond: bool) -> None:
    model = make(time_cond=time_cond, vocab_multiple=16).eval()
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.8]) if time_cond else None
    logits = model(ids, attn="bidirectional", t_B=t)
    h = model(ids, attn="bidirectional", t_B=t, return_hidden=True)
    assert h.shape == (2, 12, 32) and logits.shape == (2, 12, V)
    torch.testing.assert_close(model.head_logits(h), logits, rtol=0, atol=0)
    rows = model(ids, attn="bidirectional", t_B=t, head_rows=5, return_hidden=True)
    torch.testing.assert_close(rows, h[:, :5], rtol=1e-6, atol=1e-6)
    assert fused_head(model) is model and fused_head(lambda *a, **k: None) is None


def test_gpt2_backbone_return_hidden_and_chunked_ce() -> None:
    pytest.importorskip("transformers")
    cfg = ModelConfig(vocab_size=V, context=32, n_layer=1, n_head=2, d_model=32, backbone="gpt2-hf")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert fused_head(model) is model
    ids = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(0))
    h = model(ids, return_hidden=True)
    torch.testing.assert_close(model.head_logits(h), model(ids), rtol=0, atol=0)
    y = ids.reshape(-1)
    ref = logits_cross_entropy(model.head_logits(h.reshape(-1, 32)), y)
    torch.testing.assert_close(head_cross_entropy(model, h.reshape(-1, 32), y, chunk=7), ref, rtol=1e-5, atol=1e-5)


class _NoCapability(torch.nn.Module):
    """The same backbone seen through a plain callable: the losses must take the full-logits path."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs) -> torch.Tensor:
        assert "return_hidden" not in kwargs
        return self.inner(*args, **kwargs)


FAMILIES = [
    ("ar", {}),
    ("mdlm", {}),
    ("mdlm", {"time_cond": True}),
    ("bd3lm", {"block_size": 4}),
    ("sedd", {"transition": "absorbing"}),
]


@pytest.mark.parametrize(("name", "opts"), FAMILIES, ids=[f"{n}{o}" for n, o in FAMILIES])
def test_family_loss_and_gradients_equal_the_full_logits_path(name: str, opts: dict) -> None:
    specials = SpecialIds(bos=256, eos=257, pad=258, mask=259, vocab_size=259)
    proc = get_process(ProcessConfig(name=name, **opts), specials)
    torch.manual_seed(0)
    cfg = dict(vocab_size=proc.vocab_size, context=32, n_layer=1, n_head=2, d_model=32, vocab_multiple=64)
    model = build_model(ModelConfig(**cfg, time_cond=proc.time_conditioned))
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 11:] = False
    batch = Batch(ids_BL=ids, mask_BL=mask)
    head_calls: list[int] = []
    model.head.register_forward_hook(lambda *args: head_calls.append(1))
    results = []
    for m in (model, _NoCapability(model)):
        model.zero_grad(set_to_none=True)
        loss, stats = proc.loss(m, batch, torch.Generator().manual_seed(7))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None], stats))
        results[-1] += (len(head_calls),)
    (fused, g_fused, stats, fused_calls), (ref, g_ref, _, all_calls) = results
    assert fused_calls == 0 and all_calls == 1  # the fused path never ran the full head
    assert float(ref) > 0
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
    assert len(g_fused) == len(g_ref)
    for a, b in zip(g_fused, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in stats.values())  # no host read in the loss
    assert float(stats["tokens"]) == float((mask[:, 1:]).sum())


@pytest.mark.parametrize("transition", ["absorbing", "uniform"])
def test_d3pm_and_sedd_uniform_stats_are_tensors(transition: str) -> None:
    """The families left on full logits (D3PM, SEDD-uniform) also return their stats without a host read."""
    specials = SpecialIds(bos=256, eos=257, pad=258, mask=259, vocab_size=259)
    for name in ("d3pm", "sedd"):
        proc = get_process(ProcessConfig(name=name, transition=transition), specials)
        torch.manual_seed(0)
        cfg = dict(vocab_size=proc.vocab_size, context=32, n_layer=1, n_head=2, d_model=32)
        model = build_model(ModelConfig(**cfg, time_cond=proc.time_conditioned))
        ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
        loss, stats = proc.loss(model, Batch(ids_BL=ids, mask_BL=torch.ones_like(ids, dtype=torch.bool)))
        assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in stats.values())
        assert float(stats["tokens"]) == 22 and float(stats["nll"]) == pytest.approx(float(loss.detach()), rel=1e-6)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("vocab_multiple", [1, 16])
@pytest.mark.parametrize("exclude", [None, V - 1])
@pytest.mark.parametrize("chunk", [1, 5, 23, None])
def test_weighted_cross_entropy_equals_full_logits(tie: bool, vocab_multiple: int, exclude, chunk) -> None:
    """sum_n u_n ce_n with gradients formed in the forward: value and grads (h, W) = the full-logits path."""
    model = make(tie_weights=tie, vocab_multiple=vocab_multiple)
    h_ND, y_N = _hidden_and_targets(model)
    u_N = torch.linspace(0.5, 2.0, h_ND.shape[0])
    u_N[3] = 0.0  # a row without weight (AR's padding targets)

    def run(fn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        h = h_ND.clone().requires_grad_(True)
        loss = fn(h)
        (3.0 * loss).backward()  # the incoming gradient scales the stored ones
        return loss.detach(), h.grad, model.head.weight.grad.clone()

    ref = run(lambda h: (u_N * logits_cross_entropy(model.head_logits(h), y_N, exclude)).sum())
    got = run(lambda h: head_weighted_cross_entropy(model, h, y_N, u_N, exclude=exclude, chunk=chunk))
    assert got[0].dim() == 0 and float(got[1][3].abs().max()) == 0.0
    for r, c in zip(ref, got, strict=True):
        torch.testing.assert_close(c, r, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # evaluation: no gradient formed, same value
        torch.testing.assert_close(head_weighted_cross_entropy(model, h_ND, y_N, u_N, exclude=exclude), ref[0])


def _autocast_case(device: str) -> None:
    """Under bf16 autocast the head matmul runs in bf16 on both paths (the full path: autocast's linear): the
    chunked loss and gradients agree with the full-logits path to bf16 rounding."""
    model = make(tie_weights=False, vocab_multiple=16).to(device)
    h_ND, y_N = _hidden_and_targets(model, N=50)
    h_ND, y_N = h_ND.to(device), y_N.to(device)
    u_N = torch.linspace(0.5, 2.0, 50, device=device)
    out = []
    for fn in (
        lambda h: (u_N * logits_cross_entropy(model.head_logits(h), y_N, V - 1)).sum(),
        lambda h: head_weighted_cross_entropy(model, h, y_N, u_N, exclude=V - 1, chunk=16),
    ):
        model.zero_grad(set_to_none=True)
        h = h_ND.clone().requires_grad_(True)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = fn(h)
        loss.backward()
        assert loss.dtype == torch.float32 and h.grad.dtype == torch.float32
        assert model.head.weight.grad.dtype == torch.float32
        out.append((loss.detach(), h.grad, model.head.weight.grad.clone()))
    for r, c in zip(*out, strict=True):
        torch.testing.assert_close(c, r, rtol=2e-2, atol=2e-2)


def test_weighted_cross_entropy_under_bf16_autocast_on_cpu() -> None:
    _autocast_case("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_weighted_cross_entropy_under_bf16_autocast_on_cuda() -> None:
    _autocast_case("cuda")


@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")  # the simulated class
def test_fused_head_sees_through_compile_and_refuses_fsdp() -> None:
    """torch.compile and DDP wrappers expose the backbone; an FSDP2-sharded one (fully_shard swaps the class for a
    subclass of FSDPModule, as simulated here) takes the full-logits path."""
    model = make()
    assert fused_head(torch.compile(model)) is model
    ddp_like = torch.nn.Module()
    ddp_like.module = model  # DistributedDataParallel keeps the wrapped module as .module
    assert fused_head(ddp_like) is model
    fsdp_module = type("FSDPModule", (), {})
    model.__class__ = type("FSDPTransformer", (fsdp_module, type(model)), {})
    assert fused_head(model) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ar_loss_and_backward_read_nothing_back_to_the_host_on_cuda() -> None:
    """AR's loss takes every position (no row selection) and returns its stats as device tensors: the loss and
    its backward run under sync debug mode 'error'."""
    specials = SpecialIds(bos=256, eos=257, pad=258, mask=259, vocab_size=259)
    proc = get_process(ProcessConfig(name="ar"), specials)
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=259, context=32, n_layer=1, n_head=2, d_model=32)).cuda()
    ids = torch.randint(0, 256, (3, 16), device="cuda")
    batch = Batch(ids_BL=ids, mask_BL=torch.ones_like(ids, dtype=torch.bool))
    proc.loss(model, batch)[0].backward()  # warm-up (lazy initialisations may synchronise once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, stats = proc.loss(model, batch)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(v.device.type == "cuda" for v in stats.values())


def test_weighted_cross_entropy_refuses_a_second_backward() -> None:
    """Its gradients are formed once and scaled in place: a retained graph's second backward is refused."""
    model = make()
    h_ND, y_N = _hidden_and_targets(model, N=4)
    loss = head_weighted_cross_entropy(model, h_ND.requires_grad_(True), y_N, torch.ones(4))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()
