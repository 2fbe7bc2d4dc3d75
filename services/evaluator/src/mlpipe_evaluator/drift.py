"""Drift between a model's training rows and the inputs it served, feature by feature.

Numeric features: population stability index (PSI) over the reference's quantile bins, and a
two-sample Kolmogorov-Smirnov test. Categorical features: PSI over the reference's
categories (plus one bin for categories it never saw). A feature drifts when PSI reaches the
threshold, or (numeric) when the KS p-value is below its threshold *and* the KS statistic is at
least its own threshold: with thousands of rows, tiny harmless shifts are significant.
"""

from __future__ import annotations

import html
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from mlpipe.ml.config import MonitoringSpec

# Probabilities are floored at this in PSI, so an empty bin gives a large, finite term.
EPSILON = 1e-4
UNSEEN = "(unseen)"
MAX_CATEGORIES = 30


@dataclass
class Drift:
    name: str
    kind: str  # "numeric" or "categorical"
    psi: float
    drifted: bool
    reason: str
    bins: list[str]
    reference: list[float]  # share of reference rows per bin
    current: list[float]  # share of served rows per bin
    ks_statistic: float = math.nan
    ks_pvalue: float = math.nan
    reference_rows: int = 0
    current_rows: int = 0
    missing_share: float = 0.0  # served rows without a value
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "psi": round(self.psi, 6),
            "ks_statistic": None if math.isnan(self.ks_statistic) else round(self.ks_statistic, 6),
            "ks_pvalue": None if math.isnan(self.ks_pvalue) else float(f"{self.ks_pvalue:.6g}"),
            "drifted": self.drifted,
            "reason": self.reason,
            "reference_rows": self.reference_rows,
            "current_rows": self.current_rows,
            "missing_share": round(self.missing_share, 6),
            "bins": self.bins,
            "reference": [round(v, 6) for v in self.reference],
            "current": [round(v, 6) for v in self.current],
        }


def psi(reference: np.ndarray, current: np.ndarray) -> float:
    r = np.clip(reference, EPSILON, None)
    c = np.clip(current, EPSILON, None)
    return float(np.sum((c - r) * np.log(c / r)))


def _shares(counts: np.ndarray) -> np.ndarray:
    total = counts.sum()
    return counts / total if total else counts.astype(float)


def numeric_drift(name: str, reference: Any, current: Any, spec: MonitoringSpec) -> Drift:
    ref = pd.to_numeric(pd.Series(reference), errors="coerce").to_numpy(dtype=float)
    cur_all = pd.to_numeric(pd.Series(current), errors="coerce").to_numpy(dtype=float)
    ref = ref[~np.isnan(ref)]
    cur = cur_all[~np.isnan(cur_all)]
    missing = 1 - len(cur) / len(cur_all) if len(cur_all) else 0.0
    if len(ref) == 0 or len(cur) == 0:
        return Drift(name, "numeric", 0.0, False, "no values to compare", [], [], [])
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, spec.bins + 1))[1:-1])
    ref_share = _shares(
        np.bincount(np.searchsorted(edges, ref, side="right"), minlength=len(edges) + 1)
    )
    cur_share = _shares(
        np.bincount(np.searchsorted(edges, cur, side="right"), minlength=len(edges) + 1)
    )
    labels = [f"≤ {edges[0]:.4g}"] if len(edges) else ["all"]
    labels += [f"{lo:.4g} to {hi:.4g}" for lo, hi in itertools.pairwise(edges)]
    if len(edges):
        labels.append(f"> {edges[-1]:.4g}")
    value = psi(ref_share, cur_share)
    ks = stats.ks_2samp(ref, cur)
    reasons = []
    if value >= spec.psi_threshold:
        reasons.append(f"PSI {value:.3f} ≥ {spec.psi_threshold:g}")
    if ks.pvalue < spec.ks_pvalue and ks.statistic >= spec.ks_statistic:
        reasons.append(
            f"KS statistic {ks.statistic:.3f} ≥ {spec.ks_statistic:g} with p {ks.pvalue:.2g} "
            f"< {spec.ks_pvalue:g}"
        )
    return Drift(
        name,
        "numeric",
        value,
        bool(reasons),
        "; ".join(reasons) or f"PSI {value:.3f}, KS {ks.statistic:.3f} (p {ks.pvalue:.2g})",
        labels,
        ref_share.tolist(),
        cur_share.tolist(),
        float(ks.statistic),
        float(ks.pvalue),
        len(ref),
        len(cur),
        missing,
        {"reference_mean": float(ref.mean()), "current_mean": float(cur.mean())},
    )


def categorical_drift(
    name: str, reference: Any, current: Any, threshold: float, bins: int = MAX_CATEGORIES
) -> Drift:
    ref = pd.Series(reference).dropna().astype(str)
    cur_all = pd.Series(current)
    cur = cur_all.dropna().astype(str)
    missing = 1 - len(cur) / len(cur_all) if len(cur_all) else 0.0
    if ref.empty or cur.empty:
        return Drift(name, "categorical", 0.0, False, "no values to compare", [], [], [])
    categories = list(ref.value_counts().index[:bins])
    known = set(categories)
    labels = [*categories, UNSEEN]
    ref_counts = ref.where(ref.isin(known), UNSEEN).value_counts()
    cur_counts = cur.where(cur.isin(known), UNSEEN).value_counts()
    ref_share = _shares(np.array([ref_counts.get(c, 0) for c in labels], dtype=float))
    cur_share = _shares(np.array([cur_counts.get(c, 0) for c in labels], dtype=float))
    value = psi(ref_share, cur_share)
    drifted = value >= threshold
    return Drift(
        name,
        "categorical",
        value,
        drifted,
        f"PSI {value:.3f} ≥ {threshold:g}" if drifted else f"PSI {value:.3f}",
        labels,
        ref_share.tolist(),
        cur_share.tolist(),
        reference_rows=len(ref),
        current_rows=len(cur),
        missing_share=missing,
    )


def compare(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    kinds: dict[str, str],
    spec: MonitoringSpec,
) -> list[Drift]:
    """One Drift per column of `kinds` ({column: "numeric" | "categorical"})."""
    found = []
    for column, kind in kinds.items():
        served = current[column] if column in current.columns else pd.Series([], dtype=object)
        if kind == "categorical":
            found.append(categorical_drift(column, reference[column], served, spec.psi_threshold))
        else:
            found.append(numeric_drift(column, reference[column], served, spec))
    return found


# --- the report --------------------------------------------------------------------------------
def _bars(drift: Drift, width: int = 420, height: int = 120) -> str:
    """Reference and served shares per bin, side by side, as inline SVG."""
    n = len(drift.bins)
    if not n:
        return "<p>no values</p>"
    top = max(max(drift.reference), max(drift.current), 1e-9)
    slot = width / n
    bar = max(1.0, slot / 2 - 1)
    parts = [
        f'<svg width="{width}" height="{height + 18}" viewBox="0 0 {width} {height + 18}" '
        f'role="img" aria-label="{html.escape(drift.name)} histogram">'
    ]
    for i, (r, c) in enumerate(zip(drift.reference, drift.current, strict=True)):
        x = i * slot
        rh, ch = height * r / top, height * c / top
        label = html.escape(drift.bins[i])
        parts.append(
            f'<rect x="{x + 0.5:.1f}" y="{height - rh:.1f}" width="{bar:.1f}" height="{rh:.1f}" '
            f'fill="#7b9cc9"><title>{label}: training {r:.1%}</title></rect>'
        )
        parts.append(
            f'<rect x="{x + bar + 1:.1f}" y="{height - ch:.1f}" width="{bar:.1f}" '
            f'height="{ch:.1f}" fill="#e07b39"><title>{label}: served {c:.1%}</title></rect>'
        )
    parts.append(
        f'<text x="0" y="{height + 14}" font-size="10">{html.escape(drift.bins[0])}</text>'
        f'<text x="{width}" y="{height + 14}" font-size="10" text-anchor="end">'
        f"{html.escape(drift.bins[-1])}</text></svg>"
    )
    return "".join(parts)


def render_html(summary: dict[str, Any], drifts: list[Drift], prediction: Drift | None) -> str:
    rows = []
    for d in [*drifts, *([prediction] if prediction else [])]:
        ks = "" if math.isnan(d.ks_statistic) else f"{d.ks_statistic:.3f} (p {d.ks_pvalue:.2g})"
        verdict = "drift" if d.drifted else "stable"
        rows.append(
            f'<tr class="{verdict}"><td>{html.escape(d.name)}</td><td>{d.kind}</td>'
            f"<td>{d.psi:.3f}</td><td>{ks}</td><td>{d.missing_share:.1%}</td>"
            f"<td><b>{verdict}</b></td><td>{html.escape(d.reason)}</td></tr>"
        )
    charts = "".join(
        f"<figure><figcaption>{html.escape(d.name)} — {'drift' if d.drifted else 'stable'}"
        f"</figcaption>{_bars(d)}</figure>"
        for d in [*drifts, *([prediction] if prediction else [])]
    )
    shown = {k: v for k, v in summary.items() if k not in {"features", "prediction", "drifted"}}
    if isinstance(shown.get("thresholds"), dict):
        shown["thresholds"] = ", ".join(f"{k} {v}" for k, v in shown["thresholds"].items())
    facts = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in shown.items()
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Drift: {html.escape(str(summary.get("model", "")))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5rem; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; font-size: 14px; }}
tr.drift td {{ background: #fde2d2; }}
figure {{ display: inline-block; margin: 0 1.5rem 1.5rem 0; }}
figcaption {{ font-weight: 600; margin-bottom: 4px; }}
.legend span {{ display: inline-block; width: 12px; height: 12px; margin: 0 4px 0 12px; }}
</style></head><body>
<h1>Drift check: {html.escape(str(summary.get("model", "")))}
 v{html.escape(str(summary.get("version", "")))}</h1>
<p><b>{html.escape(str(summary.get("verdict", "")))}</b></p>
<table>{facts}</table>
<h2>Features</h2>
<table><tr><th>feature</th><th>kind</th><th>PSI</th><th>KS</th><th>served missing</th>
<th>verdict</th><th>why</th></tr>{"".join(rows)}</table>
<h2>Distributions</h2>
<p class="legend"><span style="background:#7b9cc9"></span>training rows
<span style="background:#e07b39"></span>served inputs (share of rows per bin)</p>
{charts}
</body></html>
"""
