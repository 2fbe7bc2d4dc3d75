"""`mlpipe infra` on the emulators: a GCP environment's push subscriptions (OIDC) round-trip
through the real Pub/Sub API, and the CLI plans and applies the local environment."""

from __future__ import annotations

import pytest
from google.cloud import pubsub_v1
from typer.testing import CliRunner

from mlpipe.messaging.topology import TOPOLOGY
from mlpipe_ops import infra
from mlpipe_ops.cli import app
from mlpipe_ops.localstack import StackState
from tests.conftest import REPO, unique
from tests.integration.conftest import Cloud

pytestmark = pytest.mark.integration

ENVIRONMENTS = REPO / "infra" / "environments"
NUMBER = 123456789012


def dev(project: str, **push_accounts: str) -> infra.Target:
    env = infra.load_environment("dev", ENVIRONMENTS)
    if push_accounts:
        subscriptions = {
            **env.subscriptions,
            **{
                n: infra.SubscriptionSettings(push_service_account=a)
                for n, a in push_accounts.items()
            },
        }
        env = env.model_copy(update={"subscriptions": subscriptions})
    return infra.resolve(env, "dev", project=project, project_number=NUMBER)


def pubsub_apply(target: infra.Target) -> list[infra.Change]:
    """The Pub/Sub part of a GCP plan, run on the emulator (IAM, the notification and
    Cloud Scheduler are GCP-only: tests/unit/test_infra_gcp.py)."""
    clients = infra.Clients(target.project)
    changes = infra.topic_changes(target, clients) + infra.subscription_changes(target, clients)
    for change in changes:
        assert change.run is not None
        change.run()
    return changes


def test_gcp_push_subscriptions_carry_oidc_and_apply_once(cloud: Cloud) -> None:
    target = dev(cloud.project + "-o")

    first = pubsub_apply(target)
    second = pubsub_apply(target)

    topology = target.topology
    assert len(first) == len(topology.topics) + len(topology.push) + len(topology.pull)
    assert second == []
    sub = pubsub_v1.SubscriberClient().get_subscription(
        request={"subscription": target.subscription_path("ingest-push")}
    )
    url = f"https://mlpipe-ingest-{NUMBER}.us-central1.run.app"
    assert sub.push_config.push_endpoint == f"{url}/pubsub/push"
    assert sub.push_config.oidc_token.service_account_email == (
        f"mlpipe-push-ingest@{target.project}.iam.gserviceaccount.com"
    )
    assert sub.push_config.oidc_token.audience == url


def test_a_new_push_identity_is_exactly_one_update(cloud: Cloud) -> None:
    project = cloud.project + "-i"
    pubsub_apply(dev(project))
    rotated = dev(project, **{"trainer-push": "mlpipe-push-trainer-2@acme.iam.gserviceaccount.com"})

    changes = pubsub_apply(rotated)

    assert [str(c) for c in changes] == [
        "update push subscription trainer-push: OIDC service account "
        f"mlpipe-push-trainer@{project}.iam.gserviceaccount.com → "
        "mlpipe-push-trainer-2@acme.iam.gserviceaccount.com"
    ]
    assert pubsub_apply(rotated) == []


def test_cli_plans_applies_then_finds_nothing_to_do(emulators: StackState) -> None:
    runner = CliRunner()
    args = ["--env", "local", "--state-dir", emulators.state_dir, "--project", unique("cli")]

    planned = runner.invoke(app, ["infra", "plan", *args, "--detailed-exitcode"])
    applied = runner.invoke(app, ["infra", "apply", *args])
    again = runner.invoke(app, ["infra", "plan", *args, "--detailed-exitcode"])

    assert planned.exit_code == 2, planned.output
    assert "create push subscription trainer-push: → http://127.0.0.1:" in planned.output
    assert "note: schedules: Cloud Scheduler is not emulated" in planned.output
    assert applied.exit_code == 0, applied.output
    everything = len(TOPOLOGY.topics) + len(TOPOLOGY.push) + len(TOPOLOGY.pull)
    assert f"{everything} change(s) applied" in applied.output
    assert again.exit_code == 0, again.output
    assert "no changes: it matches the topology" in again.output


def test_cli_refuses_a_gcp_plan_while_the_emulator_variables_are_set(
    emulators: StackState,
) -> None:
    result = CliRunner().invoke(
        app, ["infra", "plan", "--env", "dev", "--project-number", str(NUMBER)]
    )

    assert result.exit_code == 1
    assert "PUBSUB_EMULATOR_HOST and STORAGE_EMULATOR_HOST set" in result.output
