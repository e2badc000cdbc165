"""Static-shape decoding (dlm.model.decode): the decode step equals the cached forward, the AR sampler's static path
draws the ids of the growing-cache and uncached paths (and leaves the generator where they do), its NFE, refusals,
and on CUDA the captured step equals the eager one."""

from __future__ import annotations

import pytest
import torch

from dlm.data.specials import SpecialIds
from dlm.errors import DlmError
from dlm.model import ModelConfig, build_model
from dlm.process import ARProcess, ProcessConfig, ar, get_process
from dlm.process.ar import STOP_CHECK_EVERY

V = 11


def _model(seed: int = 0, scale: float = 0.2, context: int = 48, device: str = "cpu", **kw) -> torch.nn.Module:
    """A tiny dlm backbone with large random weights (distributions far from uniform)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, context=context, n_layer=2, n_head=2, d_model=32, **kw)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if p.ndim == 1 else noise * scale)
    return model.to(device).eval()


def _ar(eos: int = 1) -> ARProcess:
    proc = get_process(ProcessConfig(name="ar"), SpecialIds(bos=0, eos=eos, pad=2, mask=V, vocab_size=V))
    assert isinstance(proc, ARProcess)
    return proc


def _likely_token(model: torch.nn.Module) -> int:
    """The likeliest token after BOS other than BOS and pad: as EOS it makes every row stop early."""
    with torch.no_grad():
        probs_V = torch.softmax(model(torch.zeros(1, 1, dtype=torch.long))[0, -1], -1)
    probs_V[[0, 2]] = 0
    return int(probs_V.argmax())


def _sample(model, proc, n, length, path, seed=0, **kw):
    """(result, next uniform of the generator afterwards) for path "static", "growing" or "uncached"."""
    model.static_decode = path == "static"
    g = torch.Generator().manual_seed(seed)
    try:
        out = proc.sample(model, n, length, generator=g, use_cache=path != "uncached", **kw)
    finally:
        model.static_decode = True
    return out, torch.rand(1, dtype=torch.float64, generator=g)


def test_decode_step_equals_the_cached_forward_and_the_full_forward():
    model, x = _model(), torch.randint(0, V, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x)
        grow, static = model.init_cache(3, 20), model.init_cache(3, 20)
        a = [model(x[:, :4], cache=grow)[:, -1]]
        b = [model(x[:, :4], cache=static)[:, -1]]
        decoder = model.decoder(static)
        assert not decoder.captured  # CPU runs the step eagerly
        for i in range(4, 20):
            a.append(model(x[:, i : i + 1], cache=grow)[:, -1])
            b.append(decoder.step(x[:, i]))
    assert static.length == grow.length == 20 and int(decoder.pos_1) == 20
    torch.testing.assert_close(torch.stack(b, 1), torch.stack(a, 1), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.stack(b, 1), full[:, 3:], rtol=0, atol=1e-5)
    # the static step writes the same keys and values into the cache as the growing forward
    for layer in range(2):
        torch.testing.assert_close(static.k[layer], grow.k[layer], rtol=0, atol=1e-5)
        torch.testing.assert_close(static.v[layer], grow.v[layer], rtol=0, atol=1e-5)


def test_decode_step_ignores_stale_keys_after_the_position():
    """Keys at index > p are masked: garbage there does not change the step's logits."""
    model, x = _model(), torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        clean = model.init_cache(2, 16)
        model(x[:, :5], cache=clean)
        dirty = model.init_cache(2, 16)
        model(x[:, :5], cache=dirty)
        for layer in range(2):
            dirty.k[layer][:, :, 6:] = 1e3
            dirty.v[layer][:, :, 6:] = -1e3
        a = model.decoder(clean).step(x[:, 5])
        b = model.decoder(dirty).step(x[:, 5])
    assert torch.equal(a, b)


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize(
    "opts",
    [
        dict(),
        dict(prompt_ids=[3, 4, 5], temperature=0.9, top_k=8, top_p=0.95),
        dict(prompt_ids=[7], temperature=0.0),
        dict(temperature=1.3, stop_at_eos=False),
    ],
)
def test_static_path_draws_the_ids_of_the_other_paths(n, opts):
    model, proc, length = _model(), _ar(), 40
    static, u_static = _sample(model, proc, n, length, "static", **opts)
    for path in ("growing", "uncached"):
        other, u_other = _sample(model, proc, n, length, path, **opts)
        assert torch.equal(static.ids_NL, other.ids_NL), path
        assert torch.equal(static.lengths_N, other.lengths_N) and static.stop_N == other.stop_N, path
        assert torch.equal(u_static, u_other), path  # the generator ends in the same state
        assert other.nfe <= static.nfe <= other.nfe + STOP_CHECK_EVERY - 1
        if not (static.lengths_N < length).all():  # some row ran to the end: no surplus step
            assert static.nfe == other.nfe
    if opts.get("temperature", 1.0) > 0:  # the draws depend on the stream, so the equalities are not trivial
        assert not torch.equal(static.ids_NL, _sample(model, proc, n, length, "static", seed=1, **opts)[0].ids_NL)


def test_early_stop_of_every_row_runs_surplus_steps_and_rewinds_the_stream():
    """With EOS likely, every row stops before the length: the static path notices at the next check (nfe counts
    the surplus forwards), the tokens and the generator's final state are those of the per-token check."""
    model, length = _model(seed=4), 48
    proc = _ar(eos=_likely_token(model))
    surplus = []
    for seed in range(4):
        static, u_static = _sample(model, proc, 4, length, "static", seed=seed)
        grow, u_grow = _sample(model, proc, 4, length, "growing", seed=seed)
        assert torch.equal(static.ids_NL, grow.ids_NL) and torch.equal(u_static, u_grow)
        assert all(s == "eos" for s in static.stop_N) and int(static.lengths_N.max()) < length
        G = int(static.lengths_N.max()) - static.prompt_len  # positions sampled until every row stopped
        assert grow.nfe == G
        expected = min(-(-G // STOP_CHECK_EVERY) * STOP_CHECK_EVERY, length - static.prompt_len)
        assert static.nfe == expected
        surplus.append(static.nfe > grow.nfe)
    assert any(surplus)  # surplus draws were made, and rewound (the generators' next uniforms agree)


def test_decoder_refusals():
    model = _model()
    with pytest.raises(DlmError, match="CUDA"):
        model.decoder(model.init_cache(1, 8), capture=True)
    cache = model.init_cache(2, 8)
    with torch.no_grad():
        model(torch.zeros(2, 3, dtype=torch.long), cache=cache, key_mask_BL=torch.tensor([[0, 1, 1], [1, 1, 1]]) > 0)
    with pytest.raises(DlmError, match="padded keys"):
        model.decoder(cache)
    full = model.init_cache(1, 2)
    decoder = model.decoder(full)
    decoder.step(torch.zeros(1, dtype=torch.long))
    decoder.step(torch.zeros(1, dtype=torch.long))
    with pytest.raises(DlmError, match="overflow"):
        decoder.step(torch.zeros(1, dtype=torch.long))
    timed = _model(time_cond=True, cond_dim=16)
    with pytest.raises(DlmError, match="time"):
        timed.decoder(timed.init_cache(1, 4)).step(torch.zeros(1, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n", [1, 8])
def test_captured_decode_equals_eager_on_cuda(n):
    model, proc = _model(device="cuda"), _ar()
    x = torch.randint(0, V, (n, 30), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        eager_cache, graph_cache = model.init_cache(n, 30), model.init_cache(n, 30)
        model(x[:, :5], cache=eager_cache)
        model(x[:, :5], cache=graph_cache)
        eager, graph = model.decoder(eager_cache, capture=False), model.decoder(graph_cache)
        assert graph.captured
        torch.cuda.set_sync_debug_mode("error")  # a step that synchronises with the host raises
        try:
            steps = [(eager.step(x[:, i]), graph.step(x[:, i]).clone()) for i in range(5, 30)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for a, b in steps:
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    kw = dict(prompt_ids=[3, 4], temperature=0.9, top_p=0.95)
    outs = []
    for path in ("static", "growing"):
        model.static_decode = path == "static"
        g = torch.Generator("cuda").manual_seed(0)
        outs.append(proc.sample(model, n, 40, generator=g, **kw))
    model.static_decode = True
    assert torch.equal(outs[0].ids_NL, outs[1].ids_NL) and torch.equal(outs[0].lengths_N, outs[1].lengths_N)


def test_static_path_under_bf16_autocast_draws_the_growing_path_ids():
    """Under autocast the static cache stores keys in bf16 (as computed; the growing cache stores them in float32
    exactly), so the draws agree."""
    model, proc = _model(), _ar()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        static, u_static = _sample(model, proc, 4, 40, "static", temperature=0.9)
        grow, u_grow = _sample(model, proc, 4, 40, "growing", temperature=0.9)
    assert torch.equal(static.ids_NL, grow.ids_NL) and torch.equal(u_static, u_grow)
    assert static.ids_NL.shape == (4, 40)


def test_static_path_rewinds_the_default_generator_too():
    """generator=None draws from the global CPU generator: after an early stop of every row it is left where the
    per-token-check path leaves it."""
    model = _model(seed=4)
    proc, ends = _ar(eos=_likely_token(model)), {}
    for path in ("static", "growing"):
        model.static_decode = path == "static"
        torch.manual_seed(5)
        out = proc.sample(model, 2, 48)
        ends[path] = (out.ids_NL, out.nfe, torch.rand(1, dtype=torch.float64))
    model.static_decode = True
    assert int(out.lengths_N.max()) < 48 and ends["static"][1] > ends["growing"][1]  # surplus steps were run
    assert torch.equal(ends["static"][0], ends["growing"][0]) and torch.equal(ends["static"][2], ends["growing"][2])


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("opts", [dict(), dict(prompt_ids=[3, 4, 5], temperature=0.9, top_k=8, top_p=0.95)])
def test_block_uniforms_draw_the_per_token_ids(n, opts, monkeypatch):
    """Uniforms drawn STOP_CHECK_EVERY tokens at a time (what a CPU generator driving a CUDA model does) give the
    ids, lengths and final generator state of the per-token draws, with and without an early stop of every row."""
    model = _model(seed=4)
    for proc in (_ar(), _ar(eos=_likely_token(model))):
        monkeypatch.setattr(ar, "BLOCK_UNIFORMS", True)
        block, u_block = _sample(model, proc, n, 45, "static", seed=n, **opts)
        monkeypatch.setattr(ar, "BLOCK_UNIFORMS", False)
        token, u_token = _sample(model, proc, n, 45, "static", seed=n, **opts)
        grow, u_grow = _sample(model, proc, n, 45, "growing", seed=n, **opts)
        assert torch.equal(block.ids_NL, token.ids_NL) and torch.equal(block.ids_NL, grow.ids_NL)
        assert torch.equal(block.lengths_N, grow.lengths_N) and block.stop_N == grow.stop_N
        assert torch.equal(u_block, u_token) and torch.equal(u_block, u_grow) and block.nfe == token.nfe
    assert int(block.lengths_N.max()) < 45  # the second process stopped every row early: the rewind was exercised
