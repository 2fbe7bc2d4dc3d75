"""A JSON record in the bucket changed only by compare-and-swap on its generation, and the lease
it may carry (`claimed_at` + `lease_seconds`): the protocol behind the trainer's run claims
(mlpipe_trainer.lease) and the notifier's notice records (mlpipe_notifier.records).

A record is created with `if_generation_match=0` (Storage.create_if_absent), so one caller makes
it; every later change names the generation it read, so of two callers racing, one wins and
the other is told (None) and reads again. A lease lapses `lease_seconds` after `claimed_at`:
its holder is presumed gone, and the next caller may take the record over.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from google.api_core import exceptions as gexc

from mlpipe.store.storage import Storage


def read(storage: Storage, path: str) -> tuple[int, dict[str, Any]] | None:
    """(generation, body) of the record, or None when there is none. A body that is not a JSON
    object reads as {} (its generation still lets a caller replace it)."""
    found = storage.read(path)
    if found is None:
        return None
    try:
        body = found.json()
    except ValueError:
        body = {}
    return found.generation, body if isinstance(body, dict) else {}


def swap(storage: Storage, path: str, body: Mapping[str, Any], generation: int) -> int | None:
    """Write `body` over `generation`: the new generation, or None when someone else changed
    the record first."""
    try:
        return storage.write(
            path,
            json.dumps(body).encode(),
            content_type="application/json",
            if_generation_match=generation,
        )
    except gexc.PreconditionFailed:
        return None


def lapsed(body: Mapping[str, Any], default_lease: float, now: float) -> bool:
    """Whether the lease in `body` has run out at `now` (its own `lease_seconds`, else
    `default_lease`, after its `claimed_at`)."""
    lease = float(body.get("lease_seconds") or default_lease)
    return now - float(body.get("claimed_at", 0)) >= lease
