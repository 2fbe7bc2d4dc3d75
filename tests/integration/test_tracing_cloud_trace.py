"""Cloud Trace's real OpenTelemetry exporter (mlpipe.tracing.cloud_trace_exporter, REST)
against the local Cloud Trace stand-in (mlpipe_ops.standins.cloud_trace), and the stand-in's
refusals (docs/cloud-trace-standin.md) through the real TraceServiceClient."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud.trace_v2 import Span, TraceServiceClient, TruncatableString
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import format_span_id, format_trace_id

from mlpipe.tracing import RUN_ID, cloud_trace_exporter
from mlpipe_ops.standins.cloud_trace import CloudTraceStandIn

pytestmark = pytest.mark.integration
PROJECT = "mlpipe-trace"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


@pytest.fixture
def stand_in() -> Iterator[CloudTraceStandIn]:
    with CloudTraceStandIn() as running:
        yield running


@pytest.fixture
def client(stand_in: CloudTraceStandIn) -> TraceServiceClient:
    return TraceServiceClient(
        transport="rest",
        credentials=AnonymousCredentials(),
        client_options=ClientOptions(api_endpoint=stand_in.url),
    )


def by_name(spans: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {s["displayName"]["value"]: s for s in spans}


def test_the_exporter_sends_a_parent_and_its_child_as_cloud_trace_spans(
    stand_in: CloudTraceStandIn,
) -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(cloud_trace_exporter(PROJECT, stand_in.url)))
    tracer = provider.get_tracer("test")
    with (
        tracer.start_as_current_span("ingest land", attributes={RUN_ID: "run-7"}) as parent,
        tracer.start_as_current_span("write object", attributes={"rows": 12}),
    ):
        pass
    provider.shutdown()

    spans = by_name(stand_in.spans(PROJECT))
    assert sorted(spans) == ["ingest land", "write object"]
    root, child = spans["ingest land"], spans["write object"]
    trace_id = format_trace_id(parent.get_span_context().trace_id)
    assert root["name"] == f"projects/{PROJECT}/traces/{trace_id}/spans/{root['spanId']}"
    assert child["name"] == f"projects/{PROJECT}/traces/{trace_id}/spans/{child['spanId']}"
    assert root["spanId"] == format_span_id(parent.get_span_context().span_id)
    assert child["parentSpanId"] == root["spanId"]
    assert "parentSpanId" not in root
    attributes = root["attributes"]["attributeMap"]
    assert attributes[RUN_ID] == {"stringValue": {"value": "run-7"}}
    # An int64 travels as a decimal string in JSON; the exporter labels every span with itself.
    assert child["attributes"]["attributeMap"]["rows"] == {"intValue": "12"}
    assert attributes["g.co/agent"]["stringValue"]["value"].startswith("opentelemetry-python ")
    assert "childSpanCount" not in root
    # The stand-in's own read-back answers the same spans.
    listed = httpx.get(f"{stand_in.url}/v2/projects/{PROJECT}/spans").json()["spans"]
    assert by_name(listed) == spans


def test_a_span_over_the_v2_display_name_limit_fails_the_export(
    stand_in: CloudTraceStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    # The exporter cuts display names at 1024 bytes; Cloud Trace v2 takes 128 (rule T5).
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with provider.get_tracer("test").start_as_current_span("x" * 129):
        pass

    result = cloud_trace_exporter(PROJECT, stand_in.url).export(memory.get_finished_spans())

    assert result is SpanExportResult.FAILURE
    assert stand_in.spans() == []
    assert "Error while writing to Cloud Trace" in caplog.text


def span(**changes: Any) -> Span:
    """A valid span of PROJECT, with `changes` (None removes a field)."""
    now = dt.datetime.now(dt.UTC)
    fields: dict[str, Any] = {
        "name": f"projects/{PROJECT}/traces/{TRACE}/spans/{SPAN}",
        "span_id": SPAN,
        "display_name": TruncatableString(value="step"),
        "start_time": now,
        "end_time": now + dt.timedelta(milliseconds=5),
    }
    fields.update(changes)
    return Span(**{k: v for k, v in fields.items() if v is not None})


def attributes(count: int = 1, key: str = "k", value: str = "v") -> Span.Attributes:
    return Span.Attributes(
        attribute_map={
            f"{key}{i}" if count > 1 else key: {"string_value": TruncatableString(value=value)}
            for i in range(count)
        }
    )


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"name": f"projects/{PROJECT}/traces/{TRACE[:31]}/spans/{SPAN}"}, "name"),
        ({"name": f"projects/{PROJECT}/traces/{TRACE}/spans/{SPAN}0"}, "name"),
        ({"name": f"projects/{PROJECT}/traces/{'0' * 32}/spans/{SPAN}"}, "name"),
        ({"name": f"projects/other/traces/{TRACE}/spans/{SPAN}"}, "name"),
        ({"span_id": "1" * 16}, "spanId"),
        ({"parent_span_id": "abc"}, "parentSpanId"),
        ({"display_name": None}, "displayName"),
        ({"display_name": TruncatableString(value="é" * 65)}, "displayName"),
        ({"end_time": None}, "endTime"),
        ({"start_time": None}, "startTime"),
        ({"attributes": attributes(count=33)}, "attributes"),
        ({"attributes": attributes(key="k" * 129)}, "attributes"),
        ({"attributes": attributes(value="v" * 257)}, "attributes.attributeMap['k'].stringValue"),
    ],
)
def test_a_span_breaking_a_rule_is_refused_with_bad_request(
    stand_in: CloudTraceStandIn, client: TraceServiceClient, changes: dict[str, Any], field: str
) -> None:
    with pytest.raises(gexc.BadRequest) as refused:
        client.batch_write_spans(name=f"projects/{PROJECT}", spans=[span(), span(**changes)])

    assert refused.value.code == 400
    assert f"spans[1].{field}" in refused.value.message
    assert stand_in.spans() == []  # rule T11: none of a refused batch is kept


def test_a_span_at_every_limit_is_accepted(
    stand_in: CloudTraceStandIn, client: TraceServiceClient
) -> None:
    at_limits = [
        span(display_name=TruncatableString(value="é" * 64)),
        span(attributes=attributes(count=32)),
        span(attributes=attributes(key="k" * 128, value="v" * 256)),
    ]

    client.batch_write_spans(name=f"projects/{PROJECT}", spans=at_limits)

    assert len(stand_in.spans(PROJECT)) == 3


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[]", b'{"spans": []}', b'{"spans": [{"nmae": "x"}]}', b'{"span": []}'],
)
def test_a_malformed_body_is_invalid_argument_in_the_google_error_format(
    stand_in: CloudTraceStandIn, body: bytes
) -> None:
    answer = httpx.post(
        f"{stand_in.url}/v2/projects/{PROJECT}/traces:batchWrite",
        content=body,
        headers={"Content-Type": "application/json"},
    )

    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == 400
    assert error["status"] == "INVALID_ARGUMENT"
    assert error["message"]


def test_other_methods_are_not_found(stand_in: CloudTraceStandIn) -> None:
    answer = httpx.post(f"{stand_in.url}/v2/projects/{PROJECT}/traces/{TRACE}/spans/{SPAN}")

    assert answer.status_code == 404
    assert answer.json()["error"]["status"] == "NOT_FOUND"
