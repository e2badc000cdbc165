"""Presenting a formal-language experiment from its result (experiment.json's content): the table printed to
stdout and the figure (MDM theory paper, figure 1): two panels against the number of MDLM sampling steps (log
scale), TER on top and SER below, with AR's value as a horizontal line."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def plot_ter_ser(result: Mapping[str, Any], path: str | Path) -> Path:
    """Draw ``result`` (experiment.json's content) into a PNG at ``path`` (written to a temporary file and
    renamed). Top: MDLM TER ± 2 SE per step count, AR's TER (line and ± 2 SE band) and ter_optimal (exact
    samples of the language). Bottom: MDLM SER ± 2 SE, AR's SER. AR is also the last point of the x-axis (as in
    the paper's figure); the matched-TER step count is marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["steps"] for r in result["mdlm"]]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 7.2), sharex=True, constrained_layout=True)
    x_ar = max(steps) * 1.6  # AR is drawn as the last point of the x-axis, as in the paper's figure
    _ter_panel(top, result, x_ar)
    _ser_panel(bottom, result, x_ar)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def _ter_panel(top: Any, result: Mapping[str, Any], x_ar: float) -> None:
    """MDLM TER ± 2 SE per step count, AR's TER (line, ± 2 SE band, point at ``x_ar``), exact samples' TER,
    and the matched-TER step count."""
    rows = [r for r in result["mdlm"] if r["ter"] is not None]
    ar = result["ar"]
    top.errorbar(
        [r["steps"] for r in rows],
        [r["ter"] for r in rows],
        yerr=[2 * (r["ter_se"] or 0) for r in rows],
        marker="o",
        capsize=3,
        label="MDLM (ddpm_cache)",
    )
    if ar["ter"] is not None:
        top.axhline(ar["ter"], color="C3", linestyle="--", label=f"AR (KV cache): {ar['ter']:.3f}")
        top.errorbar([x_ar], [ar["ter"]], yerr=[2 * (ar["ter_se"] or 0)], marker="s", color="C3", capsize=3)
        band = 2 * (ar["ter_se"] or 0)
        top.axhspan(ar["ter"] - band, ar["ter"] + band, color="C3", alpha=0.12)
    if result.get("ter_optimal") is not None:
        top.axhline(
            result["ter_optimal"], color="k", linestyle=":", label=f"exact samples: {result['ter_optimal']:.3f}"
        )
    m = result.get("matched_ter") or {}
    if m.get("steps") is not None:
        speed = f", {m['speedup']:.2f}x AR speed" if m.get("speedup") else ""
        top.annotate(
            f"matches AR at {m['steps']} steps{speed}",
            (m["steps"], m["value"]),
            textcoords="offset points",
            xytext=(8, 14),
            fontsize=8,
            arrowprops={"arrowstyle": "->", "lw": 0.8},
        )
    top.set_ylabel("TER (generative perplexity)")
    top.set_title(
        f"formal:{result['language_preset']} (temp_mode {result['temp_mode']}), L={result['length']}, "
        f"N={result['n_samples']}",
        fontsize=10,
    )
    top.legend(fontsize=8)
    top.grid(alpha=0.3)


def _ser_panel(bottom: Any, result: Mapping[str, Any], x_ar: float) -> None:
    """MDLM SER ± 2 SE per step count and AR's SER (line, and a point at ``x_ar``); the shared log2 x-axis."""
    steps = [r["steps"] for r in result["mdlm"]]
    ar = result["ar"]
    bottom.errorbar(
        steps,
        [r["ser"] for r in result["mdlm"]],
        yerr=[2 * r["ser_se"] for r in result["mdlm"]],
        marker="o",
        capsize=3,
        label="MDLM (ddpm_cache)",
    )
    bottom.axhline(ar["ser"], color="C3", linestyle="--", label=f"AR (KV cache): {ar['ser']:.3f}")
    bottom.errorbar([x_ar], [ar["ser"]], yerr=[2 * ar["ser_se"]], marker="s", color="C3", capsize=3)
    bottom.set_ylim(-0.03, 1.03)
    bottom.set_ylabel("SER (fraction out of support)")
    bottom.set_xlabel("MDLM sampling steps (ddpm_cache); AR at the right")
    bottom.set_xscale("log", base=2)
    bottom.set_xticks([*steps, x_ar], [*(str(s) for s in steps), "AR"])
    bottom.legend(fontsize=8)
    bottom.grid(alpha=0.3)


def format_row(name: str, row: Mapping[str, Any]) -> str:
    steps = "-" if row["steps"] is None else str(row["steps"])
    ter = "undefined" if row["ter"] is None else f"{row['ter']:.4f} ± {row['ter_se']:.4f}"
    return (
        f"{name:<16}{steps:>6}  TER {ter}  SER {row['ser']:.4f} ± {row['ser_se']:.4f}  NFE {row['nfe']:6.1f}  "
        f"{1e3 * row['wall_s_per_sequence']:8.2f} ms/seq"
    )


def format_table(result: Mapping[str, Any]) -> list[str]:
    """The result as a plain-text table (what ``dlm experiment formal`` prints)."""

    def fmt(v: float | None, se: float | None, nd: int = 4) -> str:
        return "undefined" if v is None else f"{v:.{nd}f} ± {se:.{nd}f}"

    head = f"{'model':<18}{'steps':>6}  {'TER':>17}  {'SER':>17}  {'NFE':>6}  {'ms/seq':>8}  {'speedup':>7}"
    lines = [
        f"formal:{result['language_preset']} (temp_mode {result['temp_mode']}), L={result['length']}, "
        f"N={result['n_samples']} per row, batch {result['sample_batch_size']}",
        head,
        "-" * len(head),
    ]
    for r in result["mdlm"]:
        lines.append(
            f"{'mdlm ddpm_cache':<18}{r['steps']:>6}  {fmt(r['ter'], r['ter_se']):>17}  "
            f"{fmt(r['ser'], r['ser_se']):>17}  {r['nfe']:6.1f}  {1e3 * r['wall_s_per_sequence']:8.2f}  "
            f"{r['speedup_vs_ar']:6.2f}x"
        )
    a = result["ar"]
    lines.append(
        f"{'ar (KV cache)':<18}{'-':>6}  {fmt(a['ter'], a['ter_se']):>17}  {fmt(a['ser'], a['ser_se']):>17}  "
        f"{a['nfe']:6.1f}  {1e3 * a['wall_s_per_sequence']:8.2f}  {1.0:6.2f}x"
    )
    lines.append(f"{'exact samples':<18}{'':>6}  {result['ter_optimal']:>17.4f}  {0.0:>17.4f}")
    for key in ("matched_ter", "matched_ser"):
        m = result[key]
        what = key.split("_")[1].upper()
        if m["steps"] is None:
            lines.append(f"matched {what}: no step count of the sweep matches AR ({m['rule']})")
        else:
            lines.append(
                f"matched {what}: {m['steps']} steps, speedup {m['speedup']:.2f}x (AR / MDLM wall per sequence), "
                f"NFE ratio {m['nfe_ratio']:.2f}"
            )
    n = result["nll"]
    lines.append(
        f"validation NLL per symbol: entropy rate {n['entropy_rate']:.4f} | true model {n['true_model_nll']['nll']:.4f}"
        f" | AR = {n['ar']['nll']:.4f} (gap {n['ar']['gap']:+.4f}) | MDLM <= {n['mdlm']['nll']:.4f} "
        f"(gap <= {n['mdlm']['gap']:+.4f})"
    )
    if "wall_s" in result:
        w = result["wall_s"]
        parts = ", ".join(f"{k} {v:.0f}s" for k, v in w.items() if k != "total")
        load = result.get("machine", {}).get("load_avg_1min", {})
        lines.append(
            f"wall time: {parts}; total {w['total']:.0f}s (load average {load.get('start')} -> {load.get('end')}, "
            f"{result.get('machine', {}).get('torch_threads')} torch threads)"
        )
    return lines
