"""A local Cloud Trace API v2: projects.traces.batchWrite, the one method Cloud Trace's
OpenTelemetry exporter calls, answering as the reference says. The real exporter drives it
through `mlpipe.tracing.cloud_trace_exporter(project, stand_in.url)` (the REST
`TraceServiceClient`, anonymous credentials).

A batch whose spans all follow the rules is kept in memory, in the order received, and read
back with `spans()` or with the stand-in's own `GET /v2/projects/{project}/spans` (not a Cloud
Trace method: Cloud Trace v2 has no read method). A batch with one span that breaks a rule is
refused whole with 400 INVALID_ARGUMENT, naming the span and the field.

Every rule and its source are in docs/cloud-trace-standin.md (T1..T12); the comments name them.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import threading
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from mlpipe_ops.standins.google_api import ApiError, close, dumps, json_handler, serve

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
# T1: https://cloud.google.com/trace/docs/reference/v2/rest/v2/projects.traces/batchWrite
BATCH_WRITE = re.compile(r"^/v2/projects/(?P<project>[^/]+)/traces:batchWrite$")
# T12: the stand-in's own read-back (not Cloud Trace's).
SPANS = re.compile(r"^/v2/projects/(?P<project>[^/]+)/spans$")
# T3: Span.name, https://cloud.google.com/trace/docs/reference/v2/rest/v2/projects.traces/batchWrite#Span
SPAN_NAME = re.compile(
    r"^projects/(?P<project>[^/]+)/traces/(?P<trace>[0-9a-fA-F]{32})/spans/(?P<span>[0-9a-fA-F]{16})$"
)
SPAN_ID = re.compile(r"^[0-9a-fA-F]{16}$")
# T6: RFC 3339 with up to nine fractional digits, "Z" or an offset (google.protobuf.Timestamp in
# JSON: https://github.com/protocolbuffers/protobuf/blob/main/src/google/protobuf/timestamp.proto).
TIMESTAMP = re.compile(
    r"^(?P<second>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.\d{1,9})?(?P<zone>Z|[+-]\d{2}:\d{2})$"
)
# T5: displayName "up to 128 bytes".
DISPLAY_NAME_BYTES = 128
# T7: "up to 32 attributes per span"; a key up to 128 bytes, a string value up to 256 bytes
# (https://cloud.google.com/trace/docs/reference/v2/rpc/google.devtools.cloudtrace.v2, Span,
# Span.Attributes and AttributeValue).
MAX_ATTRIBUTES = 32
ATTRIBUTE_KEY_BYTES = 128
ATTRIBUTE_VALUE_BYTES = 256
VALUE_KINDS = ("stringValue", "intValue", "boolValue")
INT64 = (-(2**63), 2**63 - 1)
# T9: the Span fields of the JSON representation
# (https://cloud.google.com/trace/docs/reference/v2/rest/v2/projects.traces.spans/createSpan).
SPAN_FIELDS = frozenset(
    {
        "name",
        "spanId",
        "parentSpanId",
        "displayName",
        "startTime",
        "endTime",
        "attributes",
        "stackTrace",
        "timeEvents",
        "links",
        "status",
        "sameProcessAsParentSpan",
        "childSpanCount",
        "spanKind",
    }
)


def invalid(message: str) -> ApiError:
    """T10: a request that breaks a rule is 400 INVALID_ARGUMENT in the google error body."""
    return ApiError("INVALID_ARGUMENT", message)


@dataclass
class CloudTraceStandIn:
    """The stand-in: `start()` serves it on 127.0.0.1 (a free port unless `port` is given) in
    a thread, `stop()` ends it."""

    port: int = 0
    _spans: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> CloudTraceStandIn:
        handler = json_handler(self, "cloud trace", ("GET", "POST"))
        self._server = serve(handler, self.port, "trace")
        self.port = self._server.server_address[1]
        return self

    def stop(self) -> None:
        close(self._server)
        self._server = None

    def __enter__(self) -> CloudTraceStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def spans(self, project: str = "") -> list[dict[str, Any]]:
        """The spans accepted so far (of `project`, or of every project), as received."""
        with self._lock:
            return [s for s in self._spans if not project or _project_of(s) == project]

    # --- requests ----------------------------------------------------------------------------
    def handle(self, method: str, path: str, raw: bytes) -> tuple[int, bytes]:
        route = urlsplit(path).path
        try:
            if method == "POST" and (m := BATCH_WRITE.match(route)):
                self._batch_write(m["project"], _body(raw))
                return 200, dumps({})  # T1: an empty JSON object
            if method == "GET" and (m := SPANS.match(route)):
                return 200, dumps({"spans": self.spans(m["project"])})
            raise ApiError("NOT_FOUND", f"no method {method} {route} here")
        except ApiError as exc:
            return exc.http_status, dumps(exc.body())

    def _batch_write(self, project: str, body: dict[str, Any]) -> None:
        spans = body.get("spans")
        if not isinstance(spans, list) or not spans:  # T2
            raise invalid("spans: a non-empty list of Span is required")
        for i, span in enumerate(spans):
            check_span(f"spans[{i}]", span, project)
        with self._lock:  # T11: all of the batch or none of it
            self._spans.extend(spans)


def _body(raw: bytes) -> dict[str, Any]:
    """T10: the request body is a JSON object."""
    try:
        body = json.loads(raw) if raw else {}
    except ValueError as exc:
        raise invalid(f"Invalid JSON payload received. {exc}") from None
    if not isinstance(body, dict):
        raise invalid("Invalid JSON payload received. The body must be a JSON object.")
    unknown = sorted(set(body) - {"spans"})
    if unknown:  # T9
        raise invalid(
            f'Invalid JSON payload received. Unknown name "{unknown[0]}": Cannot find field.'
        )
    return body


def _project_of(span: dict[str, Any]) -> str:
    m = SPAN_NAME.match(str(span.get("name", "")))
    return m["project"] if m else ""


# --- the rules on one span ----------------------------------------------------------------
def check_span(where: str, span: Any, project: str) -> None:
    """Refuse `span` (at `where` in the request) unless it follows T3..T9."""
    if not isinstance(span, dict):
        raise invalid(f"{where}: a Span is a JSON object")
    unknown = sorted(set(span) - SPAN_FIELDS)
    if unknown:  # T9
        raise invalid(
            f"Invalid JSON payload received. Unknown name \"{unknown[0]}\" at '{where}': "
            "Cannot find field."
        )
    _check_ids(where, span, project)
    _check_truncatable(f"{where}.displayName", span.get("displayName"), DISPLAY_NAME_BYTES)  # T5
    for key in ("startTime", "endTime"):  # T6
        _check_timestamp(f"{where}.{key}", span.get(key))
    _check_attributes(f"{where}.attributes", span.get("attributes"))  # T7, T8


def _check_ids(where: str, span: dict[str, Any], project: str) -> None:
    name = span.get("name")
    m = SPAN_NAME.match(name) if isinstance(name, str) else None
    if m is None:  # T3
        raise invalid(
            f"{where}.name: {name!r} is not projects/[PROJECT_ID]/traces/[TRACE_ID]/spans/"
            "[SPAN_ID] with a 32-hex-digit trace id and a 16-hex-digit span id"
        )
    if set(m["trace"]) == {"0"} or set(m["span"]) == {"0"}:  # T3: "It should not be zero."
        raise invalid(f"{where}.name: the trace id and the span id must not be zero")
    if m["project"] != project:  # T4
        raise invalid(f"{where}.name: project {m['project']!r} is not the request's {project!r}")
    if span.get("spanId") != m["span"]:  # T3
        raise invalid(f"{where}.spanId: {span.get('spanId')!r} is not the name's {m['span']!r}")
    parent = span.get("parentSpanId", "")
    if parent and not (isinstance(parent, str) and SPAN_ID.match(parent)):  # T3
        raise invalid(f"{where}.parentSpanId: {parent!r} is not 16 hex digits")


def _check_truncatable(where: str, value: Any, limit: int, *, required: bool = True) -> None:
    """A TruncatableString whose `value` is at most `limit` bytes in UTF-8 (T5, T8). An empty
    value is left out of the JSON, so `{}` is the empty string: refused where one is required."""
    if not isinstance(value, dict):
        raise invalid(f"{where}: a TruncatableString is required")
    text = value.get("value", "")
    if not isinstance(text, str) or (required and not text):
        raise invalid(f"{where}: a TruncatableString with a value is required")
    size = len(text.encode("utf-8"))
    if size > limit:
        raise invalid(f"{where}: {size} bytes, more than {limit}")
    dropped = value.get("truncatedByteCount", 0)
    if not isinstance(dropped, int) or isinstance(dropped, bool) or dropped < 0:
        raise invalid(f"{where}.truncatedByteCount: {dropped!r} is not a count of bytes")


def _check_timestamp(where: str, value: Any) -> None:
    m = TIMESTAMP.match(value) if isinstance(value, str) else None
    if m is None:
        raise invalid(f"{where}: {value!r} is not an RFC 3339 timestamp (required)")
    zone = "+00:00" if m["zone"] == "Z" else m["zone"]
    try:
        dt.datetime.fromisoformat(m["second"] + zone)
    except ValueError:
        raise invalid(f"{where}: {value!r} is not a date and time") from None


def _check_attributes(where: str, attributes: Any) -> None:
    if attributes is None:
        return
    if not isinstance(attributes, dict):
        raise invalid(f"{where}: Attributes is a JSON object")
    found = attributes.get("attributeMap") or {}
    if not isinstance(found, dict):
        raise invalid(f"{where}.attributeMap: a map of key to AttributeValue")
    if len(found) > MAX_ATTRIBUTES:  # T7
        raise invalid(f"{where}: {len(found)} attributes, more than {MAX_ATTRIBUTES}")
    for key, value in found.items():
        size = len(key.encode("utf-8"))
        if size > ATTRIBUTE_KEY_BYTES:  # T7
            raise invalid(
                f"{where}: key {key[:40]!r}… is {size} bytes, more than {ATTRIBUTE_KEY_BYTES}"
            )
        _check_value(f"{where}.attributeMap[{key!r}]", value)


def _check_value(where: str, value: Any) -> None:
    """T8: an AttributeValue is one of a string (≤ 256 bytes), an int64 or a bool."""
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in VALUE_KINDS:
        raise invalid(f"{where}: exactly one of {', '.join(VALUE_KINDS)}")
    ((kind, inner),) = value.items()
    if kind == "stringValue":
        _check_truncatable(f"{where}.stringValue", inner, ATTRIBUTE_VALUE_BYTES, required=False)
    elif kind == "boolValue" and not isinstance(inner, bool):
        raise invalid(f"{where}.boolValue: {inner!r} is not true or false")
    elif kind == "intValue" and not _is_int64(inner):
        raise invalid(f"{where}.intValue: {inner!r} is not a 64-bit signed integer")


def _is_int64(value: Any) -> bool:
    """An int64 in JSON: a number or a decimal string
    (https://protobuf.dev/programming-guides/json/)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value):
        value = int(value)
    return isinstance(value, int) and INT64[0] <= value <= INT64[1]
