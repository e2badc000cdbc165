"""The contract every registered process keeps, checked for each family (and each of its transitions) x sampler.

Built from the registry: a new family that registers itself gets these checks without a line here. Its own
identities (closed forms, agreement with other families) stay in its own test file.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

import dlm.process  # noqa: F401  (registers every family)
from dlm.config import config_hash, load_config
from dlm.data.batch import Batch
from dlm.data.specials import SpecialIds
from dlm.errors import DlmError
from dlm.model import ModelConfig, build_model
from dlm.process import Process, ProcessConfig, available_processes, get_process
from dlm.process.base import _REGISTRY, scored_positions

K, L, N = 11, 8, 3
SPECIALS = SpecialIds(bos=0, eos=1, pad=2, mask=K, vocab_size=K)
STEPS = 4  # a step sampler's steps in these checks (D3PM runs T = 8)


def _configs() -> list[ProcessConfig]:
    out = []
    for name in available_processes():
        for transition in _REGISTRY[name].transitions or (None,):
            extra = {"transition": transition} if transition else {}
            out.append(ProcessConfig(name=name, T=8, eval_t_samples=2, **extra))
    return out


def _label(cfg: ProcessConfig) -> str:
    return cfg.name + (f"-{cfg.transition}" if _REGISTRY[cfg.name].transitions else "")


CONFIGS = _configs()
CASES = [
    (cfg, sampler) for cfg in CONFIGS for sampler in get_process(cfg, SPECIALS).samplers
]  # every family x transition x sampler
CASE_IDS = [f"{_label(cfg)}-{sampler}" for cfg, sampler in CASES]


def _model(proc: Process, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=proc.vocab_size, context=L, n_layer=1, d_model=16, n_head=2, time_cond=proc.time_conditioned
    )
    return build_model(cfg)


def _batch() -> Batch:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, K, (4, L), generator=g)
    ids[:, 0] = SPECIALS.bos
    mask = torch.ones(4, L, dtype=torch.bool)
    mask[1, 5:] = False  # a padded row
    ids[1, 5:] = SPECIALS.pad
    return Batch(ids, mask)


def _process(cfg: ProcessConfig, sampler: str) -> Process:
    """The family; with a time-independent network when the sampler needs one (``SamplerSpec.time_independent``)."""
    proc = get_process(cfg, SPECIALS)
    if proc.sampler_specs()[sampler].time_independent and proc.time_conditioned:
        proc = get_process(ProcessConfig(**{**cfg.__dict__, "time_cond": False}), SPECIALS)
    return proc


def _opts(proc: Process, sampler: str) -> dict:
    return {"steps": STEPS} if proc.sampler_specs()[sampler].takes_steps else {}


def test_the_contract_covers_every_registered_family() -> None:
    assert {cfg.name for cfg in CONFIGS} == set(available_processes())
    assert {"ar", "d3pm", "mdlm", "sedd"} <= set(available_processes())
    assert all(get_process(cfg, SPECIALS).samplers for cfg in CONFIGS)


@pytest.mark.parametrize("cfg", CONFIGS, ids=[_label(c) for c in CONFIGS])
def test_loss_is_finite_and_differentiable(cfg: ProcessConfig) -> None:
    proc = get_process(cfg, SPECIALS)
    model = _model(proc).train()
    loss, stats = proc.loss(model, _batch(), torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and bool(torch.isfinite(loss))
    assert stats["tokens"] == float(scored_positions(_batch()).sum())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.parametrize("cfg", CONFIGS, ids=[_label(c) for c in CONFIGS])
def test_nll_is_labelled_as_the_family_declares(cfg: ProcessConfig) -> None:
    proc = get_process(cfg, SPECIALS)
    model = _model(proc).train()
    batch = _batch()
    out = proc.nll(model, batch, torch.Generator().manual_seed(0))
    assert out.exact is type(proc).exact_likelihood
    assert out.nats_B.dtype == torch.float64 and bool(torch.isfinite(out.nats_B).all())
    assert bool((out.nats_B >= 0).all())
    assert torch.equal(out.tokens_B, scored_positions(batch).sum(1).to(torch.int64))
    assert model.training  # nll leaves the mode as it found it


@pytest.mark.parametrize(("cfg", "sampler"), CASES, ids=CASE_IDS)
def test_samples_are_in_vocabulary_and_keep_the_conditioning(cfg: ProcessConfig, sampler: str) -> None:
    proc = _process(cfg, sampler)
    spec = proc.sampler_specs()[sampler]
    model = _model(proc).train()
    gen = torch.Generator().manual_seed(0)
    prompt = [SPECIALS.bos, 5]
    if proc.conditioning == "prefix":
        out = proc.sample(model, N, L, sampler=sampler, prompt_ids=prompt, generator=gen, **_opts(proc, sampler))
        with pytest.raises(DlmError, match="prompt only"):
            proc.sample(model, N, L, sampler=sampler, fixed_ids=torch.full((L,), -1), **_opts(proc, sampler))
    else:
        fixed = torch.full((L,), -1, dtype=torch.int64)
        fixed[L - 2] = 7
        out = proc.sample(
            model, N, L, sampler=sampler, prompt_ids=prompt, fixed_ids=fixed, generator=gen, **_opts(proc, sampler)
        )
        assert bool((out.ids_NL[:, L - 2] == 7).all())
        assert bool((out.lengths_N == L).all())
    assert model.training  # train mode restored
    assert out.ids_NL.shape == (N, L) and out.prompt_len == len(prompt)
    assert out.ids_NL[:, : len(prompt)].tolist() == [prompt] * N
    assert bool(((out.ids_NL >= 0) & (out.ids_NL < K)).all())  # in vocabulary, no MASK (id K) left
    assert out.nfe >= 1
    if spec.takes_steps and spec.nfe_within_steps:
        assert out.nfe <= STEPS
    if not spec.takes_steps:  # one call per generated token at most
        assert out.nfe <= L - len(prompt)
    model.eval()
    proc.sample(model, 1, L, sampler=sampler, prompt_ids=prompt, **_opts(proc, sampler))
    assert not model.training  # eval mode restored too
    if spec.steps_ignored:  # declared: the samples do not depend on steps (a comparison's sweep runs it once)
        opts = {k: v for k, v in _opts(proc, sampler).items() if k != "steps"}
        kw = dict(sampler=sampler, prompt_ids=prompt, **opts)
        a, b = (proc.sample(model, N, L, generator=torch.Generator().manual_seed(1), steps=k, **kw) for k in (2, STEPS))
        assert torch.equal(a.ids_NL, b.ids_NL) and a.nfe == b.nfe


def _one_line_error(fn, match: str) -> None:
    with pytest.raises(DlmError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("cfg", "sampler"), CASES, ids=CASE_IDS)
def test_bad_options_are_refused_in_one_line(cfg: ProcessConfig, sampler: str) -> None:
    proc = _process(cfg, sampler)
    spec = proc.sampler_specs()[sampler]
    model = _model(proc)
    opts = _opts(proc, sampler)
    _one_line_error(lambda: proc.sample(model, 1, L, sampler=sampler, beam=3, **opts), "unknown option")
    _one_line_error(lambda: proc.sample(model, 1, L, sampler=sampler, top_p=0.0, **opts), "top_p")
    _one_line_error(lambda: proc.sample(model, 1, L, sampler=sampler, temperature=-1.0, **opts), "temperature")
    _one_line_error(lambda: proc.sample(model, 0, L, sampler=sampler, **opts), "n must be")
    if proc.beyond_context:  # block by block past the context (BD3-LM): 2L is drawn, a length off the blocks is not
        assert proc.sample(model, 1, 2 * L, sampler=sampler, **opts).ids_NL.shape == (1, 2 * L)
        _one_line_error(lambda: proc.sample(model, 1, L + 1, sampler=sampler, **opts), "must divide the sample length")
    else:
        _one_line_error(lambda: proc.sample(model, 1, L + 1, sampler=sampler, **opts), "exceeds the model context")
    _one_line_error(lambda: proc.sample(model, 1, L, sampler="no-such-sampler"), "unknown sampler")
    if spec.takes_steps:
        _one_line_error(lambda: proc.sample(model, 1, L, sampler=sampler, steps=0), "steps")
    else:
        _one_line_error(lambda: proc.sample(model, 1, L, sampler=sampler, steps=4), "unknown option")


@pytest.mark.parametrize(
    ("cfg", "sampler"),
    [(c, s) for c, s in CASES if get_process(c, SPECIALS).sampler_specs()[s].time_independent],
    ids=[i for (c, s), i in zip(CASES, CASE_IDS) if get_process(c, SPECIALS).sampler_specs()[s].time_independent],
)
def test_a_cache_sampler_refuses_a_time_dependent_model(cfg: ProcessConfig, sampler: str) -> None:
    proc = get_process(ProcessConfig(**{**cfg.__dict__, "time_cond": True}), SPECIALS)
    assert proc.time_conditioned
    model = _model(proc)
    _one_line_error(lambda: proc.sample(model, 1, L, sampler=sampler, steps=STEPS), "time-independent")


# ------------------------------------------------------------------------------------- options at configuration time


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["--process.name", "ar", "--process.time_cond", "true"], "no time conditioning"),
        (["--process.name", "mdlm", "--process.eval_t_samples", "0"], "eval_t_samples"),
        (["--process.name", "mdlm", "--process.schedule", "nope"], "unknown schedule"),
        (["--process.name", "sedd", "--process.transition", "nope"], "transition"),
        (["--process.name", "d3pm", "--process.T", "0"], "process.T"),
        (["--process.name", "d3pm", "--process.hybrid_lambda", "-1"], "hybrid_lambda"),
    ],
)
def test_a_family_refuses_its_bad_options_when_the_config_is_validated(overrides: list[str], match: str) -> None:
    from dlm.config import load_config

    _one_line_error(lambda: load_config(None, overrides), match)


def test_every_family_accepts_its_defaults_and_fields_it_does_not_read_leave_the_hash() -> None:
    from dlm.config import HASHED_WHEN_SET, OPERATIONAL_KEYS, config_diff, config_hash, load_config

    for name in available_processes():
        load_config(None, ["--process.name", name])
    ar = load_config(None, ["--process.name", "ar"])
    ar_other = load_config(None, ["--process.name", "ar", "--process.schedule", "cosine", "--process.T", "7"])
    assert config_hash(ar) == config_hash(ar_other) and config_diff(ar, ar_other) == []
    mdlm = load_config(None, ["--process.name", "mdlm"])
    assert config_hash(mdlm) == config_hash(load_config(None, ["--process.name", "mdlm", "--process.T", "7"]))
    assert config_hash(mdlm) == config_hash(load_config(None, ["--process.name", "mdlm", "--process.sigma_max", "9"]))
    for change in (["--process.eps", "0.01"], ["--process.schedule", "cosine"], ["--process.eval_t_samples", "2"]):
        assert config_hash(mdlm) != config_hash(load_config(None, ["--process.name", "mdlm", *change]))
    d3pm = load_config(None, ["--process.name", "d3pm"])
    assert config_hash(d3pm) != config_hash(load_config(None, ["--process.name", "d3pm", "--process.T", "7"]))
    # a configuration whose unused fields are at their defaults hashes as before (existing run directories)
    for cfg in (ar, mdlm, d3pm):
        flat = {f"{s}.{k}": v for s, vals in cfg.to_dict().items() for k, v in vals.items()}
        flat = {k: v for k, v in flat.items() if k not in OPERATIONAL_KEYS and k not in HASHED_WHEN_SET}
        assert config_hash(cfg) == hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize(
    ("family", "pinned"),
    [
        ("ar", "0bd6338797252fef3fa310699c68aa637f4e3880992ed623ed3af5f0fb882fff"),
        ("mdlm", "388941328c920197f9dcedd2d840c96f653239b575a8fc5172bbb0a0e6ae329e"),
        ("d3pm", "0ccfc4efaffba732f693426fd752f08ea3ae71c15a8793a8d0df55b9f0f5bbd6"),
        ("sedd", "8fef9f183645e760932d8576b3a04393db4fd6ac86be062feb65d31c619a7ada"),
    ],
)
def test_config_hashes_of_existing_runs_never_change(family: str, pinned: str) -> None:
    """The tiny-cpu config hashes computed by the code before the BD3-LM fields were added (commit babd50d^): a new
    config key must not invalidate the resumption of every existing run (config.HASHED_WHEN_SET)."""
    assert config_hash(load_config("tiny-cpu", ["--process.name", family])) == pinned
    bd3 = load_config("tiny-cpu", ["--process.name", "bd3lm", "--process.block_size", "8"])
    assert config_hash(bd3) != config_hash(load_config("tiny-cpu", ["--process.name", "bd3lm"]))


# ------------------------------------------------------------------------------------------------------ transitions


@pytest.mark.parametrize("stream", ["continuous", "d3pm"])
@pytest.mark.parametrize("name", ["absorbing", "uniform"])
def test_a_transition_corrupts_only_the_scored_positions(name: str, stream: str) -> None:
    from dlm.process.transitions import get_transition

    tr = get_transition(name, SPECIALS, stream)
    assert tr.absorbing is (name == "absorbing") and tr.network_vocab == K + tr.absorbing
    batch = _batch()
    keep_BL = ~scored_positions(batch)
    x_BL = batch.ids_BL
    g = torch.Generator().manual_seed(0)
    assert torch.equal(tr.corrupt(x_BL, torch.ones(4, dtype=torch.float64), keep_BL, g), x_BL)  # alpha 1: clean
    z_BL = tr.corrupt(x_BL, torch.zeros(4, dtype=torch.float64), keep_BL, g)  # alpha 0: every scored one noised
    assert torch.equal(z_BL[keep_BL], x_BL[keep_BL])  # position 0 and padding kept
    if tr.absorbing:
        assert bool((z_BL[~keep_BL] == SPECIALS.mask).all())
        assert torch.equal(tr.loss_positions(z_BL, ~keep_BL), ~keep_BL)
        assert tr.prior_kl(0.0) == 0.0
    else:
        assert bool(((z_BL >= 0) & (z_BL < K)).all()) and bool((z_BL[~keep_BL] != x_BL[~keep_BL]).any())
        assert tr.prior_kl(0.0) == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(DlmError, match="transition"):
        get_transition("gaussian", SPECIALS)
