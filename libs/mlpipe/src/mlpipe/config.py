"""Pipeline configuration: one YAML file per pipeline, validated strictly.

A pipeline's config is stored at `pipelines/<name>/config.yaml` in the bucket; the trainer
reads it when that pipeline's dataset lands. Unknown keys, wrong types and missing fields
are errors that name the offending key.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mlpipe.errors import PermanentError
from mlpipe.storage import Storage

NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,62}$"


class ConfigError(ValueError):
    """The pipeline config is invalid; the message names each problem and its key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSpec(_Strict):
    target: str = Field(description="The column to predict.")
    features: list[str] | None = Field(
        default=None, description="Feature columns; all columns but the target when omitted."
    )
    min_rows: int = Field(default=10, ge=1)
    max_rows: int = Field(default=10_000_000, ge=1)


class SplitSpec(_Strict):
    holdout_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    seed: int = 42
    stratify: bool = True


class ModelSpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN, description="Registry name of the model.")
    task: Literal["classification", "regression"] = "classification"
    estimator: str = "sklearn.ensemble.RandomForestClassifier"
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("estimator")
    @classmethod
    def _sklearn_only(cls, value: str) -> str:
        if not re.fullmatch(r"sklearn(\.[A-Za-z_][A-Za-z0-9_]*)+", value):
            raise ValueError(
                f"estimator must be an import path inside scikit-learn "
                f"(e.g. sklearn.ensemble.RandomForestClassifier), got {value!r}"
            )
        return value


class GatesSpec(_Strict):
    """Absolute quality gates; an unset gate is not checked."""

    min_accuracy: float | None = Field(default=None, ge=0, le=1)
    min_macro_f1: float | None = Field(default=None, ge=0, le=1)
    min_per_class_f1: float | None = Field(default=None, ge=0, le=1)
    max_rmse: float | None = Field(default=None, ge=0)
    min_r2: float | None = Field(default=None, le=1)


class PipelineConfig(_Strict):
    name: str = Field(pattern=NAME_PATTERN, description="Pipeline and dataset name.")
    dataset: DatasetSpec
    split: SplitSpec = SplitSpec()
    model: ModelSpec
    gates: GatesSpec = GatesSpec()

    def canonical_json(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()

    def sha256(self) -> str:
        return hashlib.sha256(self.canonical_json()).hexdigest()

    def feature_columns(self, columns: list[str]) -> list[str]:
        if self.dataset.features is not None:
            return list(self.dataset.features)
        return [c for c in columns if c != self.dataset.target]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key")
        elif err["type"] == "missing":
            lines.append(f"{where}: required field missing")
        else:
            lines.append(f"{where}: {err['msg']}")
    return "; ".join(lines)


def parse_config(text: str | bytes, source: str = "config") -> PipelineConfig:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from exc


def config_path(pipeline: str) -> str:
    return f"pipelines/{pipeline}/config.yaml"


def load_pipeline_config(storage: Storage, name: str) -> PipelineConfig:
    """The registered config of pipeline `name`; a missing or invalid one is permanent."""
    found = storage.read(config_path(name))
    if found is None:
        raise PermanentError(
            "unknown_pipeline",
            f"no pipeline config at {storage.uri(config_path(name))}; "
            f"register one with `mlpipe pipeline apply`",
        )
    try:
        return parse_config(found.data, source=found.uri)
    except ConfigError as exc:
        raise PermanentError("invalid_config", str(exc)) from exc


def load_run_config(storage: Storage, run_id: str) -> PipelineConfig:
    """The config snapshot a run was started with (`runs/<run_id>/config.json`)."""
    found = storage.read(f"runs/{run_id}/config.json")
    if found is None:
        raise PermanentError("missing_run_config", f"run {run_id} has no config snapshot")
    try:
        return parse_config(found.data, source=found.uri)
    except ConfigError as exc:
        raise PermanentError("invalid_config", str(exc)) from exc
