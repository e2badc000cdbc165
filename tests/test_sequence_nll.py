"""One NLL loop (dlm.eval.likelihood.sequence_nll) behind training validation, `dlm eval` and the formal
experiment: on the same batches each path gives exactly the per-sequence sums of ``process.nll`` under its own
noise arrangement, and for AR (no noise) the three agree as numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dlm.data.batch import Batch
from dlm.data.loader import Loader
from dlm.data.shards import open_split
from dlm.eval.likelihood import evaluate_nll, sequence_nll
from dlm.experiment.formal import symbol_nats
from dlm.rundir import load_run
from dlm.train.loop import validate
from dlm.train.runtime import Runtime, derive_seed

SEED = 5


def _batches(data: Path, n: int, eos: int | None = None) -> list[Batch]:
    out = []
    for b in Loader(open_split(data, "validation"), 4, shuffle=False, infinite=False):
        out.append(b if eos is None else Batch(b.ids_BL, b.mask_BL & (b.ids_BL != eos)))
        if len(out) == n:
            break
    return out


def _reference(run, batches: list[Batch], gen_of) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """process.nll batch by batch, written out: per-sequence nats (float64) and scored tokens of each batch."""
    nats, toks = [], []
    with torch.no_grad():
        for i, b in enumerate(batches):
            r = run.process.nll(run.model, b, generator=gen_of(i))
            nats.append(r.nats_B)
            toks.append(r.tokens_B)
    return nats, toks


@pytest.mark.parametrize("which", ["tiny_ar_run", "tiny_mdlm_run"])
def test_each_path_is_the_per_sequence_sum_of_process_nll(which, request, tiny_data):
    run = load_run(request.getfixturevalue(which))
    batches = _batches(tiny_data, 3)

    # training validation: batch i draws its noise from a generator seeded by (seed, "validation", i)
    nats, toks = _reference(run, batches, lambda i: torch.Generator().manual_seed(derive_seed(SEED, "validation", i)))
    total = torch.zeros((), dtype=torch.float64)
    for n in nats:
        total += n.sum()
    v = validate(run.model, run.process, batches, Runtime(torch.device("cpu")), SEED)
    assert v["val_nll"] == float(total) / float(sum(int(t.sum()) for t in toks))
    assert v["val_tokens"] == sum(int(t.sum()) for t in toks) and v["exact"] is run.process.exact_likelihood

    # dlm eval: one generator, drawn from batch after batch; the model's mode is restored
    shared = torch.Generator().manual_seed(SEED)
    nats, toks = _reference(run, batches, lambda i: shared)
    run.model.train()
    rec = evaluate_nll(run.process, run.model, batches, generator=torch.Generator().manual_seed(SEED))
    assert run.model.training
    run.model.eval()
    assert rec["nats"] == float(torch.cat(nats).sum()) and rec["tokens"] == int(torch.cat(toks).sum())
    results = sequence_nll(run.process, run.model, batches, generator=torch.Generator().manual_seed(SEED))
    assert all(torch.equal(r.nats_B, n) for r, n in zip(results, nats, strict=True))

    # the formal experiment: every row of the split in batches of 100, EOS not scored, passes drawing on in turn
    split = open_split(tiny_data, "validation")
    eos = split.specials.eos
    all_rows = [
        Batch(b.ids_BL, b.mask_BL & (b.ids_BL != eos)) for b in Loader(split, 100, shuffle=False, infinite=False)
    ]
    shared = torch.Generator().manual_seed(SEED)
    expected = [torch.cat(_reference(run, all_rows, lambda i: shared)[0]) for _ in range(2)]
    nats_PS, tokens_S = symbol_nats(run.process, run.model, split, 2, torch.Generator().manual_seed(SEED))
    assert torch.equal(nats_PS, torch.stack(expected))
    assert torch.equal(tokens_S, torch.cat(_reference(run, all_rows, lambda i: None)[1]))


def test_ar_validation_eval_and_experiment_agree(tiny_ar_run, tiny_data):
    """AR's likelihood is exact and noise-free: the three paths give the same NLL per token on the same rows."""
    run = load_run(tiny_ar_run)
    split = open_split(tiny_data, "validation")
    eos = split.specials.eos
    rows = [Batch(b.ids_BL, b.mask_BL & (b.ids_BL != eos)) for b in Loader(split, 100, shuffle=False, infinite=False)]
    nats_PS, tokens_S = symbol_nats(run.process, run.model, split, 1, torch.Generator().manual_seed(0))
    experiment = float(nats_PS.sum()) / int(tokens_S.sum())
    v = validate(run.model, run.process, rows, Runtime(torch.device("cpu")), SEED)["val_nll"]
    e = evaluate_nll(run.process, run.model, rows)["nll"]
    assert v == pytest.approx(experiment, rel=1e-12) and e == pytest.approx(experiment, rel=1e-12)
    assert 0 < experiment < 10
