"""Approval requests (docs/promotion.md): a promotion into an environment whose file says
`approval: required` moves nothing until a person approves it. The request is one object in
the target environment's bucket, `approvals/<id>.json` (mlpipe.store.layout.approval_path):

    {"id", "state": "pending" | "approved" | "rejected", "model", "version", "from_env",
     "to_env", "source": {env, project, bucket, run_id, model_uri, model_sha256, artifacts},
     "requested_by", "requested_by_source", "requested_at", "expires_at",
     "decided_by", "decided_by_source", "decided_at", "reason", "run_id", "promotion_uri"}

A request is decided once: the decision is a compare-and-swap on the generation the decider
read, so of two approvers racing exactly one wins and the other is told it was decided. A
pending request past its `expires_at` is expired: listed as such, and never decided (a new
`mlpipe promote` asks again).
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from google.api_core import exceptions as gexc

from mlpipe.store import layout
from mlpipe.store.storage import Storage

PENDING = "pending"
APPROVED = "approved"
REJECTED = "rejected"
# Not a stored state: a pending request read after its expires_at.
EXPIRED = "expired"
DECISIONS = (APPROVED, REJECTED)


@dataclass(frozen=True)
class Actor:
    """Who acts, and where that name was found (mlpipe.messaging.events.ACTOR_SOURCE: "--as",
    "MLPIPE_ACTOR", "gcloud" or "os-user"). Recorded, not authenticated: what a person may do
    is their IAM on the target's bucket and topics."""

    name: str
    source: str


def parse_time(value: Any) -> dt.datetime:
    when = dt.datetime.fromisoformat(str(value))
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).isoformat()


def expires_at(requested_at: dt.datetime, hours: float) -> dt.datetime:
    """When a request made at `requested_at` stops being approvable."""
    if hours <= 0:
        raise ValueError(f"an approval must expire after a positive time, not {hours} hours")
    return requested_at + dt.timedelta(hours=hours)


@dataclass(frozen=True)
class ApprovalRequest:
    """One request as read, with the generation its decision is conditioned on."""

    record: Mapping[str, Any]
    generation: int = 0

    @property
    def id(self) -> str:
        return str(self.record["id"])

    @property
    def state(self) -> str:
        return str(self.record["state"])

    @property
    def model(self) -> str:
        return str(self.record["model"])

    @property
    def version(self) -> int:
        return int(self.record["version"])

    @property
    def from_env(self) -> str:
        return str(self.record["from_env"])

    @property
    def to_env(self) -> str:
        return str(self.record["to_env"])

    @property
    def requested_by(self) -> str:
        return str(self.record.get("requested_by", ""))

    @property
    def requested_at(self) -> dt.datetime:
        return parse_time(self.record["requested_at"])

    @property
    def expires_at(self) -> dt.datetime:
        return parse_time(self.record["expires_at"])

    @property
    def source(self) -> Mapping[str, Any]:
        return dict(self.record.get("source", {}))

    def expired(self, now: dt.datetime) -> bool:
        return self.state == PENDING and now >= self.expires_at

    def status(self, now: dt.datetime) -> str:
        """The state, or "expired" for a pending request past its expiry."""
        return EXPIRED if self.expired(now) else self.state

    def decided(self) -> str:
        """'approved by X at T' / 'rejected by X at T: reason' ('' while pending)."""
        if self.state == PENDING:
            return ""
        who, when = self.record.get("decided_by", "?"), self.record.get("decided_at")
        at = f"{parse_time(when):%Y-%m-%d %H:%M:%S} UTC" if when else "?"
        said = f"{self.state} by {who} at {at}"
        reason = self.record.get("reason")
        return f"{said}: {reason}" if reason else said


def new_approval_id() -> str:
    return uuid.uuid4().hex[:12]


def request_record(
    *,
    approval_id: str,
    model: str,
    version: int,
    from_env: str,
    to_env: str,
    source: Mapping[str, Any],
    requested_by: Actor,
    requested_at: dt.datetime,
    expires_hours: float,
) -> dict[str, Any]:
    """A new pending request's record."""
    return {
        "id": approval_id,
        "state": PENDING,
        "model": model,
        "version": version,
        "from_env": from_env,
        "to_env": to_env,
        "source": dict(source),
        "requested_by": requested_by.name,
        "requested_by_source": requested_by.source,
        "requested_at": _iso(requested_at),
        "expires_at": _iso(expires_at(requested_at, expires_hours)),
    }


@dataclass(frozen=True)
class Decided:
    """What a decision did: `done` when this caller's decision was recorded; otherwise the
    request as it stands and why nothing changed (`why`: "decided", "expired")."""

    done: bool
    request: ApprovalRequest
    why: str = ""


class Approvals:
    """The approval requests of one environment (its bucket)."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def create(self, record: Mapping[str, Any]) -> ApprovalRequest:
        """Write a new request (create-if-absent: an id is never reused)."""
        data = json.dumps(record, indent=2, sort_keys=True).encode()
        generation = self.storage.create_if_absent(layout.approval_path(str(record["id"])), data)
        if generation is None:
            raise ValueError(f"approval {record['id']} exists already")
        return ApprovalRequest(dict(record), generation)

    def get(self, approval_id: str) -> ApprovalRequest | None:
        found = self.storage.read(layout.approval_path(approval_id))
        if found is None:
            return None
        return ApprovalRequest(found.json(), found.generation)

    def all(self) -> list[ApprovalRequest]:
        ids = layout.approval_ids(self.storage.list(layout.APPROVALS))
        found = (self.get(i) for i in ids)
        return [r for r in found if r is not None]

    def listing(self, now: dt.datetime) -> list[ApprovalRequest]:
        """Pending requests first (oldest first: the longest waiting), then the rest
        (expired, approved, rejected), newest first."""
        requests = self.all()
        waiting = sorted(
            (r for r in requests if r.status(now) == PENDING), key=lambda r: r.requested_at
        )
        rest = sorted(
            (r for r in requests if r.status(now) != PENDING),
            key=lambda r: r.requested_at,
            reverse=True,
        )
        return waiting + rest

    def pending(self, now: dt.datetime) -> list[ApprovalRequest]:
        return [r for r in self.listing(now) if r.status(now) == PENDING]

    def for_version(
        self, model: str, version: int, from_env: str, to_env: str
    ) -> list[ApprovalRequest]:
        """Every request to promote this version from `from_env` into `to_env`, oldest first."""
        return sorted(
            (
                r
                for r in self.all()
                if (r.model, r.version, r.from_env, r.to_env) == (model, version, from_env, to_env)
            ),
            key=lambda r: r.requested_at,
        )

    def decide(
        self,
        request: ApprovalRequest,
        decision: str,
        actor: Actor,
        now: dt.datetime,
        *,
        reason: str = "",
        extra: Mapping[str, Any] | None = None,
    ) -> Decided:
        """Record `decision` ("approved" or "rejected") on `request` as it was read: only if
        it is still pending, unexpired, and unchanged since (its generation)."""
        if decision not in DECISIONS:
            raise ValueError(f"a decision is one of {DECISIONS}, not {decision!r}")
        if request.state != PENDING:
            return Decided(False, request, "decided")
        if request.expired(now):
            return Decided(False, request, "expired")
        record = {
            **request.record,
            **(extra or {}),
            "state": decision,
            "decided_by": actor.name,
            "decided_by_source": actor.source,
            "decided_at": _iso(now),
        }
        if reason:
            record["reason"] = reason
        try:
            generation = self.storage.write_json(
                layout.approval_path(request.id), record, if_generation_match=request.generation
            )
        except gexc.PreconditionFailed:
            current = self.get(request.id) or request
            return Decided(False, current, "decided")
        return Decided(True, ApprovalRequest(record, generation))
