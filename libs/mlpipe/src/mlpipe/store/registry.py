"""A model registry in GCS: numbered versions, one per run, and movable aliases.

    registry/<model>/runs/<run_id>.json          claim → the version registered for that run
    registry/<model>/version-claims/<n>          who holds version number n
    registry/<model>/versions/<n>/model.joblib   the artifact
    registry/<model>/versions/<n>/model.onnx     compiled forms, when the deployer made them
    registry/<model>/versions/<n>/version.json   written last: the version is then complete
    registry/<model>/aliases/champion            {"version": n, "history": [older champions]}
    registry/<model>/aliases/canary              {"version": n, "percent": p, ...} during a canary

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
from google.protobuf import json_format

from mlpipe.errors import TransientError
from mlpipe.faults import fault_point
from mlpipe.messaging import events
from mlpipe.store.storage import Storage, sha256_hex
from mlpipe.v1 import events_pb2

log = logging.getLogger(__name__)

CHAMPION = "champion"
CANARY = "canary"
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

    @staticmethod
    def _base(model: str) -> str:
        return f"registry/{model}/"

    def version_path(self, model: str, version: int) -> str:
        return f"{self._base(model)}versions/{version}/"

    def versions(self, model: str) -> list[int]:
        """Complete versions (those whose version.json exists), ascending."""
        found = []
        for name in self.storage.list(self._base(model) + "versions/"):
            parts = name.split("/")
            if len(parts) == 5 and parts[4] == "version.json" and parts[3].isdigit():
                found.append(int(parts[3]))
        return sorted(found)

    def models(self) -> list[str]:
        names = {n.split("/")[1] for n in self.storage.list("registry/") if n.count("/") >= 2}
        return sorted(names)

    def get(self, model: str, version: int) -> ModelVersion | None:
        info = self.storage.read_json(self.version_path(model, version) + "version.json")
        if info is None:
            return None
        return ModelVersion(
            model=model,
            version=version,
            run_id=info["run_id"],
            model_uri=info["model_uri"],
            model_sha256=info["model_sha256"],
            info=info,
        )

    def alias(self, model: str, alias: str = CHAMPION) -> int | None:
        value = self.storage.read_json(f"{self._base(model)}aliases/{alias}")
        return None if value is None else int(value["version"])

    def version_for_run(self, model: str, run_id: str) -> int | None:
        claim = self.storage.read_json(f"{self._base(model)}runs/{run_id}.json")
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
        claim_path = f"{self._base(model)}runs/{run_id}.json"
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
        base = self.version_path(model, version)
        sha = sha256_hex(artifact)
        self.storage.write(base + "model.joblib", artifact)
        extras = {}
        for name, data in (extra_artifacts or {}).items():
            self.storage.write(base + name, data)
            extras[name] = {"uri": self.storage.uri(base + name), "sha256": sha256_hex(data)}
        record = {
            **info,
            "artifacts": extras,
            "model": model,
            "version": version,
            "run_id": run_id,
            "model_uri": self.storage.uri(base + "model.joblib"),
            "model_sha256": sha,
            "registered_at": _now(),
        }
        self.storage.write_json(base + "version.json", record)
        registered = json.dumps({"state": "registered", "version": version}).encode()
        self.storage.write(
            claim_path, registered, content_type="application/json", if_generation_match=claim_gen
        )
        log.info("registered %s version %d for run %s", model, version, run_id)
        return ModelVersion(model, version, run_id, record["model_uri"], sha, record), True

    def _allocate_version(self, model: str, run_id: str) -> int:
        prefix = f"{self._base(model)}version-claims/"
        taken = [
            int(n.rsplit("/", 1)[-1])
            for n in self.storage.list(prefix)
            if n.rsplit("/", 1)[-1].isdigit()
        ]
        candidate = max(taken, default=0) + 1
        for _ in range(100):
            if (
                self.storage.create_if_absent(
                    prefix + str(candidate), run_id.encode(), content_type="text/plain"
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
        path = f"{self._base(model)}aliases/{alias}"
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

    def load_artifact(self, mv: ModelVersion, name: str = "model.joblib") -> bytes:
        """An artifact's bytes (the registered model, or an extra such as model.onnx),
        verified against the sha256 recorded in the registry; raise ValueError otherwise."""
        if name == "model.joblib":
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
        base = f"{self._base(model)}aliases/"
        champion = self.storage.read_json(base + CHAMPION)
        canary = self.storage.read_json(base + CANARY)
        champion_version = None if champion is None else int(champion["version"])
        history = [] if champion is None else [int(v) for v in champion.get("history", [])]
        # A promotion moves the champion first, then removes the canary: in between, the
        # canary names the champion and gets no traffic of its own.
        if canary is None or int(canary["version"]) == champion_version:
            return Traffic(champion_version, history=history)
        return Traffic(
            champion_version,
            int(canary["version"]),
            int(canary.get("percent", 0)),
            int(canary.get("promote_after", 0)),
            history,
        )

    def start_canary(
        self, model: str, version: int, percent: int, promote_after: int = 0
    ) -> tuple[bool, int | None]:
        """Send `percent`% of the traffic to `version` (the `canary` alias), the rest to the
        champion. Returns (started, the canary it replaced). Never moves back to an older
        canary, so a late redelivery cannot undo a newer one."""
        if not 0 < percent < 100:
            raise RolloutError(f"a canary takes 1..99% of the traffic, not {percent}%")
        path = f"{self._base(model)}aliases/{CANARY}"
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
        path = f"{self._base(model)}aliases/{CANARY}"
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
        path = f"{self._base(model)}aliases/{CHAMPION}"
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


def traffic_shares(traffic: Traffic) -> list[events_pb2.TrafficShare]:
    return [events_pb2.TrafficShare(version=v, percent=p, alias=a) for v, p, a in traffic.shares()]


def rollout_event(
    registry: Registry,
    model: str,
    version: int,
    *,
    action: str,
    alias: str,
    previous_version: int | None,
    target: str,
    requested_by: str,
    producer: str,
    code_version: str,
    target_resource: str = "",
    reason: str = "",
) -> events_pb2.DeploymentCompleted:
    """The DeploymentCompleted that records a rollout step (promote, rollback) of `version`,
    with the lineage of the run that made it and the model's traffic split after the step."""
    mv = registry.get(model, version)
    if mv is None:
        raise FileNotFoundError(f"{model} v{version} is not in the registry")
    dataset = events_pb2.DatasetRef()
    json_format.ParseDict(mv.info.get("dataset", {}), dataset, ignore_unknown_fields=True)
    context = events.context(
        producer=producer,
        code_version=code_version,
        run_id=mv.run_id,
        pipeline=dataset.name,
        config_sha256=str(mv.info.get("config_sha256", "")),
    )
    return events_pb2.DeploymentCompleted(
        context=context,
        dataset=dataset,
        model_name=model,
        version=version,
        alias=alias,
        deployed=True,
        reason=reason,
        model_uri=mv.model_uri,
        model_sha256=mv.model_sha256,
        target=target,
        previous_version=previous_version or 0,
        runtime=str(mv.info.get("runtime", "sklearn")),
        runtime_note=str(mv.info.get("runtime_note", "")),
        action=action,
        traffic=traffic_shares(registry.traffic(model)),
        target_resource=target_resource,
        requested_by=requested_by,
    )
