"""Holdout metrics and absolute quality gates (pure functions, no I/O)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn import metrics as skm

from mlpipe.config import GatesSpec
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


def _gate(
    name: str, metric: str, comparison: str, threshold: float, value: float
) -> events_pb2.GateResult:
    ok = (value >= threshold) if comparison == ">=" else (value <= threshold)
    if math.isnan(value):
        ok = False
    return events_pb2.GateResult(
        name=name, metric=metric, comparison=comparison, threshold=threshold, value=value, passed=ok
    )


def apply_gates(gates: GatesSpec, metrics: dict[str, float]) -> list[events_pb2.GateResult]:
    """Every configured gate's verdict; a gate on a metric the task lacks fails, named."""
    results = []
    simple = [
        ("min_accuracy", "accuracy", ">=", gates.min_accuracy),
        ("min_macro_f1", "macro_f1", ">=", gates.min_macro_f1),
        ("max_rmse", "rmse", "<=", gates.max_rmse),
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
