"""What every Google REST API answers alike: the error body, status codes and timestamps; and
how a stand-in of one is served on this machine (`json_handler`, `serve`, `close`).

Errors follow https://cloud.google.com/apis/design/errors: a `google.rpc.Status` whose JSON form
is `{"error": {"code": <HTTP status>, "message": ..., "status": "<google.rpc.Code name>"}}`, with
the HTTP status that page maps each code to. Inside a long-running operation the same Status
carries the numeric `google.rpc.Code` instead (`{"code": 9, "message": ...}`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

log = logging.getLogger(__name__)

# google.rpc.Code: (number, HTTP status), from the errors page's mapping table.
CODES: dict[str, tuple[int, int]] = {
    "CANCELLED": (1, 499),
    "UNKNOWN": (2, 500),
    "INVALID_ARGUMENT": (3, 400),
    "DEADLINE_EXCEEDED": (4, 504),
    "NOT_FOUND": (5, 404),
    "ALREADY_EXISTS": (6, 409),
    "PERMISSION_DENIED": (7, 403),
    "RESOURCE_EXHAUSTED": (8, 429),
    "FAILED_PRECONDITION": (9, 400),
    "ABORTED": (10, 409),
    "OUT_OF_RANGE": (11, 400),
    "UNIMPLEMENTED": (12, 501),
    "INTERNAL": (13, 500),
    "UNAVAILABLE": (14, 503),
    "UNAUTHENTICATED": (16, 401),
}
STATUS_BY_HTTP = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


class ApiError(Exception):
    """A refused request: a google.rpc.Code name and a message for the caller."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        if status not in CODES:
            raise ValueError(f"unknown google.rpc.Code {status!r}")
        self.status = status
        self.message = message

    @property
    def http_status(self) -> int:
        return CODES[self.status][1]

    def body(self) -> dict[str, Any]:
        """The JSON error body of a refused REST call."""
        return {"error": {"code": self.http_status, "message": self.message, "status": self.status}}

    def rpc_status(self) -> dict[str, Any]:
        """The google.rpc.Status JSON of a failed operation or job (`Operation.error`)."""
        return {"code": CODES[self.status][0], "message": self.message}


def _label_char(c: str) -> bool:
    # Lowercase letters (international ones too: lowercase, or letters without case),
    # numeric characters, underscores and dashes.
    return c.islower() or (c.isalpha() and not c.isupper()) or c.isnumeric() or c in "_-"


def label_problem(labels: Any, max_length: int = 63, max_count: int = 64) -> str:
    """Why `labels` break Google's label rules, or "" (rule table: docs/*-standin.md, from
    https://cloud.google.com/resource-manager/docs/labels-overview#requirements): at most 64
    labels; keys and values at most 63 characters (Vertex AI: 64) of lowercase letters,
    numeric characters, underscores and dashes, international characters allowed; a key
    starts with a lowercase letter and is not empty; a value may be empty."""
    if labels is None:
        return ""
    if not isinstance(labels, dict):
        return "labels must be a map of strings"
    if len(labels) > max_count:
        return f"{len(labels)} labels: at most {max_count} are allowed"
    for key, value in labels.items():
        key, value = str(key), "" if value is None else str(value)
        if not key or not (key[0].islower() or (key[0].isalpha() and not key[0].isupper())):
            return f"label key {key!r} must start with a lowercase letter"
        for what, text in (("key", key), ("value", value)):
            if len(text) > max_length:
                return f"label {what} {text!r} is longer than {max_length} characters"
            bad = sorted({c for c in text if not _label_char(c)})
            if bad:
                return (
                    f"label {what} {text!r} has {''.join(bad)!r}: only lowercase letters, "
                    "numeric characters, underscores and dashes are allowed"
                )
    return ""


def check_labels(labels: Any, where: str, max_length: int = 63) -> None:
    """Refuse labels that break the rules (label_problem) with INVALID_ARGUMENT, naming the
    field `where`."""
    problem = label_problem(labels, max_length)
    if problem:
        raise ApiError("INVALID_ARGUMENT", f"{where}: {problem}")


def status_for_http(code: int) -> str:
    """The google.rpc.Code name an HTTP status stands for (errors page, in reverse)."""
    if code in STATUS_BY_HTTP:
        return STATUS_BY_HTTP[code]
    return "INTERNAL" if code >= 500 else "INVALID_ARGUMENT"


def timestamp(at: dt.datetime | None = None) -> str:
    """An RFC 3339 UTC timestamp, the JSON form of google.protobuf.Timestamp."""
    at = at or dt.datetime.now(dt.UTC)
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def dumps(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


# --- serving a stand-in over HTTP on this machine ---------------------------------------------
HOST = "127.0.0.1"


class Handles(Protocol):
    """A stand-in that answers a request from its method, path (with the query) and body."""

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, bytes]: ...


def read_body(request: BaseHTTPRequestHandler) -> bytes:
    length = int(request.headers.get("Content-Length") or 0)
    return request.rfile.read(length) if length else b""


def send_json(request: BaseHTTPRequestHandler, status: int, data: bytes) -> None:
    request.send_response(status)
    request.send_header("Content-Type", "application/json; charset=UTF-8")
    request.send_header("Content-Length", str(len(data)))
    request.end_headers()
    request.wfile.write(data)


def json_handler(
    stand_in: Handles, name: str, methods: tuple[str, ...]
) -> type[BaseHTTPRequestHandler]:
    """A request handler passing `methods` to `stand_in.handle` (any other is the server's
    501), its log lines at debug level under `name`."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out as two writes: without TCP_NODELAY the second waits for the
        # client's delayed ACK (40 ms a request).
        disable_nagle_algorithm = True

        def _answer(self) -> None:
            status, payload = stand_in.handle(self.command, self.path, read_body(self))
            send_json(self, status, payload)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug(f"{name} stand-in: " + format, *args)

    for method in methods:
        setattr(Handler, f"do_{method}", Handler._answer)
    return Handler


def serve(handler: type[BaseHTTPRequestHandler], port: int, name: str) -> ThreadingHTTPServer:
    """`handler` on HOST:`port` (0: a free one, then `server.server_address[1]`), served in a
    daemon thread until `close`."""
    server = ThreadingHTTPServer((HOST, port), handler)
    server.daemon_threads = True
    threading.Thread(
        target=server.serve_forever, args=(0.05,), name=f"{name}-standin", daemon=True
    ).start()
    return server


def close(server: ThreadingHTTPServer | None) -> None:
    if server is not None:
        server.shutdown()
        server.server_close()
