"""JSON-line logging in Cloud Logging's structured format, with the run id on every line.

Cloud Run forwards stdout lines that are JSON objects as structured entries: `severity`,
`message`, `logging.googleapis.com/trace` and any other field become searchable.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_run_id: contextvars.ContextVar[str] = contextvars.ContextVar("mlpipe_run_id", default="")
_trace: contextvars.ContextVar[str] = contextvars.ContextVar("mlpipe_trace", default="")

_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's ANSI-coloured copy of the message
}


@contextmanager
def run_context(run_id: str = "", trace: str = "") -> Iterator[None]:
    """Attach `run_id` (and a Cloud Trace id) to every log line written inside the block."""
    tokens = []
    if run_id:
        tokens.append((_run_id, _run_id.set(run_id)))
    if trace:
        tokens.append((_trace, _trace.set(trace)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def bind_run_id(run_id: str) -> None:
    """Set the run id for the rest of the current context (a request or a job)."""
    _run_id.set(run_id)


class CloudLoggingFormatter(logging.Formatter):
    def __init__(self, service: str, project: str = "") -> None:
        super().__init__()
        self.service = service
        self.project = project

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": record.levelname if record.levelname != "WARNING" else "WARNING",
            "message": record.getMessage(),
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "logger": record.name,
            "service": self.service,
        }
        run_id = getattr(record, "run_id", None) or _run_id.get()
        if run_id:
            entry["run_id"] = run_id
        trace = _trace.get()
        if trace and self.project:
            entry["logging.googleapis.com/trace"] = f"projects/{self.project}/traces/{trace}"
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and key not in entry and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(service: str, level: str = "INFO", project: str = "") -> None:
    """Route every logger (uvicorn's included) to stdout as Cloud Logging JSON lines."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(CloudLoggingFormatter(service, project))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
