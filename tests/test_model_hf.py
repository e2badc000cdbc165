"""The gpt2-hf backbone: transformers' GPT-2 behind the dlm forward signature (tiny, random, offline)."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from dlm.model import ModelConfig, build_model, count_params, flops_per_token

V = 41
CFG = ModelConfig(vocab_size=V, context=32, n_layer=2, n_head=2, d_model=64, backbone="gpt2-hf")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(CFG).eval()


def ids(B: int = 2, L: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))


def test_logits_are_float32_and_causal(model):
    x, j = ids(), 7
    y = x.clone()
    y[:, j] = (y[:, j] + 1) % V
    with torch.no_grad():
        a, b = model(x), model(y)
    assert a.dtype == torch.float32 and a.shape == (2, 16, V)
    assert torch.allclose(a[:, :j], b[:, :j], atol=1e-6, rtol=0)
    assert (a[:, j:] - b[:, j:]).abs().amax() > 1e-4


def test_cache_equals_full_forward(model):
    x = ids()
    with torch.no_grad():
        full = model(x)
        cache = model.init_cache(2)
        steps = [model(x[:, :5], cache=cache)] + [model(x[:, i : i + 1], cache=cache) for i in range(5, 16)]
        assert cache.length == 16
        cache = model.init_cache(2)
        chunks = [model(x[:, :6], cache=cache), model(x[:, 6:13], cache=cache), model(x[:, 13:], cache=cache)]
    assert (torch.cat(steps, 1) - full).abs().amax() <= 1e-5
    assert (torch.cat(chunks, 1) - full).abs().amax() <= 1e-5


def test_cached_decode_emits_no_deprecation_warning(model):
    """The backbone uses transformers' current cache API (``past_key_values`` warns: removed in 5.40)."""
    x = ids()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")  # any FutureWarning / DeprecationWarning fails the test
        full = model(x)
        cache = model.init_cache(2)
        steps = [model(x[:, :4], cache=cache)] + [model(x[:, i : i + 1], cache=cache) for i in range(4, 16)]
        model(x[:, :2], cache=cache, commit=False)  # the uncommitted path (a crop) too
    assert cache.length == 16 and cache.dynamic.get_seq_length() == 16
    assert (torch.cat(steps, 1) - full).abs().amax() <= 1e-5


def test_transformers_without_the_cache_argument_is_refused(monkeypatch):
    """An older GPT2LMHeadModel.forward(past_key_values=...) would swallow cache= in **kwargs and decode
    without a cache: refuse it when the backbone is built."""
    import transformers

    def old_forward(self, input_ids=None, past_key_values=None, attention_mask=None, **kwargs):
        raise AssertionError("not called")

    monkeypatch.setattr(transformers.GPT2LMHeadModel, "forward", old_forward)
    with pytest.raises(ValueError, match=r"transformers >= 5\.24 \(its `cache` argument\)"):
        build_model(CFG)


def test_uncommitted_forward_leaves_the_cache_alone(model):
    x = ids()
    with torch.no_grad():
        full = model(x)
        cache = model.init_cache(2)
        model(x[:, :8], cache=cache)
        draft = model(torch.zeros(2, 4, dtype=torch.long), cache=cache, commit=False)
        assert cache.length == 8 and cache.dynamic.get_seq_length() == 8
        ref = model(torch.cat([x[:, :8], torch.zeros(2, 4, dtype=torch.long)], 1))[:, 8:]
        rest = model(x[:, 8:], cache=cache)
    assert (draft - ref).abs().amax() <= 1e-5
    assert (rest - full[:, 8:]).abs().amax() <= 1e-5


def test_key_mask_padding(model):
    x = ids()
    key_mask = torch.ones_like(x, dtype=torch.bool)
    key_mask[0, :3] = False  # left padding
    key_mask[1, 10:] = False
    noise = torch.randint(0, V, x.shape, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a = model(x, key_mask_BL=key_mask)
        b = model(torch.where(key_mask, x, noise), key_mask_BL=key_mask)
        cache = model.init_cache(2)
        cached = torch.cat([model(x[:, :6], cache=cache, key_mask_BL=key_mask[:, :6]), model(x[:, 6:], cache=cache)], 1)
    assert torch.isfinite(a).all()
    assert torch.allclose(a[key_mask], b[key_mask], atol=1e-5, rtol=0)
    real = key_mask.clone()
    real[1, 10:] = False
    assert (cached[real] - a[real]).abs().amax() <= 1e-5


def test_rejects_what_gpt2_cannot_do(model):
    with pytest.raises(ValueError, match="causal"):
        model(ids(), attn="bidirectional")
    with pytest.raises(ValueError, match="no time conditioning"):
        model(ids(), t_B=torch.rand(2))
    with pytest.raises(ValueError, match="overflow"):
        model(ids(L=3), cache=model.init_cache(2, max_len=2))


def test_save_pretrained_then_load_from_hf_path(model, tmp_path):
    model.hf.save_pretrained(tmp_path)
    loaded = build_model(dataclasses.replace(CFG, hf_path=str(tmp_path))).eval()
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    bigger = build_model(dataclasses.replace(CFG, hf_path=str(tmp_path), vocab_size=V + 1))  # appended MASK
    with torch.no_grad():
        assert bigger(x).shape == (2, 16, V + 1)
    with pytest.raises(ValueError, match=r"model\.n_layer"):
        build_model(dataclasses.replace(CFG, hf_path=str(tmp_path), n_layer=3))
    with pytest.raises(ValueError, match=r"model\.hf_path"):
        build_model(dataclasses.replace(CFG, hf_path=str(tmp_path / "missing")))


def test_count_params_and_flops_by_hand(model):
    d, h, n = 64, 256, 2
    per_layer = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * h + h) + (h * d + d)
    body = n * per_layer + 2 * d  # + final LayerNorm
    assert count_params(model, exclude_embeddings=True) == body
    assert count_params(model) == body + V * d + CFG.context * d  # tied wte + wpe
    assert flops_per_token(CFG, 16)["matmul_params"] == n * (4 * d * d + 2 * d * h)
