"""Source parsing and merging as plain functions (no servers)."""

from __future__ import annotations

import datetime as dt

import pytest

from mlpipe.errors import PermanentError, TransientError
from mlpipe.messaging.push import PushMessage
from mlpipe_ingest.sources import SourceSettings, _fail, _merge, _object_name_ok
from mlpipe_ingest.sources_http import FetchError, HttpLimits, parse_json, records_at
from mlpipe_ingest.table import Table


def test_records_path_walks_nested_json() -> None:
    doc = {"data": {"hourly": [{"a": 1}, {"a": 2}]}}

    assert records_at(doc, "data.hourly", "u") == [{"a": 1}, {"a": 2}]
    with pytest.raises(PermanentError) as caught:
        records_at(doc, "data.daily", "u")
    assert caught.value.reason == "not_records" and "'daily'" in caught.value.message


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[1, 2]", "not_records"),
        ("{", "not_records"),
        ("[]", "empty_dataset"),
        ("", "empty_dataset"),
    ],
)
def test_json_that_holds_no_records_names_its_reason(text: str, reason: str) -> None:
    with pytest.raises(PermanentError) as caught:
        parse_json(text, "", "src")
    assert caught.value.reason == reason


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
