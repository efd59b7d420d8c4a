"""Llama 3's figures 2, 3 and 4 drawn from a fit document (fit.json), with matplotlib's Agg canvas.

- ``scaling-isoflops.png`` (figure 2): validation loss against training tokens, one colour per
  budget, each budget's parabola and its minimum marked;
- ``scaling-power-law.png`` (figure 3): compute-optimal tokens (and parameters) against compute on
  log-log axes: the minima, our power law with its confidence band, and the paper's own fit
  (alpha = 0.53, A = 0.29) as a labelled reference line;
- ``scaling-nll-accuracy.png`` (figure 4, when the sweep scored a task): normalised NLL against
  compute, and accuracy against NLL with the fitted sigmoid.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_fit"]


def _figure(n: int = 1) -> tuple[Any, list[Any]]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        from llamalab.scaling.records import ScalingError

        raise ScalingError("the plots need matplotlib: pip install matplotlib (or llamalab[train])") from None

    fig = Figure(figsize=(6.4 * n, 4.6), dpi=110)
    FigureCanvasAgg(fig)  # headless: no pyplot, no global backend state
    return fig, [fig.add_subplot(1, n, i + 1) for i in range(n)]


def _colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(x) for x in np.linspace(0.05, 0.85, max(n, 1))]


def _isoflops(doc: dict[str, Any], path: Path) -> None:
    fig, (ax,) = _figure()
    iso = doc["isoflops"]
    for f, colour in zip(iso, _colours(len(iso))):
        tokens = np.array([r["tokens"] for r in f["runs"]])
        losses = np.array([r["val_loss"] for r in f["runs"]])
        pa = f["tokens_parabola"]
        lo = min(np.log10(tokens).min(), pa["x_min"]) - 0.15
        hi = max(np.log10(tokens).max(), pa["x_min"]) + 0.15
        xs = np.linspace(lo, hi, 200)
        ax.plot(10 ** xs, np.polyval([pa["a"], pa["b"], pa["c"]], xs), color=colour, lw=1.5)
        ax.scatter(tokens, losses, color=colour, s=28, zorder=3, label=f"{f['budget']:.2g} FLOPs")
        ax.scatter([f["tokens_opt"]], [f["loss_opt"]], marker="*", s=160, color=colour, edgecolor="black",
                   zorder=4)
    ax.scatter([], [], marker="*", s=120, color="white", edgecolor="black", label="minimum (tokens*, loss*)")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("IsoFLOPs curves (cf. Llama 3 figure 2)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _law_panel(ax: Any, budgets: np.ndarray, values: np.ndarray, law_doc: dict[str, Any], ylabel: str,
               paper: dict[str, Any] | None) -> None:
    from llamalab.scaling.fit import PowerLaw

    law = PowerLaw.from_dict(law_doc)
    lo, hi = np.log10(budgets.min()), np.log10(budgets.max())
    xs = np.logspace(lo - 0.3, hi + 0.3, 100)
    ax.scatter(budgets, values, color="black", zorder=3, label="compute-optimal (parabola minima)")
    fit_label = f"our fit: {law.A:.3g} C^{law.alpha:.3f}"
    if law.ci_alpha:
        fit_label += f" (alpha {law.confidence:.0%} CI [{law.ci_alpha[0]:.2f}, {law.ci_alpha[1]:.2f}])"
    ax.plot(xs, law(xs), color="tab:blue", label=fit_label)
    band = law.band(xs)
    if band is not None:
        ax.fill_between(xs, band[0], band[1], color="tab:blue", alpha=0.15,
                        label=f"{law.confidence:.0%} confidence band of the line")
    if paper is not None:
        ax.plot(xs, paper["A"] * xs ** paper["alpha"], color="tab:red", ls="--",
                label=f"Llama 3 paper's fit: {paper['A']} C^{paper['alpha']}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("compute budget C (training FLOPs)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)


def _power_law(doc: dict[str, Any], path: Path) -> None:
    fig, (ax1, ax2) = _figure(2)
    budgets = np.array([f["budget"] for f in doc["isoflops"]])
    _law_panel(ax1, budgets, np.array([f["tokens_opt"] for f in doc["isoflops"]]), doc["tokens_power_law"],
               "compute-optimal training tokens", doc["paper"])
    ax1.set_title("Scaling law for tokens (cf. Llama 3 figure 3; toy scale)", fontsize=10)
    _law_panel(ax2, budgets, np.array([f["params_opt"] for f in doc["isoflops"]]), doc["params_power_law"],
               "compute-optimal parameters", None)
    ax2.set_title("... and for parameters", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def _nll_accuracy(doc: dict[str, Any], runs: list[dict[str, Any]], path: Path) -> None:
    ds = doc["downstream"]
    fig, (ax1, ax2) = _figure(2)
    pairs = [r for r in runs if r.get("nll") is not None and r.get("acc") is not None]
    budgets = sorted({r["budget"] for r in pairs})
    for b, colour in zip(budgets, _colours(len(budgets))):
        ax1.scatter([r["budget"] for r in pairs if r["budget"] == b], [r["nll"] for r in pairs if r["budget"] == b],
                    color=colour, s=18, alpha=0.6)
    if ds["optimal"]:
        ob = np.array([o["budget"] for o in ds["optimal"]])
        ax1.scatter(ob, [o["nll"] for o in ds["optimal"]], marker="*", s=150, color="black",
                    label="compute-optimal model", zorder=3)
        law = ds.get("nll_power_law")
        if law:
            xs = np.logspace(np.log10(ob.min()) - 0.2, np.log10(ob.max()) + 0.2, 100)
            ax1.plot(xs, law["A"] * xs ** law["alpha"], color="tab:blue",
                     label=f"fit: {law['A']:.3g} C^{law['alpha']:.3f}")
    ax1.set_xscale("log")
    ax1.set_xlabel("compute budget C (training FLOPs)")
    ax1.set_ylabel("normalised NLL of the correct answer (per char)")
    ax1.set_title("NLL vs compute (cf. Llama 3 figure 4, left)", fontsize=10)
    ax1.grid(alpha=0.3, which="both")
    ax1.legend(fontsize=7)
    nll = np.array([r["nll"] for r in pairs])
    acc = np.array([r["acc"] for r in pairs])
    ax2.scatter(nll, acc, color="black", s=18, label="runs")
    s = ds.get("sigmoid")
    if s:
        from llamalab.scaling.fit import sigmoid

        xs = np.linspace(nll.min() - 0.1 * np.ptp(nll) - 0.05, nll.max() + 0.1 * np.ptp(nll) + 0.05, 200)
        ax2.plot(xs, sigmoid(xs, s["floor"], s["ceiling"], s["slope"], s["mid"]), color="tab:blue",
                 label=f"sigmoid: floor {s['floor']:.2f}, ceiling {s['ceiling']:.2f}, mid {s['mid']:.2f}")
    if ds.get("chance") is not None:
        ax2.axhline(ds["chance"], color="grey", ls=":", label=f"chance ({ds['chance']:.3f})")
    ax2.set_xlabel("normalised NLL of the correct answer (per char)")
    ax2.set_ylabel("accuracy (acc_norm_char)")
    ax2.set_title("accuracy vs NLL (cf. Llama 3 figure 4, right)", fontsize=10)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def plot_fit(doc: dict[str, Any], runs: list[dict[str, Any]], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Draw the figures of the fit document ``doc`` (and, for figure 4, the runs it was fitted on)
    into ``out_dir``; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "scaling-isoflops.png", out / "scaling-power-law.png"]
    _isoflops(doc, written[0])
    _power_law(doc, written[1])
    if doc.get("downstream"):
        written.append(out / "scaling-nll-accuracy.png")
        _nll_accuracy(doc, runs, written[-1])
    return written
