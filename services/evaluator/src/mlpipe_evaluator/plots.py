"""The numbers behind a run's report plots (runs/<id>/plots.json): pure functions of the
holdout, its predictions and the model, no drawing. docs/evaluation-plots.md gives the shape
of each plot kind; mlpipe_evaluator.figures draws them.

Curves are thinned to at most MAX_POINTS points and scatters to MAX_SCATTER, so the file
stays small whatever the holdout's size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn import metrics as skm
from sklearn.inspection import permutation_importance

PLOTS_VERSION = 1
MAX_POINTS = 200
MAX_SCATTER = 400
MAX_SEGMENTS = 30
CALIBRATION_BINS = 10
# Permutation importance is bounded so the report stays cheap: repeats x features predicts
# of at most IMPORTANCE_ROWS rows.
IMPORTANCE_REPEATS = 3
IMPORTANCE_ROWS = 200


def _floats(values: Any) -> list[float]:
    return [round(float(v), 6) for v in values]


def _thin(n: int, limit: int) -> np.ndarray:
    """Indices of at most `limit` of n points, evenly spaced, first and last kept."""
    if n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(int))


def confusion_matrix(labels: list[str], matrix: list[list[int]]) -> dict[str, Any]:
    return {"kind": "confusion_matrix", "labels": labels, "matrix": matrix}


def _one_vs_rest(
    y_true: Sequence[Any], proba: Any, classes: Sequence[Any]
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(class, is-this-class, score) for every class with both positives and negatives."""
    truth = np.asarray([str(v) for v in y_true])
    scores = np.asarray(proba, dtype=float)
    out = []
    for i, cls in enumerate(str(c) for c in classes):
        positive = truth == cls
        if 0 < positive.sum() < len(positive):
            out.append((cls, positive, scores[:, i]))
    return out


def roc_curves(y_true: Sequence[Any], proba: Any, classes: Sequence[Any]) -> dict[str, Any]:
    curves = []
    for cls, positive, score in _one_vs_rest(y_true, proba, classes):
        fpr, tpr, _ = skm.roc_curve(positive, score)
        keep = _thin(len(fpr), MAX_POINTS)
        curves.append(
            {
                "class": cls,
                "fpr": _floats(fpr[keep]),
                "tpr": _floats(tpr[keep]),
                "auc": float(skm.auc(fpr, tpr)),
            }
        )
    return {"kind": "roc", "one_vs_rest": True, "curves": curves}


def precision_recall_curves(
    y_true: Sequence[Any], proba: Any, classes: Sequence[Any]
) -> dict[str, Any]:
    curves = []
    for cls, positive, score in _one_vs_rest(y_true, proba, classes):
        precision, recall, _ = skm.precision_recall_curve(positive, score)
        keep = _thin(len(recall), MAX_POINTS)
        curves.append(
            {
                "class": cls,
                "recall": _floats(recall[keep]),
                "precision": _floats(precision[keep]),
                "average_precision": float(skm.average_precision_score(positive, score)),
                "prevalence": float(positive.mean()),
            }
        )
    return {"kind": "precision_recall", "one_vs_rest": True, "curves": curves}


def calibration(
    y_true: Sequence[Any], proba: Any, classes: Sequence[Any], bins: int = CALIBRATION_BINS
) -> dict[str, Any]:
    """Reliability diagram per class: in each of `bins` equal-width bins of the predicted
    probability, its mean and the fraction of rows that are that class (empty bins left out).
    """
    edges = np.linspace(0.0, 1.0, bins + 1)
    curves = []
    for cls, positive, score in _one_vs_rest(y_true, proba, classes):
        index = np.clip(np.digitize(score, edges[1:-1]), 0, bins - 1)
        count = np.bincount(index, minlength=bins)
        used = count > 0
        mean_predicted = np.bincount(index, weights=score, minlength=bins)[used] / count[used]
        fraction = np.bincount(index, weights=positive, minlength=bins)[used] / count[used]
        curves.append(
            {
                "class": cls,
                "mean_predicted": _floats(mean_predicted),
                "fraction_positive": _floats(fraction),
                "count": [int(c) for c in count[used]],
                "brier": float(np.mean((score - positive) ** 2)),
            }
        )
    return {"kind": "calibration", "bins": bins, "curves": curves}


def predicted_vs_actual(y_true: Any, y_pred: Any) -> dict[str, Any]:
    t = np.asarray(y_true, dtype=float)
    p = np.asarray(y_pred, dtype=float)
    keep = _thin(len(t), MAX_SCATTER)
    both = np.concatenate([t, p]) if len(t) else np.zeros(1)
    return {
        "kind": "predicted_vs_actual",
        "rows": len(t),
        "actual": _floats(t[keep]),
        "predicted": _floats(p[keep]),
        "range": [float(both.min()), float(both.max())],
    }


def residuals(y_true: Any, y_pred: Any) -> dict[str, Any]:
    t = np.asarray(y_true, dtype=float)
    p = np.asarray(y_pred, dtype=float)
    keep = _thin(len(t), MAX_SCATTER)
    return {
        "kind": "residuals",
        "rows": len(t),
        "predicted": _floats(p[keep]),
        "residual": _floats((t - p)[keep]),
    }


def error_by_segment(column: str, values: Any, y_true: Any, y_pred: Any) -> dict[str, Any]:
    """MAE, RMSE and bias (mean of actual - predicted) per value of a categorical column, the
    MAX_SEGMENTS values with most rows (the rest counted in `other_rows`)."""
    frame = pd.DataFrame(
        {
            "segment": pd.Series(values).astype(str).to_numpy(),
            "error": np.asarray(y_true, dtype=float) - np.asarray(y_pred, dtype=float),
        }
    )
    groups = frame.groupby("segment")["error"]
    table = pd.DataFrame(
        {
            "rows": groups.size(),
            "mae": groups.apply(lambda e: float(np.mean(np.abs(e)))),
            "rmse": groups.apply(lambda e: float(np.sqrt(np.mean(e**2)))),
            "bias": groups.mean(),
        }
    ).sort_values(["rows", "mae"], ascending=[False, False])
    shown = table.head(MAX_SEGMENTS)
    return {
        "kind": "error_by_segment",
        "column": column,
        "segments": [
            {
                "value": str(value),
                "rows": int(row.rows),
                "mae": float(row.mae),
                "rmse": float(row.rmse),
                "bias": float(row.bias),
            }
            for value, row in shown.iterrows()
        ],
        "other_rows": int(table["rows"].iloc[MAX_SEGMENTS:].sum()),
    }


def importance(
    estimator: Any,
    frame: pd.DataFrame,
    target: Any,
    task: str,
    seed: int = 0,
) -> dict[str, Any]:
    """Permutation importance of each feature on (at most IMPORTANCE_ROWS rows of) the
    holdout: how much the score drops when that column is shuffled."""
    if len(frame) > IMPORTANCE_ROWS:
        rows = np.random.default_rng(seed).choice(len(frame), IMPORTANCE_ROWS, replace=False)
        rows.sort()
        frame, target = frame.iloc[rows], target.iloc[rows]
    scoring = "accuracy" if task == "classification" else "neg_root_mean_squared_error"
    found = permutation_importance(
        estimator,
        frame,
        target,
        scoring=scoring,
        n_repeats=IMPORTANCE_REPEATS,
        random_state=seed,
        n_jobs=1,
    )
    return {
        "scoring": scoring,
        "repeats": IMPORTANCE_REPEATS,
        "rows": len(frame),
        "features": [
            {"feature": str(name), "mean": float(mean), "std": float(std)}
            for name, mean, std in sorted(
                zip(frame.columns, found.importances_mean, found.importances_std, strict=True),
                key=lambda item: -item[1],
            )
        ],
    }


def permutation_importance_plot(
    model: dict[str, Any], champion: dict[str, Any] | None, champion_version: int
) -> dict[str, Any]:
    """This run's importances and, where there is a champion, the champion's on the same
    rows (None when there is none or it could not be scored)."""
    return {
        "kind": "permutation_importance",
        **model,
        "champion": None if champion is None else {"version": champion_version, **champion},
    }
