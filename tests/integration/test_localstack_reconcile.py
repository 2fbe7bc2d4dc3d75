"""The reconcile pass of `mlpipe up`: from the runs' records in the bucket, it publishes the
event that drives each unfinished run's next step, and only that (real emulators; what it
publishes is pulled from the topics)."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import pytest
from google.protobuf.message import Message

from mlpipe.messaging import events
from mlpipe.messaging.push import PushMessage, parse_object_notification
from mlpipe.ml.config import PipelineConfig
from mlpipe.store import layout
from mlpipe.store.storage import sha256_hex
from mlpipe.v1 import events_pb2
from mlpipe_ops import reconcile
from tests.integration.conftest import Cloud

pytestmark = pytest.mark.integration

WATCHED = (
    events.GCS_OBJECTS,
    events.TRAINING_COMPLETED,
    events.EVALUATION_COMPLETED,
    events.DEPLOYMENT_COMPLETED,
)


def context(run_id: str) -> events_pb2.RunContext:
    return events_pb2.RunContext(run_id=run_id, pipeline="iris")


def record(cloud: Cloud, path: str, event: Message) -> None:
    cloud.storage.write(path, events.to_json(event).encode(), content_type="application/json")


def land(cloud: Cloud, text: str, name: str, metadata: bool = True) -> tuple[str, int, str]:
    """A dataset object as ingest (with its sha256 in the metadata) or a user upload writes it;
    its path, generation and sha256."""
    data = text.encode()
    path = f"datasets/iris/dt=2026-01-01/{name}.csv"
    meta = {"sha256": sha256_hex(data), "request_id": f"req-{name}"} if metadata else None
    generation = cloud.storage.write(path, data, content_type="text/csv", metadata=meta)
    return path, generation, sha256_hex(data)


def claim(cloud: Cloud, run_id: str, path: str, generation: int, state: str, lease: float) -> None:
    """The trainer's claim as mlpipe_trainer.lease writes it."""
    body = {
        "run_id": run_id,
        "dataset": cloud.storage.uri(path),
        "generation": generation,
        "state": state,
        "claimed_at": time.time(),
        "lease_seconds": lease,
        "attempt": 1,
        "crashes": 0,
    }
    cloud.storage.write(layout.RunPaths(run_id).claim, json.dumps(body).encode())


def notifications(cloud: Cloud, expect: int) -> list[tuple[str, int, dict[str, str]]]:
    """(object, generation, metadata) of each OBJECT_FINALIZE notification published, read
    the way the trainer reads them."""
    sub = cloud.subscriptions[events.GCS_OBJECTS]
    found: list[tuple[str, int, dict[str, str]]] = []
    deadline = time.monotonic() + 15
    while len(found) < expect and time.monotonic() < deadline:
        reply = cloud.subscriber.pull(
            request={"subscription": sub, "max_messages": 100, "return_immediately": True},
            timeout=5,
        )
        for r in reply.received_messages:
            message = PushMessage(
                data=r.message.data,
                attributes=dict(r.message.attributes),
                message_id=r.message.message_id,
                publish_time=dt.datetime.now(dt.UTC),
            )
            note = parse_object_notification(message)
            assert note.event_type == "OBJECT_FINALIZE"
            assert r.message.attributes["payloadFormat"] == "JSON_API_V1"
            found.append((note.name, note.generation, note.metadata))
        if reply.received_messages:
            cloud.subscriber.acknowledge(
                request={
                    "subscription": sub,
                    "ack_ids": [r.ack_id for r in reply.received_messages],
                }
            )
        else:
            time.sleep(0.1)
    return found


def test_each_unfinished_run_gets_the_event_of_its_next_step_and_only_once_per_pass(
    cloud: Cloud, iris_config: PipelineConfig, tmp_path: Path
) -> None:
    cloud.watch(*WATCHED)
    old, _, _ = land(cloud, "a,b\n0,0\n", "before-the-config")
    time.sleep(0.01)
    cloud.apply_config(iris_config)
    config_sha = iris_config.sha256()
    # One run at each point where a stopped stack can leave it.
    trained, evaluated, deployed, failed = "a" * 16, "b" * 16, "c" * 16, "d" * 16
    record(
        cloud,
        layout.RunPaths(trained).training,
        events_pb2.TrainingCompleted(context=context(trained), model_sha256="m1"),
    )
    record(
        cloud,
        layout.RunPaths(evaluated).training,
        events_pb2.TrainingCompleted(context=context(evaluated)),
    )
    record(
        cloud,
        layout.RunPaths(evaluated).evaluation,
        events_pb2.EvaluationCompleted(
            context=context(evaluated), model_name="iris-classifier", passed=True
        ),
    )
    record(
        cloud,
        layout.RunPaths(deployed).evaluation,
        events_pb2.EvaluationCompleted(context=context(deployed)),
    )
    record(
        cloud,
        layout.RunPaths(deployed).deployment,
        events_pb2.DeploymentCompleted(context=context(deployed)),
    )
    record(
        cloud,
        layout.RunPaths(failed).training,
        events_pb2.TrainingCompleted(context=context(failed)),
    )
    record(
        cloud, layout.RunPaths(failed).failed, events_pb2.PipelineFailed(context=context(failed))
    )
    # A job that crashed and released its claim; one whose claim is still leased for 2 s.
    released_path, released_gen, released_sha = land(cloud, "a,b\n1,1\n", "released")
    released = layout.run_id_for(released_sha, config_sha)
    claim(cloud, released, released_path, released_gen, "released", 30)
    leased_path, leased_gen, leased_sha = land(cloud, "a,b\n2,2\n", "leased")
    leased = layout.run_id_for(leased_sha, config_sha)
    claim(cloud, leased, leased_path, leased_gen, "running", 2)
    # Landed under the current config, never picked up: by ingest, and by a user's upload.
    ingested_path, ingested_gen, _ = land(cloud, "a,b\n3,3\n", "ingested")
    uploaded_path, uploaded_gen, uploaded_sha = land(cloud, "a,b\n4,4\n", "up", metadata=False)
    lines: list[str] = []
    t0 = time.monotonic()

    published = reconcile.reconcile(cloud.storage, cloud.publisher, tmp_path, lines.append)

    waited = time.monotonic() - t0
    assert published == 6, lines
    assert [e.context.run_id for e in cloud.pulled(events.TRAINING_COMPLETED)] == [trained]
    evaluations = cloud.pulled(events.EVALUATION_COMPLETED)
    assert [(e.context.run_id, e.passed) for e in evaluations] == [(evaluated, True)]
    assert cloud.pulled(events.DEPLOYMENT_COMPLETED, expect=0) == []
    notified = notifications(cloud, expect=4)
    assert sorted(notified) == sorted(
        [
            (released_path, released_gen, {"sha256": released_sha, "request_id": "req-released"}),
            (leased_path, leased_gen, {"sha256": leased_sha, "request_id": "req-leased"}),
            (
                ingested_path,
                ingested_gen,
                {"sha256": sha256_hex(b"a,b\n3,3\n"), "request_id": "req-ingested"},
            ),
            (uploaded_path, uploaded_gen, {}),
        ]
    )
    assert old not in {n[0] for n in notified}
    # The leased run was re-published only once its lease had lapsed.
    assert waited >= 2
    assert all(line.startswith("reconcile        ") for line in lines)
    assert sum(trained in line and "TrainingCompleted" in line for line in lines) == 1
    assert any(leased in line and "lapses in" in line for line in lines)
    assert not any(deployed in line or failed in line for line in lines)
    assert json.loads((tmp_path / "reconcile.json").read_text())["hashes"] == {
        f"{uploaded_path}#{uploaded_gen}": uploaded_sha
    }


def test_a_step_that_never_moves_is_re_published_at_most_three_times(
    cloud: Cloud, tmp_path: Path
) -> None:
    cloud.watch(events.TRAINING_COMPLETED)
    stuck = "e" * 16
    record(
        cloud, layout.RunPaths(stuck).training, events_pb2.TrainingCompleted(context=context(stuck))
    )
    lines: list[str] = []

    counts = [
        reconcile.reconcile(cloud.storage, cloud.publisher, tmp_path, lines.append)
        for _ in range(reconcile.MAX_REDRIVES + 1)
    ]

    assert counts == [1, 1, 1, 0]
    assert len(cloud.pulled(events.TRAINING_COMPLETED, expect=3)) == 3
    assert f"run {stuck}" in lines[-2] and "NOT re-published" in lines[-2]
    assert f"mlpipe status {stuck}" in lines[-2]


def test_nothing_to_finish_says_so(cloud: Cloud, tmp_path: Path) -> None:
    lines: list[str] = []

    assert reconcile.reconcile(cloud.storage, cloud.publisher, tmp_path, lines.append) == 0
    assert lines == ["reconcile        nothing to finish (0 run(s) recorded)"]
