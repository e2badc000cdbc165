"""MDLM: continuous-time masked diffusion with the SUBS parameterisation (Sahoo et al. 2024, SPEC §3.4).

    NELBO(x) = E_{t ~ U[0,1]} E_{z_t ~ q(. | x)} [ w(t) sum_{l in S, z_t^l = m} -log p_theta(x^l | z_t) ],
    w(t) = -alpha'_t / (1 - alpha_t)            (= 1/t for the linear and loglinear schedules)

S = the scored positions (``base.scored_positions``): the real positions 1..L-1 of the row. Position 0 is context
only (never masked, always clean), so this bounds -log p(x^{1..L-1} | x^0), the quantity AR scores too.

-log p(x) <= NELBO(x): likelihoods reported from this process are upper bounds ("≤"). The network sees z_t
with bidirectional attention and, only when ``process.time_cond`` is true, the time t (default off: the model
is then time-independent, which makes the ``ddpm_cache`` sampler exact). Padding positions (batch.mask_BL
False) and position 0 are never masked and never scored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from dlm.data.batch import Batch
from dlm.model.graphs import capturable
from dlm.process import absorbing, unmasking
from dlm.process.base import (
    CONTINUOUS_TIME_FIELDS,
    AttnSpec,
    NLLResult,
    Process,
    ProcessConfig,
    SamplerSpec,
    check_eval_t_samples,
    register_process,
    scored_positions,
    token_logprobs,
)
from dlm.process.estimators import masked_count_bound
from dlm.process.losses import rows_weighted_loss
from dlm.process.schedules import SCHEDULE_PARAMS, build_schedule, sample_times
from dlm.process.transitions import AbsorbingTransition, Transition

T_MIN = 1e-6  # t is clamped to >= T_MIN so w(t) stays finite (the integrand w(t) E[#masked] is bounded at 0)


# ddpm: ``steps`` uniform steps (default ``length``); ddpm_cache: the same samples in fewer calls (time-independent
# models only); first_hitting: one token per call (``steps`` is ignored). See ``dlm.process.absorbing``. Then
# remdm, confidence, llada, entropy_bounded, threshold: remasking and ordered unmasking (``dlm.process.unmasking``).
_SAMPLERS = {
    "ddpm": SamplerSpec(unmasking.family_sampler(absorbing.ddpm)),
    "ddpm_cache": SamplerSpec(unmasking.family_sampler(absorbing.ddpm_cache), time_independent=True),
    "first_hitting": SamplerSpec(
        unmasking.family_sampler(absorbing.first_hitting), nfe_within_steps=False, steps_ignored=True
    ),
    **unmasking.sampler_specs(unmasking.family_sampler),
}


@register_process
class MDLMProcess(Process):
    """Masked diffusion language model: NELBO loss, its K-sample estimate, and the absorbing samplers."""

    name: ClassVar[str] = "mdlm"
    exact_likelihood: ClassVar[bool] = False
    sampler_table: ClassVar[Mapping[str, SamplerSpec]] = _SAMPLERS
    default_sampler: ClassVar[str] = "ddpm"

    def __init__(self, cfg: Any, specials: Any) -> None:
        super().__init__(cfg, specials)
        self.schedule = build_schedule(cfg)
        self.transition: Transition = AbsorbingTransition(specials)

    @classmethod
    def check_config(cls, cfg: ProcessConfig) -> None:
        super().check_config(cfg)
        build_schedule(cfg)  # an unknown schedule or bad parameters raise here
        check_eval_t_samples(cfg)

    @classmethod
    def config_fields(cls, cfg: ProcessConfig) -> frozenset[str]:
        return CONTINUOUS_TIME_FIELDS | frozenset(SCHEDULE_PARAMS.get(cfg.schedule, ()))

    @property
    def attention(self) -> AttnSpec:
        return "bidirectional"

    @property
    def time_conditioned(self) -> bool:
        return bool(self.cfg.time_cond) if self.cfg.time_cond is not None else False

    @property
    def mask_id(self) -> int:
        return self.specials.mask

    # ------------------------------------------------------------------------------------------- network

    def _logits(self, model: torch.nn.Module, z_BL: Tensor, t_B: Tensor, hidden: bool = False) -> Tensor:
        """Backbone call: bidirectional, t_B (float32) only for a time-conditioned process; ``hidden``: the head's
        input [B, L, D] instead of the logits (``model(..., return_hidden=True)``)."""
        t = t_B.to(torch.float32) if self.time_conditioned else None
        extra = {"return_hidden": True} if hidden else {}
        return model(z_BL, attn=self.attention, t_B=t, key_mask_BL=None, **extra)

    def denoiser(self, model: torch.nn.Module) -> absorbing.Denoiser:
        """``denoise(z_BL, t_B) -> logits`` [B, L, V] for the absorbing samplers (they apply SUBS at the rows they
        read: MASK logit -inf at masked positions); ``absorbing.subs_log_probs`` turns it into log p_theta."""

        def denoise(z_BL: Tensor, t_B: Tensor) -> Tensor:
            return self._logits(model, z_BL, t_B)

        return capturable(denoise)  # pure: the absorbing samplers may replay it as a CUDA graph

    def _noisy(self, batch: Batch, t_B: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """z_t ~ q(z_t | x) at the scored positions S (padding and position 0 kept clean), and the masked ones."""
        x_BL, score_BL = batch.ids_BL, scored_positions(batch)
        z_BL = self.transition.corrupt(x_BL, self.schedule.alpha(t_B), ~score_BL, generator)
        return z_BL, self.transition.loss_positions(z_BL, score_BL)

    def _times(self, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
        t = sample_times(n, generator, antithetic=self.cfg.antithetic, device=device)
        return t.clamp(min=T_MIN)

    # ------------------------------------------------------------------------------------------- loss

    def loss(
        self, model: torch.nn.Module, batch: Batch, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One-sample NELBO per token (nats/token):

            t_b ~ U[0, 1] (antithetic: t_b = (u + b/B) mod 1),  z_b ~ q(z_t | x_b)
            loss = sum_b w(t_b) sum_{l in S_b, z_b^l = m} -log p_theta(x_b^l | z_b)  /  sum_b |S_b|

        with p_theta the SUBS distribution (MASK logit -inf) and S_b the scored positions of row b (real
        positions 1..L-1, ``scored_positions``). Its expectation is the mean NELBO per scored token.
        Only the masked rows reach the output head (``losses.rows_weighted_loss``, chunked, MASK column
        excluded): unmasked positions carry no loss under SUBS, so their V x d head products and [V] softmaxes
        are never computed (about half the head's work), and no [B, L, V] float32 logits are materialised.
        Stats (detached 0-dim tensors): ``nll`` (the loss value) and ``tokens`` (scored tokens in the batch).
        """
        x_BL, real_BL = batch.ids_BL, scored_positions(batch)
        t_B = self._times(x_BL.shape[0], generator, x_BL.device)
        z_BL, scored_BL = self._noisy(batch, t_B, generator)
        tokens = real_BL.sum()
        u_BL = (self.schedule.mdlm_weight(t_B).float() / tokens.clamp(min=1))[:, None].expand_as(x_BL)
        loss = rows_weighted_loss(
            model, lambda hidden: self._logits(model, z_BL, t_B, hidden), x_BL, u_BL, scored_BL, exclude=self.mask_id
        )
        return loss, {"nll": loss.detach(), "tokens": tokens.detach().float()}

    # ------------------------------------------------------------------------------------------- bound

    @torch.no_grad()
    def nll(self, model: torch.nn.Module, batch: Batch, generator: torch.Generator | None = None) -> NLLResult:
        """Unbiased estimate of the NELBO per sequence, an upper bound: -log p(x_b) <= NELBO(x_b) ≈ nats_b,

            NELBO(x) = int_0^1 w(t) E_{z ~ q(z_t | x)} [ sum_{l in S, z^l = m} -log p_theta(x^l | z) ] dt,

        by the masked-count estimator (``dlm.process.estimators``; K = ``process.eval_t_samples`` draws per row):

            nats_b = (1/K) sum_k n_b c_{j_bk} sum_{l in M_bk} -log p_theta(x_b^l | z_bk),

        j_bk ~ U{1..n_b} masked positions M_bk (a uniform j-subset of the n_b scored positions S_b), z_bk = x_b
        with M_bk masked, c_j the closed-form time integral of the weight for j masks (t drawn from its
        conditional density only for a time-conditioned network). The weight is bounded (n c_j <= n / j), so the
        per-sequence values and hence the standard error are reliable; the uniform-time estimate of ``loss``
        has the same mean but a heavy tail (weight 1/t). -log p_theta in float64 from the float32 logits.
        tokens_b = |S_b| (real positions 1..L-1); exact = False.
        """
        x_BL = batch.ids_BL

        def masked_sum(t_B: Tensor, masked_BL: Tensor) -> Tensor:
            z_BL = torch.where(masked_BL, self.mask_id, x_BL)
            sel = self._logits(model, z_BL, t_B)[masked_BL].to(torch.float64)
            sel[:, self.mask_id] = float("-inf")
            nats_BL = torch.zeros(x_BL.shape, dtype=torch.float64, device=x_BL.device)
            nats_BL[masked_BL] = -token_logprobs(sel, x_BL[masked_BL])
            return nats_BL.sum(1)

        return masked_count_bound(
            batch, self.cfg.eval_t_samples, self.schedule, generator, masked_sum, antithetic=self.cfg.antithetic
        )
