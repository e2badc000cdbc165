"""AR process: loss and exact likelihood against hand computations, the normalisation identity, KV-cache
sampling (cache == no cache, prompt, EOS stop, NFE, distribution), the registry, and evaluate_nll."""

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlm.data.batch import Batch
from dlm.data.specials import SpecialIds
from dlm.errors import DlmError
from dlm.eval.likelihood import bits_per_byte, evaluate_nll
from dlm.io import write_json_atomic
from dlm.process import (
    ARProcess,
    NLLResult,
    Process,
    ProcessConfig,
    available_processes,
    get_process,
)

# ---------------------------------------------------------------------------------------------- doubles


class _SumCache:
    """Running sum of the inputs seen so far; ``length`` tokens committed."""

    def __init__(self, batch_size: int, d: int, max_len: int | None) -> None:
        self.sum_BD = torch.zeros(batch_size, d, dtype=torch.float64)
        self.length = 0
        self.max_len = max_len


class TinyCausalLM(nn.Module):
    """h_i = tanh(mean_{j <= i} (E[x_j] + P[j])), logits_i = W h_i + b: causal by construction.

    Same call signature as the backbone, with a cache holding the running sum. Counts forward calls.
    """

    def __init__(self, vocab: int, d: int = 16, context: int = 32, seed: int = 0, scale: float = 1.5):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.context = context
        self.tok = nn.Parameter(torch.randn(vocab, d, generator=g) * scale)
        self.pos = nn.Parameter(torch.randn(context, d, generator=g) * scale)
        self.out = nn.Parameter(torch.randn(d, vocab, generator=g) * scale)
        self.bias = nn.Parameter(torch.randn(vocab, generator=g))
        self.calls = 0

    def init_cache(self, batch_size, max_len=None, device=None, dtype=None):
        return _SumCache(batch_size, self.tok.shape[1], max_len)

    def forward(self, ids_BL, *, attn="causal", t_B=None, key_mask_BL=None, cache=None, commit=True):
        assert attn == "causal" and t_B is None
        self.calls += 1
        L = ids_BL.shape[1]
        off = 0 if cache is None else cache.length
        assert off + L <= self.context
        x = (self.tok[ids_BL] + self.pos[off : off + L]).double()
        cs = torch.cumsum(x, dim=1)
        if cache is not None:
            cs = cs + cache.sum_BD[:, None]
            if commit:
                cache.sum_BD = cs[:, -1].detach()
                cache.length += L
        h = torch.tanh(cs / torch.arange(off + 1, off + L + 1, dtype=torch.float64)[None, :, None])
        return (h.float() @ self.out + self.bias).float()


class ConstantLM(nn.Module):
    """Next-token distribution ``probs`` whatever the input."""

    def __init__(self, probs, context: int = 64):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(probs).log())
        self.context = context
        self.calls = 0

    def init_cache(self, batch_size, max_len=None, device=None, dtype=None):
        return _SumCache(batch_size, 1, max_len)

    def forward(self, ids_BL, *, attn="causal", t_B=None, key_mask_BL=None, cache=None, commit=True):
        self.calls += 1
        if cache is not None and commit:
            cache.length += ids_BL.shape[1]
        return self.logits.expand(*ids_BL.shape, -1).float()


def _model(which: str, vocab: int, context: int = 16, seed: int = 0, scale: float = 0.3) -> nn.Module:
    """The test double, or a tiny real backbone ("dlm" or "gpt2-hf") whose weights are redrawn with a large
    std so that its distributions are far from uniform."""
    if which == "double":
        return TinyCausalLM(vocab, context=context, seed=seed)
    if which == "gpt2-hf":
        pytest.importorskip("transformers")
    model_pkg = pytest.importorskip("dlm.model")
    build_model = getattr(model_pkg, "build_model", None)
    if build_model is None:
        pytest.skip("dlm.model.build_model is not available")
    cfg = model_pkg.ModelConfig(vocab_size=vocab, context=context, n_layer=2, n_head=2, d_model=16, backbone=which)
    torch.manual_seed(seed)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1:  # norm gains and biases: near their init
                p.add_(noise * 0.1)
            else:
                p.copy_(noise * scale)
    return model.eval()


BACKBONES = ["double", "dlm", "gpt2-hf"]


def _specials(vocab: int, bos: int | None = 0, eos: int = 1, pad: int = 2) -> SpecialIds:
    return SpecialIds(bos=bos, eos=eos, pad=pad, mask=vocab, vocab_size=vocab)


def _ar(vocab: int, **kw) -> ARProcess:
    proc = get_process(ProcessConfig(name="ar"), _specials(vocab, **kw))
    assert isinstance(proc, ARProcess)
    return proc


def _padded_batch(vocab: int = 7, B: int = 4, L: int = 9, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, L), generator=g)
    lengths = torch.tensor([L, 5, 2, 1])[:B]
    mask = torch.arange(L)[None] < lengths[:, None]
    return Batch(ids.masked_fill(~mask, 2), mask)


# ------------------------------------------------------------------------------------------ loss and nll


def test_process_declarations():
    proc = _ar(7)
    assert proc.attention == "causal" and not proc.time_conditioned
    assert proc.exact_likelihood and not proc.absorbing and proc.samplers == ("ancestral",)
    assert proc.vocab_size == 7 and "ar" in available_processes()


def test_loss_equals_shifted_cross_entropy():
    model, proc, batch = TinyCausalLM(7), _ar(7), _padded_batch()
    loss, stats = proc.loss(model, batch)
    logits = model(batch.ids_BL)[:, :-1]
    targets = batch.ids_BL[:, 1:].masked_fill(~batch.mask_BL[:, 1:], -100)
    ref = F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    assert stats["tokens"] == 8 + 4 + 1 + 0 and stats["nll"] == pytest.approx(ref.item(), rel=1e-6)
    loss.backward()
    assert model.out.grad is not None and model.out.grad.abs().sum() > 0


def test_padding_does_not_change_loss_or_nll():
    model, proc, batch = TinyCausalLM(7), _ar(7), _padded_batch()
    other_ids = batch.ids_BL.clone()
    other_ids[~batch.mask_BL] = torch.randint(0, 7, (int((~batch.mask_BL).sum()),))
    other = Batch(other_ids, batch.mask_BL)
    assert not torch.equal(other_ids, batch.ids_BL)
    assert proc.loss(model, batch)[0].item() == proc.loss(model, other)[0].item()
    assert torch.equal(proc.nll(model, batch).nats_B, proc.nll(model, other).nats_B)


def test_nll_equals_float64_log_softmax_sums():
    model, proc, batch = TinyCausalLM(7), _ar(7), _padded_batch()
    res = proc.nll(model, batch)
    assert isinstance(res, NLLResult) and res.exact
    assert res.nats_B.dtype == torch.float64 and res.tokens_B.dtype == torch.int64
    assert res.tokens_B.tolist() == [8, 4, 1, 0]
    with torch.no_grad():
        logp = torch.log_softmax(model(batch.ids_BL[:, :-1]).double(), -1)
    for b in range(4):
        ref = -sum(float(logp[b, i - 1, batch.ids_BL[b, i]]) for i in range(1, 9) if batch.mask_BL[b, i])
        assert float(res.nats_B[b]) == pytest.approx(ref, rel=1e-12, abs=1e-12)
    # the mean loss is the token-weighted mean of the nll
    loss, _ = proc.loss(model, batch)
    assert loss.item() == pytest.approx(float(res.nats_B.sum() / res.tokens_B.sum()), rel=1e-5)


@pytest.mark.parametrize("which", BACKBONES)
def test_probabilities_of_all_continuations_sum_to_one(which):
    V, L = 3, 4
    model = _model(which, V)
    proc = _ar(V)
    rows = [(0, *rest) for rest in itertools.product(range(V), repeat=L - 1)]
    ids = torch.tensor(rows)
    res = proc.nll(model, Batch(ids, torch.ones_like(ids, dtype=torch.bool)))
    assert res.tokens_B.eq(L - 1).all()
    probs = torch.exp(-res.nats_B)
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-9)
    assert float(probs.max() / probs.min()) > 2  # far from uniform, so the identity is not trivial


# ------------------------------------------------------------------------------------------------ sampling


@pytest.mark.parametrize("which", BACKBONES)
def test_cache_and_no_cache_draw_identical_samples(which):
    V = 11
    model = _model(which, V)
    proc = _ar(V, eos=1)
    kw = dict(prompt_ids=[3, 4, 5], temperature=0.9, top_p=0.95, top_k=8)
    a = proc.sample(model, 16, 14, generator=torch.Generator().manual_seed(0), **kw)
    b = proc.sample(model, 16, 14, generator=torch.Generator().manual_seed(0), use_cache=False, **kw)
    assert torch.equal(a.ids_NL, b.ids_NL) and torch.equal(a.lengths_N, b.lengths_N) and a.nfe == b.nfe
    assert a.ids_NL.shape == (16, 14) and a.ids_NL.dtype == torch.int64
    assert (a.ids_NL[:, :3] == torch.tensor([3, 4, 5])).all() and a.prompt_len == 3
    assert a.ids_NL[:, 3:].unique().numel() >= 5  # a varied distribution, so the equality is not trivial
    c = proc.sample(model, 16, 14, generator=torch.Generator().manual_seed(1), **kw)
    assert not torch.equal(a.ids_NL, c.ids_NL)


def test_eos_stops_a_row_and_pads_the_rest():
    V, P, length = 6, 1, 12
    model = ConstantLM([0.1, 0.2, 0.1, 0.3, 0.1, 0.2])  # eos = 1 with probability 0.2, pad = 2
    proc = _ar(V, eos=1, pad=2)
    out = proc.sample(model, 64, length, generator=torch.Generator().manual_seed(0))
    ids, lengths = out.ids_NL, out.lengths_N
    assert (ids[:, 0] == 0).all() and out.prompt_len == P
    for row, n, stop in zip(ids.tolist(), lengths.tolist(), out.stop_N):
        eos_at = [i for i in range(P, length) if row[i] == 1]
        assert n == (eos_at[0] + 1 if eos_at else length)
        assert all(t == 2 for t in row[n:])
        assert stop == ("eos" if eos_at else "length")  # what ended the row is recorded
    assert (lengths < length).any() and (lengths == length).any()
    # one forward per sampled position: the prefill, then one per token until every row stopped
    assert out.nfe == int(lengths.max()) - P == model.calls


def test_nfe_counts_forward_calls():
    model, proc = TinyCausalLM(7), _ar(7, eos=1)
    out = proc.sample(model, 4, 10, prompt_ids=[3, 4], stop_at_eos=False, generator=torch.Generator().manual_seed(0))
    assert out.nfe == 8 == model.calls and (out.lengths_N == 10).all()
    model.calls = 0
    out = proc.sample(model, 4, 10, prompt_ids=[3, 4], stop_at_eos=False, use_cache=False)
    assert out.nfe == 8 == model.calls


@pytest.mark.parametrize("which", BACKBONES)
def test_samples_follow_the_model_distribution(which):
    V, N = 3, 20000
    model, proc = _model(which, V, seed=3), _ar(V, eos=1)
    out = proc.sample(model, N, 3, stop_at_eos=False, generator=torch.Generator().manual_seed(0))
    rows = [(0, a, b) for a in range(V) for b in range(V)]
    ids = torch.tensor(rows)
    p = torch.exp(-proc.nll(model, Batch(ids, torch.ones_like(ids, dtype=torch.bool))).nats_B)
    code = out.ids_NL[:, 1] * V + out.ids_NL[:, 2]
    counts = torch.bincount(code, minlength=V * V).double()
    chi2 = float(((counts - N * p) ** 2 / (N * p)).sum())
    assert chi2 < 26.12  # 8 degrees of freedom, P(chi2 > 26.12) = 0.001


def test_greedy_sampling_is_argmax_of_the_prefix():
    model, proc = TinyCausalLM(9), _ar(9, eos=1)
    out = proc.sample(model, 2, 8, prompt_ids=[4], temperature=0.0, stop_at_eos=False)
    ids = out.ids_NL[0]
    for i in range(1, 8):
        assert int(ids[i]) == int(model(ids[None, :i])[0, -1].argmax())


def test_sampling_input_errors():
    model = TinyCausalLM(7, context=10)
    proc = _ar(7)
    with pytest.raises(DlmError, match=r"sampler 'ddpm'.*ancestral"):
        proc.sample(model, 2, 5, sampler="ddpm")
    with pytest.raises(DlmError, match="context"):
        proc.sample(model, 2, 11)
    with pytest.raises(DlmError, match="prompt length"):
        proc.sample(model, 2, 3, prompt_ids=[3, 4, 5])
    with pytest.raises(DlmError, match="prompt ids"):
        proc.sample(model, 2, 5, prompt_ids=[3, 9])
    with pytest.raises(DlmError, match="steps"):
        proc.sample(model, 2, 5, steps=3)
    with pytest.raises(DlmError, match="BOS"):
        _ar(7, bos=None).sample(model, 2, 5)
    assert _ar(7, bos=None).sample(model, 2, 5, prompt_ids=[3]).ids_NL.shape == (2, 5)


def test_sampling_restores_training_mode():
    model = TinyCausalLM(7).train()
    _ar(7).sample(model, 2, 4)
    assert model.training


# ------------------------------------------------------------------------------------------------ registry


def test_unknown_process_lists_the_registered_ones():
    with pytest.raises(DlmError, match=r"unknown process 'nope'.*\bar\b"):
        get_process(ProcessConfig(name="nope"), _specials(7))
    assert issubclass(ARProcess, Process)


# ---------------------------------------------------------------------------------------------- evaluation


class _FixedNLL(Process):
    name = "fixed-test"
    exact_likelihood = False
    samplers = ()
    default_sampler = ""

    def __init__(self, results):
        self.results = iter(results)

    attention = "bidirectional"

    def loss(self, model, batch, generator=None):
        raise NotImplementedError

    def nll(self, model, batch, generator=None):
        return next(self.results)

    def sample(self, model, n, length, **kw):
        raise NotImplementedError


def test_evaluate_nll_formulas_on_handmade_results():
    results = [
        NLLResult(torch.tensor([2.0, 6.0], dtype=torch.float64), torch.tensor([1, 3]), exact=False),
        NLLResult(torch.tensor([4.0, 0.0], dtype=torch.float64), torch.tensor([4, 0]), exact=False),
    ]
    batch = _padded_batch()
    model = TinyCausalLM(7).train()
    out = evaluate_nll(_FixedNLL(results), model, [batch, batch])
    assert model.training
    # a = [2, 6, 4], t = [1, 3, 4]: nll = 12 / 8
    assert out["nll"] == 1.5 and out["tokens"] == 8 and out["sequences"] == 3
    assert out["bpt"] == pytest.approx(1.5 / math.log(2), rel=1e-15)
    assert out["ppl"] == pytest.approx(math.exp(1.5), rel=1e-15)
    assert out["ppl_seq_mean"] == pytest.approx((math.exp(2) + math.exp(2) + math.exp(1)) / 3, rel=1e-14)
    # residuals a - 1.5 t = [0.5, 1.5, -2]: se = sqrt(3/2 * 6.5) / 8
    assert out["nll_se"] == pytest.approx(math.sqrt(1.5 * 6.5) / 8, rel=1e-14)
    assert out["exact"] is False and out["bound"] == "<="


def test_evaluate_nll_with_ar_matches_hand_computation():
    model, proc = TinyCausalLM(7), _ar(7)
    batches = [_padded_batch(seed=0), _padded_batch(seed=1, B=3), _padded_batch(seed=2)]
    out = evaluate_nll(proc, model, batches, max_batches=2)
    nats, toks = [], []
    for batch in batches[:2]:
        with torch.no_grad():
            logp = torch.log_softmax(model(batch.ids_BL[:, :-1]).double(), -1)
        for b in range(batch.ids_BL.shape[0]):
            scored = [i for i in range(1, batch.ids_BL.shape[1]) if batch.mask_BL[b, i]]
            if scored:
                nats.append(-sum(float(logp[b, i - 1, batch.ids_BL[b, i]]) for i in scored))
                toks.append(len(scored))
    nll = sum(nats) / sum(toks)
    assert out["tokens"] == sum(toks) == 13 + 13 and out["sequences"] == len(toks) == 6
    assert out["nll"] == pytest.approx(nll, rel=1e-12)
    assert out["bpt"] == pytest.approx(nll / math.log(2), rel=1e-12)
    assert out["ppl"] == pytest.approx(math.exp(nll), rel=1e-12)
    assert out["exact"] is True and out["bound"] == "="


def test_bits_per_byte_and_atomic_json(tmp_path):
    assert bits_per_byte(2.0, 100, 400) == pytest.approx(200 / (math.log(2) * 400), rel=1e-15)
    with pytest.raises(DlmError):
        bits_per_byte(2.0, 100, 0)
    path = tmp_path / "eval" / "nll.json"
    write_json_atomic(path, {"nll": 1.5, "bound": "<="})
    write_json_atomic(path, {"nll": 1.25})
    assert json.loads(path.read_text()) == {"nll": 1.25}
    assert [p.name for p in path.parent.iterdir()] == ["nll.json"]


def test_summary_of_a_huge_bound_does_not_overflow():
    from dlm.eval.likelihood import summarize_nll

    out = summarize_nll(torch.tensor([8000.0, 9000.0], dtype=torch.float64), torch.tensor([10, 10]), exact=False)
    assert out["nll"] == 850.0 and out["ppl"] is None and out["ppl_seq_mean"] is None
    assert summarize_nll(torch.tensor([1.0, 3.0], dtype=torch.float64), torch.tensor([1, 1]), True)["ppl"] == (
        pytest.approx(math.exp(2.0))
    )
