"""A model registry in GCS: numbered versions, one per run, and movable aliases.

    registry/<model>/runs/<run_id>.json          claim → the version registered for that run
    registry/<model>/version-claims/<n>          who holds version number n
    registry/<model>/versions/<n>/model.joblib   the artifact
    registry/<model>/versions/<n>/version.json   written last: the version is then complete
    registry/<model>/aliases/<alias>             {"version": n, ...}

Every write that decides something uses a generation precondition, so concurrent or repeated
deliveries of the same run register exactly one version.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from google.api_core import exceptions as gexc

from mlpipe.errors import TransientError
from mlpipe.storage import Storage, sha256_hex

log = logging.getLogger(__name__)

CHAMPION = "champion"


@dataclass(frozen=True)
class ModelVersion:
    model: str
    version: int
    run_id: str
    model_uri: str
    model_sha256: str
    info: dict[str, Any]


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
        self, model: str, run_id: str, artifact: bytes, info: dict[str, Any]
    ) -> tuple[ModelVersion, bool]:
        """Register `artifact` as the next version for `run_id`, exactly once.

        Returns (version, created). A second call for the same run returns the first call's
        version with created=False. Raises TransientError while another delivery holds the
        run's claim (the caller answers 5xx; Pub/Sub retries).
        """
        claim_path = f"{self._base(model)}runs/{run_id}.json"
        pending = json.dumps({"state": "pending", "claimed_at": time.time()}).encode()
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
            try:
                claim_gen = self.storage.write(
                    claim_path,
                    pending,
                    content_type="application/json",
                    if_generation_match=existing.generation,
                )
            except gexc.PreconditionFailed as exc:
                raise TransientError(f"lost the race for run {run_id}'s claim") from exc

        version = self._allocate_version(model, run_id)
        base = self.version_path(model, version)
        sha = sha256_hex(artifact)
        self.storage.write(base + "model.joblib", artifact)
        record = {
            **info,
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
            value = json.dumps({"version": version, "updated_at": _now()}).encode()
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

    def load_artifact(self, mv: ModelVersion) -> bytes:
        """The artifact's bytes, verified against the registered sha256."""
        obj = self.storage.read(self.storage.path_of(mv.model_uri))
        if obj is None:
            raise FileNotFoundError(f"{mv.model_uri} is missing")
        actual = sha256_hex(obj.data)
        if actual != mv.model_sha256:
            raise ValueError(
                f"{mv.model_uri} has sha256 {actual}, registry says {mv.model_sha256}: refusing"
            )
        return obj.data
