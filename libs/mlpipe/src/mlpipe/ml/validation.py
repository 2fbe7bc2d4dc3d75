"""The one check of a dataset against its pipeline's `dataset:` contract, before it lands or
trains.

Ingest runs it on every source's rows, the trainer on a file uploaded straight into
`datasets/` and in the training job. The frame may hold text (as ingest reads it) or typed
values (as mlpipe.ml.data.read_dataset reads a file); an empty or blank cell counts as a
missing value. Each problem is a PermanentError naming the source and the first offending
data row (counted from 1).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

from mlpipe.errors import PermanentError
from mlpipe.ml.config import ColumnType, PipelineConfig


def _missing(values: pd.Series) -> pd.Series:
    if values.dtype == object or pd.api.types.is_string_dtype(values):
        return values.isna() | (values.astype(str).str.strip() == "")
    return values.isna()


def _first_rows(mask: pd.Series) -> list[int]:
    """Data rows (counted from 1) where `mask` holds, at most ten."""
    return [int(i) + 1 for i in np.flatnonzero(mask.to_numpy())[:10]]


def required_columns(config: PipelineConfig, columns: list[str]) -> list[str]:
    ds = config.dataset
    needed = [ds.target, *config.feature_columns(columns)]
    if config.split.strategy == "time" and config.split.time_column:
        needed.append(config.split.time_column)
    needed += [*ds.key, *ds.required_non_null]
    return list(dict.fromkeys(needed))


def require_columns(columns: list[str], needed: list[str], source: str, wanted_by: str) -> None:
    """Raise `missing_column` naming the columns of `needed` that `columns` lacks."""
    missing = [c for c in needed if c not in columns]
    if missing:
        raise PermanentError(
            "missing_column",
            f"{source} lacks column(s) {missing} required by {wanted_by} (found: {columns})",
        )


def check_scoring_columns(config: PipelineConfig, columns: list[str], source: str) -> None:
    """The `scoring:` section against the data's header: each column it names exists, and
    every feature is made by one of its parts (else the champion's scoring could not run)."""
    scoring = config.scoring
    if scoring is None:
        return
    named = scoring.columns()
    for column, where in named.items():
        if column not in columns:
            raise PermanentError(
                "invalid_config",
                f"pipeline {config.name!r} {where} names column {column!r}, which {source} "
                f"lacks (found: {columns})",
            )
    uncovered = [f for f in config.feature_columns(columns) if f not in named]
    if uncovered:
        raise PermanentError(
            "invalid_config",
            f"pipeline {config.name!r} scoring: the features {uncovered} of {source} are in "
            "none of scoring.entity, scoring.calendar and scoring.last_known",
        )


def schema_of(config: PipelineConfig, columns: list[str]) -> dict[str, ColumnType]:
    """Each column's type: as declared; undeclared, numeric, but a classification target
    that is not declared is a label (categorical)."""
    ds = config.dataset
    labels = config.model.task == "classification"
    return {
        c: "categorical" if labels and c == ds.target and c not in ds.columns else ds.column_type(c)
        for c in columns
    }


def describe_schema(schema: dict[str, ColumnType]) -> str:
    """`column:type,...` as recorded in a landed object's metadata."""
    return ",".join(f"{c}:{t}" for c, t in schema.items())


def check_header(columns: list[str], config: PipelineConfig, source: str) -> list[str]:
    """The checks a header decides: the columns the pipeline needs are there and some are
    features. Raise a PermanentError naming the first problem; return the feature columns."""
    require_columns(columns, required_columns(config, columns), source, f"pipeline {config.name!r}")
    check_scoring_columns(config, columns, source)
    features = config.feature_columns(columns)
    if not features:
        raise PermanentError(
            "no_features", f"{source} has no feature columns besides {config.dataset.target!r}"
        )
    return features


def check_row_count(n: int, config: PipelineConfig, source: str) -> None:
    ds = config.dataset
    if n == 0:
        raise PermanentError("header_only", f"{source} has a header but no rows")
    if not ds.min_rows <= n <= ds.max_rows:
        raise PermanentError(
            "row_count",
            f"{source} has {n} rows; pipeline {config.name!r} accepts {ds.min_rows}..{ds.max_rows}",
        )


class BadRow(PermanentError):
    """A problem of one data row (counted from 1 in the whole dataset): `row`."""

    def __init__(self, reason: str, message: str, row: int) -> None:
        super().__init__(reason, message)
        self.row = row


def check_chunk(
    frame: pd.DataFrame,
    config: PipelineConfig,
    features: list[str],
    source: str,
    first_row: int = 1,
) -> set[str]:
    """The checks one part of a dataset decides on its own, its first row being data row
    `first_row`: the target and `required_non_null` columns have a value in every row, and
    typed columns parse. Raise a `BadRow` naming the first problem; return the features that
    have a value in this part (`check_features_present` on the union of every part's)."""
    _check_present(frame, config, source, first_row)
    _check_types(frame, config, [str(c) for c in frame.columns], source, first_row)
    return {c for c in features if not _missing(frame[c]).all()}


def check_features_present(features: list[str], present: set[str], source: str) -> None:
    """Every feature has a value in some row."""
    for column in features:
        if column not in present:
            raise PermanentError(
                "all_nan_feature", f"{source}: feature column {column!r} has no values at all"
            )


def check_dataset(frame: pd.DataFrame, config: PipelineConfig, source: str) -> list[str]:
    """Raise a PermanentError naming the first problem of `frame` for `config`; return the
    feature columns. A dataset too large for one frame is checked in parts with the same
    functions (check_header, check_chunk, check_features_present, check_row_count; the batch
    job's mlpipe_batch.validate)."""
    ds = config.dataset
    columns = [str(c) for c in frame.columns]
    if len(frame) == 0:
        raise PermanentError("header_only", f"{source} has a header but no rows")
    features = check_header(columns, config, source)
    check_row_count(len(frame), config, source)
    present = check_chunk(frame, config, features, source)
    check_features_present(features, present, source)
    if ds.key:
        repeated = frame.duplicated(subset=ds.key, keep="first")
        if repeated.any():
            raise BadRow(
                "duplicate_key",
                f"{source}: {int(repeated.sum())} row(s) repeat a key {ds.key} "
                f"(data rows {_first_rows(repeated)})",
                _first_rows(repeated)[0],
            )
    return features


def _check_present(
    frame: pd.DataFrame, config: PipelineConfig, source: str, first_row: int
) -> None:
    """The target and `required_non_null` columns have a value in every row."""
    ds = config.dataset
    for column in dict.fromkeys([ds.target, *ds.required_non_null]):
        empty = _missing(frame[column])
        if empty.any():
            reason = "null_target" if column == ds.target else "null_value"
            rows = [r + first_row - 1 for r in _first_rows(empty)]
            raise BadRow(
                reason,
                f"{source}: {int(empty.sum())} row(s) have no {column!r} (data rows {rows})",
                rows[0],
            )


def _check_types(
    frame: pd.DataFrame, config: PipelineConfig, columns: list[str], source: str, first_row: int
) -> None:
    """Numeric columns (features, a regression target, declared ones) parse as numbers and
    datetime columns as times."""
    ds = config.dataset
    typed = [*config.feature_columns(columns)]
    if config.model.task == "regression":
        typed.append(ds.target)
    typed += [c for c in ds.columns if c in columns]
    for column in dict.fromkeys(typed):
        kind = ds.column_type(column)
        values = frame[column]
        if kind == "categorical" or pd.api.types.is_numeric_dtype(values):
            continue
        present = ~_missing(values)
        if kind == "numeric":
            parsed = pd.to_numeric(values.where(present), errors="coerce")
        else:
            parsed = pd.to_datetime(values.where(present), errors="coerce", utc=True)
        bad = parsed.isna() & present
        if bad.any():
            first = int(np.flatnonzero(bad.to_numpy())[0])
            raise BadRow(
                "wrong_type",
                f"{source}: column {column!r} is declared {kind}; {int(bad.sum())} value(s) "
                f"are not (first: {values.iloc[first]!r} on data row {first + first_row})",
                first + first_row,
            )


# What a source's typed schema says a column holds, for a check without the data.
SourceKind = Literal["numeric", "datetime", "text", "boolean", "nested"]


def check_schema(
    columns: dict[str, SourceKind], row_count: int, config: PipelineConfig, source: str
) -> list[str]:
    """The part of `check_dataset` that a typed schema and a row count can decide, for data
    that is checked before it is read (a BigQuery export): the required columns, the row
    count and each typed column's kind. Raise a PermanentError naming the first problem;
    return the feature columns. Missing values, keys and unparseable values are then the
    reader's check (the trainer reads and checks the landed file with `check_dataset`)."""
    ds = config.dataset
    names = list(columns)
    if row_count == 0:
        raise PermanentError("header_only", f"{source} has columns but no rows")
    require_columns(names, required_columns(config, names), source, f"pipeline {config.name!r}")
    features = config.feature_columns(names)
    if not features:
        raise PermanentError(
            "no_features", f"{source} has no feature columns besides {ds.target!r}"
        )
    if not ds.min_rows <= row_count <= ds.max_rows:
        raise PermanentError(
            "row_count",
            f"{source} has {row_count} rows; pipeline {config.name!r} accepts "
            f"{ds.min_rows}..{ds.max_rows}",
        )
    used = [*required_columns(config, names)]
    if config.model.task == "regression":
        used.append(ds.target)
    for column in dict.fromkeys(used):
        kind = columns[column]
        declared = ds.column_type(column)
        if config.model.task == "classification" and column == ds.target:
            declared = schema_of(config, [column])[column]
        fits = kind != "nested" and (
            declared == "categorical"
            or (declared == "numeric" and kind == "numeric")
            or (declared == "datetime" and kind == "datetime")
        )
        if not fits:
            raise PermanentError(
                "wrong_type",
                f"{source}: column {column!r} is declared {declared} but the source types it "
                f"{kind}",
            )
    return features
