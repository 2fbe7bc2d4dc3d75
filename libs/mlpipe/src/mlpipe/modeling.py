"""Building the configured scikit-learn model: preprocessing from the column types, then the
estimator named by import path."""

from __future__ import annotations

import importlib
from typing import Any

from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, StandardScaler

from mlpipe.config import ModelSpec, PipelineConfig
from mlpipe.errors import PermanentError


def build_estimator(spec: ModelSpec) -> Any:
    module_name, _, class_name = spec.estimator.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise PermanentError("invalid_estimator", f"cannot import {spec.estimator}: {exc}") from exc
    try:
        return cls(**spec.params)
    except TypeError as exc:
        raise PermanentError(
            "invalid_estimator", f"{spec.estimator} rejects params {spec.params}: {exc}"
        ) from exc


def build_pipeline(config: PipelineConfig, features: list[str]) -> Pipeline:
    """Preprocessing from the column types, then the configured estimator."""
    prep = config.model.preprocessing
    numeric = [c for c in features if config.dataset.column_type(c) == "numeric"]
    categorical = [c for c in features if config.dataset.column_type(c) == "categorical"]
    numeric_steps: list[tuple[str, Any]] = []
    if prep.impute != "none":
        numeric_steps.append(("impute", SimpleImputer(strategy=prep.impute)))
    if prep.scale:
        numeric_steps.append(("scale", StandardScaler()))
    transformers: list[tuple[str, Any, list[str]]] = []
    if numeric:
        numeric_step = Pipeline(numeric_steps) if numeric_steps else "passthrough"
        transformers.append(("numeric", numeric_step, numeric))
    if categorical:
        encoder: Any = (
            OneHotEncoder(handle_unknown="ignore", sparse_output=False)
            if prep.one_hot
            else OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=-1)
        )
        steps = [("impute", SimpleImputer(strategy="most_frequent")), ("encode", encoder)]
        transformers.append(("categorical", Pipeline(steps), categorical))
    columns = ColumnTransformer(transformers, remainder="drop", verbose_feature_names_out=False)
    return Pipeline([("preprocess", columns), ("model", build_estimator(config.model))])
