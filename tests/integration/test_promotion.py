"""Model promotion across environments (docs/promotion.md) on the emulators: dev, staging and
prod are three projects and buckets, described by environment files in a temporary folder; each
environment's evaluator, deployer and predictor are the real apps, started with that
environment's settings. iris is trained in dev through the chain, promoted to staging (its
gates run again there, its deployer registers it, its predictor serves it), then to prod
behind an approval; and every refusal leaves the target as it was."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from google.cloud import pubsub_v1
from typer.testing import CliRunner

from mlpipe.messaging import events, topology
from mlpipe.messaging.publishing import Publisher
from mlpipe.ml.config import PipelineConfig, parse_config
from mlpipe.runtime import promotion
from mlpipe.store import layout, run_records
from mlpipe.store.approvals import APPROVED, PENDING, REJECTED, Actor, Approvals
from mlpipe.store.promotions import verify_source
from mlpipe.store.registry import ONNX_FILE, Registry
from mlpipe.store.storage import Storage, make_client, sha256_hex
from mlpipe.v1 import events_pb2
from mlpipe_ops import cli, cli_promotion
from mlpipe_ops.release import PROMOTION
from tests.conftest import REPO, unique
from tests.integration.conftest import Cloud, forward, job_started, notification, upload

pytestmark = pytest.mark.integration

MODEL = "iris-classifier"
WATCHED = (
    events.TRAINING_COMPLETED,
    events.EVALUATION_COMPLETED,
    events.DEPLOYMENT_COMPLETED,
    events.PIPELINE_FAILURES,
    events.APPROVALS,
)
ALICE = Actor("alice@example.com", "--as")


def make_cloud() -> Cloud:
    """A project and bucket of one environment, its topics, and watches on what it publishes."""
    project = unique("proj")
    client = make_client(project)
    bucket = client.create_bucket(unique("bucket"))
    topology.create_topics(project, topology.TOPOLOGY.topics)
    cloud = Cloud(
        project, Storage(client, bucket.name), Publisher(project), pubsub_v1.SubscriberClient()
    )
    cloud.watch(*WATCHED)
    return cloud


@contextmanager
def env_services(
    name: str,
    cloud: Cloud,
    jobs: Path,
    apps: tuple[str, ...] = ("evaluator", "deployer", "predictor"),
) -> Iterator[dict[str, TestClient]]:
    """The services' real apps with environment `name`'s settings (they read them in their
    lifespan), for as long as the block runs."""
    from mlpipe_deployer.main import app as deployer
    from mlpipe_evaluator.main import app as evaluator
    from mlpipe_predictor.main import app as predictor
    from mlpipe_trainer.main import app as trainer

    known = {
        "trainer": trainer,
        "evaluator": evaluator,
        "deployer": deployer,
        "predictor": predictor,
    }
    with pytest.MonkeyPatch.context() as patch, ExitStack() as stack:
        patch.setenv("MLPIPE_PROJECT", cloud.project)
        patch.setenv("MLPIPE_BUCKET", cloud.storage.bucket_name)
        patch.setenv("MLPIPE_ENV", name)
        patch.setenv("MLPIPE_JOB_LOG_DIR", str(jobs))
        yield {app: stack.enter_context(TestClient(known[app])) for app in apps}


def evaluate_deploy_serve(services: dict[str, TestClient], cloud: Cloud) -> dict:
    """The TrainingCompleted waiting in `cloud` through its evaluator, deployer and predictor;
    what each published, and a prediction."""
    trained = cloud.pulled(events.TRAINING_COMPLETED, timeout=30)
    assert len(trained) == 1, trained
    forward(services["evaluator"], trained[0])
    evaluated = cloud.pulled(events.EVALUATION_COMPLETED)
    forward(services["deployer"], evaluated[0])
    deployed = cloud.pulled(events.DEPLOYMENT_COMPLETED)
    serving = forward(services["predictor"], deployed[0])
    reply = services["predictor"].post(
        "/predict", json={"instances": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]}
    )
    return {
        "trained": trained[0],
        "evaluated": evaluated[0],
        "deployed": deployed[0],
        "serving": serving,
        "reply": reply,
    }


@dataclass
class Dev:
    cloud: Cloud
    run_id: str
    csv: str


def train_in(cloud: Cloud, config: PipelineConfig, csv: str, jobs: Path) -> tuple[dict, str]:
    """iris landed in `cloud` and taken through its chain (the trainer's job a real process)."""
    with env_services("dev", cloud, jobs, ("trainer", "evaluator", "deployer")) as services:
        cloud.apply_config(config)
        path, generation = upload(cloud, csv)
        started = services["trainer"].post(
            "/pubsub/push", content=notification(cloud, path, generation)
        )
        assert job_started(started), started.text
        trained = cloud.pulled(events.TRAINING_COMPLETED, timeout=90)
        forward(services["evaluator"], trained[0])
        evaluated = cloud.pulled(events.EVALUATION_COMPLETED)
        forward(services["deployer"], evaluated[0])
        deployed = cloud.pulled(events.DEPLOYMENT_COMPLETED)
    return {"evaluated": evaluated[0], "deployed": deployed[0]}, trained[0].context.run_id


@pytest.fixture(scope="module")
def dev(emulators: object, tmp_path_factory: pytest.TempPathFactory) -> Dev:
    """iris trained, evaluated and registered as v1 in dev, once for the module."""
    cloud = make_cloud()
    config = parse_config((REPO / "examples/iris/pipeline.yaml").read_text())
    csv = (REPO / "examples/iris/iris.csv").read_text()
    done, run_id = train_in(cloud, config, csv, tmp_path_factory.mktemp("dev-jobs"))
    assert done["evaluated"].passed and done["deployed"].deployed, done
    assert done["deployed"].version == 1
    return Dev(cloud, run_id, csv)


@dataclass
class Envs:
    directory: Path
    clouds: dict[str, Cloud]
    jobs: Path

    def __getitem__(self, name: str) -> Cloud:
        return self.clouds[name]

    def cli(self, *args: str, code: int = 0) -> str:
        # Who acts, unless --as says: fixed, so that no test asks the machine's gcloud.
        result = CliRunner().invoke(
            cli.app,
            [*args, "--environments-dir", str(self.directory)],
            env={"MLPIPE_ACTOR": "test-runner"},
        )
        assert result.exit_code == code, result.output
        return result.output

    @contextmanager
    def places(self, *names: str) -> Iterator[dict[str, promotion.Place]]:
        with cli_promotion.places(list(names), self.directory, self.jobs) as found:
            yield found


def write_environments(directory: Path, clouds: dict[str, Cloud], **prod: object) -> None:
    directory.mkdir(exist_ok=True)
    for name, cloud in clouds.items():
        env: dict[str, object] = {
            "target": "emulator",
            "project": cloud.project,
            "bucket": cloud.storage.bucket_name,
            "service_url": "http://127.0.0.1:{port}",
            "deploy_target": "local",
        }
        if name == "prod":
            env |= {"approval": "required", "approval_expires_hours": 72, **prod}
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(env))


@pytest.fixture
def envs(dev: Dev, tmp_path: Path) -> Envs:
    """dev (the module's), and a fresh staging and prod, each in its own project and bucket."""
    clouds = {"dev": dev.cloud, "staging": make_cloud(), "prod": make_cloud()}
    write_environments(tmp_path / "environments", clouds)
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    return Envs(tmp_path / "environments", clouds, jobs)


def nothing_in(cloud: Cloud) -> list[str]:
    """What a refused promotion must not have written: runs, registry, promotions."""
    return [
        *cloud.storage.list(layout.RUNS),
        *cloud.storage.list(layout.REGISTRY),
        *cloud.storage.list(layout.PROMOTIONS),
    ]


def approval_id_in(said: str) -> str:
    found = [w for w in said.replace(":", " ").split() if layout.APPROVAL_ID_PATTERN.match(w)]
    assert found, said
    return found[0]


# --- the whole path ---------------------------------------------------------------------------
def test_iris_goes_dev_to_staging_to_prod_through_the_gates_and_an_approval(
    envs: Envs, dev: Dev
) -> None:
    staging, prod = envs["staging"], envs["prod"]

    # dev → staging: no approval; staging's own evaluator, deployer and predictor take it.
    said = envs.cli("promote", MODEL, "1", "--to", "staging", "--as", "alice@example.com")
    assert said.startswith("promoted:"), said
    with env_services("staging", staging, envs.jobs) as services:
        at_staging = evaluate_deploy_serve(services, staging)

    trained = at_staging["trained"]
    assert trained.promoted_from.env == "dev" and trained.promoted_from.version == 1
    assert (
        trained.promoted_from.model_sha256 == Registry(dev.cloud.storage).get(MODEL, 1).model_sha256
    )
    assert trained.context.run_id == layout.promoted_run_id("dev", dev.cloud.project, MODEL, 1)
    assert trained.model_uri.startswith(staging.storage.uri("runs/"))
    hops = [label for label, _ in run_records.run_timeline(staging.storage, trained.context.run_id)]
    assert hops.index("model written") < hops.index("promoted from dev v1") < hops.index("deployed")
    assert at_staging["evaluated"].passed
    assert {g.name for g in at_staging["evaluated"].gates} >= {"min_accuracy"}
    assert at_staging["deployed"].deployed and at_staging["deployed"].version == 1
    assert at_staging["serving"]["status"] == "serving"
    assert at_staging["reply"].status_code == 200, at_staging["reply"].text
    assert at_staging["reply"].json()["predictions"] == ["setosa", "virginica"]

    # staging → prod: an approval request, nothing in prod.
    said = envs.cli("promote", MODEL, "1", "--to", "prod", "--as", "alice@example.com")
    assert said.startswith("requested:") and "requires approval" in said, said
    first = approval_id_in(said)
    assert Registry(prod.storage).versions(MODEL) == []
    assert nothing_in(prod) == []
    request = prod.storage.read_json(layout.approval_path(first))
    assert request["state"] == PENDING
    assert (request["model"], request["version"], request["from_env"], request["to_env"]) == (
        MODEL,
        1,
        "staging",
        "prod",
    )
    assert (request["requested_by"], request["requested_by_source"]) == (
        "alice@example.com",
        "--as",
    )
    assert request["source"]["model_sha256"] == trained.model_sha256
    assert request["source"]["bucket"] == staging.storage.bucket_name
    expires = dt.datetime.fromisoformat(request["expires_at"])
    asked = dt.datetime.fromisoformat(request["requested_at"])
    assert expires - asked == dt.timedelta(hours=72)
    listed = envs.cli("approvals", "--env", "prod")
    assert "1 pending of 1" in listed and first in listed and "pending" in listed

    # Rejected, with the reason; approving it afterwards is refused and changes nothing.
    said = envs.cli(
        "reject",
        first,
        "--env",
        "prod",
        "--reason",
        "wait for the Monday review",
        "--as",
        "bob@example.com",
    )
    assert said.startswith("rejected:"), said
    rejected = prod.storage.read(layout.approval_path(first))
    assert rejected is not None
    assert rejected.json()["state"] == REJECTED
    assert rejected.json()["reason"] == "wait for the Monday review"
    assert rejected.json()["decided_by"] == "bob@example.com"
    said = envs.cli("approve", first, "--env", "prod", "--as", "carol@example.com", code=1)
    assert "already_decided" in said and "already rejected by bob@example.com" in said
    assert prod.storage.read(layout.approval_path(first)).generation == rejected.generation
    assert nothing_in(prod) == []

    # Promoted again: a new request; approved: carried out, and prod serves it.
    said = envs.cli("promote", MODEL, "1", "--to", "prod", "--as", "alice@example.com")
    second = approval_id_in(said)
    assert second != first
    said = envs.cli("approve", second, "--env", "prod", "--as", "carol@example.com")
    assert said.startswith("promoted:") and "approved by carol@example.com" in said, said
    approved = prod.storage.read_json(layout.approval_path(second))
    assert approved["state"] == APPROVED
    assert (approved["decided_by"], approved["decided_by_source"]) == ("carol@example.com", "--as")
    assert dt.datetime.fromisoformat(approved["decided_at"]) >= asked
    told = {(type(e).__name__, e.approval_id): e for e in prod.pulled(events.APPROVALS, expect=4)}
    assert sorted(told) == sorted(
        [
            ("ApprovalRequested", first),
            ("ApprovalDecided", first),
            ("ApprovalRequested", second),
            ("ApprovalDecided", second),
        ]
    )
    refused, allowed = told[("ApprovalDecided", first)], told[("ApprovalDecided", second)]
    assert events.APPROVAL_DECISION.text(refused.decision) == "rejected"
    assert (
        refused.reason == "wait for the Monday review" and refused.decided_by == "bob@example.com"
    )
    assert events.APPROVAL_DECISION.text(allowed.decision) == "approved"
    assert allowed.decided_by == "carol@example.com" and allowed.run_id
    assert told[("ApprovalRequested", first)].source.model_sha256 == trained.model_sha256
    with env_services("prod", prod, envs.jobs) as services:
        at_prod = evaluate_deploy_serve(services, prod)

    assert at_prod["trained"].promoted_from.env == "staging"
    # prod's gates: dev's registered iris config for env prod, carried with staging's run.
    record = prod.storage.read_json(layout.promotion_path(MODEL, 1, "staging"))
    assert record["gates_from"] == (
        staging.storage.uri(
            layout.RunPaths(trained.context.run_id).promoted_source(promotion.PIPELINE_CONFIG)
        )
        + " (env prod)"
    )
    assert at_prod["trained"].promoted_from.approval_id == second
    assert at_prod["evaluated"].passed and at_prod["deployed"].version == 1
    assert at_prod["reply"].status_code == 200, at_prod["reply"].text
    assert at_prod["reply"].json()["predictions"] == ["setosa", "virginica"]
    # The version registered in prod leads back to the bytes dev trained on.
    version = Registry(prod.storage).get(MODEL, 1)
    assert version is not None
    chain = promotion.lineage_chain(prod.storage, version.run_id)
    assert [c.get("promoted_from", {}).get("env") for c in chain] == ["staging", "dev", None]
    assert chain[0]["promoted_from"]["approval_id"] == second
    assert chain[0]["promoted_from"]["project"] == staging.project
    assert chain[-1]["dataset"]["sha256"] == sha256_hex(dev.csv.encode())
    assert chain[-1]["run_id"] == dev.run_id
    assert version.info["lineage_uri"] == prod.storage.uri(layout.RunPaths(version.run_id).lineage)


def test_the_targets_own_gates_judge_a_promoted_version(envs: Envs, dev: Dev) -> None:
    # dev's registered iris config asks more of prod than dev's own gates did.
    path = "pipelines/iris/config.yaml"
    registered = dev.cloud.storage.read(path)
    assert registered is not None
    stricter = (
        registered.data.decode() + "environments:\n  prod:\n    gates:\n      min_accuracy: 0.999\n"
    )
    dev.cloud.storage.write(path, stricter.encode())
    try:
        approval_id = request_to_prod(envs)
        said = envs.cli("approve", approval_id, "--env", "prod")
    finally:
        dev.cloud.storage.write(path, registered.data)
    prod = envs["prod"]
    with env_services("prod", prod, envs.jobs, ("evaluator", "deployer")) as services:
        trained = prod.pulled(events.TRAINING_COMPLETED)
        forward(services["evaluator"], trained[0])
        evaluated = prod.pulled(events.EVALUATION_COMPLETED)
        forward(services["deployer"], evaluated[0])
        deployed = prod.pulled(events.DEPLOYMENT_COMPLETED)

    assert f"gates from {dev.cloud.storage.uri(path)} (env prod)" in said, said
    gate = next(g for g in evaluated[0].gates if g.name == "min_accuracy")
    assert gate.threshold == pytest.approx(0.999) and not gate.passed
    assert not evaluated[0].passed and not deployed[0].deployed
    assert Registry(prod.storage).versions(MODEL) == []
    kept = prod.storage.read(
        layout.RunPaths(trained[0].context.run_id).promoted_source(promotion.PIPELINE_CONFIG)
    )
    assert kept is not None and kept.data == stricter.encode()


# --- refusals ------------------------------------------------------------------------------------
def test_a_version_that_failed_its_gates_is_refused(envs: Envs, tmp_path: Path) -> None:
    # Its own dev: a strict config fails iris, and someone registers the model by hand anyway.
    strict_dev = make_cloud()
    clouds = {**envs.clouds, "dev": strict_dev}
    write_environments(envs.directory, clouds)
    config = parse_config(
        (REPO / "examples/iris/pipeline.yaml")
        .read_text()
        .replace("min_accuracy: 0.75", "min_accuracy: 0.999")
    )
    done, run_id = train_in(
        strict_dev, config, (REPO / "examples/iris/iris.csv").read_text(), tmp_path
    )
    assert not done["evaluated"].passed and not done["deployed"].deployed
    model = strict_dev.storage.read(layout.RunPaths(run_id).model)
    assert model is not None
    Registry(strict_dev.storage).register(MODEL, run_id, model.data, info={"registered": "by hand"})

    said = envs.cli("promote", MODEL, "1", "--to", "staging", code=1)

    assert "refused:" in said and "did not pass its gates" in said and "min_accuracy" in said
    assert nothing_in(envs["staging"]) == []
    assert envs["staging"].pulled(events.TRAINING_COMPLETED, expect=1, timeout=1) == []


def test_a_tampered_artifact_is_refused(envs: Envs, dev: Dev) -> None:
    paths = layout.RegistryPaths(MODEL)
    registered = Registry(dev.cloud.storage).get(MODEL, 1)
    assert registered is not None and registered.artifact(ONNX_FILE) is not None
    for name in ("model.joblib", ONNX_FILE):
        path = paths.version_file(1, name)
        original = dev.cloud.storage.read(path)
        assert original is not None
        dev.cloud.storage.write(path, original.data + b"tampered")
        try:
            said = envs.cli("promote", MODEL, "1", "--to", "staging", code=1)
        finally:
            dev.cloud.storage.write(path, original.data)

        assert "refused:" in said and "sha256" in said and name in said, said
        assert nothing_in(envs["staging"]) == []


def test_the_order_and_the_environment_itself_are_refused(envs: Envs) -> None:
    backwards = envs.cli("promote", MODEL, "1", "--to", "staging", "--from", "prod", code=1)
    same = envs.cli("promote", MODEL, "1", "--to", "staging", "--from", "staging", code=1)
    first = envs.cli("promote", MODEL, "1", "--to", "dev", code=1)
    missing = envs.cli("promote", MODEL, "7", "--to", "staging", code=1)

    assert "against the promotion order" in backwards
    assert "not promoted into its own environment" in same
    assert "first environment" in first
    assert "v7 is not a complete version in dev's registry" in missing and "v1" in missing
    assert nothing_in(envs["staging"]) == []


def request_to_prod(envs: Envs, at: dt.datetime | None = None) -> str:
    """A request to promote dev's v1 straight into prod (--from dev), made at `at`."""
    with envs.places("dev", "prod") as found:
        asked = promotion.promote(found["dev"], found["prod"], MODEL, 1, ALICE, PROMOTION, now=at)
    assert asked.status == promotion.REQUESTED and asked.approval is not None, asked
    return asked.approval.id


def test_an_expired_request_is_not_approved(envs: Envs) -> None:
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=73)
    approval_id = request_to_prod(envs, at=long_ago)
    before = envs["prod"].storage.read(layout.approval_path(approval_id))

    listed = envs.cli("approvals", "--env", "prod")
    said = envs.cli("approve", approval_id, "--env", "prod", "--as", "carol@example.com", code=1)
    again = envs.cli("promote", MODEL, "1", "--to", "prod", "--from", "dev")

    assert "0 pending of 1" in listed and f"{approval_id}  expired" in listed
    assert "expired:" in said and "nothing changed" in said
    after = envs["prod"].storage.read(layout.approval_path(approval_id))
    assert after is not None and before is not None and after.generation == before.generation
    assert after.json()["state"] == PENDING
    assert Registry(envs["prod"].storage).versions(MODEL) == []
    assert not envs["prod"].storage.list(layout.RUNS)
    # Asking again makes a new request: the expired one is not reused.
    assert again.startswith("requested:") and approval_id_in(again) != approval_id


def test_a_decided_request_is_not_decided_again(envs: Envs) -> None:
    approval_id = request_to_prod(envs)
    envs.cli("approve", approval_id, "--env", "prod", "--as", "carol@example.com")
    decided = envs["prod"].storage.read(layout.approval_path(approval_id))

    approve = envs.cli("approve", approval_id, "--env", "prod", "--as", "dave@example.com", code=1)
    reject = envs.cli("reject", approval_id, "--env", "prod", "--reason", "late", code=1)
    promote = envs.cli("promote", MODEL, "1", "--to", "prod", "--from", "dev")

    assert "already approved by carol@example.com" in approve
    assert "its promotion started run" in approve
    assert "already approved by carol@example.com" in reject
    assert promote.startswith("already_promoted:")
    after = envs["prod"].storage.read(layout.approval_path(approval_id))
    assert after is not None and decided is not None and after.generation == decided.generation
    assert len(envs["prod"].storage.list(layout.PROMOTIONS)) == 1


def test_two_approvers_racing_one_wins(envs: Envs) -> None:
    approval_id = request_to_prod(envs)
    approvals = Approvals(envs["prod"].storage)
    # Both read the request while it was pending; each decision is conditioned on what it read.
    seen_by_carol, seen_by_dave = approvals.get(approval_id), approvals.get(approval_id)
    assert seen_by_carol is not None and seen_by_dave is not None
    now = dt.datetime.now(dt.UTC)

    carol = approvals.decide(seen_by_carol, APPROVED, Actor("carol@example.com", "--as"), now)
    dave = approvals.decide(
        seen_by_dave, REJECTED, Actor("dave@example.com", "--as"), now, reason="no"
    )

    assert carol.done and not dave.done and dave.why == "decided"
    assert dave.request.record["decided_by"] == "carol@example.com"
    assert approvals.get(approval_id).state == APPROVED


def test_two_approve_commands_at_once_carry_the_promotion_out_once(envs: Envs) -> None:
    approval_id = request_to_prod(envs)
    outcomes: list[promotion.Outcome] = []
    start = threading.Barrier(2)

    def approve_as(name: str) -> None:
        with envs.places("dev", "prod") as found:
            start.wait(timeout=30)
            outcomes.append(
                promotion.approve(
                    found["dev"], found["prod"], approval_id, Actor(name, "--as"), PROMOTION
                )
            )

    racers = [threading.Thread(target=approve_as, args=(n,)) for n in ("erin", "frank")]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(60)

    assert sorted(o.status for o in outcomes) == sorted([promotion.PROMOTED, promotion.DECIDED])
    winner = next(o for o in outcomes if o.status == promotion.PROMOTED)
    loser = next(o for o in outcomes if o.status == promotion.DECIDED)
    assert winner.approval is not None
    assert f"already approved by {winner.approval.record['decided_by']}" in loser.message
    assert len(envs["prod"].pulled(events.TRAINING_COMPLETED, expect=2, timeout=3)) == 1
    assert len(envs["prod"].storage.list(layout.PROMOTIONS)) == 1


def test_carrying_out_into_prod_needs_an_approved_request(envs: Envs) -> None:
    pending = request_to_prod(envs)
    with envs.places("dev", "prod") as found:
        checked = verify_source(found["dev"].storage, "dev", found["dev"].project, MODEL, 1)
        without = promotion.carry_out(found["dev"], found["prod"], checked, ALICE)
        with_pending = promotion.carry_out(
            found["dev"], found["prod"], checked, ALICE, approval_id=pending
        )

    assert without.status == promotion.REFUSED and without.reason == "not_approved"
    assert "prod requires an approved request" in without.message
    assert (
        with_pending.status == promotion.REFUSED
        and f"approval {pending} is pending" in with_pending.message
    )
    assert nothing_in(envs["prod"]) == []


# --- idempotency -------------------------------------------------------------------------------
def test_promoting_twice_makes_one_promotion_and_one_training_completed(
    envs: Envs, dev: Dev
) -> None:
    staging = envs["staging"]
    # staging has iris data of its own: the promoted model is scored on its holdout.
    landed = "datasets/iris/dt=2026-12-01/staging-own.csv"
    generation = staging.storage.write(landed, dev.csv.encode(), content_type="text/csv")

    first = envs.cli("promote", MODEL, "1", "--to", "staging")
    second = envs.cli("promote", MODEL, "1", "--to", "staging")

    assert first.startswith("promoted:") and "the target's own dataset" in first, first
    assert second.startswith("already_promoted:") and "nothing new" in second
    assert len(staging.storage.list(layout.PROMOTIONS)) == 1
    trained = staging.pulled(events.TRAINING_COMPLETED, expect=2, timeout=3)
    assert len(trained) == 1
    record = staging.storage.read_json(layout.promotion_path(MODEL, 1, "dev"))
    assert record["state"] == "published" and record["run_id"] == trained[0].context.run_id
    assert record["holdout"]["source"] == "target_dataset"
    assert trained[0].dataset.uri == staging.storage.uri(landed)
    assert trained[0].dataset.generation == generation
    assert trained[0].promoted_from.holdout == events_pb2.HOLDOUT_SOURCE_TARGET_DATASET
    # Every copy was read back with the sha256 it was written with.
    for copy in record["copies"]:
        stored = staging.storage.read(staging.storage.path_of(copy["to"]))
        assert stored is not None and sha256_hex(stored.data) == copy["sha256"]
    with env_services("staging", staging, envs.jobs, ("evaluator",)) as services:
        forward(services["evaluator"], trained[0])
        evaluated = staging.pulled(events.EVALUATION_COMPLETED)
    assert evaluated[0].passed and evaluated[0].holdout_rows == 30
    assert evaluated[0].dataset.uri == staging.storage.uri(landed)
