"""Holdout metrics and quality gates, checked against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from mlpipe.messaging import events
from mlpipe.ml.config import GatesSpec, RelativeGate
from mlpipe_evaluator.metrics import (
    apply_gates,
    classification_metrics,
    regression_metrics,
    relative_gates,
)

# a: TP 2, FP 0, FN 1 -> P 1,   R 2/3, F1 0.8
# b: TP 1, FP 1, FN 1 -> P 1/2, R 1/2, F1 0.5
# c: TP 1, FP 1, FN 0 -> P 1/2, R 1,   F1 2/3
Y_TRUE = ["a", "a", "a", "b", "b", "c"]
Y_PRED = ["a", "a", "b", "b", "c", "c"]


def test_classification_metrics_match_a_hand_computed_example() -> None:
    metrics = classification_metrics(Y_TRUE, Y_PRED)

    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["f1[a]"] == pytest.approx(0.8)
    assert metrics["f1[b]"] == pytest.approx(0.5)
    assert metrics["f1[c]"] == pytest.approx(2 / 3)
    assert metrics["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert metrics["weighted_f1"] == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    assert set(metrics) == {"accuracy", "macro_f1", "weighted_f1", "f1[a]", "f1[b]", "f1[c]"}


def test_a_label_only_predicted_gets_a_zero_f1() -> None:
    metrics = classification_metrics(["a", "a"], ["a", "z"])

    assert metrics["f1[z]"] == 0.0
    assert metrics["f1[a]"] == pytest.approx(2 / 3)
    assert metrics["macro_f1"] == pytest.approx(1 / 3)


def test_labels_are_compared_as_strings() -> None:
    metrics = classification_metrics([1, 2, 2], ["1", "2", 1])

    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert {"f1[1]", "f1[2]"} <= set(metrics)


def test_regression_metrics_match_a_hand_computed_example() -> None:
    # residuals 0, 0, 0, -4; mean of y_true 2.5, total sum of squares 5
    metrics = regression_metrics([1, 2, 3, 4], [1, 2, 3, 8])

    assert metrics["mae"] == pytest.approx(1.0)
    assert metrics["rmse"] == pytest.approx(2.0)
    assert metrics["r2"] == pytest.approx(1 - 16 / 5)


def test_r2_of_a_single_row_is_nan() -> None:
    metrics = regression_metrics([3.0], [2.0])

    assert math.isnan(metrics["r2"])
    assert metrics["mae"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("gate", "metric", "threshold", "passing", "failing", "comparison"),
    [
        ("min_accuracy", "accuracy", 0.8, 0.8, 0.79, ">="),
        ("min_macro_f1", "macro_f1", 0.7, 0.9, 0.69, ">="),
        ("max_rmse", "rmse", 2.0, 2.0, 2.01, "<="),
        ("max_mae", "mae", 1.0, 0.5, 1.5, "<="),
        ("min_r2", "r2", 0.6, 0.61, 0.59, ">="),
    ],
)
def test_each_absolute_gate_passes_and_fails(
    gate: str, metric: str, threshold: float, passing: float, failing: float, comparison: str
) -> None:
    gates = GatesSpec(**{gate: threshold})

    [passed] = apply_gates(gates, {metric: passing})
    [failed] = apply_gates(gates, {metric: failing})

    assert (passed.name, passed.metric, events.gate_comparison(passed)) == (
        gate,
        metric,
        comparison,
    )
    assert passed.threshold == pytest.approx(threshold)
    assert passed.value == pytest.approx(passing)
    assert passed.passed is True
    assert passed.kind == "absolute"
    assert failed.passed is False
    assert failed.value == pytest.approx(failing)


def test_unset_gates_are_not_checked() -> None:
    assert apply_gates(GatesSpec(), {"accuracy": 0.1, "f1[a]": 0.0}) == []


def test_the_per_class_gate_is_one_verdict_per_label() -> None:
    metrics = classification_metrics(Y_TRUE, Y_PRED)

    results = apply_gates(GatesSpec(min_per_class_f1=0.6), metrics)

    verdicts = {r.name: (r.metric, r.passed) for r in results}
    assert verdicts == {
        "min_per_class_f1[a]": ("f1[a]", True),
        "min_per_class_f1[b]": ("f1[b]", False),
        "min_per_class_f1[c]": ("f1[c]", True),
    }


@pytest.mark.parametrize(
    ("gates", "name", "metric"),
    [
        (GatesSpec(min_accuracy=0.5), "min_accuracy", "accuracy"),
        (GatesSpec(max_rmse=10.0), "max_rmse", "rmse"),
        (GatesSpec(min_per_class_f1=0.5), "min_per_class_f1", "f1[*]"),
    ],
)
def test_a_gate_on_a_missing_metric_fails(gates: GatesSpec, name: str, metric: str) -> None:
    [result] = apply_gates(gates, {"unrelated": 1.0})

    assert (result.name, result.metric) == (name, metric)
    assert math.isnan(result.value)
    assert result.passed is False


def test_a_gate_on_a_nan_metric_fails_even_for_a_max_gate() -> None:
    [result] = apply_gates(GatesSpec(max_mae=1.0), {"mae": float("nan")})

    assert result.passed is False


def test_a_relative_gate_allows_the_margin_and_no_more() -> None:
    gates = GatesSpec(
        relative=[
            RelativeGate(metric="accuracy", max_degradation=0.02),
            RelativeGate(metric="rmse", max_degradation=0.5),
        ]
    )
    champion = {"accuracy": 0.90, "rmse": 2.0}

    accuracy, rmse = relative_gates(gates, {"accuracy": 0.881, "rmse": 2.6}, champion)

    assert (accuracy.name, events.gate_comparison(accuracy), accuracy.kind) == (
        "relative_accuracy",
        ">=",
        "relative",
    )
    assert accuracy.threshold == pytest.approx(0.88)
    assert accuracy.passed is True
    assert events.gate_comparison(rmse) == "<="
    assert rmse.threshold == pytest.approx(2.5)
    assert rmse.passed is False


def test_a_relative_gate_without_a_champion_is_recorded_as_not_applied() -> None:
    gates = GatesSpec(relative=[RelativeGate(metric="accuracy")])

    [result] = relative_gates(gates, {"accuracy": 0.1}, None)

    assert result.passed is True
    assert result.note == "not applied: no champion yet"


@pytest.mark.parametrize(
    "estimator",
    [
        "sklearn.ensemble.RandomForestClassifier",
        "sklearn.ensemble.ExtraTreesClassifier",
        "sklearn.ensemble.HistGradientBoostingClassifier",
        "sklearn.tree.DecisionTreeClassifier",
        "sklearn.linear_model.LogisticRegression",  # not in the one-pass list: asked for both
    ],
)
def test_labels_from_one_pass_equal_predict(estimator: str) -> None:
    import importlib

    import numpy as np
    from sklearn.datasets import make_classification
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from mlpipe_evaluator.evaluation import predict_with_proba

    module, name = estimator.rsplit(".", 1)
    x, y = make_classification(1200, n_features=8, n_informative=5, n_classes=4, random_state=1)
    labels = np.array([f"class-{v}" for v in y])
    model = make_pipeline(StandardScaler(), getattr(importlib.import_module(module), name)())
    model.fit(x[:900], labels[:900])

    predicted, proba = predict_with_proba(model, x[900:])

    assert predicted == list(model.predict(x[900:]))
    assert proba is not None and np.allclose(proba, model.predict_proba(x[900:]))
