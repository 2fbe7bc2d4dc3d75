"""ONNX is used only when it converts and agrees with scikit-learn on the holdout and probes."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd
import pytest

from mlpipe.ml.model_inputs import Feature
from mlpipe_deployer import onnx_compile
from mlpipe_deployer.onnx_compile import compile_model, probe_rows
from tests.unit.test_predictor_api import fitted, loaded

warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="module")
def iris() -> tuple[dict[str, Any], pd.DataFrame]:
    return fitted("iris", n_estimators=10, random_state=0, n_jobs=1)


def test_a_random_forest_compiles_and_agrees_on_every_holdout_row(
    iris: tuple[dict[str, Any], pd.DataFrame],
) -> None:
    bundle, holdout = iris

    compiled = compile_model(bundle, holdout)
    served = loaded(bundle, holdout, "iris")

    assert compiled.runtime == "onnx" and compiled.onnx
    assert compiled.note.startswith("ONNX agrees with scikit-learn: 0 label(s) differ")
    assert compiled.checked_rows == len(holdout) + 4  # one missing value per imputed column
    assert served.runtime == "onnx"
    features = holdout[bundle["features"]]
    assert served.predict_frame(features) == bundle["estimator"].predict(features).tolist()


def test_onnx_that_disagrees_is_not_used_and_the_note_says_by_how_much(
    iris: tuple[dict[str, Any], pd.DataFrame], monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle, holdout = iris
    other, _ = fitted("iris", n_estimators=3, max_depth=1, random_state=1, n_jobs=1)
    convert = onnx_compile._convert
    monkeypatch.setattr(
        onnx_compile,
        "_convert",
        lambda est, schema, task: convert(other["estimator"], schema, task),
    )

    compiled = compile_model(bundle, holdout)

    assert compiled.runtime == "sklearn" and compiled.onnx is None
    assert compiled.note.startswith("ONNX disagrees with scikit-learn: ")
    assert compiled.details["labels_differ"] > 0


def test_a_model_the_converter_refuses_stays_on_sklearn_with_the_reason(
    iris: tuple[dict[str, Any], pd.DataFrame], monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle, holdout = iris

    def refuse(*_: Any) -> bytes:
        raise RuntimeError("Unable to find a shape calculator for type MyEstimator")

    monkeypatch.setattr(onnx_compile, "_convert", refuse)

    compiled = compile_model(bundle, holdout)

    assert compiled.runtime == "sklearn"
    assert compiled.note == (
        "skl2onnx could not convert it (RuntimeError: "
        "Unable to find a shape calculator for type MyEstimator)"
    )


def test_without_holdout_rows_nothing_can_be_checked(
    iris: tuple[dict[str, Any], pd.DataFrame],
) -> None:
    bundle, holdout = iris

    compiled = compile_model(bundle, holdout.iloc[:0])

    assert compiled.runtime == "sklearn"
    assert compiled.note == "no holdout rows to check an ONNX model against"


def test_probes_add_a_missing_value_and_an_unseen_category() -> None:
    holdout = pd.DataFrame({"a": [1.0, 2.0], "region": ["north", "south"], "y": [0, 1]})
    schema = [Feature("a", "numeric", nullable=True), Feature("region", "categorical", True, "n")]

    rows = probe_rows(holdout, schema)

    assert list(rows.columns) == ["a", "region"]
    assert len(rows) == 2 + 1 + 2
    assert np.isnan(rows["a"].iloc[2])
    assert rows["region"].isna().iloc[3]
    assert rows["region"].iloc[4] == onnx_compile.UNSEEN


def test_the_bikeshare_regressor_gets_a_short_verdict_either_way() -> None:
    # skl2onnx 1.20 fails on this HistGradientBoosting model under scikit-learn 1.9 with an
    # error message that embeds the whole ensemble (megabytes): the note stays one short line.
    bundle, holdout = fitted("bikeshare", max_iter=10, random_state=0)

    compiled = compile_model(bundle, holdout)

    assert len(compiled.note) < 400 and "\n" not in compiled.note
    if compiled.runtime == "sklearn":
        assert compiled.note.startswith("skl2onnx could not convert it (")
    else:
        assert compiled.note.startswith("ONNX agrees with scikit-learn")
