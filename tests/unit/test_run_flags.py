"""`mlpipe infra run-flags`: the `gcloud run deploy --flags-file` of one service, from
infra/runtime.yaml and the environment file, and the one environment a service gets.
(tests/integration/test_run_deploy.py deploys the same file with the real gcloud.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mlpipe.messaging.topology import TOPOLOGY
from mlpipe_ops import infra, service_runtime
from mlpipe_ops.cli import app

REPO = Path(__file__).resolve().parents[2]
ENVIRONMENTS = REPO / "infra" / "environments"
NUMBER = 123456789012
IMAGE = "us-central1-docker.pkg.dev/mlpipe-dev/mlpipe/trainer:0123456"
SHA = "0123456789abcdef0123456789abcdef01234567"


def run_flags(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["infra", "run-flags", *args])
    return result.exit_code, result.output


def test_the_trainer_flags_for_dev(tmp_path: Path) -> None:
    output = tmp_path / "run-flags.yaml"

    code, said = run_flags(
        "trainer",
        "--env",
        "dev",
        "--project-number",
        str(NUMBER),
        "--image",
        IMAGE,
        "--code-version",
        SHA,
        "--output",
        str(output),
    )

    assert code == 0, said
    text = output.read_text()
    assert text.startswith("# gcloud run deploy mlpipe-trainer --flags-file=FILE\n")
    # Flags without a value are written as `gcloud topic flags-file` shows them.
    assert "\n--no-allow-unauthenticated:\n" in text
    assert "\n--no-cpu-throttling:\n" in text
    assert yaml.safe_load(text) == {
        "--project": "mlpipe-dev",
        "--region": "us-central1",
        "--image": IMAGE,
        "--service-account": "mlpipe-trainer@mlpipe-dev.iam.gserviceaccount.com",
        "--no-allow-unauthenticated": None,
        "--execution-environment": "gen2",
        # infra/runtime.yaml: defaults, then services.trainer
        "--memory": "2Gi",
        "--cpu": "2",
        "--concurrency": 20,
        "--timeout": "300s",
        "--min-instances": 0,
        "--max-instances": 10,
        "--no-cpu-throttling": None,
        "--set-env-vars": {
            "MLPIPE_PROJECT": "mlpipe-dev",
            "MLPIPE_BUCKET": "mlpipe-dev-mlpipe",
            "MLPIPE_CODE_VERSION": SHA,
            "MLPIPE_ENV": "dev",
            "MLPIPE_PUSH_AUTH": "oidc",
            "MLPIPE_PUSH_AUDIENCE": f"https://mlpipe-trainer-{NUMBER}.us-central1.run.app",
            "MLPIPE_PUSH_SERVICE_ACCOUNT": "mlpipe-push-trainer@mlpipe-dev.iam.gserviceaccount.com",
            "MLPIPE_TRAINER_IMAGE": IMAGE,
            "MLPIPE_VERTEX_SERVICE_ACCOUNT": "mlpipe-trainer@mlpipe-dev.iam.gserviceaccount.com",
        },
    }


def test_a_service_with_request_only_cpu_is_throttled_and_gets_no_trainer_image() -> None:
    code, said = run_flags(
        "ingest", "--env", "dev", "--project-number", "1", "--image", "img", "--code-version", "c"
    )

    assert code == 0, said
    flags = yaml.safe_load(said)
    assert "--cpu-throttling" in flags and "--no-cpu-throttling" not in flags
    assert flags["--memory"] == "1Gi"
    assert "MLPIPE_TRAINER_IMAGE" not in flags["--set-env-vars"]


def test_prod_keeps_one_predictor_warm() -> None:
    code, said = run_flags(
        "predictor", "--env", "prod", "--project-number", "1", "--image", "i", "--code-version", "c"
    )

    assert code == 0, said
    assert yaml.safe_load(said)["--min-instances"] == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["trainer", "--env", "local"], "Cloud Run flags need a gcp environment"),
        (["scorer", "--env", "dev", "--project-number", "1"], "'scorer' is not a service"),
        (["trainer", "--env", "dev"], "project_number is not set"),
        (["trainer", "--env", "qa"], "no environment 'qa'"),
    ],
)
def test_run_flags_explains_what_is_wrong(args: list[str], message: str) -> None:
    code, said = run_flags(*args, "--image", "img", "--code-version", "c")

    assert code == 1
    assert message in said


def dev_with(**push_accounts: str) -> infra.Target:
    env = infra.load_environment("dev", ENVIRONMENTS)
    subscriptions = {
        **env.subscriptions,
        **{n: infra.SubscriptionSettings(push_service_account=a) for n, a in push_accounts.items()},
    }
    env = env.model_copy(update={"subscriptions": subscriptions})
    return infra.resolve(env, "dev", project="acme-ml", project_number=NUMBER)


def test_a_service_pushed_to_by_two_identities_is_refused() -> None:
    # The trainer checks one MLPIPE_PUSH_SERVICE_ACCOUNT (mlpipe.runtime.auth.PushVerifier).
    target = dev_with(**{"trainer-landed-push": "other@acme-ml.iam.gserviceaccount.com"})
    runtime = service_runtime.load_runtimes("dev", REPO / "infra" / "runtime.yaml")["trainer"]

    with pytest.raises(infra.InfraError) as caught:
        service_runtime.service_environment(target, "trainer", runtime, code_version="c")

    assert "trainer-push as mlpipe-push-trainer@acme-ml" in str(caught.value)
    assert "trainer-landed-push as other@acme-ml" in str(caught.value)
    assert "give them the same push_service_account" in str(caught.value)


def test_every_push_identity_of_a_service_is_the_one_it_checks() -> None:
    target = dev_with()
    runtimes = service_runtime.load_runtimes("dev", REPO / "infra" / "runtime.yaml")

    for service in TOPOLOGY.services:
        env = service_runtime.service_environment(
            target, service, runtimes[service], code_version="c"
        )
        routes = [r for r in target.routes if r.subscription.service == service]
        assert routes and {(r.service_url, r.service_account) for r in routes} == {
            (env["MLPIPE_PUSH_AUDIENCE"], env["MLPIPE_PUSH_SERVICE_ACCOUNT"])
        }, service


def test_on_gcp_the_trainers_vertex_jobs_run_as_the_trainer() -> None:
    target = dev_with()
    runtime = service_runtime.load_runtimes("dev", REPO / "infra" / "runtime.yaml")["trainer"]

    env = service_runtime.service_environment(target, "trainer", runtime, code_version="c")

    assert env["MLPIPE_VERTEX_SERVICE_ACCOUNT"] == target.runtime_accounts["trainer"]
    assert env["MLPIPE_VERTEX_SERVICE_ACCOUNT"].startswith("mlpipe-trainer@")


def test_on_the_emulators_a_service_takes_unauthenticated_pushes() -> None:
    env = infra.load_environment("local", ENVIRONMENTS)
    target = infra.resolve(
        env,
        "local",
        project="mlpipe-local",
        bucket="b",
        ports=dict.fromkeys(TOPOLOGY.services, 18600),
    )
    runtime = service_runtime.load_runtimes("local", REPO / "infra" / "runtime.yaml")["trainer"]

    assert service_runtime.service_environment(
        target, "trainer", runtime, code_version="dev", image="mlpipe-trainer:dev"
    ) == {
        "MLPIPE_PROJECT": "mlpipe-local",
        "MLPIPE_BUCKET": "b",
        "MLPIPE_CODE_VERSION": "dev",
        "MLPIPE_ENV": "local",
        "MLPIPE_PUSH_AUTH": "none",
        "MLPIPE_TRAINER_IMAGE": "mlpipe-trainer:dev",
        # runtime.yaml's local lease, inside the emulator's ~100 s of redelivery.
        "MLPIPE_TRAINING_LEASE_SECONDS": "30",
    }


def test_runtime_env_is_added_last(tmp_path: Path) -> None:
    path = tmp_path / "runtime.yaml"
    raw = yaml.safe_load((REPO / "infra" / "runtime.yaml").read_text())
    raw["services"]["evaluator"]["env"] = {"MLPIPE_LOG_LEVEL": "DEBUG"}
    path.write_text(yaml.safe_dump(raw))
    runtime = service_runtime.load_runtimes("dev", path)["evaluator"]

    env = service_runtime.service_environment(dev_with(), "evaluator", runtime, code_version="c")

    assert env["MLPIPE_LOG_LEVEL"] == "DEBUG"
    assert env["MLPIPE_ENV"] == "dev"


def test_runtime_env_cannot_set_what_the_environment_file_decides(tmp_path: Path) -> None:
    path = tmp_path / "runtime.yaml"
    raw = yaml.safe_load((REPO / "infra" / "runtime.yaml").read_text())
    raw["services"]["ingest"]["env"] = {"MLPIPE_BUCKET": "elsewhere"}
    path.write_text(yaml.safe_dump(raw))

    with pytest.raises(service_runtime.RuntimeDefinitionError, match=r"ingest\.env"):
        service_runtime.load_runtimes("dev", path)


def test_runtime_changes_name_only_known_environments() -> None:
    raw = yaml.safe_load((REPO / "infra" / "runtime.yaml").read_text())
    known = {p.stem for p in ENVIRONMENTS.glob("*.yaml")}

    assert set(raw.get("environments") or {}) <= known


@pytest.mark.parametrize("command", ["plan", "apply", "run-flags"])
def test_an_invalid_runtime_definition_stops_infra_before_any_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    environments = tmp_path / "environments"
    environments.mkdir()
    (environments / "dev.yaml").write_text((ENVIRONMENTS / "dev.yaml").read_text())
    (tmp_path / "schedules").mkdir()
    (tmp_path / "schedules" / "iris-smoke.json").write_text(
        (REPO / "infra" / "schedules" / "iris-smoke.json").read_text()
    )
    raw = yaml.safe_load((REPO / "infra" / "runtime.yaml").read_text())
    raw["services"]["trainer"]["memory"] = "64Gi"
    (tmp_path / "runtime.yaml").write_text(yaml.safe_dump(raw))
    service = ["trainer"] if command == "run-flags" else []
    extra = ["--image", "i", "--code-version", "c"] if command == "run-flags" else []

    result = CliRunner().invoke(
        app,
        [
            "infra",
            command,
            *service,
            "--env",
            "dev",
            "--project-number",
            "1",
            *extra,
            "--environments-dir",
            str(environments),
        ],
    )

    assert result.exit_code == 1
    assert "trainer.memory: 64Gi: Cloud Run allows 512Mi to 32Gi" in result.output
