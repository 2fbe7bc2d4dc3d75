"""Per-test GCP-like environment on the emulators: a fresh project id and bucket each time."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from google.cloud import pubsub_v1
from google.protobuf.message import Message

from mlpipe import events, topology
from mlpipe.config import PipelineConfig, config_path, parse_config
from mlpipe.failures import FailureReporter
from mlpipe.localstack import StackState
from mlpipe.publishing import Publisher
from mlpipe.storage import Storage, make_client
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
