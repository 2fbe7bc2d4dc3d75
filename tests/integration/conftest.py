"""Per-test GCP-like environment on the emulators: a fresh project id and bucket each time."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi.testclient import TestClient
from google.cloud import pubsub_v1
from google.protobuf.message import Message

from mlpipe.messaging import events, topology
from mlpipe.messaging.publishing import Publisher
from mlpipe.messaging.push import make_envelope
from mlpipe.ml.config import PipelineConfig, config_path, parse_config
from mlpipe.runtime.failures import FailureReporter
from mlpipe.store.storage import Storage, make_client
from mlpipe_ops.localstack import StackState
from tests.conftest import REPO, unique

pytestmark = pytest.mark.integration


@dataclass
class Cloud:
    """One test's project and bucket on the emulators, with helpers to see what was published."""

    project: str
    storage: Storage
    publisher: Publisher
    subscriber: pubsub_v1.SubscriberClient
    subscriptions: dict[str, str] = field(default_factory=dict)

    def reporter(self, stage: str) -> FailureReporter:
        return FailureReporter(self.storage, self.publisher, stage=stage, code_version="test")

    def watch(self, *topics: str) -> None:
        """Start keeping every message published to `topics` from now on."""
        for topic in topics:
            name = self.subscriber.subscription_path(self.project, f"watch-{topic}")
            self.subscriber.create_subscription(
                request={"name": name, "topic": f"projects/{self.project}/topics/{topic}"}
            )
            self.subscriptions[topic] = name

    def pulled(
        self, topic: str, expect: int = 1, timeout: float = 15.0, settle: float = 0.5
    ) -> list[Message]:
        """Events published to `topic` since `watch`: wait for `expect` of them, then `settle`
        seconds more, so that duplicates would be counted too."""
        got: list[Message] = []
        deadline = time.monotonic() + timeout
        settled_at = 0.0
        while True:
            now = time.monotonic()
            if len(got) >= expect:
                settled_at = settled_at or now + settle
                if now >= settled_at:
                    break
            elif now >= deadline:
                break
            batch = self._pull_once(topic)
            got.extend(batch)
            if not batch:
                time.sleep(0.05)
        return got

    def _pull_once(self, topic: str) -> list[Message]:
        sub = self.subscriptions[topic]
        # return_immediately: the emulator otherwise holds an empty pull for seconds.
        reply = self.subscriber.pull(
            request={"subscription": sub, "max_messages": 100, "return_immediately": True},
            timeout=5,
        )
        out = []
        for received in reply.received_messages:
            cls = events.EVENT_TYPES[received.message.attributes[events.EVENT_TYPE_ATTR]]
            out.append(events.decode(cls, received.message.data))
        if reply.received_messages:
            self.subscriber.acknowledge(
                request={
                    "subscription": sub,
                    "ack_ids": [r.ack_id for r in reply.received_messages],
                }
            )
        return out

    def apply_config(self, config: PipelineConfig) -> None:
        self.storage.write(config_path(config.name), config.to_yaml().encode())


@pytest.fixture
def cloud(emulators: StackState) -> Iterator[Cloud]:
    project = unique("proj")
    client = make_client(project)
    bucket = client.create_bucket(unique("bucket"))
    topology.create_topics(project, topology.TOPOLOGY.topics)
    subscriber = pubsub_v1.SubscriberClient()
    yield Cloud(project, Storage(client, bucket.name), Publisher(project), subscriber)
    subscriber.close()


@pytest.fixture
def iris_config() -> PipelineConfig:
    return parse_config((REPO / "examples/iris/pipeline.yaml").read_text())


@pytest.fixture
def iris_csv() -> str:
    return (REPO / "examples/iris/iris.csv").read_text()


def notification(
    cloud: Cloud,
    path: str,
    generation: int,
    message_id: str = "n1",
    size: int | None = None,
    metadata: dict[str, str] | None = None,
) -> bytes:
    """A push body exactly as Cloud Storage's Pub/Sub notification (JSON_API_V1) sends it."""
    resource = {
        "kind": "storage#object",
        "bucket": cloud.storage.bucket_name,
        "name": path,
        "generation": str(generation),
        **({"size": str(size)} if size is not None else {}),
        "metadata": metadata or {},
    }
    return make_envelope(
        json.dumps(resource).encode(),
        attributes={
            "bucketId": cloud.storage.bucket_name,
            "objectId": path,
            "objectGeneration": str(generation),
            "eventType": "OBJECT_FINALIZE",
            "payloadFormat": "JSON_API_V1",
            "notificationConfig": "projects/_/x",
        },
        message_id=message_id,
    )


@pytest.fixture
def services(
    cloud: Cloud, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, TestClient]]:
    monkeypatch.setenv("MLPIPE_PROJECT", cloud.project)
    monkeypatch.setenv("MLPIPE_BUCKET", cloud.storage.bucket_name)
    monkeypatch.setenv("MLPIPE_JOB_LOG_DIR", str(tmp_path_factory.mktemp("jobs")))
    from mlpipe_deployer.main import app as deployer
    from mlpipe_evaluator.main import app as evaluator
    from mlpipe_predictor.main import app as predictor
    from mlpipe_trainer.main import app as trainer

    cloud.watch(
        events.TRAINING_STARTED,
        events.TRAINING_COMPLETED,
        events.EVALUATION_COMPLETED,
        events.DEPLOYMENT_COMPLETED,
        events.PIPELINE_FAILURES,
    )
    with (
        TestClient(trainer) as t,
        TestClient(evaluator) as e,
        TestClient(deployer) as d,
        TestClient(predictor) as p,
    ):
        yield {"trainer": t, "evaluator": e, "deployer": d, "predictor": p}


def upload(cloud: Cloud, csv_text: str, name: str = "iris") -> tuple[str, int]:
    """A user's direct upload: no ingest, no sha256 metadata."""
    path = f"datasets/{name}/dt=2026-11-23/upload-1.csv"
    return path, cloud.storage.write(path, csv_text.encode(), content_type="text/csv")


def forward(client: TestClient, event: Message, n: int = 1) -> dict:
    reply = client.post(
        "/pubsub/push", content=make_envelope(events.encode(event), message_id=f"fwd-{n}")
    )
    assert reply.status_code == 200, reply.text
    return reply.json()


def job_started(reply: Any) -> bool:
    """The trainer started a job, and acknowledged the notification (its lease and the
    reconciler see the run through)."""
    body = reply.json()
    return reply.status_code == 200 and body.get("status") == "training" and bool(body["job_id"])
