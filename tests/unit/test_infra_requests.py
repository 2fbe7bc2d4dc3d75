"""The exact requests `mlpipe infra apply` builds: push subscriptions (OIDC on GCP), Cloud
Scheduler jobs, the GCS notification, IAM policy bindings."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import scheduler_v1, storage
from google.iam.v1 import iam_policy_pb2, policy_pb2
from google.protobuf import field_mask_pb2
from google.pubsub_v1.types import (
    DeadLetterPolicy,
    PushConfig,
    RetryPolicy,
    Subscription,
    UpdateSubscriptionRequest,
)
from google.type import expr_pb2

from mlpipe.messaging import events
from mlpipe.messaging.topology import TOPOLOGY
from mlpipe.v1 import events_pb2
from mlpipe_ops import infra

REPO = Path(__file__).resolve().parents[2]
ENVIRONMENTS = REPO / "infra" / "environments"
PROJECT = "acme-ml-dev"
NUMBER = 123456789012


@pytest.fixture
def dev() -> infra.Target:
    env = infra.load_environment("dev", ENVIRONMENTS)
    return infra.resolve(env, "dev", project=PROJECT, project_number=NUMBER)


@pytest.fixture
def local() -> infra.Target:
    env = infra.load_environment("local", ENVIRONMENTS)
    ports = {s: 18682 + i for i, s in enumerate(TOPOLOGY.services)}
    return infra.resolve(env, "local", project="mlpipe-local", bucket="mlpipe-local", ports=ports)


def route(target: infra.Target, name: str) -> infra.PushRoute:
    return next(r for r in target.routes if r.subscription.name == name)


def test_a_push_subscription_on_gcp_signs_with_its_own_account_for_its_service(
    dev: infra.Target,
) -> None:
    request = infra.push_subscription(dev, route(dev, "evaluator-push"))

    url = f"https://mlpipe-evaluator-{NUMBER}.us-central1.run.app"
    assert request == Subscription(
        name=f"projects/{PROJECT}/subscriptions/evaluator-push",
        topic=f"projects/{PROJECT}/topics/training-completed",
        push_config=PushConfig(
            push_endpoint=f"{url}/pubsub/push",
            oidc_token=PushConfig.OidcToken(
                service_account_email=f"mlpipe-push-evaluator@{PROJECT}.iam.gserviceaccount.com",
                audience=url,
            ),
        ),
        ack_deadline_seconds=300,
        dead_letter_policy=DeadLetterPolicy(
            dead_letter_topic=f"projects/{PROJECT}/topics/dead-letters", max_delivery_attempts=10
        ),
        retry_policy=RetryPolicy(
            minimum_backoff=timedelta(seconds=1), maximum_backoff=timedelta(seconds=60)
        ),
    )


def test_a_push_subscription_on_the_emulator_has_no_oidc_and_no_retry_policy(
    local: infra.Target,
) -> None:
    request = infra.push_subscription(local, route(local, "evaluator-push"))

    assert request.push_config == PushConfig(push_endpoint="http://127.0.0.1:18684/pubsub/push")
    # The emulator redelivers about once a second without one (its retry policy can stall).
    assert "retry_policy" not in request
    assert request.dead_letter_policy.max_delivery_attempts == 100


def test_the_held_training_notification_gets_many_attempts_and_a_long_backoff(
    dev: infra.Target,
) -> None:
    request = infra.push_subscription(dev, route(dev, "trainer-push"))

    assert request.dead_letter_policy.max_delivery_attempts == 100
    assert request.retry_policy == RetryPolicy(
        minimum_backoff=timedelta(seconds=2), maximum_backoff=timedelta(seconds=300)
    )


def test_a_pull_subscription_keeps_messages_seven_days(dev: infra.Target) -> None:
    request = infra.pull_subscription(dev, TOPOLOGY.pull[1])

    assert request == Subscription(
        name=f"projects/{PROJECT}/subscriptions/dead-letters-archive",
        topic=f"projects/{PROJECT}/topics/dead-letters",
        ack_deadline_seconds=60,
        message_retention_duration=timedelta(days=7),
    )


def test_only_managed_fields_are_compared(dev: infra.Target) -> None:
    desired = infra.push_subscription(dev, route(dev, "trainer-push"))
    # What Pub/Sub returns: our fields plus defaults we do not manage.
    existing = Subscription(desired)
    existing.push_config.attributes["x-goog-version"] = "v1"
    existing.message_retention_duration = timedelta(days=7)
    existing.state = Subscription.State.ACTIVE

    assert infra.subscription_differences(desired, existing) == []


def test_a_moved_endpoint_and_account_become_one_push_config_update(dev: infra.Target) -> None:
    desired = infra.push_subscription(dev, route(dev, "trainer-push"))
    existing = Subscription(desired)
    existing.push_config.push_endpoint = "https://old.example/pubsub/push"
    existing.push_config.oidc_token.service_account_email = "old@acme.iam.gserviceaccount.com"
    existing.ack_deadline_seconds = 10

    differences = infra.subscription_differences(desired, existing)
    request = infra.update_subscription_request(desired, differences)

    assert [d for _, d in differences] == [
        f"push endpoint https://old.example/pubsub/push → {desired.push_config.push_endpoint}",
        "OIDC service account old@acme.iam.gserviceaccount.com → "
        f"mlpipe-push-trainer@{PROJECT}.iam.gserviceaccount.com",
        "ack deadline 10 → 60",
    ]
    assert request == UpdateSubscriptionRequest(
        subscription=desired,
        update_mask=field_mask_pb2.FieldMask(paths=["ack_deadline_seconds", "push_config"]),
    )


def test_the_schedule_job_publishes_the_ingest_request_as_json(dev: infra.Target) -> None:
    schedule = next(s for s in dev.schedules if s.name == "mlpipe-iris-smoke")

    request = infra.create_job_request(dev, infra.scheduler_job(dev, schedule))

    data = (REPO / "infra/schedules/iris-smoke.json").read_text()
    expected_message = events.from_json(events_pb2.IngestRequest, data)
    assert request == scheduler_v1.CreateJobRequest(
        parent=f"projects/{PROJECT}/locations/us-central1",
        job=scheduler_v1.Job(
            name=f"projects/{PROJECT}/locations/us-central1/jobs/mlpipe-iris-smoke",
            description="mlpipe dev: publishes an IngestRequest for iris",
            schedule="0 6 * * *",
            time_zone="America/Chicago",
            pubsub_target=scheduler_v1.PubsubTarget(
                topic_name=f"projects/{PROJECT}/topics/ingest-requests",
                data=events.to_json(expected_message).encode(),
                attributes={"event_type": "mlpipe.v1.IngestRequest", "encoding": "JSON"},
            ),
        ),
    )
    # What the ingest service will decode from the pushed bytes.
    pushed = events.decode(events_pb2.IngestRequest, request.job.pubsub_target.data)
    assert pushed.dataset == "iris" and pushed.request_id == "iris-smoke"
    assert pushed.inline.csv == (REPO / "examples/iris/iris.csv").read_text()


def test_a_changed_schedule_is_one_masked_update(dev: infra.Target) -> None:
    desired = infra.scheduler_job(dev, dev.schedules[0])
    existing = scheduler_v1.Job(desired)
    existing.schedule = "0 5 * * *"
    existing.state = scheduler_v1.Job.State.ENABLED

    differences = infra.job_differences(desired, existing)

    assert [d for _, d in differences] == ["schedule 0 5 * * * → 0 6 * * *"]
    assert infra.update_job_request(desired, differences) == scheduler_v1.UpdateJobRequest(
        job=desired, update_mask=field_mask_pb2.FieldMask(paths=["schedule"])
    )


def test_the_bucket_notification(dev: infra.Target) -> None:
    client = storage.Client(project=PROJECT, credentials=AnonymousCredentials())

    notification = infra.bucket_notification(client, dev)

    assert notification.bucket.name == "acme-ml-dev-mlpipe"
    assert notification.topic_project == PROJECT
    assert notification.topic_name == "gcs-objects"
    assert notification.event_types == ["OBJECT_FINALIZE"]
    assert notification.blob_name_prefix == "datasets/"
    assert notification.payload_format == "JSON_API_V1"
    assert notification.notification_id is None  # a new one: create() refuses otherwise


def test_a_notification_with_other_settings_does_not_match(dev: infra.Target) -> None:
    client = storage.Client(project=PROJECT, credentials=AnonymousCredentials())
    desired = infra.bucket_notification(client, dev)
    bucket = client.bucket(dev.bucket)

    same = bucket.notification(
        "gcs-objects",
        PROJECT,
        None,
        ["OBJECT_FINALIZE"],
        "datasets/",
        "JSON_API_V1",
        notification_id="7",
    )
    everything = bucket.notification("gcs-objects", PROJECT, None, None, None, "JSON_API_V1")

    assert infra.notification_matches(same, desired)
    assert not infra.notification_matches(everything, desired)


def test_the_iam_bindings_grant_each_identity_the_least_it_needs(dev: infra.Target) -> None:
    bindings = {(b.resource, b.role, b.member) for b in infra.iam_bindings(dev)}

    topic = f"projects/{PROJECT}/topics/"
    sub = f"projects/{PROJECT}/subscriptions/"
    run = f"projects/{PROJECT}/locations/us-central1/services/mlpipe-"
    pubsub_agent = f"serviceAccount:service-{NUMBER}@gcp-sa-pubsub.iam.gserviceaccount.com"
    gcs_agent = f"serviceAccount:service-{NUMBER}@gs-project-accounts.iam.gserviceaccount.com"

    def sa(name: str) -> str:
        return f"serviceAccount:{name}@{PROJECT}.iam.gserviceaccount.com"

    services = ["ingest", "trainer", "evaluator", "deployer", "predictor"]
    assert bindings == {
        (topic + "dead-letters", "roles/pubsub.publisher", pubsub_agent),
        *((sub + f"{s}-push", "roles/pubsub.subscriber", pubsub_agent) for s in services),
        (sub + "trainer-landed-push", "roles/pubsub.subscriber", pubsub_agent),
        (sub + "predictor-batch-push", "roles/pubsub.subscriber", pubsub_agent),
        (sub + "deployer-trained-push", "roles/pubsub.subscriber", pubsub_agent),
        (sub + "evaluator-monitor-push", "roles/pubsub.subscriber", pubsub_agent),
        *(
            (sub + f"notifier-{kind}-push", "roles/pubsub.subscriber", pubsub_agent)
            for kind in ("failures", "evaluations", "drift", "deployments", "approvals")
        ),
        (topic + "gcs-objects", "roles/pubsub.publisher", gcs_agent),
        *((run + s, "roles/run.invoker", sa(f"mlpipe-push-{s}")) for s in services),
        # The notifier publishes nothing (it reads pipeline-failures): no topic role at all.
        (run + "notifier", "roles/run.invoker", sa("mlpipe-push-notifier")),
        (topic + "datasets-landed", "roles/pubsub.publisher", sa("mlpipe-ingest")),
        (topic + "training-started", "roles/pubsub.publisher", sa("mlpipe-trainer")),
        (topic + "training-completed", "roles/pubsub.publisher", sa("mlpipe-trainer")),
        (topic + "evaluation-completed", "roles/pubsub.publisher", sa("mlpipe-evaluator")),
        (topic + "drift-detected", "roles/pubsub.publisher", sa("mlpipe-evaluator")),
        (topic + "ingest-requests", "roles/pubsub.publisher", sa("mlpipe-evaluator")),
        (topic + "deployment-completed", "roles/pubsub.publisher", sa("mlpipe-deployer")),
        # The predictor's automatic promotion records a DeploymentCompleted.
        (topic + "deployment-completed", "roles/pubsub.publisher", sa("mlpipe-predictor")),
        # Batch jobs run as the predictor and publish their completion.
        (topic + "batch-predictions-completed", "roles/pubsub.publisher", sa("mlpipe-predictor")),
        # A new champion's scoring of the next days is a batch request the predictor publishes.
        (topic + "batch-prediction-requests", "roles/pubsub.publisher", sa("mlpipe-predictor")),
        *(
            (topic + "pipeline-failures", "roles/pubsub.publisher", sa(f"mlpipe-{s}"))
            for s in services
        ),
        # dev deploys to cloud_run: the deployer updates the predictor service, and only it.
        (run + "predictor", "roles/run.developer", sa("mlpipe-deployer")),
        # The console replays a failure to the topic its subscription reads, lists and
        # acknowledges dead letters, and asks the deployer for rollout steps.
        *(
            (topic + t, "roles/pubsub.publisher", sa("mlpipe-console"))
            for t in (
                "ingest-requests",
                "gcs-objects",
                "datasets-landed",
                "training-completed",
                "evaluation-completed",
                "monitoring-requests",
                "deployment-completed",
                "batch-prediction-requests",
                "pipeline-failures",
                "drift-detected",
            )
        ),
        (sub + "dead-letters-archive", "roles/pubsub.subscriber", sa("mlpipe-console")),
        (run + "deployer", "roles/run.invoker", sa("mlpipe-console")),
    }
    assert len(infra.iam_bindings(dev)) == len(bindings)  # no duplicates


def test_the_deployer_may_change_the_predictor_service_only_on_the_cloud_run_target() -> None:
    env = infra.load_environment("dev", ENVIRONMENTS).model_copy(update={"deploy_target": "vertex"})
    vertex = infra.resolve(env, "dev", project=PROJECT, project_number=NUMBER)

    roles = {b.role for b in infra.iam_bindings(vertex)}

    assert "roles/run.developer" not in roles
    assert vertex.serving_account == f"mlpipe-serving@{PROJECT}.iam.gserviceaccount.com"


def invoker() -> infra.IamBinding:
    return infra.IamBinding(
        f"projects/{PROJECT}/locations/us-central1/services/mlpipe-ingest",
        "roles/run.invoker",
        f"serviceAccount:mlpipe-push-ingest@{PROJECT}.iam.gserviceaccount.com",
        "test",
    )


def test_a_binding_joins_the_role_keeping_other_members_and_the_etag() -> None:
    current = policy_pb2.Policy(
        version=1,
        etag=b"BwYz",
        bindings=[
            policy_pb2.Binding(role="roles/run.invoker", members=["user:ada@acme.example"]),
            policy_pb2.Binding(role="roles/run.developer", members=["group:ml@acme.example"]),
        ],
    )

    request = infra.set_iam_policy_request(invoker(), current)

    assert request == iam_policy_pb2.SetIamPolicyRequest(
        resource=invoker().resource,
        policy=policy_pb2.Policy(
            version=1,
            etag=b"BwYz",
            bindings=[
                policy_pb2.Binding(
                    role="roles/run.invoker",
                    members=["user:ada@acme.example", invoker().member],
                ),
                policy_pb2.Binding(role="roles/run.developer", members=["group:ml@acme.example"]),
            ],
        ),
    )


def test_a_binding_already_there_is_no_request() -> None:
    current = policy_pb2.Policy(
        etag=b"BwYz",
        bindings=[policy_pb2.Binding(role="roles/run.invoker", members=[invoker().member])],
    )

    assert infra.set_iam_policy_request(invoker(), current) is None


def test_a_conditional_grant_is_not_taken_for_the_binding() -> None:
    conditional = policy_pb2.Binding(
        role="roles/run.invoker",
        members=[invoker().member],
        condition=expr_pb2.Expr(expression="request.time < timestamp('2020-01-01T00:00:00Z')"),
    )
    current = policy_pb2.Policy(version=3, etag=b"BwYz", bindings=[conditional])

    request = infra.set_iam_policy_request(invoker(), current)

    assert request is not None
    assert list(request.policy.bindings) == [
        conditional,
        policy_pb2.Binding(role="roles/run.invoker", members=[invoker().member]),
    ]


def test_a_monitoring_schedule_publishes_a_drift_check_to_its_topic(dev: infra.Target) -> None:
    schedule = infra.ScheduleSpec(
        name="bikeshare-drift",
        kind="monitoring",
        schedule="30 6 * * *",
        request={"pipeline": "bikeshare", "windowHours": 12},
    )

    job = infra.scheduler_job(dev, schedule)

    assert job.description == "mlpipe dev: publishes a drift check of bikeshare"
    assert job.pubsub_target.topic_name == f"projects/{PROJECT}/topics/monitoring-requests"
    assert job.pubsub_target.attributes["event_type"] == "mlpipe.v1.MonitoringRequest"
    pushed = events.decode(events_pb2.MonitoringRequest, job.pubsub_target.data)
    assert pushed.pipeline == "bikeshare" and pushed.window_hours == 12


def test_a_monitoring_schedule_needs_its_pipeline() -> None:
    with pytest.raises(ValueError, match=r"request\.pipeline is required"):
        infra.ScheduleSpec(name="x", kind="monitoring", schedule="0 * * * *", request={})
    with pytest.raises(ValueError, match=r"not a valid mlpipe\.v1\.MonitoringRequest"):
        infra.ScheduleSpec(
            name="x", kind="monitoring", schedule="0 * * * *", request={"dataset": "iris"}
        )
