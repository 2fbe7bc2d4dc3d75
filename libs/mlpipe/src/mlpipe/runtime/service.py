"""What every push service shares: clients, the push endpoint, and the process entry point.

A push handler is thin: parse the envelope, call the service's pure step, map the outcome
to a status. 2xx acknowledges (done, duplicate, or a permanent error that was quarantined and
reported); 503 asks Pub/Sub to retry (transient); 500 is a bug and is retried until the
subscription's dead-letter policy takes the message.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import logging
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.telemetry import TelemetryConfig
from google.protobuf.message import Message

from mlpipe import tracing
from mlpipe.errors import Held, PermanentError, TransientError
from mlpipe.messaging import events
from mlpipe.messaging.push import EnvelopeError, PushMessage, parse_envelope
from mlpipe.runtime.auth import PushAuthError, push_verifier
from mlpipe.runtime.clients import Clients
from mlpipe.runtime.failures import FailureReporter
from mlpipe.runtime.logs import CloudLoggingFormatter, run_context, setup_logging
from mlpipe.runtime.settings import CommonSettings, SettingsError, load_settings
from mlpipe.runtime.steps import Outcome, Step
from mlpipe.store import layout
from mlpipe.store import storage as gcs

log = logging.getLogger(__name__)

RETRYABLE: tuple[type[Exception], ...] = (TransientError, *gcs.TRANSIENT_ERRORS)
# A service that cannot start with the settings it was given exits with this code (sysexits'
# EX_CONFIG): restarting it will not help; changing its configuration will.
EXIT_CONFIG = 78


def handle_push(
    body: bytes, step: Step, failures: FailureReporter, trace: str = ""
) -> tuple[int, dict[str, Any]]:
    """Run one push delivery through `step`; return (HTTP status, JSON reply)."""
    try:
        message = parse_envelope(body)
    except EnvelopeError as exc:
        # Not from Pub/Sub: say so to the caller, but keep what was sent.
        try:
            failed = failures.report(reason="invalid_envelope", message=str(exc), payload=body)
        except gcs.TRANSIENT_ERRORS:
            log.exception("could not quarantine an invalid push body")
            return 503, {"error": "unavailable", "detail": "could not keep the payload; retry"}
        return 400, {
            "error": "invalid_envelope",
            "detail": str(exc),
            "quarantine_uri": failed.quarantine_uri,
        }

    event = message.attributes.get(events.EVENT_TYPE_ATTR, "")
    with (
        tracing.delivery_span(event, message.attributes, message.data) as span,
        run_context(run_id=message.attributes.get("run_id", ""), trace=tracing.trace_id() or trace),
    ):
        try:
            result = step(message)
            tracing.set_run(result.run_id)
            span.set_attribute("mlpipe.status", result.status)
            if result.outcome is Outcome.PERMANENT and result.failure is not None:
                return _reject(message, result.failure, failures)
        except PermanentError as exc:
            # Steps not yet on the protocol's return values (mlpipe.runtime.steps) raise.
            return _reject(message, exc, failures)
        except RETRYABLE as exc:
            # Both stay unacknowledged; a held delivery's work is under way, not failing.
            held = isinstance(exc, Held)
            log.log(
                logging.INFO if held else logging.WARNING,
                "%s: %s",
                "held until its work is recorded" if held else "transient failure, retry",
                exc,
                extra={"delivery_attempt": message.delivery_attempt},
            )
            kind = {"status": "held"} if held else {"error": "transient"}
            return 503, {**kind, "detail": str(exc)}
        except Exception as exc:
            log.exception(
                "unexpected error handling message %s",
                message.message_id,
                extra={"delivery_attempt": message.delivery_attempt},
            )
            return 500, {"error": "internal", "detail": f"{type(exc).__name__}: {exc}"}
    if result.outcome in (Outcome.HELD, Outcome.TRANSIENT):
        held = result.outcome is Outcome.HELD
        log.log(
            logging.INFO if held else logging.WARNING,
            "%s: %s",
            "held until its work is recorded" if held else "transient failure, retry",
            result.detail.get("detail", result.status),
            extra={"delivery_attempt": message.delivery_attempt},
        )
        kind = {"status": "held"} if held else {"error": "transient"}
        return 503, {**kind, "run_id": result.run_id, **result.detail}
    return 200, {"status": result.status, "run_id": result.run_id, **result.detail}


def _reject(
    message: PushMessage, exc: PermanentError, failures: FailureReporter
) -> tuple[int, dict[str, Any]]:
    """Report a permanent failure, keeping the payload, and acknowledge it."""
    try:
        failed = failures.report(
            reason=exc.reason,
            message=exc.message,
            payload=message.raw,
            source=message,
            context=exc.context,
            dataset=exc.dataset,
        )
    except gcs.TRANSIENT_ERRORS:
        log.exception("could not report a permanent failure; asking for a retry")
        return 503, {"error": "unavailable", "detail": "could not keep the payload"}
    # Acknowledged: redelivering a message that can never succeed helps nobody.
    return 200, {
        "status": "rejected",
        "reason": exc.reason,
        "detail": exc.message,
        "quarantine_uri": failed.quarantine_uri,
    }


async def _read_body(request: Request, limit: int) -> bytes | JSONResponse:
    """The request's body, or a 413 once it passes `limit` bytes (declared or streamed)."""
    too_large = JSONResponse(
        {"error": "too_large", "detail": f"request body over the {limit}-byte limit"}, 413
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return too_large
        chunks.append(chunk)
    return b"".join(chunks)


def push_endpoint(
    get_step: Callable[[Request], Step], get_failures: Callable[[Request], FailureReporter]
) -> Callable[..., Any]:
    """A FastAPI route function for Pub/Sub push deliveries."""

    async def receive(request: Request) -> JSONResponse:
        from starlette.concurrency import run_in_threadpool

        clients: Clients | None = getattr(request.app.state, "clients", None)
        verifier = clients.push_verifier if clients else None
        if verifier is not None:
            try:
                await run_in_threadpool(verifier.verify, request.headers.get("authorization", ""))
            except PushAuthError as exc:
                log.warning("push refused (%d): %s", exc.status, exc.message)
                return JSONResponse({"error": "unauthorized", "detail": exc.message}, exc.status)
        body = await _read_body(request, clients.settings.max_push_bytes if clients else 14_000_000)
        if isinstance(body, JSONResponse):
            return body
        trace = request.headers.get("x-cloud-trace-context", "").split("/", 1)[0]
        status, reply = await run_in_threadpool(
            handle_push, body, get_step(request), get_failures(request), trace
        )
        return JSONResponse(reply, status_code=status)

    return receive


BINARY_TYPES = ("application/x-protobuf", "application/protobuf", "application/octet-stream")


def direct_call(
    body: bytes,
    content_type: str,
    caller: str,
    cls: type[Message],
    service: str,
    clients: Clients,
    step: Step,
) -> tuple[int, dict[str, Any]]:
    """An event sent over HTTP by a caller that is not Pub/Sub, run through the service's step
    exactly as a push of it would be; (HTTP status, JSON reply).

    The event is JSON or, with a protobuf content type, binary. Its `request_id` (or, without
    one, the body's sha256) makes the call idempotent: the first final answer is recorded at
    `layout.direct_request_path`, and the same request again gets that answer, the same request
    id with another body a 409. A final answer names a run, or is a rejection. A body that is
    not the event is 400 and kept in quarantine; a step's rejection is 422 with its reason and
    where the input was kept; a transient outcome is 503 and work still under way is 200
    without a run, and neither is recorded, so the caller may send it again.
    """
    binary = content_type.split(";")[0].strip().lower() in BINARY_TYPES
    try:
        event = events.decode(cls, body, "BINARY" if binary else "JSON")
    except events.EventDecodeError as exc:
        failed = clients.failures.report(reason="invalid_message", message=str(exc), payload=body)
        return 400, {
            "error": "invalid_message",
            "detail": str(exc),
            "quarantine_uri": failed.quarantine_uri,
        }
    data = event.SerializeToString(deterministic=True)
    request_id = str(getattr(event, "request_id", "")) or gcs.sha256_hex(data)[:32]
    try:
        path = layout.direct_request_path(service, request_id)
    except ValueError as exc:
        return 400, {"error": "invalid_message", "detail": str(exc)}
    sha = gcs.sha256_hex(data)
    recorded = clients.storage.read_json(path)
    if recorded is None:
        status, reply = handle_push(
            _envelope(data, cls, request_id, caller, service, clients), step, clients.failures
        )
        if status == 200 and reply.get("status") == "rejected":
            status = 422
        reply = {**reply, "request_id": request_id}
        if reply.get("run_id"):
            reply["follow"] = f"mlpipe status {reply['run_id']}"
        if status != 422 and not reply.get("run_id"):
            return status, reply  # not final: a retry, or work still under way (an export)
        record = {
            "request_sha256": sha,
            "status": status,
            "reply": reply,
            "caller": caller,
            "at": dt.datetime.now(dt.UTC).isoformat(),
        }
        if clients.storage.create_if_absent(path, json.dumps(record).encode()) is not None:
            return status, reply
        recorded = clients.storage.read_json(path)  # a concurrent call recorded first
        if recorded is None:
            return status, reply
    if recorded.get("request_sha256") != sha:
        return 409, {
            "error": "request_id_reused",
            "detail": f"request {request_id} was already sent with another body "
            f"({clients.storage.uri(path)})",
        }
    return int(recorded["status"]), {**recorded["reply"], "repeated": True}


def _envelope(
    data: bytes, cls: type[Message], request_id: str, caller: str, service: str, clients: Clients
) -> bytes:
    """The push envelope Pub/Sub would have delivered for `data`."""
    name = cls.DESCRIPTOR.full_name
    return json.dumps(
        {
            "message": {
                "data": base64.b64encode(data).decode(),
                "attributes": {
                    events.EVENT_TYPE_ATTR: name,
                    events.SCHEMA_ENCODING_ATTR: "BINARY",
                    "request_id": request_id,
                    "caller": caller,
                },
                "messageId": f"direct-{request_id}",
                "publishTime": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z"),
            },
            "subscription": f"projects/{clients.settings.project}/subscriptions/{service}-direct",
        }
    ).encode()


def direct_endpoint(
    cls: type[Message], service: str, callers: Callable[[Request], frozenset[str]]
) -> Callable[..., Any]:
    """A FastAPI route function taking `cls` over HTTP (see direct_call). With push
    authentication on, the caller needs a Google ID token for this service naming the push
    account or one of `callers`; on the emulators it is "local"."""

    async def receive(request: Request) -> JSONResponse:
        from starlette.concurrency import run_in_threadpool

        clients: Clients = request.app.state.clients
        caller = "local"
        if clients.push_verifier is not None:
            try:
                caller = await run_in_threadpool(
                    clients.push_verifier.verify_caller,
                    request.headers.get("authorization", ""),
                    callers(request),
                )
            except PushAuthError as exc:
                log.warning("direct call refused (%d): %s", exc.status, exc.message)
                return JSONResponse({"error": "unauthorized", "detail": exc.message}, exc.status)
        body = await _read_body(request, clients.settings.max_push_bytes)
        if isinstance(body, JSONResponse):
            return body
        status, reply = await run_in_threadpool(
            direct_call,
            body,
            request.headers.get("content-type", ""),
            caller,
            cls,
            service,
            clients,
            request.app.state.step,
        )
        headers = {"Retry-After": "10"} if status == 503 else None
        return JSONResponse(reply, status_code=status, headers=headers)

    return receive


@contextlib.asynccontextmanager
async def every(seconds: float, check: Callable[[], Any], what: str) -> AsyncIterator[None]:
    """While open, run `check` in the threadpool every `seconds` (0 or less: never): on a local
    stack, the stand-in for the Cloud Scheduler job that calls the same check over HTTP
    (mlpipe_ops.infra.SERVICE_CHECKS). A round that fails is logged and the next one runs."""
    from starlette.concurrency import run_in_threadpool

    async def loop() -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await run_in_threadpool(check)
            except Exception:
                log.exception("%s failed; trying again in %gs", what, seconds)

    task = asyncio.create_task(loop()) if seconds > 0 else None
    try:
        yield
    finally:
        if task is not None:
            task.cancel()


def run(app: str, service: str, settings_class: type[CommonSettings]) -> None:
    """Process entry point: settings, JSON logs, then uvicorn on $PORT (Cloud Run's contract).

    A missing or invalid setting stops the process before the server starts: one CRITICAL
    JSON line on stderr naming it, exit code EXIT_CONFIG, no traceback.
    """
    try:
        settings = load_settings(settings_class)
        if settings.receives_push:
            push_verifier(settings)  # the lifespan builds it again; here it stops a bad start
    except SettingsError as exc:
        exit_on_bad_settings(service, exc)
    setup_logging(service, settings.log_level, settings.project)
    try:
        settings.start_tracing(service)
    except tracing.TracingError as exc:
        exit_on_bad_settings(service, SettingsError(str(exc)))
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=8,
    )


def exit_on_bad_settings(service: str, error: SettingsError) -> NoReturn:
    """Say which setting is wrong in one Cloud Logging line on stderr, and exit EXIT_CONFIG."""
    record = log.makeRecord(
        log.name, logging.CRITICAL, __file__, 0, "cannot start: %s", (error,), None
    )
    print(CloudLoggingFormatter(service).format(record), file=sys.stderr, flush=True)
    raise SystemExit(EXIT_CONFIG)


# No request spans of FastAPI's own: a push's span is the delivery's (tracing.delivery_span),
# continuing the trace its message carries, where a request span would start a trace of its
# own for every delivery; and a span per prediction or health check would cost more than the
# request it describes (and Cloud Trace bills per span).
UNTRACED: TelemetryConfig = {"tracing": False, "operation_spans": False}


def create_app(service: str, lifespan: Any) -> FastAPI:
    """A service app with the push route and a health route.

    The lifespan must set `app.state.clients` (Clients) and `app.state.step` (Step).
    """
    app = FastAPI(title=f"mlpipe {service}", lifespan=lifespan, telemetry=UNTRACED)
    app.add_api_route(
        "/pubsub/push",
        push_endpoint(lambda r: r.app.state.step, lambda r: r.app.state.clients.failures),
        methods=["POST"],
        summary="Pub/Sub push deliveries",
    )

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "service": service}

    return app
