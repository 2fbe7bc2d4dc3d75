"""A served model's input schema, request validation, and the arrays each runtime is fed.

The deployer derives the schema from the fitted pipeline once and records it with the registry
version; the predictor validates requests against it without unpickling anything, and feeds
the ONNX runtime exactly the way the deployer fed it when it checked ONNX against
scikit-learn. Both sides use these functions, so what was checked is what is served.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

NUMERIC = "numeric"
CATEGORICAL = "categorical"


class InvalidInstances(ValueError):
    """The request's instances cannot be scored; the message says why."""


@dataclass(frozen=True)
class Feature:
    name: str
    kind: str  # NUMERIC or CATEGORICAL
    # A missing value (JSON null) is accepted only where the pipeline imputes it.
    nullable: bool = False
    # Categorical: the value the fitted imputer puts in place of a missing one. ONNX string
    # tensors cannot hold a missing value, so the predictor substitutes it before the model.
    fill: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def schema_from_json(items: list[dict[str, Any]]) -> list[Feature]:
    return [
        Feature(
            str(i["name"]),
            str(i.get("kind", NUMERIC)),
            bool(i.get("nullable", False)),
            None if i.get("fill") is None else str(i["fill"]),
        )
        for i in items
    ]


def _imputed_columns(estimator: Any) -> dict[str, Any]:
    """Columns a fitted mlpipe pipeline imputes → the imputer's fitted value for each."""
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline

    found: dict[str, Any] = {}
    steps = estimator.steps if isinstance(estimator, Pipeline) else []
    columns = steps[0][1] if steps else None
    for _name, transformer, cols in getattr(columns, "transformers_", []):
        branch = transformer.steps if isinstance(transformer, Pipeline) else [("", transformer)]
        imputers = [t for _, t in branch if isinstance(t, SimpleImputer)]
        if not imputers or not isinstance(cols, list | tuple):
            continue
        for col, value in zip(cols, imputers[0].statistics_, strict=False):
            found[str(col)] = value
    return found


def schema_from_bundle(bundle: dict[str, Any]) -> list[Feature]:
    """The input schema of a training bundle (joblib dict: estimator, features, ...)."""
    kinds = bundle.get("feature_types") or {}
    imputed = _imputed_columns(bundle["estimator"])
    schema = []
    for name in bundle["features"]:
        kind = CATEGORICAL if kinds.get(name) == CATEGORICAL else NUMERIC
        fill = str(imputed[name]) if kind == CATEGORICAL and name in imputed else None
        schema.append(Feature(name, kind, name in imputed, fill))
    return schema


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def columns(instances: Any, schema: list[Feature]) -> dict[str, list[Any]]:
    """Validate `instances` (lists in feature order, or objects by feature name) and return
    one list per feature; a missing value is None. Raise InvalidInstances naming the problem.
    """
    if not isinstance(instances, list) or not instances:
        raise InvalidInstances("'instances' must be a non-empty list")
    names = [f.name for f in schema]
    n = len(schema)
    out: dict[str, list[Any]] = {name: [] for name in names}
    for i, inst in enumerate(instances):
        if isinstance(inst, list):
            if len(inst) != n:
                raise InvalidInstances(
                    f"instance {i} has {len(inst)} values; the model takes {n}: {names}"
                )
            row = inst
        elif isinstance(inst, dict):
            missing = [name for name in names if name not in inst]
            if missing:
                raise InvalidInstances(f"instance {i} lacks feature(s) {missing}")
            row = [inst[name] for name in names]
        else:
            raise InvalidInstances(
                f"instance {i} must be a list of {n} values or an object keyed by feature name"
            )
        for feature, value in zip(schema, row, strict=True):
            if value is None:
                if not feature.nullable:
                    raise InvalidInstances(
                        f"instance {i}: feature {feature.name!r} is required (null given)"
                    )
            elif feature.kind == CATEGORICAL:
                if not isinstance(value, str):
                    raise InvalidInstances(
                        f"instance {i}: feature {feature.name!r} must be a string, got {value!r}"
                    )
            elif not _number(value):
                raise InvalidInstances(
                    f"instance {i}: feature {feature.name!r} must be a finite number, got {value!r}"
                )
            out[feature.name].append(value)
    return out


def onnx_feed(cols: dict[str, list[Any]], schema: list[Feature]) -> dict[str, np.ndarray]:
    """The ONNX model's inputs: one (n, 1) tensor per feature, float32 or string."""
    feed = {}
    for feature in schema:
        values = cols[feature.name]
        if feature.kind == CATEGORICAL:
            filled = [feature.fill if v is None else v for v in values]
            feed[feature.name] = np.array(filled, dtype=object).reshape(-1, 1)
        else:
            feed[feature.name] = np.array(
                [math.nan if v is None else v for v in values], dtype=np.float32
            ).reshape(-1, 1)
    return feed


def onnx_feed_from_frame(frame: pd.DataFrame, schema: list[Feature]) -> dict[str, np.ndarray]:
    """The same inputs from a frame (batch scoring, and the deployer's holdout check)."""
    feed = {}
    for feature in schema:
        series = frame[feature.name]
        if feature.kind == CATEGORICAL:
            filled = series.astype(object).where(series.notna(), feature.fill)
            feed[feature.name] = filled.to_numpy(dtype=object).reshape(-1, 1)
        else:
            feed[feature.name] = (
                pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float32).reshape(-1, 1)
            )
    return feed


def frame(cols: dict[str, list[Any]], schema: list[Feature]) -> pd.DataFrame:
    """The scikit-learn pipeline's input: a frame with the training columns and dtypes."""
    data: dict[str, Any] = {}
    for feature in schema:
        values = cols[feature.name]
        if feature.kind == CATEGORICAL:
            # NaN, not None: scikit-learn's imputers recognise NaN as missing in object columns.
            data[feature.name] = pd.Series(
                [math.nan if v is None else v for v in values], dtype=object
            )
        else:
            data[feature.name] = np.array(
                [math.nan if v is None else v for v in values], dtype=float
            )
    return pd.DataFrame(data, columns=[f.name for f in schema])
