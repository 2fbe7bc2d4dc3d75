"""The one check of a dataset against its pipeline's `dataset:` contract, on text (as ingest
reads sources) and on typed values (as the trainer reads files)."""

from __future__ import annotations

import pandas as pd
import pytest

from mlpipe.errors import PermanentError
from mlpipe.ml.config import PipelineConfig, parse_config
from mlpipe.ml.validation import check_dataset, check_schema, describe_schema, schema_of

SMALL_YAML = """\
name: small
dataset:
  target: label
  min_rows: 3
  max_rows: 6
model:
  name: small-model
"""

WEATHER_YAML = """\
name: weather
dataset:
  target: temp
  columns: {station: categorical}
  key: [station, hour]
  required_non_null: [humidity]
  min_rows: 1
model:
  name: weather-temp
  task: regression
  estimator: sklearn.linear_model.Ridge
"""


def _config(extra: str = "") -> PipelineConfig:
    return parse_config(SMALL_YAML + extra)


def text(rows: list[list[str]], columns: list[str]) -> pd.DataFrame:
    """A frame as ingest builds one: every cell text."""
    return pd.DataFrame(rows, columns=columns, dtype=str)


def weather(rows: list[list[str]]) -> pd.DataFrame:
    return text(rows, ["station", "hour", "humidity", "temp"])


def test_the_feature_columns_are_returned() -> None:
    frame = pd.DataFrame({"x": [1, 2, 3], "label": ["a", "b", "a"], "y": [0.1, 0.2, 0.3]})

    assert check_dataset(frame, _config(), "s") == ["x", "y"]


def test_a_missing_column_is_named_with_the_source() -> None:
    config = parse_config(
        SMALL_YAML.replace("  target: label\n", "  target: label\n  features: [x, z]\n")
    )
    frame = pd.DataFrame({"x": [1, 2, 3], "label": ["a", "b", "a"]})

    with pytest.raises(PermanentError) as caught:
        check_dataset(frame, config, "gs://b/data.csv")

    assert caught.value.reason == "missing_column"
    assert "gs://b/data.csv lacks column(s) ['z'] required by pipeline 'small'" in (
        caught.value.message
    )


@pytest.mark.parametrize("frame", [pd.DataFrame({"x": [1, 2, 3]}), text([["1"]] * 3, ["x"])])
def test_a_missing_target_is_named(frame: pd.DataFrame) -> None:
    with pytest.raises(PermanentError) as caught:
        check_dataset(frame, _config(), "s")

    assert caught.value.reason == "missing_column"
    assert "['label']" in caught.value.message


def test_rows_without_data_are_header_only() -> None:
    with pytest.raises(PermanentError) as caught:
        check_dataset(text([], ["x", "label"]), _config(), "inline")

    assert caught.value.reason == "header_only"
    assert caught.value.message == "inline has a header but no rows"


def test_a_dataset_of_only_the_target_has_no_features() -> None:
    with pytest.raises(PermanentError) as caught:
        check_dataset(text([["a"]] * 3, ["label"]), _config(), "s")

    assert caught.value.reason == "no_features"


@pytest.mark.parametrize("rows", [2, 7])
def test_a_row_count_outside_the_bounds_is_refused(rows: int) -> None:
    frame = pd.DataFrame({"x": range(rows), "label": ["a"] * rows})

    with pytest.raises(PermanentError) as caught:
        check_dataset(frame, _config(), "s")

    assert caught.value.reason == "row_count"
    assert f"s has {rows} rows; pipeline 'small' accepts 3..6" in caught.value.message


@pytest.mark.parametrize("rows", [3, 6])
def test_row_counts_at_the_bounds_are_accepted(rows: int) -> None:
    check_dataset(text([["1", "a"]] * rows, ["x", "label"]), _config(), "s")


@pytest.mark.parametrize(
    "frame",
    [
        pd.DataFrame({"x": [1, 2, 3, 4, 5], "label": ["a", None, "b", None, "a"]}),
        text([["1", "a"], ["2", ""], ["3", "b"], ["4", " "], ["5", "a"]], ["x", "label"]),
    ],
    ids=["typed", "text"],
)
def test_rows_without_a_target_are_counted_and_located(frame: pd.DataFrame) -> None:
    with pytest.raises(PermanentError) as caught:
        check_dataset(frame, _config(), "s")

    assert caught.value.reason == "null_target"
    assert caught.value.message == "s: 2 row(s) have no 'label' (data rows [2, 4])"


@pytest.mark.parametrize(
    "frame",
    [
        pd.DataFrame({"x": [None, None, None], "y": [1, 2, 3], "label": ["a", "b", "a"]}),
        text([["", "1", "a"], [" ", "2", "b"], ["", "3", "a"]], ["x", "y", "label"]),
    ],
    ids=["typed", "text"],
)
def test_a_feature_without_any_value_is_refused(frame: pd.DataFrame) -> None:
    with pytest.raises(PermanentError) as caught:
        check_dataset(frame, _config(), "s")

    assert caught.value.reason == "all_nan_feature"
    assert "'x'" in caught.value.message


@pytest.mark.parametrize(
    "frame",
    [
        pd.DataFrame({"x": ["1", "2", "three"], "label": ["a", "b", "a"]}),
        text([["1", "a"], ["2", "b"], ["three", "a"]], ["x", "label"]),
    ],
    ids=["typed", "text"],
)
def test_a_non_numeric_value_in_a_numeric_feature_is_located(frame: pd.DataFrame) -> None:
    with pytest.raises(PermanentError) as caught:
        check_dataset(frame, _config(), "s")

    assert caught.value.reason == "wrong_type"
    assert "'three' on data row 3" in caught.value.message


@pytest.mark.parametrize(
    ("rows", "reason"),
    [
        ([["s1", "1", "50", "3"], ["s1", "1", "51", "4"]], "duplicate_key"),
        ([["s1", "1", "", "3"]], "null_value"),
        ([["s1", "x", "50", "3"]], "wrong_type"),
        ([["s1", "1", "50", "warm"]], "wrong_type"),
    ],
)
def test_schema_checks(rows: list[list[str]], reason: str) -> None:
    with pytest.raises(PermanentError) as caught:
        check_dataset(weather(rows), parse_config(WEATHER_YAML), "src")
    assert caught.value.reason == reason and "src" in caught.value.message


def test_a_valid_frame_passes_and_its_schema_is_described() -> None:
    config = parse_config(WEATHER_YAML)

    check_dataset(weather([["s1", "1", "50", "3"], ["s2", "1", "52", "4"]]), config, "src")

    assert describe_schema(schema_of(config, ["station", "hour", "temp"])) == (
        "station:categorical,hour:numeric,temp:numeric"
    )


def test_unset_new_fields_keep_an_existing_configs_hash() -> None:
    plain = parse_config(
        WEATHER_YAML.replace("  key: [station, hour]\n  required_non_null: [humidity]\n", "")
    )

    assert b'"key"' not in plain.canonical_json()
    assert b'"key"' in parse_config(WEATHER_YAML).canonical_json()


# --- a typed schema and a row count, without the data (a BigQuery export) ------------------
WEATHER_SCHEMA = {"station": "text", "hour": "numeric", "humidity": "numeric", "temp": "numeric"}


def test_a_typed_schema_that_fits_passes_and_returns_the_features() -> None:
    config = parse_config(WEATHER_YAML)

    assert check_schema(dict(WEATHER_SCHEMA), 5, config, "bq") == ["station", "hour", "humidity"]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "rows", "reason", "named"),
    [
        ({"humidity": None}, 5, "missing_column", "humidity"),
        (
            {"temp": "text"},
            5,
            "wrong_type",
            "'temp' is declared numeric but the source types it text",
        ),
        ({"hour": "datetime"}, 5, "wrong_type", "'hour'"),
        ({"humidity": "nested"}, 5, "wrong_type", "'humidity'"),
        ({}, 0, "header_only", "no rows"),
    ],
)
def test_a_typed_schema_that_does_not_fit_is_refused_naming_the_column(
    change: dict[str, str | None], rows: int, reason: str, named: str
) -> None:
    columns = {**WEATHER_SCHEMA, **change}
    columns = {k: v for k, v in columns.items() if v is not None}

    with pytest.raises(PermanentError) as caught:
        check_schema(columns, rows, parse_config(WEATHER_YAML), "bq:job")  # type: ignore[arg-type]

    assert caught.value.reason == reason
    assert named in caught.value.message and "bq:job" in caught.value.message


def test_a_row_count_outside_the_bounds_is_refused_from_the_metadata() -> None:
    schema = {"label": "text", "x": "numeric"}

    with pytest.raises(
        PermanentError, match=r"has 7 rows; pipeline 'small' accepts 3\.\.6"
    ) as caught:
        check_schema(schema, 7, _config(), "bq")  # type: ignore[arg-type]

    assert caught.value.reason == "row_count"
    assert check_schema(schema, 6, _config(), "bq") == ["x"]  # type: ignore[arg-type]
