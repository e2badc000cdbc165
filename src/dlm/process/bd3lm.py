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
    SampleResult,
    SamplerFn,
    SamplerOptions,
    SamplerSpec,
    SampleStart,
    check_eval_t_samples,
    model_context,
    model_device,
    register_process,
    scored_positions,
    token_logprobs,
)
from dlm.process.mdlm import T_MIN, masked_cross_entropy
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

    def __init__(self, cfg: Any, specials: Any) -> None:
        super().__init__(cfg, specials)
        self.schedule = build_schedule(cfg)
        self.transition: Transition = AbsorbingTransition(specials)
        self.block_size: int = cfg.block_size
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

    def sampler_specs(self) -> Mapping[str, SamplerSpec]:
        return _SAMPLERS

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

    def noisy_logits(self, model: torch.nn.Module, z_BL: Tensor, x_BL: Tensor) -> Tensor:
        """The one-pass forward: logits [B, L, V] of p_theta(x^l | z^b, x^{<b}) at every position of z.

            logits = f_theta(z ⊕ x; mask [[M_BD, M_OBC], [0, M_BC]], positions (0..L-1, 0..L-1))[:, :L]

        Only the noisy half is returned; the clean half serves as keys/values of the earlier blocks.
        """
        L = x_BL.shape[1]
        self.n_blocks(L)
        pos_2L = torch.arange(L, device=x_BL.device).repeat(2)
        logits = model(torch.cat([z_BL, x_BL], dim=1), attn=_train_mask(L, self.block_size), pos=pos_2L)
        return logits[:, :L]

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
            t = absorbing.inverse_alpha(self.schedule, 1.0 - p)
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
    ) -> tuple[Tensor, dict[str, float]]:
        """One-sample NELBO per token (nats/token), one forward over z ⊕ x:

            t_bn ~ U[0, 1] per row b and block n (antithetic over the B N draws; clipped: 1 - alpha_t ~ U[beta, omega])
            loss = sum_b sum_n w(t_bn) sum_{l in S_b, l in block n, z_b^l = m} -log p_theta(x_b^l | z_b^n, x_b^{<n})
                   / sum_b |S_b|

        p_theta is the SUBS distribution (MASK logit -inf) read from the noisy half of ``noisy_logits``. With the
        full window its expectation is the mean NELBO per scored token. Stats: ``nll`` and ``tokens``.
        """
        x_BL, real_BL = batch.ids_BL, scored_positions(batch)
        t_BN, z_BL = self.draw(batch, generator, clipped=True)
        scored_BL = (z_BL == self.mask_id) & real_BL
        logits = self.noisy_logits(model, z_BL, x_BL)
        ce_N = masked_cross_entropy(logits, scored_BL, x_BL, self.mask_id)
        w_BL = self.schedule.mdlm_weight(t_BN).repeat_interleave(self.block_size, dim=1)
        tokens = real_BL.sum()
        loss = (w_BL[scored_BL].to(ce_N.dtype) * ce_N).sum() / tokens.clamp(min=1)
        return loss, {"nll": float(loss.detach()), "tokens": float(tokens)}

    # ------------------------------------------------------------------------------------------- bound

    @torch.no_grad()
    def nelbo_terms(
        self, model: torch.nn.Module, batch: Batch, t_BN: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """The bound's integrand at given block times, float64 [B]:

            sum_n w(t_bn) sum_{l in S_b, l in block n, z^l = m} -log p_theta(x^l | z^n, x^{<n}),  z ~ q(. | x)

        (-log p_theta in float64 from the float32 logits).
        """
        x_BL = batch.ids_BL
        z_BL = self.corrupt(batch, t_BN, generator)
        masked_BL = (z_BL == self.mask_id) & scored_positions(batch)
        sel = self.noisy_logits(model, z_BL, x_BL)[masked_BL].to(torch.float64)
        sel[:, self.mask_id] = float("-inf")
        nats_BL = torch.zeros(x_BL.shape, dtype=torch.float64, device=x_BL.device)
        nats_BL[masked_BL] = -token_logprobs(sel, x_BL[masked_BL])
        w_BL = self.schedule.mdlm_weight(t_BN).repeat_interleave(self.block_size, dim=1)
        return (torch.where(masked_BL, w_BL, 0.0) * nats_BL).sum(1)

    @torch.no_grad()
    def nll(self, model: torch.nn.Module, batch: Batch, generator: torch.Generator | None = None) -> NLLResult:
        """Unbiased estimate of the NELBO per sequence, an upper bound: -log p(x_b) <= NELBO(x_b) ≈ nats_b.

            nats_b = (1/K) sum_{k=1..K} nelbo_terms(t_k)_b,   t_k: one time per block, t ~ U[0, 1] (never clipped)

        K = ``process.eval_t_samples``; the K B N times are drawn at once (antithetic: evenly spaced over them),
        then K forwards of the batch. tokens_b = |S_b|; exact = False. With L' = L this is MDLM's estimate for
        the same random stream.
        """
        x_BL, K = batch.ids_BL, self.cfg.eval_t_samples
        B, L = x_BL.shape
        n = self.n_blocks(L)
        t_KBN = self.block_times(K * B * n, generator, x_BL.device).view(K, B, n)
        nats_B = torch.zeros(B, dtype=torch.float64, device=x_BL.device)
        for k in range(K):
            nats_B += self.nelbo_terms(model, batch, t_KBN[k], generator)
        return NLLResult(nats_B=nats_B / K, tokens_B=scored_positions(batch).sum(1).to(torch.int64), exact=False)


# ----------------------------------------------------------------------------------------------- sampling


class BlockDenoiser:
    """The network as the denoiser of one block at a time, given the finished blocks before it.

    Uncached: every call runs f_theta(window ⊕ z^b) with the block-causal mask and returns the logits of z^b
    (the prefix is recomputed each call). Cached: the keys/values of the window live in a KV cache; finished
    blocks wait in ``pending`` and are committed by the next network call, which runs f_theta(pending ⊕ z^b)
    with commit (the pending blocks see the cache and themselves, block-causally, never z^b) and then drops z^b
    from the cache again, so committing costs no extra call. Both compute the same attention pattern; ``nfe``
    counts every forward.

    The window is every finished block while the next block fits in the model context C (rotary positions
    0, 1, ... from the start of the row). A longer generation slides: when the next block would end past C, the
    window keeps its last ``keep`` blocks, keep = min(max(1, floor(C / 2 / L')), floor((C - L') / L')), and
    positions start again at 0 with the oldest kept token (the cached variant re-encodes the kept blocks on its
    next call, again without an extra forward). So every block sees between keep L' and C - L' clean tokens
    once the row is longer than C, each window reads as a training row (which also starts mid-stream), and
    ``slides`` counts the restarts.

    track_entropy: also record, per position of the current block, the entropy of the SUBS distribution
    p_theta(x^l | z^b, window) (MASK excluded, temperature 1, no top-k/top-p) at every call where l is still
    masked: H_l = -sum_v p_v log p_v in float64 nats. The last record of a position is the call whose
    distribution its token was drawn from (every inner sampler draws a revealed token from the latest call;
    ``ddpm_cache`` reuses exactly that call). ``start_block`` clears the record.
    """

    def __init__(
        self,
        process: BD3LMProcess,
        model: torch.nn.Module,
        n: int,
        length: int,
        cached: bool,
        track_entropy: bool = False,
    ) -> None:
        self.process, self.model = process, model
        self.block = process.block_size
        self.context = model_context(model) or length
        if self.context < self.block:
            raise DlmError(f"the model context ({self.context}) is shorter than one block (L' = {self.block})")
        fit = (self.context - self.block) // self.block  # finished blocks that fit beside the next one
        self.keep = min(max(1, self.context // 2 // self.block), fit)
        capacity = min(length, self.context)
        self.cache = model.init_cache(n, capacity, device=model_device(model)) if cached else None
        self.window: list[Tensor] = []  # the finished blocks the next block sees, in order
        self.pending: list[Tensor] = []  # those not yet in the cache
        self.nfe = 0
        self.slides = 0
        self.track_entropy = track_entropy
        self.entropy_NB: Tensor | None = None  # H_l of the current block (track_entropy), float64

    def start_block(self, n: int) -> None:
        """A new block begins: its entropy record starts at 0 (``track_entropy``)."""
        if self.track_entropy:
            self.entropy_NB = torch.zeros(n, self.block, dtype=torch.float64, device=model_device(self.model))

    def finish(self, block_NB: Tensor) -> None:
        """Block b is final: later blocks condition on it (within the window)."""
        self.window.append(block_NB)
        self.pending.append(block_NB)
        if (len(self.window) + 1) * self.block > self.context:
            self.window = self.window[len(self.window) - self.keep :]
            self.slides += 1
            if self.cache is not None:
                self.cache.reset()
                self.pending = list(self.window)

    def __call__(self, z_NB: Tensor, t_N: Tensor) -> Tensor:
        del t_N  # the network is time-independent
        logits_NBV = self._forward(z_NB)
        if self.track_entropy:
            self._record_entropy(z_NB, logits_NBV)
        return logits_NBV

    def _record_entropy(self, z_NB: Tensor, logits_NBV: Tensor) -> None:
        """H_l = sum_v entr(p_v), p = softmax of the float64 logits with the MASK logit at -inf, at the masked
        positions of this call only (the others keep their record)."""
        assert self.entropy_NB is not None, "start_block before the first call of a block"
        masked_NB = z_NB == self.process.mask_id
        if not bool(masked_NB.any()):
            return
        rows_MV = logits_NBV[masked_NB].to(torch.float64)
        rows_MV[:, self.process.mask_id] = float("-inf")
        self.entropy_NB[masked_NB] = torch.special.entr(torch.softmax(rows_MV, dim=-1)).sum(-1)

    def _forward(self, z_NB: Tensor) -> Tensor:
        self.nfe += 1
        attn, Lb = self.process.attention, z_NB.shape[1]
        if self.cache is None:
            return self.model(torch.cat([*self.window, z_NB], dim=1), attn=attn)[:, -Lb:]
        if not self.pending:
            return self.model(z_NB, attn=attn, cache=self.cache, commit=False)
        logits = self.model(torch.cat([*self.pending, z_NB], dim=1), attn=attn, cache=self.cache, commit=True)
        self.cache.truncate(self.cache.length - Lb)
        self.pending.clear()
        return logits[:, -Lb:]


class StopRules:
    """The stop rules of unconditional and prefix sampling, applied after each finished block b (columns
    c_b .. c_b + L' - 1) to the rows still running, in this order:

        eos:     stop_at_eos and a generated (free) position of block b holds EOS: the row ends after the first
                 such position p, length = p + 1
        entropy: stop_entropy = h and (1/|F_b|) sum_{l in F_b} H_l < h, F_b the free positions of block b and H_l
                 the entropy of the distribution x^l was drawn from (``BlockDenoiser`` track_entropy): the row
                 ends with block b, length = c_b + L'
        length:  a row that no rule stopped has the requested length

    A stopped row keeps its tokens up to its length (later positions get the pad id); it is never rejected or
    redrawn. Rows run on with the batch (their later draws discarded), so every row's random stream, and hence
    the tokens it keeps, are those of the same call without the rules. Blocks without a free position are not
    checked.
    """

    def __init__(self, n: int, length: int, eos: int | None, threshold: float | None, device: torch.device) -> None:
        self.eos, self.threshold = eos, threshold
        self.lengths_N = torch.full((n,), length, dtype=torch.int64, device=device)
        self.running_N = torch.ones(n, dtype=torch.bool, device=device)
        self.reasons = ["length"] * n

    @property
    def active(self) -> bool:
        return self.eos is not None or self.threshold is not None

    @property
    def all_stopped(self) -> bool:
        return not bool(self.running_N.any())

    def after_block(self, block_NB: Tensor, free_NB: Tensor, first_col: int, entropy_NB: Tensor | None) -> None:
        """Apply the rules to the rows still running after a finished block starting at column ``first_col``."""
        if not bool(free_NB.any()):
            return
        if self.eos is not None:
            hit_NB = (block_NB == self.eos) & free_NB
            first_N = torch.where(hit_NB.any(1), hit_NB.to(torch.int64).argmax(1), -1)
            self._stop((first_N >= 0) & self.running_N, first_col + first_N + 1, "eos")
        if self.threshold is not None:
            assert entropy_NB is not None
            count_N = free_NB.sum(1)
            mean_N = torch.where(free_NB, entropy_NB, 0.0).sum(1) / count_N.clamp(min=1)
            low_N = (count_N > 0) & (mean_N < self.threshold) & self.running_N
            self._stop(low_N, torch.full_like(self.lengths_N, first_col + block_NB.shape[1]), "entropy")

    def _stop(self, rows_N: Tensor, lengths_N: Tensor, reason: str) -> None:
        self.lengths_N = torch.where(rows_N, lengths_N, self.lengths_N)
        self.running_N &= ~rows_N
        for i in rows_N.nonzero(as_tuple=True)[0].tolist():
            self.reasons[i] = reason

    def cut(self, ids_NL: Tensor, pad: int) -> Tensor:
        """``ids_NL`` with every position at or after a row's length set to the pad id."""
        col_L = torch.arange(ids_NL.shape[1], device=ids_NL.device)
        return torch.where(col_L[None] >= self.lengths_N[:, None], pad, ids_NL)


def _split_steps(steps: int, blocks: int) -> list[int]:
    """``steps`` spread over ``blocks`` blocks as evenly as possible (earlier blocks take the remainder)."""
    if steps < blocks:
        raise DlmError(f"steps ({steps}) must be at least the number of blocks to generate ({blocks})")
    return [steps // blocks + (i < steps % blocks) for i in range(blocks)]


def check_sample_length(length: int, block_size: int, context: int | None) -> int:
    """The number of blocks of a sample of ``length`` tokens: L' must divide it (blocks are drawn whole), within
    the model context and past it (one-line ``DlmError`` otherwise)."""
    if length % block_size:
        where = "" if context is None else f", within the model context ({context}) and past it"
        raise DlmError(
            f"process.block_size (L' = {block_size}) must divide the sample length ({length}): "
            f"blocks are drawn whole{where}"
        )
    return length // block_size


def sample_blocks(
    process: BD3LMProcess,
    model: torch.nn.Module,
    start: SampleStart,
    o: SamplerOptions,
    generator: torch.Generator | None,
    inner: absorbing.AbsorbingSampler,
    uses_steps: bool,
) -> SampleResult:
    """Semi-autoregressive sampling (SPEC §3.6): blocks b = 0..B-1 in order, each drawn from all-MASK by the
    absorbing sampler ``inner`` (ddpm, ddpm_cache, first_hitting) with p_theta(x^b | z^b, x^{<b}) from
    ``BlockDenoiser``; fixed positions (prompt, fixed ids) stay as given and blocks without a free position
    are skipped. ``steps`` is the total over the blocks to generate, split evenly (``_split_steps``; every
    such block needs one); first_hitting takes one call per free position instead. The trajectory counts
    steps across blocks (block b's steps follow those of earlier blocks). nfe = the number of forwards.

    Any length that L' divides, also past the model context C: the finished blocks are then seen through the
    sliding window of ``BlockDenoiser`` (positions restart at 0 with the oldest kept block), the KV cache holds
    at most C tokens.

    Unconditional and prefix sampling apply the stop rules of ``StopRules`` between blocks (``stop_at_eos``,
    ``stop_entropy``); generation ends once every row has stopped, and ``stop_N`` records what ended each row.
    Fixed ids inside a later block (infilling) are kept and seen by their own block and the blocks after it,
    never by earlier blocks (left-to-right conditioning); infill rows are full length (``Process.sample`` refuses
    a stop rule with them; here a start with fixed ids after the prompt runs without the rules).
    """
    fixed_NL = start.fixed_NL
    n, length = fixed_NL.shape
    Lb = process.block_size
    n_blocks = check_sample_length(length, Lb, model_context(model))
    is_fixed_NL = fixed_NL >= 0
    z_NL = process.transition.start(fixed_NL)
    todo = [b for b in range(n_blocks) if not bool(is_fixed_NL[:, b * Lb : (b + 1) * Lb].all())]
    steps = dict(zip(todo, _split_steps(o.steps, len(todo)) if uses_steps else [0] * len(todo), strict=True))
    traj_NL = torch.full_like(fixed_NL, -1) if o.return_trajectory else None
    infill = bool(is_fixed_NL[:, start.prompt_len :].any())
    eos = process.specials.eos if o.stop_at_eos and not infill else None
    stops = StopRules(n, length, eos, None if infill else o.stop_entropy, fixed_NL.device)
    denoiser = BlockDenoiser(process, model, n, length, cached=o.use_cache, track_entropy=stops.threshold is not None)
    offset = 0
    for b in range(n_blocks):
        cols = slice(b * Lb, (b + 1) * Lb)
        if b in steps:
            denoiser.start_block(n)
            out = inner(
                denoiser, z_NL[:, cols], process.schedule, steps[b], generator, is_fixed_NL[:, cols],
                mask_id=process.mask_id, temperature=o.temperature, top_k=o.top_k, top_p=o.top_p,
                return_trajectory=o.return_trajectory,
            )  # fmt: skip
            z_NL[:, cols] = out.ids_BL
            if traj_NL is not None and out.trajectory_BL is not None:
                traj_NL[:, cols] = torch.where(out.trajectory_BL >= 0, out.trajectory_BL + offset, -1)
            offset += steps[b] if uses_steps else out.nfe
            stops.after_block(z_NL[:, cols], ~is_fixed_NL[:, cols], b * Lb, denoiser.entropy_NB)
            if stops.all_stopped:
                break
        denoiser.finish(z_NL[:, cols])
    ids_NL = stops.cut(z_NL, process.specials.pad)
    assert not bool((ids_NL == process.mask_id).any()), "every position is drawn or cut"
    if traj_NL is not None:
        traj_NL = stops.cut(traj_NL, -1)
    return SampleResult(ids_NL, stops.lengths_N, denoiser.nfe, start.prompt_len, traj_NL, list(stops.reasons))


def _block_sampler(inner: absorbing.AbsorbingSampler, uses_steps: bool = True) -> SamplerFn:
    def run(
        process: Process, model: torch.nn.Module, start: SampleStart, o: SamplerOptions, gen: torch.Generator | None
    ) -> SampleResult:
        assert isinstance(process, BD3LMProcess) and o.steps is not None
        return sample_blocks(process, model, start, o, gen, inner, uses_steps)

    return run


# The inner sampler of every block. The network is never time-conditioned (check_config), so ddpm_cache is exact
# here and is not marked time_independent (that flag refuses time-conditioned networks, which bd3lm never has).
# Stop rules are opt-in (stop_at_eos off by default): rows are full length unless asked, like the other diffusion
# families.
_EXTRA = ("use_cache", "stop_at_eos", "stop_entropy")
_DEFAULTS = {"stop_at_eos": False}
_SAMPLERS: Mapping[str, SamplerSpec] = {
    "ddpm": SamplerSpec(_block_sampler(absorbing.ddpm), extra_options=_EXTRA, option_defaults=_DEFAULTS),
    "ddpm_cache": SamplerSpec(_block_sampler(absorbing.ddpm_cache), extra_options=_EXTRA, option_defaults=_DEFAULTS),
    "first_hitting": SamplerSpec(
        _block_sampler(absorbing.first_hitting, uses_steps=False),
        nfe_within_steps=False,
        extra_options=_EXTRA,
        option_defaults=_DEFAULTS,
    ),
}

__all__ = [
    "BD3LMProcess",
    "BlockDenoiser",
    "StopRules",
    "check_block_size",
    "check_clip_window",
    "check_sample_length",
    "sample_blocks",
]
