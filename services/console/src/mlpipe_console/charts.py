"""Vega-Lite specifications of what a run, a model or a drift check recorded. The page embeds
each beside a table of the same numbers, so nothing is lost without JavaScript."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SCHEMA = "https://vega.github.io/schema/vega-lite/v6.json"


def metrics_chart(rows: list[tuple[str, float | None, float | None]], champion: int) -> dict:
    """This run's metrics beside the champion's, on the same holdout."""
    values: list[dict[str, Any]] = []
    for name, own, theirs in rows:
        if "[" in name:
            continue  # per-class metrics stay in the table
        if own is not None:
            values.append({"metric": name, "model": "this run", "value": own})
        if theirs is not None:
            values.append({"metric": name, "model": f"champion v{champion}", "value": theirs})
    return {
        "$schema": SCHEMA,
        "description": "metrics of this run and the champion",
        "data": {"values": values},
        "mark": "bar",
        "encoding": {
            "y": {"field": "metric", "type": "nominal", "title": None},
            "yOffset": {"field": "model"},
            "x": {"field": "value", "type": "quantitative"},
            "color": {"field": "model", "type": "nominal", "title": None},
            "tooltip": [{"field": "metric"}, {"field": "model"}, {"field": "value"}],
        },
        "width": 420,
    }


def gates_chart(gates: list[dict[str, Any]]) -> dict:
    """Each gate's value against its threshold."""
    values = [
        {
            "gate": g.get("name", "?"),
            "value": float(g.get("value", 0) or 0),
            "threshold": float(g.get("threshold", 0) or 0),
            "passed": "passed" if g.get("passed") else "failed",
        }
        for g in gates
    ]
    return {
        "$schema": SCHEMA,
        "description": "gate values and thresholds",
        "data": {"values": values},
        "layer": [
            {
                "mark": "bar",
                "encoding": {
                    "y": {"field": "gate", "type": "nominal", "title": None},
                    "x": {"field": "value", "type": "quantitative"},
                    "color": {
                        "field": "passed",
                        "type": "nominal",
                        "scale": {"domain": ["passed", "failed"], "range": ["#2e7d32", "#c62828"]},
                    },
                },
            },
            {
                "mark": {"type": "tick", "color": "black", "thickness": 2},
                "encoding": {
                    "y": {"field": "gate", "type": "nominal"},
                    "x": {"field": "threshold", "type": "quantitative"},
                },
            },
        ],
        "width": 420,
    }


def timeline_chart(hops: list[tuple[str, dt.datetime, float]]) -> dict:
    """Each hop of the run as a bar from the previous hop to it."""
    values = []
    previous = 0.0
    for label, _, seconds in hops:
        values.append({"hop": label, "from": previous, "to": seconds})
        previous = seconds
    return {
        "$schema": SCHEMA,
        "description": "the run's hops, seconds since the first",
        "data": {"values": values},
        "mark": "bar",
        "encoding": {
            "y": {"field": "hop", "type": "nominal", "sort": None, "title": None},
            "x": {"field": "from", "type": "quantitative", "title": "seconds"},
            "x2": {"field": "to"},
            "tooltip": [{"field": "hop"}, {"field": "from"}, {"field": "to"}],
        },
        "width": 420,
    }


def trace_chart(rows: list[dict[str, Any]]) -> dict:
    """The run's trace as a waterfall: one bar per span, from its start for its duration,
    each under its parent (indented) and coloured by service."""
    values = [
        {
            "span": f"{i:03d} " + "\u00a0\u00a0" * r["depth"] + r["name"],
            "service": r["service"],
            "from": round(r["start_s"], 4),
            "to": round(r["start_s"] + r["duration_s"], 4),
            "ms": round(r["duration_s"] * 1000, 1),
        }
        for i, r in enumerate(rows)
    ]
    return {
        "$schema": SCHEMA,
        "description": "the run's spans, seconds since the first",
        "data": {"values": values},
        "mark": "bar",
        "encoding": {
            "y": {
                "field": "span",
                "type": "nominal",
                "sort": None,
                "title": None,
                "axis": {"labelExpr": "substring(datum.label, 4)", "labelLimit": 320},
            },
            "x": {"field": "from", "type": "quantitative", "title": "seconds"},
            "x2": {"field": "to"},
            "color": {"field": "service", "type": "nominal"},
            "tooltip": [{"field": "service"}, {"field": "span"}, {"field": "ms"}],
        },
        "width": 480,
    }


def histogram_chart(feature: dict[str, Any]) -> dict | None:
    """One feature's share of rows per bin, the reference's beside the served rows' (the bins
    the drift check compared); None when the check recorded no bins."""
    bins = list(feature.get("bins") or [])
    reference = list(feature.get("reference") or [])
    current = list(feature.get("current") or [])
    if not bins or len(reference) != len(bins) or len(current) != len(bins):
        return None
    values = [
        {"bin": label, "order": i, "rows": rows, "share": float(share)}
        for rows, shares in (("reference", reference), ("served", current))
        for i, (label, share) in enumerate(zip(bins, shares, strict=True))
    ]
    return {
        "$schema": SCHEMA,
        "description": f"{feature.get('name', '?')}: share of rows per bin",
        "data": {"values": values},
        "mark": "bar",
        "encoding": {
            "x": {
                "field": "bin",
                "type": "ordinal",
                "sort": {"field": "order"},
                "title": feature.get("name", "?"),
            },
            "xOffset": {"field": "rows"},
            "y": {"field": "share", "type": "quantitative", "title": "share of rows"},
            "color": {
                "field": "rows",
                "type": "nominal",
                "scale": {"domain": ["reference", "served"], "range": ["#90a4ae", "#1565c0"]},
            },
        },
        "width": 260,
        "height": 140,
    }


def drift_chart(features: list[dict[str, Any]], psi_threshold: float | None) -> dict:
    """PSI per feature, drifted ones marked."""
    values = [
        {
            "feature": f.get("name", "?"),
            "psi": float(f.get("psi", 0) or 0),
            "drifted": "drifted" if f.get("drifted") else "stable",
        }
        for f in features
    ]
    layers: list[dict[str, Any]] = [
        {
            "mark": "bar",
            "encoding": {
                "y": {"field": "feature", "type": "nominal", "title": None},
                "x": {"field": "psi", "type": "quantitative", "title": "PSI"},
                "color": {
                    "field": "drifted",
                    "type": "nominal",
                    "scale": {"domain": ["stable", "drifted"], "range": ["#1565c0", "#c62828"]},
                },
            },
        }
    ]
    if psi_threshold is not None:
        layers.append(
            {
                "data": {"values": [{"threshold": psi_threshold}]},
                "mark": {"type": "rule", "strokeDash": [4, 4]},
                "encoding": {"x": {"field": "threshold", "type": "quantitative"}},
            }
        )
    return {
        "$schema": SCHEMA,
        "description": "population stability index per feature",
        "data": {"values": values},
        "layer": layers,
        "width": 360,
    }


# --- a run's evaluation plots (plots.json, docs/evaluation-plots.md) ----------------------------
THIS_RUN = "this run"
# The report's colours for this run and the champion (mlpipe_evaluator.figures).
RUN_COLOUR = "#3558c8"
CHAMPION_COLOUR = "#d9822b"


def _labelled(name: Any, measure: str, value: Any) -> str:
    """A curve's legend label: its class, with its summary number where there is one."""
    return str(name) if value is None else f"{name} ({measure} {float(value):.3f})"


def _points(curve: dict[str, Any], label: str, x: str, y: str) -> list[dict[str, Any]]:
    """One curve's points in their recorded order (`point`), which the line follows."""
    return [
        {"class": label, "point": i, x: float(a), y: float(b)}
        for i, (a, b) in enumerate(zip(curve[x], curve[y], strict=True))
    ]


def _reference_line(x: str, y: str, low: float, high: float) -> dict[str, Any]:
    """The dashed y = x line from `low` to `high` (chance, perfect calibration, no error)."""
    return {
        "data": {"values": [{x: low, y: low}, {x: high, y: high}]},
        "mark": {"type": "line", "color": "#999", "strokeDash": [4, 4]},
        "encoding": {
            "x": {"field": x, "type": "quantitative"},
            "y": {"field": y, "type": "quantitative"},
        },
    }


def _curves_chart(
    description: str,
    values: list[dict[str, Any]],
    axes: tuple[tuple[str, str], tuple[str, str]],
    mark: dict[str, Any],
    reference: bool,
) -> dict:
    """Curves per class on the unit square, one colour and legend entry each."""
    (x, x_title), (y, y_title) = axes
    layers: list[dict[str, Any]] = [
        {
            "mark": mark,
            "encoding": {
                "x": {
                    "field": x,
                    "type": "quantitative",
                    "title": x_title,
                    "scale": {"domain": [0, 1]},
                },
                "y": {
                    "field": y,
                    "type": "quantitative",
                    "title": y_title,
                    "scale": {"domain": [0, 1]},
                },
                "color": {
                    "field": "class",
                    "type": "nominal",
                    "title": None,
                    "legend": {"labelLimit": 320},  # the class's name and its number, whole
                },
                "order": {"field": "point", "type": "quantitative"},
                "tooltip": [{"field": "class"}, {"field": x}, {"field": y}],
            },
        }
    ]
    if reference:
        layers.append(_reference_line(x, y, 0.0, 1.0))
    return {
        "$schema": SCHEMA,
        "description": description,
        "data": {"values": values},
        "layer": layers,
        "width": 360,
        "height": 300,
    }


def confusion_chart(plot: dict[str, Any]) -> dict:
    """The confusion matrix as a heatmap, each cell's count written in it; shaded by the share
    of its row (its actual label), as the report does."""
    labels = [str(label) for label in plot["labels"]]
    values = []
    for actual, row in zip(labels, plot["matrix"], strict=True):
        total = sum(row) or 1
        for predicted, count in zip(labels, row, strict=True):
            values.append(
                {
                    "actual": actual,
                    "predicted": predicted,
                    "count": int(count),
                    "share": round(count / total, 4),
                }
            )
    return {
        "$schema": SCHEMA,
        "description": "confusion matrix on the holdout: rows actual, columns predicted",
        "data": {"values": values},
        "encoding": {
            "x": {"field": "predicted", "type": "nominal", "sort": labels, "title": "predicted"},
            "y": {"field": "actual", "type": "nominal", "sort": labels, "title": "actual"},
        },
        "layer": [
            {
                "mark": "rect",
                "encoding": {
                    "color": {
                        "field": "share",
                        "type": "quantitative",
                        "scale": {"domain": [0, 1], "scheme": "blues"},
                        "title": "share of the row",
                    },
                    "tooltip": [{"field": "actual"}, {"field": "predicted"}, {"field": "count"}],
                },
            },
            {
                "mark": "text",
                "encoding": {
                    "text": {"field": "count", "type": "quantitative"},
                    "color": {
                        "condition": {"test": "datum.share > 0.6", "value": "white"},
                        "value": "black",
                    },
                },
            },
        ],
        "width": {"step": 48},
        "height": {"step": 48},
    }


def roc_chart(plot: dict[str, Any]) -> dict:
    """Each class's ROC curve against the rest, its AUC in the legend, and the chance line."""
    values = []
    for curve in plot["curves"]:
        label = _labelled(curve["class"], "AUC", curve.get("auc"))
        values += _points(curve, label, "fpr", "tpr")
    return _curves_chart(
        "ROC curves, one class against the rest",
        values,
        (("fpr", "false positive rate"), ("tpr", "true positive rate")),
        {"type": "line"},
        reference=True,
    )


def precision_recall_chart(plot: dict[str, Any]) -> dict:
    """Each class's precision-recall curve against the rest, its average precision in the
    legend (a step at each threshold, as scikit-learn's curve is read)."""
    values = []
    for curve in plot["curves"]:
        label = _labelled(curve["class"], "AP", curve.get("average_precision"))
        values += _points(curve, label, "recall", "precision")
    return _curves_chart(
        "precision-recall curves, one class against the rest",
        values,
        (("recall", "recall"), ("precision", "precision")),
        {"type": "line", "interpolate": "step-after"},
        reference=False,
    )


def calibration_chart(plot: dict[str, Any]) -> dict:
    """The reliability diagram: per class, the fraction of the class in each bin of predicted
    probability against the bin's mean prediction, beside the diagonal of a calibrated model."""
    values = []
    for curve in plot["curves"]:
        label = _labelled(curve["class"], "Brier", curve.get("brier"))
        values += _points(curve, label, "mean_predicted", "fraction_positive")
    return _curves_chart(
        f"reliability diagram, {plot.get('bins', '?')} bins of predicted probability",
        values,
        (
            ("mean_predicted", "mean predicted probability"),
            ("fraction_positive", "fraction of the class"),
        ),
        {"type": "line", "point": True},
        reference=True,
    )


def _scatter(
    description: str,
    values: list[dict[str, Any]],
    x: tuple[str, str],
    y: tuple[str, str],
    reference: dict[str, Any],
) -> dict:
    return {
        "$schema": SCHEMA,
        "description": description,
        "data": {"values": values},
        "layer": [
            {
                "mark": {"type": "point", "filled": True, "size": 16, "opacity": 0.5},
                "encoding": {
                    "x": {"field": x[0], "type": "quantitative", "title": x[1]},
                    "y": {"field": y[0], "type": "quantitative", "title": y[1]},
                    "color": {"value": RUN_COLOUR},
                    "tooltip": [{"field": x[0]}, {"field": y[0]}],
                },
            },
            reference,
        ],
        "width": 360,
        "height": 300,
    }


def predicted_vs_actual_chart(plot: dict[str, Any]) -> dict:
    """Each (sampled) holdout row's prediction against its actual value, and the line y = x."""
    values = [
        {"actual": float(a), "predicted": float(p)}
        for a, p in zip(plot["actual"], plot["predicted"], strict=True)
    ]
    low, high = (float(v) for v in plot["range"])
    return _scatter(
        f"predicted against actual, {plot['rows']} holdout rows",
        values,
        ("actual", "actual"),
        ("predicted", "predicted"),
        _reference_line("actual", "predicted", low, high),
    )


def residuals_chart(plot: dict[str, Any]) -> dict:
    """Each (sampled) holdout row's residual (actual - predicted) against its prediction, and
    the line of no error."""
    values = [
        {"predicted": float(p), "residual": float(r)}
        for p, r in zip(plot["predicted"], plot["residual"], strict=True)
    ]
    return _scatter(
        f"residuals, {plot['rows']} holdout rows",
        values,
        ("predicted", "predicted"),
        ("residual", "residual (actual - predicted)"),
        {
            "data": {"values": [{"residual": 0.0}]},
            "mark": {"type": "rule", "color": "#999", "strokeDash": [4, 4]},
            "encoding": {"y": {"field": "residual", "type": "quantitative"}},
        },
    )


def segment_error_chart(plot: dict[str, Any]) -> dict:
    """MAE and RMSE per value of one categorical column, the values with most rows first."""
    values = []
    for segment in plot["segments"]:
        for measure in ("mae", "rmse"):
            values.append(
                {
                    "segment": str(segment["value"]),
                    "rows": int(segment["rows"]),
                    "measure": measure.upper(),
                    "value": float(segment[measure]),
                }
            )
    column = str(plot["column"])
    return {
        "$schema": SCHEMA,
        "description": f"error by {column}",
        "data": {"values": values},
        "mark": "bar",
        "encoding": {
            "y": {"field": "segment", "type": "nominal", "sort": None, "title": column},
            "yOffset": {"field": "measure"},
            "x": {"field": "value", "type": "quantitative", "title": "error"},
            "color": {"field": "measure", "type": "nominal", "title": None},
            "tooltip": [
                {"field": "segment"},
                {"field": "rows"},
                {"field": "measure"},
                {"field": "value"},
            ],
        },
        "width": 420,
    }


def importance_chart(plot: dict[str, Any]) -> dict:
    """Permutation importance per feature (this run's order, largest first), the champion's
    beside it where it was recorded; a rule spans one standard deviation either side."""
    champion = plot.get("champion") or None
    models = [(THIS_RUN, plot["features"])]
    if champion is not None:
        models.append((f"champion v{champion.get('version', '?')}", champion["features"]))
    values = []
    for model, features in models:
        for f in features:
            mean, std = float(f["mean"]), float(f.get("std") or 0)
            values.append(
                {
                    "feature": str(f["feature"]),
                    "model": model,
                    "mean": mean,
                    "std": std,
                    "low": mean - std,
                    "high": mean + std,
                }
            )
    y = {"field": "feature", "type": "nominal", "sort": None, "title": None}
    return {
        "$schema": SCHEMA,
        "description": f"permutation importance: drop in {plot['scoring']}",
        "data": {"values": values},
        "layer": [
            {
                "mark": "bar",
                "encoding": {
                    "y": y,
                    "yOffset": {"field": "model", "sort": [m for m, _ in models]},
                    "x": {
                        "field": "mean",
                        "type": "quantitative",
                        "title": f"drop in {plot['scoring']}",
                    },
                    "color": {
                        "field": "model",
                        "type": "nominal",
                        "title": None,
                        "scale": {
                            "domain": [m for m, _ in models],
                            "range": [RUN_COLOUR, CHAMPION_COLOUR][: len(models)],
                        },
                    },
                    "tooltip": [
                        {"field": "feature"},
                        {"field": "model"},
                        {"field": "mean"},
                        {"field": "std"},
                    ],
                },
            },
            {
                "mark": {"type": "rule", "color": "black"},
                "encoding": {
                    "y": y,
                    "yOffset": {"field": "model", "sort": [m for m, _ in models]},
                    "x": {"field": "low", "type": "quantitative"},
                    "x2": {"field": "high"},
                },
            },
        ],
        "width": 420,
    }


def _segment_title(plot: dict[str, Any]) -> str:
    return f"Error by {plot['column']}" if plot.get("column") else "Error by segment"


# Each kind of plots.json entry: the slot its chart is drawn in (numbered from the second of a
# kind on), its heading and its chart.
PLOT_CHARTS: dict[str, tuple[str, Callable[[dict[str, Any]], str], Callable[[dict], dict]]] = {
    "confusion_matrix": ("chart-confusion", lambda _: "Confusion matrix", confusion_chart),
    "roc": ("chart-roc", lambda _: "ROC, one class against the rest", roc_chart),
    "precision_recall": (
        "chart-precision-recall",
        lambda _: "Precision-recall, one class against the rest",
        precision_recall_chart,
    ),
    "calibration": ("chart-calibration", lambda _: "Reliability (calibration)", calibration_chart),
    "predicted_vs_actual": (
        "chart-predicted-vs-actual",
        lambda _: "Predicted against actual",
        predicted_vs_actual_chart,
    ),
    "residuals": ("chart-residuals", lambda _: "Residuals", residuals_chart),
    "error_by_segment": ("chart-segment", _segment_title, segment_error_chart),
    "permutation_importance": (
        "chart-importance",
        lambda _: "Permutation importance",
        importance_chart,
    ),
}


@dataclass(frozen=True)
class PlotView:
    """One plots.json entry as the run page shows it: a chart (`spec`, drawn in `chart_id`)
    beside a table of `plot`'s numbers, or, in its place, a line saying why there is none."""

    kind: str
    title: str
    plot: dict[str, Any]
    chart_id: str = ""
    spec: dict[str, Any] | None = None
    problem: str = ""


def plot_views(entries: list[Any]) -> list[PlotView]:
    """plots.json's `plots`, in order. An entry the evaluator recorded with an `error`, a kind
    the console does not know, or numbers it cannot draw, is a line naming it and why."""
    views = []
    seen: dict[str, int] = {}
    for entry in entries:
        plot = entry if isinstance(entry, dict) else {}
        kind = str(plot.get("kind") or "?")
        known = PLOT_CHARTS.get(kind)
        if known is None:
            views.append(
                PlotView(kind, kind, plot, problem=f"{kind}: not a kind of plot drawn here")
            )
            continue
        slot, title_of, build = known
        title = title_of(plot)
        if "error" in plot:
            problem = f"{title}: not computed by the evaluator: {plot['error']}"
            views.append(PlotView(kind, title, plot, problem=problem))
            continue
        try:
            spec = build(plot)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            problem = f"{title}: cannot be drawn from plots.json ({type(exc).__name__}: {exc})"
            views.append(PlotView(kind, title, plot, problem=problem))
            continue
        seen[slot] = seen.get(slot, 0) + 1
        chart_id = slot if seen[slot] == 1 else f"{slot}-{seen[slot]}"
        views.append(PlotView(kind, title, plot, chart_id, spec))
    return views
