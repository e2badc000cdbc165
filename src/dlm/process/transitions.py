"""Forward transitions of the diffusion families, as objects: absorbing (MASK) and uniform (SPEC §3.2, §3.3, §3.5).

Per position, independently, with alpha_t the probability that a token is still clean (K = tokenizer vocabulary,
m = MASK):

    absorbing:  q(z_t^l | x^l) = alpha_t onehot(x^l) + (1 - alpha_t) onehot(m)
    uniform:    q(z_t^l | x^l) = alpha_t onehot(x^l) + (1 - alpha_t) / K * 1

A transition knows how to corrupt a clean batch (keeping the positions that are never noised: padding and
position 0, ``base.scored_positions``), the network vocabulary it needs (K + 1 when MASK is appended), the
positions that carry a loss term after corruption, the per-position KL of q(z_1 | x) to the prior, and the state
a reverse sampler starts from. MDLM holds an absorbing one; D3PM and SEDD hold the one ``process.transition``
names. The reverse steps themselves are in ``absorbing`` (reveal steps) and ``uniform`` (O(K) posteriors).

Random streams. Every draw is float64 from the caller's generator. Two families drew their corruption
differently before transitions were objects, and seeded results must not change, so a transition is built with
the ``stream`` of its family:

    "continuous" (MDLM, SEDD):  absorbing masks iff u < 1 - alpha_t (``absorbing.mask_tokens``); uniform draws
                                u, then v, per position: resample iff u >= alpha_t, token min(floor(v K), K - 1).
    "d3pm" (D3PM):              noised iff u >= alpha_t; the uniform token is torch.randint(0, K) per position.

Both give exactly the distribution above; only the map from the random stream to z_t differs.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from dlm.data.specials import SpecialIds, model_vocab_size
from dlm.errors import DlmError
from dlm.process.absorbing import mask_tokens
from dlm.process.sampling import _uniforms

STREAMS = ("continuous", "d3pm")


class Transition:
    """A forward transition over the K tokens (see the module docstring); subclasses: absorbing, uniform."""

    name: ClassVar[str]
    absorbing: ClassVar[bool]

    def __init__(self, specials: SpecialIds, stream: str = "continuous") -> None:
        assert stream in STREAMS, stream
        self.specials = specials
        self.K = specials.vocab_size
        self.stream = stream

    @property
    def network_vocab(self) -> int:
        """The network's vocabulary: K, or K + 1 when the transition appends MASK."""
        return model_vocab_size(self.specials, self.absorbing)

    def _noised(self, x_BL: Tensor, alpha_B: Tensor, keep_BL: Tensor, u_BL: Tensor) -> Tensor:
        """Positions to noise under the ``d3pm`` stream and the uniform ``continuous`` one: u >= alpha_t."""
        return (u_BL >= alpha_B.to(torch.float64).reshape(-1)[:, None]) & ~keep_BL

    def corrupt(self, x_BL: Tensor, alpha_B: Tensor, keep_BL: Tensor, generator: torch.Generator | None) -> Tensor:
        """z_t ~ q(z_t | x) at alpha_t = alpha_B [B] per row; positions where ``keep_BL`` is True stay clean."""
        raise NotImplementedError

    def loss_positions(self, z_BL: Tensor, scored_BL: Tensor) -> Tensor:
        """The scored positions that carry a loss term at z_t (absorbing: the masked ones; uniform: all)."""
        raise NotImplementedError

    def prior_kl(self, alpha_1: float) -> float:
        """KL(q(z_1^l | x^l) || p(z_1^l)) per position, for the prior p of the reverse process (module doc)."""
        raise NotImplementedError

    def start(self, fixed_NL: Tensor) -> Tensor:
        """The state a reverse sampler starts from: the fixed ids where ``fixed_NL >= 0``, else the MASK id
        (a uniform sampler draws its prior itself and ignores the free entries)."""
        return torch.where(fixed_NL >= 0, fixed_NL, torch.full_like(fixed_NL, self.specials.mask))


class AbsorbingTransition(Transition):
    """Tokens jump to MASK and stay there; the prior is MASK (mixed with Uniform(K) by alpha_1 when alpha_1 > 0)."""

    name: ClassVar[str] = "absorbing"
    absorbing: ClassVar[bool] = True

    def corrupt(self, x_BL: Tensor, alpha_B: Tensor, keep_BL: Tensor, generator: torch.Generator | None) -> Tensor:
        """z^l = m with probability 1 - alpha_t, else x^l (one float64 uniform per position, all B*L drawn)."""
        if self.stream == "continuous":
            return mask_tokens(x_BL, alpha_B, self.specials.mask, generator, keep_BL=keep_BL)
        u_BL = _uniforms(x_BL.shape, generator, x_BL.device)
        noised = self._noised(x_BL, alpha_B, keep_BL, u_BL)
        return torch.where(noised, torch.full_like(x_BL, self.specials.mask), x_BL)

    def loss_positions(self, z_BL: Tensor, scored_BL: Tensor) -> Tensor:
        return (z_BL == self.specials.mask) & scored_BL

    def prior_kl(self, alpha_1: float) -> float:
        """p(z_1^l) = (1 - alpha_1) onehot(m) + alpha_1 Uniform(K): KL = alpha_1 log K (0 when alpha_1 = 0)."""
        return alpha_1 * math.log(self.K) if alpha_1 > 0 else 0.0


class UniformTransition(Transition):
    """Tokens are resampled uniformly over the K tokens; the prior is Uniform(K). No MASK id is needed."""

    name: ClassVar[str] = "uniform"
    absorbing: ClassVar[bool] = False

    def corrupt(self, x_BL: Tensor, alpha_B: Tensor, keep_BL: Tensor, generator: torch.Generator | None) -> Tensor:
        """z^l = x^l with probability alpha_t, else a uniform draw over the K tokens (module docstring: streams)."""
        u_BL = _uniforms(x_BL.shape, generator, x_BL.device)
        if self.stream == "continuous":
            v_BL = _uniforms(x_BL.shape, generator, x_BL.device)
            tok_BL = torch.minimum((v_BL * self.K).floor().to(torch.int64), torch.full_like(x_BL, self.K - 1))
        else:
            where = generator.device if generator is not None else x_BL.device
            tok_BL = torch.randint(0, self.K, x_BL.shape, generator=generator, device=where).to(x_BL.device)
        return torch.where(self._noised(x_BL, alpha_B, keep_BL, u_BL), tok_BL, x_BL)

    def loss_positions(self, z_BL: Tensor, scored_BL: Tensor) -> Tensor:
        return scored_BL

    def prior_kl(self, alpha_1: float) -> float:
        """KL(q(z_1 | x) || Uniform(K)) = (alpha_1 + (1-alpha_1)/K) log(K alpha_1 + 1 - alpha_1)
        + (1 - alpha_1)(K - 1)/K log(1 - alpha_1)."""
        K = self.K
        hit = alpha_1 + (1 - alpha_1) / K
        per = hit * math.log(K * hit)
        if alpha_1 < 1:
            per += (1 - alpha_1) * (K - 1) / K * math.log(1 - alpha_1)
        return per


TRANSITIONS: dict[str, type[Transition]] = {"absorbing": AbsorbingTransition, "uniform": UniformTransition}


def check_transition(name: str) -> None:
    """``process.transition`` must name a transition (one-line ``DlmError`` otherwise)."""
    if name not in TRANSITIONS:
        raise DlmError(f"process.transition must be one of {', '.join(TRANSITIONS)}, got {name!r}")


def get_transition(name: str, specials: SpecialIds, stream: str = "continuous") -> Transition:
    """The transition ``process.transition`` names; an unknown name raises ``DlmError``."""
    check_transition(name)
    return TRANSITIONS[name](specials, stream)
