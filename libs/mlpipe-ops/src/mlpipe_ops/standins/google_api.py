"""What every Google REST API answers alike: the error body, status codes and timestamps.

Errors follow https://cloud.google.com/apis/design/errors: a `google.rpc.Status` whose JSON form
is `{"error": {"code": <HTTP status>, "message": ..., "status": "<google.rpc.Code name>"}}`, with
the HTTP status that page maps each code to. Inside a long-running operation the same Status
carries the numeric `google.rpc.Code` instead (`{"code": 9, "message": ...}`).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

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
