"""Fetching a dataset over HTTP(S) for ingest, and reading JSON documents into records (CSV
is read by mlpipe.ml.data, as every CSV is).

A fetch problem is a FetchError whose reason names what went wrong (`unreachable`,
`http_status`, `timeout`, `too_large`, `content_type`) and whose message names the URL. 5xx
answers, timeouts and connection errors are retried a bounded number of times with backoff
inside one delivery; whether what is still failing after that is retried by Pub/Sub is the
caller's choice (`FetchError.retryable`). JSON that holds no records is a PermanentError
(`not_records`, `empty_dataset`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from mlpipe.errors import PermanentError

CSV_TYPES = ("text/csv", "application/csv", "text/plain", "application/octet-stream")
JSON_TYPES = ("application/json", "application/x-ndjson", "text/json", "text/plain")


class FetchError(Exception):
    """A source could not be read; `retryable` when a later attempt may succeed."""

    def __init__(self, reason: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retryable = retryable


@dataclass(frozen=True)
class HttpLimits:
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_bytes: int = 100 * 1024 * 1024
    attempts: int = 3
    backoff_seconds: float = 0.5  # doubled after each failed attempt
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)


def _get_once(
    client: httpx.Client, url: str, headers: dict[str, str], limits: HttpLimits
) -> tuple[bytes, str]:
    with client.stream("GET", url, headers=headers) as response:
        if response.status_code >= 500:
            raise FetchError(
                "http_status", f"{url} answered HTTP {response.status_code}", retryable=True
            )
        if response.status_code != 200:
            raise FetchError("http_status", f"{url} answered HTTP {response.status_code}")
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_bytes:
            raise FetchError(
                "too_large",
                f"{url} is {declared} bytes, over the limit of {limits.max_bytes} bytes",
            )
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > limits.max_bytes:
                raise FetchError(
                    "too_large",
                    f"{url} sent more than the limit of {limits.max_bytes} bytes",
                )
            chunks.append(chunk)
        content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
        return b"".join(chunks), content_type


def fetch(
    url: str,
    headers: dict[str, str] | None = None,
    limits: HttpLimits | None = None,
    transport: httpx.BaseTransport | None = None,
) -> tuple[bytes, str]:
    """GET `url`; return (body, content type). Retries 5xx, timeouts and refused connections."""
    limits = limits or HttpLimits()
    if not url.startswith(("http://", "https://")):
        raise FetchError("unreachable", f"{url!r} is not an http(s) URL")
    timeout = httpx.Timeout(limits.read_timeout, connect=limits.connect_timeout)
    delay = limits.backoff_seconds
    last: FetchError | None = None
    with httpx.Client(timeout=timeout, follow_redirects=True, transport=transport) as client:
        for attempt in range(1, limits.attempts + 1):
            try:
                return _get_once(client, url, dict(headers or {}), limits)
            except FetchError as exc:
                if not exc.retryable:
                    raise
                last = exc
            except httpx.TimeoutException as exc:
                last = FetchError(
                    "timeout",
                    f"{url} did not answer within {limits.read_timeout}s ({type(exc).__name__})",
                    retryable=True,
                )
            except httpx.TransportError as exc:
                last = FetchError("unreachable", f"{url} is unreachable: {exc}", retryable=True)
            if attempt < limits.attempts:
                limits.sleep(delay)
                delay *= 2
    assert last is not None
    last.message += f" (after {limits.attempts} attempts)"
    last.args = (last.message,)
    raise last


def check_content_type(url: str, content_type: str, fmt: str) -> None:
    allowed = CSV_TYPES if fmt == "csv" else JSON_TYPES
    if content_type and content_type not in allowed and not content_type.endswith("+json"):
        raise FetchError(
            "content_type", f"{url} is {content_type!r}; a {fmt} source expects one of {allowed}"
        )


def records_at(document: Any, path: str, source: str) -> list[dict[str, Any]]:
    """The list of records at dotted `path` in a JSON document ("" is the top level)."""
    node = document
    for part in [p for p in path.split(".") if p]:
        if not isinstance(node, dict) or part not in node:
            raise PermanentError(
                "not_records", f"{source} has no {part!r} on records path {path!r}"
            )
        node = node[part]
    if not isinstance(node, list) or not all(isinstance(r, dict) for r in node):
        where = f"at {path!r}" if path else "at the top level"
        raise PermanentError("not_records", f"{source} does not hold a list of objects {where}")
    if not node:
        raise PermanentError("empty_dataset", f"{source} holds no records")
    return node


def parse_json(text: str, path: str, source: str) -> list[dict[str, Any]]:
    if not text.strip():
        raise PermanentError("empty_dataset", f"{source} is empty")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PermanentError("not_records", f"{source} is not valid JSON: {exc}") from exc
    return records_at(document, path, source)


def parse_json_lines(text: str, source: str) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PermanentError(
                "not_records", f"{source} line {number} is not JSON: {exc}"
            ) from exc
        if not isinstance(value, dict):
            raise PermanentError("not_records", f"{source} line {number} is not a JSON object")
        records.append(value)
    if not records:
        raise PermanentError("empty_dataset", f"{source} holds no records")
    return records
