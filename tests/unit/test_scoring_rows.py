"""A pipeline's `scoring:` section: its validation at config load and against the data's
header, and the rows a new champion scores (every entity x every step of the next days)."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import pandas as pd
import pytest

from mlpipe.errors import PermanentError
from mlpipe.ml.config import ConfigError, parse_config
from mlpipe.ml.scoring_rows import KEY_COLUMN, scoring_rows, scoring_start
from mlpipe.ml.validation import check_dataset
from mlpipe.store import layout

REPO = Path(__file__).resolve().parents[2]
BIKESHARE_YAML = (REPO / "examples/bikeshare/pipeline.yaml").read_text()
BIKESHARE_CSV = (REPO / "examples/bikeshare/bikeshare.csv").read_text()
STATIONS = {
    "central-station",
    "harbour-front",
    "university",
    "old-town",
    "business-park",
    "riverside",
    "hospital",
    "stadium",
}

LISTED = """\
name: demand
dataset:
  target: rides
  features: [station, hour, weekday, temperature]
  columns: {timestamp: datetime, station: categorical}
split: {strategy: time, time_column: timestamp}
model: {name: demand-model, task: regression,
        estimator: sklearn.ensemble.HistGradientBoostingRegressor}
scoring:
  horizon_days: 1
  entity: [station]
  step_hours: 12
  calendar: {hour: hour, weekday: weekday}
  last_known: [temperature]
"""


def bikeshare() -> pd.DataFrame:
    return pd.read_csv(io.StringIO(BIKESHARE_CSV))


def with_scoring(**fields: object) -> str:
    """The LISTED config with its scoring section's `fields` replaced."""
    config = parse_config(LISTED)
    assert config.scoring is not None
    raw = config.model_dump(mode="json")
    raw["scoring"].update(fields)
    import yaml

    return yaml.safe_dump(raw)


# --- the config -------------------------------------------------------------------------------
def test_the_bikeshare_example_scores_two_days_of_every_station_hourly() -> None:
    config = parse_config(BIKESHARE_YAML)

    assert config.scoring is not None
    assert config.scoring.horizon_days == 2 and config.scoring.step_hours == 1
    assert config.scoring.entity == ["station", "station_kind"]
    assert config.scoring.calendar == {"hour": "hour", "weekday": "weekday"}
    assert config.scoring_time_column() == "timestamp"


def test_scoring_does_not_change_the_config_hash_so_run_ids_stay() -> None:
    without = (
        BIKESHARE_YAML[: BIKESHARE_YAML.index("scoring:")]
        + BIKESHARE_YAML[BIKESHARE_YAML.index("environments:") :]
    )

    assert parse_config(without).scoring is None
    assert parse_config(without).sha256() == parse_config(BIKESHARE_YAML).sha256()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"last_known": ["temperature", "humidity"]},
            r"scoring\.last_known\[1\]: column 'humidity'",
        ),
        ({"entity": ["rides"]}, r"scoring\.entity\[0\]: 'rides' is the target"),
        ({"entity": ["timestamp"]}, r"scoring\.entity\[0\]: 'timestamp' is the time column"),
        (
            {"last_known": ["station", "temperature"]},
            r"scoring\.last_known\[0\]: 'station' is already",
        ),
        ({"last_known": []}, r"features \['temperature'\] are in none of scoring\.entity"),
        ({"step_hours": 5}, r"scoring\.step_hours: .*must divide 24"),
        ({"calendar": {"hour": "fortnight"}}, r"scoring\.calendar\.hour"),
        ({"horizon_days": 0}, r"scoring\.horizon_days"),
        ({"time_column": "station"}, r"scoring\.time_column 'station' must be declared datetime"),
        ({"lookback": 3}, r"scoring\.lookback: unknown key"),
    ],
)
def test_a_wrong_scoring_section_is_refused_at_config_load_naming_the_field(
    fields: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(with_scoring(**fields), source="demand.yaml")


def test_data_lacking_a_scoring_column_is_refused_naming_the_field() -> None:
    config = parse_config(BIKESHARE_YAML)
    frame = bikeshare().drop(columns=["wind_kmh"])

    with pytest.raises(PermanentError, match=r"scoring\.last_known\[2\] names column 'wind_kmh'"):
        check_dataset(frame, config, "gs://b/datasets/bikeshare/x.csv")


def test_data_with_a_feature_scoring_cannot_make_is_refused() -> None:
    config = parse_config(BIKESHARE_YAML)
    frame = bikeshare().assign(humidity=50.0)

    with pytest.raises(PermanentError, match=r"features \['humidity'\].*in none of"):
        check_dataset(frame, config, "gs://b/datasets/bikeshare/x.csv")


# --- the rows ---------------------------------------------------------------------------------
def test_every_station_is_scored_at_every_hour_of_the_next_days() -> None:
    config = parse_config(BIKESHARE_YAML)

    rows = scoring_rows(bikeshare(), config, "bikeshare.csv")

    # The data ends on 2026-06-14 23:00: the next two days, 48 hours, 8 stations.
    assert len(rows) == 48 * 8
    assert set(rows["station"]) == STATIONS
    times = pd.to_datetime(rows["timestamp"], utc=True)
    assert times.min() == pd.Timestamp("2026-06-15T00:00:00Z")
    assert times.max() == pd.Timestamp("2026-06-16T23:00:00Z")
    assert rows.groupby("station")["timestamp"].nunique().eq(48).all()
    assert not rows.duplicated(subset=["station", "timestamp"]).any()
    assert rows[KEY_COLUMN].is_unique
    assert rows.loc[0, KEY_COLUMN] == "business-park|office@2026-06-15T00:00:00Z"
    # Every feature the model takes is there, with a value.
    features = config.feature_columns(list(bikeshare().columns))
    assert rows[features].notna().all().all()


def test_calendar_features_are_computed_and_station_attributes_kept() -> None:
    config = parse_config(BIKESHARE_YAML)

    rows = scoring_rows(bikeshare(), config, "bikeshare.csv")

    times = pd.to_datetime(rows["timestamp"], utc=True)
    assert (rows["hour"] == times.dt.hour).all()
    assert (rows["weekday"] == times.dt.day_of_week).all()
    assert set(rows.loc[times.dt.date == dt.date(2026, 6, 15), "weekday"]) == {0}  # a Monday
    kinds = dict(zip(bikeshare()["station"], bikeshare()["station_kind"], strict=True))
    assert (rows["station_kind"] == rows["station"].map(kinds)).all()


def test_the_weather_is_the_last_known_at_the_same_hour() -> None:
    config = parse_config(BIKESHARE_YAML)
    data = bikeshare()

    rows = scoring_rows(data, config, "bikeshare.csv")

    last_day = data[data["timestamp"].str.startswith("2026-06-14")]
    at_eight = last_day[last_day["hour"] == 8].iloc[0]
    scored = rows[rows["hour"] == 8]
    assert len(scored) == 2 * 8
    for column in ("temperature_c", "precipitation_mm", "wind_kmh"):
        assert set(scored[column]) == {at_eight[column]}


def test_a_time_of_day_never_seen_takes_the_entity_s_latest_value() -> None:
    config = parse_config(with_scoring(step_hours=6))
    data = pd.DataFrame(
        {
            "timestamp": ["2026-01-01T00:00:00Z", "2026-01-01T13:00:00Z"],
            "station": ["a", "a"],
            "hour": [0, 13],
            "weekday": [3, 3],
            "temperature": [1.0, 5.0],
            "rides": [1.0, 2.0],
        }
    )

    rows = scoring_rows(data, config, "x.csv")

    assert list(rows["timestamp"]) == [
        "2026-01-02T00:00:00Z",
        "2026-01-02T06:00:00Z",
        "2026-01-02T12:00:00Z",
        "2026-01-02T18:00:00Z",
    ]
    # 00-06 and 12-18 were seen; 06-12 and 18-24 never: the latest value.
    assert list(rows["temperature"]) == [1.0, 5.0, 5.0, 5.0]
    assert list(rows["hour"]) == [0, 6, 12, 18] and set(rows["weekday"]) == {4}


def test_the_rows_and_batch_id_are_the_same_for_the_same_data() -> None:
    config = parse_config(BIKESHARE_YAML)

    first = scoring_rows(bikeshare(), config, "a.csv").to_csv(index=False)
    again = scoring_rows(bikeshare().sample(frac=1, random_state=1), config, "b.csv")

    assert again.to_csv(index=False) == first
    start = scoring_start(bikeshare(), config, "a.csv")
    assert start == dt.date(2026, 6, 15)
    assert layout.scoring_batch_id(3, start) == "scoring-v3-20260615"
    assert layout.scoring_batch_id(4, start) != layout.scoring_batch_id(3, start)
    assert layout.scoring_input_path("bikeshare-net-change", "scoring-v3-20260615") == (
        "predictions/bikeshare-net-change/inputs/scoring-v3-20260615.csv"
    )


def test_data_without_any_time_makes_no_rows() -> None:
    config = parse_config(LISTED)
    data = pd.DataFrame(
        {
            "timestamp": ["", "soon"],
            "station": ["a", "b"],
            "hour": [0, 1],
            "weekday": [0, 0],
            "temperature": [1.0, 2.0],
            "rides": [1.0, 2.0],
        }
    )

    with pytest.raises(PermanentError, match="'timestamp' holds no time"):
        scoring_rows(data, config, "x.csv")
