"""mlpipe.tracing without the stack: context carried in Pub/Sub attributes, object metadata
and TRACEPARENT, a waterfall from spans, and a service that cannot export its spans still
starting."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from mlpipe import tracing

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"


def test_a_push_continues_the_trace_of_its_messages_googclient_attribute() -> None:
    ctx = tracing.context_of({"googclient_traceparent": TRACEPARENT, "run_id": "r"})

    from opentelemetry import trace

    assert ctx is not None
    found = trace.get_current_span(ctx).get_span_context()
    assert format(found.trace_id, "032x") == TRACE
    assert format(found.span_id, "016x") == PARENT


def test_a_storage_notification_continues_the_trace_in_its_objects_metadata() -> None:
    data = json.dumps({"name": "datasets/iris/x.csv", "metadata": {"traceparent": TRACEPARENT}})

    ctx = tracing.context_of({"objectId": "datasets/iris/x.csv"}, data.encode())
    none = tracing.context_of({"objectId": "datasets/iris/y.csv"}, b'{"name": "y"}')

    from opentelemetry import trace

    assert ctx is not None and none is None
    assert format(trace.get_current_span(ctx).get_span_context().trace_id, "032x") == TRACE


def test_the_waterfall_puts_each_span_under_its_parent_in_start_order() -> None:
    spans = [
        {
            "trace_id": TRACE,
            "span_id": "b",
            "parent_id": "a",
            "name": "fit",
            "service": "job",
            "start_ns": 2_000_000_000,
            "end_ns": 3_000_000_000,
        },
        {
            "trace_id": TRACE,
            "span_id": "a",
            "parent_id": "",
            "name": "root",
            "service": "ingest",
            "start_ns": 1_000_000_000,
            "end_ns": 4_000_000_000,
        },
        {
            "trace_id": TRACE,
            "span_id": "c",
            "parent_id": "gone",
            "name": "orphan",
            "service": "x",
            "start_ns": 1_500_000_000,
            "end_ns": 1_600_000_000,
        },
    ]

    rows = tracing.waterfall(spans)

    assert [(r["name"], r["depth"]) for r in rows] == [("root", 0), ("fit", 1), ("orphan", 0)]
    assert rows[1]["start_s"] == 1.0 and rows[1]["duration_s"] == 1.0


def test_a_service_without_credentials_for_cloud_trace_starts_untraced(tmp_path: Path) -> None:
    # In a fresh process: configure() sets the process's one tracer provider.
    script = (
        "import logging, sys; logging.basicConfig(level=logging.WARNING)\n"
        "from mlpipe import tracing\n"
        "print(tracing.configure('ingest', 'cloud-trace', project='p'), tracing.enabled())\n"
    )
    env = {
        "HOME": str(tmp_path),
        "PATH": "/usr/bin:/bin",
        "GCE_METADATA_HOST": "127.0.0.1:9",
        "GCE_METADATA_IP": "127.0.0.1:9",
        "NO_GCE_CHECK": "True",
    }
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]
    assert "tracing off: no credentials" in done.stderr


def test_an_exporter_that_is_not_one_of_the_three_names_the_setting() -> None:
    with pytest.raises(tracing.TracingError, match="MLPIPE_TRACE_EXPORTER='jaeger'"):
        tracing.configure("ingest", "jaeger")
    with pytest.raises(tracing.TracingError, match="MLPIPE_TRACE_DIR"):
        tracing.configure("ingest", "file")


def test_no_context_outside_a_span(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    assert tracing.traceparent() == ""
    assert tracing.trace_id() == ""
    assert tracing.object_metadata() == {}
