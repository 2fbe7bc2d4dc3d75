"""The run page's evaluation plots: each plots.json entry (made by the evaluator's own
mlpipe_evaluator.plots on small fitted models) as a Vega-Lite spec whose data carries its
numbers, beside a table of them; a plot recorded with an error, of an unknown kind or with
numbers that cannot be drawn is a line naming it and why."""

from __future__ import annotations

import json
from functools import cache
from typing import Any

import numpy as np
import pandas as pd
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.metrics import confusion_matrix

from mlpipe_console import charts, pages
from mlpipe_console.reading import RunDetail, RunSummary
from mlpipe_evaluator import plots
from tests.conftest import REPO

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


@cache
def classification() -> dict[str, Any]:
    """plots.json's entries for a logistic regression on iris (every fifth row held out),
    with a second model standing in as the champion."""
    frame = pd.read_csv(REPO / "examples/iris/iris.csv")
    held = frame.index % 5 == 0
    train, holdout = frame[~held], frame[held]
    model = LogisticRegression(max_iter=500).fit(train[FEATURES], train["species"])
    champion = LogisticRegression(max_iter=500, C=0.01).fit(train[FEATURES], train["species"])
    truth, predicted = holdout["species"], model.predict(holdout[FEATURES])
    proba, classes = model.predict_proba(holdout[FEATURES]), model.classes_
    labels = [str(c) for c in classes]
    ours = plots.importance(model, holdout[FEATURES], truth, "classification")
    theirs = plots.importance(champion, holdout[FEATURES], truth, "classification")
    return {
        "task": "classification",
        "plots": [
            plots.confusion_matrix(
                labels, confusion_matrix(truth, predicted, labels=labels).tolist()
            ),
            plots.roc_curves(truth, proba, classes),
            plots.precision_recall_curves(truth, proba, classes),
            plots.calibration(truth, proba, classes),
            plots.permutation_importance_plot(ours, theirs, 1),
        ],
    }


@cache
def regression() -> dict[str, Any]:
    """plots.json's entries for a linear regression whose error depends on a station, with
    two categorical columns and no champion."""
    rng = np.random.default_rng(0)
    n = 120
    station = rng.choice(["hospital", "park", "station"], n)
    weekday = rng.choice(["mon", "sat"], n)
    frame = pd.DataFrame({"hour": rng.uniform(0, 24, n), "temp": rng.uniform(-5, 30, n)})
    target = 2 * frame["hour"] + frame["temp"] + np.where(station == "park", 5.0, 0.0)
    model = LinearRegression().fit(frame, target)
    predicted = model.predict(frame)
    ours = plots.importance(model, frame, target, "regression")
    return {
        "task": "regression",
        "plots": [
            plots.predicted_vs_actual(target, predicted),
            plots.residuals(target, predicted),
            plots.error_by_segment("station", station, target, predicted),
            plots.error_by_segment("weekday", weekday, target, predicted),
            plots.permutation_importance_plot(ours, None, 0),
        ],
    }


def views_of(data: dict[str, Any]) -> dict[str, charts.PlotView]:
    return {v.chart_id: v for v in charts.plot_views(data["plots"])}


def layer_values(spec: dict[str, Any], index: int) -> list[dict[str, Any]]:
    return spec["layer"][index]["data"]["values"]


def test_every_classification_plot_is_a_chart_in_the_console_style() -> None:
    views = charts.plot_views(classification()["plots"])

    assert [(v.kind, v.chart_id, v.problem) for v in views] == [
        ("confusion_matrix", "chart-confusion", ""),
        ("roc", "chart-roc", ""),
        ("precision_recall", "chart-precision-recall", ""),
        ("calibration", "chart-calibration", ""),
        ("permutation_importance", "chart-importance", ""),
    ]
    for view in views:
        assert view.spec is not None
        assert view.spec["$schema"] == charts.SCHEMA
        assert view.spec["data"]["values"], view.kind
        json.dumps(view.spec, allow_nan=False)  # embedded as JSON in the page


def test_the_confusion_chart_carries_each_count_with_its_labels() -> None:
    plot = classification()["plots"][0]

    spec = views_of(classification())["chart-confusion"].spec

    assert spec is not None
    cells = {(v["actual"], v["predicted"]): v["count"] for v in spec["data"]["values"]}
    labels = plot["labels"]
    assert cells == {
        (actual, predicted): plot["matrix"][i][j]
        for i, actual in enumerate(labels)
        for j, predicted in enumerate(labels)
    }
    assert sum(cells.values()) == 30  # the holdout
    assert [layer["mark"] for layer in spec["layer"]] == ["rect", "text"]
    assert spec["layer"][1]["encoding"]["text"]["field"] == "count"
    assert spec["encoding"]["x"]["sort"] == labels and spec["encoding"]["x"]["title"] == "predicted"


def test_the_roc_chart_carries_each_curve_in_order_with_its_auc_in_the_legend() -> None:
    plot = classification()["plots"][1]

    spec = views_of(classification())["chart-roc"].spec

    assert spec is not None
    for curve in plot["curves"]:
        label = f"{curve['class']} (AUC {curve['auc']:.3f})"
        points = sorted(
            (v["point"], v["fpr"], v["tpr"]) for v in spec["data"]["values"] if v["class"] == label
        )
        assert [(f, t) for _, f, t in points] == list(zip(curve["fpr"], curve["tpr"], strict=True))
    assert len({v["class"] for v in spec["data"]["values"]}) == 3
    line = spec["layer"][0]["encoding"]
    assert (line["x"]["title"], line["y"]["title"]) == ("false positive rate", "true positive rate")
    assert line["order"]["field"] == "point"
    assert layer_values(spec, 1) == [{"fpr": 0.0, "tpr": 0.0}, {"fpr": 1.0, "tpr": 1.0}]


def test_the_precision_recall_and_reliability_charts_carry_their_curves() -> None:
    pr_plot, calibration_plot = classification()["plots"][2:4]
    views = views_of(classification())

    pr, reliability = views["chart-precision-recall"].spec, views["chart-calibration"].spec

    assert pr is not None and reliability is not None
    first = pr_plot["curves"][0]
    label = f"{first['class']} (AP {first['average_precision']:.3f})"
    assert [v["recall"] for v in pr["data"]["values"] if v["class"] == label] == first["recall"]
    assert pr["layer"][0]["mark"]["interpolate"] == "step-after"
    curve = calibration_plot["curves"][0]
    label = f"{curve['class']} (Brier {curve['brier']:.3f})"
    shown = [
        (v["mean_predicted"], v["fraction_positive"])
        for v in reliability["data"]["values"]
        if v["class"] == label
    ]
    assert shown == list(zip(curve["mean_predicted"], curve["fraction_positive"], strict=True))
    assert len(reliability["layer"]) == 2  # the curves and the diagonal


def test_the_importance_chart_sets_the_champions_beside_the_runs() -> None:
    plot = classification()["plots"][4]

    spec = views_of(classification())["chart-importance"].spec

    assert spec is not None
    values = spec["data"]["values"]
    ours = [(v["feature"], v["mean"]) for v in values if v["model"] == "this run"]
    theirs = {v["feature"]: v["mean"] for v in values if v["model"] == "champion v1"}
    assert ours == [(f["feature"], f["mean"]) for f in plot["features"]]  # largest first
    assert theirs == {f["feature"]: f["mean"] for f in plot["champion"]["features"]}
    bars = spec["layer"][0]["encoding"]
    assert bars["yOffset"]["field"] == "model"
    assert bars["x"]["title"] == "drop in accuracy"


def test_every_regression_plot_is_a_chart_carrying_its_numbers() -> None:
    data = regression()
    vs_actual, residuals, station, _, importance = data["plots"]

    views = views_of(data)

    assert list(views) == [
        "chart-predicted-vs-actual",
        "chart-residuals",
        "chart-segment",
        "chart-segment-2",
        "chart-importance",
    ]
    spec = views["chart-predicted-vs-actual"].spec
    assert spec is not None
    assert [(v["actual"], v["predicted"]) for v in spec["data"]["values"]] == list(
        zip(vs_actual["actual"], vs_actual["predicted"], strict=True)
    )
    low, high = vs_actual["range"]
    assert layer_values(spec, 1) == [
        {"actual": low, "predicted": low},
        {"actual": high, "predicted": high},
    ]
    spec = views["chart-residuals"].spec
    assert spec is not None
    assert [v["residual"] for v in spec["data"]["values"]] == residuals["residual"]
    assert spec["layer"][1]["mark"]["type"] == "rule"
    assert layer_values(spec, 1) == [{"residual": 0.0}]
    spec = views["chart-segment"].spec
    assert spec is not None and views["chart-segment"].title == "Error by station"
    bars = {(v["segment"], v["measure"]): v["value"] for v in spec["data"]["values"]}
    for segment in station["segments"]:
        assert bars[(segment["value"], "MAE")] == segment["mae"]
        assert bars[(segment["value"], "RMSE")] == segment["rmse"]
    assert views["chart-segment-2"].title == "Error by weekday"
    spec = views["chart-importance"].spec
    assert spec is not None
    assert {v["model"] for v in spec["data"]["values"]} == {"this run"}  # no champion
    assert len(spec["data"]["values"]) == len(importance["features"])


def test_a_plot_recorded_with_an_error_is_a_line_naming_it_and_its_error() -> None:
    entries = [
        {"kind": "calibration", "error": "y_prob contains values greater than 1."},
        {"kind": "error_by_segment", "error": "'station'"},
        *classification()["plots"][:1],
    ]

    views = charts.plot_views(entries)

    assert [(v.chart_id, v.spec, v.problem) for v in views[:2]] == [
        (
            "",
            None,
            "Reliability (calibration): not computed by the evaluator: "
            "y_prob contains values greater than 1.",
        ),
        ("", None, "Error by segment: not computed by the evaluator: 'station'"),
    ]
    assert views[2].chart_id == "chart-confusion" and views[2].spec is not None


def test_numbers_that_cannot_be_drawn_and_unknown_kinds_are_named() -> None:
    entries = [
        {"kind": "confusion_matrix", "labels": ["a", "b"], "matrix": [[1, 2], [3]]},
        {"kind": "roc", "one_vs_rest": True},
        {"kind": "lift", "curves": []},
        "not an entry",
    ]

    problems = [(v.spec, v.problem) for v in charts.plot_views(entries)]

    assert problems == [
        (
            None,
            "Confusion matrix: cannot be drawn from plots.json (ValueError: "
            "zip() argument 2 is shorter than argument 1)",
        ),
        (
            None,
            "ROC, one class against the rest: cannot be drawn from plots.json (KeyError: 'curves')",
        ),
        (None, "lift: not a kind of plot drawn here"),
        (None, "?: not a kind of plot drawn here"),
    ]


def render_plots(entries: list[Any], problem: str = "") -> str:
    """The run page's Plots section for a run with these plots.json entries."""
    summary = RunSummary("0123456789abcdef", "deployed", "iris", "", "m", 1, "", "", None, None)
    run = RunDetail("0123456789abcdef", summary, {}, [], [], [], 0, {}, [], "runs/x/report.html")
    run.plots, run.plots_problem = entries, problem
    page = pages.render("run.html", run=run, plots=charts.plot_views(entries), charts=[])
    return page.split('<section id="plots">')[1].split("</section>")[0]


def test_each_chart_has_its_numbers_in_a_table_beside_it() -> None:
    data = classification()
    matrix = data["plots"][0]["matrix"]

    section = render_plots(data["plots"] + regression()["plots"])

    for chart_id in ("chart-confusion", "chart-roc", "chart-segment-2", "chart-residuals"):
        assert f'<div class="chart" id="{chart_id}"></div>' in section
    assert "<tr><th>setosa</th>" + "".join(f"<td>{c}</td>" for c in matrix[0]) in section
    auc = data["plots"][1]["curves"][0]["auc"]
    assert f"<td>{pages._number(auc)}</td>" in section
    assert "<th>Champion v1</th>" in section
    assert "<th>station</th><th>Rows</th><th>MAE</th>" in section
    assert "120 holdout rows" in section
    assert 'href="/objects/runs/x/report.html"' in section


def test_a_run_without_plots_says_so_and_keeps_the_report_link() -> None:
    section = render_plots([], "No plots recorded for this run")
    failed = render_plots([{"kind": "roc", "error": "only one class in the holdout"}])

    assert "No plots recorded for this run" in section
    assert 'href="/objects/runs/x/report.html"' in section
    assert "ROC, one class against the rest: not computed by the evaluator: only one" in failed
    assert 'class="chart"' not in failed


def test_a_drift_histogram_sets_each_bins_reference_share_beside_the_served_one() -> None:
    from mlpipe_console.charts import histogram_chart

    feature = {
        "name": "petal_length",
        "bins": ["<1.6", "1.6-4.4", ">4.4"],
        "reference": [0.3, 0.4, 0.3],
        "current": [0.0, 0.1, 0.9],
    }

    spec = histogram_chart(feature)
    broken = histogram_chart({**feature, "current": [0.5]})

    assert spec is not None and broken is None
    values = {(v["rows"], v["bin"]): v["share"] for v in spec["data"]["values"]}
    assert values == {
        ("reference", "<1.6"): 0.3,
        ("reference", "1.6-4.4"): 0.4,
        ("reference", ">4.4"): 0.3,
        ("served", "<1.6"): 0.0,
        ("served", "1.6-4.4"): 0.1,
        ("served", ">4.4"): 0.9,
    }
    assert spec["encoding"]["x"]["sort"] == {"field": "order"}  # the bins in their order
    assert histogram_chart({"name": "x"}) is None
