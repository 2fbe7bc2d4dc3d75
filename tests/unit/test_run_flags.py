"""`mlpipe infra run-flags`: the `gcloud run deploy --flags-file` of one service, from
infra/runtime.yaml and the environment file, and the one environment a service gets.
(tests/integration/test_run_deploy.py deploys the same file with the real gcloud.)"""

from __future__ import annotations

import json
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
            "MLPIPE_TRACE_EXPORTER": "cloud-trace",
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


def test_on_gcp_batch_jobs_run_on_dataflow_as_the_predictor_from_the_builds_template(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target = dev_with()
    runtime = service_runtime.load_runtimes("dev", REPO / "infra" / "runtime.yaml")["predictor"]

    env = service_runtime.service_environment(target, "predictor", runtime, code_version="c1")

    assert env["MLPIPE_BATCH_LAUNCHER"] == "dataflow"
    assert env["MLPIPE_REGION"] == target.region
    assert env["MLPIPE_BATCH_DATAFLOW_SERVICE_ACCOUNT"] == target.runtime_accounts["predictor"]
    assert env["MLPIPE_BATCH_DATAFLOW_TEMPLATE"] == (
        f"gs://{target.bucket}/dataflow/templates/batch-c1.json"
    )
    assert env["MLPIPE_BATCH_DATAFLOW_TEMP_LOCATION"] == f"gs://{target.bucket}/dataflow/temp"
    # The workers are runtime.yaml's.
    assert env["MLPIPE_BATCH_DATAFLOW_MACHINE_TYPE"] == "n2-standard-4"
    assert env["MLPIPE_BATCH_DATAFLOW_MAX_WORKERS"] == "20"
    # What it renders is what the predictor's settings accept.
    from mlpipe_predictor.settings import PredictorSettings

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = PredictorSettings()
    assert settings.batch_launcher == "dataflow" and settings.batch_dataflow_max_workers == 20


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
    for schedule in ("iris-smoke.json", "bikeshare-nightly.json"):
        (tmp_path / "schedules" / schedule).write_text(
            (REPO / "infra" / "schedules" / schedule).read_text()
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


def test_the_console_is_a_private_service_that_iap_identifies_users_of() -> None:
    code, said = run_flags(
        "console",
        "--env",
        "dev",
        "--project-number",
        str(NUMBER),
        "--image",
        "i",
        "--code-version",
        "c",
    )

    assert code == 0, said
    flags = yaml.safe_load(said)
    assert "--no-allow-unauthenticated" in flags
    assert flags["--service-account"] == "mlpipe-console@mlpipe-dev.iam.gserviceaccount.com"
    assert flags["--max-instances"] == 2  # infra/runtime.yaml's console
    env = flags["--set-env-vars"]
    # The run page's cost estimate: infra/prices.yaml as it is, and every service's size.
    assert json.loads(env.pop("MLPIPE_PRICES")) == yaml.safe_load(
        (REPO / "infra" / "prices.yaml").read_text()
    )
    assert json.loads(env.pop("MLPIPE_COST_SIZES")) == {
        "console": {"cpu": 1, "memory_gib": 0.5, "cpu_always_allocated": False},
        "deployer": {"cpu": 1, "memory_gib": 1, "cpu_always_allocated": True},
        "evaluator": {"cpu": 1, "memory_gib": 1, "cpu_always_allocated": False},
        "ingest": {"cpu": 1, "memory_gib": 1, "cpu_always_allocated": False},
        "notifier": {"cpu": 1, "memory_gib": 0.5, "cpu_always_allocated": False},
        "predictor": {"cpu": 1, "memory_gib": 1, "cpu_always_allocated": True},
        "trainer": {"cpu": 2, "memory_gib": 2, "cpu_always_allocated": True},
    }
    assert env == {
        "MLPIPE_PROJECT": "mlpipe-dev",
        "MLPIPE_BUCKET": "mlpipe-dev-mlpipe",
        "MLPIPE_CODE_VERSION": "c",
        "MLPIPE_ENV": "dev",
        "MLPIPE_TRACE_EXPORTER": "cloud-trace",
        # No push reaches it: no push identity to check, IAP's signed header names the user.
        "MLPIPE_CONSOLE_AUTH": "iap",
        "MLPIPE_CONSOLE_AUDIENCE": f"https://mlpipe-console-{NUMBER}.us-central1.run.app",
        "MLPIPE_CONSOLE_IAP_AUDIENCE": f"/projects/{NUMBER}/locations/us-central1/services/"
        "mlpipe-console",
        "MLPIPE_DEPLOYER_URL": f"https://mlpipe-deployer-{NUMBER}.us-central1.run.app",
    }


def test_on_the_emulators_the_console_lets_the_local_user_act() -> None:
    env = infra.load_environment("local", ENVIRONMENTS)
    ports = {**dict.fromkeys(TOPOLOGY.services, 18600), "deployer": 18604}
    target = infra.resolve(env, "local", project="mlpipe-local", bucket="b", ports=ports)
    runtime = service_runtime.load_runtimes("local", REPO / "infra" / "runtime.yaml")["console"]

    found = service_runtime.service_environment(target, "console", runtime, code_version="dev")

    assert found["MLPIPE_CONSOLE_AUTH"] == "local"
    assert found["MLPIPE_DEPLOYER_URL"] == "http://127.0.0.1:18604"
    assert "MLPIPE_PUSH_AUTH" not in found


def test_the_notifier_links_to_the_console_and_checks_its_own_push_identity() -> None:
    runtime = service_runtime.load_runtimes("dev", REPO / "infra" / "runtime.yaml")["notifier"]

    env = service_runtime.service_environment(dev_with(), "notifier", runtime, code_version="c")

    assert env["MLPIPE_CONSOLE_URL"] == f"https://mlpipe-console-{NUMBER}.us-central1.run.app"
    assert env["MLPIPE_PUSH_AUDIENCE"] == f"https://mlpipe-notifier-{NUMBER}.us-central1.run.app"
    assert (
        env["MLPIPE_PUSH_SERVICE_ACCOUNT"] == "mlpipe-push-notifier@acme-ml.iam.gserviceaccount.com"
    )
    # No channel in the repository: their URLs and secrets are Secret Manager's (below).
    assert "MLPIPE_NOTIFY_CHANNELS" not in env
    assert runtime.max_instances == 3


def with_secrets(
    tmp_path: Path, secrets: dict[str, str], env: dict[str, str] | None = None
) -> Path:
    path = tmp_path / "runtime.yaml"
    raw = yaml.safe_load((REPO / "infra" / "runtime.yaml").read_text())
    raw["environments"].setdefault("dev", {})["notifier"] = {
        "secrets": secrets,
        **({"env": env} if env else {}),
    }
    path.write_text(yaml.safe_dump(raw))
    return path


def test_secrets_are_mounted_by_both_deploy_forms(tmp_path: Path) -> None:
    from mlpipe_ops import release

    secrets = {
        "MLPIPE_NOTIFY_CHANNELS": "mlpipe-notify-channels:3",
        "MLPIPE_AUDIT_HOOK_SECRET": "mlpipe-audit-hook-secret:latest",
    }
    runtime = service_runtime.load_runtimes("dev", with_secrets(tmp_path, secrets))["notifier"]
    revision = service_runtime.cloud_run_revision(
        dev_with(), "notifier", runtime, image=IMAGE, code_version="c"
    )

    flags = service_runtime.run_deploy_flags(
        dev_with(), "notifier", runtime, image=IMAGE, code_version="c"
    )
    manifest = release.service_manifest(revision, image="notifier-image")

    assert flags["--set-secrets"] == secrets
    assert not set(secrets) & set(flags["--set-env-vars"])
    env = manifest["spec"]["template"]["spec"]["containers"][0]["env"]
    assert sorted((e for e in env if "valueFrom" in e), key=lambda e: e["name"], reverse=True) == [
        {
            "name": "MLPIPE_NOTIFY_CHANNELS",
            "valueFrom": {"secretKeyRef": {"name": "mlpipe-notify-channels", "key": "3"}},
        },
        {
            "name": "MLPIPE_AUDIT_HOOK_SECRET",
            "valueFrom": {"secretKeyRef": {"name": "mlpipe-audit-hook-secret", "key": "latest"}},
        },
    ]
    # Only a service that names secrets gets the flag (it replaces every mounted secret).
    trainer = service_runtime.load_runtimes("dev", REPO / "infra" / "runtime.yaml")["trainer"]
    assert "--set-secrets" not in service_runtime.run_deploy_flags(
        dev_with(), "trainer", trainer, image=IMAGE, code_version="c"
    )


@pytest.mark.parametrize(
    ("secrets", "env", "message"),
    [
        (
            {"MLPIPE_X": "mlpipe-x"},
            None,
            r"notifier\.secrets: MLPIPE_X: 'mlpipe-x' is not <secret>:<version>",
        ),
        ({"MLPIPE_X": "a/b:1"}, None, "is not <secret>:<version>"),
        ({"1X": "a:1"}, None, "'1X' is not a variable name"),
        ({"PORT": "a:1"}, None, "PORT is set by Cloud Run itself"),
        ({"MLPIPE_BUCKET": "a:1"}, None, "MLPIPE_BUCKET comes from the environment file"),
        ({"MLPIPE_X": "a:1"}, {"MLPIPE_X": "v"}, "MLPIPE_X is in both env and secrets"),
    ],
)
def test_a_wrong_secret_is_named(
    tmp_path: Path, secrets: dict[str, str], env: dict[str, str] | None, message: str
) -> None:
    with pytest.raises(service_runtime.RuntimeDefinitionError, match=message):
        service_runtime.load_runtimes("dev", with_secrets(tmp_path, secrets, env))
