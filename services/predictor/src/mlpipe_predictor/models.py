"""What the predictor serves: per model, the champion and (during a canary) the canary, with
the traffic split the registry names.

Hot swap: a new version is loaded and warmed up beside the old one; then one assignment
replaces the whole routing table. A request picks its version once and is served entirely by
it, so no request fails or mixes versions during a deployment.

Cloud Run runs many instances of the predictor and only one receives each DeploymentCompleted,
so every instance also watches the registry (`RegistryWatch`): once a second it reads each
model's two alias objects' metadata (the models themselves are listed every
MODELS_EVERY_ROUNDS rounds) and refreshes a model whose aliases' generations changed; so
every instance serves the registry's champion, canary and percentage within about a second
and a load of the push.
A model refreshed on a change is read once more on the next round, and every model every
BACKSTOP_ROUNDS rounds, so a read that raced a write is corrected within a round or two.

A canary's outcomes are counted across instances: each instance writes its own running totals
(`registry/<model>/canary-counts/<canary generation>/<instance>`) when they change and sums
everyone's; when the sum reaches `promote_after` with no failure anywhere, the instance that
sees it claims the canary's promotion marker (created only if absent) and only the winner
promotes, so the canary is promoted once whichever instance counted the last request. An
instance that dies between its claim and the promotion leaves the canary running: `mlpipe
promote` finishes it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from mlpipe import tracing
from mlpipe.ml.scoring import LoadedModel, load_version
from mlpipe.store.registry import CANARY, CHAMPION, Registry, RolloutError

log = logging.getLogger(__name__)


@dataclass
class CanaryWatch:
    """Counts a canary's outcomes on this instance, beside the other instances' last known
    totals; asks once for the promotion check when together they reach `promote_after`."""

    version: int
    promote_after: int
    round_id: int = 0  # the canary alias's generation (Registry.traffic_round)
    succeeded: int = 0
    failed: int = 0
    asked: bool = False
    # The other instances' totals at the last check, and ours as last written.
    others_succeeded: int = 0
    others_failed: int = 0
    written: tuple[int, int] = (0, 0)
    settled: bool = False  # the promotion was claimed (by us or another instance)
    lock: threading.Lock = field(default_factory=threading.Lock)
    settling: threading.Lock = field(default_factory=threading.Lock)

    def record(self, ok: bool) -> bool:
        """Count one prediction; True exactly once, when the canary seems to have earned its
        promotion (the caller then checks the shared totals)."""
        with self.lock:
            if not ok:
                self.failed += 1
                return False
            self.succeeded += 1
            if self.asked or self.failed or self.others_failed or not self.promote_after:
                return False
            if self.succeeded + self.others_succeeded >= self.promote_after:
                self.asked = True
                return True
        return False

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return self.succeeded, self.failed


@dataclass(frozen=True)
class Served:
    champion: LoadedModel | None
    canary: LoadedModel | None = None
    percent: int = 0
    watch: CanaryWatch | None = None

    def versions(self) -> list[LoadedModel]:
        return [m for m in (self.champion, self.canary) if m is not None]


class ModelStore:
    def __init__(
        self,
        registry: Registry,
        *,
        threads: int = 1,
        pinned: tuple[str, int] | None = None,
        auto_promote: bool = True,
    ) -> None:
        self.registry = registry
        self.threads = threads
        # A Cloud Run revision or Vertex deployment serves exactly one version.
        self.pinned = pinned
        self.auto_promote = auto_promote
        self._served: dict[str, Served] = {}
        self._lock = threading.Lock()
        self._counter = itertools.count()
        # Called (model, canary version) in a thread when a canary has earned promotion.
        self.on_promotion: Callable[[str, int], None] | None = None
        # This instance among the predictor's instances (its canary counts are kept under it).
        self.instance = uuid.uuid4().hex[:12]
        self._refreshing = threading.Lock()

    # --- the request path ---------------------------------------------------------------
    def route(self, name: str | None) -> tuple[LoadedModel, CanaryWatch | None]:
        """The version that serves this request (KeyError if none), and the canary watch to
        report its outcome to when it is the canary."""
        served_all = self._served
        if name is None:
            if len(served_all) != 1:
                raise KeyError(
                    "name the model: this predictor serves " + (", ".join(served_all) or "none yet")
                )
            served = next(iter(served_all.values()))
        else:
            served = served_all[name]
        if served.canary is not None and served.percent > 0:
            # Spread the canary's share evenly: exactly `percent` of every 100 requests.
            n = next(self._counter)
            if (n * served.percent) % 100 < served.percent or served.champion is None:
                return served.canary, served.watch
        if served.champion is None:
            raise KeyError(name or "")
        return served.champion, None

    def report(self, model: str, watch: CanaryWatch | None, ok: bool) -> None:
        if watch is not None and watch.record(ok):
            threading.Thread(target=self.settle_canary, args=(model, watch), daemon=True).start()

    def settle_canary(self, model: str, watch: CanaryWatch, wait: float = -1) -> None:
        """Write this instance's counts of `watch` if they changed, sum every instance's,
        and promote the canary if it has earned it and this instance wins its claim.

        `wait`: how long to wait for a settle already running (-1: as long as it takes). The
        registry watch waits a bounded time, so a stalled registry call cannot stop it from
        following the registry; its next round settles again."""
        if self.pinned is not None or watch.settled:
            return
        if not watch.settling.acquire(timeout=wait):
            log.warning(
                "canary v%d of %s: its counts are still being written; settled next round",
                watch.version,
                model,
            )
            return
        try:
            earned = self._settle(model, watch)
        finally:
            watch.settling.release()
        if earned is None:
            return
        log.info(
            "canary v%d of %s earned its promotion: %d successful predictions on all instances",
            watch.version,
            model,
            earned,
        )
        if self.on_promotion is not None:
            self.on_promotion(model, watch.version)

    def _settle(self, model: str, watch: CanaryWatch) -> int | None:
        """settle_canary's work, under `watch.settling`: the successes summed over every
        instance when this instance is to promote the canary, else None."""
        succeeded, failed = watch.counts()
        if (succeeded, failed) != watch.written:
            self.registry.record_canary_count(
                model, watch.round_id, self.instance, succeeded, failed
            )
            watch.written = (succeeded, failed)
        if not watch.promote_after or watch.settled:
            return None
        total_ok, total_failed = self.registry.canary_counts(model, watch.round_id)
        # Ours as written (the listing may lag the write: never count less than that).
        others_ok = max(0, total_ok - succeeded)
        others_failed = max(0, total_failed - failed)
        with watch.lock:
            watch.others_succeeded, watch.others_failed = others_ok, others_failed
            if watch.asked and (watch.failed or others_failed):
                watch.asked = False
        if failed or others_failed or succeeded + others_ok < watch.promote_after:
            return None
        watch.settled = True
        if not self.registry.claim_promotion(
            model, watch.round_id, self.instance, succeeded + others_ok
        ):
            log.info("canary v%d of %s: another instance promotes it", watch.version, model)
            return None
        return succeeded + others_ok

    # --- what is served -----------------------------------------------------------------
    def served(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, s in self._served.items():
            main = s.champion or s.canary
            if main is None:
                continue
            entry: dict[str, Any] = {
                "version": main.version,
                "run_id": main.run_id,
                "sha256": main.sha256,
                "runtime": main.runtime,
                "traffic": [
                    {"version": m.version, "alias": alias, "percent": pct}
                    for m, alias, pct in self._shares(s)
                ],
            }
            if s.canary is not None:
                entry["canary"] = {
                    "version": s.canary.version,
                    "percent": s.percent,
                    "runtime": s.canary.runtime,
                    "succeeded": s.watch.succeeded if s.watch else 0,
                    "failed": s.watch.failed if s.watch else 0,
                    # Every instance's, as this one last summed them.
                    "succeeded_all_instances": (
                        s.watch.succeeded + s.watch.others_succeeded if s.watch else 0
                    ),
                    "failed_all_instances": (
                        s.watch.failed + s.watch.others_failed if s.watch else 0
                    ),
                    "promote_after": s.watch.promote_after if s.watch else 0,
                }
            out[name] = entry
        return out

    def names(self) -> list[str]:
        """The models served (those `served()` describes), without describing them: what a
        watch round asks every second."""
        return [n for n, s in self._served.items() if s.champion or s.canary]

    @staticmethod
    def _shares(s: Served) -> list[tuple[LoadedModel, str, int]]:
        if s.champion is None and s.canary is not None:
            return [(s.canary, CANARY, 100)]
        if s.champion is None:
            return []
        if s.canary is None or s.percent <= 0:
            return [(s.champion, CHAMPION, 100)]
        return [(s.champion, CHAMPION, 100 - s.percent), (s.canary, CANARY, s.percent)]

    def shares(self, name: str) -> list[tuple[int, str, int]]:
        """What `name` is served as: (version, alias, percent) each."""
        served = self._served.get(name)
        if served is None:
            return []
        return [(m.version, alias, percent) for m, alias, percent in self._shares(served)]

    def watch_of(self, name: str) -> CanaryWatch | None:
        served = self._served.get(name)
        return None if served is None else served.watch

    def versions_of(self, name: str) -> list[LoadedModel]:
        served = self._served.get(name)
        return [] if served is None else served.versions()

    # --- loading and swapping -----------------------------------------------------------
    def _loaded(self, name: str, version: int) -> LoadedModel:
        for m in self.versions_of(name):
            if m.version == version:
                return m
        with tracing.span(f"load {name} v{version}"):
            return load_version(self.registry, name, version, self.threads)  # outside the lock

    def refresh(self, name: str) -> Served | None:
        """Load what the registry says `name` should serve, then swap it in at once (one
        refresh at a time: the push and the registry watch may both ask)."""
        with self._refreshing:
            return self._refresh(name)

    def _refresh(self, name: str) -> Served | None:
        if self.pinned is not None:
            if name != self.pinned[0]:
                return None
            loaded = self._loaded(name, self.pinned[1])
            return self._swap(name, Served(loaded))
        traffic, round_id = self.registry.traffic_round(name)
        if traffic.champion is None and traffic.canary is None:
            return None
        champion = None if traffic.champion is None else self._loaded(name, traffic.champion)
        canary = None
        watch = None
        if traffic.canary is not None:
            canary = self._loaded(name, traffic.canary)
            current = self._served.get(name)
            old = current.watch if current else None
            watch = (
                old
                if old is not None and (old.version, old.round_id) == (traffic.canary, round_id)
                else CanaryWatch(
                    traffic.canary,
                    traffic.promote_after if self.auto_promote else 0,
                    round_id=round_id,
                )
            )
        return self._swap(name, Served(champion, canary, traffic.canary_percent, watch))

    def _swap(self, name: str, served: Served) -> Served:
        with self._lock:
            previous = self._served.get(name)
            self._served = {**self._served, name: served}
        before = [m.version for m in previous.versions()] if previous else []
        after = [m.version for m in served.versions()]
        if before != after:
            log.info(
                "now serving %s %s",
                name,
                ", ".join(
                    f"v{m.version} ({m.runtime}) {a} {p}%" for m, a, p in self._shares(served)
                ),
            )
        return served

    def load_all(self) -> None:
        names = [self.pinned[0]] if self.pinned else self.registry.models()
        for name in names:
            try:
                self.refresh(name)
            except Exception:
                log.exception("could not load %s", name)


# Every this many rounds the watch reads every model's traffic, changed or not.
BACKSTOP_ROUNDS = 30
# How long a round waits for a canary count another thread is writing.
SETTLE_WAIT_SECONDS = 5.0
# The watch lists the registry's models once every this many rounds.
MODELS_EVERY_ROUNDS = 3
# A bound on each of a round's listings, which are not retried: the next round is the retry.
LISTING_TIMEOUT_SECONDS = 5.0
# An instance rewrites its record of what it serves at least this often.
HEARTBEAT_SECONDS = 60.0
# The record of an instance silent this long is deleted by the other instances' watches.
SILENT_INSTANCE = timedelta(hours=1)
# A round slower than this many intervals is logged with where its time went.
SLOW_ROUND_INTERVALS = 3


@dataclass
class WatchStatus:
    """How this instance's registry watch is doing (`GET /v1/models` shows it): what tells
    an operator why an instance serves something other than the registry's state."""

    rounds: int = 0
    failures: int = 0
    last_round_at: str = ""
    last_round_seconds: float = 0.0
    slowest_round_seconds: float = 0.0
    last_error: str = ""
    # Seconds of the last round spent listing, refreshing and settling canary counts.
    last_round_parts: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "failures": self.failures,
            "last_round_at": self.last_round_at,
            "last_round_seconds": round(self.last_round_seconds, 3),
            "slowest_round_seconds": round(self.slowest_round_seconds, 3),
            "last_round_parts": {k: round(v, 3) for k, v in self.last_round_parts.items()},
            "last_error": self.last_error,
        }


class RegistryWatch:
    """Keeps a ModelStore on the registry's desired state without the push (see the module
    docstring): every `interval` seconds, in a thread of its own."""

    def __init__(
        self, store: ModelStore, interval: float = 1.0, about: Mapping[str, str] | None = None
    ) -> None:
        self.store = store
        self.interval = interval
        # What the instance records say of it besides what it serves (revision, code).
        self.about = dict(about or {})
        self.started_at = datetime.now(UTC).isoformat(timespec="seconds")
        # model → (what was last recorded of it, when: time.monotonic())
        self._recorded: dict[str, tuple[Any, float]] = {}
        self.seen: dict[str, dict[str, int]] = {}
        self.recheck: set[str] = set()
        # The registry's models, listed every MODELS_EVERY_ROUNDS rounds (a listing is a
        # Class A operation on GCS; their aliases are read every round).
        self.models: list[str] | None = None
        self.rounds = 0
        self.status = WatchStatus()
        self._parts: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.store.pinned is not None or self.interval <= 0:
            return  # a pinned deployment serves one version; nothing to follow
        self._thread = threading.Thread(target=self._run, daemon=True, name="registry-watch")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is None:
            return
        self._thread.join(timeout=10)
        # Its records say it stopped (a killed instance's just fall silent).
        stopped = datetime.now(UTC).isoformat(timespec="milliseconds")
        for name in list(self._recorded):
            try:
                self._record(name, stopped_at=stopped)
            except Exception:
                log.warning("registry watch: could not record that this instance stopped")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.round()

    def round(self) -> None:
        """One timed round, as the thread runs it: a failure is logged and counted, and the
        next round tries again (a registry that cannot be read is not fatal)."""
        started = time.monotonic()
        self._parts = {"list": 0.0, "refresh": 0.0, "settle": 0.0, "record": 0.0}
        status = self.status
        try:
            self.check()
            self.record()
        except Exception as exc:
            status.failures += 1
            status.last_error = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("registry watch: round failed", exc_info=True)
        took = time.monotonic() - started
        status.rounds += 1
        status.last_round_at = datetime.now(UTC).isoformat(timespec="milliseconds")
        status.last_round_seconds = took
        status.slowest_round_seconds = max(status.slowest_round_seconds, took)
        status.last_round_parts = dict(self._parts)
        if took > SLOW_ROUND_INTERVALS * max(self.interval, 1.0):
            log.warning(
                "registry watch: a round took %.1f s (%s); the registry's state reaches "
                "this instance that much later",
                took,
                ", ".join(f"{k} {v:.1f} s" for k, v in self._parts.items()),
            )

    def record(self) -> None:
        """Write this instance's record of each model it serves (`registry/<model>/instances/`,
        read by the console) when what it serves changed or `HEARTBEAT_SECONDS` passed; every
        `BACKSTOP_ROUNDS` rounds, delete the records of instances silent for an hour."""
        started = time.monotonic()
        store = self.store
        backstop = self.rounds % BACKSTOP_ROUNDS == 0
        for name in store.names():
            state = (store.shares(name), self.status.failures)
            last = self._recorded.get(name)
            if last is None or last[0] != state or started - last[1] >= HEARTBEAT_SECONDS:
                self._record(name)
                self._recorded[name] = (state, started)
            if backstop:
                for gone in store.registry.drop_instances(name, SILENT_INSTANCE):
                    log.info("registry watch: dropped the record of silent instance %s", gone)
        self._timed("record", started)

    def _record(self, name: str, stopped_at: str = "") -> None:
        store = self.store
        served = store.served().get(name, {})
        watch = self.status.as_dict()
        store.registry.record_instance(
            name,
            store.instance,
            {
                **self.about,
                "started_at": self.started_at,
                "stopped_at": stopped_at,
                "serving": [
                    {"version": v, "alias": alias, "percent": pct}
                    for v, alias, pct in store.shares(name)
                ],
                "canary": served.get("canary"),
                "watch": {k: watch[k] for k in ("rounds", "failures", "last_error")},
                "heartbeat_seconds": HEARTBEAT_SECONDS,
            },
        )

    def _timed(self, part: str, started: float) -> None:
        self._parts[part] = self._parts.get(part, 0.0) + time.monotonic() - started

    def check(self) -> list[str]:
        """One round: refresh each model whose aliases changed, and settle each canary's
        counts; return the models refreshed.

        A model refreshed because its aliases changed is read again on the next round even
        if they did not change again, and every model is read again every `BACKSTOP_ROUNDS`
        rounds: a read that raced a write (a listing ahead of the object it lists) then
        costs one round, never the instance's whole life."""
        store = self.store
        refreshed = []
        self.rounds += 1
        backstop = self.rounds % BACKSTOP_ROUNDS == 0
        started = time.monotonic()
        if self.models is None or self.rounds % MODELS_EVERY_ROUNDS == 1:
            self.models = store.registry.served_models(LISTING_TIMEOUT_SECONDS)
        # A model deployed since the last listing reaches this instance by its push too.
        names = sorted({*self.models, *store.names()})
        self._timed("list", started)
        for name in names:
            started = time.monotonic()
            generations = store.registry.alias_generations(name, LISTING_TIMEOUT_SECONDS)
            self._timed("list", started)
            changed = bool(generations) and generations != self.seen.get(name)
            if changed or name in self.recheck or (backstop and generations):
                before = store.shares(name)
                started = time.monotonic()
                store.refresh(name)
                self._timed("refresh", started)
                self.seen[name] = generations
                refreshed.append(name)
                if changed:
                    self.recheck.add(name)
                else:
                    self.recheck.discard(name)
                    if store.shares(name) != before:
                        log.warning(
                            "registry watch: %s was served as %s, the registry says %s",
                            name,
                            before,
                            store.shares(name),
                        )
            watch = store.watch_of(name)
            if watch is not None:
                started = time.monotonic()
                store.settle_canary(name, watch, wait=SETTLE_WAIT_SECONDS)
                self._timed("settle", started)
        return refreshed


def promote_canary(
    store: ModelStore, publish: Callable[[Any], Any], code_version: str, model: str, version: int
) -> None:
    """The automatic promotion of a canary that served `promote_after` requests without an
    error: the same registry step as `mlpipe promote`, recorded as a DeploymentCompleted."""
    from mlpipe.messaging.rollout import rollout_event

    watch = store.watch_of(model)
    count = watch.succeeded + watch.others_succeeded if watch else 0
    try:
        promoted, previous = store.registry.promote(model, expected=version)
    except RolloutError as exc:
        log.info("no automatic promotion of %s v%d: %s", model, version, exc)
        return
    except Exception:
        log.exception("automatic promotion of %s v%d failed", model, version)
        return
    store.refresh(model)
    event = rollout_event(
        store.registry,
        model,
        promoted,
        action="promote",
        alias=CHAMPION,
        previous_version=previous,
        target="local",
        requested_by="predictor",
        producer="predictor",
        code_version=code_version,
        reason=f"canary v{promoted} promoted after {count} successful predictions",
    )
    publish(event)
