"""SEDD: score-entropy discrete diffusion (Lou et al. 2023, SPEC §3.5), absorbing (and uniform) transitions.

Forward process dp_t/dt = sigma'(t) Q p_t with Q absorbing; per position (m = MASK, alpha_t = e^{-sigma_t}):

    p_{t|0}(z^l | x^l) = e^{-sigma_t} onehot(x^l) + (1 - e^{-sigma_t}) onehot(m)       (= SPEC §3.2)

The network outputs (log) concrete scores s_theta(z_t)_{l,y} ≈ p_t(z_t with position l set to y) / p_t(z_t).
Parameterisation (absorbing), with the MASK column and, at unmasked positions, everything excluded:

    log s_theta(z_t)_{l,y} = log softmax_{y != m}(logits^l)_y - log(e^{sigma_t} - 1)     at z^l = m
    s_theta(z_t)_{l,y}     = 0                                                         at z^l != m

The true ratio satisfies sum_y p_t(z^{l<-y}) / p_t(z) = alpha_t / (1 - alpha_t) = 1 / (e^sigma - 1) at a masked
position, so the normalisation loses nothing, and s_theta (e^sigma - 1) = p_theta(x^l = . | z_t) is a distribution
over y that plays the role of MDLM's SUBS p_theta (SPEC §3.5 identity). We call
ell_y = log(s_y (e^sigma - 1)) the *scaled log-score*.

Denoising score entropy per position l, each jump z^l -> y weighted by its forward rate sigma'(t) Q(y, z^l)
(SPEC §3.5): Q(m, x) = 1 for absorbing, Q(y, x) = 1/K for uniform (Q = (1/K) 11^T - I):

    DSE_l = sum_{y != z^l} [ s_y - r_y log s_y + r_y (log r_y - 1) ],   r_y = p_{t|0}(y | x) / p_{t|0}(z^l | x).

Scored positions (``base.scored_positions``, the same for every family): the real positions 1..L-1 of a row.
Position 0 is context only: never masked or resampled, always clean, never scored, so the bound is on
-log p(x^{1..L-1} | x^0), the quantity AR scores.

Absorbing: r_y = 1/(e^sigma - 1) =: r for y = x^l at a masked position, 0 for every other y and at every unmasked
position (where s = 0 too), so only masked positions contribute, and with log s_y = ell_y - log(e^sigma - 1):

    DSE_l = r [ sum_{y != m} e^{ell_y} - 1 - ell_{x^l} ]  >= 0      (``dse_absorbing``; stable for small sigma)

With the normalised parameterisation sum_y e^{ell_y} = 1, so sigma'(t) DSE_l = sigma'(t) / (e^{sigma_t} - 1)
(-log p_theta(x^l | z_t)), and sigma'/(e^sigma - 1) = -alpha'_t / (1 - alpha_t) = MDLM's weight w(t): for the
same (x, t, z_t) the SEDD-absorb bound equals the MDLM NELBO term by term (the change of variables between the
two time weights is this identity). Bound: -log p(x^S | x^0) <= int_0^1 sigma'(t) E_{z_t} sum_{l in S} DSE_l dt
(the prior term KL(p_{1|0} || p_base) is omitted as in MDLM's NELBO: it is 0 when alpha_1 = 0 and O(alpha_1)
otherwise).

Time conditioning (default on, ``process.time_cond``): the network is given the total noise sigma_t (float32),
as in the SEDD reference implementation, not t. Time t is clamped to >= T_MIN so sigma_t > 0.

Samplers (``sample``), on the uniform grid t_i = 1 - i/S, one network call per step while a mask remains:

  euler:     reverse CTMC rates at a masked position: m -> y at rate sigma'(t) s_theta(z_t)_y. One Euler step of
             length dt = t - s jumps to y with probability lambda q_y, lambda = sigma'(t) dt / (e^{sigma_t} - 1),
             q = p_theta after temperature / top-k / top-p; stays masked with probability 1 - lambda; lambda is
             clamped to 1 (then the row is renormalised onto the tokens). The last step resolves every mask (lambda=1).
  analytic:  Tweedie tau-leaping (SEDD paper, "analytic" sampler): p(z_s | z_t) = exp(-(sigma_s - sigma_t) Q)
             applied to the Tweedie estimate of p_0. For absorbing it reduces exactly to the ancestral posterior
             of SPEC §3.2 with p_theta = s_theta (e^{sigma_t} - 1): reveal with probability
             (alpha_s - alpha_t)/(1 - alpha_t), token ~ p_theta. Implemented by ``absorbing.ddpm``.

Uniform transitions (``process.transition=uniform``; network vocabulary K): p_{t|0}(y | x) = alpha_t 1{y = x}
+ (1 - alpha_t)/K, the network output is log s directly (no normalisation), every scored position (any of them may
have been resampled) enters with ``dse_uniform`` (closed-form r, O(K) per position) and the rate weight sigma'(t)/K:

    -log p(x^S | x^0) <= int_0^1 (sigma'(t) / K) E_{z_t} sum_{l in S} DSE_l(z_t, t) dt   (+ KL(p_{1|0} || Unif),
                                                                                       O(alpha_1^2 K) per position)

With the exact score the gap is exactly that prior KL (the reverse process is then the true one).
Samplers from ``dlm.process.uniform``: ``euler`` (rate
z -> y = sigma'(t) s_y / K) and ``analytic`` (Tweedie tau-leaping with the closed form of exp(c Q_uniform), last
step the Tweedie x0 estimate); free positions start from the uniform prior; temperature / top-k / top-p act on the
Tweedie estimate of p(x0 | z_t) (see that module).

All randomness comes from the ``generator`` argument; draws are float64.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from dlm.data.batch import Batch
from dlm.model.graphs import capturable
from dlm.process import absorbing, uniform, unmasking
from dlm.process.absorbing import AbsorbingSample
from dlm.process.base import (
    CONTINUOUS_TIME_FIELDS,
    AttnSpec,
    NLLResult,
    Process,
    ProcessConfig,
    SampleResult,
    SamplerOptions,
    SamplerSpec,
    SampleStart,
    check_eval_t_samples,
    full_length_result,
    register_process,
    scored_positions,
)
from dlm.process.estimators import masked_count_bound, monte_carlo_bound
from dlm.process.losses import rows_weighted_loss
from dlm.process.schedules import SCHEDULE_PARAMS, Schedule, build_schedule, sample_times
from dlm.process.transitions import TRANSITIONS as TRANSITION_CLASSES
from dlm.process.transitions import Transition, check_transition, get_transition

T_MIN = 1e-6
TRANSITIONS = tuple(TRANSITION_CLASSES)

__all__ = ["SEDDProcess", "dse_absorbing", "euler_absorbing", "score_entropy", "sedd_weight"]


def score_entropy(log_s_NV: Tensor, r_NV: Tensor) -> Tensor:
    """Score entropy per row, straight from SPEC §3.5 (reference / tests): float64 [N].

        sum_y [ s_y - r_y log s_y + r_y (log r_y - 1) ]   with 0 log 0 = 0 and r_y log s_y = 0 where r_y = 0.

    The caller excludes y = z^l (put log s = -inf and r = 0 there).
    """
    log_s = log_s_NV.to(torch.float64)
    r = r_NV.to(torch.float64)
    pos = r > 0
    safe_r = torch.where(pos, r, torch.ones_like(r))
    cross = torch.where(pos, r * log_s, torch.zeros_like(r))
    const = torch.where(pos, r * (torch.log(safe_r) - 1.0), torch.zeros_like(r))
    return (log_s.exp() - cross + const).sum(-1)


def dse_absorbing(ell_NV: Tensor, x_N: Tensor, sigma_N: Tensor, mask_id: int) -> Tensor:
    """Absorbing DSE at N masked positions from the scaled log-scores ell = log(s (e^sigma - 1)): [N].

        DSE = r [ sum_{y != m} e^{ell_y} - 1 - ell_x ],   r = 1 / (e^sigma - 1)

    (module docstring). Computed as expm1(logsumexp(ell)) - ell_x in the dtype of ``ell``, times r (float64).
    """
    ell = ell_NV.masked_fill(torch.arange(ell_NV.shape[-1], device=ell_NV.device) == mask_id, float("-inf"))
    inner = torch.expm1(torch.logsumexp(ell, dim=-1)) - ell.gather(-1, x_N.unsqueeze(-1)).squeeze(-1)
    r = 1.0 / torch.expm1(sigma_N.to(torch.float64))
    return r * inner.to(torch.float64)


def dse_uniform(log_s_NV: Tensor, x_N: Tensor, z_N: Tensor, sigma_N: Tensor) -> Tensor:
    """Uniform-transition DSE per position, float64 [N] (log s over the K tokens; the z column is ignored).

    With alpha = e^{-sigma}, a = (1 - alpha)/K, b = alpha + a (= p_{t|0}(x | x)):
        z = x:   r_y = a/b for every y != z
        z != x:  r_x = b/a, r_y = 1 for y not in {x, z}
    DSE = sum_{y != z} s_y - sum_{y != z} r_y log s_y + sum_{y != z} r_y (log r_y - 1).
    The V-reductions run in the dtype of ``log_s_NV``; the combination in float64.
    """
    V = log_s_NV.shape[-1]
    zcol = torch.nn.functional.one_hot(z_N, V).bool()
    excl = log_s_NV.masked_fill(zcol, float("-inf"))
    term_s = torch.logsumexp(excl, -1).to(torch.float64).exp()
    sum_logs = log_s_NV.masked_fill(zcol, 0.0).sum(-1).to(torch.float64)
    log_sx = log_s_NV.gather(-1, x_N.unsqueeze(-1)).squeeze(-1).to(torch.float64)
    sig = sigma_N.to(torch.float64)
    a = -torch.expm1(-sig) / V
    b = torch.exp(-sig) + a
    same = z_N == x_N
    r0 = a / b
    r1 = b / a
    cross_same = r0 * sum_logs
    cross_diff = r1 * log_sx + (sum_logs - log_sx)
    const_same = (V - 1) * r0 * (torch.log(r0) - 1.0)
    const_diff = r1 * (torch.log(r1) - 1.0) - (V - 2)
    cross = torch.where(same, cross_same, cross_diff)
    const = torch.where(same, const_same, const_diff)
    return term_s - cross + const


def sedd_weight(schedule: Schedule, t: Tensor) -> Tensor:
    """sigma'(t) / (e^{sigma_t} - 1), float64: the weight of sum_l [sum_y e^ell_y - 1 - ell_x] (= MDLM's w(t))."""
    return schedule.dsigma(t) / torch.expm1(schedule.sigma(t))


def euler_absorbing(
    denoise: absorbing.Denoiser,
    z_init: Tensor,
    schedule: Schedule,
    steps: int,
    generator: torch.Generator | None = None,
    fixed_BL: Tensor | None = None,
    *,
    mask_id: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    return_trajectory: bool = False,
) -> AbsorbingSample:
    """Euler sampler of the reverse absorbing CTMC (module docstring), t_i = 1 - i/S.

    ``denoise(z, t)`` returns logits whose softmax over y != m is p_theta = s_theta (e^{sigma_t} - 1) (the
    scaled score). At step i (t -> s = t - 1/S) each masked position jumps to y with probability lambda q_y and
    stays masked with probability 1 - lambda, lambda = min(1, sigma'(t) (t - s) / (e^{sigma_t} - 1)), q =
    p_theta after temperature / top-k / top-p; lambda = 1 on the last step, so no MASK is left. This is
    ``absorbing.reveal_loop`` with a_i = lambda_i (one network call per step).
    """
    absorbing._check_steps(steps)
    times = [1.0 - i / steps for i in range(steps)]
    t = torch.tensor(times, dtype=torch.float64)
    lam = (schedule.dsigma(t) / steps / torch.expm1(schedule.sigma(t))).clamp(0.0, 1.0)
    return absorbing.reveal_loop(
        denoise, z_init, times, lambda i: lam[i], generator, fixed_BL, mask_id=mask_id,
        temperature=temperature, top_k=top_k, top_p=top_p, return_trajectory=return_trajectory,
    )  # fmt: skip


@register_process
class SEDDProcess(Process):
    """Score-entropy discrete diffusion (absorbing): DSE loss, its K-sample bound, Euler and analytic samplers.

    It holds the ``transitions.Transition`` that ``cfg.transition`` names: absorbing (network vocabulary K + 1,
    both samplers) or uniform (vocabulary K, raw log-score output, DSE loss/bound, both samplers from ``uniform``).
    """

    name: ClassVar[str] = "sedd"
    exact_likelihood: ClassVar[bool] = False
    transitions: ClassVar[tuple[str, ...]] = TRANSITIONS
    default_sampler: ClassVar[str] = "analytic"

    def __init__(self, cfg: Any, specials: Any) -> None:
        super().__init__(cfg, specials)
        self.transition: Transition = get_transition(cfg.transition, specials)
        self.schedule = build_schedule(cfg)
        self._time_cond = True if cfg.time_cond is None else bool(cfg.time_cond)

    @classmethod
    def check_config(cls, cfg: ProcessConfig) -> None:
        super().check_config(cfg)
        check_transition(cfg.transition)
        build_schedule(cfg)  # an unknown schedule or bad parameters raise here
        check_eval_t_samples(cfg)

    @classmethod
    def config_fields(cls, cfg: ProcessConfig) -> frozenset[str]:
        return CONTINUOUS_TIME_FIELDS | {"transition"} | frozenset(SCHEDULE_PARAMS.get(cfg.schedule, ()))

    @property
    def attention(self) -> AttnSpec:
        return "bidirectional"

    @property
    def time_conditioned(self) -> bool:
        """Default True: the network is given sigma_t (float32), see the module docstring."""
        return self._time_cond

    @property
    def mask_id(self) -> int:
        return self.specials.mask

    # ------------------------------------------------------------------------------------------- network

    def _logits(self, model: torch.nn.Module, z_BL: Tensor, t_B: Tensor) -> Tensor:
        c = self.schedule.sigma(t_B).to(torch.float32) if self._time_cond else None
        return model(z_BL, attn=self.attention, t_B=c, key_mask_BL=None)

    def scaled_log_score(self, model: torch.nn.Module, z_BL: Tensor, t_B: Tensor) -> Tensor:
        """ell = log(s_theta (e^sigma_t - 1)) [B, L, V], float32; = log p_theta(x | z_t) (SUBS-applied)."""
        return absorbing.subs_log_probs(self._logits(model, z_BL, t_B), z_BL, self.mask_id)

    def log_score(self, model: torch.nn.Module, z_BL: Tensor, t_B: Tensor) -> Tensor:
        """log s_theta(z_t)_{l,y} [B, L, V] float64: ell - log(e^sigma - 1) at masked rows, -inf elsewhere.

        Uniform: the raw network output (log s over the K tokens; the entry y = z^l is meaningless)."""
        if not self.absorbing:
            return self._logits(model, z_BL, t_B).to(torch.float64)
        ell = self.scaled_log_score(model, z_BL, t_B).to(torch.float64)
        c_B = torch.log(torch.expm1(self.schedule.sigma(t_B).to(torch.float64)))
        out = ell - c_B[:, None, None]
        return out.masked_fill((z_BL != self.mask_id).unsqueeze(-1), float("-inf"))

    def denoiser(self, model: torch.nn.Module) -> absorbing.Denoiser:
        """``denoise(z_BL, t_B) -> logits`` whose log-softmax over y != m is ell = log(s_theta (e^sigma - 1)) =
        log p_theta(x | z_t) at masked positions (``scaled_log_score`` applies it); for the samplers."""

        def denoise(z_BL: Tensor, t_B: Tensor) -> Tensor:
            return self._logits(model, z_BL, t_B)

        return capturable(denoise)  # pure: the absorbing samplers may replay it as a CUDA graph

    def _times(self, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
        return sample_times(n, generator, antithetic=self.cfg.antithetic, device=device).clamp(min=T_MIN)

    def _noisy(self, batch: Batch, t_B: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """z_t ~ p_{t|0}(. | x) at the scored positions S (padding and position 0 kept clean); returns z_t and
        the positions that carry a DSE term (absorbing: the masked ones of S; uniform: all of S)."""
        x_BL, real_BL = batch.ids_BL, scored_positions(batch)
        z_BL = self.transition.corrupt(x_BL, self.schedule.alpha(t_B), ~real_BL, generator)
        return z_BL, self.transition.loss_positions(z_BL, real_BL)

    def bound_integrand(self, model: torch.nn.Module, batch: Batch, t_B: Tensor, z_BL: Tensor) -> Tensor:
        """The integrand of the bound at (t_b, z_b) per row, [B] (float64 weights; float32 network math):

            absorbing:  sigma'(t) sum_{l in S, z^l = m} DSE_l      uniform:  (sigma'(t) / K) sum_{l in S} DSE_l

        (the rate of a jump z^l -> y is sigma'(t) Q(y, z^l): 1 absorbing, 1/K uniform). ``z_BL`` must be clean
        outside the scored positions S (as ``_noisy`` draws it)."""
        score_BL = scored_positions(batch)
        if not self.absorbing:
            K = self.specials.vocab_size
            log_s = self._logits(model, z_BL, t_B)[..., :K].float()
            B, L, V = log_s.shape
            sig = self.schedule.sigma(t_B)[:, None].expand(B, L).reshape(-1)
            d = dse_uniform(log_s.reshape(B * L, V), batch.ids_BL.reshape(-1), z_BL.reshape(-1), sig).view(B, L)
            d = torch.where(score_BL, d, torch.zeros_like(d))
            return self.schedule.dsigma(t_B) / K * d.sum(1)
        masked_BL = (z_BL == self.mask_id) & score_BL
        sum_B = self.masked_dse_sum(model, batch, t_B, masked_BL)
        w_B = sedd_weight(self.schedule, t_B).to(sum_B.dtype)
        return torch.where(masked_BL.any(1), w_B * sum_B, torch.zeros_like(sum_B))

    def masked_dse_sum(self, model: torch.nn.Module, batch: Batch, t_B: Tensor, masked_BL: Tensor) -> Tensor:
        """Absorbing: sum_{l in M} DSE_l(z, t) per row, [B] (float32 network math), with z = x masked at M
        (``masked_BL``, a subset of the scored positions): the integrand without its weight
        sigma'(t) / (e^sigma - 1)."""
        z_BL = torch.where(masked_BL, self.mask_id, batch.ids_BL)
        scored_BL = masked_BL
        # Only the masked rows: DSE is 0 at unmasked positions (s = 0 and r = 0 there).
        sel = self._logits(model, z_BL, t_B)[scored_BL].float()
        sel = sel.index_fill(1, torch.tensor([self.mask_id], device=sel.device), float("-inf"))
        ell_N = torch.log_softmax(sel, dim=-1)
        x_N = batch.ids_BL[scored_BL]
        inner_N = torch.expm1(torch.logsumexp(ell_N, -1)) - ell_N.gather(-1, x_N.unsqueeze(-1)).squeeze(-1)
        rows_N = scored_BL.nonzero(as_tuple=True)[0]
        sum_B = torch.zeros(z_BL.shape[0], dtype=inner_N.dtype, device=inner_N.device)
        return sum_B.index_add(0, rows_N, inner_N)

    # ------------------------------------------------------------------------------------------- loss

    def loss(
        self, model: torch.nn.Module, batch: Batch, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One-sample DSE bound per token (nats/token):

            t_b ~ U[0, 1] (antithetic), z_b ~ p_{t|0}(. | x_b) on the scored positions S_b
            loss = sum_b sigma'(t_b) sum_{l in S_b, z_b^l = m} DSE_l  /  sum_b |S_b|           (absorbing)
            loss = sum_b (sigma'(t_b) / K) sum_{l in S_b} DSE_l  /  sum_b |S_b|                (uniform)

        (absorbing DSE_l = r [sum_y e^{ell_y} - 1 - ell_x], module docstring; S_b = real positions 1..L-1).
        Absorbing: ell = log softmax over y != m (SUBS), so sum_{y != m} e^{ell_y} = 1 and DSE_l = r (-ell_x) =
        r CE_l: only the masked rows reach the output head, through the chunked cross-entropy with weights
        u_bl = sigma'(t_b) / (e^sigma_b - 1) / sum_b |S_b| (``losses.rows_weighted_loss``, MASK column excluded;
        no [B, L, V] float32 logits). ``nll`` keeps the DSE form from full logits. Uniform: full logits (the
        DSE reads every entry of log s at every position).
        Stats (detached 0-dim tensors): ``nll`` and ``tokens`` (scored tokens).
        """
        x_BL, real_BL = batch.ids_BL, scored_positions(batch)
        t_B = self._times(x_BL.shape[0], generator, x_BL.device)
        z_BL, _ = self._noisy(batch, t_B, generator)
        tokens = real_BL.sum()
        if self.absorbing:
            masked_BL = (z_BL == self.mask_id) & real_BL
            u_BL = (sedd_weight(self.schedule, t_B).float() / tokens.clamp(min=1))[:, None].expand_as(x_BL)
            loss = rows_weighted_loss(
                model, self._network(model, z_BL, t_B), x_BL, u_BL, masked_BL, exclude=self.mask_id
            )
        else:
            loss = self.bound_integrand(model, batch, t_B, z_BL).sum() / tokens.clamp(min=1)
        return loss, {"nll": loss.detach(), "tokens": tokens.detach().float()}

    def _network(self, model: torch.nn.Module, z_BL: Tensor, t_B: Tensor) -> Callable[[bool], Tensor]:
        """``run(hidden)`` for ``losses.rows_weighted_loss``: ``_logits`` or, with hidden, the head's input."""

        def run(hidden: bool) -> Tensor:
            c = self.schedule.sigma(t_B).to(torch.float32) if self._time_cond else None
            extra = {"return_hidden": True} if hidden else {}
            return model(z_BL, attn=self.attention, t_B=c, key_mask_BL=None, **extra)

        return run

    @torch.no_grad()
    def nll(self, model: torch.nn.Module, batch: Batch, generator: torch.Generator | None = None) -> NLLResult:
        """Unbiased estimate of the DSE bound per sequence (an upper bound on -log p(x_b), exact = False),
        K = ``process.eval_t_samples`` draws per row, made at once for the B K rows (stratified, index k B + b).

        Absorbing: the bound int_0^1 w(t) E_z[sum_{l in S, z^l = m} DSE_l(z, t)] dt (w = sigma'/(e^sigma - 1),
        MDLM's weight) by the masked-count estimator (``dlm.process.estimators``: j ~ U{1..n_b} masks, weight
        n_b c_j, t from its conditional density given j; bounded weights, so a reliable standard error):

            nats_b = (1/K) sum_k n_b c_{j_bk} sum_{l in M_bk} DSE_l(z_bk, t_bk)

        Uniform (every position carries a term, no masked count to condition on): uniform times,

            nats_b = (1/K) sum_k (sigma'(t_bk) / V) sum_{l in S_b} DSE_l(z_bk, t_bk),  t_bk ~ U[0, 1] (antithetic)

        tokens_b = |S_b| (real positions 1..L-1, ``scored_positions``).
        """
        x_BL = batch.ids_BL
        if self.absorbing:

            def masked_sum(t_B: Tensor, masked_BL: Tensor) -> Tensor:
                return self.masked_dse_sum(model, batch, t_B, masked_BL)

            return masked_count_bound(
                batch, self.cfg.eval_t_samples, self.schedule, generator, masked_sum, antithetic=self.cfg.antithetic
            )

        def integrand(t_B: Tensor) -> Tensor:
            z_BL, _ = self._noisy(batch, t_B, generator)
            return self.bound_integrand(model, batch, t_B, z_BL)

        times = lambda m: self._times(m, generator, x_BL.device)  # noqa: E731
        return monte_carlo_bound(batch, self.cfg.eval_t_samples, times, integrand)

    # ------------------------------------------------------------------------------------------- sampling

    def sampler_specs(self) -> Mapping[str, SamplerSpec]:
        """``euler`` and ``analytic``, for either transition (``uniform`` holds the uniform-state ones); absorbing
        also the remasking / ordered unmasking samplers of ``dlm.process.unmasking``."""
        own = {"euler": SamplerSpec(_euler), "analytic": SamplerSpec(_analytic)}
        return {**own, **_UNMASKING} if self.absorbing else own


def _run(
    process: Process,
    model: torch.nn.Module,
    start: SampleStart,
    o: SamplerOptions,
    generator: torch.Generator | None,
    sampler: str,
) -> SampleResult:
    """Generate n rows of ``length`` tokens from all-MASK (``analytic`` default, or ``euler``).

    steps: S >= 1 uniform steps (default ``length``); the last step resolves every mask.
    prompt_ids: a fixed prefix. fixed_ids: int tensor [n or 1, length], -1 = free, other values kept
    fixed throughout. temperature / top_k / top_p filter p_theta = s_theta (e^sigma - 1) before use.
    Returns full-length rows, prompt_len = len(prompt_ids), nfe = network calls; with ``return_trajectory``
    (absorbing) the step at which each position was revealed (``trajectory_NL``).
    """
    assert isinstance(process, SEDDProcess) and o.steps is not None
    is_fixed = start.fixed_NL >= 0
    z_init = process.transition.start(start.fixed_NL)
    filters = {"temperature": o.temperature, "top_k": o.top_k, "top_p": o.top_p}
    if not process.absorbing:
        run_uniform = {"analytic": uniform.analytic, "euler": uniform.euler}[sampler]
        out = run_uniform(
            lambda z, t: process.log_score(model, z, t), z_init, process.schedule, o.steps,
            process.specials.vocab_size, generator, is_fixed, **filters, return_trajectory=o.return_trajectory,
        )  # fmt: skip
    else:
        run = {"analytic": absorbing.ddpm, "euler": euler_absorbing}[sampler]
        out = run(
            process.denoiser(model), z_init, process.schedule, o.steps, generator, is_fixed,
            mask_id=process.mask_id, **filters, return_trajectory=o.return_trajectory,
        )  # fmt: skip
    return full_length_result(out.ids_BL, out.nfe, start.prompt_len, out.trajectory_BL)


def _euler(
    process: Process, model: torch.nn.Module, start: SampleStart, o: SamplerOptions, gen: torch.Generator | None
) -> SampleResult:
    return _run(process, model, start, o, gen, "euler")


def _analytic(
    process: Process, model: torch.nn.Module, start: SampleStart, o: SamplerOptions, gen: torch.Generator | None
) -> SampleResult:
    return _run(process, model, start, o, gen, "analytic")


_UNMASKING = unmasking.sampler_specs(unmasking.family_sampler)
