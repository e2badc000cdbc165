"""Noise schedules for discrete diffusion (SPEC §2) and low-discrepancy time sampling (SPEC §3.4).

alpha_t in [0, 1] is the probability that a token is still clean at time t in [0, 1]; alpha_0 ≈ 1, alpha_1 ≈ 0.

    sigma_t        = -log alpha_t                       (total noise)
    sigma'_t       = -alpha'_t / alpha_t
    mdlm_weight(t) = -alpha'_t / (1 - alpha_t)          (MDLM NELBO weight, SPEC §3.4)

Schedules:

    linear:     alpha_t = 1 - t                                      mdlm_weight = 1/t
    loglinear:  alpha_t = 1 - (1 - eps) t,  eps = 1e-3               mdlm_weight = 1/t
    cosine:     alpha_t = cos(pi t / 2)                              mdlm_weight = (pi/2) cot(pi t / 4)
    geometric:  sigma_t = sigma_min^(1-t) sigma_max^t,  alpha_t = exp(-sigma_t)
                                                                     mdlm_weight = sigma'_t / (e^sigma_t - 1)

Every method takes a float or a tensor of any shape and dtype and returns a float64 tensor of the same shape
(on the input's device). Derivatives are analytic.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor

from dlm.errors import DlmError

__all__ = [
    "CosineSchedule",
    "GeometricSchedule",
    "LinearSchedule",
    "LogLinearSchedule",
    "Schedule",
    "available_schedules",
    "get_schedule",
    "register_schedule",
    "sample_times",
]


def _f64(t: Tensor | float) -> Tensor:
    """``t`` as a float64 tensor (same shape and device when it is already a tensor)."""
    if isinstance(t, Tensor):
        return t.to(torch.float64)
    return torch.as_tensor(t, dtype=torch.float64)


class Schedule(ABC):
    """A noise schedule alpha_t on t in [0, 1]; all outputs are float64 tensors shaped like the input."""

    name: ClassVar[str] = ""

    @abstractmethod
    def alpha(self, t: Tensor | float) -> Tensor:
        """alpha_t: probability that a token is still clean at time t."""

    @abstractmethod
    def dalpha(self, t: Tensor | float) -> Tensor:
        """alpha'_t = d alpha_t / dt (analytic, <= 0)."""

    def sigma(self, t: Tensor | float) -> Tensor:
        """sigma_t = -log alpha_t (total noise)."""
        return -torch.log(self.alpha(t))

    def dsigma(self, t: Tensor | float) -> Tensor:
        """sigma'_t = -alpha'_t / alpha_t."""
        return -self.dalpha(t) / self.alpha(t)

    def mdlm_weight(self, t: Tensor | float) -> Tensor:
        """MDLM NELBO weight -alpha'_t / (1 - alpha_t) (SPEC §3.4)."""
        return -self.dalpha(t) / (1.0 - self.alpha(t))

    def t_of_alpha(self, alpha: Tensor | float) -> Tensor:
        """The time t with alpha_t = alpha, for alpha in [alpha_1, alpha_0] (clamped into that range).

        Generic: 64 bisection steps on [0, 1] (alpha_t is decreasing), exact to float64 rounding; schedules
        with a closed-form inverse override it.
        """
        a = _f64(alpha)
        lo, hi = torch.zeros_like(a), torch.ones_like(a)
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            above = self.alpha(mid) > a  # still too clean: the time lies later
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return 0.5 * (lo + hi)

    def params(self) -> dict[str, Any]:
        """Constructor keyword arguments that rebuild this schedule with ``get_schedule(name, **params)``."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


_REGISTRY: dict[str, type[Schedule]] = {}


def register_schedule(cls: type[Schedule]) -> type[Schedule]:
    """Class decorator: register a schedule under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"schedule {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def available_schedules() -> list[str]:
    """Registered schedule names, sorted."""
    return sorted(_REGISTRY)


def get_schedule(name: str, **params: Any) -> Schedule:
    """Build the schedule registered as ``name``; unknown names or bad parameters raise ``DlmError``."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise DlmError(f"unknown schedule {name!r} (available: {', '.join(available_schedules())})")
    try:
        return cls(**params)
    except TypeError as exc:
        raise DlmError(f"bad parameters for schedule {name!r}: {exc}") from None


# The process-config fields each schedule takes (the rest of its parameters keep their defaults).
SCHEDULE_PARAMS: dict[str, tuple[str, ...]] = {"loglinear": ("eps",), "geometric": ("sigma_min", "sigma_max")}


def build_schedule(cfg: Any) -> Schedule:
    """The schedule a process config names: ``get_schedule(cfg.schedule, **the fields that schedule takes)``."""
    params = {k: getattr(cfg, k) for k in SCHEDULE_PARAMS.get(cfg.schedule, ())}
    return get_schedule(cfg.schedule, **params)


def _positive_float(schedule: str, key: str, value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise DlmError(f"schedule {schedule!r}: {key} must be a number, got {value!r}") from None
    if not math.isfinite(out) or out <= 0.0:
        raise DlmError(f"schedule {schedule!r}: {key} must be positive and finite, got {value!r}")
    return out


@register_schedule
class LinearSchedule(Schedule):
    """alpha_t = 1 - t;  alpha'_t = -1;  sigma'_t = 1 / (1 - t);  mdlm_weight = 1/t."""

    name = "linear"

    def alpha(self, t: Tensor | float) -> Tensor:
        return 1.0 - _f64(t)

    def dalpha(self, t: Tensor | float) -> Tensor:
        return torch.full_like(_f64(t), -1.0)

    def dsigma(self, t: Tensor | float) -> Tensor:
        return 1.0 / (1.0 - _f64(t))

    def mdlm_weight(self, t: Tensor | float) -> Tensor:
        return 1.0 / _f64(t)

    def t_of_alpha(self, alpha: Tensor | float) -> Tensor:
        return (1.0 - _f64(alpha)).clamp(0.0, 1.0)


@register_schedule
class LogLinearSchedule(Schedule):
    """alpha_t = 1 - (1 - eps) t,  sigma_t = -log(1 - (1 - eps) t)  (MDLM/SEDD default, eps = 1e-3).

    alpha'_t = -(1 - eps);  sigma'_t = (1 - eps) / (1 - (1 - eps) t);
    mdlm_weight = (1 - eps) / ((1 - eps) t) = 1/t.
    """

    name = "loglinear"

    def __init__(self, eps: float = 1e-3) -> None:
        try:
            eps = float(eps)
        except (TypeError, ValueError):
            raise DlmError(f"schedule 'loglinear': eps must be a number, got {eps!r}") from None
        if not 0.0 < eps < 1.0:
            raise DlmError(f"schedule 'loglinear': eps must lie in (0, 1), got {eps!r}")
        self.eps = eps

    def alpha(self, t: Tensor | float) -> Tensor:
        return 1.0 - (1.0 - self.eps) * _f64(t)

    def dalpha(self, t: Tensor | float) -> Tensor:
        return torch.full_like(_f64(t), -(1.0 - self.eps))

    def sigma(self, t: Tensor | float) -> Tensor:
        return -torch.log1p(-(1.0 - self.eps) * _f64(t))

    def dsigma(self, t: Tensor | float) -> Tensor:
        return (1.0 - self.eps) / (1.0 - (1.0 - self.eps) * _f64(t))

    def mdlm_weight(self, t: Tensor | float) -> Tensor:
        return 1.0 / _f64(t)

    def t_of_alpha(self, alpha: Tensor | float) -> Tensor:
        return ((1.0 - _f64(alpha)) / (1.0 - self.eps)).clamp(0.0, 1.0)

    def params(self) -> dict[str, Any]:
        return {"eps": self.eps}


@register_schedule
class CosineSchedule(Schedule):
    """alpha_t = cos(pi t / 2);  alpha'_t = -(pi/2) sin(pi t / 2);  sigma'_t = (pi/2) tan(pi t / 2);

    mdlm_weight = (pi/2) sin(pi t / 2) / (1 - cos(pi t / 2)) = (pi/2) cot(pi t / 4)  (no cancellation near t = 0).
    """

    name = "cosine"

    def alpha(self, t: Tensor | float) -> Tensor:
        return torch.cos(0.5 * math.pi * _f64(t))

    def dalpha(self, t: Tensor | float) -> Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * _f64(t))

    def dsigma(self, t: Tensor | float) -> Tensor:
        return 0.5 * math.pi * torch.tan(0.5 * math.pi * _f64(t))

    def mdlm_weight(self, t: Tensor | float) -> Tensor:
        x = 0.25 * math.pi * _f64(t)
        return 0.5 * math.pi * torch.cos(x) / torch.sin(x)


@register_schedule
class GeometricSchedule(Schedule):
    """sigma_t = sigma_min^(1-t) sigma_max^t,  alpha_t = exp(-sigma_t)  (SEDD; sigma_min = 1e-4, sigma_max = 20).

    sigma'_t = sigma_t log(sigma_max / sigma_min);  alpha'_t = -alpha_t sigma'_t;
    mdlm_weight = sigma'_t / (e^sigma_t - 1)  (computed with expm1).
    """

    name = "geometric"

    def __init__(self, sigma_min: float = 1e-4, sigma_max: float = 20.0) -> None:
        sigma_min = _positive_float(self.name, "sigma_min", sigma_min)
        sigma_max = _positive_float(self.name, "sigma_max", sigma_max)
        if sigma_min >= sigma_max:
            raise DlmError(
                f"schedule 'geometric': sigma_min must be below sigma_max, got sigma_min={sigma_min!r}, "
                f"sigma_max={sigma_max!r}"
            )
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self._log_ratio = math.log(sigma_max / sigma_min)

    def sigma(self, t: Tensor | float) -> Tensor:
        t = _f64(t)
        return torch.exp((1.0 - t) * math.log(self.sigma_min) + t * math.log(self.sigma_max))

    def dsigma(self, t: Tensor | float) -> Tensor:
        return self.sigma(t) * self._log_ratio

    def alpha(self, t: Tensor | float) -> Tensor:
        return torch.exp(-self.sigma(t))

    def dalpha(self, t: Tensor | float) -> Tensor:
        sigma = self.sigma(t)
        return -torch.exp(-sigma) * sigma * self._log_ratio

    def mdlm_weight(self, t: Tensor | float) -> Tensor:
        sigma = self.sigma(t)
        return sigma * self._log_ratio / torch.expm1(sigma)

    def params(self) -> dict[str, Any]:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


def sample_times(
    batch_size: int,
    generator: torch.Generator | None = None,
    antithetic: bool = True,
    device: torch.device | str | None = None,
    t_min: float = 0.0,
    t_max: float = 1.0,
) -> Tensor:
    """Diffusion times for a batch, float64 of shape [B].

    antithetic (low-discrepancy, SPEC §3.4): one u ~ U[0, 1) and t_b = (u + b/B) mod 1 for b = 0..B-1, so the
    sorted times are evenly spaced 1/B apart (cyclically) and the batch mean has far lower variance than i.i.d.;
    otherwise t_b ~ U[0, 1) i.i.d.  The result is mapped linearly to t_min + (t_max - t_min) t_b.

    Random numbers come from ``generator`` (on its device when ``device`` is not given).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DlmError(f"sample_times: batch_size must be a positive integer, got {batch_size!r}")
    if not 0.0 <= t_min < t_max <= 1.0:
        raise DlmError(f"sample_times: need 0 <= t_min < t_max <= 1, got t_min={t_min!r}, t_max={t_max!r}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    if antithetic:
        u = torch.rand(1, generator=generator, dtype=torch.float64, device=device)
        offsets = torch.arange(batch_size, dtype=torch.float64, device=device) / batch_size
        t = torch.remainder(u + offsets, 1.0)
    else:
        t = torch.rand(batch_size, generator=generator, dtype=torch.float64, device=device)
    if t_min != 0.0 or t_max != 1.0:
        t = t_min + (t_max - t_min) * t
    return t
