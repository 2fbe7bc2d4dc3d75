"""What the predictor serves: per model, the champion and (during a canary) the canary, with
the traffic split the registry names.

Hot swap: a new version is loaded and warmed up beside the old one; then one assignment
replaces the whole routing table. A request picks its version once and is served entirely by
it, so no request fails or mixes versions during a deployment.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlpipe.store.registry import CANARY, CHAMPION, Registry, RolloutError
from mlpipe_predictor.runtime import LoadedModel, load_version

log = logging.getLogger(__name__)


@dataclass
class CanaryWatch:
    """Counts a canary's outcomes; asks for its promotion once `promote_after` succeed."""

    version: int
    promote_after: int
    succeeded: int = 0
    failed: int = 0
    asked: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, ok: bool) -> bool:
        """Count one prediction; True exactly once, when the canary has earned promotion."""
        with self.lock:
            if not ok:
                self.failed += 1
                return False
            self.succeeded += 1
            if self.asked or self.failed or not self.promote_after:
                return False
            if self.succeeded >= self.promote_after:
                self.asked = True
                return True
        return False


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
        if watch is not None and watch.record(ok) and self.on_promotion is not None:
            threading.Thread(
                target=self.on_promotion, args=(model, watch.version), daemon=True
            ).start()

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
                    "promote_after": s.watch.promote_after if s.watch else 0,
                }
            out[name] = entry
        return out

    @staticmethod
    def _shares(s: Served) -> list[tuple[LoadedModel, str, int]]:
        if s.champion is None and s.canary is not None:
            return [(s.canary, CANARY, 100)]
        if s.champion is None:
            return []
        if s.canary is None or s.percent <= 0:
            return [(s.champion, CHAMPION, 100)]
        return [(s.champion, CHAMPION, 100 - s.percent), (s.canary, CANARY, s.percent)]

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
        return load_version(self.registry, name, version, self.threads)  # outside the lock

    def refresh(self, name: str) -> Served | None:
        """Load what the registry says `name` should serve, then swap it in at once."""
        if self.pinned is not None:
            if name != self.pinned[0]:
                return None
            loaded = self._loaded(name, self.pinned[1])
            return self._swap(name, Served(loaded))
        traffic = self.registry.traffic(name)
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
                if old is not None and old.version == traffic.canary
                else CanaryWatch(traffic.canary, traffic.promote_after if self.auto_promote else 0)
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


def promote_canary(
    store: ModelStore, publish: Callable[[Any], Any], code_version: str, model: str, version: int
) -> None:
    """The automatic promotion of a canary that served `promote_after` requests without an
    error: the same registry step as `mlpipe promote`, recorded as a DeploymentCompleted."""
    from mlpipe.messaging.rollout import rollout_event

    watch = store.watch_of(model)
    count = watch.succeeded if watch else 0
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
