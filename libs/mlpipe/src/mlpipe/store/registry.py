"""A model registry in GCS: numbered versions, one per run, and movable aliases (the paths
are mlpipe.store.layout.RegistryPaths):

    registry/<model>/runs/<run_id>.json          claim → the version registered for that run
    registry/<model>/version-claims/<n>          who holds version number n
    registry/<model>/versions/<n>/model.joblib   the artifact
    registry/<model>/versions/<n>/model.onnx     compiled forms, when the deployer made them
    registry/<model>/versions/<n>/version.json   written last: the version is then complete
    registry/<model>/aliases/champion            {"version": n, "history": [older champions]}
    registry/<model>/aliases/canary              {"version": n, "percent": p, ...} during a canary
    registry/<model>/canary-counts/<g>/<instance>  one predictor instance's outcomes of the
                                                 canary whose alias has generation g
    registry/<model>/promotions/<g>              that canary's automatic promotion, claimed once

Every write that decides something uses a generation precondition, so concurrent or repeated
deliveries of the same run register exactly one version, and two rollout steps racing on the
same model never both win.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from google.api_core import exceptions as gexc

from mlpipe.errors import TransientError
from mlpipe.faults import fault_point
from mlpipe.store import layout
from mlpipe.store.layout import RegistryPaths
from mlpipe.store.storage import Storage, sha256_hex

log = logging.getLogger(__name__)

CHAMPION = "champion"
CANARY = "canary"
# A version's artifacts: the registered model, and its ONNX form when the deployer made one
# (the predictor loads it).
MODEL_FILE = "model.joblib"
ONNX_FILE = "model.onnx"
# How many former champions a champion alias remembers for `rollback`.
HISTORY_LIMIT = 20


class RolloutError(ValueError):
    """A rollout step that cannot be taken now (nothing to promote, no earlier champion)."""


@dataclass(frozen=True)
class ModelVersion:
    model: str
    version: int
    run_id: str
    model_uri: str
    model_sha256: str
    info: dict[str, Any]

    @classmethod
    def from_record(cls, model: str, version: int, info: dict[str, Any]) -> ModelVersion:
        """A version from its version.json."""
        return cls(model, version, info["run_id"], info["model_uri"], info["model_sha256"], info)

    def artifact(self, name: str) -> tuple[str, str] | None:
        """(uri, sha256) of an extra artifact registered with this version, e.g. model.onnx."""
        found = self.info.get("artifacts", {}).get(name)
        return None if not found else (str(found["uri"]), str(found["sha256"]))


@dataclass(frozen=True)
class Traffic:
    """Who serves a model's online traffic: the champion, and a canary while one runs."""

    champion: int | None
    canary: int | None = None
    canary_percent: int = 0
    # Promote the canary by itself after this many successful predictions (0: only by hand).
    promote_after: int = 0
    history: list[int] = field(default_factory=list)

    def shares(self) -> list[tuple[int, int, str]]:
        """(version, percent, alias) for every version that gets traffic."""
        if self.champion is None:
            return [] if self.canary is None else [(self.canary, 100, CANARY)]
        if self.canary is None or self.canary_percent <= 0:
            return [(self.champion, 100, CHAMPION)]
        return [
            (self.champion, 100 - self.canary_percent, CHAMPION),
            (self.canary, self.canary_percent, CANARY),
        ]


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


class Registry:
    def __init__(self, storage: Storage, claim_lease_seconds: float = 120.0) -> None:
        self.storage = storage
        self.claim_lease_seconds = claim_lease_seconds

    def versions(self, model: str) -> list[int]:
        """Complete versions (those whose version.json exists), ascending."""
        paths = RegistryPaths(model)
        found = [RegistryPaths.version_of_record(n) for n in self.storage.list(paths.versions)]
        return sorted(v for v in found if v is not None)

    def models(self) -> list[str]:
        return layout.registry_models(self.storage.list(layout.REGISTRY))

    def get(self, model: str, version: int) -> ModelVersion | None:
        info = self.storage.read_json(RegistryPaths(model).version_record(version))
        if info is None:
            return None
        return ModelVersion.from_record(model, version, info)

    def alias(self, model: str, alias: str = CHAMPION) -> int | None:
        value = self.storage.read_json(RegistryPaths(model).alias(alias))
        return None if value is None else int(value["version"])

    def version_for_run(self, model: str, run_id: str) -> int | None:
        claim = self.storage.read_json(RegistryPaths(model).run_claim(run_id))
        if claim and claim.get("state") == "registered":
            return int(claim["version"])
        return None

    def register(
        self,
        model: str,
        run_id: str,
        artifact: bytes,
        info: dict[str, Any],
        extra_artifacts: Mapping[str, bytes] | None = None,
    ) -> tuple[ModelVersion, bool]:
        """Register `artifact` as the next version for `run_id`, exactly once.

        `extra_artifacts` (file name → bytes, e.g. "model.onnx") are stored beside it, and
        their URIs and sha256 recorded in version.json under "artifacts".

        Returns (version, created). A second call for the same run returns the first call's
        version with created=False. Raises TransientError while another delivery holds the
        run's claim (the caller answers 5xx; Pub/Sub retries).
        """
        claim_path = RegistryPaths(model).run_claim(run_id)
        pending = json.dumps({"state": "pending", "claimed_at": time.time()}).encode()
        version: int | None = None
        claim_gen = self.storage.create_if_absent(claim_path, pending)
        if claim_gen is None:
            existing = self.storage.read(claim_path)
            if existing is None:
                raise TransientError(f"registry claim for run {run_id} vanished; retry")
            state = existing.json()
            if state.get("state") == "registered":
                found = self.get(model, int(state["version"]))
                if found is None:
                    raise TransientError(f"version {state['version']} of {model} not readable")
                return found, False
            age = time.time() - float(state.get("claimed_at", 0))
            if age < self.claim_lease_seconds:
                raise TransientError(
                    f"run {run_id} is being registered by another delivery ({age:.0f}s ago)"
                )
            log.warning("taking over a stale registry claim for run %s (%.0fs old)", run_id, age)
            # The number the dead delivery allocated stays this run's: no gap, no second one.
            if state.get("version") is not None:
                version = int(state["version"])
                pending = json.dumps(
                    {"state": "pending", "claimed_at": time.time(), "version": version}
                ).encode()
            try:
                claim_gen = self.storage.write(
                    claim_path,
                    pending,
                    content_type="application/json",
                    if_generation_match=existing.generation,
                )
            except gexc.PreconditionFailed as exc:
                raise TransientError(f"lost the race for run {run_id}'s claim") from exc

        if version is None:
            version = self._allocate_version(model, run_id)
            # Recorded in the claim, so a delivery that takes a stale claim over reuses it.
            allocated_claim = json.dumps(
                {"state": "pending", "claimed_at": time.time(), "version": version}
            ).encode()
            try:
                claim_gen = self.storage.write(
                    claim_path,
                    allocated_claim,
                    content_type="application/json",
                    if_generation_match=claim_gen,
                )
            except gexc.PreconditionFailed as exc:
                raise TransientError(f"run {run_id}'s registry claim was taken over") from exc
        fault_point("deployer.after_claim")
        paths = RegistryPaths(model)
        sha = sha256_hex(artifact)
        self.storage.write(paths.version_file(version, MODEL_FILE), artifact)
        extras = {}
        for name, data in (extra_artifacts or {}).items():
            path = paths.version_file(version, name)
            self.storage.write(path, data)
            extras[name] = {"uri": self.storage.uri(path), "sha256": sha256_hex(data)}
        record = {
            **info,
            "artifacts": extras,
            "model": model,
            "version": version,
            "run_id": run_id,
            "model_uri": self.storage.uri(paths.version_file(version, MODEL_FILE)),
            "model_sha256": sha,
            "registered_at": _now(),
        }
        self.storage.write_json(paths.version_record(version), record)
        registered = json.dumps({"state": "registered", "version": version}).encode()
        self.storage.write(
            claim_path, registered, content_type="application/json", if_generation_match=claim_gen
        )
        log.info("registered %s version %d for run %s", model, version, run_id)
        return ModelVersion(model, version, run_id, record["model_uri"], sha, record), True

    def _allocate_version(self, model: str, run_id: str) -> int:
        paths = RegistryPaths(model)
        taken = [
            int(n.rsplit("/", 1)[-1])
            for n in self.storage.list(paths.version_claims)
            if n.rsplit("/", 1)[-1].isdigit()
        ]
        candidate = max(taken, default=0) + 1
        for _ in range(100):
            if (
                self.storage.create_if_absent(
                    paths.version_claim(candidate), run_id.encode(), content_type="text/plain"
                )
                is not None
            ):
                return candidate
            candidate += 1
        raise TransientError(f"could not allocate a version number for {model}")

    def move_alias(
        self, model: str, version: int, alias: str = CHAMPION, *, only_forward: bool = True
    ) -> tuple[bool, int | None]:
        """Point `alias` at `version` (compare-and-swap). Returns (moved, previous version).

        With `only_forward`, an alias never moves back to an older version, so a late or
        redelivered event cannot undo a newer deployment.
        """
        path = RegistryPaths(model).alias(alias)
        for _ in range(20):
            current = self.storage.read(path)
            previous = None if current is None else int(current.json()["version"])
            if previous == version or (
                only_forward and previous is not None and previous > version
            ):
                return False, previous
            record: dict[str, Any] = {"version": version, "updated_at": _now()}
            if alias == CHAMPION:
                history = [] if current is None else list(current.json().get("history", []))
                if previous is not None:
                    history.append(previous)
                record["history"] = history[-HISTORY_LIMIT:]
            value = json.dumps(record).encode()
            try:
                self.storage.write(
                    path,
                    value,
                    content_type="application/json",
                    if_generation_match=0 if current is None else current.generation,
                )
                return True, previous
            except gexc.PreconditionFailed:
                continue
        raise TransientError(f"alias {alias} of {model} kept changing; retry")

    def load_artifact(self, mv: ModelVersion, name: str = MODEL_FILE) -> bytes:
        """An artifact's bytes (the registered model, or an extra such as model.onnx),
        verified against the sha256 recorded in the registry; raise ValueError otherwise."""
        if name == MODEL_FILE:
            uri, expected = mv.model_uri, mv.model_sha256
        else:
            found = mv.artifact(name)
            if found is None:
                raise FileNotFoundError(f"{mv.model} v{mv.version} has no {name}")
            uri, expected = found
        obj = self.storage.read(self.storage.path_of(uri))
        if obj is None:
            raise FileNotFoundError(f"{uri} is missing")
        actual = sha256_hex(obj.data)
        if actual != expected:
            raise ValueError(f"{uri} has sha256 {actual}, registry says {expected}: refusing")
        return obj.data

    # --- rollout: champion and canary ---------------------------------------------------------
    def traffic(self, model: str) -> Traffic:
        return self.traffic_round(model)[0]

    def traffic_round(self, model: str) -> tuple[Traffic, int]:
        """The traffic, and the generation of the canary alias it was read from (0 without a
        canary): what tells this canary apart from an earlier one of the same version."""
        paths = RegistryPaths(model)
        champion = self.storage.read_json(paths.alias(CHAMPION))
        found = self.storage.read(paths.alias(CANARY))
        canary = None if found is None else found.json()
        round_id = 0 if found is None else found.generation
        champion_version = None if champion is None else int(champion["version"])
        history = [] if champion is None else [int(v) for v in champion.get("history", [])]
        # A promotion moves the champion first, then removes the canary: in between, the
        # canary names the champion and gets no traffic of its own.
        if canary is None or int(canary["version"]) == champion_version:
            return Traffic(champion_version, history=history), 0
        traffic = Traffic(
            champion_version,
            int(canary["version"]),
            int(canary.get("percent", 0)),
            int(canary.get("promote_after", 0)),
            history,
        )
        return traffic, round_id

    def served_models(self, poll_timeout: float | None = None) -> list[str]:
        """The models in the registry, from one delimited listing (not every object under it,
        as `models` reads): cheap enough to poll.

        `poll_timeout`: for a caller that polls, a bound on the listing with no retry (its
        next poll is the retry), instead of the client's retries with backoff."""
        pages = self.storage.client.list_blobs(
            self.storage.bucket_name, prefix=layout.REGISTRY, delimiter="/", **_polled(poll_timeout)
        )
        for _ in pages:  # the prefixes are known once the pages are read
            pass
        return sorted(p[len(layout.REGISTRY) :].rstrip("/") for p in pages.prefixes)

    def alias_generations(self, model: str, poll_timeout: float | None = None) -> dict[str, int]:
        """Each alias of `model` that exists and its object's generation: a deployment,
        promotion or rollback changes one of them. Two metadata reads, not a listing: on GCS
        an objects.get is a Class B operation and a listing Class A, the dearer class, and
        this is polled. (`poll_timeout`: as for served_models.)"""
        paths = RegistryPaths(model)
        found = {}
        for alias in (CHAMPION, CANARY):
            blob = self.storage.bucket.get_blob(paths.alias(alias), **_polled(poll_timeout))
            if blob is not None:
                found[alias] = int(blob.generation or 0)
        return found

    # --- a canary's outcomes, counted across predictor instances ------------------------------
    def record_canary_count(
        self, model: str, round_id: int, instance: str, succeeded: int, failed: int
    ) -> None:
        """One instance's running totals for a canary; only that instance writes its object."""
        self.storage.write_json(
            RegistryPaths(model).canary_count(round_id, instance),
            {"succeeded": succeeded, "failed": failed, "updated_at": _now()},
        )

    def canary_counts(self, model: str, round_id: int) -> tuple[int, int]:
        """(succeeded, failed) summed over every instance that counted the canary."""
        succeeded = failed = 0
        for path in self.storage.list(RegistryPaths(model).canary_counts(round_id)):
            found = self.storage.read_json(path)
            if isinstance(found, dict):
                succeeded += int(found.get("succeeded", 0))
                failed += int(found.get("failed", 0))
        return succeeded, failed

    # --- what each predictor instance serves ---------------------------------------------------
    def record_instance(self, model: str, instance: str, state: Mapping[str, Any]) -> None:
        """One instance's record of what it serves of `model` (only that instance writes it);
        `updated_at` is set here."""
        self.storage.write_json(
            RegistryPaths(model).instance(instance), {**state, "updated_at": _now()}
        )

    def instances(self, model: str) -> list[dict[str, Any]]:
        """Every instance record of `model`, as written, each with its `instance` name; a
        record that cannot be read is left out."""
        paths = RegistryPaths(model)
        found = []
        for path in self.storage.list(paths.instances):
            record = self.storage.read_json(path)
            if isinstance(record, dict):
                name = path[len(paths.instances) :].removesuffix(".json")
                found.append({**record, "instance": name})
        return found

    def drop_instances(self, model: str, older_than: dt.timedelta) -> list[str]:
        """Delete the records of instances silent for longer than `older_than` (gone with
        their revision or killed); return their names."""
        cutoff = dt.datetime.now(dt.UTC) - older_than
        dropped = []
        for record in self.instances(model):
            try:
                updated = dt.datetime.fromisoformat(str(record.get("updated_at")))
            except ValueError:
                updated = None
            if updated is None or updated < cutoff:
                self.storage.delete(RegistryPaths(model).instance(record["instance"]))
                dropped.append(record["instance"])
        return dropped

    def claim_promotion(self, model: str, round_id: int, instance: str, succeeded: int) -> bool:
        """True for exactly one caller per canary: the instance that is to promote it."""
        record = {"instance": instance, "succeeded": succeeded, "claimed_at": _now()}
        created = self.storage.create_if_absent(
            RegistryPaths(model).promotion(round_id), json.dumps(record).encode()
        )
        return created is not None

    def start_canary(
        self, model: str, version: int, percent: int, promote_after: int = 0
    ) -> tuple[bool, int | None]:
        """Send `percent`% of the traffic to `version` (the `canary` alias), the rest to the
        champion. Returns (started, the canary it replaced). Never moves back to an older
        canary, so a late redelivery cannot undo a newer one."""
        if not 0 < percent < 100:
            raise RolloutError(f"a canary takes 1..99% of the traffic, not {percent}%")
        path = RegistryPaths(model).alias(CANARY)
        for _ in range(20):
            current = self.storage.read(path)
            previous = None if current is None else int(current.json()["version"])
            if previous is not None and previous >= version:
                return False, previous
            value = {
                "version": version,
                "percent": percent,
                "promote_after": promote_after,
                "updated_at": _now(),
            }
            try:
                self.storage.write(
                    path,
                    json.dumps(value).encode(),
                    content_type="application/json",
                    if_generation_match=0 if current is None else current.generation,
                )
                return True, previous
            except gexc.PreconditionFailed:
                continue
        raise TransientError(f"alias {CANARY} of {model} kept changing; retry")

    def _drop_canary(self, model: str, version: int) -> None:
        """Remove the canary alias if it still names `version` (compare-and-delete)."""
        path = RegistryPaths(model).alias(CANARY)
        current = self.storage.read(path)
        if current is None or int(current.json()["version"]) != version:
            return
        with contextlib.suppress(gexc.PreconditionFailed, gexc.NotFound):
            self.storage.bucket.blob(path).delete(if_generation_match=current.generation)

    def promote(self, model: str, expected: int | None = None) -> tuple[int, int | None]:
        """Make the canary the champion (100% of the traffic). Returns (new, old champion).

        With `expected`, promote only if that version is the canary: an automatic promotion
        decided on one version never promotes a newer canary it has not seen.
        """
        traffic = self.traffic(model)
        if traffic.canary is None:
            raise RolloutError(f"{model} has no canary to promote")
        if expected is not None and traffic.canary != expected:
            raise RolloutError(f"{model}'s canary is v{traffic.canary}, not v{expected}")
        moved, previous = self.move_alias(model, traffic.canary, CHAMPION, only_forward=False)
        self._drop_canary(model, traffic.canary)
        if not moved and previous != traffic.canary:
            raise TransientError(f"{model}'s champion changed during the promotion; retry")
        return traffic.canary, traffic.champion

    def rollback(self, model: str) -> tuple[int, int, str]:
        """Undo the last rollout step. During a canary: stop it (the champion keeps 100%).
        Otherwise: the champion goes back to the version it replaced.

        Returns (version now serving 100%, version taken out, what was done: "canary" or
        "champion").
        """
        traffic = self.traffic(model)
        if traffic.canary is not None and traffic.champion is not None:
            self._drop_canary(model, traffic.canary)
            return traffic.champion, traffic.canary, CANARY
        if traffic.champion is None or not traffic.history:
            raise RolloutError(f"{model} has no earlier champion to roll back to")
        path = RegistryPaths(model).alias(CHAMPION)
        current = self.storage.read(path)
        if current is None:
            raise TransientError(f"{model}'s champion alias vanished; retry")
        record = current.json()
        history = [int(v) for v in record.get("history", [])]
        if not history or int(record["version"]) != traffic.champion:
            raise TransientError(f"{model}'s champion changed during the rollback; retry")
        back = history.pop()
        value = {
            "version": back,
            "updated_at": _now(),
            "history": history,
            "rolled_back_from": traffic.champion,
        }
        try:
            self.storage.write(
                path,
                json.dumps(value).encode(),
                content_type="application/json",
                if_generation_match=current.generation,
            )
        except gexc.PreconditionFailed as exc:
            raise TransientError(f"{model}'s champion changed during the rollback") from exc
        return back, traffic.champion, CHAMPION


def _polled(timeout: float | None) -> dict[str, Any]:
    """A polling caller's call options: its own timeout and no retry, or the client's."""
    return {} if timeout is None else {"timeout": timeout, "retry": None}
