"""D3PM: discrete-time diffusion (Austin et al. 2021) with absorbing or uniform transitions (SPEC §3.3).

T steps on the grid t(i) = i/T, s(i) = (i-1)/T, i = 1..T, with alpha_i = alpha(i/T) from the configured
schedule (SPEC §2). Forward marginals, independently per position (K = tokenizer vocabulary, m = MASK):

    absorbing:  q(z_t | x) = alpha_t onehot(x) + (1 - alpha_t) onehot(m)
    uniform:    q(z_t | x) = alpha_t onehot(x) + (1 - alpha_t) / K * 1

x0-parameterisation: p_theta(z_s | z_t) = sum_x q(z_s | z_t, x) p_theta(x | z_t), where p_theta(x | z_t) is the
network's softmax over the K clean tokens (the MASK logit, if any, is excluded). NELBO (thesis eq. 2.3):

    NELBO(x) = L_T + sum_{i=2..T} L_{i-1} + L_0,
    L_T      = KL(q(z_1 | x) || p(z_1)),
    L_{i-1}  = E_{q(z_t | x)} KL(q(z_s | z_t, x) || p_theta(z_s | z_t)),
    L_0      = E_{q(z_{1/T} | x)} -log p_theta(x | z_{1/T}).

The chain starts at the data: step i = 1 goes from x itself to z_{1/T}, i.e. it uses alpha_s = 1 whatever
alpha(0) is. L_0 is then exactly the i = 1 case of the KL formula (q(z_0 | z_t, x) = onehot(x)), and the bound is
valid for every schedule; when alpha(0) = 1 (linear, loglinear, cosine) nothing is changed by this.

Absorbing: at a masked position KL = a_i * (-log p_theta(x^l | z_t)), a_i = (alpha_s - alpha_t) / (1 - alpha_t);
unmasked positions keep their token under q and p alike and contribute 0. The prior p(z_1^l) is
(1 - alpha_1) onehot(m) + alpha_1 Uniform(K), so L_T = alpha_1 log K per position (0 when alpha_1 = 0; the
loglinear schedule has alpha_1 = eps). Uniform: prior Uniform(K) = q(z_1 | x) only when alpha_1 = 0; in general
L_T = sum_l KL(q(z_1^l | x) || Uniform(K)) = sum_l [ (alpha_1 + (1-alpha_1)/K) log(K alpha_1 + 1 - alpha_1)
+ (1 - alpha_1)(K - 1)/K log(1 - alpha_1) ].

Uniform posterior, per token in O(K) (never a K x K matrix), with beta = alpha_t / alpha_s, y = z_t^l:

    A_j(y)  = beta 1{j = y} + (1 - beta) / K             (= q(z_t = y | z_s = j))
    B_j(x)  = alpha_s 1{j = x} + (1 - alpha_s) / K       (= q(z_s = j | x))
    Z(x, y) = alpha_t 1{x = y} + (1 - alpha_t) / K       (= q(z_t = y | x) = sum_j A_j B_j)
    q(z_s = j | z_t = y, x) = A_j B_j(x) / Z(x, y)
    p_theta(z_s = j | z_t) = A_j [ alpha_s w_j + (1 - alpha_s) / K sum_x w_x ],  w_x = p_theta(x | z_t) / Z(x, y)

and KL(q || p) = sum_j q_j [ log B_j(x) - log Z(x, y) - log(alpha_s w_j + (1 - alpha_s) W / K) ] (A_j cancels),
computed in float64. Every scored position enters (any token may have been corrupted).

Scored positions S (``base.scored_positions``, the same for every family): the real positions 1..L-1 of a row.
Position 0 is context only: never corrupted, always clean, never scored; L_T and every L_{i-1} sum over S only, so
the NELBO bounds -log p(x^S | x^0), the quantity AR scores (L_T = |S| times the per-position prior KL above).

Estimators: the training loss samples one i ~ U{1..T} per sequence and uses T * L_{i-1} + L_T (unbiased for the
NELBO), normalised per scored token; ``nll`` averages eval_t_samples such draws per sequence (an unbiased estimate
of the exact T-step bound, which needs T forwards: ``nelbo_exact`` sums all T terms with one z_t per term).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from dlm.data.batch import Batch
from dlm.errors import DlmError
from dlm.model.graphs import capturable
from dlm.process import absorbing, uniform, unmasking
from dlm.process.base import (
    AttnSpec,
    NLLResult,
    Process,
    ProcessConfig,
    SampleResult,
    SamplerOptions,
    SamplerSpec,
    SampleStart,
    full_length_result,
    model_device,
    register_process,
    scored_positions,
)
from dlm.process.estimators import draw_masks
from dlm.process.schedules import SCHEDULE_PARAMS, build_schedule
from dlm.process.transitions import TRANSITIONS as TRANSITION_CLASSES
from dlm.process.transitions import Transition, check_transition, get_transition

TRANSITIONS = tuple(TRANSITION_CLASSES)
_CHUNK_ELEMENTS = 1 << 22  # float64 [positions, K] work arrays in chunks of at most this many entries


def _uniform_kl_terms(logp_NK: Tensor, x_N: Tensor, y_N: Tensor, alpha_s: Tensor, alpha_t: Tensor, K: int) -> Tensor:
    """KL(q(z_s | z_t = y, x) || p_theta(z_s | z_t)) per position, float64 [N] (closed form, module docstring).

    logp_NK: float64 log p_theta(x | z_t); alpha_s, alpha_t: float64 [N].
    """
    a_s, a_t = alpha_s[:, None], alpha_t[:, None]
    beta = a_t / a_s
    cols = torch.arange(K, device=logp_NK.device)[None]
    is_y = cols == y_N[:, None]
    is_x = cols == x_N[:, None]
    A = beta * is_y + (1 - beta) / K
    B = a_s * is_x + (1 - a_s) / K
    Zx = a_t * (x_N == y_N)[:, None] + (1 - a_t) / K  # Z(x, y) for the true x, [N, 1]
    q = A * B / Zx
    Zall = a_t * is_y + (1 - a_t) / K  # Z(x', y) for every x'
    w = torch.exp(logp_NK) / Zall
    C = a_s * w + (1 - a_s) / K * w.sum(-1, keepdim=True)
    pos = q > 0
    terms = torch.where(pos, q * (torch.log(torch.where(pos, B, 1.0)) - torch.log(Zx) - torch.log(C)), 0.0)
    return terms.sum(-1)


def uniform_posterior(x_N: Tensor, y_N: Tensor, alpha_s: float, alpha_t: float, K: int) -> Tensor:
    """q(z_s | z_t = y, x) for the uniform transition, float64 [N, K], by the per-token closed form."""
    beta = alpha_t / alpha_s
    cols = torch.arange(K)[None]
    A = beta * (cols == y_N[:, None]) + (1 - beta) / K
    B = alpha_s * (cols == x_N[:, None]) + (1 - alpha_s) / K
    q = (A * B).to(torch.float64)
    return q / q.sum(-1, keepdim=True)


@register_process
class D3PMProcess(Process):
    """Discrete-time D3PM, absorbing (default) or uniform transitions, x0-parameterised, bidirectional.

    It holds the ``transitions.Transition`` that ``cfg.transition`` names (with D3PM's random stream): the
    network vocabulary is K + 1 for absorbing, K for uniform (``Process.absorbing`` reads the transition).
    """

    name: ClassVar[str] = "d3pm"
    exact_likelihood: ClassVar[bool] = False
    transitions: ClassVar[tuple[str, ...]] = TRANSITIONS
    default_sampler: ClassVar[str] = "ddpm"

    def __init__(self, cfg: Any, specials: Any) -> None:
        super().__init__(cfg, specials)
        self.transition: Transition = get_transition(cfg.transition, specials, stream="d3pm")
        self.T = cfg.T
        self.schedule = build_schedule(cfg)
        self.alpha = self.alpha_table(cfg)  # float64 [T + 1], alpha[i] = alpha(i / T), alpha[0] = 1
        self._time_cond = True if cfg.time_cond is None else bool(cfg.time_cond)
        self.K = specials.vocab_size

    @classmethod
    def check_config(cls, cfg: ProcessConfig) -> None:
        super().check_config(cfg)
        check_transition(cfg.transition)
        T = cfg.T
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise DlmError(f"d3pm: process.T must be an integer >= 1, got {T!r}")
        k = cfg.eval_t_samples
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise DlmError(f"d3pm: process.eval_t_samples must be an integer >= 1, got {k!r}")
        if not cfg.hybrid_lambda >= 0:
            raise DlmError(f"d3pm: process.hybrid_lambda must be >= 0, got {cfg.hybrid_lambda!r}")
        alpha = cls.alpha_table(cfg)
        if not bool(((alpha >= 0) & (alpha <= 1)).all()) or not bool((alpha[1:] <= alpha[:-1]).all()):
            raise DlmError(f"d3pm: schedule {cfg.schedule!r} does not give a non-increasing alpha in [0, 1]")

    @classmethod
    def config_fields(cls, cfg: ProcessConfig) -> frozenset[str]:
        own = {"name", "time_cond", "schedule", "antithetic", "transition", "T", "hybrid_lambda", "eval_t_samples"}
        return frozenset(own) | frozenset(SCHEDULE_PARAMS.get(cfg.schedule, ()))

    @staticmethod
    def alpha_table(cfg: ProcessConfig) -> Tensor:
        """float64 [T + 1]: alpha[i] = alpha(i / T) of the configured schedule, alpha[0] = 1 (the chain starts at
        the data, module docstring)."""
        T = cfg.T
        alpha = build_schedule(cfg).alpha(torch.arange(T + 1, dtype=torch.float64) / T).to(torch.float64).clone()
        alpha[0] = 1.0
        return alpha

    @property
    def attention(self) -> AttnSpec:
        return "bidirectional"

    @property
    def time_conditioned(self) -> bool:
        return self._time_cond

    # ------------------------------------------------------------------------------------------ pieces

    def _alpha(self, i_B: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha_s, alpha_t) float64 for step indices i (t = i/T, s = (i-1)/T)."""
        a = self.alpha.to(i_B.device)
        return a[i_B - 1], a[i_B]

    def _logits(self, model: torch.nn.Module, z_BL: Tensor, i_B: Tensor) -> Tensor:
        """Network logits over the K clean tokens (MASK excluded), float32 [B, L, K]."""
        t_B = i_B.to(torch.float32) / self.T if self._time_cond else None
        out = model(z_BL, attn=self.attention, t_B=t_B)
        if self.absorbing and self.specials.mask < self.K:
            out = out.clone()
            out[..., self.specials.mask] = float("-inf")
        return out[..., : self.K].float()

    def _corrupt(self, x_BL: Tensor, real_BL: Tensor, alpha_t_B: Tensor, generator: torch.Generator | None) -> Tensor:
        """z_t ~ q(z_t | x) where ``real_BL`` (the scored positions) is True (float64 uniforms); the rest (padding,
        position 0) stays clean."""
        return self.transition.corrupt(x_BL, alpha_t_B, ~real_BL, generator)

    def prior_kl(self, real_BL: Tensor) -> Tensor:
        """L_T per sequence, float64 [B]: |S_b| times the per-position KL (module docstring); ``real_BL`` = the
        scored positions S."""
        return real_BL.sum(1).to(torch.float64) * self.transition.prior_kl(float(self.alpha[-1]))

    def step_terms(
        self, model: torch.nn.Module, batch: Batch, i_B: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """One draw z_t ~ q(z_t | x) per row at step i_B; returns (L_{i-1} per row float64 [B] with one sample of
        z_t, and the summed cross-entropy -log p_theta(x | z_t) over the scored positions, differentiable [B]).

        Terms at: the masked scored positions (absorbing) or every scored position (uniform); S = real
        positions 1..L-1 (``scored_positions``)."""
        x_BL, real_BL = batch.ids_BL, scored_positions(batch)
        alpha_s, alpha_t = self._alpha(i_B)
        z_BL = self._corrupt(x_BL, real_BL, alpha_t, generator)
        logits_BLK = self._logits(model, z_BL, i_B)
        B, _, K = logits_BLK.shape
        scored_BL = self.transition.loss_positions(z_BL, real_BL)
        x_safe = torch.where(real_BL, x_BL, 0).clamp(max=K - 1)
        sel = logits_BLK[scored_BL]  # only scored rows enter the softmax (absorbing: the masked ones)
        if not torch.is_grad_enabled():  # evaluation: float64 log-softmax
            sel = sel.to(torch.float64)
        ce_N = F.cross_entropy(sel, x_safe[scored_BL], reduction="none")
        ce_B = torch.zeros(B, dtype=ce_N.dtype, device=ce_N.device).index_add(0, scored_BL.nonzero()[:, 0], ce_N)
        if self.absorbing:
            a_B = (alpha_s - alpha_t) / (1 - alpha_t).clamp(min=1e-300)
            kl_B = a_B * ce_B.to(torch.float64)
            return kl_B, ce_B
        idx = scored_BL.nonzero(as_tuple=True)
        rows = idx[0]
        lg, xs, ys = logits_BLK[idx], x_BL[idx], z_BL[idx]
        kl_N = torch.empty(rows.shape[0], dtype=torch.float64, device=x_BL.device)
        step = max(1, _CHUNK_ELEMENTS // K)
        for a in range(0, rows.shape[0], step):
            sl = slice(a, a + step)
            logp = torch.log_softmax(lg[sl].to(torch.float64), dim=-1)
            kl_N[sl] = _uniform_kl_terms(logp, xs[sl], ys[sl], alpha_s[rows[sl]], alpha_t[rows[sl]], K)
        kl_B = torch.zeros(B, dtype=torch.float64, device=x_BL.device).index_add_(0, rows, kl_N)
        return kl_B, ce_B

    def _sample_steps(self, n: int, k: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
        """Step indices i in {1..T}, int64 [n, k]: uniform; with ``antithetic`` stratified within each row."""
        where = generator.device if generator is not None else device
        if self.cfg.antithetic and k > 1:
            u = torch.rand(n, 1, dtype=torch.float64, generator=generator, device=where)
            v = (u + torch.arange(k, dtype=torch.float64, device=where)[None] / k) % 1.0
        else:
            v = torch.rand(n, k, dtype=torch.float64, generator=generator, device=where)
        return ((v * self.T).floor().to(torch.int64).clamp(max=self.T - 1) + 1).to(device)

    # ------------------------------------------------------------------------------------------ API

    def loss(
        self, model: torch.nn.Module, batch: Batch, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(sum_b [T * L_{i_b - 1}(x_b) + L_T(x_b)]) / N, i_b ~ U{1..T} (+ hybrid_lambda * CE / N), N = sum_b |S_b|
        the scored tokens (real positions 1..L-1).

        For absorbing the KL is a_i * CE at masked positions (differentiable through CE); for uniform the
        closed-form KL in float64. Full logits (``step_terms`` is shared with ``nll``, and the uniform KL reads
        every entry). Stats, detached 0-dim tensors (no host read here): ``nll`` (the unbiased, one-draw NELBO
        per token without the hybrid term, float64) and ``tokens``.
        """
        real_BL = scored_positions(batch)
        i_B = self._sample_steps(batch.ids_BL.shape[0], 1, batch.ids_BL.device, generator)[:, 0]
        kl_B, ce_B = self.step_terms(model, batch, i_B, generator)
        count = real_BL.sum()
        vb = (self.T * kl_B.sum() + self.prior_kl(real_BL).sum()) / count.clamp(min=1)
        loss = vb.float()
        if self.cfg.hybrid_lambda > 0:
            loss = loss + self.cfg.hybrid_lambda * ce_B.sum() / count.clamp(min=1)
        return loss, {"nll": vb.detach(), "tokens": count.detach().float()}

    @torch.no_grad()
    def nll(self, model: torch.nn.Module, batch: Batch, generator: torch.Generator | None = None) -> NLLResult:
        """Unbiased estimate of the T-step NELBO per sequence, an upper bound in expectation on -log p(x^S | x^0);
        tokens_b = |S_b| (real positions 1..L-1). K = ``eval_t_samples`` draws per row.

        Uniform: L_T + T * mean_k L_{i_k - 1}, i_k ~ U{1..T} (stratified when ``antithetic``; one z_t per draw).
        Absorbing: L_T + the masked-count estimate of sum_i L_{i-1} (``_count_table``): bounded weights, so a
        reliable standard error (the uniform-step estimate weighs a lone masked token at small i by T a_i)."""
        if self.absorbing:
            return self._masked_count_nll(model, batch, generator)
        B = batch.ids_BL.shape[0]
        k = self.cfg.eval_t_samples
        i_BK = self._sample_steps(B, k, batch.ids_BL.device, generator)
        rep = Batch(batch.ids_BL.repeat_interleave(k, 0), batch.mask_BL.repeat_interleave(k, 0))
        kl, _ = self.step_terms(model, rep, i_BK.reshape(-1), generator)
        real_BL = scored_positions(batch)
        nats_B = self.prior_kl(real_BL) + self.T * kl.view(B, k).mean(1)
        return NLLResult(nats_B=nats_B, tokens_B=real_BL.sum(1).to(torch.int64), exact=False)

    def _count_table(self, n: int) -> Tensor:
        """w [n + 1, T] float64, w_{k,i} = C(n, k) s_i^k (1 - s_i)^{n-k} a_i for steps i = 1..T: the probability
        that a row of n scored tokens has k of them masked at step i, times the absorbing KL weight
        a_i = (alpha_{i-1} - alpha_i) / s_i, s_i = 1 - alpha_i. Row k = 0 is 0 (nothing masked, no term)."""
        a = self.alpha.to(torch.float64)
        s_T = 1.0 - a[1:]
        a_T = (a[:-1] - a[1:]) / s_T
        k = torch.arange(n + 1, dtype=torch.float64)[:, None]
        log_comb = math.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
        w = torch.exp(log_comb + torch.special.xlogy(k, s_T) + torch.special.xlog1py(n - k, -s_T)) * a_T
        w[0] = 0.0
        return w

    def _count_steps(self, k_R: Tensor, n_R: Tensor, u_R: Tensor) -> tuple[Tensor, Tensor]:
        """Per draw with k of n scored tokens masked: the step i ~ w_{k,.} / c_k (inverse CDF of the uniform u) and
        the weight n c_k (0 where n = 0); int64 [R] in 1..T and float64 [R]."""
        i_R = torch.ones_like(k_R)
        weight_R = torch.zeros(k_R.shape, dtype=torch.float64, device=k_R.device)
        for n in torch.unique(n_R).tolist():
            if n == 0:
                continue
            rows = n_R == n
            w = self._count_table(n).to(k_R.device)
            c = w.sum(1)
            cdf_R = w[k_R[rows]].cumsum(1) / c[k_R[rows], None]
            i_R[rows] = torch.searchsorted(cdf_R, u_R[rows, None]).squeeze(1).clamp(max=self.T - 1) + 1
            weight_R[rows] = n * c[k_R[rows]]
        return i_R, weight_R

    def _masked_count_nll(self, model: torch.nn.Module, batch: Batch, generator: torch.Generator | None) -> NLLResult:
        """Absorbing D3PM's bound by masked counts (the discrete-time form of ``dlm.process.estimators``):

            sum_i L_{i-1}(x) = sum_i E_{M ~ Bern(s_i)} [a_i sum_{l in M} CE_l(x_{not M}, i)]
                             = sum_{k=1..n} c_k E_{M | k} E_{i ~ w_{k,.} / c_k} [sum_{l in M} CE_l(x_{not M}, i)],

        c_k = sum_i w_{k,i} (``_count_table``). Per draw: k ~ U{1..n} (stratified), M a uniform k-subset of the
        scored positions (``estimators.draw_masks``), i from w_{k,.} / c_k by inverse CDF, and
        nats = L_T + n c_k sum_{l in M} -log p_theta(x^l | x with M masked, i); the K B draws in one forward.
        """
        x_BL, real_BL = batch.ids_BL, scored_positions(batch)
        B, K = x_BL.shape[0], self.cfg.eval_t_samples
        masked_RL, k_R, n_R = draw_masks(real_BL.repeat(K, 1), generator, antithetic=self.cfg.antithetic)
        where = generator.device if generator is not None else x_BL.device
        u_R = torch.rand(K * B, dtype=torch.float64, generator=generator, device=where).to(x_BL.device)
        i_R, weight_R = self._count_steps(k_R, n_R, u_R)
        x_RL = x_BL.repeat(K, 1)
        z_RL = torch.where(masked_RL, self.specials.mask, x_RL)
        sel = self._logits(model, z_RL, i_R)[masked_RL].to(torch.float64)
        ce_N = F.cross_entropy(sel, x_RL[masked_RL], reduction="none")
        ce_R = torch.zeros(K * B, dtype=torch.float64, device=x_BL.device).index_add(0, masked_RL.nonzero()[:, 0], ce_N)
        nats_B = self.prior_kl(real_BL) + (weight_R * ce_R).view(K, B).mean(0)
        return NLLResult(nats_B=nats_B, tokens_B=real_BL.sum(1).to(torch.int64), exact=False)

    @torch.no_grad()
    def nelbo_exact(self, model: torch.nn.Module, batch: Batch, generator: torch.Generator | None = None) -> Tensor:
        """L_T + sum_{i=1..T} L_{i-1} per sequence, float64 [B]: all T terms (T forwards), one z_t draw each."""
        real_BL = scored_positions(batch)
        total = self.prior_kl(real_BL)
        B = batch.ids_BL.shape[0]
        for i in range(1, self.T + 1):
            i_B = torch.full((B,), i, dtype=torch.int64, device=batch.ids_BL.device)
            total = total + self.step_terms(model, batch, i_B, generator)[0]
        return total

    def sampler_specs(self) -> Mapping[str, SamplerSpec]:
        """Absorbing: ``ddpm``, ``ddpm_cache`` (time-independent networks) and the remasking / ordered unmasking
        samplers of ``dlm.process.unmasking``; uniform: ``ddpm``."""
        if self.absorbing:
            return {
                "ddpm": SamplerSpec(_ddpm_absorbing),
                "ddpm_cache": SamplerSpec(_ddpm_cache, time_independent=True),
                **_UNMASKING,
            }
        return {"ddpm": SamplerSpec(_ddpm_uniform)}

    def default_steps(self, length: int) -> int:
        return self.T

    def max_steps(self) -> int | None:
        return self.T

    def _grid(self, S: int) -> list[int]:
        """Step indices i_S = T > ... > i_0 = 0 of an S-step sampler, i_k = round(k T / S)."""
        return [round(k * self.T / S) for k in range(S + 1)]

    def denoiser(self, model: torch.nn.Module) -> absorbing.Denoiser:
        """``denoise(z_BL, t_B) -> logits`` for the absorbing samplers: t = i/T is mapped back to the step index
        i = round(t T) the network was trained with (its time input when time-conditioned)."""

        def denoise(z_BL: Tensor, t_B: Tensor) -> Tensor:
            t = (t_B * self.T).round().to(torch.float32) / self.T if self._time_cond else None
            return model(z_BL, attn=self.attention, t_B=t)  # all V outputs: the sampler drops the MASK column

        return capturable(denoise)  # pure: the absorbing samplers may replay it as a CUDA graph


def _reveal_loop(
    process: Process,
    model: torch.nn.Module,
    start: SampleStart,
    o: SamplerOptions,
    generator: torch.Generator | None,
    lazy: bool,
) -> SampleResult:
    """Ancestral sampling over S = steps (default T) steps i_S > ... > i_0 = 0, i_k = round(k T / S).

    Absorbing (``ddpm``; ``ddpm_cache`` for a time-independent network): start all-MASK; at step i_k -> i_(k-1)
    a masked position is revealed with probability a = (alpha_s - alpha_t) / (1 - alpha_t) and its token
    drawn from p_theta(x | z_t) (after temperature / top-k / top-p); the last step (alpha_s = 1) reveals every
    remaining mask (``absorbing.reveal_loop``: reveal decisions first, float64 draws only where revealed).
    Uniform: start from uniform noise and draw z_s ~ p_theta(z_s | z_t) (closed form above, filtered
    p_theta(x | z_t) inside); the last step draws x ~ p_theta(x | z_t). One float64 uniform per position and
    step (``sampling.sample_from_probs``).

    prompt_ids: a fixed prefix; fixed_ids: int64 [length] or [n, length], -1 = free, else kept throughout.
    Fixed positions never change. nfe = network calls (S for ``ddpm``). Starting all-MASK is the
    alpha_1 -> 0 limit of the prior (the loglinear schedule has alpha_1 = eps). ``return_trajectory``
    (absorbing): ``trajectory_NL`` = the step (0-based) at which each position was revealed, -1 if fixed.
    """
    assert isinstance(process, D3PMProcess) and o.steps is not None
    S, T, fixed_NL = o.steps, process.T, start.fixed_NL
    fixed = fixed_NL >= 0
    grid = process._grid(S)
    mask = process.specials.mask
    z_init = process.transition.start(fixed_NL)
    times = [grid[k] / T for k in range(S, 0, -1)]
    alpha = process.alpha

    def reveal(i: int) -> Tensor:  # step i runs from grid[S - i] to grid[S - i - 1]
        return absorbing.reveal_probability(alpha[grid[S - i]], alpha[grid[S - i - 1]])

    out = absorbing.reveal_loop(
        process.denoiser(model), z_init, times, reveal, generator, fixed, mask_id=mask, lazy=lazy,
        temperature=o.temperature, top_k=o.top_k, top_p=o.top_p, return_trajectory=o.return_trajectory,
    )  # fmt: skip
    return full_length_result(out.ids_BL, out.nfe, start.prompt_len, out.trajectory_BL)


def _ddpm_absorbing(
    process: Process, model: torch.nn.Module, start: SampleStart, o: SamplerOptions, gen: torch.Generator | None
) -> SampleResult:
    return _reveal_loop(process, model, start, o, gen, lazy=False)


def _ddpm_cache(
    process: Process, model: torch.nn.Module, start: SampleStart, o: SamplerOptions, gen: torch.Generator | None
) -> SampleResult:
    return _reveal_loop(process, model, start, o, gen, lazy=True)


def _ddpm_uniform(
    process: Process, model: torch.nn.Module, start: SampleStart, o: SamplerOptions, gen: torch.Generator | None
) -> SampleResult:
    """Uniform D3PM ancestral sampling (``_reveal_loop`` describes both transitions; ``uniform.ancestral``)."""
    assert isinstance(process, D3PMProcess) and o.steps is not None
    device = model_device(model)
    fixed = start.fixed_NL >= 0
    grid_t = torch.tensor(process._grid(o.steps), dtype=torch.int64, device=device)
    z0 = torch.where(fixed, start.fixed_NL, torch.zeros_like(start.fixed_NL))
    out = uniform.ancestral(
        lambda z, i_B: process._logits(model, z, i_B), z0, process.alpha.to(device)[grid_t], process.K, gen,
        fixed, times=grid_t, temperature=o.temperature, top_k=o.top_k, top_p=o.top_p,
        return_trajectory=o.return_trajectory,
    )  # fmt: skip
    return full_length_result(out.ids_BL, out.nfe, start.prompt_len, out.trajectory_BL)


_UNMASKING = unmasking.sampler_specs(unmasking.family_sampler)
