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
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mlpipe.errors import PermanentError
from mlpipe.store import layout
from mlpipe.store.storage import Storage

NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,62}$"


class ConfigError(ValueError):
    """The pipeline config is invalid; the message names each problem and its key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


ColumnType = Literal["numeric", "categorical", "datetime"]


class DatasetSpec(_Strict):
    target: str = Field(description="The column to predict.")
    features: list[str] | None = Field(
        default=None,
        description="Feature columns; when omitted, every column but the target, the "
        "excluded ones and datetime columns.",
    )
    exclude: list[str] = Field(default_factory=list, description="Columns never used.")
    columns: dict[str, ColumnType] = Field(
        default_factory=dict,
        description="Column types; undeclared columns are numeric.",
    )
    min_rows: int = Field(default=10, ge=1)
    max_rows: int = Field(default=10_000_000, ge=1)
    key: list[str] = Field(
        default_factory=list,
        description="Primary-key columns: rows repeating a key are rejected. Empty: no key.",
    )
    required_non_null: list[str] = Field(
        default_factory=list,
        description="Columns that must have a value in every row (the target always must).",
    )

    def column_type(self, column: str) -> ColumnType:
        return self.columns.get(column, "numeric")


class SplitSpec(_Strict):
    strategy: Literal["random", "time"] = "random"
    holdout_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    seed: int = 42
    stratify: bool = True
    time_column: str | None = Field(
        default=None, description="For strategy=time: the timestamp column to split on."
    )
    cutoff: str | None = Field(
        default=None,
        description="For strategy=time: rows at or after this ISO time are the holdout; "
        "when omitted, the latest holdout_fraction of rows.",
    )

    @model_validator(mode="after")
    def _time_needs_column(self) -> SplitSpec:
        if self.strategy == "time" and not self.time_column:
            raise ValueError("split.strategy 'time' needs split.time_column")
        return self


class PreprocessingSpec(_Strict):
    impute: Literal["median", "mean", "most_frequent", "none"] = "median"
    scale: bool = False
    one_hot: bool = True


class ModelSpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN, description="Registry name of the model.")
    task: Literal["classification", "regression"] = "classification"
    estimator: str = "sklearn.ensemble.RandomForestClassifier"
    params: dict[str, Any] = Field(default_factory=dict)
    preprocessing: PreprocessingSpec = PreprocessingSpec()

    @field_validator("estimator")
    @classmethod
    def _sklearn_only(cls, value: str) -> str:
        if not re.fullmatch(r"sklearn(\.[A-Za-z_][A-Za-z0-9_]*)+", value):
            raise ValueError(
                f"estimator must be an import path inside scikit-learn "
                f"(e.g. sklearn.ensemble.RandomForestClassifier), got {value!r}"
            )
        return value


class VertexTrainingSpec(_Strict):
    region: str = "us-central1"
    machine_type: str = "n1-standard-4"
    accelerator_type: str | None = Field(default=None, description="e.g. NVIDIA_TESLA_T4")
    accelerator_count: int = Field(default=0, ge=0)
    service_account: str | None = None

    @model_validator(mode="after")
    def _accelerators_pair(self) -> VertexTrainingSpec:
        if bool(self.accelerator_type) != (self.accelerator_count > 0):
            raise ValueError("accelerator_type and accelerator_count > 0 go together")
        return self


class TrainingSpec(_Strict):
    backend: Literal["local", "vertex"] = "local"
    vertex: VertexTrainingSpec = VertexTrainingSpec()


class RelativeGate(_Strict):
    """The challenger may not be worse than the champion by more than `max_degradation`."""

    metric: str = Field(description="accuracy, macro_f1, weighted_f1, rmse, mae or r2")
    max_degradation: float = Field(default=0.0, ge=0)

    @field_validator("metric")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in HIGHER_IS_BETTER | LOWER_IS_BETTER:
            known = sorted(HIGHER_IS_BETTER | LOWER_IS_BETTER)
            raise ValueError(f"unknown metric {value!r}; one of {known}")
        return value


HIGHER_IS_BETTER = frozenset({"accuracy", "macro_f1", "weighted_f1", "r2", "roc_auc"})
LOWER_IS_BETTER = frozenset({"rmse", "mae"})


class GatesSpec(_Strict):
    """Quality gates; an unset gate is not checked. Relative gates need a champion."""

    min_accuracy: float | None = Field(default=None, ge=0, le=1)
    min_macro_f1: float | None = Field(default=None, ge=0, le=1)
    min_per_class_f1: float | None = Field(default=None, ge=0, le=1)
    max_rmse: float | None = Field(default=None, ge=0)
    max_mae: float | None = Field(default=None, ge=0)
    min_r2: float | None = Field(default=None, le=1)
    relative: list[RelativeGate] = Field(default_factory=list)


class RetrainSpec(_Strict):
    """Retraining when drift is detected, and the guard against retraining loops."""

    enabled: bool = False
    labels_prefix: str | None = Field(
        default=None,
        description="Object prefix in the bucket (e.g. labels/bikeshare/) of CSV files of "
        "recent labelled rows (the dataset's columns, target included). A retrain lands the "
        "original dataset plus these rows; without them it would land the same bytes again.",
    )
    cooldown_minutes: int = Field(
        default=60, ge=1, description="At most one drift retrain per period of this length."
    )
    max_per_window: int = Field(default=3, ge=1)
    window_hours: int = Field(default=24, ge=1)


class MonitoringSpec(_Strict):
    """Drift checks of the served champion: recent served inputs against its training rows."""

    window_hours: float = Field(default=24.0, gt=0, description="Served inputs this recent.")
    min_samples: int = Field(
        default=100, ge=10, description="Fewer served rows than this: no verdict."
    )
    bins: int = Field(default=10, ge=2, le=100, description="Quantile bins for numeric PSI.")
    psi_threshold: float = Field(default=0.2, gt=0)
    ks_pvalue: float = Field(default=0.01, gt=0, lt=1)
    ks_statistic: float = Field(
        default=0.1,
        gt=0,
        le=1,
        description="A KS test flags drift only when p < ks_pvalue and the statistic is at "
        "least this (large samples make tiny, harmless shifts significant).",
    )
    prediction_psi_threshold: float = Field(default=0.2, gt=0)
    retrain: RetrainSpec = RetrainSpec()


CalendarPart = Literal["hour", "weekday", "day", "month", "day_of_year", "is_weekend"]


class ScoringSpec(_Strict):
    """After a new champion is served, score the next days for every entity.

    The rows are made from the latest landed dataset only: every entity seen in it x each time
    step of the next `horizon_days` days (from the day after its latest row); `calendar`
    features are computed from each row's time; `last_known` features are the entity's latest
    value at the same time of day (a persistence forecast: nothing is invented). Every feature
    must come from one of the three."""

    horizon_days: int = Field(ge=1, le=31, description="Days scored after the latest landed row.")
    entity: list[str] = Field(
        min_length=1,
        description="Columns naming one scored entity (e.g. station and its kind): every "
        "combination seen in the latest landed dataset is scored.",
    )
    time_column: str | None = Field(
        default=None,
        description="The timestamp column the rows are made along; default split.time_column.",
    )
    step_hours: int = Field(
        default=24, ge=1, le=24, description="Hours between two scored rows of an entity."
    )
    calendar: dict[str, CalendarPart] = Field(
        default_factory=dict,
        description="Feature column → the part of the row's time it is (hour, weekday with "
        "Monday 0, day, month, day_of_year, is_weekend).",
    )
    last_known: list[str] = Field(
        default_factory=list,
        description="Feature columns taken from the entity's latest row at the same time of day.",
    )

    @field_validator("step_hours")
    @classmethod
    def _divides_a_day(cls, value: int) -> int:
        if 24 % value:
            raise ValueError(f"must divide 24, got {value}")
        return value

    def columns(self) -> dict[str, str]:
        """Each column the section names → the field naming it (`scoring.entity[0]`, ...)."""
        named: dict[str, str] = {}
        for i, column in enumerate(self.entity):
            named.setdefault(column, f"scoring.entity[{i}]")
        for column in self.calendar:
            named.setdefault(column, f"scoring.calendar.{column}")
        for i, column in enumerate(self.last_known):
            named.setdefault(column, f"scoring.last_known[{i}]")
        return named


class PipelineConfig(_Strict):
    name: str = Field(pattern=NAME_PATTERN, description="Pipeline and dataset name.")
    dataset: DatasetSpec
    split: SplitSpec = SplitSpec()
    model: ModelSpec
    training: TrainingSpec = TrainingSpec()
    gates: GatesSpec = GatesSpec()
    monitoring: MonitoringSpec = MonitoringSpec()
    scoring: ScoringSpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        ds = self.dataset
        if self.scoring is not None:
            self._check_scoring(self.scoring)
        if ds.features is not None and ds.target in ds.features:
            raise ValueError(f"dataset.features includes the target {ds.target!r}")
        time_col = self.split.time_column
        if time_col and ds.columns.get(time_col, "datetime") != "datetime":
            raise ValueError(f"split.time_column {time_col!r} is declared {ds.columns[time_col]}")
        regression_gates = {"max_rmse", "max_mae", "min_r2"}
        classification_gates = {"min_accuracy", "min_macro_f1", "min_per_class_f1"}
        wrong = regression_gates if self.model.task == "classification" else classification_gates
        used = {g for g in wrong if getattr(self.gates, g) is not None}
        if used:
            raise ValueError(f"gates {sorted(used)} do not apply to {self.model.task}")
        return self

    def scoring_time_column(self) -> str:
        scoring = self.scoring
        return (scoring.time_column if scoring else None) or self.split.time_column or ""

    def _check_scoring(self, scoring: ScoringSpec) -> None:
        """What the config alone can tell: each column once, none the target, a datetime
        time column; with `dataset.features` listed, exactly the features covered. A column
        of the data that the config does not list is checked when the data lands
        (mlpipe.ml.validation.check_scoring_columns)."""
        ds = self.dataset
        time_col = self.scoring_time_column()
        if not time_col:
            raise ValueError("scoring needs scoring.time_column or split.time_column")
        if ds.columns.get(time_col) != "datetime":
            raise ValueError(f"scoring.time_column {time_col!r} must be declared datetime")
        seen: dict[str, str] = {}
        for field_name, columns in (
            ("entity", scoring.entity),
            ("calendar", list(scoring.calendar)),
            ("last_known", scoring.last_known),
        ):
            for i, column in enumerate(columns):
                where = (
                    f"scoring.{field_name}.{column}"
                    if field_name == "calendar"
                    else f"scoring.{field_name}[{i}]"
                )
                if column == ds.target:
                    raise ValueError(f"{where}: {column!r} is the target, not a feature")
                if column == time_col:
                    raise ValueError(f"{where}: {column!r} is the time column")
                if column in seen:
                    raise ValueError(f"{where}: {column!r} is already named by {seen[column]}")
                seen[column] = where
        if ds.features is not None:
            known = set(ds.features) | set(ds.columns) | set(ds.key)
            for column, where in seen.items():
                if column not in known:
                    raise ValueError(
                        f"{where}: column {column!r} is not in dataset.features "
                        f"{list(ds.features)} nor dataset.columns"
                    )
            uncovered = [f for f in ds.features if f not in seen]
            if uncovered:
                raise ValueError(
                    f"scoring: features {uncovered} are in none of scoring.entity, "
                    "scoring.calendar and scoring.last_known"
                )

    def canonical_json(self) -> bytes:
        dumped = self.model_dump(mode="json")
        # Fields added later are left out while unset, so existing configs keep their hash
        # (and their run ids).
        for added in ("key", "required_non_null"):
            if not dumped["dataset"][added]:
                del dumped["dataset"][added]
        # Monitoring does not change what a run trains: tuning it starts no new run.
        del dumped["monitoring"]
        # Nor does scoring, which only says what the champion scores once served.
        del dumped["scoring"]
        return json.dumps(dumped, sort_keys=True).encode()

    def sha256(self) -> str:
        return hashlib.sha256(self.canonical_json()).hexdigest()

    def feature_columns(self, columns: list[str]) -> list[str]:
        ds = self.dataset
        if ds.features is not None:
            return list(ds.features)
        skip = {ds.target, *ds.exclude, *(self.split.time_column or "",)}
        return [c for c in columns if c not in skip and ds.column_type(c) != "datetime"]

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


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_config(
    text: str | bytes, source: str = "config", env: str | None = None
) -> PipelineConfig:
    """Validate a pipeline config; with `env`, first apply `environments.<env>` over it.

    One file serves every environment: `environments: {prod: {gates: {min_accuracy: 0.9}}}`
    overrides only what it names. An environment the file does not mention uses the base.
    """
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    environments = raw.pop("environments", None) or {}
    if not isinstance(environments, dict) or not all(
        isinstance(v, dict) for v in environments.values()
    ):
        raise ConfigError(f"{source}: environments must map names to override mappings")
    if env and env in environments:
        if "name" in environments[env]:
            raise ConfigError(f"{source}: environments.{env}.name: cannot be overridden")
        raw = _merge(raw, environments[env])
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from exc


# Where a pipeline's registered config is (`mlpipe pipeline apply` writes it there).
config_path = layout.pipeline_config_path


def load_pipeline_config(storage: Storage, name: str, env: str | None = None) -> PipelineConfig:
    """The registered config of pipeline `name` for `env`; a missing or invalid one is
    permanent."""
    path = config_path(name)
    found = storage.read(path)
    if found is None:
        raise PermanentError(
            "unknown_pipeline",
            f"no pipeline config at {storage.uri(path)}; register one with `mlpipe pipeline apply`",
        )
    try:
        return parse_config(found.data, source=found.uri, env=env)
    except ConfigError as exc:
        raise PermanentError("invalid_config", str(exc)) from exc


def load_run_config(storage: Storage, run_id: str) -> PipelineConfig:
    """The config snapshot a run was started with (`runs/<run_id>/config.json`)."""
    found = storage.read(layout.RunPaths(run_id).config)
    if found is None:
        raise PermanentError("missing_run_config", f"run {run_id} has no config snapshot")
    try:
        return parse_config(found.data, source=found.uri)
    except ConfigError as exc:
        raise PermanentError("invalid_config", str(exc)) from exc
