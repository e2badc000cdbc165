"""Autoregressive language modelling: next-token loss, exact likelihood, KV-cache sampling.

    -log p(x) = sum_{i=2..L} -log p_theta(x^i | x^<i)

The first token of a row has no context and is not scored: rows start with BOS (``pad`` shards) or in the
middle of a stream (``wrap`` shards), and in both cases the model predicts positions 2..L only (0-based 1..L-1,
``base.scored_positions``: the same tokens every diffusion family scores).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from dlm.data.batch import Batch
from dlm.errors import DlmError
from dlm.process.base import AttnSpec, NLLResult, Process, SampleResult, register_process, scored_positions
from dlm.process.sampling import sample_categorical

_CHUNK_ELEMENTS = 1 << 24  # float64 log-softmax in chunks of at most this many logits (128 MiB)


def _model_context(model: torch.nn.Module) -> int | None:
    """Longest sequence the model accepts, when it says (``model.cfg.context`` or ``model.context``)."""
    for holder in (model, getattr(model, "cfg", None), getattr(model, "config", None)):
        context = getattr(holder, "context", None)
        if isinstance(context, int):
            return context
    return None


def _device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _token_logprobs(logits_NV: Tensor, targets_N: Tensor) -> Tensor:
    """log softmax(logits)[target] in float64, in chunks so a 50K vocabulary stays within memory."""
    out = torch.empty(targets_N.shape[0], dtype=torch.float64, device=logits_NV.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, logits_NV.shape[-1]))
    for s in range(0, targets_N.shape[0], step):
        chunk = logits_NV[s : s + step].to(torch.float64)
        picked = chunk.gather(1, targets_N[s : s + step, None]).squeeze(1)
        out[s : s + step] = picked - torch.logsumexp(chunk, dim=-1)
    return out


@register_process
class ARProcess(Process):
    """Causal next-token prediction with the backbone in causal attention mode, no time input."""

    name: ClassVar[str] = "ar"
    absorbing: ClassVar[bool] = False
    exact_likelihood: ClassVar[bool] = True
    conditioning: ClassVar[str] = "prefix"
    step_sampler: ClassVar[bool] = False
    samplers: ClassVar[tuple[str, ...]] = ("ancestral",)
    default_sampler: ClassVar[str] = "ancestral"

    def __init__(self, cfg: Any, specials: Any) -> None:
        super().__init__(cfg, specials)
        if cfg.time_cond:
            raise DlmError("the AR family has no time conditioning: leave process.time_cond unset or false")

    @property
    def attention(self) -> AttnSpec:
        return "causal"

    def _shifted(self, model: torch.nn.Module, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """Logits for positions 1..L-1 given the prefix, their targets and which of them are scored."""
        ids_BL = batch.ids_BL
        if ids_BL.ndim != 2 or ids_BL.shape[1] < 2:
            raise DlmError(f"AR needs rows of at least 2 tokens, got ids of shape {tuple(ids_BL.shape)}")
        logits_BLV = model(ids_BL[:, :-1], attn="causal")
        return logits_BLV, ids_BL[:, 1:], scored_positions(batch)[:, 1:]

    def loss(
        self, model: torch.nn.Module, batch: Batch, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """Mean next-token cross-entropy over the scored targets (nats/token).

            loss = (1 / |S|) sum_{(b, i) in S} -log softmax(f_theta(x_b^{<i}))[x_b^i],
            S = {(b, i) : i >= 2, mask_b^i}

        Padding targets are excluded; as attention is causal, padding (at the end of a row) never reaches
        a scored position. Stats: ``nll`` (the loss value) and ``tokens`` (|S|).
        """
        logits_BLV, targets_BL, scored_BL = self._shifted(model, batch)
        V = logits_BLV.shape[-1]
        ce_BL = F.cross_entropy(logits_BLV.float().reshape(-1, V), targets_BL.reshape(-1), reduction="none").view_as(
            targets_BL
        )
        count = scored_BL.sum()
        loss = (ce_BL * scored_BL).sum() / count.clamp(min=1)
        return loss, {"nll": float(loss.detach()), "tokens": float(count)}

    @torch.no_grad()
    def nll(self, model: torch.nn.Module, batch: Batch, generator: torch.Generator | None = None) -> NLLResult:
        """Exact per-sequence NLL: nats_b = sum_{i >= 2, mask_b^i} -log p_theta(x_b^i | x_b^{<i}).

        log-softmax is taken in float64 from the model's float32 logits (chunked over tokens), so the sums
        are exact to float64 rounding given the logits; tokens_b counts the scored targets (the first token
        of each row is context only).
        """
        logits_BLV, targets_BL, scored_BL = self._shifted(model, batch)
        logp_S = _token_logprobs(logits_BLV[scored_BL], targets_BL[scored_BL])
        nats_BL = torch.zeros(targets_BL.shape, dtype=torch.float64, device=logp_S.device)
        nats_BL[scored_BL] = -logp_S
        return NLLResult(nats_B=nats_BL.sum(1), tokens_B=scored_BL.sum(1).to(torch.int64), exact=True)

    @torch.no_grad()
    def sample(
        self,
        model: torch.nn.Module,
        n: int,
        length: int,
        *,
        sampler: str | None = None,
        prompt_ids: list[int] | None = None,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        use_cache: bool = True,
        stop_at_eos: bool = True,
        **opts: Any,
    ) -> SampleResult:
        """Ancestral sampling x^i ~ p_theta(. | x^{<i}) token by token, n rows in one batch.

        The prompt (default: [BOS]) is prefilled in one forward; each further token costs one forward of
        the newest token against the KV cache (``use_cache=False`` recomputes the whole prefix instead,
        drawing identical tokens from the same random stream). Every step draws one float64 uniform per
        row (``sampling.sample_categorical``: temperature, top_k, top_p). A row stops after emitting EOS
        (kept) when ``stop_at_eos``; later positions hold the pad id. Generation ends when every row has
        stopped or ``length`` tokens (prompt included) are reached.

        nfe counts forward calls: one per generated position before the loop ends, i.e. with G sampled
        positions nfe = G in both modes (cached: 1 prefill + G - 1 single-token steps; uncached: G full
        prefixes); no forward is spent after the last sampled token.
        """
        self.resolve_sampler(sampler)
        if opts:
            raise DlmError(f"unknown option(s) for the AR sampler: {', '.join(sorted(opts))}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DlmError(f"n must be a positive integer, got {n!r}")
        prompt = [int(t) for t in prompt_ids] if prompt_ids is not None else []
        if not prompt:
            if self.specials.bos is None:
                raise DlmError("this tokenizer has no BOS token; give a prompt (prompt_ids) to sample from")
            prompt = [self.specials.bos]
        V = self.specials.vocab_size
        if any(not 0 <= t < V for t in prompt):
            raise DlmError(f"prompt ids must lie in [0, {V})")
        P = len(prompt)
        if isinstance(length, bool) or not isinstance(length, int) or length <= P:
            raise DlmError(f"length ({length!r}) must be an integer larger than the prompt length ({P})")
        context = _model_context(model)
        if context is not None and length > context:
            raise DlmError(f"length {length} exceeds the model context of {context} tokens")

        device = _device(model)
        was_training = model.training
        model.eval()
        try:
            ids_NL = torch.full((n, length), self.specials.pad, dtype=torch.int64, device=device)
            ids_NL[:, :P] = torch.tensor(prompt, dtype=torch.int64, device=device)
            lengths_N = torch.full((n,), length, dtype=torch.int64, device=device)
            done_N = torch.zeros(n, dtype=torch.bool, device=device)
            cache = model.init_cache(n, length, device=device) if use_cache else None

            logits_NLV = model(ids_NL[:, :P], attn="causal", cache=cache)
            nfe = 1
            for pos in range(P, length):
                tok_N = sample_categorical(
                    logits_NLV[:, -1], temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
                )
                tok_N = torch.where(done_N, self.specials.pad, tok_N)
                ids_NL[:, pos] = tok_N
                if stop_at_eos:
                    stopped_N = ~done_N & (tok_N == self.specials.eos)
                    lengths_N[stopped_N] = pos + 1
                    done_N |= stopped_N
                if pos + 1 == length or bool(done_N.all()):
                    break
                if use_cache:
                    logits_NLV = model(ids_NL[:, pos : pos + 1], attn="causal", cache=cache)
                else:
                    logits_NLV = model(ids_NL[:, : pos + 1], attn="causal")
                nfe += 1
        finally:
            model.train(was_training)
        return SampleResult(ids_NL=ids_NL, lengths_N=lengths_N, nfe=nfe, prompt_len=P)
