"""The one declarative topology: topics, push subscriptions, dead letters, the bucket notice,
and which service publishes where.

It names what exists in every environment; `mlpipe_ops.infra` applies it, with the per-environment
settings of `infra/environments/<env>.yaml` (project, service URLs, push service accounts,
schedules), to the emulators and to a real project by the same code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1

from mlpipe.messaging import events
from mlpipe.store import layout

# Every service receives its push deliveries on this route.
PUSH_PATH = "/pubsub/push"
# The predictor's subscription for batch-prediction requests.
BATCH_PUSH = "predictor-batch-push"
# The evaluator's subscription for drift-check requests.
MONITOR_PUSH = "evaluator-monitor-push"
# Keeps every approval request and decision (docs/promotion.md).
APPROVALS_ARCHIVE = "approvals-archive"


@dataclass(frozen=True)
class PushSubscription:
    name: str
    topic: str
    service: str  # the service whose PUSH_PATH receives it
    ack_deadline_seconds: int = 60
    max_delivery_attempts: int = 10
    min_backoff_seconds: int = 1
    max_backoff_seconds: int = 60

    @property
    def event(self) -> str:
        """The event type it delivers (a message type's full name): its topic's; "" for a
        topic of several types, whose messages say theirs (`event_type`)."""
        return events.EVENT_FOR_TOPIC.get(self.topic, "")


@dataclass(frozen=True)
class PullSubscription:
    """Keeps a topic's messages for people and tools (failures, dead letters)."""

    name: str
    topic: str
    retention_days: int = 7
    ack_deadline_seconds: int = 60


@dataclass(frozen=True)
class BucketNotification:
    topic: str
    object_prefix: str
    event_types: tuple[str, ...] = ("OBJECT_FINALIZE",)
    payload_format: str = "JSON_API_V1"


@dataclass(frozen=True)
class Topology:
    topics: tuple[str, ...]
    push: tuple[PushSubscription, ...]
    pull: tuple[PullSubscription, ...]
    notification: BucketNotification
    dead_letter_topic: str = events.DEAD_LETTERS
    services: tuple[str, ...] = field(default=())
    # Services that serve people, not events: deployed like the others (Cloud Run, runtime.yaml,
    # a trigger), but no subscription pushes to them and the local stack does not start them.
    viewers: tuple[str, ...] = field(default=())
    # service → the topics it publishes to (its runtime identity needs publish rights there).
    publishes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Where scheduled IngestRequests are published.
    schedule_topic: str = events.INGEST_REQUESTS

    def push_subscription(self, name: str) -> PushSubscription:
        return next(s for s in self.push if s.name == name)

    @property
    def deployed(self) -> tuple[str, ...]:
        """Every service that runs on Cloud Run: the pipeline's, then the viewers."""
        return (*self.services, *self.viewers)


# A notice whose channel does not answer is retried with a growing backoff for about an hour and
# a half (10 s doubling to 600 s, 15 attempts), then dead-lettered like any other message.
NOTICE_RETRIES: dict[str, int] = {
    "max_delivery_attempts": 15,
    "min_backoff_seconds": 10,
    "max_backoff_seconds": 600,
}

TRAINING_HOLD: dict[str, int] = {
    "max_delivery_attempts": 100,
    "min_backoff_seconds": 2,
    "max_backoff_seconds": 300,
}

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
        events.BATCH_PREDICTION_REQUESTS,
        events.MONITORING_REQUESTS,
        events.DRIFT_DETECTED,
        events.BATCH_PREDICTIONS_COMPLETED,
        events.APPROVALS,
    ),
    push=(
        PushSubscription("ingest-push", events.INGEST_REQUESTS, "ingest"),
        # The delivery that starts a training job is acknowledged once the run is recorded
        # (mlpipe_trainer.start); a job lost later is started again by the trainer's
        # reconciler. Retries are for failures before that (memory busy, GCS down).
        PushSubscription("trainer-push", events.GCS_OBJECTS, "trainer", **TRAINING_HOLD),
        # Identical bytes land once; re-ingesting them under a changed config starts its run.
        PushSubscription("trainer-landed-push", events.DATASETS_LANDED, "trainer", **TRAINING_HOLD),
        PushSubscription("evaluator-push", events.TRAINING_COMPLETED, "evaluator", 300),
        PushSubscription("deployer-push", events.EVALUATION_COMPLETED, "deployer", 120),
        # Drift checks run in the evaluator, which scores champions already.
        PushSubscription(MONITOR_PUSH, events.MONITORING_REQUESTS, "evaluator", 300),
        # The deployer compiles the model for serving while the evaluator scores it.
        PushSubscription("deployer-trained-push", events.TRAINING_COMPLETED, "deployer"),
        PushSubscription("predictor-push", events.DEPLOYMENT_COMPLETED, "predictor", 120),
        # A batch job is acknowledged only once its metrics exist: until then each delivery
        # answers 503, so a job lost with its instance is started again by the redelivery.
        PushSubscription(
            BATCH_PUSH,
            events.BATCH_PREDICTION_REQUESTS,
            "predictor",
            ack_deadline_seconds=60,
            max_delivery_attempts=100,
            min_backoff_seconds=10,
            max_backoff_seconds=600,
        ),
        # The notifier: one subscription per kind of event, so a slow or dead webhook holds up
        # only its own notices, never a step of the pipeline (which reads its own subscriptions).
        PushSubscription(
            "notifier-failures-push", events.PIPELINE_FAILURES, "notifier", **NOTICE_RETRIES
        ),
        PushSubscription(
            "notifier-evaluations-push", events.EVALUATION_COMPLETED, "notifier", **NOTICE_RETRIES
        ),
        PushSubscription(
            "notifier-drift-push", events.DRIFT_DETECTED, "notifier", **NOTICE_RETRIES
        ),
        PushSubscription(
            "notifier-deployments-push", events.DEPLOYMENT_COMPLETED, "notifier", **NOTICE_RETRIES
        ),
        # Approval requests and decisions (one topic, two event types).
        PushSubscription("notifier-approvals-push", events.APPROVALS, "notifier", **NOTICE_RETRIES),
    ),
    pull=(
        PullSubscription("pipeline-failures-archive", events.PIPELINE_FAILURES),
        PullSubscription("dead-letters-archive", events.DEAD_LETTERS),
        PullSubscription("drift-detected-archive", events.DRIFT_DETECTED),
        PullSubscription("batch-predictions-completed-archive", events.BATCH_PREDICTIONS_COMPLETED),
        # Approval requests and decisions (`mlpipe promote`, `approve`, `reject`: published by
        # the operator's CLI, not by a service). The notifier pushes from it too.
        PullSubscription(APPROVALS_ARCHIVE, events.APPROVALS),
    ),
    notification=BucketNotification(events.GCS_OBJECTS, layout.DATASETS),
    services=("ingest", "trainer", "evaluator", "deployer", "predictor", "notifier"),
    viewers=("console",),
    publishes={
        "ingest": (events.DATASETS_LANDED, events.PIPELINE_FAILURES),
        # The training job runs as the trainer and publishes TrainingCompleted itself.
        "trainer": (events.TRAINING_STARTED, events.TRAINING_COMPLETED, events.PIPELINE_FAILURES),
        # A drift check publishes DriftDetected and, when allowed, a retraining request.
        "evaluator": (
            events.EVALUATION_COMPLETED,
            events.PIPELINE_FAILURES,
            events.DRIFT_DETECTED,
            events.INGEST_REQUESTS,
        ),
        "deployer": (events.DEPLOYMENT_COMPLETED, events.PIPELINE_FAILURES),
        # A canary that earned its promotion is promoted by the predictor, which records it
        # as a DeploymentCompleted (mlpipe_predictor.models.promote_canary).
        # Batch jobs (mlpipe_batch) run as the predictor's identity and publish their
        # BatchPredictionCompleted after their metrics; the predictor publishes it again when
        # a redelivered request finds the metrics. A new champion whose pipeline has
        # `scoring:` requests its batch (mlpipe_predictor.champion_scoring).
        "predictor": (
            events.DEPLOYMENT_COMPLETED,
            events.PIPELINE_FAILURES,
            events.BATCH_PREDICTIONS_COMPLETED,
            events.BATCH_PREDICTION_REQUESTS,
        ),
        # Nothing, PipelineFailed above all: the notifier reads pipeline-failures, so a failure
        # it published would come back to it (mlpipe.runtime.failures keeps its own).
        "notifier": (),
        # Replaying a failure publishes it again to the topic its subscription reads.
        "console": (
            events.INGEST_REQUESTS,
            events.GCS_OBJECTS,
            events.DATASETS_LANDED,
            events.TRAINING_COMPLETED,
            events.EVALUATION_COMPLETED,
            events.MONITORING_REQUESTS,
            events.DEPLOYMENT_COMPLETED,
            events.BATCH_PREDICTION_REQUESTS,
            # The notifier's own subscriptions read these two.
            events.PIPELINE_FAILURES,
            events.DRIFT_DETECTED,
        ),
    },
)


def event_of(subscription: str) -> str:
    """The event type a push subscription of TOPOLOGY delivers; "" for any other name."""
    found = next((s for s in TOPOLOGY.push if s.name == subscription), None)
    return found.event if found is not None else ""


def create_topics(
    project: str,
    topics: tuple[str, ...],
    publisher: pubsub_v1.PublisherClient | None = None,
) -> list[str]:
    """Create the topics that are missing (and only topics); return the ones created.

    For callers that need topics before anything else exists: fake-gcs-server needs its
    notification topic at start-up, and tests publish to per-test projects.
    """
    publisher = publisher or pubsub_v1.PublisherClient()
    created = []
    for topic in topics:
        path = publisher.topic_path(project, topic)
        try:
            publisher.get_topic(request={"topic": path})
        except gexc.NotFound:
            with contextlib.suppress(gexc.AlreadyExists):
                publisher.create_topic(request={"name": path})
            created.append(topic)
    return created
