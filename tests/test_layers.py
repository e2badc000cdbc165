"""The backbone's elementwise layers: rotary, RMSNorm and SwiGLU with hand-written backwards, checked against the
plain formulas (values equal, gradients by autograd of the formula and by gradcheck in float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dlm.model import ModelConfig, build_model
from dlm.model.layers import (
    RMSNorm,
    _RMSNormFn,
    _RotaryQKVFn,
    _SwiGLUFn,
    apply_rotary,
    rms_norm_reference,
    rotary_cos_sin,
    rotary_qkv,
    swiglu_reference,
)

B, H, L, D = 2, 3, 7, 8


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rotate_pairs(x_BHLD: torch.Tensor, pos: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Direct computation: pair (x_i, x_{i+D/2}) rotated by the angle pos * base^(-2i/D) (the pre-table code)."""
    half = x_BHLD.shape[-1] // 2
    theta = pos.double()[..., None] * base ** (-torch.arange(0, 2 * half, 2, dtype=torch.float64) / (2 * half))
    if theta.dim() == 3:
        theta = theta[:, None]
    c, s = theta.cos().float(), theta.sin().float()
    x1, x2 = x_BHLD[..., :half], x_BHLD[..., half:]
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)


def old_apply_rotary(x: torch.Tensor, pos: torch.Tensor, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """The rotary code before the signed tables, verbatim in its arithmetic: the values must stay the same."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = pos.float()[..., None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


@pytest.mark.parametrize("per_sequence", [False, True])
def test_apply_rotary_equals_the_pair_rotation_bit_for_bit(per_sequence):
    x = torch.randn(B, H, L, D, generator=gen())
    pos = torch.randint(0, 50, (B, L), generator=gen(1)) if per_sequence else torch.arange(3, 3 + L)
    cos, sin = rotary_cos_sin(pos, D, 10000.0)
    assert cos.shape == (*pos.shape, D) and cos.dtype == torch.float32
    out = apply_rotary(x, cos, sin)
    assert torch.equal(out, old_apply_rotary(x, pos, D))
    assert torch.equal(apply_rotary(x.clone().requires_grad_(), cos, sin), out)  # the out-of-place autograd path
    torch.testing.assert_close(out, rotate_pairs(x, pos), rtol=0, atol=1e-5)


def test_rotary_scores_depend_on_relative_position_only():
    q, k = torch.randn(2, 1, 1, 1, D, generator=gen(2)).double().unbind(0)
    cos, sin = (t.double() for t in rotary_cos_sin(torch.arange(40), D, 10000.0))
    rq, rk = apply_rotary(q.expand(1, 1, 40, D), cos, sin), apply_rotary(k.expand(1, 1, 40, D), cos, sin)
    s1 = (rq[..., 5, :] * rk[..., 2, :]).sum()  # positions (5, 2)
    s2 = (rq[..., 30, :] * rk[..., 27, :]).sum()  # (30, 27): the same offset
    torch.testing.assert_close(s1, s2, rtol=1e-6, atol=1e-6)  # the tables are float32
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1).expand(1, 1, 40), rtol=1e-6, atol=0)


def plain_qkv(qkv: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, ...]:
    q, k, v = qkv.view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)
    return old_apply_rotary(q, pos, D), old_apply_rotary(k, pos, D), v


@pytest.mark.parametrize("per_sequence", [False, True])
def test_rotary_qkv_matches_the_plain_split_in_values_and_gradients(per_sequence):
    pos = torch.randint(0, 50, (B, L), generator=gen(1)) if per_sequence else torch.arange(L)
    qkv0 = torch.randn(B, L, 3 * H * D, generator=gen(3))
    grads = [torch.randn(B, H, L, D, generator=gen(4 + i)) for i in range(3)]
    outs, dqkv = [], []
    for f in (lambda x: rotary_qkv(x, H, *rotary_cos_sin(pos, D, 10000.0)), lambda x: plain_qkv(x, pos)):
        qkv = qkv0.clone().requires_grad_()
        o = f(qkv)
        torch.autograd.backward(o, grads)
        outs.append(o)
        dqkv.append(qkv.grad)
    for a, b in zip(*outs):
        assert a.shape == (B, H, L, D) and torch.equal(a, b)
    assert torch.equal(dqkv[0], dqkv[1])


def test_rotary_qkv_gradcheck_float64():
    pos = torch.randint(0, 50, (B, L), generator=gen(1))
    cos, sin = (t.double()[:, None] for t in rotary_cos_sin(pos, D, 10000.0))
    qkv = torch.randn(B, L, 3, H, D, generator=gen(5), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: _RotaryQKVFn.apply(x, cos, sin), (qkv,))


def test_rms_norm_matches_the_formula_and_gradcheck():
    x0 = torch.randn(B, L, 16, generator=gen(6)) * 3
    w0 = torch.rand(16, generator=gen(7)) + 0.5
    g = torch.randn(B, L, 16, generator=gen(8))
    res = []
    for f in (lambda x, w: _RMSNormFn.apply(x, w, 1e-5), lambda x, w: rms_norm_reference(x, w, 1e-5)):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = f(x, w)
        y.backward(g)
        res.append((y, x.grad, w.grad))
    assert torch.equal(res[0][0], res[1][0])  # forward: the same operations
    torch.testing.assert_close(res[0][1], res[1][1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res[0][2], res[1][2], rtol=1e-5, atol=1e-5)
    x = torch.randn(3, 5, 6, generator=gen(9), dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, generator=gen(10), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFn.apply(a, b, 1e-5), (x, w))
    norm = RMSNorm(16)
    assert torch.equal(norm(x0), rms_norm_reference(x0, norm.weight, 1e-5))


def test_rms_norm_keeps_low_precision_dtypes_and_computes_in_float32():
    x = (torch.randn(4, 16, generator=gen(11)) * 2).bfloat16().requires_grad_()
    w = torch.ones(16, dtype=torch.bfloat16, requires_grad=True)
    y = _RMSNormFn.apply(x, w, 1e-5)
    assert y.dtype == torch.bfloat16 and torch.equal(y, rms_norm_reference(x, w, 1e-5))
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast would put the backward's mat-vec in bf16
        x32 = torch.randn(4, 16, generator=gen(12), requires_grad=True)
        w32 = torch.rand(16, generator=gen(13), requires_grad=True)
        _RMSNormFn.apply(x32, w32, 1e-5).sum().backward()
    x_ref, w_ref = x32.detach().clone().requires_grad_(), w32.detach().clone().requires_grad_()
    rms_norm_reference(x_ref, w_ref, 1e-5).sum().backward()
    torch.testing.assert_close(x32.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w32.grad, w_ref.grad, rtol=1e-5, atol=1e-6)


def test_swiglu_matches_the_formula_and_gradcheck():
    h0 = torch.randn(B, L, 2 * 12, generator=gen(14)) * 2
    o = torch.randn(B, L, 12, generator=gen(15))
    res = []
    for f in (_SwiGLUFn.apply, swiglu_reference):
        h = h0.clone().requires_grad_()
        y = f(h)
        y.backward(o)
        res.append((y, h.grad))
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])
    # the derivative in closed form: d/dg SiLU(g) = s (1 + g (1 - s)), s = sigmoid(g)
    g, u = h0.chunk(2, dim=-1)
    s = torch.sigmoid(g)
    torch.testing.assert_close(res[0][1], torch.cat([o * u * s * (1 + g * (1 - s)), o * F.silu(g)], -1))
    h = torch.randn(3, 4, 10, generator=gen(16), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SwiGLUFn.apply, (h,))


@pytest.mark.parametrize("mlp,norm", [("swiglu", "rmsnorm"), ("gelu", "layernorm")])
def test_backbone_step_is_unchanged_by_the_custom_functions(mlp, norm, monkeypatch):
    """A whole forward + backward equals the one built from the plain formulas (float32 rounding)."""
    import dlm.model.layers as layers

    cfg = ModelConfig(vocab_size=37, context=32, n_layer=2, n_head=2, d_model=32, mlp=mlp, norm=norm)
    ids = torch.randint(0, 37, (2, 16), generator=gen(17))

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = build_model(cfg)
        loss = model(ids).logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()]

    fast = run()
    monkeypatch.setattr(layers._RMSNormFn, "apply", lambda x, w, eps: rms_norm_reference(x, w, eps))
    monkeypatch.setattr(layers._SwiGLUFn, "apply", swiglu_reference)
    import dlm.model.attention as attention

    calls = []

    def plain(qkv, n_head, cos, sin):
        calls.append(n_head)
        Bq, Lq, E = qkv.shape
        q, k, v = qkv.view(Bq, Lq, 3, n_head, E // (3 * n_head)).permute(2, 0, 3, 1, 4)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    monkeypatch.setattr(attention, "rotary_qkv", plain)
    slow = run()
    assert calls == [2, 2]  # the plain path did run, once per layer
    torch.testing.assert_close(fast[0], slow[0], rtol=1e-6, atol=1e-6)
    for a, b in zip(fast[1], slow[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mlp,norm", [("swiglu", "rmsnorm"), ("gelu", "layernorm")])
def test_no_grad_path_skips_the_functions_with_the_same_logits(mlp, norm, monkeypatch):
    import dlm.model.layers as layers

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=37, context=32, n_layer=2, n_head=2, d_model=32, mlp=mlp, norm=norm))
    ids = torch.randint(0, 37, (2, 16), generator=gen(18))
    with_grad = model(ids)
    for fn in (layers._RMSNormFn, layers._SwiGLUFn, layers._RotaryQKVFn):
        monkeypatch.setattr(fn, "apply", None)  # a call would fail
    with torch.no_grad():
        assert torch.equal(model(ids), with_grad.detach())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_custom_functions_under_bf16_autocast_on_cuda():
    x0 = torch.randn(4, 33, 64, device="cuda")
    w0 = torch.rand(64, device="cuda") + 0.5
    qkv0 = torch.randn(2, 33, 3 * 64, device="cuda")
    cos, sin = rotary_cos_sin(torch.arange(33, device="cuda"), 16, 10000.0)
    for dtype in (torch.float32, torch.bfloat16):
        x, w = x0.to(dtype).requires_grad_(), w0.clone().requires_grad_()
        x_ref, w_ref = x0.to(dtype).requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, y_ref = _RMSNormFn.apply(x, w, 1e-5), rms_norm_reference(x_ref, w_ref, 1e-5)
            a, a_ref = _SwiGLUFn.apply(y), swiglu_reference(y_ref)
        assert y.dtype == dtype and torch.equal(y, y_ref) and torch.equal(a, a_ref)
        a.float().square().sum().backward()
        a_ref.float().square().sum().backward()
        torch.testing.assert_close(x.grad.float(), x_ref.grad.float(), rtol=2e-2, atol=1e-3)
        torch.testing.assert_close(w.grad, w_ref.grad, rtol=2e-2, atol=1e-3)
        qkv = qkv0.to(dtype)
        q, k, v = rotary_qkv(qkv, 4, cos, sin)
        q_ref, k_ref, v_ref = qkv.view(2, 33, 3, 4, 16).permute(2, 0, 3, 1, 4)
        assert q.dtype == dtype and torch.equal(q, apply_rotary(q_ref, cos, sin))
        assert torch.equal(k, apply_rotary(k_ref, cos, sin)) and torch.equal(v, v_ref)


def test_backbone_equals_the_benchmarks_plain_llama_reference():
    """dlm's default block (RMSNorm, rotary, SwiGLU, tied head) with the weights of ``benchmarks/nanogpt_ref.py``'s
    RefLlama (plain modules, autograd) gives the same loss and gradients: the speed benchmark's llama arm computes
    the same function, and the hand-written backwards agree with autograd of an independent implementation."""
    import sys
    from pathlib import Path

    bench = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, bench)
    try:
        from nanogpt_ref import RefConfig, RefLlama
    finally:
        sys.path.remove(bench)
    cfg = ModelConfig(vocab_size=37, context=32, n_layer=2, n_head=2, d_model=32)
    torch.manual_seed(0)
    model = build_model(cfg)
    ref = RefLlama(RefConfig(37, 32, 2, 2, 32, cfg.mlp_hidden, cfg.rope_base, cfg.norm_eps))
    renames = [("wte", "tok_emb"), ("ln_f", "norm_f"), ("ln_1", "norm1"), ("ln_2", "norm2")]
    renames += [("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.proj")]
    renames += [("c_fc", "mlp.fc_in"), ("c_proj", "mlp.fc_out")]

    def dlm_name(name: str) -> str:
        for theirs, mine in renames:
            name = name.replace(theirs, mine)
        return name

    ours = dict(model.named_parameters())
    mapped = {name: dlm_name(name) for name, _ in ref.named_parameters()}
    assert sorted(mapped.values()) == sorted(ours)  # the same parameters, one to one (the tied head once)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(ours[mapped[name]])
    ids = torch.randint(0, 37, (3, 20), generator=gen(19))
    loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    _, ref_loss = ref(ids[:, :-1], ids[:, 1:])
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(ours[mapped[name]].grad, p.grad, rtol=1e-4, atol=1e-6)
