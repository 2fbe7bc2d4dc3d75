"""The Cloud Run target driven through the real `google-cloud-run` clients (REST) against the
local Cloud Run Admin API v2 (mlpipe_ops.standins.cloud_run, rules in
docs/cloud-run-standin.md): the revision a model rollout makes, the traffic sequence of a
model rollout followed by a code release, and a rollout that never waits on an operation."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.cloud import run_v2

from mlpipe.store.registry import ModelVersion, Traffic
from mlpipe_deployer.targets import Rollout
from mlpipe_deployer.targets.cloud_run import (
    CloudRunRolloutError,
    CloudRunTarget,
    release_fingerprint,
    revision_name,
)
from mlpipe_ops import infra, service_runtime
from mlpipe_ops.standins.cloud_run import CloudRunStandIn
from tests.conftest import REPO

PROJECT = "acme-ml-dev"
NUMBER = "123456789012"
REGION = "us-central1"
SERVICE_ID = "mlpipe-predictor"
SERVICE = f"projects/{PROJECT}/locations/{REGION}/services/{SERVICE_ID}"
MODEL = "iris-classifier"
REGISTRY = f"{REGION}-docker.pkg.dev/{PROJECT}/mlpipe"
# Operations finish only when a test moves the stand-in's clock past this.
OPERATION_SECONDS = 60.0


def version(n: int) -> ModelVersion:
    return ModelVersion(
        MODEL, n, f"run{n:013d}", f"gs://b/registry/{MODEL}/versions/{n}/model.joblib", "sha", {}
    )


VERSIONS = {n: version(n) for n in (1, 2, 3)}


@dataclass
class Run:
    stand_in: CloudRunStandIn
    services: run_v2.ServicesClient
    revisions: run_v2.RevisionsClient

    def target(self) -> CloudRunTarget:
        return CloudRunTarget(
            PROJECT,
            REGION,
            SERVICE_ID,
            f"{REGISTRY}/predictor:unused",
            "d" * 40,
            services=self.services,
            revisions=self.revisions,
            env="dev",
        )

    def finish(self) -> None:
        self.stand_in.advance(OPERATION_SECONDS + 1)

    def service(self) -> run_v2.Service:
        return self.services.get_service(name=SERVICE)

    def served(self) -> list[tuple[str, int, str]]:
        """What the service serves (traffic_statuses), by revision id."""
        return sorted(
            (t.revision.rsplit("/", 1)[-1], t.percent, t.tag)
            for t in self.service().traffic_statuses
            if t.percent
        )

    def revision(self, name: str) -> run_v2.Revision:
        return self.revisions.get_revision(name=f"{SERVICE}/revisions/{name}")

    def release(self, commit: str, *, create: bool = False, keep_traffic: bool = True) -> str:
        """A code release of the predictor, as Cloud Build or Cloud Deploy makes it: the
        template infra/runtime.yaml and the environment file say, with this commit's image; the
        traffic list left as it is. Returns the image."""
        image = f"{REGISTRY}/predictor:{commit[:7]}"
        self.stand_in.add_image(image)
        template = release_template(image, commit)
        if create:
            self.services.create_service(
                parent=f"projects/{PROJECT}/locations/{REGION}",
                service=run_v2.Service(template=template),
                service_id=SERVICE_ID,
            )
        else:
            service = self.service()
            service.template = template
            if not keep_traffic:
                # Cloud Deploy replaces the whole Service from a manifest that has no traffic.
                del service.traffic[:]
            self.services.update_service(service=service)
        self.finish()
        return image

    def roll_out(self, traffic: Traffic, *, steps: int = 5) -> list[Rollout]:
        """`apply` as the deployer drives it: again after each operation has finished."""
        rollouts = [self.target().apply(MODEL, traffic, VERSIONS)]
        while not rollouts[-1].done:
            assert len(rollouts) <= steps, rollouts
            self.finish()
            rollouts.append(self.target().apply(MODEL, traffic, VERSIONS, rollouts[-1].operations))
        return rollouts


def release_template(image: str, commit: str) -> run_v2.RevisionTemplate:
    runtime = service_runtime.load_runtimes("dev", REPO / "infra" / "runtime.yaml")["predictor"]
    environment = infra.load_environment("dev", REPO / "infra" / "environments")
    target = infra.resolve(environment, "dev", project=PROJECT, project_number=int(NUMBER))
    revision = service_runtime.cloud_run_revision(
        target, "predictor", runtime, image=image, code_version=commit
    )
    return run_v2.RevisionTemplate(
        service_account=revision.service_account,
        max_instance_request_concurrency=revision.concurrency,
        containers=[
            run_v2.Container(
                image=revision.image,
                env=[run_v2.EnvVar(name=k, value=v) for k, v in revision.env.items()],
                resources=run_v2.ResourceRequirements(
                    limits={"cpu": revision.cpu, "memory": revision.memory}
                ),
            )
        ],
    )


def env_of(revision: run_v2.Revision) -> dict[str, str]:
    return {e.name: e.value for e in revision.containers[0].env}


@pytest.fixture
def run() -> Iterator[Run]:
    stand_in = CloudRunStandIn(
        PROJECT, project_number=NUMBER, operation_seconds=OPERATION_SECONDS, images=()
    ).start()
    options = stand_in.client_options()
    credentials = AnonymousCredentials()
    yield Run(
        stand_in,
        run_v2.ServicesClient(transport="rest", client_options=options, credentials=credentials),
        run_v2.RevisionsClient(transport="rest", client_options=options, credentials=credentials),
    )
    stand_in.stop()


def test_a_rollout_builds_the_revision_from_the_released_template_pinned_to_the_version(
    run: Run,
) -> None:
    image = run.release("a" * 40, create=True)
    release = release_fingerprint(run.service().template)

    run.roll_out(Traffic(1))
    run.roll_out(Traffic(1, 2, 10))

    v1 = revision_name(SERVICE_ID, MODEL, 1, release)
    v2 = revision_name(SERVICE_ID, MODEL, 2, release)
    assert run.served() == [(v1, 90, "champion"), (v2, 10, "canary")]
    revision = run.revision(v2)
    assert revision.containers[0].image == image
    assert revision.service_account == f"mlpipe-predictor@{PROJECT}.iam.gserviceaccount.com"
    released = release_template(image, "a" * 40)
    expected = {e.name: e.value for e in released.containers[0].env}
    assert env_of(revision) == {
        **expected,
        "MLPIPE_SERVE_MODEL": MODEL,
        "MLPIPE_SERVE_VERSION": "2",
    }
    # The push verifier's settings come from the release, untouched by the rollout.
    assert env_of(revision)["MLPIPE_PUSH_AUDIENCE"] == expected["MLPIPE_PUSH_AUDIENCE"]
    assert revision.labels["mlpipe-model"] == MODEL and revision.labels["mlpipe-version"] == "2"


def test_a_rollouts_revision_carries_the_run_pipeline_and_environment_for_the_billing_export(
    run: Run,
) -> None:
    run.release("a" * 40, create=True)
    VERSIONS[3].info["pipeline"] = "Iris Flowers"  # a pipeline's name, as its config gives it
    try:
        run.roll_out(Traffic(3))
    finally:
        del VERSIONS[3].info["pipeline"]

    (name, _, _), *_ = run.served()
    labels = dict(run.revision(name).labels)
    assert {k: labels[k] for k in ("mlpipe-run-id", "mlpipe-pipeline", "mlpipe-env")} == {
        "mlpipe-run-id": "run0000000000003",
        "mlpipe-pipeline": "iris-flowers",  # sanitised: the stand-in refuses what Google does
        "mlpipe-env": "dev",
    }


def test_the_stand_in_refuses_a_label_google_refuses(run: Run) -> None:
    run.release("a" * 40, create=True)
    service = run.service()
    service.template.labels["Team"] = "ml"

    with pytest.raises(gexc.BadRequest, match=r"template.labels: label key 'Team' must start"):
        run.services.update_service(service=service)


def test_a_code_release_after_a_canary_serves_the_new_code_once_promoted(run: Run) -> None:
    run.release("a" * 40, create=True)
    old = release_fingerprint(run.service().template)
    run.roll_out(Traffic(1))
    run.roll_out(Traffic(1, 2, 10))
    before = run.served()

    image = run.release("b" * 40)

    # The release makes a revision (not pinned to a model) that gets no traffic: the split
    # pinned to named revisions stays as it was.
    released = run.service().latest_created_revision.rsplit("/", 1)[-1]
    assert "MLPIPE_SERVE_MODEL" not in env_of(run.revision(released))
    assert run.served() == before
    new = release_fingerprint(run.service().template)
    assert new != old

    rollouts = run.roll_out(Traffic(2, history=[1]))

    v2 = revision_name(SERVICE_ID, MODEL, 2, new)
    assert run.served() == [(v2, 100, "champion")]
    revision = run.revision(v2)
    assert revision.containers[0].image == image
    assert env_of(revision)["MLPIPE_CODE_VERSION"] == "b" * 40
    assert env_of(revision)["MLPIPE_SERVE_VERSION"] == "2"
    # One update made the revision and moved the traffic; the last call only checked.
    assert len(rollouts) == 2 and rollouts[-1].done


def test_the_next_reconcile_moves_a_running_canary_onto_the_released_code(run: Run) -> None:
    run.release("a" * 40, create=True)
    run.roll_out(Traffic(1))
    run.roll_out(Traffic(1, 2, 10))
    image = run.release("b" * 40)
    new = release_fingerprint(run.service().template)

    rollouts = run.roll_out(Traffic(1, 2, 10))

    v1 = revision_name(SERVICE_ID, MODEL, 1, new)
    v2 = revision_name(SERVICE_ID, MODEL, 2, new)
    assert run.served() == [(v1, 90, "champion"), (v2, 10, "canary")]
    for name, served in ((v1, "1"), (v2, "2")):
        revision = run.revision(name)
        assert revision.containers[0].image == image
        assert env_of(revision)["MLPIPE_SERVE_VERSION"] == served
    # One revision per update: two updates, then a check.
    assert [len(r.operations) for r in rollouts] == [1, 1, 0]


def test_a_release_that_takes_all_traffic_serves_unpinned_until_the_next_reconcile(
    run: Run,
) -> None:
    run.release("a" * 40, create=True)
    run.roll_out(Traffic(1))
    run.roll_out(Traffic(1, 2, 10))

    run.release("b" * 40, keep_traffic=False)

    # No traffic list: 100% to the latest ready revision, which pins no version (the predictor
    # then serves what the registry's aliases say, canary split included).
    released = run.service().latest_created_revision.rsplit("/", 1)[-1]
    assert run.served() == [(released, 100, "")]
    assert "MLPIPE_SERVE_VERSION" not in env_of(run.revision(released))

    run.roll_out(Traffic(1, 2, 10))

    new = release_fingerprint(run.service().template)
    assert run.served() == [
        (revision_name(SERVICE_ID, MODEL, 1, new), 90, "champion"),
        (revision_name(SERVICE_ID, MODEL, 2, new), 10, "canary"),
    ]


def test_a_rollback_moves_traffic_back_without_a_new_revision(run: Run) -> None:
    run.release("a" * 40, create=True)
    run.roll_out(Traffic(1))
    run.roll_out(Traffic(2, history=[1]))
    count = len(list(run.revisions.list_revisions(parent=SERVICE)))

    run.roll_out(Traffic(1))

    release = release_fingerprint(run.service().template)
    assert run.served() == [(revision_name(SERVICE_ID, MODEL, 1, release), 100, "champion")]
    assert len(list(run.revisions.list_revisions(parent=SERVICE))) == count


def test_apply_never_waits_and_a_repeated_call_starts_nothing(run: Run) -> None:
    run.release("a" * 40, create=True)
    changes = len(run.stand_in.changes)

    first = run.target().apply(MODEL, Traffic(1), VERSIONS)

    assert not first.done and first.operations[0].startswith(
        f"projects/{NUMBER}/locations/{REGION}/operations/"
    )
    assert len(run.stand_in.changes) == changes + 1
    # The same step again while the update runs: with its operation, and as a redelivery
    # that came before the operation was recorded.
    again = run.target().apply(MODEL, Traffic(1), VERSIONS, first.operations)
    redelivered = run.target().apply(MODEL, Traffic(1), VERSIONS)
    assert again.operations == first.operations
    assert redelivered.operations == [SERVICE]
    assert len(run.stand_in.changes) == changes + 1

    run.finish()
    done = run.target().apply(MODEL, Traffic(1), VERSIONS, redelivered.operations)
    assert done.done
    assert len(run.stand_in.changes) == changes + 1


def test_a_failed_operation_is_a_clear_error(run: Run) -> None:
    run.release("a" * 40, create=True)
    # A release whose image was never pushed: its revision cannot start.
    service = run.service()
    service.template = release_template(f"{REGISTRY}/predictor:missing", "c" * 40)
    run.services.update_service(service=service)
    run.finish()

    started = run.target().apply(MODEL, Traffic(1), VERSIONS)
    run.finish()

    with pytest.raises(
        CloudRunRolloutError, match=r"failed \(code 9\): Revision '.*' is not ready"
    ):
        run.target().apply(MODEL, Traffic(1), VERSIONS, started.operations)
    # The deployer retries the step: the failed revision is named, nothing new is started.
    changes = len(run.stand_in.changes)
    with pytest.raises(CloudRunRolloutError, match=r"Image '.*:missing' not found; release a"):
        run.target().apply(MODEL, Traffic(1), VERSIONS)
    assert len(run.stand_in.changes) == changes


def test_a_second_model_on_the_same_service_is_refused_and_changes_nothing(run: Run) -> None:
    run.release("a" * 40, create=True)
    run.roll_out(Traffic(1))
    before = run.served()
    changes = len(run.stand_in.changes)

    with pytest.raises(CloudRunRolloutError, match="serves model iris-classifier; the cloud_run"):
        run.target().apply("bike-share", Traffic(1), {1: version(1)})

    assert run.served() == before and len(run.stand_in.changes) == changes


def test_a_missing_service_is_a_clear_error(run: Run) -> None:
    with pytest.raises(CloudRunRolloutError, match="deploy the predictor"):
        run.target().apply(MODEL, Traffic(1), VERSIONS)


def test_revision_names_fit_cloud_runs_rules() -> None:
    name = revision_name("mlpipe-predictor", "A_Very_Long.Model-" + "x" * 80, 12, "0a1b2c")
    assert len(name) <= 63 and name.endswith("-v12-0a1b2c")
    assert name.startswith("mlpipe-predictor-")
    assert set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")


# --- the stand-in's traffic rules, through the real client ----------------------------------
@pytest.mark.parametrize(
    ("traffic", "message"),
    [
        ([("REV", 60)], "add up to 60"),
        ([("REV", 50, "x"), ("REV", 50, "x")], "used twice"),
    ],
)
def test_the_stand_in_refuses_traffic_the_reference_refuses(
    run: Run, traffic: list[tuple[str, ...]], message: str
) -> None:
    run.release("a" * 40, create=True)
    service = run.service()
    existing = service.latest_created_revision.rsplit("/", 1)[-1]
    del service.traffic[:]
    for item in traffic:
        name = existing if item[0] == "REV" else str(item[0])
        service.traffic.append(
            run_v2.TrafficTarget(
                type_=run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION,
                revision=name,
                percent=int(item[1]),
                tag=str(item[2]) if len(item) > 2 else "",
            )
        )
    with pytest.raises(gexc.BadRequest, match=message):
        run.services.update_service(service=service)


def test_the_stand_in_refuses_a_second_template_under_an_existing_revision_name(
    run: Run,
) -> None:
    run.release("a" * 40, create=True)
    run.roll_out(Traffic(1))
    service = run.service()
    service.template.containers[0].image = f"{REGISTRY}/predictor:other"
    with pytest.raises(gexc.Conflict, match="with different configuration already exists"):
        run.services.update_service(service=service)


def test_traffic_to_a_revision_that_does_not_exist_fails_the_operation(run: Run) -> None:
    run.release("a" * 40, create=True)
    service = run.service()
    service.traffic.append(
        run_v2.TrafficTarget(
            type_=run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION,
            revision="mlpipe-predictor-nope",
            percent=100,
        )
    )

    operation = run.services.update_service(service=service)
    run.finish()

    with pytest.raises(gexc.InternalServerError, match="does not exist or is deleted"):
        operation.result(timeout=30)
    # What serves stays what served before the change.
    assert [t.percent for t in run.service().traffic_statuses] == [100]
