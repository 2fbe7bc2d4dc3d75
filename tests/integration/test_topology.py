"""The topology applied to the Pub/Sub emulator: complete, and idempotent."""

from __future__ import annotations

import pytest
from google.cloud import pubsub_v1

from mlpipe import topology
from tests.integration.conftest import Cloud

pytestmark = pytest.mark.integration


def endpoints(port: int) -> dict[str, str]:
    return {s: f"http://127.0.0.1:{port}/{s}/pubsub/push" for s in topology.TOPOLOGY.services}


def test_apply_creates_everything_then_nothing(cloud: Cloud) -> None:
    project = cloud.project + "-t"

    first = topology.apply(project, endpoints(9))
    second = topology.apply(project, endpoints(9))

    kinds = [(c.action, c.kind) for c in first]
    assert kinds.count(("create", "topic")) == len(topology.TOPOLOGY.topics)
    assert kinds.count(("create", "push subscription")) == len(topology.TOPOLOGY.push)
    assert second == []
    subscriber = pubsub_v1.SubscriberClient()
    sub = subscriber.get_subscription(
        request={"subscription": subscriber.subscription_path(project, "trainer-push")}
    )
    assert sub.push_config.push_endpoint == endpoints(9)["trainer"]
    assert sub.dead_letter_policy.dead_letter_topic.endswith("/topics/dead-letters")
    assert sub.dead_letter_policy.max_delivery_attempts == 10


def test_plan_reports_a_moved_endpoint_without_changing_it(cloud: Cloud) -> None:
    project = cloud.project + "-m"
    topology.apply(project, endpoints(9))

    planned = topology.apply(project, endpoints(10), dry_run=True)
    applied = topology.apply(project, endpoints(10))

    assert {str(c) for c in planned} == {str(c) for c in applied}
    assert all(c.action == "update" for c in applied)
    assert len(applied) == len(topology.TOPOLOGY.push)
    assert topology.apply(project, endpoints(10)) == []
