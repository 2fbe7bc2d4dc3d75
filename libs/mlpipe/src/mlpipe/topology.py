"""The one declarative topology: topics, push subscriptions, dead letters, the bucket notice.

`apply()` makes a Pub/Sub server (the emulator or a real project) match it, idempotently;
`plan()` says what would change. The bucket notification is applied by `notification_spec`'s
user: GCS's notification API on a project, fake-gcs-server's start-up flags locally.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1
from google.protobuf import duration_pb2

from mlpipe import events

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PushSubscription:
    name: str
    topic: str
    service: str  # the service whose /pubsub/push receives it
    ack_deadline_seconds: int = 60
    max_delivery_attempts: int = 10
    min_backoff_seconds: int = 1
    max_backoff_seconds: int = 60


@dataclass(frozen=True)
class PullSubscription:
    """Keeps a topic's messages for people and tools (failures, dead letters)."""

    name: str
    topic: str
    retention_days: int = 7


@dataclass(frozen=True)
class BucketNotification:
    topic: str
    object_prefix: str
    event_types: tuple[str, ...] = ("OBJECT_FINALIZE",)


@dataclass(frozen=True)
class Topology:
    topics: tuple[str, ...]
    push: tuple[PushSubscription, ...]
    pull: tuple[PullSubscription, ...]
    notification: BucketNotification
    dead_letter_topic: str = events.DEAD_LETTERS
    services: tuple[str, ...] = field(default=())


TOPOLOGY = Topology(
    topics=(
        events.INGEST_REQUESTS,
        events.GCS_OBJECTS,
        events.DATASETS_LANDED,
        events.TRAINING_STARTED,
        events.TRAINING_COMPLETED,
        events.EVALUATION_COMPLETED,
        events.DEPLOYMENT_COMPLETED,
        events.PIPELINE_FAILURES,
        events.DEAD_LETTERS,
    ),
    push=(
        PushSubscription("ingest-push", events.INGEST_REQUESTS, "ingest"),
        PushSubscription("trainer-push", events.GCS_OBJECTS, "trainer"),
        PushSubscription("evaluator-push", events.TRAINING_COMPLETED, "evaluator", 300),
        PushSubscription("deployer-push", events.EVALUATION_COMPLETED, "deployer", 120),
        PushSubscription("predictor-push", events.DEPLOYMENT_COMPLETED, "predictor", 120),
    ),
    pull=(
        PullSubscription("pipeline-failures-archive", events.PIPELINE_FAILURES),
        PullSubscription("dead-letters-archive", events.DEAD_LETTERS),
    ),
    notification=BucketNotification(events.GCS_OBJECTS, "datasets/"),
    services=("ingest", "trainer", "evaluator", "deployer", "predictor"),
)


@dataclass
class Change:
    action: str  # "create" or "update"
    kind: str
    name: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.action} {self.kind} {self.name}{': ' + self.detail if self.detail else ''}"


def _push_request(
    project: str, sub: PushSubscription, endpoint: str, dead_letter_topic: str
) -> dict:
    return {
        "name": f"projects/{project}/subscriptions/{sub.name}",
        "topic": f"projects/{project}/topics/{sub.topic}",
        "push_config": {"push_endpoint": endpoint},
        "ack_deadline_seconds": sub.ack_deadline_seconds,
        "dead_letter_policy": {
            "dead_letter_topic": f"projects/{project}/topics/{dead_letter_topic}",
            "max_delivery_attempts": sub.max_delivery_attempts,
        },
        "retry_policy": {
            "minimum_backoff": duration_pb2.Duration(seconds=sub.min_backoff_seconds),
            "maximum_backoff": duration_pb2.Duration(seconds=sub.max_backoff_seconds),
        },
    }


def create_topics(
    project: str,
    topics: tuple[str, ...],
    publisher: pubsub_v1.PublisherClient | None = None,
    dry_run: bool = False,
) -> list[Change]:
    publisher = publisher or pubsub_v1.PublisherClient()
    changes = []
    for topic in topics:
        path = publisher.topic_path(project, topic)
        try:
            publisher.get_topic(request={"topic": path})
        except gexc.NotFound:
            changes.append(Change("create", "topic", topic))
            if not dry_run:
                with contextlib.suppress(gexc.AlreadyExists):
                    publisher.create_topic(request={"name": path})
    return changes


def apply(
    project: str,
    endpoints: Mapping[str, str],
    topology: Topology = TOPOLOGY,
    publisher: pubsub_v1.PublisherClient | None = None,
    subscriber: pubsub_v1.SubscriberClient | None = None,
    dry_run: bool = False,
) -> list[Change]:
    """Create what is missing and correct push endpoints; return the changes (made or planned).

    `endpoints` maps a service name to the URL of its push route.
    """
    publisher = publisher or pubsub_v1.PublisherClient()
    subscriber = subscriber or pubsub_v1.SubscriberClient()
    changes: list[Change] = []
    for topic in topology.topics:
        path = publisher.topic_path(project, topic)
        try:
            publisher.get_topic(request={"topic": path})
        except gexc.NotFound:
            changes.append(Change("create", "topic", topic))
            if not dry_run:
                with contextlib.suppress(gexc.AlreadyExists):
                    publisher.create_topic(request={"name": path})
    for sub in topology.push:
        endpoint = endpoints[sub.service]
        request = _push_request(project, sub, endpoint, topology.dead_letter_topic)
        try:
            existing = subscriber.get_subscription(request={"subscription": request["name"]})
        except gexc.NotFound:
            changes.append(Change("create", "push subscription", sub.name, f"→ {endpoint}"))
            if not dry_run:
                with contextlib.suppress(gexc.AlreadyExists):
                    subscriber.create_subscription(request=request)
            continue
        if existing.push_config.push_endpoint != endpoint:
            changes.append(Change("update", "push endpoint", sub.name, f"→ {endpoint}"))
            if not dry_run:
                subscriber.modify_push_config(
                    request={
                        "subscription": request["name"],
                        "push_config": {"push_endpoint": endpoint},
                    }
                )
    for pull in topology.pull:
        name = subscriber.subscription_path(project, pull.name)
        try:
            subscriber.get_subscription(request={"subscription": name})
        except gexc.NotFound:
            changes.append(Change("create", "pull subscription", pull.name))
            if not dry_run:
                with contextlib.suppress(gexc.AlreadyExists):
                    subscriber.create_subscription(
                        request={
                            "name": name,
                            "topic": publisher.topic_path(project, pull.topic),
                            "ack_deadline_seconds": 60,
                        }
                    )
    for change in changes:
        log.info("%s%s", "would " if dry_run else "", change)
    return changes
