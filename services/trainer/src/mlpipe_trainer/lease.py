"""The training claim of a run: who trains it, since when, and how often it was tried.

`runs/<run_id>/claim.json` is created with `if_generation_match=0` and every later change is
a compare-and-swap on its generation (mlpipe.store.leases), so two deliveries never both own
a run. A claim is a
lease: the training job renews it every quarter lease (`Heartbeat`); a claim that has not been
renewed for its `lease_seconds` belongs to a job that is gone, and the next delivery takes it
over. States:

    claimed    a delivery owns the run and is starting its job
    running    the job renews the lease
    released   the job stopped without a result (crash, shutdown): take over at once
    published  the job recorded and published TrainingCompleted
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from mlpipe.store import leases
from mlpipe.store.storage import TRANSIENT_ERRORS, Storage

log = logging.getLogger(__name__)

CLAIMED, RUNNING, RELEASED, PUBLISHED = "claimed", "running", "released", "published"


@dataclass(frozen=True)
class Claim:
    generation: int
    body: dict[str, Any]

    @property
    def state(self) -> str:
        return str(self.body.get("state", CLAIMED))

    @property
    def attempt(self) -> int:
        return int(self.body.get("attempt", 1))

    @property
    def job_id(self) -> str:
        """The job started for this claim ("" until one is)."""
        return str(self.body.get("job_id", ""))

    @property
    def crashes(self) -> int:
        return int(self.body.get("crashes", 0))

    def age(self, now: float | None = None) -> float:
        return (now or time.time()) - float(self.body.get("claimed_at", 0))

    def expired(self, default_lease: float, now: float | None = None) -> bool:
        if self.state == RELEASED:
            return True
        if self.state == PUBLISHED:
            return False
        return leases.lapsed(self.body, default_lease, now or time.time())


def read(storage: Storage, path: str) -> Claim | None:
    found = leases.read(storage, path)
    return None if found is None else Claim(*found)


def take(
    storage: Storage, path: str, body: dict[str, Any], default_lease: float
) -> tuple[Claim | None, Claim | None]:
    """Claim the run: (our claim, None), or (None, the live claim someone else holds).

    An expired or released claim is taken over, counting the attempt; an expired one that was
    not released counts as a crash too (its holder vanished without a word).
    """
    fresh = {**body, "state": CLAIMED, "attempt": 1, "crashes": 0, "claimed_at": time.time()}
    for _ in range(5):
        generation = storage.create_if_absent(path, json.dumps(fresh).encode())
        if generation is not None:
            return Claim(generation, fresh), None
        existing = read(storage, path)
        if existing is None:
            continue  # deleted between the two calls: try to create it again
        if not existing.expired(default_lease):
            return None, existing
        vanished = existing.state != RELEASED
        taken = {
            **body,
            "state": CLAIMED,
            "attempt": existing.attempt + 1,
            "crashes": existing.crashes + (1 if vanished else 0),
            "claimed_at": time.time(),
            "previous": {k: existing.body.get(k) for k in ("state", "job_id", "claimed_at")},
        }
        generation = leases.swap(storage, path, taken, existing.generation)
        if generation is None:
            return None, read(storage, path)
        log.warning(
            "run %s: taking over its %s claim (attempt %d, %.0fs old)",
            body.get("run_id", "?"),
            existing.state,
            taken["attempt"],
            existing.age(),
        )
        return Claim(generation, taken), None
    return None, read(storage, path)


def update(storage: Storage, path: str, claim: Claim, **changes: Any) -> Claim | None:
    """Compare-and-swap `changes` into `claim`; None when someone else changed it first."""
    body = {**claim.body, **changes}
    generation = leases.swap(storage, path, body, claim.generation)
    return None if generation is None else Claim(generation, body)


def release(storage: Storage, path: str, *, crashed: bool) -> Claim | None:
    """Mark the current claim released (a crash counts) so the next delivery retries at once."""
    current = read(storage, path)
    if current is None or current.state in (RELEASED, PUBLISHED):
        return current
    return update(
        storage,
        path,
        current,
        state=RELEASED,
        crashes=current.crashes + (1 if crashed else 0),
        released_at=time.time(),
    )


class LostClaim(RuntimeError):
    """Another delivery took the run over: this job must not record anything."""


class Heartbeat:
    """Renews a running job's claim every quarter lease, in a background thread.

    `renew()` renews it now and raises LostClaim if the run was taken over; the job calls it
    right before writing its artifacts, so none can be taken over for a whole lease after.
    """

    def __init__(self, storage: Storage, path: str, lease_seconds: float, job_id: str) -> None:
        self.storage = storage
        self.path = path
        self.lease_seconds = lease_seconds
        self.job_id = job_id
        self.claim: Claim | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="claim-heartbeat")

    def start(self) -> None:
        current = read(self.storage, self.path)
        if current is None or current.state in (RELEASED, PUBLISHED):
            raise LostClaim(f"{self.path} is {current.state if current else 'gone'}")
        with self._lock:
            self.claim = current
        self.renew()
        self._thread.start()

    def renew(self) -> None:
        with self._lock:
            if self.claim is None or self.lost.is_set():
                raise LostClaim(f"{self.path} is no longer this job's")
            renewed = update(
                self.storage,
                self.path,
                self.claim,
                state=RUNNING,
                job_id=self.job_id,
                claimed_at=time.time(),
                lease_seconds=self.lease_seconds,
            )
            if renewed is None:
                self.lost.set()
                raise LostClaim(f"{self.path} was taken over")
            self.claim = renewed

    def published(self) -> None:
        """The result is recorded and published: the claim says so, and renewals stop."""
        self._stop.set()
        with self._lock:
            if self.claim is not None and not self.lost.is_set():
                update(self.storage, self.path, self.claim, state=PUBLISHED)

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.lease_seconds / 4):
            try:
                self.renew()
            except LostClaim:
                log.error("the run was taken over by another delivery; this job stops")
                return
            except TRANSIENT_ERRORS as exc:
                log.warning("could not renew the claim (will retry): %s", exc)
