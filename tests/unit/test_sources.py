"""Source parsing, merging and schema checks as plain functions (no servers)."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest

from mlpipe.errors import PermanentError, TransientError
from mlpipe.messaging.push import PushMessage
from mlpipe.ml.config import parse_config
from mlpipe.ml.validation import check_frame, describe_schema, schema_of
from mlpipe_ingest.sources import SourceSettings, _fail, _merge, _object_name_ok
from mlpipe_ingest.sources_http import FetchError, HttpLimits, parse_csv, parse_json, records_at
from mlpipe_ingest.table import Table

CONFIG = """\
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


def test_records_path_walks_nested_json() -> None:
    doc = {"data": {"hourly": [{"a": 1}, {"a": 2}]}}

    assert records_at(doc, "data.hourly", "u") == [{"a": 1}, {"a": 2}]
    with pytest.raises(FetchError) as caught:
        records_at(doc, "data.daily", "u")
    assert caught.value.reason == "not_records" and "'daily'" in caught.value.message


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("a,b\n", "header_only"),
        ("a,b\n1\n", "ragged_rows"),
        ("a,a\n1,2\n", "ragged_rows"),
    ],
)
def test_bad_csv_names_its_reason(text: str, reason: str) -> None:
    with pytest.raises(FetchError) as caught:
        parse_csv(text, "src")
    assert caught.value.reason == reason


def test_json_that_is_not_a_list_of_objects_is_not_records() -> None:
    with pytest.raises(FetchError) as caught:
        parse_json("[1, 2]", "", "src")
    assert caught.value.reason == "not_records"


def test_tables_from_several_urls_merge_by_column_name() -> None:
    merged = _merge([Table(["a", "b"], [["1", "2"]]), Table(["b", "c"], [["3", "4"]])], "http")

    assert merged.header == ["a", "b", "c"]
    assert merged.rows == [["1", "2", ""], ["", "3", "4"]]


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("in/a.csv", True),
        ("in/../a.csv", False),
        ("./a.csv", False),
        ("a\nb.csv", False),
        ("", False),
    ],
)
def test_object_names(name: str, ok: bool) -> None:
    assert _object_name_ok(name) is ok


def _message(attempt: int) -> PushMessage:
    return PushMessage(
        data=b"",
        attributes={},
        message_id="m",
        publish_time=dt.datetime.now(dt.UTC),
        delivery_attempt=attempt,
    )


@pytest.mark.parametrize(
    ("attempt", "kind"),
    [(0, PermanentError), (1, TransientError), (4, TransientError), (5, PermanentError)],
)
def test_an_unavailable_source_is_retried_by_pubsub_for_a_bounded_number_of_deliveries(
    attempt: int, kind: type[Exception]
) -> None:
    settings = SourceSettings(HttpLimits(), ("b",), 1000, retry_deliveries=5)
    error = FetchError("http_status", "u answered HTTP 503", retryable=True)

    assert isinstance(_fail(error, "http", _message(attempt), settings), kind)


def frame(rows: list[list[str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["station", "hour", "humidity", "temp"], dtype=str)


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
        check_frame(frame(rows), parse_config(CONFIG), "src")
    assert caught.value.reason == reason and "src" in caught.value.message


def test_a_valid_frame_passes_and_its_schema_is_described() -> None:
    config = parse_config(CONFIG)

    check_frame(frame([["s1", "1", "50", "3"], ["s2", "1", "52", "4"]]), config, "src")

    assert describe_schema(schema_of(config, ["station", "hour", "temp"])) == (
        "station:categorical,hour:numeric,temp:numeric"
    )


def test_unset_new_fields_keep_an_existing_configs_hash() -> None:
    plain = parse_config(
        CONFIG.replace("  key: [station, hour]\n  required_non_null: [humidity]\n", "")
    )

    assert b'"key"' not in plain.canonical_json()
    assert b'"key"' in parse_config(CONFIG).canonical_json()
