"""Generative perplexity: how likely a judge finds generated samples (issue 12).

A judge is anything with ``token_nll(ids_list) -> (nats_S, tokens_S)`` (:class:`Judge`): for each sample s (the
generated token ids, no prompt, no padding) a_s = -ln p_judge(x_s | document boundary) in nats (float64) and t_s,
the number of tokens it scored. :func:`gen_ppl_summary` turns them into

    gen_ppl_seq_mean = (1/n) sum_s exp(a_s / t_s)      mean over samples of the per-sample perplexity
    gen_ppl_pooled   = exp(A / T),  A = sum_s a_s, T = sum_s t_s     perplexity of the pooled per-token NLL

with the delta-method standard error of A / T (``dlm.eval.likelihood.summarize_nll``).

:class:`ARRunJudge` is a trained dlm run with an exact likelihood (AR). A judge reading a local transformers
causal-LM directory belongs next to it: it must decode each sample to text with the arms' tokenizer, re-encode
the text with its own tokenizer (recording the judge's tokenizer and this retokenisation rule), prepend its own
BOS/EOS as the context token, score every retokenised token, refuse text its tokenizer cannot represent, and
return nats per sample and its own token counts (so its gen PPL is per judge token, not per arm token).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from dlm.data.batch import Batch
from dlm.errors import DlmError
from dlm.eval.diversity import as_ids
from dlm.eval.likelihood import summarize_nll


class Judge(Protocol):
    """Scores samples: per sample the nats (float64 [S]) and the number of scored tokens (int64 [S])."""

    def token_nll(self, ids_list: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]: ...


class ARRunJudge:
    """A loaded dlm run with an exact likelihood (``dlm.rundir.load_run``) as judge.

    Each sample x = (x_1, ..., x_m) becomes the row (b, x_1, ..., x_m), b the run's document boundary
    (``dlm.eval.run.boundary_id``: EOS in ``wrap`` data, else BOS when the tokenizer has one); rows of a batch are
    right-padded with PAD (mask False). ``process.nll`` scores positions 1..m of the row (position 0 is context,
    ``scored_positions``), so every generated token is scored:

        a_s = -sum_{i=1..m} ln p(x_i | b, x_1, ..., x_{i-1}),   t_s = m

    Attention is causal, so right padding never changes a sample's score. An empty sample scores a_s = 0, t_s = 0.

    Context rule: a row (1 + m tokens) may not exceed the judge's ``context`` (the row length it was trained on);
    a longer sample is refused with a DlmError (no sliding window: the judge would then score tokens with a
    truncated history, a different quantity).
    """

    def __init__(
        self, model: torch.nn.Module, process: Any, boundary_id: int, context: int, batch_size: int = 32
    ) -> None:
        if not getattr(process, "exact_likelihood", False):
            raise DlmError("a judge run needs an exact likelihood (an AR run); this process gives a bound")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DlmError(f"judge batch_size must be an integer >= 1, got {batch_size!r}")
        assert context >= 2, context
        self.model = model
        self.process = process
        self.boundary_id = int(boundary_id)
        self.context = int(context)
        self.batch_size = batch_size
        self.vocab_size = int(process.specials.vocab_size)

    @classmethod
    def from_run(cls, run: Any, batch_size: int = 32) -> ARRunJudge:
        """The judge of a ``LoadedRun``: its model, process, document boundary and model context."""
        from dlm.eval.run import boundary_id

        head = boundary_id(run.data_meta, run.process.specials)
        return cls(run.model, run.process, head, int(run.cfg.model.context), batch_size=batch_size)

    def rows(self, ids_list: Sequence[Any]) -> list[list[int]]:
        """The judge's rows (boundary + sample), checked against its vocabulary and context."""
        rows: list[list[int]] = []
        for s, sample in enumerate(ids_list):
            ids = as_ids(sample)
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise DlmError(f"sample {s} holds id {bad[0]} outside the judge's vocabulary [0, {self.vocab_size})")
            if 1 + len(ids) > self.context:
                raise DlmError(
                    f"sample {s} has {len(ids)} tokens; the judge scores at most {self.context - 1} "
                    f"(its context {self.context} less the boundary token)"
                )
            rows.append([self.boundary_id, *ids])
        return rows

    def token_nll(self, ids_list: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(nats float64 [S], scored tokens int64 [S]) of the samples, ``batch_size`` rows per forward pass."""
        rows = self.rows(ids_list)
        if not rows:
            return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.int64)
        device = next(self.model.parameters()).device
        pad = int(self.process.specials.pad)
        nats, toks = [], []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for i in range(0, len(rows), self.batch_size):
                    chunk = rows[i : i + self.batch_size]
                    width = max(2, max(len(r) for r in chunk))
                    ids_BL = torch.full((len(chunk), width), pad, dtype=torch.int64)
                    mask_BL = torch.zeros((len(chunk), width), dtype=torch.bool)
                    for b, r in enumerate(chunk):
                        ids_BL[b, : len(r)] = torch.tensor(r, dtype=torch.int64)
                        mask_BL[b, : len(r)] = True
                    result = self.process.nll(self.model, Batch(ids_BL, mask_BL).to(device))
                    assert result.exact
                    nats.append(result.nats_B.to(torch.float64).cpu())
                    toks.append(result.tokens_B.to(torch.int64).cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(nats), torch.cat(toks)


GEN_PPL_DEFINITIONS: dict[str, str] = {
    "gen_ppl_seq_mean": "mean over samples of exp(a_s / t_s): a_s the judge's NLL of sample s in nats, t_s its "
    "scored tokens",
    "gen_ppl_pooled": "exp(A / T), A = sum_s a_s, T = sum_s t_s (null if it overflows)",
    "nll": "A / T, the judge's pooled NLL in nats per token",
    "nll_se": "delta-method standard error of A / T over samples: sqrt(n/(n-1) sum_s (a_s - nll t_s)^2) / T; "
    "null if n < 2",
    "nats": "A",
    "tokens": "T",
    "samples": "n, the samples with at least one scored token (the others are left out of every figure)",
    "samples_unscored": "samples with no scored token (empty)",
}


def gen_ppl_summary(nats: Any, tokens: Any) -> dict[str, Any]:
    """Generative perplexity figures (``GEN_PPL_DEFINITIONS``, also under ``definitions``) from per-sample nats
    and scored-token counts. DlmError when the lengths differ or no token was scored."""
    nats_S = torch.as_tensor(nats, dtype=torch.float64).reshape(-1)
    tokens_S = torch.as_tensor(tokens, dtype=torch.int64).reshape(-1)
    if nats_S.shape != tokens_S.shape:
        raise DlmError(f"gen_ppl_summary got {nats_S.numel()} NLLs for {tokens_S.numel()} token counts")
    if bool((tokens_S < 0).any()) or not bool(torch.isfinite(nats_S).all()):
        raise DlmError("gen_ppl_summary needs finite NLLs and non-negative token counts")
    s = summarize_nll(nats_S, tokens_S, exact=True)
    out = {
        "gen_ppl_seq_mean": s["ppl_seq_mean"],
        "gen_ppl_pooled": s["ppl"],
        "nll": s["nll"],
        "nll_se": s["nll_se"],
        "nats": s["nats"],
        "tokens": s["tokens"],
        "samples": s["sequences"],
        "samples_unscored": int((tokens_S == 0).sum()),
    }
    assert set(out) == set(GEN_PPL_DEFINITIONS)
    assert out["gen_ppl_pooled"] is None or math.isfinite(out["gen_ppl_pooled"])
    return {**out, "definitions": dict(GEN_PPL_DEFINITIONS)}
