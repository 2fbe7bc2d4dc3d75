"""Environment files (infra/environments/<env>.yaml): the shipped ones, and the errors a wrong
one gets, each naming its key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from google.cloud import scheduler_v1

from mlpipe.messaging.topology import TOPOLOGY
from mlpipe_ops import infra

REPO = Path(__file__).resolve().parents[2]
ENVIRONMENTS = REPO / "infra" / "environments"


def write_env(folder: Path, name: str = "qa", **edits: object) -> Path:
    """A copy of dev.yaml with `edits` (None deletes a key) under `folder`."""
    raw = yaml.safe_load((ENVIRONMENTS / "dev.yaml").read_text())
    raw["schedules"] = []
    for key, value in edits.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    return folder


@pytest.mark.parametrize("name", ["local", "dev", "staging", "prod"])
def test_the_shipped_environments_are_valid(name: str) -> None:
    env = infra.load_environment(name, ENVIRONMENTS)

    target = infra.resolve(
        env, name, project_number=123456789012, ports={s: 9000 for s in TOPOLOGY.services}
    )

    assert [r.subscription.name for r in target.routes] == [s.name for s in TOPOLOGY.push]
    assert env.target == ("emulator" if name == "local" else "gcp")


def test_local_resolves_to_the_running_stack() -> None:
    env = infra.load_environment("local", ENVIRONMENTS)
    ports = {s: 18682 + i for i, s in enumerate(TOPOLOGY.services)}

    target = infra.resolve(env, "local", project="proj-x", bucket="bucket-x", ports=ports)

    assert target.emulated and target.project == "proj-x" and target.bucket == "bucket-x"
    assert {r.subscription.service: r.endpoint for r in target.routes} == {
        s: f"http://127.0.0.1:{p}/pubsub/push" for s, p in ports.items()
    }
    assert all(r.service_account == "" and r.cloud_run_service == "" for r in target.routes)


def test_dev_derives_urls_accounts_and_the_bucket_from_its_templates() -> None:
    env = infra.load_environment("dev", ENVIRONMENTS)

    target = infra.resolve(env, "dev", project="acme-ml-dev", project_number=123456789012)

    trainer = next(r for r in target.routes if r.subscription.service == "trainer")
    assert trainer.service_url == "https://mlpipe-trainer-123456789012.us-central1.run.app"
    assert trainer.endpoint == trainer.service_url + "/pubsub/push"
    assert trainer.service_account == "mlpipe-push-trainer@acme-ml-dev.iam.gserviceaccount.com"
    assert trainer.cloud_run_service == (
        "projects/acme-ml-dev/locations/us-central1/services/mlpipe-trainer"
    )
    assert target.bucket == "acme-ml-dev-mlpipe"
    assert target.runtime_accounts["ingest"] == "mlpipe-ingest@acme-ml-dev.iam.gserviceaccount.com"


def test_a_service_url_can_be_set_per_service(tmp_path: Path) -> None:
    folder = write_env(tmp_path, services={"predictor": {"url": "https://predict.acme.example/"}})

    target = infra.resolve(infra.load_environment("qa", folder), "qa", project_number=1)

    predictor = next(r for r in target.routes if r.subscription.service == "predictor")
    assert predictor.service_url == "https://predict.acme.example"
    assert predictor.endpoint == "https://predict.acme.example/pubsub/push"


def test_the_shipped_smoke_schedule_publishes_the_iris_example() -> None:
    request = json.loads((REPO / "infra/schedules/iris-smoke.json").read_text())

    assert request["dataset"] == "iris"
    assert request["inline"]["csv"] == (REPO / "examples/iris/iris.csv").read_text()


def test_gcp_needs_a_project_number() -> None:
    env = infra.load_environment("dev", ENVIRONMENTS)

    with pytest.raises(infra.InfraError, match=r"project_number is not set.*--project-number"):
        infra.resolve(env.model_copy(update={"project_number": None}), "dev")


def test_another_project_needs_its_own_number() -> None:
    env = infra.load_environment("dev", ENVIRONMENTS).model_copy(update={"project_number": 42})

    with pytest.raises(infra.InfraError, match=r"--project other-project.*--project-number"):
        infra.resolve(env, "dev", project="other-project")


def test_port_is_only_known_with_a_running_stack() -> None:
    env = infra.load_environment("local", ENVIRONMENTS)

    with pytest.raises(infra.InfraError, match=r"service_url uses \{port\}"):
        infra.resolve(env, "local")


@pytest.mark.parametrize(
    ("edits", "message"),
    [
        ({"regin": "us-central1"}, r"regin: unknown key"),
        (
            {"subscriptions": {"ingest-push": {"push_sa": "x@y"}}},
            r"subscriptions\.ingest-push\.push_sa: unknown key",
        ),
        ({"target": "aws"}, r"target: Input should be 'emulator' or 'gcp'"),
        ({"deploy_target": None}, r"deploy_target: required key missing"),
        ({"region": None}, r"region: required for a gcp environment"),
        ({"project": "Not_A_Project"}, r"project: String should match pattern"),
        (
            {"subscriptions": {"ingest-push": {"push_service_account": "a@b"}}},
            r"subscriptions\.trainer-push\.push_service_account: required for a gcp",
        ),
        (
            {"services": {"trainr": {"url": "https://x"}}},
            r"services\.trainr: unknown service",
        ),
        ({"service_url": "https://{svc}.run.app"}, r"service_url: unknown placeholder \{svc\}"),
        ({"service_url": "http://127.0.0.1:{port}"}, r"unknown placeholder \{port\}"),
        ({"bucket": "{project"}, r"bucket: .*'\}'"),
    ],
)
def test_a_wrong_environment_is_refused_naming_the_key(
    tmp_path: Path, edits: dict[str, object], message: str
) -> None:
    folder = write_env(tmp_path, **edits)

    with pytest.raises(infra.InfraError, match=message) as refused:
        infra.load_environment("qa", folder)

    assert str(folder / "qa.yaml") in str(refused.value)


def test_the_emulator_takes_no_push_service_accounts(tmp_path: Path) -> None:
    raw = yaml.safe_load((ENVIRONMENTS / "local.yaml").read_text())
    raw["subscriptions"] = {"ingest-push": {"push_service_account": "a@b.iam"}}
    raw["schedules"] = []
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(raw))

    with pytest.raises(infra.InfraError, match=r"subscriptions\.ingest-push: the emulator has no"):
        infra.load_environment("local", tmp_path)


SCHEDULE = {
    "name": "nightly",
    "schedule": "0 3 * * *",
    "time_zone": "Europe/Berlin",
    "request": {"dataset": "iris", "inline": {"csv": "a,b\n1,2\n"}},
}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"schedule": "every day"}, r"schedules\.0\.schedule: 'every day' is not a five-field"),
        ({"time_zone": "Mars/Olympus"}, r"schedules\.0\.time_zone: 'Mars/Olympus' is not an IANA"),
        ({"request": {"dataset": "iris", "rows": 3}}, r"schedules\.0: request is not a valid"),
        ({"request": {"inline": {"csv": "a\n1\n"}}}, r"schedules\.0: request\.dataset is required"),
        ({"request": {"dataset": "iris"}}, r"schedules\.0: request needs a source"),
        ({"request": None, "request_file": "nope.json"}, r"schedules\.0: request_file .*nope"),
        ({"request_file": "x.json"}, r"give request or request_file, not both"),
        ({"cron": "0 3 * * *"}, r"schedules\.0\.cron: unknown key"),
    ],
)
def test_a_wrong_schedule_is_refused_naming_the_key(
    tmp_path: Path, edit: dict[str, object], message: str
) -> None:
    schedule = {k: v for k, v in {**SCHEDULE, **edit}.items() if v is not None}
    folder = write_env(tmp_path, schedules=[schedule])

    with pytest.raises(infra.InfraError, match=message):
        infra.load_environment("qa", folder)


def test_schedule_names_are_unique(tmp_path: Path) -> None:
    folder = write_env(tmp_path, schedules=[SCHEDULE, SCHEDULE])

    with pytest.raises(infra.InfraError, match="name 'nightly' is used twice"):
        infra.load_environment("qa", folder)


def test_a_request_file_is_read_relative_to_the_environment_file(tmp_path: Path) -> None:
    (tmp_path / "nightly.json").write_text(json.dumps(SCHEDULE["request"]))
    schedule = {**SCHEDULE, "request": None, "request_file": "nightly.json"}
    folder = write_env(tmp_path, schedules=[{k: v for k, v in schedule.items() if v}])

    env = infra.load_environment("qa", folder)

    assert env.schedules[0].ingest_request().inline.csv == "a,b\n1,2\n"


def test_an_unknown_environment_lists_the_known_ones() -> None:
    with pytest.raises(infra.InfraError, match="known: dev, local, prod, staging"):
        infra.load_environment("qa", ENVIRONMENTS)


def test_the_bikeshare_nightly_lands_the_bikeshare_example_locally_and_on_gcp() -> None:
    request = json.loads((REPO / "infra/schedules/bikeshare-nightly.json").read_text())
    local = infra.load_environment("local", ENVIRONMENTS)
    dev = infra.load_environment("dev", ENVIRONMENTS)

    assert request["dataset"] == "bikeshare"
    assert request["inline"]["csv"] == (REPO / "examples/bikeshare/bikeshare.csv").read_text()
    for env in (local, dev):
        (nightly,) = [s for s in env.schedules if s.name == "bikeshare-nightly"]
        assert nightly.kind == "ingest" and nightly.ingest_request().dataset == "bikeshare"
    # Cloud Scheduler takes a job of at most 1 MB, its payload included.
    target = infra.resolve(dev, "dev", project="acme-ml-dev", project_number=1)
    (job,) = [infra.scheduler_job(target, s) for s in target.schedules if "bikeshare" in s.name]
    assert len(scheduler_v1.Job.serialize(job)) < 1_000_000
