"""A loaded model version: ONNX under onnxruntime when the deployer verified one, else the
scikit-learn pipeline. Either way every artifact's sha256 is checked against the registry
before it is parsed, and the scikit-learn pickle is never opened unless it matched.
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
