"""Generative perplexity (dlm.eval.genppl): the AR judge against the process's own NLL and a direct
log-softmax, padding invariance, the context rule, and gen_ppl_summary against hand-computed numbers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dlm.data.batch import Batch
from dlm.data.specials import SpecialIds
from dlm.errors import DlmError
from dlm.eval.genppl import GEN_PPL_DEFINITIONS, ARRunJudge, gen_ppl_summary
from dlm.model import build_model
from dlm.model.config import ModelConfig
from dlm.process import ProcessConfig, get_process

K, CONTEXT = 12, 16
SPECIALS = SpecialIds(bos=0, eos=1, pad=2, mask=K, vocab_size=K)
SAMPLES = [[5, 6, 7], [3, 4, 5, 6, 7, 8, 9, 10, 11, 3], [], [9], [11, 11, 11, 11, 4, 4]]


@pytest.fixture(scope="module")
def judge() -> ARRunJudge:
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=K, context=CONTEXT, n_layer=1, d_model=16, n_head=2)).eval()
    return ARRunJudge(model, get_process(ProcessConfig(name="ar"), SPECIALS), SPECIALS.bos, CONTEXT)


def _direct_nats(judge: ARRunJudge, sample: list[int]) -> float:
    """-sum_i ln softmax(model(b, x_<i))[x_i] in float64, from the model's logits of the unpadded row."""
    row = torch.tensor([[SPECIALS.bos, *sample]])
    with torch.no_grad():
        logits = judge.model(row[:, :-1], attn="causal")
    logp = torch.log_softmax(logits.to(torch.float64), -1)[0]
    return -float(logp.gather(-1, row[0, 1:, None]).sum())


def test_judge_equals_process_nll_and_direct(judge: ARRunJudge) -> None:
    nats, toks = judge.token_nll(SAMPLES)
    assert nats.dtype == torch.float64 and toks.dtype == torch.int64
    assert toks.tolist() == [len(s) for s in SAMPLES]
    # the same rows, built by hand: boundary + sample, right-padded with PAD, mask on the real tokens
    width = 1 + max(len(s) for s in SAMPLES)
    ids_BL = torch.full((len(SAMPLES), width), SPECIALS.pad, dtype=torch.int64)
    mask_BL = torch.zeros_like(ids_BL, dtype=torch.bool)
    for b, sample in enumerate(SAMPLES):
        ids_BL[b, : 1 + len(sample)] = torch.tensor([SPECIALS.bos, *sample])
        mask_BL[b, : 1 + len(sample)] = True
    with torch.no_grad():
        ref = judge.process.nll(judge.model, Batch(ids_BL, mask_BL))
    assert torch.equal(nats, ref.nats_B) and torch.equal(toks, ref.tokens_B)
    for s, sample in enumerate(SAMPLES):
        if not sample:
            assert float(nats[s]) == 0.0
            continue
        assert float(nats[s]) == pytest.approx(_direct_nats(judge, sample), rel=1e-5)


def test_padding_does_not_change_a_score(judge: ARRunJudge) -> None:
    batched, _ = judge.token_nll(SAMPLES)
    for s, sample in enumerate(SAMPLES):
        alone, toks = judge.token_nll([sample])
        assert float(alone[0]) == pytest.approx(float(batched[s]), rel=1e-6, abs=1e-9)
        assert int(toks[0]) == len(sample)
    small = ARRunJudge(judge.model, judge.process, SPECIALS.bos, CONTEXT, batch_size=2)
    torch.testing.assert_close(small.token_nll(SAMPLES)[0], batched, rtol=1e-6, atol=1e-9)


def test_context_rule(judge: ARRunJudge) -> None:
    longest = [3 + t % (K - 3) for t in range(CONTEXT - 1)]
    assert judge.token_nll([longest])[1].tolist() == [CONTEXT - 1]
    with pytest.raises(DlmError, match="at most 15"):
        judge.token_nll([[5] * CONTEXT])


def test_bad_input(judge: ARRunJudge) -> None:
    with pytest.raises(DlmError, match="outside the judge's vocabulary"):
        judge.token_nll([[3, K]])
    with pytest.raises(DlmError):
        judge.token_nll([[3, 1.5]])
    assert judge.token_nll([])[0].numel() == 0
    mdlm = get_process(ProcessConfig(name="mdlm"), SPECIALS)
    with pytest.raises(DlmError, match="exact likelihood"):
        ARRunJudge(judge.model, mdlm, SPECIALS.bos, CONTEXT)
    with pytest.raises(DlmError, match="batch_size"):
        ARRunJudge(judge.model, judge.process, SPECIALS.bos, CONTEXT, batch_size=0)


def test_gen_ppl_summary_hand_computed() -> None:
    # per-sample NLLs 2/2 = 1 and 6/3 = 2; pooled 8/5; the empty sample is left out
    s = gen_ppl_summary([2.0, 6.0, 0.0], [2, 3, 0])
    assert s["gen_ppl_seq_mean"] == pytest.approx((math.e + math.e**2) / 2)
    assert s["gen_ppl_pooled"] == pytest.approx(math.exp(1.6))
    assert s["nll"] == pytest.approx(1.6)
    # residuals a_s - 1.6 t_s = -1.2, +1.2: sqrt(2/1 * 2.88) / 5 = 2.4 / 5
    assert s["nll_se"] == pytest.approx(0.48)
    assert (s["nats"], s["tokens"], s["samples"], s["samples_unscored"]) == (8.0, 5, 2, 1)
    assert set(s["definitions"]) == set(GEN_PPL_DEFINITIONS) == set(s) - {"definitions"}
    one = gen_ppl_summary([3.0], [3])
    assert one["gen_ppl_seq_mean"] == pytest.approx(math.e) and one["nll_se"] is None


def test_gen_ppl_summary_bad_input() -> None:
    with pytest.raises(DlmError):
        gen_ppl_summary([1.0, 2.0], [1])
    with pytest.raises(DlmError):
        gen_ppl_summary([0.0], [0])
    with pytest.raises(DlmError):
        gen_ppl_summary([float("nan")], [1])


def test_from_a_trained_run(tiny_ar_run: Path) -> None:
    from dlm.rundir import load_run

    run = load_run(tiny_ar_run)
    judge = ARRunJudge.from_run(run)
    eos, bos = run.process.specials.eos, run.process.specials.bos
    assert judge.boundary_id == (eos if run.data_meta["mode"] == "wrap" or bos is None else bos)
    assert judge.context == run.cfg.model.context
    sample = [ord(c) for c in "the cat sat"]
    nats, toks = judge.token_nll([sample])
    row = torch.tensor([[judge.boundary_id, *sample]])
    ref = run.process.nll(run.model, Batch(row, torch.ones_like(row, dtype=torch.bool)))
    assert int(toks[0]) == len(sample)
    assert float(nats[0]) == pytest.approx(float(ref.nats_B[0]), rel=1e-9)
    # a trained judge prefers text to noise
    noise = [200, 17, 250, 3, 199, 88, 240, 5, 131, 66, 9]
    assert float(judge.token_nll([noise])[0][0]) > float(nats[0])
