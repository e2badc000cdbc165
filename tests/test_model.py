"""The dlm transformer backbone: masks, causality, padding, KV cache, time conditioning, counts, FLOPs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dlm.errors import DlmError
from dlm.model import (
    KVCache,
    ModelConfig,
    bidirectional,
    block_causal,
    block_diffusion_train,
    build_model,
    causal,
    count_params,
    dense_mask,
    flops_per_token,
)
from dlm.model.attention import plan_attention

V = 37


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=V, context=32, n_layer=2, n_head=2, d_model=32)
    return ModelConfig(**{**base, **overrides})


def make(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(tiny(**overrides)).eval()


def ids(B: int = 2, L: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))


def with_token_changed(x: torch.Tensor, j: int) -> torch.Tensor:
    y = x.clone()
    y[:, j] = (y[:, j] + 1) % V
    return y


# ---------------------------------------------------------------- masks against dense references


@pytest.mark.parametrize("q_offset", [0, 3, 7])
def test_causal_and_bidirectional_masks_match_reference(q_offset):
    Lq, Lk = 5, 12
    ref_causal = torch.tensor([[j <= i + q_offset for j in range(Lk)] for i in range(Lq)])
    assert torch.equal(dense_mask(causal, Lq, Lk, q_offset), ref_causal)
    assert torch.equal(dense_mask(bidirectional, Lq, Lk, q_offset), torch.ones(Lq, Lk, dtype=torch.bool))
    if q_offset == 0:
        assert torch.equal(dense_mask(causal, 6, 6), torch.ones(6, 6, dtype=torch.bool).tril())


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 16])
@pytest.mark.parametrize("q_offset", [0, 3, 8])
def test_block_causal_mask_matches_reference(k, q_offset):
    Lq, Lk = 9, 17
    ref = torch.zeros(Lq, Lk, dtype=torch.bool)
    for i in range(Lq):
        q_block = (i + q_offset) // k
        for j in range(Lk):
            ref[i, j] = j // k <= q_block
    assert torch.equal(dense_mask(block_causal(k), Lq, Lk, q_offset), ref)


def test_block_causal_one_is_causal_and_full_is_bidirectional():
    assert torch.equal(dense_mask(block_causal(1), 8, 8), dense_mask(causal, 8, 8))
    assert dense_mask(block_causal(8), 8, 8).all()


@pytest.mark.parametrize("L,k", [(8, 2), (8, 4), (6, 3), (4, 1), (8, 8)])
def test_block_diffusion_train_mask_matches_paper_blocks(L, k):
    b = torch.arange(L) // k
    m_bd = b[:, None] == b[None, :]  # noisy block sees its own noisy block
    m_obc = b[None, :] < b[:, None]  # noisy block sees earlier clean blocks
    m_bc = b[None, :] <= b[:, None]  # clean block sees clean blocks up to itself
    ref = torch.cat([torch.cat([m_bd, m_obc], 1), torch.cat([torch.zeros_like(m_bc), m_bc], 1)], 0)
    assert torch.equal(dense_mask(block_diffusion_train(L, k), 2 * L, 2 * L), ref)


def test_mask_helpers_reject_bad_input():
    with pytest.raises(ValueError, match="block_size"):
        block_causal(0)
    with pytest.raises(ValueError, match="bool"):
        dense_mask(lambda q, kv: q - kv, 3, 3)


# ---------------------------------------------------------------- what each attention mode sees


def test_causal_model_is_causal():
    model, x, j = make(), ids(), 9
    with torch.no_grad():
        a, b = model(x), model(with_token_changed(x, j))
    assert torch.allclose(a[:, :j], b[:, :j], atol=1e-6, rtol=0)
    assert (a[:, j:] - b[:, j:]).abs().amax() > 1e-4


def test_bidirectional_model_sees_the_future():
    model, x, j = make(), ids(), 9
    with torch.no_grad():
        a, b = model(x, attn="bidirectional"), model(with_token_changed(x, j), attn="bidirectional")
    assert (a[:, :j] - b[:, :j]).abs().amax(dim=-1).min() > 1e-6  # every earlier position changes


def test_block_causal_model_sees_its_own_block_and_earlier_ones():
    model, x, j, k = make(), ids(), 9, 4  # token 9 lies in block 2 = positions 8..11
    with torch.no_grad():
        a = model(x, attn=block_causal(k))
        b = model(with_token_changed(x, j), attn=block_causal(k))
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6, rtol=0)
    assert (a[:, 8:12] - b[:, 8:12]).abs().amax(dim=-1).min() > 1e-6


def test_is_causal_fast_path_equals_dense_mask():
    model, x = make(), ids()
    assert plan_attention(causal, 16, 16, 0, None, "sdpa", x.device).is_causal  # the two paths differ
    dense = plan_attention(lambda q, kv: kv <= q, 16, 16, 0, None, "sdpa", x.device)
    assert not dense.is_causal and dense.mask is not None
    with torch.no_grad():
        fast = model(x, attn="causal")
        slow = model(x, attn=lambda q, kv: kv <= q)
    assert torch.allclose(fast, slow, atol=1e-5, rtol=0)


def test_unknown_attention_mode_is_rejected():
    with pytest.raises(ValueError, match="attn"):
        make()(ids(), attn="sideways")


# ---------------------------------------------------------------- padding


def test_padded_keys_do_not_influence_real_positions():
    model, x = make(), ids()
    key_mask = torch.ones_like(x, dtype=torch.bool)
    key_mask[0, 11:] = False
    key_mask[1, 5:] = False
    noise = torch.randint(0, V, x.shape, generator=torch.Generator().manual_seed(5))
    y = torch.where(key_mask, x, noise)
    assert not torch.equal(x, y)
    with torch.no_grad():
        a = model(x, attn="bidirectional", key_mask_BL=key_mask)
        b = model(y, attn="bidirectional", key_mask_BL=key_mask)
        unmasked = model(y, attn="bidirectional")
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert torch.allclose(a[key_mask], b[key_mask], atol=1e-5, rtol=0)
    assert (a[key_mask] - unmasked[key_mask]).abs().amax() > 1e-4  # the mask did something


@pytest.mark.parametrize("attn", ["causal", "bidirectional"])
def test_fully_masked_rows_give_no_nan(attn):
    model, x = make(), ids()
    key_mask = torch.ones_like(x, dtype=torch.bool)
    key_mask[0, :4] = False  # left padding: causal rows 0..3 would see no key
    key_mask[1] = False  # a row of padding only
    with torch.no_grad():
        out = model(x, attn=attn, key_mask_BL=key_mask)
    assert torch.isfinite(out).all()


def test_every_query_row_sees_some_key_in_the_dense_plan():
    key_mask = torch.zeros(2, 6, dtype=torch.bool)
    key_mask[0, 3:] = True
    plan = plan_attention(causal, 4, 6, 2, key_mask, "sdpa", torch.device("cpu"))
    assert plan.mask is not None and plan.mask.any(dim=-1).all()
    assert plan.mask[0, 0, :, 3:].equal(dense_mask(causal, 4, 6, 2)[:, 3:])  # rows with real keys untouched
    assert plan.mask[1, 0].equal(dense_mask(lambda q, kv: q == kv, 4, 6, 2))  # all padding: own key alone


def test_key_mask_shape_is_checked():
    with pytest.raises(ValueError, match="key_mask_BL"):
        make()(ids(), key_mask_BL=torch.ones(2, 3, dtype=torch.bool))


# ---------------------------------------------------------------- KV cache


def test_cache_token_by_token_equals_full_forward():
    model, x = make(), ids()
    with torch.no_grad():
        full = model(x)
        cache = model.init_cache(2)
        assert isinstance(cache, KVCache)
        steps = [model(x[:, :5], cache=cache)]
        steps += [model(x[:, i : i + 1], cache=cache) for i in range(5, 16)]
    assert cache.length == 16
    assert (torch.cat(steps, dim=1) - full).abs().amax() <= 1e-5


@pytest.mark.parametrize("chunks", [[3, 5, 8], [1, 15], [16]])
def test_cache_in_chunks_equals_full_forward(chunks):
    model, x = make(), ids()
    with torch.no_grad():
        full = model(x)
        cache, outs, start = model.init_cache(2, max_len=16), [], 0
        for n in chunks:
            outs.append(model(x[:, start : start + n], cache=cache))
            start += n
    assert (torch.cat(outs, dim=1) - full).abs().amax() <= 1e-5


def test_cache_with_block_causal_chunks_and_uncommitted_drafts():
    """Block diffusion: denoise a block several times (commit=False), then commit it."""
    model, x, k = make(), ids(), 4
    attn = block_causal(k)
    with torch.no_grad():
        full = model(x, attn=attn)
        cache, outs = model.init_cache(2), []
        for b in range(4):
            block = x[:, b * k : (b + 1) * k]
            draft = torch.randint(0, V, block.shape, generator=torch.Generator().manual_seed(b))
            drafted = model(draft, attn=attn, cache=cache, commit=False)
            assert cache.length == b * k
            prefix_and_draft = torch.cat([x[:, : b * k], draft], dim=1)
            ref = model(prefix_and_draft, attn=attn)[:, b * k :]
            assert (drafted - ref).abs().amax() <= 1e-5
            outs.append(model(block, attn=attn, cache=cache))
            assert cache.length == (b + 1) * k
    assert (torch.cat(outs, dim=1) - full).abs().amax() <= 1e-5


def test_cache_remembers_padding_of_committed_tokens():
    model, x = make(), ids()
    key_mask = torch.ones_like(x, dtype=torch.bool)
    key_mask[0, :3] = False  # left-padded prompt
    with torch.no_grad():
        full = model(x, key_mask_BL=key_mask)
        cache = model.init_cache(2)
        first = model(x[:, :6], cache=cache, key_mask_BL=key_mask[:, :6])
        rest = model(x[:, 6:], cache=cache)  # new tokens are all real
    real = key_mask
    assert (torch.cat([first, rest], dim=1)[real] - full[real]).abs().amax() <= 1e-5


def test_cache_limits_are_enforced():
    model, x = make(), ids()
    with pytest.raises(ValueError, match="max_len"):
        model.init_cache(2, max_len=64)  # context is 32
    cache = model.init_cache(2, max_len=10)
    with torch.no_grad():
        model(x[:, :8], cache=cache)
        with pytest.raises(ValueError, match="overflow"):
            model(x[:, :3], cache=cache)
        with pytest.raises(ValueError, match="batch size"):
            model(x[:1, :1], cache=cache)
        with pytest.raises(ValueError, match="context"):
            model(torch.zeros(1, 33, dtype=torch.long))
    cache.truncate(4)
    assert cache.length == 4


# ---------------------------------------------------------------- positions (BD3-LM's x_t ⊕ x_0 pass)


def test_block_diffusion_pass_clean_half_equals_block_causal_forward():
    L, k = 12, 4
    model = make(context=L)
    x = ids(L=L)
    z = torch.randint(0, V, x.shape, generator=torch.Generator().manual_seed(3))
    pos = torch.arange(L).repeat(2)
    with torch.no_grad():
        both = model(torch.cat([z, x], 1), attn=block_diffusion_train(L, k), pos=pos)
        clean = model(x, attn=block_causal(k))
    assert torch.allclose(both[:, L:], clean, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="context"):
        model(torch.cat([z, x], 1), attn=block_diffusion_train(L, k))  # 2L indices as positions


# ---------------------------------------------------------------- time conditioning


def test_time_conditioning():
    model, x = make(time_cond=True, cond_dim=16), ids()
    t_lo, t_hi = torch.tensor([0.1, 0.2]), torch.tensor([0.8, 0.9])
    with torch.no_grad():
        a, b = model(x, t_B=t_lo), model(x, t_B=t_hi)
        assert torch.isfinite(a).all() and torch.equal(a, model(x, t_B=t_lo))
        assert torch.allclose(a, b, atol=1e-6, rtol=0)  # zero-init adaLN: blocks start as identity
        for module in model.modules():
            if getattr(module, "is_zero_init", False):
                torch.nn.init.normal_(module.weight, std=0.1)
        a, b = model(x, t_B=t_lo), model(x, t_B=t_hi)
    assert (a - b).abs().amax() > 1e-4


def test_time_conditioning_is_learned_from_zero_init():
    model, x = make(time_cond=True, cond_dim=16), ids()
    model.train()
    t = torch.tensor([0.3, 0.7])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss = torch.nn.functional.cross_entropy(model(x, t_B=t).flatten(0, 1), x.flatten())
    loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        a, b = model(x, t_B=torch.tensor([0.1, 0.1])), model(x, t_B=torch.tensor([0.9, 0.9]))
    assert (a - b).abs().amax() > 1e-4


def test_time_argument_errors():
    with pytest.raises(ValueError, match="t_B is required"):
        make(time_cond=True, cond_dim=16)(ids())
    with pytest.raises(ValueError, match="no time conditioning"):
        make()(ids(), t_B=torch.rand(2))
    with pytest.raises(ValueError, match="t_B must have shape"):
        make(time_cond=True, cond_dim=16)(ids(), t_B=torch.rand(3))


# ---------------------------------------------------------------- initialisation, parameter counts, FLOPs


def test_init_scales():
    n, std = 4, 0.02
    model = build_model(tiny(n_layer=n, d_model=64, time_cond=True, cond_dim=16, init_std=std))
    for name, p in model.named_parameters():
        if name.endswith("adaln.proj.weight") or name.endswith("adaln_f.proj.weight"):
            assert not p.any(), name
        elif name.endswith(("attn.proj.weight", "fc_out.weight")):
            assert abs(p.std().item() / (std / (2 * n) ** 0.5) - 1) < 0.1, name
        elif name.endswith(("qkv.weight", "fc_in.weight", "tok_emb.weight")):
            assert abs(p.std().item() / std - 1) < 0.1, name


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("mlp,hidden,n_mats", [("swiglu", 192, 3), ("gelu", 256, 2)])
def test_count_params_by_hand(tie, mlp, hidden, n_mats):
    d, n, v = 64, 2, V
    cfg = tiny(d_model=d, n_layer=n, mlp=mlp, tie_weights=tie)
    assert cfg.mlp_hidden == hidden  # swiglu: 2/3 * 4 * 64 = 170.7 rounded up to 192
    model = build_model(cfg)
    per_layer = 2 * d + 4 * d * d + n_mats * d * hidden  # two RMSNorm weights, qkv + out, MLP
    body = n * per_layer + d  # + final norm
    assert count_params(model, exclude_embeddings=True) == body
    assert count_params(model) == body + v * d * (1 if tie else 2)


def test_count_params_with_time_conditioning_and_layernorm():
    d, n, c = 32, 2, 16
    model = build_model(tiny(time_cond=True, cond_dim=c, norm="layernorm", mlp="gelu"))
    per_layer = 4 * d + 4 * d * d + 2 * d * 128 + (c * 6 * d + 6 * d)  # LN weight+bias x2, adaLN
    cond = (256 * c + c) + (c * c + c) + (c * 2 * d + 2 * d)  # t MLP, final adaLN
    assert count_params(model, exclude_embeddings=True) == n * per_layer + 2 * d + cond
    assert count_params(model) == n * per_layer + 2 * d + cond + V * d


def test_flops_per_token_by_hand():
    cfg = tiny(d_model=64, n_layer=2, vocab_size=100)  # swiglu, hidden 192
    f = flops_per_token(cfg, seq_len=16)
    # N = 2 * (4 * 64^2 + 3 * 64 * 192) = 106496; attention 2*2*2*16*64 = 8192; head 2*64*100 = 12800
    assert f["matmul_params"] == 106496
    assert f["forward"] == 2 * 106496 + 8192 + 12800 == 233984
    assert f["train"] == 3 * 233984
    g = flops_per_token(dataclasses.replace(cfg, mlp="gelu"), seq_len=32)
    assert g["forward"] == 2 * 2 * (4 * 64 * 64 + 2 * 64 * 256) + 2 * 2 * 2 * 32 * 64 + 2 * 64 * 100


def test_flops_matmul_params_are_the_non_embedding_weights():
    cfg = tiny(d_model=64)
    model = build_model(cfg)
    norms = (2 * cfg.n_layer + 1) * cfg.d_model
    assert flops_per_token(cfg, 8)["matmul_params"] == count_params(model, exclude_embeddings=True) - norms


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("time_cond", [False, True])
def test_backward_with_boolean_mask_gives_finite_gradients(time_cond):
    model = make(time_cond=time_cond, cond_dim=16, dropout=0.1, tie_weights=False)
    model.train()
    x = ids()
    key_mask = torch.ones_like(x, dtype=torch.bool)
    key_mask[1, 12:] = False
    t_B = torch.rand(2) if time_cond else None
    logits = model(x, attn=block_causal(4), key_mask_BL=key_mask, t_B=t_B)
    loss = torch.nn.functional.cross_entropy(logits[key_mask], x[key_mask])
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        in_block = name.startswith("blocks.") and ".adaln." not in name
        gated = time_cond and (in_block or name.startswith("time_emb."))
        if not gated:  # with zero-init gates the blocks (and the t MLP) get no gradient at step 0
            assert p.grad.abs().sum() > 0, name


def test_bf16_autocast_returns_float32_logits():
    model, x = make(), ids()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.float32
    with torch.no_grad():
        ref = model(x)
    assert (out - ref).abs().amax() < 0.05


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"vocab_size": 0}, "vocab_size"),
        ({"context": 0}, "context"),
        ({"n_layer": -1}, "n_layer"),
        ({"n_head": 0}, "n_head"),
        ({"d_model": 30, "n_head": 4}, "d_model"),
        ({"d_model": 6, "n_head": 2}, "n_head"),  # head dim 3 is odd
        ({"mlp": "relu"}, "mlp"),
        ({"norm": "batchnorm"}, "norm"),
        ({"backbone": "llama"}, "backbone"),
        ({"attn_backend": "xla"}, "attn_backend"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"mlp_ratio": 0.0}, "mlp_ratio"),
        ({"hf_path": "gpt2"}, "hf_path"),
        ({"backbone": "gpt2-hf", "time_cond": True}, "time_cond"),
    ],
)
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"model\.{field}"):
        build_model(tiny(**overrides))


def test_flex_backend_refuses_cpu():
    model = make(attn_backend="flex")
    with pytest.raises(ValueError, match="flex attention needs CUDA"):
        model(ids())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attn", ["causal", "bidirectional", block_causal(4)])
def test_flex_matches_sdpa_on_cuda(attn):
    torch.manual_seed(0)
    sdpa = build_model(tiny(context=256)).cuda().eval()
    flex = build_model(tiny(context=256, attn_backend="flex")).cuda().eval()
    flex.load_state_dict(sdpa.state_dict())
    x = torch.randint(0, V, (2, 200), device="cuda")
    key_mask = torch.ones_like(x, dtype=torch.bool)
    key_mask[1, 150:] = False
    with torch.no_grad():
        for km in (None, key_mask):
            a = sdpa(x, attn=attn, key_mask_BL=km)
            b = flex(x, attn=attn, key_mask_BL=km)
            real = torch.ones_like(x, dtype=torch.bool) if km is None else km
            assert (a[real] - b[real]).abs().amax() < 1e-3


@pytest.mark.parametrize("time_cond", [False, True])
def test_head_rows_equals_the_sliced_full_logits(time_cond):
    """head_rows = R gives exactly the first R rows of the full logits (the other rows still act as keys), and
    its gradient reaches every position's embedding through attention; R outside [1, L] is refused."""
    extra = dict(time_cond=True, cond_dim=16) if time_cond else {}
    model, x = make(**extra), ids(L=16)
    kw = dict(attn=block_diffusion_train(8, 4), pos=torch.arange(8).repeat(2))
    if time_cond:
        kw["t_B"] = torch.tensor([0.3, 0.8])
    full = model(x, **kw)
    part = model(x, head_rows=8, **kw)
    assert part.shape == (2, 8, V)
    torch.testing.assert_close(part, full[:, :8], rtol=0, atol=1e-6)
    # the clean half (rows 8..15) feeds the noisy half: changing a clean token changes the noisy logits
    # (time-conditioned blocks are the identity at init, so only the plain model shows it)
    assert time_cond or not torch.allclose(model(with_token_changed(x, 9), head_rows=8, **kw), part)
    for bad in (0, 17):
        with pytest.raises(DlmError, match="head_rows"):
            model(x, head_rows=bad, **kw)


# ---------------------------------------------------------------- vocabulary padding (model.vocab_multiple)


@pytest.mark.parametrize("tie", [True, False])
def test_padded_vocabulary_gives_the_unpadded_logits_and_nll(tie):
    """Copying an unpadded model's weights into the real rows of a padded one (m = 16: 37 -> 48 rows) gives the
    same logits over the true V (padded rows are never looked up, their logits are sliced off) and the same NLL,
    whatever the padded rows hold."""
    from dlm.data.batch import Batch
    from dlm.data.specials import SpecialIds
    from dlm.process import ProcessConfig, get_process

    plain, padded = make(tie_weights=tie), make(seed=1, tie_weights=tie, vocab_multiple=16)
    assert padded.cfg.padded_vocab == 48 and padded.tok_emb.weight.shape[0] == padded.head.weight.shape[0] == 48
    with torch.no_grad():
        for name, p in padded.named_parameters():
            src = dict(plain.named_parameters())[name]
            p[: src.shape[0]].copy_(src)
            p[src.shape[0] :].normal_(0, 5.0)  # padded rows hold anything
    x = ids()
    with torch.no_grad():
        a, b = plain(x), padded(x)
    assert b.shape == (2, 16, V) and torch.equal(a, b)
    proc = get_process(ProcessConfig(name="ar"), SpecialIds(bos=0, eos=1, pad=2, mask=V, vocab_size=V))
    batch = Batch(x, torch.ones_like(x, dtype=torch.bool))
    assert torch.equal(proc.nll(plain, batch).nats_B, proc.nll(padded, batch).nats_B)
    # decoding and sampling see the true vocabulary only
    out = proc.sample(padded, 4, 12, generator=torch.Generator().manual_seed(0), temperature=2.0)
    assert int(out.ids_NL.max()) < V


def test_padded_vocabulary_counts():
    """count_params counts the rows that exist (padded included); flops_per_token's head counts the padded matmul;
    m = 1 changes nothing and the default keeps existing config hashes."""
    from dlm.config import RunConfig, config_hash

    cfg, cfg64 = tiny(tie_weights=False), tiny(tie_weights=False, vocab_multiple=64)
    assert (
        cfg.padded_vocab == V
        and cfg64.padded_vocab == 64
        and tiny(vocab_size=128, vocab_multiple=64).padded_vocab == 128
    )
    n, n64 = count_params(build_model(cfg)), count_params(build_model(cfg64))
    assert n64 - n == 2 * (64 - V) * 32  # embedding and untied head rows
    assert count_params(build_model(cfg64), exclude_embeddings=True) == count_params(build_model(cfg), True)
    assert flops_per_token(cfg64, 16)["head"] == 2 * 32 * 64 and flops_per_token(cfg, 16)["head"] == 2 * 32 * V
    run = RunConfig()
    base = config_hash(run)
    run.model.vocab_multiple = 1
    assert config_hash(run) == base
    run.model.vocab_multiple = 64
    assert config_hash(run) != base
    for bad in (0, -64, 1.5, True):
        with pytest.raises(ValueError, match=r"model\.vocab_multiple"):
            tiny(vocab_multiple=bad).validate()
    with pytest.raises(ValueError, match=r"model\.vocab_multiple"):
        tiny(backbone="gpt2-hf", vocab_multiple=64).validate()


# ---------------------------------------------------------------- FlexAttention BlockMasks


@pytest.mark.slow
@pytest.mark.parametrize(
    "mask_fn,Lq,Lk,q_offset",
    [
        (block_diffusion_train(32, 8), 64, 64, 0),  # BD3-LM's x_t ⊕ x_0 training mask
        (block_causal(8), 64, 64, 0),
        (block_causal(8), 16, 48, 32),  # a block decoded against a cache
        (causal, 64, 64, 0),
    ],
)
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager flex on CPU, on purpose
def test_flex_block_mask_forward_equals_sdpa_on_cpu(mask_fn, Lq, Lk, q_offset):
    """flex_attention's forward runs eagerly on CPU in this torch: with the BlockMask of ``block_mask`` it equals
    SDPA with the dense mask of the same function."""
    flex_mod = pytest.importorskip("torch.nn.attention.flex_attention")
    from dlm.model.attention import block_mask

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, Lq, 16, generator=g)
    k, v = torch.randn(2, 2, Lk, 16, generator=g), torch.randn(2, 2, Lk, 16, generator=g)
    bm = block_mask(mask_fn, Lq, Lk, q_offset, None, torch.device("cpu"))
    out = flex_mod.flex_attention(q, k, v, block_mask=bm)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(mask_fn, Lq, Lk, q_offset))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_block_masks_are_cached_per_mask_and_shape():
    pytest.importorskip("torch.nn.attention.flex_attention")
    from dlm.model.attention import block_mask, mask_identity

    cpu = torch.device("cpu")
    assert mask_identity(block_causal(4)) == mask_identity(block_causal(4)) != mask_identity(block_causal(8))
    assert mask_identity(causal) != mask_identity(bidirectional)
    a = block_mask(block_causal(4), 32, 32, 0, None, cpu)
    assert block_mask(block_causal(4), 32, 32, 0, None, cpu) is a  # a new closure of the same mask: cached
    assert block_mask(block_causal(8), 32, 32, 0, None, cpu) is not a
    assert block_mask(block_causal(4), 16, 32, 16, None, cpu) is not a
    km = torch.ones(2, 32, dtype=torch.bool)
    assert block_mask(block_causal(4), 32, 32, 0, km, cpu) is not block_mask(block_causal(4), 32, 32, 0, km, cpu)
    b = block_mask(block_diffusion_train(16, 4), 32, 32, 0, None, cpu)
    assert block_mask(block_diffusion_train(16, 4), 32, 32, 0, None, cpu) is b
    assert block_mask(block_diffusion_train(16, 8), 32, 32, 0, None, cpu) is not b


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_matches_sdpa_for_the_block_diffusion_training_pass_on_cuda():
    """BD3-LM's one-pass x_t ⊕ x_0 forward (2L tokens, shared rotary positions) through flex equals SDPA."""
    torch.manual_seed(0)
    sdpa = build_model(tiny(context=256)).cuda().eval()
    flex = build_model(tiny(context=256, attn_backend="flex")).cuda().eval()
    flex.load_state_dict(sdpa.state_dict())
    x = torch.randint(0, V, (2, 256), device="cuda")
    kw = dict(attn=block_diffusion_train(128, 16), pos=torch.arange(128, device="cuda").repeat(2))
    with torch.no_grad():
        a, b = sdpa(x, **kw), flex(x, **kw)
        again = flex(x, **kw)  # the cached BlockMask
    assert (a - b).abs().amax() < 1e-3 and torch.equal(b, again)
