"""Finish the runs a stopped stack left unfinished (`mlpipe up` runs this after every start).

The bucket outlives the stack (fake-gcs-server on disk), but the Pub/Sub emulator forgets every
message it had not delivered and acknowledged: a run that was between two steps when the stack
stopped (a `down`, a kill -9, a reboot) would wait forever for an event that no longer exists.
Every step records the event it emitted and is idempotent on run_id, so publishing a recorded
event again is always safe: the next step either does its work, or finds its own record and
publishes that (`republish_recorded` in mlpipe.runtime). The pass lists the bucket once,
takes each run's last record, and publishes what drives its next step:

    dataset landed, no run yet      the object's OBJECT_FINALIZE notification, as GCS sends it
    claimed for training, no result the same notification, once the claim's lease has lapsed
                                    (its job died with the stack; while the lease is live the
                                    trainer would acknowledge the notification and drop it)
    trained, not evaluated          its TrainingCompleted
    evaluated, no deployment record its EvaluationCompleted
    champion not served             the champion's DeploymentCompleted

A landed dataset counts as "no run yet" only when the pipeline's config is the one that was in
force when it landed (the config object is older than the dataset): a dataset trained under an
earlier config is not trained again under a new one. Each (run, step) is re-published at most
MAX_REDRIVES times over all starts (`reconcile.json` in the state directory): a step that fails
for good on it does not fail again at every start. What the pass cannot recover: an
IngestRequest that had not landed its data yet (publish it again).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from mlpipe.messaging import events, topology
from mlpipe.messaging.publishing import Publisher
from mlpipe.ml.config import ConfigError, config_path, parse_config
from mlpipe.store import layout
from mlpipe.store.registry import CHAMPION, Registry
from mlpipe.store.storage import Storage, make_client, sha256_hex
from mlpipe.v1 import events_pb2
from mlpipe_ops import statedir

MAX_REDRIVES = 3
# Past the claim's lease before re-publishing, so the trainer surely sees it lapsed.
LEASE_MARGIN_SECONDS = 1.0
# The trainer's claim states (mlpipe_trainer.lease): released and published need no wait.
RELEASED, PUBLISHED = "released", "published"


@dataclass
class Memo:
    """What earlier passes re-published (`reconcile.json`) and the hashes of direct uploads."""

    path: Path
    redriven: dict[str, dict[str, Any]] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Memo:
        try:
            raw = json.loads(path.read_text())
            return cls(path, dict(raw.get("redriven", {})), dict(raw.get("hashes", {})))
        except (OSError, ValueError, AttributeError):
            return cls(path)

    def save(self) -> None:
        statedir.write_atomic(
            self.path, json.dumps({"redriven": self.redriven, "hashes": self.hashes}, indent=1)
        )

    def attempts(self, key: str) -> int:
        return int(self.redriven.get(key, {}).get("count", 0))

    def count(self, key: str) -> None:
        self.redriven[key] = {
            "count": self.attempts(key) + 1,
            "last": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }


@dataclass
class Reconciler:
    storage: Storage
    publisher: Publisher
    memo: Memo
    progress: Callable[[str], None]
    env: str = "local"
    predictor_url: str = ""
    done: int = 0
    # (when its claim lapses, run_id, the claim's generation, dataset uri, its generation)
    waiting: list[tuple[float, str, int, str, int]] = field(default_factory=list)

    def say(self, text: str) -> None:
        self.progress(f"reconcile        {text}")

    def redrive(self, key: str, what: str, publish: Callable[[], str]) -> None:
        """Publish once more unless `key` was re-published MAX_REDRIVES times already."""
        if self.memo.attempts(key) >= MAX_REDRIVES:
            self.say(
                f"{what}: NOT re-published, it was {MAX_REDRIVES} times already without "
                f"progress; see `mlpipe status {key.split('/')[0]}` and `mlpipe failures`"
            )
            return
        self.memo.count(key)
        self.memo.save()
        self.say(f"{what}: re-published {publish()}")
        self.done += 1

    # --- the run records ----------------------------------------------------------------
    def runs(self) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        # runs/<run_id>/<record> (mlpipe.store.layout.RunPaths)
        for name in self.storage.list(layout.RUNS):
            parts = name.split("/")
            if len(parts) >= 3 and layout.RUN_ID_PATTERN.match(parts[1]):
                found.setdefault(parts[1], set()).add(name)
        return found

    def run(self, run_id: str, names: set[str]) -> None:
        paths = layout.RunPaths(run_id)
        if paths.failed in names or paths.deployment in names:
            return
        if paths.evaluation in names:
            self._republish_record(
                run_id, paths.evaluation, events_pb2.EvaluationCompleted, "evaluated"
            )
        elif paths.training in names:
            self._republish_record(run_id, paths.training, events_pb2.TrainingCompleted, "trained")
        elif paths.claim in names:
            self._training(run_id, paths.claim)

    def _republish_record(self, run_id: str, path: str, cls: type[Any], stage: str) -> None:
        recorded = self.storage.read(path)
        if recorded is None:
            return
        event = events.from_json(cls, recorded.data)
        what = f"run {run_id} ({event.context.pipeline or '?'}) {stage}, next step never ran"
        self._republish(run_id, recorded.data, cls, stage, what)

    def _republish(self, run_id: str, data: bytes, cls: type[Any], stage: str, what: str) -> None:
        event = events.from_json(cls, data)

        def publish() -> str:
            return f"its {cls.DESCRIPTOR.name} (message {self.publisher.publish(event)})"

        self.redrive(f"{run_id}/{stage}", what, publish)

    def _training(self, run_id: str, claim_path: str) -> None:
        claim = self.storage.read(claim_path)
        if claim is None:
            return
        try:
            body = claim.json()
        except ValueError:
            body = {}
        body = body if isinstance(body, dict) else {}
        uri, generation = str(body.get("dataset", "")), int(body.get("generation") or 0)
        state = str(body.get("state", ""))
        if state == PUBLISHED or not uri:
            return
        lapses = float(body.get("claimed_at") or 0) + float(body.get("lease_seconds") or 0)
        if state != RELEASED and lapses + LEASE_MARGIN_SECONDS > time.time():
            self.waiting.append((lapses, run_id, claim.generation, uri, generation))
            return
        self._notify(run_id, uri, generation, "was training, its job stopped with the stack")

    def finish_waiting(self) -> None:
        """Re-publish each waiting run's notification once its claim's lease lapsed, unless a
        job renewed it meanwhile (then that job is alive and finishes the run)."""
        for lapses, run_id, _, _, _ in sorted(self.waiting):
            self.say(
                f"run {run_id} was training when the stack stopped: its claim lapses in "
                f"{max(0.0, lapses - time.time()):.0f}s; its notification is re-published then"
            )
        for lapses, run_id, generation, uri, dataset_generation in sorted(self.waiting):
            time.sleep(max(0.0, lapses + LEASE_MARGIN_SECONDS - time.time()))
            claim = self.storage.read(layout.RunPaths(run_id).claim)
            if claim is None or claim.generation != generation:
                self.say(f"run {run_id}: its claim was renewed, a job is training it")
                continue
            self._notify(run_id, uri, dataset_generation, "was training, its job stopped")
        self.waiting = []

    def _notify(self, run_id: str, uri: str, generation: int, what: str) -> None:
        name = self.storage.path_of(uri)
        blob = self.storage.bucket.get_blob(name)
        if blob is None or (generation and blob.generation != generation):
            self.say(f"run {run_id} {what}: its dataset {uri}#{generation} is gone; not re-run")
            return
        self._redrive_notification(f"{run_id}/training", f"run {run_id} {what}", blob)

    def _redrive_notification(self, key: str, what: str, blob: Any) -> None:
        self.redrive(
            key,
            what,
            lambda: (
                f"the OBJECT_FINALIZE notification of {self.storage.uri(blob.name)} "
                f"(message {self._publish_notification(blob)})"
            ),
        )

    def _publish_notification(self, blob: Any) -> str:
        """The notification GCS (and fake-gcs-server) sends for a new object: the object's
        JSON resource, with the JSON_API_V1 attributes."""
        attributes = {
            "bucketId": blob.bucket.name,
            "objectId": blob.name,
            "objectGeneration": str(blob.generation),
            "eventType": "OBJECT_FINALIZE",
            "eventTime": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z"),
            "payloadFormat": "JSON_API_V1",
        }
        data = json.dumps(blob._properties).encode()
        return self.publisher.publish_raw(topology.TOPOLOGY.notification.topic, data, attributes)

    # --- landed datasets without a run ------------------------------------------------------
    def datasets(self, run_ids: set[str]) -> None:
        configs: dict[str, tuple[str, dt.datetime] | None] = {}
        prefix = topology.TOPOLOGY.notification.object_prefix
        for blob in self.storage.client.list_blobs(self.storage.bucket_name, prefix=prefix):
            match = layout.DATASET_PATH.match(blob.name)
            if match is None:
                continue
            pipeline = match["name"]
            if pipeline not in configs:
                configs[pipeline] = self._config(pipeline)
            config = configs[pipeline]
            # No config: the trainer would refuse it. A newer config: it ran under another.
            if config is None or blob.time_created is None or blob.time_created < config[1]:
                continue
            sha = (blob.metadata or {}).get("sha256") or self._hash(blob)
            run_id = layout.run_id_for(sha, config[0])
            if run_id in run_ids:
                continue
            self._redrive_notification(
                f"{run_id}/landed",
                f"run {run_id} ({pipeline}): {self.storage.uri(blob.name)} landed, no run started",
                blob,
            )

    def _config(self, pipeline: str) -> tuple[str, dt.datetime] | None:
        blob = self.storage.bucket.get_blob(config_path(pipeline))
        if blob is None or blob.updated is None:
            return None
        try:
            config = parse_config(blob.download_as_bytes(), source=blob.name, env=self.env)
        except ConfigError:
            return None
        return config.sha256(), blob.updated

    def _hash(self, blob: Any) -> str:
        """A direct upload's sha256 (GCS offers only md5), computed once per generation."""
        key = f"{blob.name}#{blob.generation}"
        if key not in self.memo.hashes:
            self.memo.hashes[key] = sha256_hex(blob.download_as_bytes())
            self.memo.save()
        return self.memo.hashes[key]

    # --- serving ----------------------------------------------------------------------------
    def serving(self) -> None:
        if not self.predictor_url:
            return
        try:
            served = httpx.get(f"{self.predictor_url}/v1/models", timeout=5).json()["models"]
        except (httpx.HTTPError, ValueError, KeyError):
            self.say("the predictor did not say what it serves; champions not checked")
            return
        registry = Registry(self.storage)
        for model in registry.models():
            champion = registry.alias(model, CHAMPION)
            if champion is None or served.get(model, {}).get("version") == champion:
                continue
            version = registry.get(model, champion)
            if version is None:
                continue
            recorded = self.storage.read(layout.RunPaths(version.run_id).deployment)
            if recorded is None:
                continue
            was = served.get(model, {}).get("version")
            self._republish(
                version.run_id,
                recorded.data,
                events_pb2.DeploymentCompleted,
                "served",
                f"model {model}: champion v{champion} not served (the predictor has "
                f"{'v' + str(was) if was else 'nothing'})",
            )


def reconcile(
    storage: Storage,
    publisher: Publisher,
    state_dir: Path,
    progress: Callable[[str], None] = print,
    env: str = "local",
    predictor_url: str = "",
) -> int:
    """One pass over the bucket (see the module docstring); return how many events it
    re-published."""
    memo = Memo.load(state_dir / statedir.RECONCILE_FILE)
    passer = Reconciler(storage, publisher, memo, progress, env, predictor_url)
    runs = passer.runs()
    for run_id in sorted(runs):
        passer.run(run_id, runs[run_id])
    passer.datasets(set(runs))
    passer.serving()
    passer.finish_waiting()
    if passer.done == 0:
        passer.say(f"nothing to finish ({len(runs)} run(s) recorded)")
    return passer.done


def reconcile_stack(state: Any, progress: Callable[[str], None], env: str = "local") -> int:
    """`reconcile` against a running local stack (a mlpipe_ops.localstack.StackState)."""
    from mlpipe_ops.localstack import client_env

    with client_env(state):
        storage = Storage(make_client(state.project), state.bucket)
        return reconcile(
            storage,
            Publisher(state.project),
            Path(state.state_dir),
            progress,
            env,
            state.url("predictor"),
        )
