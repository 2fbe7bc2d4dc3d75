"""The report's plots drawn by matplotlib as inline SVG, from the plots.json entries
(mlpipe_evaluator.plots). Imported when a report is drawn, never at service start: importing
matplotlib costs a few hundred milliseconds.

Figures are built with the object API (no pyplot state, so concurrent reports do not share a
figure), on the Agg backend, one at a time (rcParams are process-wide). Text stays <text>
(svg.fonttype "none": no embedded glyphs, the page's own sans-serif font), ids are salted
with a fixed string and the date is left out, so the same data always gives the same bytes.
"""

from __future__ import annotations

import io
import re
import threading
from collections.abc import Callable
from typing import Any

import matplotlib

matplotlib.use("Agg")

from matplotlib.figure import Figure  # after the backend is chosen

RC: dict[str, Any] = {
    "svg.fonttype": "none",
    "svg.hashsalt": "mlpipe-report",
    "font.family": "sans-serif",
    "font.size": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
}
CHALLENGER = "#3558c8"
CHAMPION = "#d9822b"
_PROLOG = re.compile(r"^.*?(?=<svg)", re.S)
# rc_context sets and restores matplotlib's process-wide rcParams: one drawing at a time, so a
# report drawn on one thread never ends another's settings halfway through its figure.
_DRAWING = threading.Lock()


def _svg(figure: Figure) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None})
    # The XML prolog and doctype are not allowed inside an HTML body.
    return _PROLOG.sub("", buffer.getvalue(), count=1)


def _figure(width: float = 5.2, height: float = 3.6) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def confusion_matrix(plot: dict[str, Any]) -> Figure:
    labels, matrix = plot["labels"], plot["matrix"]
    n = len(labels)
    figure = _figure(1.6 + 0.6 * n, 1.3 + 0.6 * n)
    ax = figure.add_subplot()
    shares = [[c / (sum(row) or 1) for c in row] for row in matrix]
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.grid(False)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(
                j,
                i,
                str(count),
                ha="center",
                va="center",
                color="white" if shares[i][j] > 0.6 else "black",
            )
    ax.set_xticks(range(n), labels, rotation=35, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title("confusion matrix (holdout)")
    return figure


def roc(plot: dict[str, Any]) -> Figure:
    figure = _figure()
    ax = figure.add_subplot()
    for curve in plot["curves"]:
        ax.plot(curve["fpr"], curve["tpr"], label=f"{curve['class']} (AUC {curve['auc']:.3f})")
    ax.plot([0, 1], [0, 1], color="#999", linestyle="--", linewidth=0.8, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="false positive rate", ylabel="true positive rate")
    ax.set_title("ROC, one class against the rest")
    ax.legend(loc="lower right", fontsize=8)
    return figure


def precision_recall(plot: dict[str, Any]) -> Figure:
    figure = _figure()
    ax = figure.add_subplot()
    for curve in plot["curves"]:
        ax.step(
            curve["recall"],
            curve["precision"],
            where="post",
            label=f"{curve['class']} (AP {curve['average_precision']:.3f})",
        )
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
    ax.set_title("precision-recall, one class against the rest")
    ax.legend(loc="lower left", fontsize=8)
    return figure


def calibration(plot: dict[str, Any]) -> Figure:
    figure = _figure()
    ax = figure.add_subplot()
    ax.plot([0, 1], [0, 1], color="#999", linestyle="--", linewidth=0.8, label="calibrated")
    for curve in plot["curves"]:
        ax.plot(
            curve["mean_predicted"],
            curve["fraction_positive"],
            marker="o",
            markersize=3,
            label=f"{curve['class']} (Brier {curve['brier']:.3f})",
        )
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.02),
        xlabel="mean predicted probability",
        ylabel="fraction of the class",
    )
    ax.set_title(f"reliability ({plot['bins']} bins)")
    ax.legend(loc="upper left", fontsize=8)
    return figure


def predicted_vs_actual(plot: dict[str, Any]) -> Figure:
    figure = _figure(4.4, 4.0)
    ax = figure.add_subplot()
    ax.scatter(plot["actual"], plot["predicted"], s=6, alpha=0.5, color=CHALLENGER)
    lo, hi = plot["range"]
    ax.plot([lo, hi], [lo, hi], color="#999", linestyle="--", linewidth=0.8)
    ax.set(xlabel="actual", ylabel="predicted")
    ax.set_title(f"predicted against actual ({plot['rows']} rows)")
    return figure


def residuals(plot: dict[str, Any]) -> Figure:
    figure = _figure()
    ax = figure.add_subplot()
    ax.scatter(plot["predicted"], plot["residual"], s=6, alpha=0.5, color=CHALLENGER)
    ax.axhline(0, color="#999", linestyle="--", linewidth=0.8)
    ax.set(xlabel="predicted", ylabel="residual (actual - predicted)")
    ax.set_title(f"residuals ({plot['rows']} rows)")
    return figure


def error_by_segment(plot: dict[str, Any]) -> Figure:
    segments = plot["segments"]
    figure = _figure(5.2, 1.2 + 0.28 * max(1, len(segments)))
    ax = figure.add_subplot()
    names = [s["value"] for s in segments][::-1]
    ax.barh(names, [s["mae"] for s in segments][::-1], color=CHALLENGER, label="MAE")
    ax.scatter(
        [s["rmse"] for s in segments][::-1], names, color="#1b1f24", s=10, zorder=3, label="RMSE"
    )
    ax.set(xlabel="error", ylabel=plot["column"])
    ax.set_title(f"error by {plot['column']}")
    ax.legend(loc="lower right", fontsize=8)
    return figure


def permutation_importance(plot: dict[str, Any]) -> Figure:
    features = plot["features"]
    champion = {f["feature"]: f for f in (plot.get("champion") or {}).get("features", [])}
    names = [f["feature"] for f in features][::-1]
    figure = _figure(5.2, 1.3 + 0.3 * max(1, len(names)))
    ax = figure.add_subplot()
    height = 0.4 if champion else 0.7
    rows = range(len(names))
    ax.barh(
        [r + (height / 2 if champion else 0) for r in rows],
        [f["mean"] for f in features][::-1],
        height=height,
        xerr=[f["std"] for f in features][::-1],
        color=CHALLENGER,
        label="this run",
    )
    if champion:
        ax.barh(
            [r - height / 2 for r in rows],
            [champion.get(n, {}).get("mean", 0.0) for n in names],
            height=height,
            xerr=[champion.get(n, {}).get("std", 0.0) for n in names],
            color=CHAMPION,
            label=f"champion v{plot['champion']['version']}",
        )
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(list(rows), names)
    ax.axvline(0, color="#999", linewidth=0.8)
    ax.set(xlabel=f"drop in {plot['scoring']}", ylabel="feature")
    ax.set_title(f"permutation importance ({plot['repeats']} repeats, {plot['rows']} rows)")
    return figure


DRAW: dict[str, Callable[[dict[str, Any]], Figure]] = {
    "confusion_matrix": confusion_matrix,
    "roc": roc,
    "precision_recall": precision_recall,
    "calibration": calibration,
    "predicted_vs_actual": predicted_vs_actual,
    "residuals": residuals,
    "error_by_segment": error_by_segment,
    "permutation_importance": permutation_importance,
}


def draw(plot: dict[str, Any]) -> str:
    """One plots.json entry as an <svg> element."""
    with _DRAWING, matplotlib.rc_context(RC):  # type: ignore[arg-type]  # keys typed as literals
        return _svg(DRAW[plot["kind"]](plot))
