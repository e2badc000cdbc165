"""BD3-LM's block sampling (SPEC §3.6): the network as the denoiser of one block at a time (``BlockDenoiser``, with
an optional KV cache of the finished blocks and a sliding window past the model context), the stop rules between
blocks (``StopRules``), and ``sample_blocks``, which runs any absorbing sampler (ddpm, ddpm_cache, first_hitting and
those of ``dlm.process.unmasking``) block after block. ``SAMPLERS`` is the table ``BD3LMProcess.sampler_specs`` returns.

The process itself (config checks, masks, loss, bound) lives in ``dlm.process.bd3lm``; this module only needs
its ``block_size``, ``schedule``, ``transition``, ``mask_id``, ``specials`` and block-causal ``attention``.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor

from dlm.errors import DlmError
from dlm.process import absorbing, unmasking
from dlm.process.base import (
    Process,
    SampleResult,
    SamplerFn,
    SamplerOptions,
    SamplerSpec,
    SampleStart,
    model_context,
    model_device,
)

if TYPE_CHECKING:
    from dlm.process.bd3lm import BD3LMProcess


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


def _block_sampler(
    inner: absorbing.AbsorbingSampler, names: tuple[str, ...] = (), uses_steps: bool = True
) -> SamplerFn:
    """``sample_blocks`` with ``inner`` in every block; ``names``: the further ``SamplerOptions`` ``inner`` reads
    (``dlm.process.unmasking``), bound as keywords of the same names."""

    def run(
        process: Process, model: torch.nn.Module, start: SampleStart, o: SamplerOptions, gen: torch.Generator | None
    ) -> SampleResult:
        assert o.steps is not None, "the dispatcher resolves the steps"
        bound = partial(inner, **{name: getattr(o, name) for name in names}) if names else inner
        return sample_blocks(cast("BD3LMProcess", process), model, start, o, gen, bound, uses_steps)

    return run


# The inner sampler of every block. The network is never time-conditioned (check_config), so ddpm_cache is exact
# here and is not marked time_independent (that flag refuses time-conditioned networks, which bd3lm never has).
# Stop rules are opt-in (stop_at_eos off by default): rows are full length unless asked, like the other diffusion
# families.
_EXTRA = ("use_cache", "stop_at_eos", "stop_entropy")
_DEFAULTS = {"stop_at_eos": False}
SAMPLERS: Mapping[str, SamplerSpec] = {
    "ddpm": SamplerSpec(_block_sampler(absorbing.ddpm), extra_options=_EXTRA, option_defaults=_DEFAULTS),
    "ddpm_cache": SamplerSpec(_block_sampler(absorbing.ddpm_cache), extra_options=_EXTRA, option_defaults=_DEFAULTS),
    "first_hitting": SamplerSpec(
        _block_sampler(absorbing.first_hitting, uses_steps=False),
        nfe_within_steps=False,
        steps_ignored=True,
        extra_options=_EXTRA,
        option_defaults=_DEFAULTS,
    ),
    # remdm, confidence, llada, entropy_bounded, threshold inside each block (``steps`` split over the blocks as
    # above; entropy_bounded and threshold take as many calls as their rules need)
    **unmasking.sampler_specs(_block_sampler, _EXTRA, _DEFAULTS),
}

__all__ = [
    "SAMPLERS",
    "BlockDenoiser",
    "StopRules",
    "check_sample_length",
    "sample_blocks",
]
