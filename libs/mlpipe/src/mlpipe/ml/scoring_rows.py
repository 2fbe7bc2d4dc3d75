"""The rows a new champion scores for the next days (a pipeline's `scoring:` section).

Made from the latest landed dataset alone, so every value is one the pipeline has:

    every entity seen in it (the distinct combinations of `scoring.entity`)
      x each step of `step_hours` over the `horizon_days` days after its latest row
    calendar features: computed from the row's time (UTC, as the time column is read)
    last_known features: the entity's latest value at the same time of day (its latest value
      at all when it was never seen at that time): a persistence forecast

Each row carries a key, `scoring_key` (`<entity values joined by |>@<ISO time>`), which the
batch writes beside each prediction, and the time column itself.
"""

from __future__ import annotations

import datetime as dt

import pandas as pd

from mlpipe.errors import PermanentError
from mlpipe.ml.config import PipelineConfig, ScoringSpec

KEY_COLUMN = "scoring_key"


def _times(frame: pd.DataFrame, column: str, source: str) -> pd.Series:
    times = pd.to_datetime(frame[column], utc=True, errors="coerce")
    if times.isna().all():
        raise PermanentError("no_scoring_rows", f"{source}: {column!r} holds no time")
    return times


def scoring_start(frame: pd.DataFrame, config: PipelineConfig, source: str) -> dt.date:
    """The first day scored: the day after the dataset's latest row (UTC)."""
    latest = _times(frame, config.scoring_time_column(), source).max()
    return (latest + pd.Timedelta(days=1)).date()


def _calendar(when: pd.Series, part: str) -> pd.Series:
    if part == "hour":
        return when.dt.hour
    if part == "weekday":
        return when.dt.day_of_week
    if part == "day":
        return when.dt.day
    if part == "month":
        return when.dt.month
    if part == "day_of_year":
        return when.dt.dayofyear
    return (when.dt.day_of_week >= 5).astype(int)  # is_weekend


def scoring_rows(
    frame: pd.DataFrame, config: PipelineConfig, source: str, start: dt.date | None = None
) -> pd.DataFrame:
    """The rows to score (see the module's doc), ordered by time then entity."""
    scoring: ScoringSpec | None = config.scoring
    if scoring is None:
        raise PermanentError("no_scoring", f"pipeline {config.name!r} has no scoring section")
    time_col = config.scoring_time_column()
    for column, where in scoring.columns().items():
        if column not in frame.columns:
            raise PermanentError(
                "invalid_config", f"{where} names column {column!r}, which {source} lacks"
            )
    if KEY_COLUMN in frame.columns:
        raise PermanentError("invalid_config", f"{source} already has a {KEY_COLUMN!r} column")
    times = _times(frame, time_col, source)
    known = frame.assign(**{"_time": times}).dropna(subset=["_time", *scoring.entity])
    known = known.assign(_slot=known["_time"].dt.hour // scoring.step_hours)
    known = known.sort_values("_time", kind="stable")
    entity = list(scoring.entity)
    latest = known.groupby(entity, sort=True, dropna=True).tail(1).set_index(entity)
    by_slot = known.groupby([*entity, "_slot"], sort=True).tail(1).set_index([*entity, "_slot"])
    first = pd.Timestamp(start or scoring_start(frame, config, source), tz="UTC")
    steps = scoring.horizon_days * 24 // scoring.step_hours
    when = pd.Series(
        [first + pd.Timedelta(hours=i * scoring.step_hours) for i in range(steps)], name="_time"
    )
    entities = latest.index.to_frame(index=False).sort_values(entity, ignore_index=True)
    grid = when.to_frame().merge(entities, how="cross")
    grid["_slot"] = grid["_time"].dt.hour // scoring.step_hours
    if scoring.last_known:
        exact = grid.join(by_slot[scoring.last_known], on=[*entity, "_slot"])
        fallback = grid.join(latest[scoring.last_known], on=entity)
        for column in scoring.last_known:
            grid[column] = exact[column].where(exact[column].notna(), fallback[column])
    for column, part in scoring.calendar.items():
        grid[column] = _calendar(grid["_time"], part)
    stamps = grid["_time"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    names = grid[entity].astype(str).agg("|".join, axis=1)
    out = grid.drop(columns=["_slot", "_time"])
    out.insert(0, time_col, stamps)
    out.insert(0, KEY_COLUMN, names + "@" + stamps)
    return out.reset_index(drop=True)
