"""The topology applied to the Pub/Sub emulator through `mlpipe_ops.infra` (the path `mlpipe up`
and `mlpipe infra apply --env local` take): complete, idempotent, and a plan that names exactly
what drifted."""

from __future__ import annotations

import base64
import http.server
import json
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from google.cloud import pubsub_v1

from mlpipe.messaging import events, topology
from mlpipe.messaging.topology import TOPOLOGY
from mlpipe_ops import cli_failures, infra
from tests.conftest import REPO, free_base_port, wait_until
from tests.integration.conftest import Cloud

pytestmark = pytest.mark.integration

ENVIRONMENTS = REPO / "infra" / "environments"


def local(project: str, base_port: int = 9000, **services: str) -> infra.Target:
    """The local environment for `project`, its services on consecutive ports from
    `base_port`, or at `services[name]`."""
    env = infra.load_environment("local", ENVIRONMENTS)
    if services:
        env = env.model_copy(
            update={"services": {s: infra.ServiceSettings(url=u) for s, u in services.items()}}
        )
    ports = {s: base_port + i for i, s in enumerate(TOPOLOGY.services)}
    return infra.resolve(env, "local", project=project, bucket=project, ports=ports)


def test_apply_creates_everything_then_nothing(cloud: Cloud) -> None:
    target = local(cloud.project + "-t")

    first = infra.apply(target)
    second = infra.apply(target)

    kinds = [(c.action, c.kind) for c in first.changes]
    assert kinds.count(("create", "topic")) == len(TOPOLOGY.topics)
    assert kinds.count(("create", "push subscription")) == len(TOPOLOGY.push)
    assert kinds.count(("create", "pull subscription")) == len(TOPOLOGY.pull)
    assert len(first.changes) == len(first.pending)
    assert second.changes == [] and second.summary() == "no changes: it matches the topology"
    subscriber = pubsub_v1.SubscriberClient()
    sub = subscriber.get_subscription(
        request={"subscription": target.subscription_path("evaluator-push")}
    )
    assert sub.push_config.push_endpoint == "http://127.0.0.1:9002/pubsub/push"
    assert not sub.push_config.oidc_token.service_account_email
    assert sub.ack_deadline_seconds == 300
    assert sub.dead_letter_policy.dead_letter_topic == target.topic_path("dead-letters")
    # The emulator redelivers a refused push after about a second: no retry policy (see
    # infra.EMULATOR_MAX_DELIVERY_ATTEMPTS), so the most attempts Pub/Sub allows.
    assert sub.dead_letter_policy.max_delivery_attempts == 100
    assert "retry_policy" not in sub
    archive = subscriber.get_subscription(
        request={"subscription": target.subscription_path("dead-letters-archive")}
    )
    assert archive.message_retention_duration == timedelta(days=7)


def test_plan_shows_exactly_the_moved_endpoint_and_apply_fixes_only_it(cloud: Cloud) -> None:
    project = cloud.project + "-m"
    infra.apply(local(project))
    moved = local(project, evaluator="http://127.0.0.1:9999")

    planned = infra.plan(moved)
    subscriber = pubsub_v1.SubscriberClient()
    path = moved.subscription_path("evaluator-push")
    unchanged = subscriber.get_subscription(request={"subscription": path})
    applied = infra.apply(moved)

    # Both of the evaluator's subscriptions follow it; nothing else changes.
    assert [str(c) for c in planned.changes] == [
        f"update push subscription {name}: push endpoint "
        "http://127.0.0.1:9002/pubsub/push → http://127.0.0.1:9999/pubsub/push"
        for name in ("evaluator-push", "evaluator-monitor-push")
    ]
    assert unchanged.push_config.push_endpoint == "http://127.0.0.1:9002/pubsub/push"
    assert [str(c) for c in applied.changes] == [str(c) for c in planned.changes]
    now = subscriber.get_subscription(request={"subscription": path})
    assert now.push_config.push_endpoint == "http://127.0.0.1:9999/pubsub/push"
    assert now.dead_letter_policy.max_delivery_attempts == 100  # the rest kept
    assert infra.plan(moved).changes == []


def applied_then_changed(
    target: infra.Target, name: str, **fields: object
) -> tuple[pubsub_v1.SubscriberClient, str]:
    """Apply the topology, then change `fields` of subscription `name` behind its back."""
    infra.apply(target)
    subscriber = pubsub_v1.SubscriberClient()
    path = target.subscription_path(name)
    subscriber.update_subscription(
        request={"subscription": {"name": path, **fields}, "update_mask": {"paths": list(fields)}}
    )
    return subscriber, path


def test_a_drifted_setting_is_put_back(cloud: Cloud) -> None:
    target = local(cloud.project + "-d")
    subscriber, path = applied_then_changed(target, "deployer-push", ack_deadline_seconds=15)

    applied = infra.apply(target)

    assert [str(c) for c in applied.changes] == [
        "update push subscription deployer-push: ack deadline 15 → 120"
    ]
    sub = subscriber.get_subscription(request={"subscription": path})
    assert sub.ack_deadline_seconds == 120


def test_a_retry_policy_on_the_emulator_is_drift_and_is_removed(cloud: Cloud) -> None:
    target = local(cloud.project + "-r")
    subscriber, path = applied_then_changed(
        target, "trainer-push", retry_policy={"minimum_backoff": "2s", "maximum_backoff": "300s"}
    )

    planned = infra.plan(target)
    infra.apply(target)

    assert [str(c) for c in planned.changes] == [
        "update push subscription trainer-push: minimum backoff 2s → (none); "
        "maximum backoff 300s → (none)"
    ]
    assert "retry_policy" not in subscriber.get_subscription(request={"subscription": path})
    assert infra.plan(target).changes == []


def test_create_topics_makes_only_the_missing_topics(cloud: Cloud) -> None:
    project = cloud.project + "-c"

    first = topology.create_topics(project, ("gcs-objects", "dead-letters"))
    second = topology.create_topics(project, ("gcs-objects", "ingest-requests"))

    assert first == ["gcs-objects", "dead-letters"]
    assert second == ["ingest-requests"]


class Endpoint:
    """A push endpoint on 127.0.0.1 that refuses connections until started (a service being
    restarted), then accepts every delivery, keeping what it was sent."""

    def __init__(self) -> None:
        self.port = free_base_port(1)
        self.accepted: set[str] = set()
        self.server: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        accepted = self.accepted

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                accepted.add(base64.b64decode(json.loads(body)["message"]["data"]).decode())
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    server = Endpoint()
    yield server
    server.stop()


def test_messages_refused_together_are_all_pushed_again(cloud: Cloud, endpoint: Endpoint) -> None:
    """Deliveries of one subscription refused together while its service restarts are all
    redelivered once it is back: the local topology avoids the emulator's retry-policy stall
    (infra.EMULATOR_MAX_DELIVERY_ATTEMPTS)."""
    target = local(cloud.project + "-p", evaluator=endpoint.url)
    infra.apply(target)
    publisher = pubsub_v1.PublisherClient()
    topic = target.topic_path(events.MONITORING_REQUESTS)
    sent = {f"message-{i}" for i in range(5)}
    for data in sorted(sent):
        publisher.publish(topic, data.encode()).result()

    time.sleep(8)  # the service is down, as for a restart: every push is refused
    endpoint.start()
    wait_until(lambda: endpoint.accepted >= sent, 60, f"all of {sorted(sent)} pushed again")
    pubsub_v1.SubscriberClient().delete_subscription(
        request={"subscription": target.subscription_path(topology.MONITOR_PUSH)}
    )


def test_the_emulator_dead_letters_what_is_refused_and_failures_replays_it(
    cloud: Cloud, endpoint: Endpoint
) -> None:
    """A message refused until the subscription's attempts run out lands in the dead-letter
    archive as Pub/Sub records it; `mlpipe failures` lists it and replays it to its topic."""
    target = local(cloud.project + "-l", evaluator=endpoint.url)
    policy = {"dead_letter_topic": target.topic_path("dead-letters"), "max_delivery_attempts": 5}
    subscriber, path = applied_then_changed(
        target, topology.MONITOR_PUSH, dead_letter_policy=policy
    )
    publisher = pubsub_v1.PublisherClient()
    sent = publisher.publish(
        target.topic_path(events.MONITORING_REQUESTS), b"check-1", event_type="test"
    ).result()

    letters = wait_until(
        lambda: cli_failures.dead_letters(target.project), 60, "the refused message dead-lettered"
    )
    letter = letters[0]
    endpoint.start()
    replayed = cli_failures.replay_dead_letter(target.project, letter.id)
    wait_until(lambda: "check-1" in endpoint.accepted, 30, "the replayed message pushed")
    left = cli_failures.dead_letters(target.project)
    subscriber.delete_subscription(request={"subscription": path})

    assert len(letters) == 1
    assert letter.source.rsplit("/", 1)[-1] == topology.MONITOR_PUSH
    assert letter.detail == "5 delivery attempt(s); event test" and letter.size == len(b"check-1")
    assert replayed.startswith(f"{events.MONITORING_REQUESTS} message ") and sent not in replayed
    assert left == []
