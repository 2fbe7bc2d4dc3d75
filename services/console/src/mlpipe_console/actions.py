"""The console's actions: promote, rollback (the deployer's routes, the request the CLI sends)
and replay (the CLI's replay), each recorded with who asked, what, when and how it ended.

An action from someone not allowed to act is refused before anything is sent, and the refusal
is recorded as well.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from mlpipe.messaging import kept_failures
from mlpipe.runtime import rollout_requests
from mlpipe.store import layout
from mlpipe.store.storage import Storage
from mlpipe_console.identity import Caller

ROLLOUT_ACTIONS = rollout_requests.ACTIONS
ACTIONS = (*ROLLOUT_ACTIONS, "replay")


@dataclass(frozen=True)
class ActionRecord:
    id: str
    at: str
    who: str
    how: str
    action: str
    target: str
    allowed: bool
    ok: bool
    status: int  # the HTTP status the console answered
    outcome: str
    path: str = ""


@dataclass(frozen=True)
class Deployer:
    """Where the deployer is, and the Authorization header its routes need ("" locally)."""

    url: str
    authorization: Callable[[], str] = lambda: ""


def record(storage: Storage, entry: ActionRecord) -> ActionRecord:
    """Write `entry` once (create-if-absent under its own id); the record with its path."""
    when = dt.datetime.fromisoformat(entry.at)
    path = layout.console_action_path(when, entry.id)
    stored = ActionRecord(**{**asdict(entry), "path": path})
    storage.create_if_absent(path, json.dumps(asdict(stored), indent=2, sort_keys=True).encode())
    return stored


def _entry(caller: Caller, action: str, target: str, **outcome: Any) -> ActionRecord:
    return ActionRecord(
        id=uuid.uuid4().hex[:16],
        at=dt.datetime.now(dt.UTC).isoformat(),
        who=caller.identity,
        how=caller.how,
        action=action,
        target=target,
        **outcome,
    )


def refuse(storage: Storage, caller: Caller, action: str, target: str) -> ActionRecord:
    """Record that `caller` asked for `action` and was not allowed (403)."""
    return record(
        storage,
        _entry(
            caller,
            action,
            target,
            allowed=False,
            ok=False,
            status=403,
            outcome=(
                f"{caller.identity} may not {action} "
                "(not in MLPIPE_CONSOLE_ACTORS, nor in a group it lists)"
            ),
        ),
    )


def rollout(
    storage: Storage, deployer: Deployer, caller: Caller, model: str, action: str
) -> ActionRecord:
    """Ask the deployer to promote or roll back `model`, as `mlpipe promote` / `rollback` do."""
    if action not in ROLLOUT_ACTIONS:
        raise ValueError(f"not a rollout action: {action!r}")
    if not caller.may_act:
        return refuse(storage, caller, action, model)
    try:
        reply = rollout_requests.request_rollout(
            deployer.url,
            model,
            action,
            requested_by=f"console:{caller.identity}",
            authorization=deployer.authorization(),
        )
    except rollout_requests.RolloutRequestError as exc:
        status = exc.status if exc.status in (409, 503) else 502
        entry = _entry(
            caller, action, model, allowed=True, ok=False, status=status, outcome=exc.message
        )
        return record(storage, entry)
    summary = rollout_requests.rollout_summary(model, action, reply)
    entry = _entry(caller, action, model, allowed=True, ok=True, status=200, outcome=summary)
    return record(storage, entry)


def replay(storage: Storage, project: str, caller: Caller, failure_id: str) -> ActionRecord:
    """Replay one failure (a quarantine/ path or a dead letter's id), as `mlpipe failures
    replay` does."""
    if not caller.may_act:
        return refuse(storage, caller, "replay", failure_id)
    try:
        done = kept_failures.replay(storage, project, failure_id)
    except kept_failures.ReplayError as exc:
        entry = _entry(
            caller, "replay", failure_id, allowed=True, ok=False, status=409, outcome=str(exc)
        )
        return record(storage, entry)
    entry = _entry(
        caller, "replay", failure_id, allowed=True, ok=True, status=200, outcome=f"→ {done}"
    )
    return record(storage, entry)


def recent(storage: Storage, limit: int = 50) -> list[dict[str, Any]]:
    """The latest action records, newest first."""
    names = sorted(storage.list(layout.CONSOLE_AUDIT), reverse=True)[:limit]
    return [found for name in names if (found := storage.read_json(name)) is not None]
