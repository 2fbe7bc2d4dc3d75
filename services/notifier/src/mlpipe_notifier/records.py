"""The record of one notice to one channel, `notifications/<channel>/<key>.json`: what makes a
redelivered event post nothing twice. States:

    claimed   a delivery is posting it; a lease (`claimed_at` + `lease_seconds`), so the claim
              of an instance that died while posting is taken over once it has lapsed
    sent      the channel took it: every later delivery posts nothing
    failed    the post failed in a way that may clear (no answer, 5xx, 408, 429): the next
              delivery takes it over at once
    rejected  the channel refused it for good (any other 4xx): deliveries of the same message
              post nothing; another message of the same event (a replay once the channel is
              fixed) tries again

The record is created with `if_generation_match=0` (the first delivery claims it) and changed
only by compare-and-swap on its generation (mlpipe.store.leases), so two deliveries never
post one notice at once.
"""

from __future__ import annotations

import enum
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from mlpipe.store import leases
from mlpipe.store.storage import Storage

log = logging.getLogger(__name__)

CLAIMED, SENT, FAILED, REJECTED = "claimed", "sent", "failed", "rejected"


class Standing(enum.Enum):
    """Where one delivery stands with one notice to one channel."""

    MINE = "mine"  # claimed by this delivery: post it
    SENT = "sent"  # sent already: nothing to do
    HELD = "held"  # another live delivery is posting it
    REJECTED = "rejected"  # this message was refused for good already


@dataclass(frozen=True)
class Claim:
    standing: Standing
    generation: int = 0
    body: dict[str, Any] = field(default_factory=dict)


def claim(
    storage: Storage, path: str, *, message_id: str, lease_seconds: float, now: float | None = None
) -> Claim:
    """Claim the notice for this delivery of `message_id`, or say why not (see Standing)."""
    now = time.time() if now is None else now
    fresh = {
        "state": CLAIMED,
        "message_id": message_id,
        "claimed_at": now,
        "lease_seconds": lease_seconds,
        "attempt": 1,
    }
    existing = None
    for _ in range(3):  # a record deleted between the two calls is created again
        generation = storage.create_if_absent(path, json.dumps(fresh).encode())
        if generation is not None:
            return Claim(Standing.MINE, generation, fresh)
        existing = leases.read(storage, path)
        if existing is not None:
            break
    if existing is None:
        return Claim(Standing.HELD)
    generation, body = existing
    state = body.get("state")
    if state == SENT:
        return Claim(Standing.SENT, generation, body)
    if state == REJECTED and body.get("message_id") == message_id:
        return Claim(Standing.REJECTED, generation, body)
    if state == CLAIMED and not leases.lapsed(body, lease_seconds, now):
        return Claim(Standing.HELD, generation, body)
    if state == CLAIMED:
        log.warning(
            "taking over the stale claim %s (%.0fs old)", path, now - float(body["claimed_at"])
        )
    previous = {k: v for k, v in body.items() if k != "previous"}
    taken = {**fresh, "attempt": int(body.get("attempt", 0)) + 1, "previous": previous}
    swapped = leases.swap(storage, path, taken, generation)
    if swapped is None:
        return Claim(Standing.HELD)
    return Claim(Standing.MINE, swapped, taken)


def settle(storage: Storage, path: str, claim: Claim, state: str, **details: Any) -> bool:
    """Record how this delivery's post ended (SENT, FAILED or REJECTED, with `details`); False
    when its claim was taken over meanwhile (the taker's post decides)."""
    body = {**claim.body, "state": state, "settled_at": time.time(), **details}
    if leases.swap(storage, path, body, claim.generation) is None:
        log.warning("the claim %s was taken over while its post ran; not recording %s", path, state)
        return False
    return True
