"""What every process (AR, D3PM, MDLM, SEDD, BD3-LM) offers the trainer, the evaluator and the sampler.

A process owns the mathematics of one family: how a clean batch becomes network inputs, the training
loss, the per-sequence likelihood (exact or an upper bound) and its samplers. It declares the attention
mode and whether the network is time-conditioned; the backbone never learns which process uses it.

Processes register themselves by name (``@register_process``) and are built with ``get_process``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from dlm.data.batch import Batch
from dlm.data.specials import SpecialIds, model_vocab_size
from dlm.errors import DlmError
from dlm.process.sampling import filter_logits

if TYPE_CHECKING:
    from dlm.process.transitions import Transition

# "causal" | "bidirectional" | MaskFn(q_idx, kv_idx) -> bool; the same spec as dlm.model.masks.AttnSpec.
AttnSpec = str | Callable[[Tensor, Tensor], Tensor]


@dataclass
class ProcessConfig:
    """Which process, and its options (one flat dataclass so dotted overrides like ``--process.T 1000`` work;
    each family reads the fields it needs and validates them).

    name:           a registered process: ar, mdlm, d3pm, ...
    time_cond:      condition the backbone on t through adaLN; None = the family's default (MDLM off,
                    D3PM and SEDD on). The trainer sets model.time_cond from the process, never the reverse.
    schedule:       noise schedule of diffusion families: linear | loglinear | cosine | geometric (SPEC §2).
    eps:            loglinear schedule: alpha_t = 1 - (1 - eps) t.
    sigma_min:      geometric schedule (SEDD): sigma_t = sigma_min^(1-t) sigma_max^t.
    sigma_max:      geometric schedule upper end.
    antithetic:     low-discrepancy time sampling t_b = (u + b/B) mod 1 in training and bounds (SPEC §3.4).
    transition:     D3PM / SEDD transition: absorbing | uniform.
    T:              D3PM: number of discrete diffusion steps (the thesis used 1000).
    hybrid_lambda:  D3PM: weight of the auxiliary cross-entropy in L_vb + lambda CE (Austin et al.: 0.01).
    eval_t_samples: K, Monte-Carlo draws per sequence when nll() estimates a diffusion bound (a time or a mask count).
    block_size:     BD3-LM: L', tokens per block (must divide the row length); 1 = AR-like, L = MDLM.
    clip_beta:      BD3-LM: lower end beta of the training mask rate 1 - alpha_t ~ U[beta, omega] (0 = no clip).
    clip_omega:     BD3-LM: upper end omega of that window (1 = no clip); evaluation always uses the full bound.
    clip_search:    BD3-LM: a grid of windows "beta_1,omega_1,beta_2,omega_2,..." ("" = off); at every validation
                    the trainer trains on with the one of least per-batch loss variance (paper §5.3); the window
                    above is the one used until the first validation.
    """

    name: str = "ar"
    time_cond: bool | None = None
    schedule: str = "loglinear"
    eps: float = 1e-3
    sigma_min: float = 1e-4
    sigma_max: float = 20.0
    antithetic: bool = True
    transition: str = "absorbing"
    T: int = 1000
    hybrid_lambda: float = 0.0
    eval_t_samples: int = 1
    block_size: int = 4
    clip_beta: float = 0.0
    clip_omega: float = 1.0
    clip_search: str = ""


@dataclass
class NLLResult:
    """Per-sequence negative log-likelihood.

    nats_B:   float64 [B], summed -log p(x) per sequence in nats (an upper bound when ``exact`` is False).
    tokens_B: int64 [B], number of tokens scored per sequence (``scored_positions(batch).sum(1)`` for every family).
    exact:    True for an exact likelihood (AR); False for a variational bound (diffusion).
    """

    nats_B: Tensor
    tokens_B: Tensor
    exact: bool


def scored_positions(batch: Batch) -> Tensor:
    """The positions every family scores, bool [B, L] (the one scoring rule of the project, SPEC §5).

    The first position of every row is context only: it is never noised, masked or resampled, never scored,
    and always shown clean to the network. Every family (AR, D3PM, MDLM, SEDD) scores exactly the real
    positions 1..L-1 (0-based; ``batch.mask_BL`` True):

        scored_BL[b, l] = mask_BL[b, l] and l >= 1

    In ``pad`` data position 0 is the BOS (or the first document token when the tokenizer has no BOS); in
    ``wrap`` data it is a mid-stream token. Per-token NLLs of all families therefore average over the same
    tokens, and bits per byte counts the bytes of exactly these tokens.
    """
    mask_BL = batch.mask_BL.bool()
    col_L = torch.arange(mask_BL.shape[1], device=mask_BL.device)
    return mask_BL & (col_L >= 1)


@dataclass
class SampleResult:
    """Generated sequences.

    ids_NL:     int64 [N, L], prompt included; after a stop the row is filled with the pad id.
    lengths_N:  int64 [N], length of each row including the prompt and the EOS that stopped it.
    nfe:        number of network function evaluations (forward calls) made.
    prompt_len: number of prompt tokens at the start of every row.
    trajectory_NL: int64 [N, L] or None: per position, the sampler step (0-based) at which its final token
                appeared (absorbing: when it was revealed; uniform-state: its last change); -1 for fixed
                positions. Only when the caller asked for it (``return_trajectory``).
    stop_N:     per row, what ended it (``STOP_REASONS``), or None when the family does not record it:
                "eos" (a generated EOS; the row is cut after it), "entropy" (the low-entropy rule,
                ``SamplerOptions.stop_entropy``; the row ends with the block that met it), "length" (the row
                reached the requested length). Set by AR and BD3-LM; the full-length families leave None.
    """

    ids_NL: Tensor
    lengths_N: Tensor
    nfe: int
    prompt_len: int
    trajectory_NL: Tensor | None = None
    stop_N: list[str] | None = None


#: What may end a sampled row (``SampleResult.stop_N``).
STOP_REASONS = ("eos", "entropy", "length")


@dataclass(frozen=True)
class SamplerOptions:
    """The options of every sampler, in one place (``Process.sample(..., **opts)`` builds one).

    steps:             denoising steps of a step sampler (None: the family's ``default_steps(length)``).
    temperature:       softmax temperature of the per-position token distribution; 0 = argmax.
    top_k, top_p:      keep the k most likely tokens / the smallest set of mass >= p (None: off).
    return_trajectory: also return, per position, the step at which its final token appeared.
    use_cache:         AR, BD3-LM: decode against the KV cache (False: recompute the prefix; the same draws).
    stop_at_eos:       a row stops after its first generated EOS (later positions hold the pad id). AR: on by
                       default, checked after every token. BD3-LM: off by default (``SamplerSpec.option_defaults``),
                       checked after every finished block.
    stop_entropy:      BD3-LM: the low-entropy rule, a threshold in nats (None: off): a row stops after a finished
                       block whose mean per-token entropy of p_theta falls below it (``dlm.process.bd3lm``).
    The stop rules apply to unconditional and prefix sampling only: a request that sets one together with
    fixed positions after the prompt (infilling, whose rows are full length) is refused. A stopped row is
    never rejected or resampled; what stopped it is recorded (``SampleResult.stop_N``).

    remask_strategy, remask_eta, remask_t_on, remask_t_off, unmask_score, entropy_bound, unmask_threshold: the
    options of the remasking and ordered-unmasking samplers (defined in ``dlm.process.unmasking``'s docstring; only
    the samplers that read them accept them, and the defaults leave every other sampler unchanged).
    """

    steps: int | None = None
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    return_trajectory: bool = False
    use_cache: bool = True
    stop_at_eos: bool = True
    stop_entropy: float | None = None
    remask_strategy: str = "cap"
    remask_eta: float = 0.02
    remask_t_on: float | None = None
    remask_t_off: float | None = None
    unmask_score: str = "confidence"
    entropy_bound: float = 0.1
    unmask_threshold: float = 0.9


@dataclass(frozen=True)
class SampleStart:
    """What a sampler starts from, checked by ``Process.sample``.

    fixed_NL:   int64 [N, L], -1 at free positions, the id to keep elsewhere (prompt first, then fixed ids).
    prompt_len: the prompt's length P (positions 0..P-1 of every row are the prompt).
    """

    fixed_NL: Tensor
    prompt_len: int


# (process, model, start, options, generator) -> result; called in eval mode without gradients.
SamplerFn = Callable[["Process", torch.nn.Module, SampleStart, SamplerOptions, "torch.Generator | None"], SampleResult]


@dataclass(frozen=True)
class SamplerSpec:
    """One named sampler of a family and what it needs, so that ``Process.sample`` checks it without its name.

    run:              the sampler (``SamplerFn``).
    takes_steps:      it takes ``steps`` (else ``steps`` is an unknown option, e.g. AR: one call per token).
    time_independent: it reuses p_theta across steps, exact only for a model that ignores t (``ddpm_cache``).
    trajectory:       it can return the trajectory (``return_trajectory``).
    nfe_within_steps: its number of network calls never exceeds ``steps`` (False e.g. for first-hitting, whose
                      calls follow from the positions to reveal).
    steps_ignored:    it accepts ``steps`` but its samples do not depend on it (first_hitting, entropy_bounded):
                      a sweep over step counts runs it once.
    extra_options:    further ``SamplerOptions`` fields it reads (e.g. AR's ``use_cache``, ``stop_at_eos``).
    option_defaults:  the family's own defaults of options it accepts, where they differ from ``SamplerOptions``'s
                      (e.g. BD3-LM: ``stop_at_eos`` False, its rows are full length unless asked).
    check:            refuses bad values of the sampler's own options (a one-line ``DlmError``), called by
                      ``options`` before any network call (None: nothing to check).
    """

    run: SamplerFn
    takes_steps: bool = True
    time_independent: bool = False
    trajectory: bool = True
    nfe_within_steps: bool = True
    steps_ignored: bool = False
    extra_options: tuple[str, ...] = ()
    option_defaults: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[[SamplerOptions], None] | None = None

    def accepted(self) -> tuple[str, ...]:
        """The option names this sampler accepts."""
        names = ["temperature", "top_k", "top_p", *self.extra_options]
        names += ["steps"] * self.takes_steps + ["return_trajectory"] * self.trajectory
        return tuple(names)

    def options(self, opts: Mapping[str, Any], sampler: str, family: str) -> SamplerOptions:
        """``SamplerOptions`` from keyword options; one the sampler does not take raises a one-line ``DlmError``."""
        unknown = sorted(set(opts) - set(self.accepted()))
        if unknown:
            raise DlmError(
                f"unknown option(s) for the {family} sampler {sampler!r}: {', '.join(unknown)} "
                f"(accepted: {', '.join(self.accepted())})"
            )
        assert set(self.accepted()) <= {f.name for f in fields(SamplerOptions)}
        assert set(self.option_defaults) <= set(self.accepted())
        options = SamplerOptions(**{**self.option_defaults, **opts})
        if self.check is not None:
            self.check(options)
        return options


def check_stop_options(options: SamplerOptions, given: Mapping[str, Any], start: SampleStart) -> None:
    """The stop rules' options: ``stop_at_eos`` a bool, ``stop_entropy`` None or a finite number of nats > 0, and
    neither asked for (``given``: the caller's own options) together with fixed positions after the prompt
    (infilling keeps its rows full length). One-line ``DlmError`` otherwise."""
    if not isinstance(options.stop_at_eos, bool):
        raise DlmError(f"stop_at_eos must be true or false, got {options.stop_at_eos!r}")
    h = options.stop_entropy
    if h is not None and (isinstance(h, bool) or not isinstance(h, int | float) or not math.isfinite(h) or h <= 0):
        raise DlmError(f"stop_entropy (the low-entropy stop threshold) must be a positive number of nats, got {h!r}")
    asked = bool(given.get("stop_at_eos")) or given.get("stop_entropy") is not None
    if asked and bool((start.fixed_NL[:, start.prompt_len :] >= 0).any()):
        raise DlmError(
            "the stop rules (stop_at_eos, stop_entropy) apply to unconditional and prefix sampling only; "
            "with fixed_ids (infilling) every row is full length"
        )


# The fields a continuous-time family (MDLM; SEDD adds the transition) reads besides its schedule's parameters.
CONTINUOUS_TIME_FIELDS = frozenset({"name", "time_cond", "schedule", "antithetic", "eval_t_samples"})


def check_eval_t_samples(cfg: ProcessConfig) -> None:
    """process.eval_t_samples (K, Monte-Carlo draws per sequence of a diffusion bound) must be an integer >= 1."""
    k = cfg.eval_t_samples
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise DlmError(f"process.eval_t_samples must be an integer >= 1, got {k!r}")


def model_context(model: torch.nn.Module) -> int | None:
    """Longest sequence the model accepts, when it says (``model.cfg.context`` or ``model.context``)."""
    for holder in (model, getattr(model, "cfg", None), getattr(model, "config", None)):
        context = getattr(holder, "context", None)
        if isinstance(context, int):
            return context
    return None


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


_CHUNK_ELEMENTS = 1 << 24  # float64 log-softmax in chunks of at most this many logits (128 MiB)


def token_logprobs(logits_NV: Tensor, targets_N: Tensor) -> Tensor:
    """log softmax(logits)[target] in float64, in chunks so a 50K vocabulary stays within memory."""
    out = torch.empty(targets_N.shape[0], dtype=torch.float64, device=logits_NV.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, logits_NV.shape[-1]))
    for s in range(0, targets_N.shape[0], step):
        chunk = logits_NV[s : s + step].to(torch.float64)
        picked = chunk.gather(1, targets_N[s : s + step, None]).squeeze(1)
        out[s : s + step] = picked - torch.logsumexp(chunk, dim=-1)
    return out


class Process(ABC):
    """A family's loss, likelihood and samplers.

    Class attributes:
      name:             registry key.
      exact_likelihood: True when ``nll`` is exact, False when it is an upper bound.
      conditioning:     what a sampler can be conditioned on: "prefix" (a prompt it continues; rows may stop
                        early at EOS, e.g. AR) or "any" (any fixed positions, prompt or infill; rows are full
                        length, e.g. the diffusion families). Callers ask this, never the family's name.
      step_sampler:     True when samplers take a number of denoising steps (``steps``), False when the number
                        of network calls follows from the length (AR).
      beyond_context:   True when the samplers draw rows longer than the model context (BD3-LM: block by block,
                        the finished blocks seen through a sliding window); False: ``sample`` refuses a length
                        above the context. Callers ask this, never the family's name.
      transitions:      the values ``process.transition`` may take (empty: the family has one fixed forward
                        process and ignores the field).
      sampler_table:    the family's samplers by name (``SamplerSpec``); a family whose samplers depend on its
                        options (e.g. the transition) overrides ``sampler_specs()`` instead. ``samplers`` lists
                        the names; ``default_sampler`` is used when none is given.
      train_copies:     the training forward runs over train_copies x L tokens per row of L (BD3-LM's z_t ⊕ x: 2),
                        head on L rows; the trainer's FLOPs per token (MFU) follow (``flops_per_token``).
    """

    name: ClassVar[str]
    exact_likelihood: ClassVar[bool]
    conditioning: ClassVar[str] = "any"
    step_sampler: ClassVar[bool] = True
    beyond_context: ClassVar[bool] = False
    transitions: ClassVar[tuple[str, ...]] = ()
    sampler_table: ClassVar[Mapping[str, SamplerSpec]] = {}
    default_sampler: ClassVar[str]
    train_copies: ClassVar[int] = 1
    row_multiple: int = 1  # instance: every row scored or sampled is a multiple of it (BD3-LM: L'); ask, never name

    def __init__(self, cfg: ProcessConfig, specials: SpecialIds) -> None:
        type(self).check_config(cfg)
        self.cfg = cfg
        self.specials = specials

    @classmethod
    def check_config(cls, cfg: ProcessConfig) -> None:
        """Refuse (``DlmError``, one line) options this family cannot run with. ``RunConfig.validate`` calls it,
        so a bad option is refused before anything is written; ``__init__`` calls it too. Families extend it."""
        if cfg.name != cls.name:
            raise DlmError(f"process config names {cfg.name!r} but this is the {cls.name!r} process")

    @classmethod
    def config_fields(cls, cfg: ProcessConfig) -> frozenset[str]:
        """The ``ProcessConfig`` fields this family reads with ``cfg`` (e.g. the parameters of its schedule).
        The others do not change the configuration's hash (``canonical_config``). Default: every field."""
        return frozenset(f.name for f in fields(ProcessConfig))

    @property
    @abstractmethod
    def attention(self) -> AttnSpec:
        """Attention mode the process asks of the backbone: "causal", "bidirectional" or a MaskFn."""

    # the forward transition of a diffusion family (``transitions``), set by its __init__; None for AR
    transition: Transition | None = None

    @property
    def absorbing(self) -> bool:
        """True when the process uses the MASK id (its transition is absorbing; the network vocabulary may then
        be K + 1)."""
        return self.transition is not None and self.transition.absorbing

    @property
    def time_conditioned(self) -> bool:
        """Whether the network is given the diffusion time ``t_B``."""
        return False

    @property
    def vocab_size(self) -> int:
        """The network's vocabulary: K, or K + 1 for an absorbing process with an appended MASK id."""
        return model_vocab_size(self.specials, self.absorbing)

    @abstractmethod
    def loss(
        self, model: torch.nn.Module, batch: Batch, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Training loss (a scalar, mean over scored tokens) and statistics for logging as detached 0-dim tensors
        (read them with ``float()`` only when logging: each read is a device-to-host synchronisation)."""

    @abstractmethod
    def nll(self, model: torch.nn.Module, batch: Batch, generator: torch.Generator | None = None) -> NLLResult:
        """Per-sequence NLL in nats (exact or an upper bound), accumulated in float64, without gradients."""

    # ------------------------------------------------------------------------------------------- sampling

    def sampler_specs(self) -> Mapping[str, SamplerSpec]:
        """The family's named samplers (the first is not necessarily the default: see ``default_sampler``)."""
        return self.sampler_table

    @property
    def samplers(self) -> tuple[str, ...]:
        """Sampler names accepted by ``sample``."""
        return tuple(self.sampler_specs())

    def default_steps(self, length: int) -> int:
        """Steps of a step sampler when the caller gives none (diffusion: one per position)."""
        return length

    def max_steps(self) -> int | None:
        """Largest ``steps`` a step sampler accepts (None: no limit)."""
        return None

    def min_steps(self, length: int) -> int:
        """Smallest ``steps`` a step sampler accepts for rows of ``length`` tokens (1; a family that spreads its
        steps over blocks needs one per block and refuses a length it cannot cut into blocks, one line)."""
        return 1

    @torch.no_grad()
    def sample(
        self,
        model: torch.nn.Module,
        n: int,
        length: int,
        *,
        sampler: str | None = None,
        prompt_ids: list[int] | None = None,
        fixed_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
        **opts: Any,
    ) -> SampleResult:
        """Draw ``n`` sequences of at most ``length`` tokens (prompt included) with the named sampler.

        Every check is made here, once, before any network call: the sampler name, the options (one
        ``SamplerOptions``; an unknown one is refused), n, length, steps in [1, ``max_steps()``] (default
        ``default_steps(length)``), temperature / top-k / top-p, the stop rules (``check_stop_options``), the
        model's context (a length above it only for a family with ``beyond_context``), the conditioning
        (``conditioning == "prefix"``: a prompt only, default [BOS]; ``"any"``: a prompt and/or ``fixed_ids``,
        ``fixed_positions``) and a time-independent model for a sampler that reuses p_theta across steps. The
        sampler then runs in eval mode (the previous train/eval mode is restored) without gradients.
        """
        name = self.resolve_sampler(sampler)
        spec = self.sampler_specs()[name]
        options = spec.options(opts, name, self.name)
        if spec.takes_steps:
            options = replace(options, steps=self._checked_steps(options.steps, length))
        filter_logits(torch.zeros(1, 1), temperature=options.temperature, top_k=options.top_k, top_p=options.top_p)
        if spec.time_independent and self.time_conditioned:
            raise DlmError(
                f"{name} needs a time-independent model (process.time_cond false): reusing p_theta across "
                f"steps is only exact when the network ignores t; use sampler '{self.default_sampler}'"
            )
        device = model_device(model)
        if self.conditioning == "prefix":
            start = self._prefix_start(n, length, prompt_ids, fixed_ids, device)
        else:
            fixed_NL, P = fixed_positions(
                n, length, prompt_ids, fixed_ids, self.specials.vocab_size, self.specials.mask, device
            )
            start = SampleStart(fixed_NL, P)
        check_stop_options(options, opts, start)
        context = model_context(model)
        if context is not None and length > context and not self.beyond_context:
            raise DlmError(f"length {length} exceeds the model context of {context} tokens")
        with eval_mode(model):
            return spec.run(self, model, start, options, generator)

    def _checked_steps(self, steps: Any, length: int) -> int:
        """``steps`` (None: ``default_steps(length)``) as an integer in [1, ``max_steps()``]."""
        limit = self.max_steps()
        count = self.default_steps(length) if steps is None else steps
        if isinstance(count, bool) or not isinstance(count, int) or count < 1 or (limit is not None and count > limit):
            allowed = ">= 1" if limit is None else f"in [1, {limit}]"
            raise DlmError(f"steps must be an integer {allowed}, got {steps!r}")
        return count

    def _prefix_start(
        self, n: int, length: int, prompt_ids: list[int] | None, fixed_ids: Tensor | None, device: torch.device
    ) -> SampleStart:
        """The start of a prefix-conditioned sampler: the prompt (default [BOS]) as fixed row prefix."""
        if fixed_ids is not None:
            raise DlmError(f"the {self.name} family continues a prompt only: fixed_ids (infilling) is not supported")
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
        fixed_NL = torch.full((n, length), -1, dtype=torch.int64, device=device)
        fixed_NL[:, :P] = torch.tensor(prompt, dtype=torch.int64, device=device)
        return SampleStart(fixed_NL, P)

    def resolve_sampler(self, sampler: str | None) -> str:
        """The sampler to use: ``default_sampler`` for None; an unknown name raises ``DlmError``."""
        if sampler is None:
            return self.default_sampler
        if sampler not in self.samplers:
            known = ", ".join(self.samplers)
            raise DlmError(f"unknown sampler {sampler!r} for process {self.name!r}; available: {known}")
        return sampler


_REGISTRY: dict[str, type[Process]] = {}


def register_process(cls: type[Process]) -> type[Process]:
    """Class decorator: make ``cls`` available to ``get_process`` under ``cls.name``."""
    name = getattr(cls, "name", None)
    assert isinstance(name, str) and name, f"{cls.__qualname__} must set a class attribute 'name'"
    previous = _REGISTRY.get(name)
    if previous is not None and previous.__qualname__ != cls.__qualname__:
        raise DlmError(f"process name {name!r} is already registered by {previous.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def available_processes() -> list[str]:
    """Registered process names, sorted."""
    return sorted(_REGISTRY)


def process_class(name: str) -> type[Process]:
    """The family registered as ``name``; an unknown name raises ``DlmError`` listing the known ones."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise DlmError(f"unknown process {name!r}; available: {', '.join(available_processes())}")
    return cls


def canonical_config(cfg: ProcessConfig) -> ProcessConfig:
    """``cfg`` with the fields its family does not read (``Process.config_fields``) at their defaults, so they
    do not change a configuration hash; a configuration whose unused fields are at their defaults is unchanged
    (the hashes of such existing run directories stay valid). An unregistered name: ``cfg`` as it is."""
    cls = _REGISTRY.get(cfg.name)
    if cls is None:
        return cfg
    used, default = cls.config_fields(cfg), ProcessConfig()
    return replace(cfg, **{f.name: getattr(default, f.name) for f in fields(ProcessConfig) if f.name not in used})


def get_process(cfg: ProcessConfig, specials: SpecialIds) -> Process:
    """Build the process named by ``cfg.name``; an unknown name raises ``DlmError`` listing the known ones."""
    return process_class(cfg.name)(cfg, specials)


def fixed_positions(
    n: int,
    length: int,
    prompt_ids: list[int] | None,
    fixed_ids: Tensor | None,
    vocab_size: int,
    mask_id: int,
    device: torch.device,
) -> tuple[Tensor, int]:
    """Conditioning of a diffusion sampler, checked once for every family.

    Returns (fixed_NL, P): int64 [n, length] with -1 at free positions and the id to keep elsewhere (the
    prompt as a prefix, then ``fixed_ids`` of shape [length], [1, length] or [n, length]), and the prompt
    length P. Kept ids must lie in [0, vocab_size) and differ from MASK.
    """
    for name, value in (("n", n), ("length", length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DlmError(f"{name} must be a positive integer, got {value!r}")
    fixed_NL = torch.full((n, length), -1, dtype=torch.int64, device=device)
    if fixed_ids is not None:
        f = torch.as_tensor(fixed_ids, dtype=torch.int64, device=device)
        f = f[None] if f.ndim == 1 else f
        if f.ndim != 2 or f.shape[1] != length or f.shape[0] not in (1, n):
            raise DlmError(
                f"fixed_ids must have shape [{length}], [1, {length}] or [{n}, {length}], got {tuple(f.shape)}"
            )
        fixed_NL = f.expand(n, length).clone()
    prompt = [int(t) for t in prompt_ids] if prompt_ids else []
    P = len(prompt)
    if length < P:
        raise DlmError(f"the prompt ({P} tokens) is longer than length ({length})")
    if P:
        fixed_NL[:, :P] = torch.tensor(prompt, dtype=torch.int64, device=device)
    bad = (fixed_NL != -1) & ((fixed_NL < 0) | (fixed_NL >= vocab_size) | (fixed_NL == mask_id))
    if bool(bad.any()):
        raise DlmError(
            f"prompt and fixed ids must be ids in [0, {vocab_size}) other than MASK (-1 marks a free position)"
        )
    return fixed_NL, P


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run a sampler with ``model.eval()`` (no dropout) and restore the previous train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def full_length_result(ids_NL: Tensor, nfe: int, prompt_len: int, trajectory_NL: Tensor | None = None) -> SampleResult:
    """The ``SampleResult`` of a diffusion sampler: every row is full length (no EOS stop)."""
    n, length = ids_NL.shape
    lengths = torch.full((n,), length, dtype=torch.int64, device=ids_NL.device)
    return SampleResult(ids_NL=ids_NL, lengths_N=lengths, nfe=nfe, prompt_len=prompt_len, trajectory_NL=trajectory_NL)
