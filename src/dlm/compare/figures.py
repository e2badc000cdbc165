"""The comparison report's figures (matplotlib, Agg backend), drawn from results.json and each run's metrics.

Every figure is a function of files' content only: ``results`` (results.json) and ``metrics`` (the lines of
each run's metrics.jsonl, keyed by (arm, seed)). A figure without data is not drawn; ``draw_figures`` returns
the reason instead, and the report says it in words. PNGs are written to a temporary name and renamed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RunKey = tuple[str, int]
Metrics = Mapping[RunKey, Sequence[Mapping[str, Any]]]
_LINESTYLES = ("-", "--", ":", "-.")


@dataclass(frozen=True)
class FigureFile:
    """One figure of the report: its file (None when not drawn) and, then, why not."""

    name: str
    title: str
    caption: str
    path: Path | None
    missing: str = ""


def stat(agg: Mapping[str, Any], name: str, part: str = "mean") -> float | None:
    """``agg[name][part]`` of an aggregate row (``mean``, ``std``, ``min``, ``max``), None when absent/null."""
    value = agg.get(name)
    if not isinstance(value, Mapping):
        return None
    out = value.get(part)
    return float(out) if isinstance(out, int | float) and math.isfinite(out) else None


def temperature(agg: Mapping[str, Any]) -> float | None:
    """The sampling temperature of a samples row or aggregate (a number, or a stat of one), None when absent."""
    t = agg.get("temperature")
    if isinstance(t, Mapping):
        t = t.get("mean")
    return float(t) if isinstance(t, int | float) and not isinstance(t, bool) else None


def point_label(p: Mapping[str, Any]) -> str:
    """``S=16`` / ``T=0.9`` / ``S=16,T=0.9``: a sweep point's step count and its temperature when not 1."""
    parts = [] if p.get("steps") is None else [f"S={p['steps']}"]
    t = p.get("temperature")
    return ",".join(parts + ([f"T={t:g}"] if t is not None and t != 1.0 else []))


def arm_order(results: Mapping[str, Any]) -> list[str]:
    """The arms in the order of results.json's runs (then of its rows)."""
    seen: dict[str, None] = {}
    for r in [*results.get("runs", []), *results.get("rows", [])]:
        seen.setdefault(r["arm"], None)
    return list(seen)


def aggregates(results: Mapping[str, Any], kind: str) -> list[dict[str, Any]]:
    """The aggregate rows of ``kind``, by arm order, then sampler, then steps (None first), then batch size."""
    order = {a: i for i, a in enumerate(arm_order(results))}

    def key(a: Mapping[str, Any]) -> tuple:
        steps, batch, temp = a.get("steps"), a.get("batch_size"), temperature(a)
        return (order.get(a["arm"], len(order)), str(a.get("sampler")), steps or 0, temp or 0.0, batch or 0)

    return sorted((a for a in results.get("aggregate", []) if a.get("kind") == kind), key=key)


def speed_quality_points(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per (arm, sampler, steps): gen PPL (mean over samples of exp(per-sample NLL), mean ± std over seeds), the
    quality shown against speed (``quality``: that gen PPL, or TER where there is none) and seconds per sequence:
    the speed protocol's at its smallest batch size when measured, else the sampling run's wall time per
    sequence (``source`` says which)."""
    speed: dict[tuple, dict[str, Any]] = {}
    for a in aggregates(results, "speed"):
        key = (a["arm"], a.get("sampler"), a.get("steps"))
        if key not in speed or (a.get("batch_size") or 0) < (speed[key].get("batch_size") or 0):
            speed[key] = a
    out = []
    for a in aggregates(results, "samples"):
        sp = speed.get((a["arm"], a.get("sampler"), a.get("steps")))
        sps = stat(sp, "seconds_per_sequence") if sp else None
        source = f"speed protocol, batch {sp.get('batch_size')}" if sps is not None and sp else "sampling run"
        out.append(
            {"arm": a["arm"], "sampler": a.get("sampler"), "steps": a.get("steps"), "n_seeds": a.get("n_seeds")}
            | {"temperature": temperature(a), "nfe": stat(a, "nfe"), "ter": stat(a, "ter"), "ser": stat(a, "ser")}
            | {"gen_ppl": stat(a, "gen_ppl_seq_mean"), "gen_ppl_std": stat(a, "gen_ppl_seq_mean", "std")}
            | {"entropy": stat(a, "entropy_mean"), "sampling_s": stat(a, "wall_s_per_sequence")}
            | {"seconds_per_sequence": sps if sps is not None else stat(a, "wall_s_per_sequence"), "source": source}
        )
        # the quality axis: gen PPL where an evaluator scored samples, else TER (true language, formal corpora)
        name = "gen PPL" if out[-1]["gen_ppl"] is not None or stat(a, "ter") is None else "TER"
        field = "gen_ppl_seq_mean" if name == "gen PPL" else "ter"
        out[-1] |= {"quality_name": name, "quality": stat(a, field), "quality_std": stat(a, field, "std")}
    return out


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats in both coordinates (lower x and lower y are better), by increasing x:
    p is on the front iff no q != p has q.x <= p.x and q.y <= p.y with one of them strict."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(set(points)):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


# ----------------------------------------------------------------------------- the figures


def _colours(results: Mapping[str, Any]) -> dict[str, str]:
    return {a: f"C{i % 10}" for i, a in enumerate(arm_order(results))}


def _run_lines(results: Mapping[str, Any], metrics: Metrics, x: str, y: str, validation: bool) -> Any:
    """A figure with one line per (arm, seed) of metrics lines holding ``x`` and ``y`` (validation lines or
    training lines), arms by colour and seeds by line style; a reason string when no run has such lines."""
    colours = _colours(results)
    seeds = sorted({seed for _, seed in metrics})
    lines = []
    for (arm, seed), rows in metrics.items():
        pts = [
            (r[x], r[y])
            for r in rows
            if (r.get("split") == "validation") == validation
            and isinstance(r.get(x), int | float)
            and isinstance(r.get(y), int | float)
        ]
        if pts:
            lines.append((arm, seed, pts))
    if not lines:
        return f"no run's metrics.jsonl holds {'validation' if validation else 'training'} lines with {x} and {y}"
    fig, ax = _new_figure()
    for arm, seed, pts in lines:
        style = _LINESTYLES[seeds.index(seed) % len(_LINESTYLES)]
        ax.plot(*zip(*pts, strict=True), style, color=colours.get(arm, "k"), label=f"{arm} seed {seed}", lw=1.2)
    ax.set_xlabel(x)
    ax.legend(fontsize=7, ncol=2)
    return fig, ax


def _fig_loss(results: Mapping[str, Any], metrics: Metrics) -> Any:
    out = _run_lines(results, metrics, "tokens", "loss", validation=False)
    if isinstance(out, str):
        return out
    out[1].set(xlabel="training tokens", ylabel="training loss (nats/token, own objective)")
    return out[0]


def _fig_lr(results: Mapping[str, Any], metrics: Metrics) -> Any:
    out = _run_lines(results, metrics, "step", "lr", validation=False)
    if isinstance(out, str):
        return out
    out[1].set(xlabel="optimizer step", ylabel="learning rate")
    out[1].ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    return out[0]


def _fig_val(results: Mapping[str, Any], metrics: Metrics) -> Any:
    out = _run_lines(results, metrics, "step", "val_nll", validation=True)
    if isinstance(out, str):
        return out
    out[1].set(xlabel="optimizer step", ylabel="validation NLL (nats/token)")
    return out[0]


def _curves(points: Sequence[Mapping[str, Any]], y: str) -> tuple[dict[tuple, list], list[Mapping[str, Any]]]:
    """Points with a value ``y``: those with a step count grouped by (arm, sampler, temperature), sorted by
    steps; and the ones without (AR)."""
    curves: dict[tuple, list] = {}
    flat = []
    for p in points:
        if p.get(y) is None:
            continue
        if p["steps"] is None:
            flat.append(p)
        else:
            curves.setdefault((p["arm"], p["sampler"], p.get("temperature")), []).append(p)
    return {k: sorted(v, key=lambda p: p["steps"]) for k, v in curves.items()}, flat


def _fig_genppl_steps(results: Mapping[str, Any], metrics: Metrics) -> Any:
    curves, flat = _curves(speed_quality_points(results), "gen_ppl")
    if not curves:
        return "no gen PPL at any sampling step count (no sample rows with gen_ppl_seq_mean)"
    colours = _colours(results)
    fig, ax = _new_figure()
    for (arm, sampler, temp), pts in curves.items():
        ax.errorbar(
            [p["steps"] for p in pts],
            [p["gen_ppl"] for p in pts],
            yerr=[p["gen_ppl_std"] or 0.0 for p in pts],
            marker="o",
            capsize=3,
            color=colours.get(arm),
            label=f"{arm} ({sampler}{'' if temp in (None, 1.0) else f', T={temp:g}'})",
        )
    for p in flat:
        c = colours.get(p["arm"])
        t = point_label(p)
        ax.axhline(p["gen_ppl"], color=c, ls="--", label=f"{p['arm']} ({p['sampler']}{', ' + t if t else ''})")
        if p["gen_ppl_std"]:
            ax.axhspan(p["gen_ppl"] - p["gen_ppl_std"], p["gen_ppl"] + p["gen_ppl_std"], color=c, alpha=0.12)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="sampling steps S (log2); bars ± std over seeds", ylabel="gen PPL (mean of per-sample exp)")
    ax.legend(fontsize=7)
    return fig


def _sweep_curves(points: Sequence[Mapping[str, Any]], x: str, y: str) -> dict[tuple, list]:
    """Points with ``x`` and ``y`` grouped by (arm, sampler): one curve per sampler of an arm over its step
    counts x temperatures, sorted by ``x`` so that the curve traces the trade-off."""
    curves: dict[tuple, list] = {}
    for p in points:
        if p.get(x) is not None and p.get(y) is not None:
            curves.setdefault((p["arm"], p["sampler"]), []).append(p)
    return {k: sorted(v, key=lambda p: (p[x], p[y])) for k, v in curves.items()}


def _frontier_panel(ax: Any, results: Mapping[str, Any], x: str, y: str, note: bool = True) -> None:
    """One curve per (arm, sampler) of ``y`` against ``x`` (points = steps x temperature, each labelled);
    the samplers without steps (AR) marked by squares."""
    import matplotlib

    colours, cmap = _colours(results), matplotlib.colormaps["tab20"]
    curves = _sweep_curves(speed_quality_points(results), x, y)
    arms = list(dict.fromkeys(arm for arm, _ in curves))
    many = len(curves) > len(arms)  # some arm has several samplers: a colour per curve, a line style per arm
    for i, ((arm, sampler), pts) in enumerate(curves.items()):
        flat = all(p["steps"] is None for p in pts)
        colour = cmap(i % 20) if many and not flat else colours.get(arm)
        ax.plot([p[x] for p in pts], [p[y] for p in pts], "s--" if flat else "o" + _LINESTYLES[arms.index(arm) % 4],
                ms=8 if flat else 5, color=colour, label=f"{arm} ({sampler})")  # fmt: skip
        for p in pts if note else ():
            if text := point_label(p):
                ax.annotate(text, (p[x], p[y]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.legend(fontsize=7)


def _fig_genppl_entropy(results: Mapping[str, Any], metrics: Metrics) -> Any:
    if not _sweep_curves(speed_quality_points(results), "entropy", "gen_ppl"):
        return "no sample rows with both gen PPL and entropy"
    fig, ax = _new_figure()
    _frontier_panel(ax, results, "entropy", "gen_ppl")
    ax.set(xlabel="unigram entropy per sample (nats, mean)", ylabel="gen PPL (mean of per-sample exp, log scale)")
    ax.set_yscale("log")  # collapsed samplers sit an order of magnitude below the rest
    return fig


def _fig_frontier_formal(results: Mapping[str, Any], metrics: Metrics) -> Any:
    import matplotlib.pyplot as plt

    points = speed_quality_points(results)
    if not _sweep_curves(points, "ser", "ter") and not _sweep_curves(points, "nfe", "ter"):
        return "no sample rows with TER and SER (or NFE)"
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.2))
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.12, top=0.9, wspace=0.22)
    _frontier_panel(axes[0], results, "ser", "ter")
    axes[0].set(xlabel="SER (share of samples out of support)", ylabel="TER (true-language gen PPL)")
    _frontier_panel(axes[1], results, "nfe", "ter", note=False)
    axes[1].set_xscale("log", base=2)
    axes[1].set(xlabel="NFE (network calls per batch, log2)", ylabel="TER")
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig


def _fig_pareto(results: Mapping[str, Any], metrics: Metrics) -> Any:
    points = [p for p in speed_quality_points(results) if p["quality"] is not None and p["seconds_per_sequence"]]
    if not points:
        return "no (seconds per sequence, gen PPL or TER) pair in the results"
    names = sorted({p["quality_name"] for p in points})
    points = [p for p in points if p["quality_name"] == names[0]]  # one quality axis: gen PPL before TER
    colours = _colours(results)
    fig, ax = _new_figure()
    groups: dict[tuple, list] = {}
    for p in points:
        groups.setdefault((p["arm"], p["sampler"]), []).append(p)
    for (arm, sampler), pts in groups.items():
        pts.sort(key=lambda p: (p["temperature"] or 0.0, p["steps"] or 0))
        ax.plot([p["seconds_per_sequence"] for p in pts], [p["quality"] for p in pts], "o-", color=colours.get(arm))
        ax.lines[-1].set_label(f"{arm} ({sampler})")
    front = pareto_front([(p["seconds_per_sequence"], p["quality"]) for p in points])
    ax.step(*zip(*front, strict=True), where="post", color="k", ls=":", lw=1, label="Pareto front")
    ax.set_xscale("log")
    label = "gen PPL (mean of per-sample exp)" if names[0] == "gen PPL" else "TER (true-language gen PPL)"
    ax.set(xlabel="seconds per sequence (log)", ylabel=label)
    ax.legend(fontsize=7)
    return fig


def _fig_ter_ser(results: Mapping[str, Any], metrics: Metrics) -> Any:
    import matplotlib.pyplot as plt

    rows = [a for a in aggregates(results, "samples") if stat(a, "ter") is not None or stat(a, "ser") is not None]
    if not rows:
        return "no TER/SER (not a formal corpus)"
    colours = _colours(results)
    fig, axes = plt.subplots(2, 1, figsize=(6.4, 6.4), sharex=True)
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.09, top=0.93, hspace=0.08)
    for ax, field, label in zip(axes, ("ter", "ser"), ("TER (true-language gen PPL)", "SER (share out of support)")):
        _ter_ser_panel(ax, rows, field, colours)
        ax.set_ylabel(label)
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("sampling steps S (log2); bars ± std over seeds")
    return fig


def _ter_ser_panel(ax: Any, rows: Sequence[Mapping[str, Any]], field: str, colours: Mapping[str, str]) -> None:
    """``field`` (ter or ser) against steps per (arm, sampler), ± std over seeds; samplers without steps as a
    dashed line; said in the panel when no row has a value (TER is undefined when no sample is all symbols)."""
    curves: dict[tuple, list] = {}
    for a in rows:
        if stat(a, field) is None:
            continue
        if a.get("steps") is None:
            ax.axhline(stat(a, field), color=colours.get(a["arm"]), ls="--", label=f"{a['arm']} ({a.get('sampler')})")
        else:
            curves.setdefault((a["arm"], a.get("sampler"), temperature(a)), []).append(a)
    for (arm, sampler, temp), pts in curves.items():
        pts.sort(key=lambda a: a["steps"])
        steps, values = [a["steps"] for a in pts], [stat(a, field) for a in pts]
        yerr = [stat(a, field, "std") or 0.0 for a in pts]
        t = "" if temp in (None, 1.0) else f", T={temp:g}"
        label = f"{arm} ({sampler}{t})"
        ax.errorbar(steps, values, yerr=yerr, marker="o", capsize=3, color=colours.get(arm), label=label)
    ax.grid(alpha=0.3)
    if field == "ser":
        ax.set_ylim(-0.03, 1.03)  # a share: the whole range, so that 0.10 and 0.12 do not look far apart
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, f"{field.upper()} undefined for every sample set", transform=ax.transAxes, ha="center")


_FIGURES: tuple[tuple[str, str, str, Callable[..., Any]], ...] = (
    ("training_loss", "Training loss against tokens", "one line per arm and seed; arms by colour", _fig_loss),
    ("learning_rate", "Learning rate against step", "one line per arm and seed", _fig_lr),
    ("validation_nll", "Validation NLL against step", "per seed; AR exact, diffusion an upper bound", _fig_val),
    (
        "genppl_steps",
        "Gen PPL against sampling steps",
        "samplers without steps (AR) as a line ± std",
        _fig_genppl_steps,
    ),
    (
        "genppl_entropy",
        "Quality–diversity frontier: gen PPL against entropy",
        "one curve per arm and sampler over its step counts S x temperatures T; squares: AR (no steps)",
        _fig_genppl_entropy,
    ),
    (
        "speed_quality",
        "Speed–quality",
        "seconds per sequence against gen PPL (TER on a formal corpus); dotted: Pareto front",
        _fig_pareto,
    ),
)


def _new_figure() -> tuple[Any, Any]:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.12, top=0.9)  # fixed margins: one draw per figure
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig: Any, path: Path) -> None:
    """Save ``fig`` as a PNG through a temporary name in the same directory, renamed over ``path``."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=100, metadata={"Software": None})
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def draw_figures(results: Mapping[str, Any], metrics: Metrics, fig_dir: Path) -> list[FigureFile]:
    """Draw every figure that has data into ``fig_dir/NAME.png``; the TER/SER figure only on a formal corpus.
    A figure without data gets ``path=None`` and its reason (a stale PNG of that name is removed)."""
    import matplotlib

    matplotlib.use("Agg")
    figures = list(_FIGURES)
    if any(r.get("kind") == "samples" and (r.get("ter"), r.get("ser")) != (None, None) for r in results["rows"]):
        figures.append(("ter_ser", "TER and SER against sampling steps", "AR as a dashed line", _fig_ter_ser))
        figures.append((
            "frontier_formal", "Frontier on the true language: TER against SER and against NFE",
            "one curve per arm and sampler over its step counts S x temperatures T; squares: AR", _fig_frontier_formal,
        ))  # fmt: skip
    fig_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for name, title, caption, draw in figures:
        path = fig_dir / f"{name}.png"
        fig = draw(results, metrics)
        if isinstance(fig, str):
            path.unlink(missing_ok=True)
            out.append(FigureFile(name, title, caption, None, fig))
            continue
        fig.suptitle(title, fontsize=10)
        _save(fig, path)
        out.append(FigureFile(name, title, caption, path))
    return out
