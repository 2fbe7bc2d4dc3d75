"""Holdout metrics and absolute quality gates (pure functions, no I/O)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn import metrics as skm

from mlpipe.messaging import events
from mlpipe.ml.config import HIGHER_IS_BETTER, GatesSpec
from mlpipe.v1 import events_pb2


def classification_metrics(y_true: Sequence[Any], y_pred: Sequence[Any]) -> dict[str, float]:
    labels = sorted({str(v) for v in y_true} | {str(v) for v in y_pred})
    t = [str(v) for v in y_true]
    p = [str(v) for v in y_pred]
    out = {
        "accuracy": float(skm.accuracy_score(t, p)),
        "macro_f1": float(skm.f1_score(t, p, average="macro", labels=labels, zero_division=0)),
        "weighted_f1": float(
            skm.f1_score(t, p, average="weighted", labels=labels, zero_division=0)
        ),
    }
    per_class = skm.f1_score(t, p, average=None, labels=labels, zero_division=0)
    for label, value in zip(labels, per_class, strict=True):
        out[f"f1[{label}]"] = float(value)
    return out


def regression_metrics(y_true: Sequence[float], y_pred: Sequence[float]) -> dict[str, float]:
    t = np.asarray(y_true, dtype=float)
    p = np.asarray(y_pred, dtype=float)
    return {
        "rmse": float(math.sqrt(skm.mean_squared_error(t, p))),
        "mae": float(skm.mean_absolute_error(t, p)),
        "r2": float(skm.r2_score(t, p)) if len(t) > 1 else float("nan"),
    }


def classification_details(
    y_true: Sequence[Any], y_pred: Sequence[Any], proba: Any = None, classes: Sequence[Any] = ()
) -> tuple[dict[str, float], dict[str, Any]]:
    """Per-class precision/recall (as metrics), ROC AUC when probabilities exist, and the
    confusion matrix (as details for the report)."""
    t = [str(v) for v in y_true]
    p = [str(v) for v in y_pred]
    labels = sorted(set(t) | set(p))
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        t, p, labels=labels, zero_division=0
    )
    extra: dict[str, float] = {}
    per_class = {}
    for i, label in enumerate(labels):
        extra[f"precision[{label}]"] = float(precision[i])
        extra[f"recall[{label}]"] = float(recall[i])
        per_class[label] = {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
    class_names = [str(c) for c in classes]
    if proba is not None and len(set(t)) > 1 and set(t) <= set(class_names):
        scores = np.asarray(proba)
        if len(class_names) == 2:
            positive = np.asarray([v == class_names[1] for v in t])
            extra["roc_auc"] = float(skm.roc_auc_score(positive, scores[:, 1]))
        else:
            extra["roc_auc"] = float(
                skm.roc_auc_score(t, scores, multi_class="ovr", average="macro", labels=class_names)
            )
    matrix = skm.confusion_matrix(t, p, labels=labels)
    details = {"labels": labels, "confusion_matrix": matrix.tolist(), "per_class": per_class}
    return extra, details


def regression_details(
    y_true: Sequence[float], y_pred: Sequence[float], max_points: int = 400
) -> dict[str, Any]:
    """Residuals for the report: quantiles, and an evenly thinned sample for the plot."""
    t = np.asarray(y_true, dtype=float)
    p = np.asarray(y_pred, dtype=float)
    residuals = t - p
    step = max(1, len(t) // max_points)
    return {
        "residual_quantiles": {
            q: float(np.quantile(residuals, float(q))) for q in ("0.05", "0.5", "0.95")
        },
        "points": [[float(a), float(b)] for a, b in zip(p[::step], residuals[::step], strict=True)],
    }


def _gate(
    name: str, metric: str, comparison: str, threshold: float, value: float
) -> events_pb2.GateResult:
    ok = (value >= threshold) if comparison == ">=" else (value <= threshold)
    if math.isnan(value):
        ok = False
    return events_pb2.GateResult(
        name=name,
        metric=metric,
        gate_comparison=events.GATE_COMPARISON.of(comparison),
        threshold=threshold,
        value=value,
        passed=ok,
        kind="absolute",
    )


NOT_APPLIED = "not applied"


def relative_gates(
    gates: GatesSpec,
    metrics: dict[str, float],
    champion: dict[str, float] | None,
    champion_note: str = "",
) -> list[events_pb2.GateResult]:
    """Challenger vs champion on the same holdout: not worse by more than the margin.

    Without a champion (or one that cannot score this holdout) the gate is recorded as not
    applied, with the reason in `note`.
    """
    results = []
    for rule in gates.relative:
        name = f"relative_{rule.metric}"
        value = metrics.get(rule.metric, float("nan"))
        higher = rule.metric in HIGHER_IS_BETTER
        comparison = ">=" if higher else "<="
        if champion is None or rule.metric not in champion:
            results.append(
                events_pb2.GateResult(
                    name=name,
                    metric=rule.metric,
                    gate_comparison=events.GATE_COMPARISON.of(comparison),
                    value=value,
                    passed=True,
                    kind="relative",
                    note=f"{NOT_APPLIED}: {champion_note or 'no champion yet'}",
                )
            )
            continue
        base = champion[rule.metric]
        threshold = base - rule.max_degradation if higher else base + rule.max_degradation
        gate = _gate(name, rule.metric, comparison, threshold, value)
        gate.kind = "relative"
        gate.note = (
            f"champion {rule.metric} {base:.4f} "
            f"{'-' if higher else '+'} margin {rule.max_degradation:g}"
        )
        results.append(gate)
    return results


def apply_gates(gates: GatesSpec, metrics: dict[str, float]) -> list[events_pb2.GateResult]:
    """Every configured absolute gate's verdict; a gate on a metric the task lacks fails."""
    results = []
    simple = [
        ("min_accuracy", "accuracy", ">=", gates.min_accuracy),
        ("min_macro_f1", "macro_f1", ">=", gates.min_macro_f1),
        ("max_rmse", "rmse", "<=", gates.max_rmse),
        ("max_mae", "mae", "<=", gates.max_mae),
        ("min_r2", "r2", ">=", gates.min_r2),
    ]
    for name, metric, comparison, threshold in simple:
        if threshold is not None:
            value = metrics.get(metric, float("nan"))
            results.append(_gate(name, metric, comparison, threshold, value))
    if gates.min_per_class_f1 is not None:
        per_class = sorted(k for k in metrics if k.startswith("f1["))
        if not per_class:
            results.append(
                _gate("min_per_class_f1", "f1[*]", ">=", gates.min_per_class_f1, float("nan"))
            )
        for key in per_class:
            results.append(
                _gate(f"min_per_class_f1{key[2:]}", key, ">=", gates.min_per_class_f1, metrics[key])
            )
    return results
