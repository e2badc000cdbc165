"""BD3-LM training cost per token against MDLM on the same backbone, and the clipped-window ELBO variance.

Cost (issue 13): one optimizer step (loss forward + backward + AdamW) of each arm on the same backbone, the same
batch and the same precision (fp32), timed side by side in one process with interleaved repeats (A B C ... A B C
...) and reported as the median ms/step, ms per training token (B x L data tokens per step for every arm) and the
ratio to MDLM (of the medians, and "paired": the median over rounds of the arm's time / MDLM's in the same round,
less sensitive to the load changing between rounds):

    mdlm             MDLM's loss: one bidirectional forward over z_t (L tokens)
    bd3lm-L'         BD3-LM's one-pass loss (``BD3LMProcess.loss``): one forward over z_t ⊕ x (2L tokens) with
                     the dense [[M_BD, M_OBC], [0, M_BC]] mask, the final norm and head on the noisy half only
                     (the backbone's ``head_rows = L``)
    bd3lm-L'-2pass   a naive two-pass BD3-LM: the clean pass of x (block-causal, L tokens) writes every layer's
                     keys/values into a KV cache (with gradients), then the noisy pass of z_t (L tokens) attends
                     to the cache and to itself with the mask's top rows [M_BD, M_OBC]; the same t, z and loss
                     formula as the one-pass loss (checked equal, value and gradient, before timing)
    bd3lm-L'-fullhead  the one-pass forward with the final norm and head on all 2L positions, the clean half's
                     logits discarded (the loss before ``head_rows``, kept for reference)

Where the time goes: the attention core of each arm (mask plan + SDPA of every layer, forward and backward, the
same shapes and masks as the model's) timed alone the same way; the rest (embeddings, QKV/out projections, MLP,
head, loss, optimizer) is the step minus the core.

Window variance (``--windows RUN``): for a trained bd3lm run, the per-batch training-loss estimate with mask rates
1 - alpha_t ~ U[beta, omega] (``BD3LMProcess.loss`` with clip_beta, clip_omega; U[0, 1] is the NELBO estimate,
a clipped window a biased objective), evaluated on M held-out batches x R draws each; its sample variance over
the M R values (``dlm.eval.variance.batch_elbo_variance``) per window, and the window ``pick_window`` selects.
Every window restarts the same generator: the same uniforms, mapped into each window (common random numbers).

    python benchmarks/bd3lm_cost.py                                  # cost, shapes attn + tiny (CPU, 1 thread)
    python benchmarks/bd3lm_cost.py --shapes tiny --repeats 3
    python benchmarks/bd3lm_cost.py --nll RUNS... --split test --t-samples 4   # the ordering table
    python benchmarks/bd3lm_cost.py --windows /tmp/bd3lm-ordering/runs/bd3lm-4-seed{0,1} --split validation

Prints tables and writes benchmarks/results/bd3lm_cost.json (or bd3lm_nll.json, bd3lm_windows.json).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from common import load_avg, machine_info, sync, write_result  # benchmarks/common.py (run as a script)
from dlm.data.batch import Batch
from dlm.data.specials import SpecialIds
from dlm.model import ModelConfig, build_model
from dlm.model.attention import plan_attention
from dlm.model.masks import MaskFn, bidirectional, block_causal, block_diffusion_train
from dlm.process import ProcessConfig, get_process
from dlm.process.base import Process, scored_positions
from dlm.process.bd3lm import BD3LMProcess
from dlm.process.losses import logits_cross_entropy

SHAPES = {
    # name: (model config, batch, seq_len)
    "attn": (dict(vocab_size=4096, n_layer=4, n_head=4, d_model=128), 8, 256),
    "tiny": (dict(vocab_size=512, n_layer=1, n_head=2, d_model=32), 8, 64),
}
WINDOWS = ((0.0, 1.0), (0.1, 0.9), (0.3, 0.8), (0.45, 0.95), (0.5, 1.0), (0.2, 0.7))

StepLoss = Callable[[nn.Module, Batch, torch.Generator], Tensor]


# ----------------------------------------------------------------------------------------- the arms' losses


def noisy_over_cache(seq_len: int, block: int) -> MaskFn:
    """The noisy pass over a cache of the clean row: query q in [L, 2L) is noisy position q - L; it sees the
    clean keys kv < L of strictly earlier blocks (M_OBC) and the noisy keys of its own block (M_BD)."""

    def mask(q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        qb = (q_idx - seq_len) // block
        return torch.where(kv_idx < seq_len, kv_idx // block < qb, (kv_idx - seq_len) // block == qb)

    return mask


def two_pass_logits(proc: BD3LMProcess, model: nn.Module, z_BL: Tensor, x_BL: Tensor) -> Tensor:
    """Naive BD3-LM forward, with gradients: f(x; block-causal) fills the KV cache, then f(z) over the cache."""
    B, L = x_BL.shape
    cache = model.init_cache(B, 2 * L)  # the noisy pass is checked against the capacity too (not stored)
    model(x_BL, attn=block_causal(proc.block_size), cache=cache, commit=True)
    pos_L = torch.arange(L, device=x_BL.device)
    return model(z_BL, attn=noisy_over_cache(L, proc.block_size), cache=cache, commit=False, pos=pos_L)


def full_head_logits(proc: BD3LMProcess, model: nn.Module, z_BL: Tensor, x_BL: Tensor) -> Tensor:
    """The one-pass forward with the final norm and head on all 2L positions, sliced to the noisy half
    afterwards (``noisy_logits`` before the backbone had ``head_rows``)."""
    L = x_BL.shape[1]
    pos_2L = torch.arange(L, device=x_BL.device).repeat(2)
    return model(torch.cat([z_BL, x_BL], dim=1), attn=block_diffusion_train(L, proc.block_size), pos=pos_2L)[:, :L]


def bd3lm_loss_with(forward: Callable[..., Tensor]) -> Callable[[BD3LMProcess], StepLoss]:
    """BD3-LM's training loss (the formula of ``BD3LMProcess.loss``) with another forward for the noisy logits:

    loss = sum_{b,n} w(t_bn) sum_{l in S_b ∩ block n, z_b^l = m} -log p_theta(x_b^l | z_b^n, x_b^{<n}) / sum_b |S_b|
    """

    def make(proc: BD3LMProcess) -> StepLoss:
        def loss(model: nn.Module, batch: Batch, gen: torch.Generator) -> Tensor:
            x_BL, real_BL = batch.ids_BL, scored_positions(batch)
            t_BN, z_BL = proc.draw(batch, gen, clipped=True)
            scored_BL = (z_BL == proc.mask_id) & real_BL
            ce_N = logits_cross_entropy(forward(proc, model, z_BL, x_BL)[scored_BL], x_BL[scored_BL], proc.mask_id)
            w_BL = proc.schedule.mdlm_weight(t_BN).repeat_interleave(proc.block_size, dim=1)
            return (w_BL[scored_BL].to(ce_N.dtype) * ce_N).sum() / real_BL.sum().clamp(min=1)

        return loss

    return make


def process_loss(proc: Process) -> StepLoss:
    return lambda model, batch, gen: proc.loss(model, batch, gen)[0]


def arms(specials: SpecialIds, blocks: tuple[int, ...], variants: tuple[str, ...]) -> dict[str, StepLoss]:
    """name -> loss(model, batch, generator) of every timed arm."""
    out: dict[str, StepLoss] = {"mdlm": process_loss(get_process(ProcessConfig(name="mdlm"), specials))}
    for block in blocks:
        proc = get_process(ProcessConfig(name="bd3lm", block_size=block), specials)
        assert isinstance(proc, BD3LMProcess)
        out[f"bd3lm-{block}"] = process_loss(proc)
        if "2pass" in variants:
            out[f"bd3lm-{block}-2pass"] = bd3lm_loss_with(two_pass_logits)(proc)
        if "fullhead" in variants:
            out[f"bd3lm-{block}-fullhead"] = bd3lm_loss_with(full_head_logits)(proc)
    return out


def check_same_loss(losses: dict[str, StepLoss], cfg: ModelConfig, batch: Batch) -> dict[str, float]:
    """Every BD3-LM variant equals the one-pass loss of its L' (same weights, same draws): the largest relative
    difference of the loss and of the gradient, per variant; a difference above 1e-4 stops the benchmark."""
    out = {}
    for name, fn in losses.items():
        base = name.rsplit("-", 1)[0]
        if not name.endswith(("-2pass", "-fullhead")):
            continue
        vals, grads = [], []
        for f in (losses[base], fn):
            torch.manual_seed(0)
            model = build_model(cfg)
            loss = f(model, batch, torch.Generator().manual_seed(3))
            loss.backward()
            vals.append(float(loss.detach()))
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        rel = max(abs(vals[1] - vals[0]) / abs(vals[0]), float((grads[1] - grads[0]).norm() / grads[0].norm()))
        if rel > 1e-4:
            raise SystemExit(f"{name}: differs from {base} by {rel:.2e} (loss or gradient); not timing it")
        out[name] = rel
    return out


# ------------------------------------------------------------------------------------------------ timing


def attention_core(name: str, cfg: ModelConfig, batch: int, seq_len: int) -> Callable[[], None]:
    """One step's attention core of arm ``name``: the mask plan and SDPA of every layer, forward and backward,
    with the arm's shapes and masks (no projections)."""
    L, H, Dh = seq_len, cfg.n_head, cfg.head_dim
    if name == "mdlm":
        calls = [(bidirectional, L, L, 0)]
    else:
        block = int(name.split("-")[1])
        if name.endswith("-2pass"):
            calls = [(block_causal(block), L, L, 0), (noisy_over_cache(L, block), L, 2 * L, L)]
        else:
            calls = [(block_diffusion_train(L, block), 2 * L, 2 * L, 0)]
    g = torch.Generator().manual_seed(0)
    qkv = [
        [torch.randn(batch, H, n, Dh, generator=g, requires_grad=True) for n in (lq, lk, lk)] for _, lq, lk, _ in calls
    ]

    def run() -> None:
        total = 0.0
        for (fn, lq, lk, off), (q, k, v) in zip(calls, qkv, strict=True):
            plan = plan_attention(fn, lq, lk, off, None, "sdpa", q.device)
            total = total + sum(plan.attend(q, k, v, 0.0).sum() for _ in range(cfg.n_layer))
        total.backward()

    return run


def time_interleaved(steps: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of every function, A B C ... A B C ..., the first ``warmup`` rounds dropped."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    device = torch.device("cpu")
    for r in range(warmup + repeats):
        for name, fn in steps.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def train_step(loss_fn: StepLoss, cfg: ModelConfig, batch: Batch) -> Callable[[], None]:
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        loss_fn(model, batch, gen).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def cost_rows(shape: str, blocks: tuple[int, ...], variants: tuple[str, ...], repeats: int, warmup: int) -> dict:
    """Median ms/step of every arm and of its attention core, interleaved, on one shape."""
    kw, batch_size, seq_len = SHAPES[shape]
    V = kw["vocab_size"]
    # + MASK; context 2L: the two-pass arm's cache holds L clean tokens while L noisy ones attend (the model has
    # no position table, so the context changes no parameter and no cost)
    cfg = ModelConfig(context=2 * seq_len, **{**kw, "vocab_size": V + 1})
    specials = SpecialIds(bos=0, eos=1, pad=2, mask=V, vocab_size=V)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (batch_size, seq_len), generator=g)
    ids[:, 0] = specials.bos
    batch = Batch(ids, torch.ones_like(ids, dtype=torch.bool))
    losses = arms(specials, blocks, variants)
    agree = check_same_loss(losses, cfg, Batch(ids[:2], batch.mask_BL[:2]))
    steps = {name: train_step(fn, cfg, batch) for name, fn in losses.items()}
    steps |= {f"{name}:attn": attention_core(name, cfg, batch_size, seq_len) for name in losses}
    load_before = load_avg()
    times = time_interleaved(steps, repeats, warmup)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for name in losses:
        step_s, attn_s = med[name], med[f"{name}:attn"]
        rows.append(
            {
                "arm": name,
                "ms_step": 1e3 * step_s,
                "us_token": 1e6 * step_s / (batch_size * seq_len),
                "ratio_mdlm": step_s / med["mdlm"],
                "ratio_mdlm_paired": statistics.median(a / b for a, b in zip(times[name], times["mdlm"], strict=True)),
                "attn_core_ms": 1e3 * attn_s,
                "rest_ms": 1e3 * (step_s - attn_s),
                "ms_step_all": [1e3 * t for t in times[name]],
                "attn_core_ms_all": [1e3 * t for t in times[f"{name}:attn"]],
                "max_rel_diff_to_one_pass": agree.get(name),
            }
        )
    return {
        "shape": shape,
        "model": kw,
        "batch": batch_size,
        "seq_len": seq_len,
        "tokens_per_step": batch_size * seq_len,
        "precision": "fp32",
        "repeats": repeats,
        "warmup": warmup,
        "load_avg_before": load_before,
        "load_avg_after": load_avg(),
        "rows": rows,
    }


def print_cost(res: dict) -> None:
    print(
        f"\n{res['shape']}: batch {res['batch']} x L {res['seq_len']}, {res['model']}, fp32, median of "
        f"{res['repeats']} interleaved repeats; load {res['load_avg_before']} -> {res['load_avg_after']}"
    )
    print(f"{'arm':<20}{'ms/step':>9}{'us/token':>10}{'x mdlm':>8}{'paired':>8}{'attn ms':>9}{'rest ms':>9}")
    for r in res["rows"]:
        print(
            f"{r['arm']:<20}{r['ms_step']:>9.1f}{r['us_token']:>10.2f}{r['ratio_mdlm']:>8.2f}{r['ratio_mdlm_paired']:>8.2f}"
            f"{r['attn_core_ms']:>9.1f}{r['rest_ms']:>9.1f}"
        )


# ------------------------------------------------------------------------------------------ window variance


def window_variance(run_dir: Path, split: str, batches: int, draws: int, seed: int, batch_size: int) -> dict:
    """Per window (beta, omega): the M x R per-batch training-loss estimates (mask rates ~ U[beta, omega]) of a
    bd3lm run's last checkpoint on the first M batches of ``split``, their mean and sample variance."""
    from dlm.data.loader import Loader
    from dlm.data.shards import open_split
    from dlm.eval.variance import batch_elbo_variance, pick_window
    from dlm.rundir import load_run

    run = load_run(run_dir, which="last", ema=True, device="cpu")
    if not isinstance(run.process, BD3LMProcess):
        raise SystemExit(f"{run_dir} is a {run.process.name} run, not bd3lm")
    loader = Loader(open_split(Path(run.cfg.data.dir), split), batch_size, seed=seed, shuffle=False, infinite=False)
    data = [b for _, b in zip(range(batches), loader, strict=False)]
    model = run.model.eval()
    table, rows = {}, []
    for beta, omega in WINDOWS:
        proc = get_process(replace(run.process.cfg, clip_beta=beta, clip_omega=omega), run.process.specials)
        gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            vals = [float(proc.loss(model, b, gen)[0]) for b in data for _ in range(draws)]
        var = batch_elbo_variance(vals)
        table[(beta, omega)] = var
        rows.append(
            {
                "beta": beta,
                "omega": omega,
                "mean": statistics.fmean(vals),
                "var": var,
                "sd": var**0.5,
                "n": len(vals),
                "values": vals,
                "wall_s": time.perf_counter() - t0,
            }
        )
    best = pick_window(table)
    return {
        "run": str(run_dir),
        "checkpoint_step": run.step,
        "ema": run.ema,
        "block_size": run.process.block_size,
        "trained_window": list(run.process.clip_window),  # the checkpoint's (configured or searched)
        "trained_window_source": run.clip_window_source,
        "split": split,
        "batches": len(data),
        "batch_size": batch_size,
        "draws_per_batch": draws,
        "seed": seed,
        "estimate": "per-batch training loss (BD3LMProcess.loss, nats/token, one t per block, antithetic over the "
        "batch x blocks) with mask rates 1 - alpha_t ~ U[beta, omega]; (0, 1) = the NELBO estimate",
        "variance": "sample variance (divisor n - 1) over the batches x draws values (batch_elbo_variance)",
        "picked": list(best),
        "rows": rows,
    }


def print_windows(res: dict) -> None:
    print(
        f"\nL' = {res['block_size']}, {res['run']} step {res['checkpoint_step']}, split {res['split']}: "
        f"{res['batches']} batches of {res['batch_size']} x {res['draws_per_batch']} draws"
    )
    print(f"{'window':<14}{'mean':>9}{'var':>12}{'sd':>9}")
    for r in res["rows"]:
        print(f"[{r['beta']:.2f}, {r['omega']:.2f}]{r['mean']:>9.3f}{r['var']:>12.5f}{r['sd']:>9.4f}")
    print(f"picked: {res['picked']}")


def test_nll(run_dir: Path, split: str, t_samples: int, seed: int, batch_size: int) -> dict:
    """``dlm.eval.likelihood.evaluate_nll`` of a run's last checkpoint on the whole ``split`` with K = t_samples
    time samples per sequence for a bound (``process.eval_t_samples``; AR: exact, K unused)."""
    from dlm.data.loader import Loader
    from dlm.data.shards import open_split
    from dlm.eval.likelihood import evaluate_nll
    from dlm.rundir import load_run

    run = load_run(run_dir, which="last", ema=True, device="cpu")
    proc = get_process(replace(run.process.cfg, eval_t_samples=t_samples), run.process.specials)
    loader = Loader(open_split(Path(run.cfg.data.dir), split), batch_size, seed=seed, shuffle=False, infinite=False)
    t0 = time.perf_counter()
    res = evaluate_nll(proc, run.model, loader, generator=torch.Generator().manual_seed(seed))
    keep = ("nll", "nll_se", "bound", "tokens", "sequences")
    return {
        "run": str(run_dir),
        "family": run.process.name,
        "block_size": getattr(run.process, "block_size", None),
        "seed": run.cfg.train.seed,
        "checkpoint_step": run.step,
        "split": split,
        "t_samples": None if run.process.exact_likelihood else t_samples,
        **{k: res.get(k) for k in keep},
        "wall_s": time.perf_counter() - t0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--blocks", type=int, nargs="+", default=[4, 16])
    p.add_argument("--variants", nargs="*", default=["2pass", "fullhead"], choices=["2pass", "fullhead"])
    p.add_argument("--repeats", type=int, default=5, help="timed interleaved rounds (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a shared 2-core machine: 1)")
    p.add_argument("--windows", type=Path, nargs="+", help="bd3lm run directories: the window-variance tables instead")
    p.add_argument("--nll", type=Path, nargs="+", help="run directories: the NLL (bound) on the whole --split")
    p.add_argument("--t-samples", type=int, default=4, help="--nll: time samples per sequence of a bound")
    p.add_argument("--split", default="validation")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--draws", type=int, default=4, help="loss draws per batch (window variance)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    results = Path(__file__).parent / "results"
    if a.nll:
        rows = []
        for run in a.nll:
            rows.append(test_nll(run, a.split, a.t_samples, a.seed, a.batch_size))
            r = rows[-1]
            print(f"{r['run']}: NLL {r['bound']} {r['nll']:.4f} ± {r['nll_se']:.4f} ({r['sequences']} sequences)")
        out = {"benchmark": "bd3lm_nll", "machine": machine_info(torch.device("cpu")), "rows": rows}
        write_result(a.out or results / "bd3lm_nll.json", out)
        return
    if a.windows:
        runs = [window_variance(run, a.split, a.batches, a.draws, a.seed, a.batch_size) for run in a.windows]
        for res in runs:
            print_windows(res)
        out = {"benchmark": "bd3lm_windows", "machine": machine_info(torch.device("cpu")), "runs": runs}
        write_result(a.out or results / "bd3lm_windows.json", out)
        return
    shapes = []
    for shape in a.shapes:
        res = cost_rows(shape, tuple(a.blocks), tuple(a.variants), a.repeats, a.warmup)
        print_cost(res)
        shapes.append(res)
    out = {"benchmark": "bd3lm_cost", "machine": machine_info(torch.device("cpu")), "shapes": shapes}
    write_result(a.out or results / "bd3lm_cost.json", out)


if __name__ == "__main__":
    main()
