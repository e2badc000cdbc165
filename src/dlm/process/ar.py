"""Autoregressive language modelling: next-token loss, exact likelihood, KV-cache sampling.

    -log p(x) = sum_{i=2..L} -log p_theta(x^i | x^<i)

The first token of a row has no context and is not scored: rows start with BOS (``pad`` shards) or in the
middle of a stream (``wrap`` shards), and in both cases the model predicts positions 2..L only (0-based 1..L-1,
``base.scored_positions``: the same tokens every diffusion family scores).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor

from dlm.data.batch import Batch
from dlm.data.specials import SpecialIds
from dlm.errors import DlmError
from dlm.process.base import (
    AttnSpec,
    NLLResult,
    Process,
    ProcessConfig,
    SampleResult,
    SamplerOptions,
    SamplerSpec,
    SampleStart,
    model_device,
    register_process,
    scored_positions,
    token_logprobs,
)
from dlm.process.losses import rows_weighted_loss
from dlm.process.sampling import _uniforms, sample_categorical

STOP_CHECK_EVERY = 16  # static decoding asks the device "has every row stopped?" once per this many tokens
# Static decoding draws the uniforms of STOP_CHECK_EVERY tokens in one call (one host-to-device copy per block
# instead of one per token) when None and the generator lives on another device than the model (a CPU generator
# driving a GPU model); True / False force it on / off (tests).
BLOCK_UNIFORMS: bool | None = None


def ancestral(
    process: Process,
    model: torch.nn.Module,
    start: SampleStart,
    o: SamplerOptions,
    generator: torch.Generator | None,
) -> SampleResult:
    """Ancestral sampling x^i ~ p_theta(. | x^{<i}) token by token, n rows in one batch.

    The prompt (default: [BOS]) is prefilled in one forward; each further token costs one forward of
    the newest token against the KV cache (``use_cache=False`` recomputes the whole prefix instead,
    drawing identical tokens from the same random stream). Every step draws one float64 uniform per
    row (``sampling.sample_categorical``: temperature, top_k, top_p). A row stops after emitting EOS
    (kept) when ``stop_at_eos``; later positions hold the pad id. Generation ends when every row has
    stopped or ``length`` tokens (prompt included) are reached; ``stop_N`` says which ("eos" or "length").

    Two cached paths draw the same tokens: a backbone with ``static_decode`` (the dlm Transformer) steps
    through ``model.decoder`` (static shapes, a CUDA graph on CUDA, no host synchronisation per token:
    ``_static_decode``); others (gpt2-hf, test doubles, or ``static_decode = False``) call the forward with
    a growing cache and check "every row stopped" after each token.

    nfe counts forward calls. Growing cache and ``use_cache=False``: one per generated position before the
    loop ends, i.e. with G sampled positions nfe = G (cached: 1 prefill + G - 1 single-token steps;
    uncached: G full prefixes); no forward is spent after the last sampled token. Static decoding checks
    for "every row stopped" only every ``STOP_CHECK_EVERY`` tokens, so when every row has stopped at EOS
    before ``length`` it may run up to STOP_CHECK_EVERY - 1 further steps: its nfe counts them (G <= nfe
    <= G + STOP_CHECK_EVERY - 1, always <= length - prompt length), while the ids, lengths, stop reasons
    and the generator's final state equal those of the other paths (the surplus draws are rewound).
    """
    specials, attn, P = process.specials, process.attention, start.prompt_len
    n, length = start.fixed_NL.shape
    device = model_device(model)
    ids_NL = torch.full((n, length), specials.pad, dtype=torch.int64, device=device)
    ids_NL[:, :P] = start.fixed_NL[:, :P]
    lengths_N = torch.full((n,), length, dtype=torch.int64, device=device)
    done_N = torch.zeros(n, dtype=torch.bool, device=device)
    if o.use_cache and getattr(model, "static_decode", False):
        nfe = _static_decode(model, attn, ids_NL, lengths_N, done_N, P, specials, o, generator)
    else:
        cache = model.init_cache(n, length, device=device) if o.use_cache else None
        logits_NLV = model(ids_NL[:, :P], attn=attn, cache=cache)
        nfe = 1
        for pos in range(P, length):
            _draw(logits_NLV[:, -1], pos, ids_NL, lengths_N, done_N, specials, o, generator)
            if pos + 1 == length or bool(done_N.all()):
                break
            if o.use_cache:
                logits_NLV = model(ids_NL[:, pos : pos + 1], attn=attn, cache=cache)
            else:
                logits_NLV = model(ids_NL[:, : pos + 1], attn=attn)
            nfe += 1
    stop_N = ["eos" if bool(d) else "length" for d in done_N.tolist()]  # what ended each row (base.STOP_REASONS)
    return SampleResult(ids_NL=ids_NL, lengths_N=lengths_N, nfe=nfe, prompt_len=P, stop_N=stop_N)


def _draw(
    logits_NV: Tensor,
    pos: int,
    ids_NL: Tensor,
    lengths_N: Tensor,
    done_N: Tensor,
    specials: SpecialIds,
    o: SamplerOptions,
    generator: torch.Generator | None,
    u_N: Tensor | None = None,
) -> Tensor:
    """Sample position ``pos`` of every row into ids_NL (pad for stopped rows), update the EOS bookkeeping in
    place on the device (no host synchronisation), and return the tokens [N]. ``u_N``: the row uniforms, drawn
    beforehand (else N are drawn from ``generator``)."""
    tok_N = sample_categorical(
        logits_NV, temperature=o.temperature, top_k=o.top_k, top_p=o.top_p, generator=generator, u_N=u_N
    )
    tok_N = torch.where(done_N, specials.pad, tok_N)
    ids_NL[:, pos] = tok_N
    if o.stop_at_eos:
        stopped_N = ~done_N & (tok_N == specials.eos)
        lengths_N.masked_fill_(stopped_N, pos + 1)
        done_N |= stopped_N
    return tok_N


def _static_decode(
    model: torch.nn.Module,
    attn: AttnSpec,
    ids_NL: Tensor,
    lengths_N: Tensor,
    done_N: Tensor,
    P: int,
    specials: SpecialIds,
    o: SamplerOptions,
    generator: torch.Generator | None,
) -> int:
    """``ancestral``'s loop over ``model.decoder``; fills ids_NL, lengths_N, done_N in place, returns nfe.

    The generator's state after each draw since the last stop check is kept (host copies, no device work),
    so that when every row turns out to have stopped at step s* < the check, the draws of steps after s*
    are undone: the stream continues exactly where the per-token-check paths leave it.

    Block uniforms (``BLOCK_UNIFORMS``; by default for a generator on another device than the model): the
    uniforms of the tokens up to the next stop check, [k <= STOP_CHECK_EVERY, N], are drawn in one call and
    copied to the device once. A generator's numbers do not depend on how a run of draws is split into calls
    of the same dtype on a CPU generator, so the tokens are those of one draw of N per token; a rewind restores
    the state before the block and draws again the uniforms of the tokens up to s*.
    """
    n, length = ids_NL.shape
    device = ids_NL.device
    amp = torch.is_autocast_enabled(device.type)  # keys come out in the autocast dtype: store them so (exact,
    dtype = torch.get_autocast_dtype(device.type) if amp else None  # and no full-cache cast per step)
    cache = model.init_cache(n, length, device=device, dtype=dtype)
    logits_NV = model(ids_NL[:, :P], attn=attn, cache=cache)[:, -1]
    decoder = model.decoder(cache) if length - P > 1 else None  # (capturing costs a few forwards on CUDA)
    rng = _stream(generator, device) if o.stop_at_eos else None
    blocks = BLOCK_UNIFORMS if BLOCK_UNIFORMS is not None else generator is not None and generator.device != device
    states: dict[int, Tensor] = {}  # per token, or (blocks) the state before the current block at its first pos
    u_kN: Tensor | None = None
    nfe = 1
    for pos in range(P, length):
        j = (pos - P) % STOP_CHECK_EVERY
        if blocks and j == 0:
            if rng is not None:
                states[pos] = rng.get_state()
            u_kN = _uniforms((min(STOP_CHECK_EVERY, length - pos), n), generator, device)
        tok_N = _draw(
            logits_NV, pos, ids_NL, lengths_N, done_N, specials, o, generator, None if u_kN is None else u_kN[j]
        )
        if rng is not None and not blocks:
            states[pos] = rng.get_state()
        if pos + 1 == length:
            break
        if o.stop_at_eos and (pos + 1 - P) % STOP_CHECK_EVERY == 0:
            if bool(done_N.all()):
                break
            states.clear()  # some row is still going: the last stop comes later, earlier states are not needed
        assert decoder is not None
        logits_NV = decoder.step(tok_N)
        nfe += 1
    if rng is not None and bool(done_N.all()):
        last = int(lengths_N.max()) - 1  # the step of the last stop: the per-token paths drew up to it
        if blocks:
            first = last - (last - P) % STOP_CHECK_EVERY  # the block it lies in (the current one)
            rng.set_state(states[first])
            _uniforms((last - first + 1, n), rng, device)
        else:
            rng.set_state(states[last])
    return nfe


def _stream(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """The generator ``sample_categorical`` draws from (the device's default one when None is given); None
    where that default is not reachable (then surplus draws are not rewound)."""
    if generator is not None:
        return generator
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    return None


@register_process
class ARProcess(Process):
    """Causal next-token prediction with the backbone in causal attention mode, no time input."""

    name: ClassVar[str] = "ar"
    exact_likelihood: ClassVar[bool] = True
    conditioning: ClassVar[str] = "prefix"
    step_sampler: ClassVar[bool] = False
    sampler_table: ClassVar[Mapping[str, SamplerSpec]] = {
        "ancestral": SamplerSpec(
            ancestral, takes_steps=False, trajectory=False, extra_options=("use_cache", "stop_at_eos")
        )
    }
    default_sampler: ClassVar[str] = "ancestral"

    @classmethod
    def check_config(cls, cfg: ProcessConfig) -> None:
        super().check_config(cfg)
        if cfg.time_cond:
            raise DlmError("the AR family has no time conditioning: leave process.time_cond unset or false")

    @classmethod
    def config_fields(cls, cfg: ProcessConfig) -> frozenset[str]:
        return frozenset({"name", "time_cond"})

    @property
    def attention(self) -> AttnSpec:
        return "causal"

    def _shifted(self, model: torch.nn.Module, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """Logits for positions 1..L-1 given the prefix, their targets and which of them are scored."""
        ids_BL = batch.ids_BL
        if ids_BL.ndim != 2 or ids_BL.shape[1] < 2:
            raise DlmError(f"AR needs rows of at least 2 tokens, got ids of shape {tuple(ids_BL.shape)}")
        logits_BLV = model(ids_BL[:, :-1], attn=self.attention)
        return logits_BLV, ids_BL[:, 1:], scored_positions(batch)[:, 1:]

    def loss(
        self, model: torch.nn.Module, batch: Batch, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean next-token cross-entropy over the scored targets (nats/token).

            loss = (1 / |S|) sum_{(b, i) in S} -log softmax(f_theta(x_b^{<i}))[x_b^i],
            S = {(b, i) : i >= 2, mask_b^i}

        Padding targets are excluded; as attention is causal, padding (at the end of a row) never reaches
        a scored position. The cross-entropy runs over every position (static shapes: selecting S would cost a
        host synchronisation, and in ``wrap`` shards S is every position) chunk by chunk through the head with
        weights u = [in S] / |S| (``losses.rows_weighted_loss``: no [B, L, V] float32 logits).
        Stats (detached 0-dim tensors, read by the caller when it logs): ``nll`` (the loss value), ``tokens`` (|S|).
        """
        ids_BL = batch.ids_BL
        if ids_BL.ndim != 2 or ids_BL.shape[1] < 2:
            raise DlmError(f"AR needs rows of at least 2 tokens, got ids of shape {tuple(ids_BL.shape)}")
        targets_BL, scored_BL = ids_BL[:, 1:], scored_positions(batch)[:, 1:]

        def run(hidden: bool) -> Tensor:
            return model(ids_BL[:, :-1], attn=self.attention, **({"return_hidden": True} if hidden else {}))

        count = scored_BL.sum()
        loss = rows_weighted_loss(model, run, targets_BL, scored_BL / count.clamp(min=1))
        return loss, {"nll": loss.detach(), "tokens": count.detach().float()}

    @torch.no_grad()
    def nll(self, model: torch.nn.Module, batch: Batch, generator: torch.Generator | None = None) -> NLLResult:
        """Exact per-sequence NLL: nats_b = sum_{i >= 2, mask_b^i} -log p_theta(x_b^i | x_b^{<i}).

        log-softmax is taken in float64 from the model's float32 logits (chunked over tokens), so the sums
        are exact to float64 rounding given the logits; tokens_b counts the scored targets (the first token
        of each row is context only).
        """
        logits_BLV, targets_BL, scored_BL = self._shifted(model, batch)
        logp_S = token_logprobs(logits_BLV[scored_BL], targets_BL[scored_BL])
        nats_BL = torch.zeros(targets_BL.shape, dtype=torch.float64, device=logp_S.device)
        nats_BL[scored_BL] = -logp_S
        return NLLResult(nats_B=nats_BL.sum(1), tokens_B=scored_BL.sum(1).to(torch.int64), exact=True)
