"""The fits of Llama 3's scaling-law method (Dubey et al. 2024, §3.2.1, figures 2-4).

1. **IsoFLOPs parabolas** (figure 2). Per compute budget C, the validation loss of each model
   against log10 of the tokens it trained on is fitted with a second-degree polynomial
   (``numpy.polyfit``); its vertex is the compute-optimal point (tokens*, loss*). The same fit
   against log10 parameters gives params*. A parabola needs 3 sizes, and one that opens
   downwards has no minimum: both are errors, never silently used.
2. **Power law** (figure 3): tokens*(C) = A * C^alpha, i.e. the straight line
   log10 tokens* = log10 A + alpha * log10 C, fitted by ordinary least squares
   (``scipy.stats.linregress``) over the budgets' minima. Confidence intervals: estimate
   +- t_{(1+level)/2, n-2} * standard error, the t quantile from ``scipy.stats.t`` with n - 2
   degrees of freedom (n budgets); A's interval is 10^(log10 A's interval), so asymmetric. Three
   budgets leave one degree of freedom (t_0.975 = 12.7): the intervals are wide, and two budgets
   give a line through both points and no interval at all. A and alpha are strongly correlated
   (A is the line's value at C = 1 FLOP, far outside the data), so the band of the fitted line
   over the budgets is the better summary of the uncertainty; it is in fit.json and the plot.
3. **Downstream** (figure 4): the normalised NLL of the correct answer (per character) of the
   compute-optimal model of each budget (interpolated at tokens* in log10 tokens between the
   budget's runs) against C, as the same power law; and accuracy against NLL, over every run, as a
   4-parameter sigmoid (``scipy.optimize.curve_fit``)::

       acc(nll) = floor + (ceiling - floor) / (1 + exp(slope * (nll - mid)))

   floor and ceiling bounded to [0, 1] (the chance level and the best accuracy the curve
   approaches), slope >= 0 (accuracy falls as NLL rises), mid the NLL half-way between.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from llamalab.scaling.records import ScalingError

__all__ = ["PAPER_A", "PAPER_ALPHA", "IsoFLOPFit", "Parabola", "PowerLaw", "SigmoidFit", "fit_isoflops",
           "fit_parabola", "fit_power_law", "fit_sigmoid", "fit_sweep", "format_table", "sigmoid"]

# Llama 3's own fit (figure 3): N*(C) = A C^alpha with alpha = 0.53, A = 0.29, C in FLOPs.
PAPER_ALPHA = 0.53
PAPER_A = 0.29

SIGMOID_FORM = "acc = floor + (ceiling - floor) / (1 + exp(slope * (nll - mid)))"
CI_METHOD = ("ordinary least squares of log10 y on log10 C (scipy.stats.linregress); interval = estimate +- "
             "t_{(1+level)/2, n-2} * standard error (scipy.stats.t), A's interval = 10^(log10 A's)")


@dataclass
class Parabola:
    """``y = a x^2 + b x + c`` and its vertex ``(x_min, y_min)`` (a minimum: ``a > 0``)."""

    a: float
    b: float
    c: float
    x_min: float
    y_min: float

    def __call__(self, x: Any) -> Any:
        """The polynomial's value at ``x`` (a number or an array)."""
        return np.polyval([self.a, self.b, self.c], x)


def fit_parabola(x: Sequence[float], y: Sequence[float], *, where: str = "data") -> Parabola:
    """Least-squares second-degree polynomial of ``y`` on ``x`` and its minimum.

    ScalingError naming ``where`` for fewer than 3 distinct x values, or a parabola that opens
    downwards (or is flat): it has no minimum.
    """
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(np.unique(xs)) < 3:
        raise ScalingError(f"{where}: {len(np.unique(xs))} distinct model size(s); a second-degree polynomial "
                           f"needs at least 3 (add sizes to this budget)")
    if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
        raise ScalingError(f"{where}: non-finite values; expected finite losses and token counts")
    a, b, c = np.polyfit(xs, ys, 2)
    # Rounding leaves a straight line a curvature of ~1e-16: below this it is flat, not a minimum.
    flat = 1e-9 * max(float(np.ptp(ys)), 1e-300) / float(np.ptp(xs)) ** 2
    if not a > flat:
        raise ScalingError(f"{where}: the fitted parabola opens downwards (x^2 coefficient {a:.4g}, not > 0): it has "
                           f"no minimum, so no compute-optimal point; the loss is not convex over these sizes "
                           f"(add sizes on both sides of the best one, or check the runs)")
    x_min = -b / (2 * a)
    return Parabola(float(a), float(b), float(c), float(x_min), float(c - b * b / (4 * a)))


@dataclass
class IsoFLOPFit:
    """One budget's runs and the minima of its two parabolas (in log10 tokens and in log10 params)."""

    budget: float
    sizes: list[str]
    tokens: list[float]
    params: list[float]
    losses: list[float]
    tokens_parabola: Parabola
    params_parabola: Parabola
    # The vertex lies outside the sizes tried: an extrapolation, flagged rather than hidden.
    extrapolated: bool = False

    @property
    def tokens_opt(self) -> float:
        """Compute-optimal training tokens (the vertex of the loss-vs-log10-tokens parabola)."""
        return 10.0 ** self.tokens_parabola.x_min

    @property
    def loss_opt(self) -> float:
        """The validation loss at that vertex."""
        return self.tokens_parabola.y_min

    @property
    def params_opt(self) -> float:
        """Compute-optimal parameter count (vertex of the loss-vs-log10-params parabola)."""
        return 10.0 ** self.params_parabola.x_min

    def to_dict(self) -> dict[str, Any]:
        """The fit.json entry."""
        return {"budget": self.budget, "n_sizes": len(self.sizes), "tokens_opt": self.tokens_opt,
                "loss_opt": self.loss_opt, "params_opt": self.params_opt, "extrapolated": self.extrapolated,
                "tokens_parabola": asdict(self.tokens_parabola), "params_parabola": asdict(self.params_parabola),
                "runs": [{"size": s, "tokens": t, "params": p, "val_loss": v}
                         for s, t, p, v in zip(self.sizes, self.tokens, self.params, self.losses)]}


def _budget_key(budget: float) -> float:
    return float(f"{budget:.6g}")  # budgets parsed from the same text compare equal; float noise does not split them


def fit_isoflops(runs: Sequence[dict[str, Any]]) -> list[IsoFLOPFit]:
    """Group runs (dicts with budget, size, tokens, params, val_loss) by budget and fit each budget's
    parabolas; sorted by budget. ScalingError if a budget cannot take a parabola."""
    groups: dict[float, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(_budget_key(r["budget"]), []).append(r)
    out = []
    for budget in sorted(groups):
        rs = sorted(groups[budget], key=lambda r: r["tokens"])
        where = f"budget {budget:g} FLOPs ({', '.join(r['size'] for r in rs) or 'no runs'})"
        lt = np.log10([r["tokens"] for r in rs])
        lp = np.log10([r["params"] for r in rs])
        losses = [r["val_loss"] for r in rs]
        pt = fit_parabola(lt, losses, where=where + ", loss vs log10 tokens")
        pp = fit_parabola(lp, losses, where=where + ", loss vs log10 params")
        extrapolated = not (lt.min() <= pt.x_min <= lt.max())
        out.append(IsoFLOPFit(budget, [r["size"] for r in rs], [r["tokens"] for r in rs],
                              [r["params"] for r in rs], losses, pt, pp, extrapolated))
    return out


@dataclass
class PowerLaw:
    """``y = A * x^alpha`` fitted as a line in log10-log10 space, with its standard errors and
    ``confidence``-level intervals (None with no degrees of freedom left)."""

    A: float
    alpha: float
    n: int
    dof: int
    confidence: float
    se_alpha: float | None
    se_log10_A: float | None
    ci_alpha: tuple[float, float] | None
    ci_A: tuple[float, float] | None
    r2: float | None
    # For the band of the fitted line: the data's mean log10 x, sum of squares about it, residual variance.
    x_mean: float = 0.0
    sxx: float = 0.0
    s2: float | None = None
    t: float | None = None
    method: str = CI_METHOD

    def __call__(self, x: Any) -> Any:
        """``A * x^alpha`` at ``x`` (a number or an array)."""
        return self.A * np.asarray(x, dtype=float) ** self.alpha

    def band(self, x: Any) -> tuple[Any, Any] | None:
        """The confidence band of the fitted line (the mean response) at ``x``: (lower, upper), or None
        with no degrees of freedom."""
        if self.s2 is None or self.t is None:
            return None
        lx = np.log10(np.asarray(x, dtype=float))
        se = np.sqrt(self.s2 * (1.0 / self.n + (lx - self.x_mean) ** 2 / self.sxx))
        mid = math.log10(self.A) + self.alpha * lx
        return 10.0 ** (mid - self.t * se), 10.0 ** (mid + self.t * se)

    def to_dict(self) -> dict[str, Any]:
        """The fit.json entry: every field (``from_dict`` reads it back) and ``ci`` for people."""
        d = asdict(self)
        d["ci"] = {"level": self.confidence, "alpha": self.ci_alpha, "A": self.ci_A}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PowerLaw":
        """The fit :meth:`to_dict` wrote (fit.json's entry)."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("ci_alpha", "ci_A"):
            kw[k] = tuple(kw[k]) if kw.get(k) is not None else None
        return cls(**kw)


def fit_power_law(x: Sequence[float], y: Sequence[float], *, confidence: float = 0.95,
                  what: str = "power law") -> PowerLaw:
    """Fit ``y = A x^alpha`` by least squares of log10 y on log10 x (see the module docstring for the
    intervals). ScalingError for fewer than 2 distinct x values or non-positive data."""
    from scipy import stats

    if not 0 < confidence < 1:
        raise ScalingError(f"confidence={confidence}: expected a level in (0, 1), e.g. 0.95")
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(np.unique(xs)) < 2:
        raise ScalingError(f"{what}: {len(np.unique(xs))} compute budget(s); a power law needs at least 2 "
                           f"(3 or more for a confidence interval)")
    if (xs <= 0).any() or (ys <= 0).any() or not (np.isfinite(xs).all() and np.isfinite(ys).all()):
        raise ScalingError(f"{what}: expected positive finite values to take logarithms of")
    lx, ly = np.log10(xs), np.log10(ys)
    n = len(lx)
    dof = n - 2
    res = stats.linregress(lx, ly)
    alpha, log_a = float(res.slope), float(res.intercept)
    x_mean = float(lx.mean())
    sxx = float(((lx - x_mean) ** 2).sum())
    ss_tot = float(((ly - ly.mean()) ** 2).sum())
    ss_res = float(((ly - (log_a + alpha * lx)) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else None
    if dof < 1:  # two points: the line passes through both, nothing is left to estimate the error with
        return PowerLaw(10.0 ** log_a, alpha, n, dof, confidence, None, None, None, None, r2, x_mean, sxx)
    t = float(stats.t.ppf(0.5 + confidence / 2, dof))
    se_a, se_i = float(res.stderr), float(res.intercept_stderr)
    return PowerLaw(10.0 ** log_a, alpha, n, dof, confidence, se_a, se_i, (alpha - t * se_a, alpha + t * se_a),
                    (10.0 ** (log_a - t * se_i), 10.0 ** (log_a + t * se_i)), r2, x_mean, sxx, ss_res / dof, t)


def sigmoid(nll: Any, floor: float, ceiling: float, slope: float, mid: float) -> Any:
    """``floor + (ceiling - floor) / (1 + exp(slope * (nll - mid)))``: accuracy from normalised NLL."""
    z = np.clip(slope * (np.asarray(nll, dtype=float) - mid), -500, 500)  # exp overflow far from mid
    return floor + (ceiling - floor) / (1.0 + np.exp(z))


@dataclass
class SigmoidFit:
    """The 4 parameters of :func:`sigmoid`, their standard errors (None where undetermined) and notes."""

    floor: float
    ceiling: float
    slope: float
    mid: float
    se: dict[str, float | None]
    n: int
    rmse: float
    form: str = SIGMOID_FORM
    notes: list[str] = field(default_factory=list)

    def __call__(self, nll: Any) -> Any:
        """The fitted accuracy at ``nll``."""
        return sigmoid(nll, self.floor, self.ceiling, self.slope, self.mid)

    def to_dict(self) -> dict[str, Any]:
        """The fit.json entry."""
        return asdict(self)


def fit_sigmoid(nll: Sequence[float], acc: Sequence[float], *, n_questions: float | None = None) -> SigmoidFit:
    """Fit :func:`sigmoid` to (NLL, accuracy) pairs with ``scipy.optimize.curve_fit`` (bounded
    trust-region least squares). ScalingError with fewer than 5 pairs or when it does not converge.

    ``n_questions`` (questions behind each accuracy) lets the notes say when the accuracies differ
    by no more than sampling noise: a spread under 4 binomial standard errors sqrt(p (1 - p) / n)."""
    from scipy.optimize import curve_fit

    xs, ys = np.asarray(nll, dtype=float), np.asarray(acc, dtype=float)
    if len(xs) < 5:
        raise ScalingError(f"sigmoid: {len(xs)} (NLL, accuracy) pair(s); a 4-parameter sigmoid needs at least 5")
    if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
        raise ScalingError("sigmoid: non-finite NLL or accuracy values")
    if np.ptp(xs) == 0:
        raise ScalingError("sigmoid: every run has the same NLL; nothing to fit accuracy against")
    spread = float(np.ptp(xs))
    p0 = [float(ys.min()), float(ys.max()), 4.0 / spread, float(np.median(xs))]
    bounds = ([0.0, 0.0, 0.0, -np.inf], [1.0, 1.0, np.inf, np.inf])
    p0[2] = max(p0[2], 1e-6)
    try:
        params, pcov = curve_fit(sigmoid, xs, ys, p0=p0, bounds=bounds, maxfev=20000)
    except (RuntimeError, ValueError) as e:
        raise ScalingError(f"sigmoid: curve_fit did not converge ({e})") from None
    names = ("floor", "ceiling", "slope", "mid")
    diag = np.diag(pcov) if np.ndim(pcov) == 2 else np.full(4, np.inf)
    se = {k: (float(math.sqrt(v)) if np.isfinite(v) and v >= 0 else None) for k, v in zip(names, diag)}
    rmse = float(np.sqrt(np.mean((sigmoid(xs, *params) - ys) ** 2)))
    notes = []
    p_mean = float(ys.mean())
    noise = math.sqrt(p_mean * (1 - p_mean) / n_questions) if n_questions else None
    if noise is not None and np.ptp(ys) < 4 * noise:
        notes.append(f"the accuracies span {np.ptp(ys):.3f}, under 4 binomial standard errors "
                     f"(4 x {noise:.3f} for {n_questions:.0f} questions): they differ by sampling noise only, and "
                     f"the curve carries no signal")
    elif np.ptp(ys) < 0.05:
        notes.append(f"the accuracies span only {np.ptp(ys):.3f}: the curve is not determined by these runs "
                     f"(near chance); read it as a placeholder")
    if params[0] > params[1]:
        notes.append(f"the fitted floor ({params[0]:.3f}) is above the ceiling ({params[1]:.3f}): accuracy rises "
                     f"with NLL here, the opposite of a real trend")
    if any(v is None for v in se.values()):
        notes.append("some parameters are not determined by the data (infinite covariance)")
    return SigmoidFit(*(float(p) for p in params), se=se, n=len(xs), rmse=rmse, notes=notes)


def _nll_at_optimum(fit: IsoFLOPFit, runs: Sequence[dict[str, Any]]) -> tuple[float, bool] | None:
    """The NLL of the budget's compute-optimal model: linear interpolation in log10 tokens between its
    runs (clamped at the ends: flagged); None if fewer than 2 runs of the budget have an NLL."""
    pts = sorted((math.log10(r["tokens"]), r["nll"]) for r in runs
                 if _budget_key(r["budget"]) == fit.budget and r.get("nll") is not None)
    if len(pts) < 2:
        return None
    x = math.log10(fit.tokens_opt)
    return float(np.interp(x, [p[0] for p in pts], [p[1] for p in pts])), not pts[0][0] <= x <= pts[-1][0]


def fit_sweep(runs: Sequence[dict[str, Any]], *, confidence: float = 0.95) -> dict[str, Any]:
    """Every fit of the method over ``runs`` (from :func:`llamalab.scaling.records.load_runs`):
    the fit.json document. Stage 1 errors (ScalingError) propagate; a downstream fit that cannot be
    made is recorded as a note, since a tiny model's task accuracy may carry no signal."""
    if not runs:
        raise ScalingError("no finished runs to fit (run llamalab scaling sweep first)")
    iso = fit_isoflops(runs)
    budgets = [f.budget for f in iso]
    where = f"{len(iso)} budget(s) ({', '.join(f'{b:g}' for b in budgets)})"
    tokens_law = fit_power_law(budgets, [f.tokens_opt for f in iso], confidence=confidence,
                               what=f"tokens*(C) over {where}")
    params_law = fit_power_law(budgets, [f.params_opt for f in iso], confidence=confidence,
                               what=f"params*(C) over {where}")
    notes = [f"budget {f.budget:g}: the minimum (tokens* {f.tokens_opt:.3g}) lies outside the sizes tried; "
             f"it is an extrapolation (add sizes on that side)" for f in iso if f.extrapolated]
    if tokens_law.dof < 1:
        notes.append("2 budgets: the power law passes through both minima; no confidence interval "
                     "(add a budget)")
    elif tokens_law.dof == 1:
        notes.append(f"3 budgets leave 1 degree of freedom (t = {tokens_law.t:.1f} for {confidence:.0%}): "
                     f"the intervals are wide; more budgets narrow them")
    doc: dict[str, Any] = {
        "method": "Llama 3 (Dubey et al. 2024) §3.2.1: per budget a second-degree polynomial of validation "
                  "loss in log10 tokens (and in log10 params), its minimum; then y*(C) = A C^alpha",
        "n_runs": len(runs), "confidence": confidence,
        "isoflops": [f.to_dict() for f in iso],
        "tokens_power_law": tokens_law.to_dict(),
        "params_power_law": params_law.to_dict(),
        "tokens_band": _band(tokens_law, budgets),
        "paper": {"alpha": PAPER_ALPHA, "A": PAPER_A, "source": "Llama 3 figure 3: N*(C) = 0.29 C^0.53"},
        "notes": notes,
        "downstream": _downstream(iso, runs, confidence),
    }
    return doc


def _band(law: PowerLaw, budgets: Sequence[float]) -> list[dict[str, float]] | None:
    band = law.band(budgets)
    if band is None:
        return None
    return [{"budget": b, "fit": float(law(b)), "lower": float(lo), "upper": float(hi)}
            for b, lo, hi in zip(budgets, band[0], band[1])]


def _downstream(iso: list[IsoFLOPFit], runs: Sequence[dict[str, Any]], confidence: float) -> dict[str, Any] | None:
    pairs = [r for r in runs if r.get("nll") is not None and r.get("acc") is not None]
    if not pairs:
        return None
    chance = [r["chance"] for r in pairs if r.get("chance") is not None]
    out: dict[str, Any] = {"n_runs": len(pairs), "nll": "mean NLL of the correct answer per character",
                           "chance": float(np.mean(chance)) if chance else None,
                           "optimal": [], "nll_power_law": None, "sigmoid": None, "notes": []}
    for f in iso:
        got = _nll_at_optimum(f, pairs)
        if got is not None:
            out["optimal"].append({"budget": f.budget, "tokens_opt": f.tokens_opt, "nll": got[0],
                                   "clamped": got[1]})
    opt = out["optimal"]
    try:
        law = fit_power_law([o["budget"] for o in opt], [o["nll"] for o in opt], confidence=confidence,
                            what="NLL*(C)")
        out["nll_power_law"] = law.to_dict()
    except ScalingError as e:
        out["notes"].append(f"NLL vs compute not fitted: {e}")
    try:
        ns = [r["n"] for r in pairs if r.get("n")]
        out["sigmoid"] = fit_sigmoid([r["nll"] for r in pairs], [r["acc"] for r in pairs],
                                     n_questions=min(ns) if len(ns) == len(pairs) else None).to_dict()
    except ScalingError as e:
        out["notes"].append(f"accuracy vs NLL not fitted: {e}")
    return out


def _ci(ci: Sequence[float] | None, fmt: str) -> str:
    return f"[{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci else "(none: 0 degrees of freedom)"


def format_table(doc: dict[str, Any]) -> str:
    """The fit document as the table ``llamalab scaling fit`` prints."""
    level = f"{doc['confidence']:.0%}"
    lines = ["IsoFLOPs minima: per budget, val loss = a x^2 + b x + c with x = log10 tokens (and log10 params)",
             f"  {'budget':>10}  {'sizes':>5}  {'tokens*':>10}  {'loss*':>7}  {'params*':>10}  {'a':>8}"]
    for f in doc["isoflops"]:
        lines.append(f"  {f['budget']:>10.3g}  {f['n_sizes']:>5}  {f['tokens_opt']:>10.4g}  {f['loss_opt']:>7.4f}  "
                     f"{f['params_opt']:>10.4g}  {f['tokens_parabola']['a']:>8.4g}"
                     + ("  (extrapolated)" if f["extrapolated"] else ""))
    for key, name in (("tokens_power_law", "tokens*(C)"), ("params_power_law", "params*(C)")):
        law = doc[key]
        lines.append(f"{name} = A * C^alpha  ({law['n']} budgets, {law['dof']} degree(s) of freedom"
                     + (f", R^2 {law['r2']:.3f}" if law["r2"] is not None else "") + ")")
        se = f"  (se {law['se_alpha']:.3g})" if law["se_alpha"] is not None else ""
        lines.append(f"  alpha = {law['alpha']:.4f}  {level} CI {_ci(law['ci']['alpha'], '.4f')}{se}")
        lines.append(f"  A     = {law['A']:.4g}  {level} CI {_ci(law['ci']['A'], '.3g')}")
    paper = doc["paper"]
    lines.append(f"Llama 3's fit (figure 3, tokens): alpha = {paper['alpha']}, A = {paper['A']}")
    ds = doc.get("downstream")
    if ds:
        lines.append(f"downstream ({ds['n_runs']} runs with NLL and accuracy"
                     + (f"; guessing scores {ds['chance']:.3f}" if ds.get("chance") is not None else "") + ")")
        for o in ds["optimal"]:
            lines.append(f"  budget {o['budget']:.3g}: NLL/char of the compute-optimal model {o['nll']:.4f}"
                         + (" (clamped to the nearest run)" if o["clamped"] else ""))
        if ds["nll_power_law"]:
            law = ds["nll_power_law"]
            lines.append(f"  NLL*(C) = {law['A']:.4g} * C^{law['alpha']:.4f}  alpha {level} CI "
                         f"{_ci(law['ci']['alpha'], '.4f')}")
        if ds["sigmoid"]:
            s = ds["sigmoid"]
            lines.append(f"  {s['form']}: floor {s['floor']:.3f}, ceiling {s['ceiling']:.3f}, slope {s['slope']:.3g}, "
                         f"mid {s['mid']:.3f} (rmse {s['rmse']:.3f}, {s['n']} runs)")
            lines += [f"  note: {n}" for n in s["notes"]]
        lines += [f"  note: {n}" for n in ds["notes"]]
    lines += [f"note: {n}" for n in doc["notes"]]
    return "\n".join(lines)
