"""Log records as Cloud Logging JSON lines, with the run id and trace attached."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from mlpipe.runtime.logs import CloudLoggingFormatter, run_context


def _record(
    message: str = "landed %s",
    args: tuple[Any, ...] = ("x.csv",),
    level: int = logging.INFO,
    exc_info: Any = None,
    extra: dict[str, Any] | None = None,
) -> logging.LogRecord:
    record = logging.LogRecord("mlpipe.test", level, __file__, 1, message, args, exc_info)
    for key, value in (extra or {}).items():
        setattr(record, key, value)
    return record


def _format(record: logging.LogRecord, project: str = "") -> dict[str, Any]:
    line = CloudLoggingFormatter("ingest", project).format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert isinstance(entry, dict)
    return entry


def test_a_record_is_one_json_object_in_cloud_loggings_shape() -> None:
    entry = _format(_record(level=logging.WARNING))

    assert entry["severity"] == "WARNING"
    assert entry["message"] == "landed x.csv"
    assert entry["service"] == "ingest"
    assert entry["logger"] == "mlpipe.test"
    assert "run_id" not in entry
    assert "logging.googleapis.com/trace" not in entry


def test_the_run_id_is_attached_inside_a_run_context_only() -> None:
    with run_context(run_id="0123456789abcdef"):
        inside = _format(_record())
    outside = _format(_record())

    assert inside["run_id"] == "0123456789abcdef"
    assert "run_id" not in outside


def test_an_explicit_run_id_on_the_record_wins() -> None:
    with run_context(run_id="outer"):
        entry = _format(_record(extra={"run_id": "fedcba9876543210"}))

    assert entry["run_id"] == "fedcba9876543210"


def test_the_trace_is_linked_when_a_project_is_known() -> None:
    with run_context(run_id="r", trace="105445aa7843bc8bf206b12000100000"):
        with_project = _format(_record(), project="my-project")
        without_project = _format(_record())

    assert with_project["logging.googleapis.com/trace"] == (
        "projects/my-project/traces/105445aa7843bc8bf206b12000100000"
    )
    assert "logging.googleapis.com/trace" not in without_project


def test_extra_fields_become_searchable_fields() -> None:
    entry = _format(_record(extra={"delivery_attempt": 3, "_private": "hidden"}))

    assert entry["delivery_attempt"] == 3
    assert "_private" not in entry
    assert "lineno" not in entry and "args" not in entry


def test_exception_text_is_included() -> None:
    try:
        raise ValueError("bad column 'species'")
    except ValueError:
        exc_info = sys.exc_info()

    entry = _format(_record("failed", (), level=logging.ERROR, exc_info=exc_info))

    assert entry["severity"] == "ERROR"
    assert entry["message"] == "failed"
    assert "Traceback (most recent call last)" in entry["exception"]
    assert "ValueError: bad column 'species'" in entry["exception"]
