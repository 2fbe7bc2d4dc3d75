"""A loaded model version, and scoring rows with it (the predictor's online and in-process
batch scoring, and the batch job, mlpipe_batch, share it).

ONNX under onnxruntime when the deployer verified one, else the scikit-learn pipeline. Either
way every artifact's sha256 is checked against the registry before it is parsed, and the
scikit-learn pickle is never opened unless it matched.

Batch rows are checked against the version's input schema before they are scored: a feature
column missing from the input fails the whole input (`missing_column`); a row with a value of
the wrong type, or without a value the model cannot impute, is a bad row with its reason
(`check_rows`). onnxruntime is imported only where a session is made: the library's `ml`
extra does not carry it; the services and the job that score with ONNX do.
"""

from __future__ import annotations

import importlib
import io
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from mlpipe.ml.model_inputs import (
    CATEGORICAL,
    Feature,
    InvalidInstances,
    columns,
    frame,
    onnx_feed,
    onnx_feed_from_frame,
    schema_from_bundle,
    schema_from_json,
)
from mlpipe.ml.validation import require_columns
from mlpipe.store.registry import ONNX_FILE, Registry

log = logging.getLogger(__name__)

ONNX = "onnx"
SKLEARN = "sklearn"


class NoProbabilities(InvalidInstances):
    """Probabilities were asked of a model that has none."""


@dataclass
class LoadedModel:
    name: str
    version: int
    run_id: str
    sha256: str
    runtime: str
    task: str
    schema: list[Feature]
    classes: list[Any]
    session: Any = None  # onnxruntime.InferenceSession
    estimator: Any = None  # the scikit-learn pipeline
    note: str = ""
    outputs: list[str] = field(default_factory=list)

    @property
    def has_probabilities(self) -> bool:
        if self.runtime == ONNX:
            return len(self.outputs) > 1
        return hasattr(self.estimator, "predict_proba")

    def predict(self, instances: Any, probabilities: bool = False) -> list[Any]:
        """Predictions for the request's instances (validated here; InvalidInstances if not).

        With `probabilities`, each prediction is {"label", "classes", "scores"} (the shape of
        Vertex AI's tabular classification predictions, plus the label).
        """
        if probabilities and not self.has_probabilities:
            raise NoProbabilities(
                f"{self.name} v{self.version} is a {self.task} model: it has no probabilities"
            )
        cols = columns(instances, self.schema)
        if self.runtime == ONNX:
            fetch = self.outputs if probabilities else self.outputs[:1]
            out = self.session.run(fetch, onnx_feed(cols, self.schema))
            labels = np.asarray(out[0]).ravel().tolist()
            scores = out[1] if probabilities else None
        else:
            x = frame(cols, self.schema)
            labels = np.asarray(self.estimator.predict(x)).ravel().tolist()
            scores = self.estimator.predict_proba(x) if probabilities else None
        if scores is None:
            return labels
        classes = self.classes
        return [
            {"label": label, "classes": classes, "scores": [float(s) for s in row]}
            for label, row in zip(labels, np.asarray(scores).tolist(), strict=True)
        ]

    def predict_frame(self, rows: pd.DataFrame) -> list[Any]:
        """Labels or values for a frame of already-checked rows (batch scoring)."""
        if self.runtime == ONNX:
            out = self.session.run(self.outputs[:1], onnx_feed_from_frame(rows, self.schema))
            return np.asarray(out[0]).ravel().tolist()
        return np.asarray(self.estimator.predict(rows[[f.name for f in self.schema]])).tolist()

    def example(self) -> list[Any]:
        """One valid instance (used to warm a version up before it takes traffic)."""
        return [
            (f.fill or "") if f.kind == CATEGORICAL else (None if f.nullable else 0.0)
            for f in self.schema
        ]


def warm_up() -> None:
    """Import both runtimes at start-up, not on the first deployment's request path."""
    for module in ("joblib", "onnxruntime", "sklearn.ensemble", "sklearn.pipeline"):
        importlib.import_module(module)


def onnx_session(data: bytes, threads: int) -> Any:
    import onnxruntime as ort  # type: ignore[import-untyped]

    options = ort.SessionOptions()
    # One thread per session: requests are small and the service's CPUs are few; parallelism
    # comes from instances, not from splitting a row's trees across threads.
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def load_version(registry: Registry, model: str, version: int, threads: int = 1) -> LoadedModel:
    """Load `model` v`version`; raise ValueError when an artifact does not match its sha256."""
    mv = registry.get(model, version)
    if mv is None:
        raise FileNotFoundError(f"{model} version {version} is not in the registry")
    info = mv.info
    loaded = LoadedModel(
        name=model,
        version=version,
        run_id=mv.run_id,
        sha256=mv.model_sha256,
        runtime=SKLEARN,
        task=str(info.get("task") or "classification"),
        schema=[],
        classes=list(info.get("classes", [])),
        note=str(info.get("runtime_note", "")),
    )
    if info.get("runtime") == ONNX and mv.artifact(ONNX_FILE) and info.get("input_schema"):
        data = registry.load_artifact(mv, ONNX_FILE)  # raises unless the sha256 matches
        loaded.session = onnx_session(data, threads)
        loaded.runtime = ONNX
        loaded.schema = schema_from_json(info["input_schema"])
        loaded.outputs = [o.name for o in loaded.session.get_outputs()]
    else:
        import joblib

        artifact = registry.load_artifact(mv)  # raises unless the sha256 matches: no unpickling
        bundle = joblib.load(io.BytesIO(artifact))
        loaded.estimator = bundle["estimator"]
        loaded.schema = (
            schema_from_json(info["input_schema"])
            if info.get("input_schema")
            else schema_from_bundle(bundle)
        )
        loaded.task = str(info.get("task") or bundle.get("task") or "classification")
        loaded.classes = list(info.get("classes") or bundle.get("classes") or [])
    loaded.predict([loaded.example()])  # warm up before it takes traffic
    return loaded


# --- batch rows -----------------------------------------------------------------------------
def prediction_schema(task: str) -> dict[str, Any]:
    """The Avro record of one batch prediction (both the in-process scorer and the job)."""
    prediction: Any = "double" if task == "regression" else "string"
    return {
        "type": "record",
        "name": "Prediction",
        "namespace": "mlpipe.v1",
        "doc": "One input row's prediction by one model version.",
        "fields": [
            {"name": "key", "type": "string", "doc": "The input row's key column, or its number"},
            {"name": "prediction", "type": ["null", prediction], "default": None},
            {"name": "error", "type": ["null", "string"], "default": None},
            {"name": "model", "type": "string"},
            {"name": "model_version", "type": "long"},
        ],
    }


REJECTED_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "RejectedRow",
    "namespace": "mlpipe.v1",
    "doc": "An input row a batch job could not score, and why.",
    "fields": [
        {"name": "key", "type": "string", "doc": "The input row's key column, or its number"},
        {"name": "source", "type": "string", "doc": "The input file (gs://...)"},
        {"name": "row", "type": "long", "doc": "The data row in that file, counted from 1"},
        {"name": "reason", "type": "string"},
        {"name": "values", "type": "string", "doc": "The row's feature values as JSON"},
        {"name": "model", "type": "string"},
        {"name": "model_version", "type": "long"},
    ],
}


@dataclass
class CheckedRows:
    """A frame of input rows checked against a version's schema: `rows` holds the features
    (numbers coerced), `problems` each row's reason ("" when it can be scored)."""

    keys: list[str]
    rows: pd.DataFrame
    problems: np.ndarray
    raw: pd.DataFrame

    @property
    def ok(self) -> np.ndarray:
        return np.asarray(self.problems == "")


def check_rows(
    model: LoadedModel, chunk: pd.DataFrame, key_column: str, first_row: int, source: str
) -> CheckedRows:
    """Check `chunk` (data rows `first_row`.. of `source`, counted from 0) for `model`.

    A missing feature or key column raises `missing_column` naming `source`."""
    names = [f.name for f in model.schema]
    found = [str(c) for c in chunk.columns]
    require_columns(found, names, source, f"{model.name} v{model.version}")
    require_columns(found, [key_column] if key_column else [], source, "the key_column")
    keys = (
        chunk[key_column].astype(str).tolist()
        if key_column
        else [str(first_row + i) for i in range(len(chunk))]
    )
    rows = chunk[names].copy()
    problems = np.full(len(rows), "", dtype=object)
    for feature in model.schema:
        values = rows[feature.name]
        if feature.kind != CATEGORICAL:
            numeric = pd.to_numeric(values, errors="coerce")
            bad = (numeric.isna() & values.notna()).to_numpy()
            problems[bad & (problems == "")] = f"{feature.name} is not a number"
            rows[feature.name] = numeric
            values = numeric
        absent = values.isna().to_numpy()
        if not feature.nullable:
            problems[absent & (problems == "")] = f"{feature.name} is missing"
    return CheckedRows(keys, rows, problems, chunk[names])


def score_checked(model: LoadedModel, checked: CheckedRows) -> list[Any]:
    """Each row's prediction (None for a bad row): floats for regression, else labels."""
    ok = checked.ok
    predictions: list[Any] = [None] * len(checked.rows)
    if ok.any():
        scored = model.predict_frame(checked.rows[ok])
        for position, value in zip(np.flatnonzero(ok), scored, strict=True):
            predictions[position] = float(value) if model.task == "regression" else str(value)
    return predictions
