"""Compile a trained pipeline to ONNX and prove it agrees with scikit-learn before it is used.

The check runs the ONNX model (under onnxruntime, as the predictor will) and the pipeline on
the run's holdout rows, plus probe rows the holdout may lack: a missing value in every
column the pipeline imputes and an unseen category in every categorical column. Any
disagreement, or any converter failure, keeps the model on scikit-learn, and the reason goes
into the DeploymentCompleted event.
"""

from __future__ import annotations

import copy
import importlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from mlpipe.ml.model_inputs import CATEGORICAL, Feature, onnx_feed_from_frame, schema_from_bundle

log = logging.getLogger(__name__)

ONNX = "onnx"
SKLEARN = "sklearn"
# Tolerances against scikit-learn (ONNX trees compare in float32): class labels must be equal.
PROBA_ATOL = 1e-4
REGRESSION_RTOL = 1e-4
UNSEEN = "__mlpipe_unseen_category__"
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}


@dataclass
class Compiled:
    runtime: str  # ONNX or SKLEARN
    note: str
    schema: list[Feature]
    onnx: bytes | None = None
    checked_rows: int = 0
    details: dict[str, Any] = field(default_factory=dict)


def _convertible(estimator: Any) -> Any:
    """A copy of the fitted pipeline without the categorical imputers (the predictor puts the
    imputer's fitted value in place of a missing category: ONNX strings cannot be missing)."""
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline

    clone = copy.deepcopy(estimator)
    if not isinstance(clone, Pipeline):
        return clone
    columns = clone.steps[0][1]
    rewritten = []
    for name, transformer, cols in getattr(columns, "transformers_", []):
        if (
            name == CATEGORICAL
            and isinstance(transformer, Pipeline)
            and isinstance(transformer.steps[0][1], SimpleImputer)
            and len(transformer.steps) > 1
        ):
            transformer = Pipeline(transformer.steps[1:])
        rewritten.append((name, transformer, cols))
    if rewritten:
        columns.transformers_ = rewritten
    return clone


def probe_rows(holdout: pd.DataFrame, schema: list[Feature]) -> pd.DataFrame:
    """The holdout's feature columns plus a row per imputed column with that value missing,
    and a row per categorical column with a category the model never saw."""
    rows = holdout[[f.name for f in schema]].reset_index(drop=True)
    if rows.empty:
        return rows
    probes = []
    for feature in schema:
        if feature.nullable:
            probe = rows.iloc[[0]].copy()
            probe[feature.name] = math.nan
            probes.append(probe)
        if feature.kind == CATEGORICAL:
            probe = rows.iloc[[0]].copy()
            probe[feature.name] = UNSEEN
            probes.append(probe)
    return pd.concat([rows, *probes], ignore_index=True)


def _convert(estimator: Any, schema: list[Feature], task: str) -> bytes:
    from skl2onnx import convert_sklearn  # type: ignore[import-untyped]
    from skl2onnx.common.data_types import (  # type: ignore[import-untyped]
        FloatTensorType,
        StringTensorType,
    )

    model = _convertible(estimator)
    initial_types = [
        (
            f.name,
            StringTensorType([None, 1]) if f.kind == CATEGORICAL else FloatTensorType([None, 1]),
        )
        for f in schema
    ]
    final = model.steps[-1][1] if hasattr(model, "steps") else model
    # A probabilities tensor, not a list of maps: cheaper to run and to read.
    options = {id(final): {"zipmap": False}} if task == "classification" else None
    onx = convert_sklearn(
        model, initial_types=initial_types, options=options, target_opset=TARGET_OPSET
    )
    return bytes(onx.SerializeToString())


def warm_up() -> Compiled:
    """Compile and check a tiny pipeline at start-up: the first conversion in a process costs
    about 0.7 s (converter registration, first sessions), which would otherwise be paid by the
    first deployment."""
    for module in ("onnxruntime", "skl2onnx", "skl2onnx.common.data_types"):
        importlib.import_module(module)
    from mlpipe.ml.modeling import warm_up_model

    bundle, holdout, _ = warm_up_model()
    return compile_model(bundle, holdout)


def session(onnx_bytes: bytes, threads: int = 1) -> Any:
    import onnxruntime as ort  # type: ignore[import-untyped]

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


def compare(
    bundle: dict[str, Any], onnx_bytes: bytes, rows: pd.DataFrame, schema: list[Feature]
) -> tuple[bool, str, dict[str, Any]]:
    """Score `rows` with both; (agree, what was found, numbers)."""
    estimator = bundle["estimator"]
    task = str(bundle.get("task", "classification"))
    outputs = session(onnx_bytes).run(None, onnx_feed_from_frame(rows, schema))
    expected = estimator.predict(rows)
    got = np.asarray(outputs[0]).ravel()
    if task == "regression":
        diff = np.abs(got.astype(float) - np.asarray(expected, dtype=float))
        scale = np.maximum(1.0, np.abs(np.asarray(expected, dtype=float)))
        worst = float(np.max(diff / scale))
        ok = worst <= REGRESSION_RTOL
        return (
            ok,
            f"max relative difference {worst:.2e} (limit {REGRESSION_RTOL:g})",
            {"max_relative_difference": worst},
        )
    labels_differ = int(np.sum(got.astype(str) != np.asarray(expected).astype(str)))
    details: dict[str, Any] = {"labels_differ": labels_differ}
    note = f"{labels_differ} label(s) differ"
    if len(outputs) > 1 and hasattr(estimator, "predict_proba"):
        proba_diff = float(np.max(np.abs(outputs[1] - estimator.predict_proba(rows))))
        details["max_probability_difference"] = proba_diff
        note += f", max probability difference {proba_diff:.2e} (limit {PROBA_ATOL:g})"
        if proba_diff > PROBA_ATOL:
            return False, note, details
    return labels_differ == 0, note, details


def _describe(exc: Exception) -> str:
    """The exception's type and the start of its first line: converter messages can carry
    whole tree ensembles (megabytes) that belong in no event and no log line."""
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__


def compile_model(bundle: dict[str, Any], holdout: pd.DataFrame) -> Compiled:
    """ONNX when it converts and agrees on the holdout (and probes), else scikit-learn."""
    schema = schema_from_bundle(bundle)
    rows = probe_rows(holdout, schema)
    if rows.empty:
        return Compiled(SKLEARN, "no holdout rows to check an ONNX model against", schema)
    task = str(bundle.get("task", "classification"))
    try:
        onnx_bytes = _convert(bundle["estimator"], schema, task)
    except Exception as exc:  # skl2onnx raises many kinds; any of them means "not convertible"
        note = f"skl2onnx could not convert it ({_describe(exc)})"
        log.warning("serving with scikit-learn: %s", note)
        return Compiled(SKLEARN, note, schema)
    try:
        agree, found, details = compare(bundle, onnx_bytes, rows, schema)
    except Exception as exc:
        note = f"onnxruntime failed on the holdout ({_describe(exc)})"
        log.warning("serving with scikit-learn: %s", note)
        return Compiled(SKLEARN, note, schema)
    checked = f"checked on {len(holdout)} holdout row(s) + {len(rows) - len(holdout)} probe(s)"
    if not agree:
        return Compiled(
            SKLEARN,
            f"ONNX disagrees with scikit-learn: {found}; {checked}",
            schema,
            None,
            len(rows),
            details,
        )
    return Compiled(
        ONNX,
        f"ONNX agrees with scikit-learn: {found}; {checked}",
        schema,
        onnx_bytes,
        len(rows),
        details,
    )
