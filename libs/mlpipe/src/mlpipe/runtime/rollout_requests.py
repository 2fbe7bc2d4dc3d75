"""Asking the deployer to take a rollout step (promote, rollback): the one request both the
CLI (`mlpipe promote` / `rollback`) and the console send, and the line that sums up its answer.

The deployer owns the rollout and its target, so nothing else moves an alias: it answers 200
with the DeploymentCompleted it published, 202 with it and the target's operations still
running, 409 when the step cannot be taken now (nothing to promote), 503 when it should be
tried again. On GCP the deployer is private: the caller sends a Google ID token for it.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from google.protobuf import json_format

from mlpipe.messaging import events
from mlpipe.v1 import events_pb2

ACTIONS = ("promote", "rollback")
REQUESTED_BY_HEADER = "x-mlpipe-requested-by"


class RolloutRequestError(Exception):
    """The deployer refused the step or did not answer; `status` is its HTTP status (0: no
    answer)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def request_rollout(
    deployer_url: str,
    model: str,
    action: str,
    *,
    requested_by: str,
    authorization: str = "",
    timeout: float = 120.0,
) -> dict[str, Any]:
    """POST /v1/models/<model>:<action> to the deployer; its JSON answer (200 or 202), else
    RolloutRequestError with the deployer's message."""
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}, not {action!r}")
    headers = {REQUESTED_BY_HEADER: requested_by[:64]}
    if authorization:
        headers["Authorization"] = authorization
    request = urllib.request.Request(
        f"{deployer_url.rstrip('/')}/v1/models/{model}:{action}",
        data=b"",
        headers=headers,
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            body = reply.read()
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        try:
            message = str(json.loads(text)["error"]["message"])
        except (ValueError, KeyError, TypeError):
            message = text or exc.reason
        raise RolloutRequestError(exc.code, f"{action} {model}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise RolloutRequestError(0, f"the deployer did not answer: {exc}") from None
    try:
        answer = json.loads(body)
    except ValueError:
        raise RolloutRequestError(502, f"the deployer answered no JSON: {body[:200]!r}") from None
    if not isinstance(answer, dict):
        raise RolloutRequestError(
            502, f"the deployer answered {type(answer).__name__}, not an object"
        )
    return answer


def id_token_authorization(audience: str) -> str:
    """'Bearer <Google ID token for audience>' from the process's credentials (a Cloud Run
    service's own identity), for a private service such as the deployer."""
    import google.auth.transport.requests
    import google.oauth2.id_token

    token = google.oauth2.id_token.fetch_id_token(
        google.auth.transport.requests.Request(), audience
    )
    return f"Bearer {token}"


def rollout_summary(model: str, action: str, reply: dict[str, Any]) -> str:
    """One line for the deployer's reply: the DeploymentCompleted it published, as JSON."""
    done = json_format.ParseDict(
        reply, events_pb2.DeploymentCompleted(), ignore_unknown_fields=True
    )
    split = ", ".join(f"v{t.version} {t.percent}% {events.model_alias(t)}" for t in done.traffic)
    running = [str(name) for name in reply.get("operations", [])]
    if running:
        # 202: accepted; DeploymentCompleted follows once the target's operations are done.
        return f"{model}: {done.reason or action}; rolling out to {split} ({', '.join(running)})"
    return f"{model}: {done.reason or action}; traffic now {split}"
