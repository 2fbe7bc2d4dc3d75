"""One OpenTelemetry trace per run, across every service and job.

Each push delivery is a span (`handle_push`), the work inside a step is spans under it
(`span`), and the context travels on:

- **Pub/Sub messages**, by the client library's own propagation: a Publisher made while
  tracing is on enables `PublisherOptions.enable_open_telemetry_tracing`, whose "create" span
  injects the W3C `traceparent` as the `googclient_traceparent` attribute
  (google/cloud/pubsub_v1/open_telemetry/context_propagation.py). A push delivery carries the
  message's attributes, so the receiving step continues the publisher's trace.
- **A landed dataset object**, whose custom metadata `traceparent` is set by ingest: the
  Cloud Storage notification that starts training carries the object resource, metadata
  included, so training continues ingest's trace.
- **A training job** (a subprocess or a Vertex AI CustomJob), in its `TRACEPARENT`
  environment variable.

Where spans go (`MLPIPE_TRACE_EXPORTER`):
- `off` (the default): no provider is set; the API's no-op tracer costs next to nothing.
- `file`: JSON lines under `MLPIPE_TRACE_DIR`, one file per process (the local stack, whose
  state directory keeps them; `mlpipe timeline` and the console read them back).
- `cloud-trace`: Cloud Trace, through its OpenTelemetry exporter (the service account needs
  `roles/cloudtrace.agent`). `MLPIPE_TRACE_ENDPOINT=http://…` sends to a local stand-in.

A run's spans carry `mlpipe.run_id`, and the run's events carry the trace id
(`RunContext.trace_id`), so each finds the other.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from google.auth.exceptions import DefaultCredentialsError
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

TRACER = "mlpipe"
# The Pub/Sub client library's attribute prefix for propagated context.
PUBSUB_PREFIX = "googclient_"
# The custom metadata key on a landed object, and the job's environment variable.
OBJECT_METADATA_KEY = "traceparent"
ENV_TRACEPARENT = "TRACEPARENT"
RUN_ID = "mlpipe.run_id"
EXPORTERS = ("off", "file", "cloud-trace")

_PROPAGATOR = TraceContextTextMapPropagator()
_state: dict[str, Any] = {"enabled": False, "provider": None, "service": ""}


class TracingError(ValueError):
    """A tracing setting that cannot work (the setting is named)."""


def configure(
    service: str,
    exporter: str = "off",
    *,
    project: str = "",
    directory: str = "",
    endpoint: str = "",
) -> bool:
    """Set this process's tracer provider once; whether tracing is on.

    Call it in the process that serves (after a fork: a span processor's thread does not
    survive one)."""
    if exporter not in EXPORTERS:
        raise TracingError(f"MLPIPE_TRACE_EXPORTER={exporter!r}: one of {', '.join(EXPORTERS)}")
    if exporter == "off" or _state["enabled"]:
        return bool(_state["enabled"])
    _state["service"] = service
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    chosen: SpanExporter
    if exporter == "file":
        if not directory:
            raise TracingError("MLPIPE_TRACE_EXPORTER=file needs MLPIPE_TRACE_DIR")
        chosen = JsonLinesExporter(Path(directory), service)
    else:
        if not project:
            raise TracingError("MLPIPE_TRACE_EXPORTER=cloud-trace needs MLPIPE_PROJECT")
        try:
            chosen = cloud_trace_exporter(project, endpoint)
        except DefaultCredentialsError as exc:
            # Traces are for looking at the work, never a reason for the work not to run.
            log.warning("tracing off: no credentials to send spans to Cloud Trace (%s)", exc)
            return False
    provider = TracerProvider(resource=Resource.create({"service.name": f"mlpipe-{service}"}))
    provider.add_span_processor(BatchSpanProcessor(chosen, schedule_delay_millis=500))
    trace.set_tracer_provider(provider)
    _state.update(enabled=True, provider=provider)
    atexit.register(provider.shutdown)  # what is still queued is sent before the exit
    return True


def enabled() -> bool:
    return bool(_state["enabled"])


def flush(timeout_millis: int = 5000) -> None:
    """Export what is queued now (a job about to exit, a test about to read)."""
    provider = _state["provider"]
    if provider is not None:
        provider.force_flush(timeout_millis)


def cloud_trace_exporter(project: str, endpoint: str = "") -> Any:
    """Cloud Trace's exporter; with an http:// endpoint, over REST without credentials (a
    local stand-in of cloudtrace.googleapis.com)."""
    from opentelemetry.exporter.cloud_trace import CloudTraceSpanExporter

    client = None
    if endpoint:
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials
        from google.cloud.trace_v2 import TraceServiceClient

        client = TraceServiceClient(
            transport="rest",
            credentials=AnonymousCredentials(),
            client_options=ClientOptions(api_endpoint=endpoint),
        )
    return CloudTraceSpanExporter(project_id=project, client=client)


# --- carrying the context ---------------------------------------------------------------
class _Prefixed:
    """A getter over a string map whose keys carry `prefix` (the Pub/Sub library's)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        found = carrier.get(self.prefix + key)
        return None if found is None else [found]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return [k[len(self.prefix) :] for k in carrier if k.startswith(self.prefix)]


def context_of(attributes: Mapping[str, str], data: bytes = b"") -> otel_context.Context | None:
    """The trace context a delivery continues: from the message's `googclient_` attributes,
    else from the metadata of the object a Cloud Storage notification describes; None for
    none (the delivery starts a trace)."""
    if any(k.startswith(PUBSUB_PREFIX) for k in attributes):
        return _PROPAGATOR.extract(attributes, getter=_Prefixed(PUBSUB_PREFIX))  # type: ignore[arg-type]
    if "objectId" in attributes and data:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            metadata = (json.loads(data) or {}).get("metadata") or {}
            if metadata.get(OBJECT_METADATA_KEY):
                return from_traceparent(str(metadata[OBJECT_METADATA_KEY]))
    return None


def from_traceparent(value: str) -> otel_context.Context | None:
    if not value:
        return None
    return _PROPAGATOR.extract({"traceparent": value})


def traceparent() -> str:
    """The current span's W3C traceparent ("" outside a recorded span)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent", "")


def trace_id() -> str:
    """The current trace's id, 32 hex digits ("" outside a recorded span)."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def object_metadata() -> dict[str, str]:
    """The custom metadata that carries this trace on an object we write ({} outside one)."""
    value = traceparent()
    return {OBJECT_METADATA_KEY: value} if value else {}


def job_environment() -> dict[str, str]:
    """What a training job needs to continue this trace and send its spans where ours go."""
    parent = traceparent()
    env = {ENV_TRACEPARENT: parent} if parent else {}
    for name in ("MLPIPE_TRACE_EXPORTER", "MLPIPE_TRACE_DIR", "MLPIPE_TRACE_ENDPOINT"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


# --- spans ------------------------------------------------------------------------------
@contextlib.contextmanager
def delivery_span(
    event: str, attributes: Mapping[str, str], data: bytes = b""
) -> Iterator[trace.Span]:
    """The span of one push delivery, continuing the trace the message carries."""
    name = event.rsplit(".", 1)[-1] or ("ObjectFinalize" if "objectId" in attributes else "message")
    service = str(_state["service"])
    with trace.get_tracer(TRACER).start_as_current_span(
        f"{service} {name}",
        context=context_of(attributes, data),
        kind=trace.SpanKind.CONSUMER,
        attributes={
            "messaging.system": "gcp_pubsub",
            "messaging.operation": "process",
            "mlpipe.service": service,
            "mlpipe.event": event,
            **({RUN_ID: attributes["run_id"]} if attributes.get("run_id") else {}),
        },
    ) as current:
        yield current


@contextlib.contextmanager
def span(
    name: str, parent: str = "", attributes: Mapping[str, Any] | None = None
) -> Iterator[trace.Span]:
    """A span for work inside a step: under the current one, or under `parent`, a kept
    traceparent (a job's first span, an export finished by a later check)."""
    values = {k: v for k, v in (attributes or {}).items() if v not in (None, "")}
    context = from_traceparent(parent)
    with trace.get_tracer(TRACER).start_as_current_span(
        name, context=context, attributes=values
    ) as current:
        yield current


def set_run(run_id: str) -> None:
    """Name the run on the current span (once the step knows it)."""
    if run_id:
        trace.get_current_span().set_attribute(RUN_ID, run_id)


# --- the file exporter and reading it back ----------------------------------------------
class JsonLinesExporter(SpanExporter):
    """Spans as JSON lines in `directory/<service>-<pid>.jsonl` (one writer per file)."""

    def __init__(self, directory: Path, service: str) -> None:
        self.path = directory / f"{service}-{os.getpid()}.jsonl"
        self.service = service
        self._lock = threading.Lock()

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        lines = [json.dumps(span_record(s, self.service)) for s in spans]
        try:
            with self._lock:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as out:
                    out.write("".join(line + "\n" for line in lines))
        except OSError:
            log.warning("could not write %d span(s) to %s", len(lines), self.path, exc_info=True)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def span_record(s: Any, service: str) -> dict[str, Any]:
    """One finished SDK span as the JSON the file exporter writes."""
    parent = s.parent
    return {
        "trace_id": format(s.context.trace_id, "032x"),
        "span_id": format(s.context.span_id, "016x"),
        "parent_id": format(parent.span_id, "016x") if parent is not None else "",
        "name": s.name,
        "service": service,
        "start_ns": s.start_time,
        "end_ns": s.end_time,
        "status": s.status.status_code.name,
        "attributes": {k: v for k, v in (s.attributes or {}).items()},
    }


def read_spans(directory: str | Path) -> list[dict[str, Any]]:
    """Every span the file exporter wrote under `directory` (a torn last line is skipped)."""
    found: list[dict[str, Any]] = []
    for path in sorted(Path(directory).glob("*.jsonl")):
        with contextlib.suppress(OSError):
            for line in path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError):
                    found.append(json.loads(line))
    return found


def run_spans(directory: str | Path, run_id: str, trace_ids: Sequence[str] = ()) -> list[dict]:
    """The spans of the traces that `run_id`'s spans (or `trace_ids`) belong to, by start."""
    spans = read_spans(directory)
    traces = set(trace_ids) | {
        s["trace_id"] for s in spans if s.get("attributes", {}).get(RUN_ID) == run_id
    }
    return sorted((s for s in spans if s["trace_id"] in traces), key=lambda s: s["start_ns"])


def waterfall(spans: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Spans as the rows of a waterfall: each under its parent, in start order, with its
    depth, its start from the first span's, and its duration (seconds)."""
    if not spans:
        return []
    ids = {s["span_id"] for s in spans}
    children: dict[str, list[dict[str, Any]]] = {}
    for s in sorted(spans, key=lambda s: s["start_ns"]):
        parent = s.get("parent_id", "") if s.get("parent_id", "") in ids else ""
        children.setdefault(parent, []).append(s)
    origin = min(s["start_ns"] for s in spans)
    rows: list[dict[str, Any]] = []

    def visit(parent: str, depth: int) -> None:
        for s in children.get(parent, []):
            rows.append(
                {
                    "name": s["name"],
                    "service": s.get("service", ""),
                    "depth": depth,
                    "start_s": (s["start_ns"] - origin) / 1e9,
                    "duration_s": (s["end_ns"] - s["start_ns"]) / 1e9,
                    "status": s.get("status", ""),
                    "trace_id": s["trace_id"],
                }
            )
            visit(s["span_id"], depth + 1)

    visit("", 0)
    return rows
