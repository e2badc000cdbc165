"""BD3-LM: block diffusion (Arriola et al. 2025, SPEC §3.6), between AR and masked diffusion.

A row of L tokens is cut into B = L / L' blocks x^1..x^B of L' = ``process.block_size`` tokens and

    log p(x) = sum_b log p(x^b | x^{<b}),

each factor a masked diffusion (MDLM's continuous-time NELBO, SUBS parameterisation, the same schedule) over the
L' tokens of block b, conditioned on the clean earlier blocks. One network serves every block:

    NELBO(x) = sum_b E_{t_b ~ U[0,1]} E_{z^b ~ q(.|x^b)} [ w(t_b) sum_{l in S ∩ b, z^l = m} -log p(x^l | z^b, x^{<b}) ]
    w(t) = -alpha'_t / (1 - alpha_t)            (= 1/t for the linear and loglinear schedules)

with one time t_b per block. S = the scored positions (``base.scored_positions``): position 0 is context only
(never masked, always clean; it lies in block 0) and padding is never masked or scored, as in every family.

Training runs ONE forward over z_t ⊕ x (length 2L) with the mask [[M_BD, M_OBC], [0, M_BC]]
(``masks.block_diffusion_train``): a noisy block sees itself (M_BD) and the clean earlier blocks (M_OBC), a clean
block sees the clean blocks up to itself (M_BC). Both halves take rotary positions 0..L-1 (the ``pos``
override), so a noisy token and its clean twin share a position; the loss reads the noisy half only. Sampling
runs block by block with the block-causal mask (``masks.block_causal``): the same attention pattern, since a
block being denoised sees its own noisy tokens and the finished (clean) blocks before it.

The network is never time-conditioned (one t per block; the backbone takes one t per row), so p_theta does not
depend on t and ``ddpm_cache`` is exact. Clipped schedules (``clip_beta``, ``clip_omega``): during training the
mask rate 1 - alpha_t is drawn from U[beta, omega] instead of t from U[0, 1] (paper §5.2; a lower-variance,
biased training objective); ``nll`` always estimates the full bound. The window in use is
``BD3LMProcess.clip_window`` (from the config at start); with ``process.clip_search`` (a grid of windows, paper
§5.3) the trainer replaces it at every validation by the window of least per-batch loss variance
(``dlm.train.loop.clip_search``) and checkpoints it.

Block sampling (``BlockDenoiser``, ``StopRules``, ``sample_blocks`` and the sampler table) lives in
``dlm.process.bd3lm_sampling``; its public names are re-exported here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, ClassVar

import torch
from torch import Tensor

from dlm.data.batch import Batch
from dlm.errors import DlmError
from dlm.model.masks import MaskFn, block_causal, block_diffusion_train
from dlm.process import absorbing
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
from dlm.process.bd3lm_sampling import SAMPLERS, BlockDenoiser, StopRules, check_sample_length, sample_blocks
from dlm.process.estimators import draw_masked_count
from dlm.process.losses import rows_weighted_loss
from dlm.process.mdlm import T_MIN
from dlm.process.schedules import SCHEDULE_PARAMS, build_schedule, sample_times
from dlm.process.transitions import AbsorbingTransition, Transition

BD3LM_FIELDS = frozenset({"block_size", "clip_beta", "clip_omega", "clip_search"})


@lru_cache(maxsize=64)
def _train_mask(seq_len: int, block_size: int) -> MaskFn:
    """The 2L training mask of (L, L'), built once per pair."""
    return block_diffusion_train(seq_len, block_size)


def check_block_size(block_size: Any) -> int:
    """``process.block_size`` as an integer >= 1 (one-line ``DlmError`` otherwise)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise DlmError(f"process.block_size (L') must be an integer >= 1, got {block_size!r}")
    return block_size


def check_clip_window(beta: Any, omega: Any) -> tuple[float, float]:
    """The clipped mask-rate window: 0 <= beta < omega <= 1 (one-line ``DlmError`` otherwise)."""
    try:
        b, w = float(beta), float(omega)
    except (TypeError, ValueError):
        raise DlmError(f"process.clip_beta / clip_omega must be numbers, got {beta!r}, {omega!r}") from None
    if not (math.isfinite(b) and math.isfinite(w) and 0.0 <= b < w <= 1.0):
        raise DlmError(f"the clipped window needs 0 <= clip_beta < clip_omega <= 1, got [{beta!r}, {omega!r}]")
    return b, w


def check_clip_grid(text: Any) -> list[tuple[float, float]]:
    """``process.clip_search`` as windows: the string "beta_1,omega_1,beta_2,omega_2,..." (commas or spaces) of at
    least two distinct windows, each 0 <= beta < omega <= 1; empty = no search. Anything else: one-line
    ``DlmError``. (A string, not a tuple of floats: the config stays the same through JSON and ``asdict``.)"""
    if not isinstance(text, str):
        raise DlmError(f"process.clip_search must be a string like '0,0.5,0.3,0.8,0.5,1', got {text!r}")
    words = [w for w in re.split(r"[,\s]+", text.strip().strip("[]()")) if w]
    if not words:
        return []
    try:
        values = [float(w) for w in words]
    except ValueError:
        raise DlmError(f"process.clip_search must hold numbers beta,omega,..., got {text!r}") from None
    if len(values) % 2 or len(values) < 4:
        raise DlmError(
            f"process.clip_search takes pairs beta,omega of at least two windows (e.g. 0,0.5,0.3,0.8,0.5,1), "
            f"got {len(values)} number(s)"
        )
    grid = []
    for beta, omega in zip(values[::2], values[1::2], strict=True):
        try:
            grid.append(check_clip_window(beta, omega))
        except DlmError:
            raise DlmError(f"process.clip_search: window [{beta!r}, {omega!r}] needs 0 <= beta < omega <= 1") from None
    if len(set(grid)) < len(grid):
        raise DlmError(f"process.clip_search lists a window twice: {[list(w) for w in grid]}")
    return grid


@register_process
class BD3LMProcess(Process):
    """Block diffusion: per-block masked-diffusion NELBO (one 2L forward), its K-sample bound, block samplers."""

    name: ClassVar[str] = "bd3lm"
    exact_likelihood: ClassVar[bool] = False
    beyond_context: ClassVar[bool] = True  # blocks past the context: sliding window (``BlockDenoiser``)
    default_sampler: ClassVar[str] = "ddpm"
    sampler_table: ClassVar[Mapping[str, SamplerSpec]] = SAMPLERS  # ddpm, ddpm_cache, first_hitting per block
    train_copies: ClassVar[int] = 2  # the training forward runs over z_t ⊕ x (2L tokens), the head on L rows

    def __init__(self, cfg: Any, specials: Any) -> None:
        super().__init__(cfg, specials)
        self.schedule = build_schedule(cfg)
        self.transition: Transition = AbsorbingTransition(specials)
        self.block_size: int = cfg.block_size
        self.row_multiple = self.block_size  # rows are whole blocks
        # the training window [beta, omega] of mask rates; the clipped-schedule search replaces it
        self.clip_window: tuple[float, float] = (float(cfg.clip_beta), float(cfg.clip_omega))
        self._attention = block_causal(cfg.block_size)

    @classmethod
    def check_config(cls, cfg: ProcessConfig) -> None:
        super().check_config(cfg)
        build_schedule(cfg)  # an unknown schedule or bad parameters raise here
        check_eval_t_samples(cfg)
        check_block_size(cfg.block_size)
        check_clip_window(cfg.clip_beta, cfg.clip_omega)
        check_clip_grid(cfg.clip_search)
        if cfg.time_cond:
            raise DlmError(
                "bd3lm has no time conditioning (one t per block, the backbone takes one per row): "
                "leave process.time_cond unset or false"
            )

    @classmethod
    def config_fields(cls, cfg: ProcessConfig) -> frozenset[str]:
        return CONTINUOUS_TIME_FIELDS | BD3LM_FIELDS | frozenset(SCHEDULE_PARAMS.get(cfg.schedule, ()))

    @property
    def attention(self) -> AttnSpec:
        """Block-causal attention of L' (sampling; training uses the 2L mask of ``noisy_logits``)."""
        return self._attention

    @property
    def mask_id(self) -> int:
        return self.specials.mask

    def default_steps(self, length: int) -> int:
        """One denoising step per position (the total over all blocks, as for MDLM)."""
        return length

    def min_steps(self, length: int) -> int:
        """One step per block at least (``_split_steps`` spreads the steps over the B = L / L' blocks)."""
        return self.n_blocks(length)

    def n_blocks(self, length: int) -> int:
        """B = L / L'; a length that L' does not divide raises a one-line ``DlmError`` naming both."""
        if length % self.block_size:
            raise DlmError(f"process.block_size (L' = {self.block_size}) must divide the sequence length ({length})")
        return length // self.block_size

    # ------------------------------------------------------------------------------------------- network

    def noisy_logits(self, model: torch.nn.Module, z_BL: Tensor, x_BL: Tensor, hidden: bool = False) -> Tensor:
        """The one-pass forward: logits [B, L, V] of p_theta(x^l | z^b, x^{<b}) at every position of z.

            logits = f_theta(z ⊕ x; mask [[M_BD, M_OBC], [0, M_BC]], positions (0..L-1, 0..L-1))[:, :L]

        The clean half serves as keys/values of the earlier blocks only: the backbone applies its final norm and
        head to the noisy half alone (``head_rows = L``), so the clean half's logits are never computed.
        ``hidden``: the head's input [B, L, D] of the noisy half instead (``model(..., return_hidden=True)``).
        """
        L = x_BL.shape[1]
        self.n_blocks(L)
        pos_2L = torch.arange(L, device=x_BL.device).repeat(2)
        extra = {"return_hidden": True} if hidden else {}
        zx_B2L = torch.cat([z_BL, x_BL], dim=1)
        return model(zx_B2L, attn=_train_mask(L, self.block_size), pos=pos_2L, head_rows=L, **extra)

    def block_times(
        self, n: int, generator: torch.Generator | None, device: torch.device, clipped: bool = False
    ) -> Tensor:
        """n block times, float64 [n] (antithetic over the n = batch x blocks draws when ``process.antithetic``).

        clipped = False (the bound): t ~ U[0, 1].  clipped = True (training) with a window [beta, omega] =
        ``self.clip_window`` other than [0, 1]: the mask rate p = 1 - alpha_t ~ U[beta, omega] and
        t = alpha^{-1}(1 - p). t is clamped to >= T_MIN.
        """
        beta, omega = self.clip_window
        if not clipped or (beta, omega) == (0.0, 1.0):
            t = sample_times(n, generator, antithetic=self.cfg.antithetic, device=device)
        else:
            p = sample_times(n, generator, antithetic=self.cfg.antithetic, device=device, t_min=beta, t_max=omega)
            t = self.schedule.t_of_alpha(1.0 - p)
        return t.clamp(min=T_MIN)

    def corrupt(self, batch: Batch, t_BN: Tensor, generator: torch.Generator | None) -> Tensor:
        """z ~ q(z | x) with alpha_{t_b} in block b (padding and position 0 kept clean): one float64 uniform per
        position, masked iff u < 1 - alpha (``absorbing.mask_tokens``)."""
        alpha_BL = self.schedule.alpha(t_BN).repeat_interleave(self.block_size, dim=1)
        return absorbing.mask_tokens(batch.ids_BL, alpha_BL, self.mask_id, generator, keep_BL=~scored_positions(batch))

    def draw(self, batch: Batch, generator: torch.Generator | None, clipped: bool) -> tuple[Tensor, Tensor]:
        """(t_BN, z_BL): one time per block (B x N drawn at once, row-major) and the corrupted batch."""
        B, L = batch.ids_BL.shape
        n = self.n_blocks(L)
        t_BN = self.block_times(B * n, generator, batch.ids_BL.device, clipped).view(B, n)
        return t_BN, self.corrupt(batch, t_BN, generator)

    # ------------------------------------------------------------------------------------------- loss

    def loss(
        self, model: torch.nn.Module, batch: Batch, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One-sample NELBO per token (nats/token), one forward over z ⊕ x:

            t_bn ~ U[0, 1] per row b and block n (antithetic over the B N draws; clipped: 1 - alpha_t ~ U[beta, omega])
            loss = sum_b sum_n w(t_bn) sum_{l in S_b, l in block n, z_b^l = m} -log p_theta(x_b^l | z_b^n, x_b^{<n})
                   / sum_b |S_b|

        p_theta is the SUBS distribution (MASK logit -inf) read from the noisy half of ``noisy_logits``. With the
        full window its expectation is the mean NELBO per scored token. Only the masked rows of the noisy half
        reach the output head (``losses.rows_weighted_loss``: chunked, MASK column excluded, no [B, L, V] logits).
        Stats (detached 0-dim tensors): ``nll`` and ``tokens``.
        """
        x_BL, real_BL = batch.ids_BL, scored_positions(batch)
        t_BN, z_BL = self.draw(batch, generator, clipped=True)
        scored_BL = (z_BL == self.mask_id) & real_BL
        tokens = real_BL.sum()
        u_BL = self.schedule.mdlm_weight(t_BN).float().repeat_interleave(self.block_size, dim=1) / tokens.clamp(min=1)
        loss = rows_weighted_loss(
            model,
            lambda hidden: self.noisy_logits(model, z_BL, x_BL, hidden),
            x_BL,
            u_BL,
            scored_BL,
            exclude=self.mask_id,
        )
        return loss, {"nll": loss.detach(), "tokens": tokens.detach().float()}

    # ------------------------------------------------------------------------------------------- bound

    @torch.no_grad()
    def nll(self, model: torch.nn.Module, batch: Batch, generator: torch.Generator | None = None) -> NLLResult:
        """Unbiased estimate of the NELBO per sequence, an upper bound: -log p(x_b) <= NELBO(x_b) ≈ nats_b, the
        sum over blocks of each block's masked-diffusion bound given the clean earlier blocks,

            NELBO(x) = sum_n int_0^1 w(t) E_{z^n ~ q(. | x^n)} [ sum_{l in S, l in n, z^l = m} -log p_theta(x^l | z^n,
                       x^{<n}) ] dt       (never clipped: the window only shapes training),

        each block's integral by the masked-count estimator (``dlm.process.estimators``, K =
        ``process.eval_t_samples`` draws per block): j ~ U{1..n_bn} masks among the block's n_bn scored positions,
        weight n_bn c_j, all blocks of a row in one forward (``noisy_logits``; the network takes no time):

            nats_b = (1/K) sum_k sum_n n_bn c_{j_bnk} sum_{l in M_bnk} -log p_theta(x_b^l | z_bk^n, x_b^{<n}).

        The K B N draws are made at once (stratified over them, row-major). With L' = L this is MDLM's estimate
        for the same random stream; with L' = 1 and a schedule that masks surely at t = 1 (linear) every draw
        masks the block's one token with weight 1, so nats_b is exactly the AR NLL of the same network.
        tokens_b = |S_b|; exact = False.
        """
        x_BL, K = batch.ids_BL, self.cfg.eval_t_samples
        B, L = x_BL.shape
        n = self.n_blocks(L)
        scored_BL = scored_positions(batch)
        rows = scored_BL.reshape(B * n, self.block_size).repeat(K, 1)
        masked, _, weight = draw_masked_count(rows, self.schedule, generator, antithetic=self.cfg.antithetic)
        masked_KBL, weight_KBN = masked.view(K, B, L), weight.view(K, B, n)
        nats_B = torch.zeros(B, dtype=torch.float64, device=x_BL.device)
        for k in range(K):
            m_BL = masked_KBL[k]
            sel = self.noisy_logits(model, torch.where(m_BL, self.mask_id, x_BL), x_BL)[m_BL].to(torch.float64)
            sel[:, self.mask_id] = float("-inf")
            nats_BL = torch.zeros(x_BL.shape, dtype=torch.float64, device=x_BL.device)
            nats_BL[m_BL] = -token_logprobs(sel, x_BL[m_BL])
            nats_B += (weight_KBN[k] * nats_BL.view(B, n, self.block_size).sum(2)).sum(1)
        return NLLResult(nats_B=nats_B / K, tokens_B=scored_BL.sum(1).to(torch.int64), exact=False)


__all__ = [
    "BD3LMProcess",
    "BlockDenoiser",
    "StopRules",
    "check_block_size",
    "check_clip_window",
    "check_sample_length",
    "sample_blocks",
]
