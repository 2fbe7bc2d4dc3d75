"""What every push service shares: clients, the push endpoint, and the process entry point.

A push handler is thin: parse the envelope, call the service's pure step, map the outcome
to a status. 2xx acknowledges (done, duplicate, or a permanent error that was quarantined and
reported); 503 asks Pub/Sub to retry (transient); 500 is a bug and is retried until the
subscription's dead-letter policy takes the message.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from mlpipe.errors import Held, PermanentError, TransientError
from mlpipe.messaging.push import EnvelopeError, PushMessage, parse_envelope
from mlpipe.runtime.auth import PushAuthError, push_verifier
from mlpipe.runtime.clients import Clients
from mlpipe.runtime.failures import FailureReporter
from mlpipe.runtime.logs import CloudLoggingFormatter, run_context, setup_logging
from mlpipe.runtime.settings import CommonSettings, SettingsError, load_settings
from mlpipe.runtime.steps import Outcome, Step
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

    with run_context(run_id=message.attributes.get("run_id", ""), trace=trace):
        try:
            result = step(message)
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
        limit = clients.settings.max_push_bytes if clients else 14_000_000
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return JSONResponse(
                {"error": "too_large", "detail": f"push body over the {limit}-byte limit"}, 413
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return JSONResponse(
                    {"error": "too_large", "detail": f"push body over the {limit}-byte limit"}, 413
                )
            chunks.append(chunk)
        body = b"".join(chunks)
        trace = request.headers.get("x-cloud-trace-context", "").split("/", 1)[0]
        status, reply = await run_in_threadpool(
            handle_push, body, get_step(request), get_failures(request), trace
        )
        return JSONResponse(reply, status_code=status)

    return receive


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


def create_app(service: str, lifespan: Any) -> FastAPI:
    """A service app with the push route and a health route.

    The lifespan must set `app.state.clients` (Clients) and `app.state.step` (Step).
    """
    app = FastAPI(title=f"mlpipe {service}", lifespan=lifespan)
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
