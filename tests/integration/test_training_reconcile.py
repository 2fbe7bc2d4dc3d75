"""A training start is acknowledged once its run is recorded (the open-run marker, the
claim, TrainingStarted), not held with 503 for the length of the job; the
reconciler starts again every started run whose job is gone, and only those."""

from __future__ import annotations

import time
import uuid

import pytest
from fastapi.testclient import TestClient

from mlpipe.messaging import events
from mlpipe.messaging.push import parse_envelope
from mlpipe.ml.config import PipelineConfig
from mlpipe.runtime.service import handle_push
from mlpipe.store import layout
from mlpipe.store.storage import sha256_hex
from mlpipe.v1 import events_pb2
from mlpipe_trainer import lease
from mlpipe_trainer.start import TrainingStarter
from tests.integration.conftest import Cloud, notification
from tests.integration.test_training_memory import RecordingLauncher

pytestmark = pytest.mark.integration


def landed(cloud: Cloud, csv_text: str) -> tuple[bytes, str]:
    """An iris dataset as ingest lands it; (the notification's push body, the run id)."""
    data = csv_text.encode()
    path = f"datasets/iris/dt=2026-11-23/{uuid.uuid4().hex[:12]}.csv"
    metadata = {"sha256": sha256_hex(data), "row_count": "150"}
    generation = cloud.storage.write(path, data, content_type="text/csv", metadata=metadata)
    return notification(cloud, path, generation, metadata=metadata), metadata["sha256"]


@pytest.fixture
def starter(cloud: Cloud, iris_config: PipelineConfig) -> tuple[TrainingStarter, RecordingLauncher]:
    cloud.apply_config(iris_config)
    cloud.watch(events.TRAINING_STARTED, events.TRAINING_COMPLETED, events.PIPELINE_FAILURES)
    launcher = RecordingLauncher()
    return TrainingStarter(
        cloud.storage, cloud.publisher, {"local": launcher}, "test", 60.0
    ), launcher


def test_a_started_run_is_acknowledged_and_so_is_its_redelivery(
    cloud: Cloud,
    iris_config: PipelineConfig,
    iris_csv: str,
    starter: tuple[TrainingStarter, RecordingLauncher],
) -> None:
    deps, launcher = starter
    body, sha = landed(cloud, iris_csv)
    run_id = layout.run_id_for(sha, iris_config.sha256())

    first = handle_push(body, deps, cloud.reporter("trainer"))
    again = handle_push(body, deps, cloud.reporter("trainer"))

    assert first[0] == 200 and first[1]["status"] == "training", first
    assert again[0] == 200 and again[1]["status"] == "in_progress", again
    assert launcher.launched == [run_id]
    paths = layout.RunPaths(run_id)
    claim = lease.read(cloud.storage, paths.claim)
    assert claim is not None and claim.body["message_id"] == "n1"
    recorded = cloud.storage.read(paths.started)
    assert recorded is not None
    assert events.from_json(events_pb2.TrainingStarted, recorded.data).job_id == f"local-{run_id}-1"
    assert cloud.storage.exists(layout.open_run_path(run_id))
    assert len(cloud.pulled(events.TRAINING_STARTED, expect=1)) == 1


def test_the_reconciler_starts_again_a_run_whose_job_is_gone(
    cloud: Cloud,
    iris_config: PipelineConfig,
    iris_csv: str,
    starter: tuple[TrainingStarter, RecordingLauncher],
) -> None:
    deps, launcher = starter
    body, sha = landed(cloud, iris_csv)
    run_id = layout.run_id_for(sha, iris_config.sha256())
    paths = layout.RunPaths(run_id)
    assert deps(parse_envelope(body)).status == "training"

    assert deps.reconcile() == []  # the job holds its lease: nothing to do
    lease.release(cloud.storage, paths.claim, crashed=True)  # what the crash reporter does
    restarted = deps.reconcile()

    assert [(r.run_id, r.status) for r in restarted] == [(run_id, "training")]
    assert launcher.launched == [run_id, run_id]
    claim = lease.read(cloud.storage, paths.claim)
    assert claim is not None and (claim.attempt, claim.crashes) == (2, 1)
    started = cloud.pulled(events.TRAINING_STARTED, expect=2)
    assert [s.context.run_id for s in started] == [run_id, run_id]
    assert started[1].dataset.sha256 == sha and started[1].context.request_id == ""


def test_a_lapsed_lease_is_taken_over_by_the_reconciler(
    cloud: Cloud,
    iris_config: PipelineConfig,
    iris_csv: str,
    starter: tuple[TrainingStarter, RecordingLauncher],
) -> None:
    deps, launcher = starter
    deps.lease_seconds = 0.5  # the job never renews it: it vanished with its instance
    body, sha = landed(cloud, iris_csv)
    run_id = layout.run_id_for(sha, iris_config.sha256())
    assert deps(parse_envelope(body)).status == "training"

    time.sleep(1.0)
    restarted = deps.reconcile()

    assert [r.status for r in restarted] == ["training"]
    assert launcher.launched == [run_id, run_id]


def test_a_recorded_run_is_left_alone_and_drops_its_marker(
    cloud: Cloud,
    iris_config: PipelineConfig,
    iris_csv: str,
    starter: tuple[TrainingStarter, RecordingLauncher],
) -> None:
    deps, launcher = starter
    body, sha = landed(cloud, iris_csv)
    run_id = layout.run_id_for(sha, iris_config.sha256())
    paths = layout.RunPaths(run_id)
    assert deps(parse_envelope(body)).status == "training"
    cloud.storage.write(paths.training, b"{}")  # the job recorded its result
    lease.release(cloud.storage, paths.claim, crashed=False)

    assert deps.reconcile() == []
    assert launcher.launched == [run_id]
    assert not cloud.storage.exists(layout.open_run_path(run_id))


def test_a_run_whose_job_keeps_dying_fails_once(
    cloud: Cloud,
    iris_config: PipelineConfig,
    iris_csv: str,
    starter: tuple[TrainingStarter, RecordingLauncher],
) -> None:
    deps, launcher = starter
    body, sha = landed(cloud, iris_csv)
    run_id = layout.run_id_for(sha, iris_config.sha256())
    paths = layout.RunPaths(run_id)
    assert deps(parse_envelope(body)).status == "training"
    for _ in range(deps.max_crashes):
        lease.release(cloud.storage, paths.claim, crashed=True)
        deps.reconcile()

    assert launcher.launched == [run_id] * deps.max_crashes
    failed = cloud.pulled(events.PIPELINE_FAILURES, expect=1)
    assert [f.reason for f in failed] == ["job_crashed"]
    assert cloud.storage.exists(paths.failed)
    assert not cloud.storage.exists(layout.open_run_path(run_id))
    assert deps.reconcile() == []


def test_the_trainer_route_runs_the_reconciler(
    cloud: Cloud, monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.setenv("MLPIPE_PROJECT", cloud.project)
    monkeypatch.setenv("MLPIPE_BUCKET", cloud.storage.bucket_name)
    monkeypatch.setenv("MLPIPE_JOB_RUNNER", "subprocess")
    monkeypatch.setenv("MLPIPE_RECONCILE_INTERVAL_SECONDS", "0")
    from mlpipe_trainer.main import app

    with TestClient(app) as trainer:
        reply = trainer.post("/v1/runs:reconcile")

    assert reply.status_code == 200
    assert reply.json() == {"restarted": []}


def test_a_run_whose_instance_died_before_its_claim_is_started_by_the_reconciler(
    cloud: Cloud,
    iris_config: PipelineConfig,
    iris_csv: str,
    starter: tuple[TrainingStarter, RecordingLauncher],
) -> None:
    deps, launcher = starter
    body, sha = landed(cloud, iris_csv)
    run_id = layout.run_id_for(sha, iris_config.sha256())
    paths = layout.RunPaths(run_id)
    assert deps(parse_envelope(body)).status == "training"
    # What an instance that died right after writing the marker leaves: no claim, no start.
    cloud.storage.delete(paths.claim)
    cloud.storage.delete(paths.started)

    restarted = deps.reconcile()

    assert [(r.run_id, r.status) for r in restarted] == [(run_id, "training")]
    assert launcher.launched == [run_id, run_id]
    assert cloud.storage.exists(paths.started)
