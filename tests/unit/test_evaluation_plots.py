"""The report's plots: plots.json's shape per plot kind, and each plot drawn as inline SVG
with axis ticks and labels (the SVG parsed, not searched), on iris, bikeshare and a
classifier without predict_proba."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from functools import cache
from typing import Any

import pytest

from mlpipe.ml.config import PipelineConfig, parse_config
from mlpipe.ml.data import read_dataset
from mlpipe.ml.modeling import build_pipeline
from mlpipe.ml.split import split_rows
from mlpipe.ml.validation import check_dataset
from mlpipe.v1 import events_pb2
from mlpipe_evaluator import figures, plots, report
from mlpipe_evaluator.evaluation import Champion, Evaluated, plot_data, scored
from tests.conftest import REPO

SVG = "{http://www.w3.org/2000/svg}"
IRIS = (REPO / "examples/iris/pipeline.yaml").read_text()
# Fewer boosting rounds than the example: the plots are under test, not the model.
BIKESHARE = (
    (REPO / "examples/bikeshare/pipeline.yaml").read_text().replace("max_iter: 200", "max_iter: 20")
)
NO_PROBA = IRIS.replace("sklearn.ensemble.RandomForestClassifier", "sklearn.svm.LinearSVC").replace(
    "    n_estimators: 100\n    random_state: 0\n    n_jobs: 1\n", "    random_state: 0\n"
)
CLASSIFICATION_KINDS = ["confusion_matrix", "roc", "precision_recall", "calibration"]


@cache
def evaluated(config_text: str, example: str) -> tuple[PipelineConfig, Evaluated]:
    config = parse_config(config_text)
    frame = read_dataset((REPO / f"examples/{example}/{example}.csv").read_bytes(), "csv", example)
    features = check_dataset(frame, config, example)
    split = split_rows(frame, config)
    estimator = build_pipeline(config, features)
    train = frame.iloc[split.train]
    estimator.fit(train[features], train[config.dataset.target])
    bundle = {"estimator": estimator, "features": features, "task": config.model.task}
    holdout = frame.iloc[split.holdout]
    # The model stands in as its own champion: the overlay is drawn from a second bundle.
    champion = Champion({}, 3, "", bundle, "")
    return config, Evaluated(config, bundle, holdout, scored(bundle, holdout, config), champion)


def data_of(config_text: str, example: str) -> dict[str, Any]:
    _, found = evaluated(config_text, example)
    return plot_data(None, "0123456789abcdef", found)  # type: ignore[arg-type]  # no storage read


def kinds(data: dict[str, Any]) -> list[str]:
    return [p["kind"] for p in data["plots"]]


def parse_svg(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    return root


def tick_texts(root: ET.Element, axis: str) -> list[str]:
    """The text of each `xtick_*` / `ytick_*` group matplotlib writes (svg.fonttype none)."""
    out = []
    for group in root.iter(f"{SVG}g"):
        if re.fullmatch(f"{axis}tick_\\d+", group.get("id", "")):
            out += ["".join(t.itertext()).strip() for t in group.iter(f"{SVG}text")]
    return [t for t in out if t]


def all_texts(root: ET.Element) -> list[str]:
    return ["".join(t.itertext()).strip() for t in root.iter(f"{SVG}text")]


def test_classification_plots_have_the_documented_shape() -> None:
    data = data_of(IRIS, "iris")

    assert data["version"] == plots.PLOTS_VERSION and data["task"] == "classification"
    assert kinds(data) == [*CLASSIFICATION_KINDS, "permutation_importance"]
    by_kind = {p["kind"]: p for p in data["plots"]}
    matrix = by_kind["confusion_matrix"]
    assert matrix["labels"] == ["setosa", "versicolor", "virginica"]
    assert sum(map(sum, matrix["matrix"])) == data["holdout_rows"] == 30
    for kind, xs, ys in [("roc", "fpr", "tpr"), ("precision_recall", "recall", "precision")]:
        curves = by_kind[kind]["curves"]
        assert [c["class"] for c in curves] == matrix["labels"]
        for curve in curves:
            assert len(curve[xs]) == len(curve[ys]) >= 2
            assert all(0.0 <= v <= 1.0 for v in curve[xs] + curve[ys])
    for curve in by_kind["roc"]["curves"]:
        assert curve["fpr"][0] == 0.0 and curve["tpr"][-1] == 1.0
        assert 0.5 < curve["auc"] <= 1.0
    for curve in by_kind["calibration"]["curves"]:
        assert sum(curve["count"]) == 30
        assert (
            len(curve["mean_predicted"]) == len(curve["fraction_positive"]) == len(curve["count"])
        )
    json.dumps(data, allow_nan=False)  # plain JSON: what the console reads


def test_one_vs_rest_roc_matches_a_hand_worked_example() -> None:
    # class b's scores: positives 0.9, 0.6; negatives 0.7, 0.1 → AUC 3/4
    proba = [[0.1, 0.9], [0.3, 0.7], [0.4, 0.6], [0.9, 0.1]]

    roc = plots.roc_curves(["b", "a", "b", "a"], proba, ["a", "b"])

    assert [c["class"] for c in roc["curves"]] == ["a", "b"]
    assert roc["curves"][1]["auc"] == pytest.approx(0.75)


def test_calibration_bins_hold_the_mean_prediction_and_the_fraction_positive() -> None:
    proba = [[0.95, 0.05], [0.85, 0.15], [0.15, 0.85], [0.05, 0.95]]

    found = plots.calibration(["a", "b", "b", "b"], proba, ["a", "b"], bins=2)

    b = next(c for c in found["curves"] if c["class"] == "b")
    assert b["mean_predicted"] == pytest.approx([0.1, 0.9])
    assert b["fraction_positive"] == pytest.approx([0.5, 1.0])
    assert b["count"] == [2, 2]


def test_regression_plots_have_the_documented_shape() -> None:
    data = data_of(BIKESHARE, "bikeshare")

    assert kinds(data) == [
        "predicted_vs_actual",
        "residuals",
        "error_by_segment",
        "error_by_segment",
        "permutation_importance",
    ]
    by_kind = {p["kind"]: p for p in data["plots"]}
    scatter = by_kind["predicted_vs_actual"]
    assert scatter["rows"] == data["holdout_rows"]
    assert len(scatter["actual"]) == len(scatter["predicted"]) <= plots.MAX_SCATTER
    assert len(by_kind["residuals"]["residual"]) == len(by_kind["residuals"]["predicted"])
    segments = [p for p in data["plots"] if p["kind"] == "error_by_segment"]
    assert [s["column"] for s in segments] == ["station", "station_kind"]
    for segment in segments:
        assert (
            sum(s["rows"] for s in segment["segments"]) + segment["other_rows"]
            == (data["holdout_rows"])
        )
        assert all(s["rmse"] >= s["mae"] >= 0 for s in segment["segments"])
    importance = by_kind["permutation_importance"]
    assert importance["scoring"] == "neg_root_mean_squared_error"
    assert importance["rows"] == plots.IMPORTANCE_ROWS
    assert {f["feature"] for f in importance["features"]} == set(
        evaluated(BIKESHARE, "bikeshare")[1].bundle["features"]
    )
    assert importance["champion"]["version"] == 3
    assert importance["champion"]["features"] == importance["features"]  # same model, same rows
    json.dumps(data, allow_nan=False)


def test_error_by_segment_matches_a_hand_worked_example() -> None:
    found = plots.error_by_segment("kind", ["a", "a", "b"], [1.0, 3.0, 5.0], [2.0, 2.0, 1.0])

    assert found["segments"] == [
        {"value": "a", "rows": 2, "mae": 1.0, "rmse": 1.0, "bias": 0.0},
        {"value": "b", "rows": 1, "mae": 4.0, "rmse": 4.0, "bias": 4.0},
    ]
    assert found["other_rows"] == 0


def test_a_classifier_without_predict_proba_gets_no_probability_plots() -> None:
    _, found = evaluated(NO_PROBA, "iris")
    data = data_of(NO_PROBA, "iris")

    assert not hasattr(found.bundle["estimator"], "predict_proba")
    assert found.model.proba is None
    assert kinds(data) == ["confusion_matrix", "permutation_importance"]
    assert "roc_auc" not in found.model.metrics


@pytest.mark.parametrize(
    ("config_text", "example"), [(IRIS, "iris"), (BIKESHARE, "bikeshare"), (NO_PROBA, "iris")]
)
def test_every_plot_is_drawn_as_svg_with_ticks_and_axis_labels(
    config_text: str, example: str
) -> None:
    data = data_of(config_text, example)

    for plot in data["plots"]:
        root = parse_svg(figures.draw(plot))
        texts = all_texts(root)
        assert tick_texts(root, "x") and tick_texts(root, "y"), plot["kind"]
        xlabel, ylabel = {
            "confusion_matrix": ("predicted", "actual"),
            "roc": ("false positive rate", "true positive rate"),
            "precision_recall": ("recall", "precision"),
            "calibration": ("mean predicted probability", "fraction of the class"),
            "predicted_vs_actual": ("actual", "predicted"),
            "residuals": ("predicted", "residual (actual - predicted)"),
            "error_by_segment": ("error", plot.get("column")),
            "permutation_importance": (f"drop in {plot.get('scoring')}", "feature"),
        }[plot["kind"]]
        assert xlabel in texts and ylabel in texts, (plot["kind"], texts)
    if example == "iris":
        matrix = parse_svg(figures.draw(data["plots"][0]))
        assert tick_texts(matrix, "x") == ["setosa", "versicolor", "virginica"]


def test_the_same_plot_data_draws_the_same_bytes() -> None:
    plot = data_of(IRIS, "iris")["plots"][1]

    assert figures.draw(plot) == figures.draw(plot)


def test_the_report_is_self_contained_with_each_plot_inline() -> None:
    data = data_of(IRIS, "iris")
    _, found = evaluated(IRIS, "iris")
    event = events_pb2.EvaluationCompleted(model_name="iris-classifier", passed=True)

    page = report.render(event, found.model.details, None, data)

    svgs = re.findall(r"<svg\b.*?</svg>", page, re.S)
    assert len(svgs) == len(data["plots"])
    assert [parse_svg(s) is not None for s in svgs] == [True] * len(svgs)
    figures_kinds = re.findall(r"<figure class='plot' data-kind='([a-z_]+)'>", page)
    assert figures_kinds == kinds(data)
    # No external files, fonts or scripts.
    assert not re.search(r"<script|<link|@import|@font-face|xlink:href=['\"]http", page)
    assert not re.search(r"(src|href)=['\"](https?:|//)", page)
    assert "<?xml" not in page and "<!DOCTYPE svg" not in page


def test_a_plot_that_cannot_be_drawn_is_named_and_the_rest_drawn() -> None:
    data = data_of(IRIS, "iris")
    broken = {"plots": [{"kind": "roc", "curves": [{"class": "x"}]}, data["plots"][0]]}
    event = events_pb2.EvaluationCompleted(model_name="iris-classifier")

    page = report.render(event, {}, None, broken)

    assert "could not be drawn" in page
    assert len(re.findall(r"<svg\b", page)) == 1


def test_a_plot_whose_numbers_fail_is_recorded_with_its_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fails(*_: Any) -> dict[str, Any]:
        raise ValueError("no bins")

    monkeypatch.setattr(plots, "calibration", fails)
    _, found = evaluated(IRIS, "iris")

    data = plot_data(None, "0123456789abcdef", found)  # type: ignore[arg-type]
    page = report.render(events_pb2.EvaluationCompleted(), found.model.details, None, data)

    assert {"kind": "calibration", "error": "no bins"} in data["plots"]
    assert kinds(data) == [*CLASSIFICATION_KINDS, "permutation_importance"]
    assert "could not be drawn: no bins" in page
    assert len(re.findall(r"<svg\b", page)) == len(data["plots"]) - 1
