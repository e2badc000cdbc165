"""Up-front reveal steps (issue 14): the grid samplers (ddpm, ddpm_cache and every family on ``reveal_loop``) draw
each position's reveal step before the loop. Checked here: the reveal-step law against the per-step product
formula, the sample law of ``ddpm`` against the closed-form law of the per-step chain (exact enumeration with an
exact, time-dependent denoiser of a tiny joint), determinism for a fixed generator, static denoiser shapes, and
that the number of host read-backs does not grow with the number of steps (CPU: Tensor.item / bool / tolist /
int / float counted; GPU: CUDA's synchronisation warnings)."""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import Tensor

from dlm.process.absorbing import ddpm, ddpm_cache, first_hitting, reveal_cdf, reveal_steps
from dlm.process.schedules import get_schedule

K = 3  # tokens 0..K-1, MASK = K
MASK = K


def chi2_sf(stat: float, dof: int) -> float:
    """P(chi2_dof > stat) = Q(dof / 2, stat / 2) (regularised upper incomplete gamma)."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def chi2_stat(counts: Tensor, probs: Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def per_step_reveal_probs(schedule_name: str, S: int) -> list[float]:
    """a_i = (alpha_{t_{i+1}} - alpha_{t_i}) / (1 - alpha_{t_i}) on t_i = 1 - i/S, the last one 1 (direct)."""
    sch = get_schedule(schedule_name)
    alpha = [float(sch.alpha(torch.tensor(1.0 - i / S, dtype=torch.float64))) for i in range(S + 1)]
    return [(alpha[i + 1] - alpha[i]) / (1.0 - alpha[i]) for i in range(S - 1)] + [1.0]


# ------------------------------------------------------------------------------------------- the reveal-step law


def test_reveal_cdf_is_one_minus_the_product_of_stay_probabilities() -> None:
    a_SB = torch.tensor([[0.2, 0.0], [0.5, 1.0], [0.25, 0.3], [0.1, 0.7]], dtype=torch.float64)
    F = reveal_cdf(a_SB)
    for b in range(2):
        stay = 1.0
        for i in range(3):
            stay *= 1.0 - float(a_SB[i, b])
            assert float(F[i, b]) == pytest.approx(1.0 - stay, abs=1e-15)
    assert F[-1].tolist() == [1.0, 1.0]  # the last step reveals every mask whatever a_{S-1}


def test_reveal_steps_follow_the_per_step_law_independently_across_positions() -> None:
    """P(T = i) = a_i prod_{j<i} (1 - a_j) per position, and two positions' steps are independent (chi-square on
    the joint of (T^0, T^1)); positions not pending get S."""
    S, B, L = 5, 20000, 3
    a = per_step_reveal_probs("cosine", S)  # P(T = i) = 0.31, 0.28, 0.22, 0.14, 0.05
    p_S = torch.tensor([a[i] * math.prod(1 - a[j] for j in range(i)) for i in range(S)], dtype=torch.float64)
    pending = torch.ones(B, L, dtype=torch.bool)
    pending[:, 2] = False
    a_SB = torch.tensor(a, dtype=torch.float64)[:, None].expand(S, B)
    T = reveal_steps(a_SB, pending, torch.Generator().manual_seed(0))
    assert bool((T[:, 2] == S).all()) and bool((T[:, :2] < S).all())
    joint = torch.bincount(T[:, 0] * S + T[:, 1], minlength=S * S).double()
    assert chi2_sf(chi2_stat(joint, torch.outer(p_S, p_S).flatten()), S * S - 1) > 1e-4
    wrong = torch.outer(p_S.flip(0), p_S).flatten()  # one position's law reversed: rejected (the test can fail)
    assert chi2_sf(chi2_stat(joint, wrong), S * S - 1) < 1e-12


# ------------------------------------------------------------------------------ the sample law: exact enumeration


def tempered(joint_KKK: Tensor, t: float) -> Tensor:
    """The time-dependent target p_t(x) ∝ joint(x)^(1 + t) (so a token drawn at the wrong time is detected)."""
    w = joint_KKK ** (1.0 + t)
    return w / w.sum()


def exact_denoiser(joint_KKK: Tensor):
    """denoise(z, t): log p_t(x^l | the revealed tokens of z) for every position (MASK column -inf), exact."""
    L = joint_KKK.ndim
    digits_CL = torch.tensor(list(itertools.product(range(K), repeat=L)))  # cell c = (x^0, .., x^{L-1})

    def denoise(z_BL: Tensor, t_B: Tensor) -> Tensor:
        w_BC = torch.stack([tempered(joint_KKK, float(t)).flatten() for t in t_B.unique()])
        w_BC = w_BC[torch.searchsorted(t_B.unique(), t_B)]
        agree_BC = ((digits_CL[None] == z_BL[:, None]) | (z_BL[:, None] == MASK)).all(-1)
        w_BC = w_BC * agree_BC
        out = torch.full((z_BL.shape[0], L, K + 1), float("-inf"), dtype=torch.float64)
        for pos in range(L):
            marg_BK = w_BC @ torch.nn.functional.one_hot(digits_CL[:, pos], K).double()
            out[:, pos, :K] = torch.log(marg_BK / marg_BK.sum(-1, keepdim=True))
        return out

    return denoise


def per_step_chain_law(joint_KKK: Tensor, a: list[float], times: list[float]) -> Tensor:
    """The law of the per-step chain's sample, by enumeration of the reveal steps T in {0..S-1}^L (probability
    prod_l a_{T^l} prod_{j<T^l} (1 - a_j)); at step i the positions with T^l = i are drawn independently from
    p_{t_i}(x^l | tokens revealed before step i)."""
    L, S = joint_KKK.ndim, len(a)
    law = torch.zeros(K**L, dtype=torch.float64)
    cells = list(itertools.product(range(K), repeat=L))
    for T in itertools.product(range(S), repeat=L):
        p_T = math.prod(a[i] * math.prod(1 - a[j] for j in range(i)) for i in T)
        for x in cells:
            p_x = 1.0
            for i in range(S):
                target = tempered(joint_KKK, times[i])
                agree = [c for c in cells if all(c[k] == x[k] for k in range(L) if T[k] < i)]  # revealed before i
                den = sum(float(target[c]) for c in agree)
                for l in (l for l in range(L) if T[l] == i):
                    p_x *= sum(float(target[c]) for c in agree if c[l] == x[l]) / den
            law[cells.index(x)] += p_T * p_x
    return law


@torch.no_grad()
@pytest.mark.parametrize("sampler", [ddpm, ddpm_cache], ids=["ddpm", "ddpm_cache"])
def test_up_front_sampler_has_the_per_step_chains_law(sampler) -> None:
    """Exact time-dependent denoiser of a correlated 3-token joint, S = 3: the empirical law of the sample matches
    the closed-form law of the per-step chain (chi-square), which is far from both the joint (one reveal at a time)
    and the product of marginals (all at once), so a wrong reveal law or a wrong time would be rejected."""
    g = torch.Generator().manual_seed(4)
    joint = torch.softmax(torch.randn(K**3, generator=g, dtype=torch.float64) * 1.2, 0).view(K, K, K)
    S, N = 3, 30000
    times = [1.0 - i / S for i in range(S)]
    law = per_step_chain_law(joint, per_step_reveal_probs("loglinear", S), times)
    assert float(law.sum()) == pytest.approx(1.0, abs=1e-12)
    out = sampler(exact_denoiser(joint), torch.full((N, 3), MASK), get_schedule("loglinear"), S, g, mask_id=MASK)
    counts = torch.bincount((out.ids_BL * torch.tensor([K * K, K, 1])).sum(1), minlength=K**3).double()
    assert chi2_sf(chi2_stat(counts, law), K**3 - 1) > 1e-4
    p1 = tempered(joint, times[0])
    product = torch.einsum("a,b,c->abc", p1.sum((1, 2)), p1.sum((0, 2)), p1.sum((0, 1))).flatten()
    for alternative in (tempered(joint, 0.0).flatten(), product):
        assert chi2_sf(chi2_stat(counts, alternative), K**3 - 1) < 1e-12


# ------------------------------------------------------------------------------ determinism, shapes, read-backs


def smooth_denoiser(V: int, seed: int = 0):
    """A time-dependent, state-dependent denoiser with no host reads: logits = onehot(z) W + t."""
    W = torch.randn(V, V, generator=torch.Generator().manual_seed(seed))
    calls: list[tuple] = []

    def denoise(z_BL: Tensor, t_B: Tensor) -> Tensor:
        calls.append((tuple(z_BL.shape), z_BL.dtype, tuple(t_B.shape), t_B.dtype))
        e = torch.nn.functional.one_hot(z_BL, V).float()
        return e @ W + e.roll(1, 1) @ W.T + t_B[:, None, None].float()

    return denoise, calls


@pytest.mark.parametrize("sampler", [ddpm, ddpm_cache, first_hitting], ids=["ddpm", "ddpm_cache", "first_hitting"])
def test_fixed_generator_is_deterministic_and_the_denoiser_shapes_are_static(sampler) -> None:
    B, L, S = 3, 10, 6
    denoise, calls = smooth_denoiser(K + 1)
    z0 = torch.full((B, L), MASK)
    z0[:, 4] = 1
    fixed = z0 != MASK
    runs = [
        sampler(denoise, z0, get_schedule("cosine"), S, torch.Generator().manual_seed(s), fixed, mask_id=MASK,
                top_k=2, return_trajectory=True)
        for s in (5, 5, 6)
    ]  # fmt: skip
    a, b, c = runs
    assert torch.equal(a.ids_BL, b.ids_BL) and torch.equal(a.trajectory_BL, b.trajectory_BL) and a.nfe == b.nfe
    assert not torch.equal(a.ids_BL, c.ids_BL)
    assert bool((a.ids_BL[:, 4] == 1).all()) and bool((a.trajectory_BL[:, 4] == -1).all())
    assert bool((a.ids_BL < K).all())
    assert set(calls) == {((B, L), torch.int64, (B,), torch.float64)}
    steps = a.trajectory_BL[a.trajectory_BL >= 0]
    if sampler is ddpm_cache:
        assert a.nfe == len(set(steps.tolist()))
    elif sampler is ddpm:
        assert a.nfe == int(steps.max()) + 1


def test_first_hitting_keeps_the_per_step_random_stream() -> None:
    """first_hitting draws its [nfe, 3, B] uniforms in one call; on a CPU generator that is the stream of three
    draws of B per step, so the ids and reveal order are those of the per-step code (pinned from commit 7b5208e,
    where the loop drew per step; the denoiser is exact in float32: one-hot rows of a small table plus t)."""
    W = torch.arange(16, dtype=torch.float32).view(4, 4).remainder(5) * 0.5

    def denoise(z_BL: Tensor, t_B: Tensor) -> Tensor:
        e = torch.nn.functional.one_hot(z_BL, K + 1).float()
        return e @ W + e.roll(1, 1) @ W.T + t_B[:, None, None].float()

    z0 = torch.full((3, 6), MASK)
    z0[:, 2] = 1
    pinned = {
        "plain": [[0, 0, 1, 2, 0, 2], [0, 1, 1, 2, 2, 0], [1, 2, 1, 2, 0, 0]],
        "top_k": [[0, 0, 1, 2, 0, 2], [1, 2, 1, 2, 2, 0], [1, 2, 1, 2, 0, 0]],
    }
    order = [[3, 0, -1, 4, 2, 1], [2, 3, -1, 4, 0, 1], [2, 4, -1, 1, 3, 0]]
    for name, kw in (("plain", {}), ("top_k", {"top_k": 2, "temperature": 0.7})):
        g = torch.Generator().manual_seed(21)
        out = first_hitting(denoise, z0, get_schedule("cosine"), None, g, z0 != MASK, mask_id=MASK,
                            return_trajectory=True, **kw)  # fmt: skip
        assert out.ids_BL.tolist() == pinned[name] and out.trajectory_BL.tolist() == order and out.nfe == 5


_HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@contextmanager
def count_host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Count the Python-level reads of a tensor's value on the host (each would be a sync on a GPU)."""
    counts = dict.fromkeys(_HOST_READS, 0)

    def wrap(name: str):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)

        return counted

    with monkeypatch.context() as m:
        for name in _HOST_READS:
            m.setattr(torch.Tensor, name, wrap(name))
        yield counts


@pytest.mark.parametrize("sampler", [ddpm, ddpm_cache], ids=["ddpm", "ddpm_cache"])
def test_host_reads_do_not_grow_with_the_number_of_steps(sampler, monkeypatch: pytest.MonkeyPatch) -> None:
    denoise, _ = smooth_denoiser(K + 1)
    seen = []
    for S in (4, 64):
        with count_host_reads(monkeypatch) as counts:
            out = sampler(denoise, torch.full((2, 16), MASK), get_schedule("loglinear"), S,
                          torch.Generator().manual_seed(0), mask_id=MASK, return_trajectory=True)  # fmt: skip
        seen.append((dict(counts), out.nfe))
    assert seen[0][0] == seen[1][0], seen
    assert seen[1][1] > seen[0][1]  # more network calls, the same number of host reads
    assert sum(seen[0][0].values()) <= 3


def test_first_hitting_host_reads_do_not_grow_with_the_number_of_reveals(monkeypatch: pytest.MonkeyPatch) -> None:
    denoise, _ = smooth_denoiser(K + 1)
    seen = []
    for L in (3, 24):
        with count_host_reads(monkeypatch) as counts:
            out = first_hitting(denoise, torch.full((2, L), MASK), get_schedule("loglinear"), None,
                                torch.Generator().manual_seed(0), mask_id=MASK)  # fmt: skip
        seen.append(dict(counts))
        assert out.nfe == L
    assert seen[0] == seen[1] and sum(seen[0].values()) <= 3, seen


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("capture", [False, True], ids=["eager", "captured"])
@pytest.mark.parametrize("sampler", [ddpm, ddpm_cache, first_hitting], ids=["ddpm", "ddpm_cache", "first_hitting"])
def test_cuda_synchronisations_do_not_grow_with_the_number_of_steps(sampler, capture) -> None:
    """On CUDA with a CUDA generator: the synchronising calls CUDA reports are as many for 64 steps as for 4, with
    the denoiser called eagerly or replayed as a CUDA graph (whose capture synchronises once per sampler call)."""
    W = torch.randn(K + 1, K + 1, device="cuda")

    def denoise(z_BL: Tensor, t_B: Tensor) -> Tensor:  # a row lookup: nothing in it reads back to the host
        return W[z_BL] + t_B[:, None, None].float()

    syncs = []
    for S, L in ((4, 4), (64, 32)):
        g = torch.Generator(device="cuda").manual_seed(0)
        z0 = torch.full((2, L), MASK, device="cuda")
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = sampler(denoise, z0, get_schedule("loglinear"), S, g, mask_id=MASK, capture=capture)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs.append(sum("synchroniz" in str(w.message) for w in caught))
        assert out.ids_BL.device.type == "cuda" and bool((out.ids_BL < K).all())
    assert syncs[0] == syncs[1], syncs
