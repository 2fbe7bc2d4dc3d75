"""infra/bootstrap.sh agrees with the environment files and the Cloud Build template and
triggers (the names of service accounts, services and the bucket; the substitutions), justifies
every role it grants, and the `mlpipe infra` commands explain what is wrong before touching
anything."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mlpipe.messaging.topology import TOPOLOGY
from mlpipe_ops import infra
from mlpipe_ops.cli import app

REPO = Path(__file__).resolve().parents[2]
BOOTSTRAP = REPO / "infra" / "bootstrap.sh"
SCRIPT = BOOTSTRAP.read_text()


def test_bootstrap_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(BOOTSTRAP)], check=True)


def test_every_role_granted_is_justified_by_a_comment() -> None:
    lines = SCRIPT.splitlines()
    grants = [i for i, ln in enumerate(lines) if "roles/" in ln and not ln.lstrip().startswith("#")]
    unjustified = []
    for i in grants:
        above = i - 1
        while lines[above].rstrip().endswith("\\") or lines[above].lstrip().startswith("for "):
            above -= 1  # the command's first line, then what encloses it
        if not lines[above].lstrip().startswith("#"):
            unjustified.append(lines[i].strip())

    assert len(grants) >= 10
    assert unjustified == []


def test_bootstrap_creates_the_accounts_the_environments_name() -> None:
    services = re.search(r"^SERVICES=\((.*)\)$", SCRIPT, re.M)
    assert services is not None
    assert tuple(services.group(1).split()) == TOPOLOGY.deployed
    assert 'ensure_sa "mlpipe-$s"' in SCRIPT and 'ensure_sa "mlpipe-push-$s"' in SCRIPT
    for name in ("dev", "staging", "prod"):
        env = infra.load_environment(name, REPO / "infra" / "environments")
        target = infra.resolve(env, name, project="acme-ml", project_number=1)
        for route in target.routes:
            service = route.subscription.service
            assert route.service_account == f"mlpipe-push-{service}@acme-ml.iam.gserviceaccount.com"
            assert route.cloud_run_service.endswith(f"/services/mlpipe-{service}")
        assert target.bucket == "acme-ml-mlpipe"  # bootstrap's BUCKET="${PROJECT}-mlpipe"
        assert target.runtime_accounts == {
            s: f"mlpipe-{s}@acme-ml.iam.gserviceaccount.com" for s in TOPOLOGY.deployed
        }


def test_cloud_build_deploys_the_services_the_environments_name() -> None:
    build = yaml.safe_load((REPO / "cloudbuild" / "service.yaml").read_text())
    script = next(s for s in build["steps"] if s["id"] == "deploy")["args"][-1]

    # _DEPLOY=direct deploys the service; _DEPLOY=release releases it through its pipeline.
    assert "gcloud run deploy mlpipe-${_SERVICE} " in script
    assert "--delivery-pipeline=mlpipe-${_SERVICE} " in script
    for name in ("dev", "staging", "prod"):
        env = infra.load_environment(name, REPO / "infra" / "environments")
        target = infra.resolve(env, name, project="acme-ml", project_number=1)
        assert target.run_services == {
            s: f"projects/acme-ml/locations/{target.region}/services/mlpipe-{s}"
            for s in TOPOLOGY.deployed
        }


@pytest.mark.parametrize("service", TOPOLOGY.deployed)
def test_bootstrap_imports_each_trigger_with_the_environment_substitutions(service: str) -> None:
    """The trigger file as bootstrap writes it: the committed one, then its heredoc."""
    appended = re.search(r'cat >>"\$triggers/\$s.yaml" <<EOF\n(.*?)\nEOF\n', SCRIPT, re.S)
    assert appended is not None
    values = {
        "DEPLOY": "release",
        "ENV": "staging",
        "REGION": "us-central1",
        "REPOSITORY": "mlpipe",
        "PROJECT": "acme-ml",
        "BUILD_SA": "mlpipe-build@acme-ml.iam.gserviceaccount.com",
    }
    text = (REPO / "cloudbuild" / "triggers" / f"{service}.yaml").read_text()
    text += re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], appended.group(1)) + "\n"

    trigger = yaml.safe_load(text)

    assert trigger["substitutions"] == {
        "_SERVICE": service,
        "_DEPLOY": "release",
        "_ENV": "staging",
        "_REGION": "us-central1",
        "_REPOSITORY": "mlpipe",
    }
    assert trigger["serviceAccount"] == (
        "projects/acme-ml/serviceAccounts/mlpipe-build@acme-ml.iam.gserviceaccount.com"
    )
    assert trigger["filename"] == "cloudbuild/service.yaml"


def test_infra_is_a_command_group() -> None:
    result = CliRunner().invoke(app, ["infra", "--help"])

    assert result.exit_code == 0
    assert "plan" in result.output and "apply" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--env", "qa"], "no environment 'qa'"),
        (["--env", "local", "--state-dir", "/nonexistent"], "start it with `mlpipe up`"),
        (["--env", "dev"], "project_number is not set"),
        (["--env", "dev", "--project", "other-proj"], "pass its --project-number too"),
    ],
)
def test_plan_explains_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)

    result = CliRunner().invoke(app, ["infra", "plan", *args])

    assert result.exit_code == 1
    assert message in result.output


def _bootstrap_deploy_target(env: str) -> str:
    """What bootstrap's DEPLOY_TARGET line reads from an environment file."""
    line = next(ln for ln in SCRIPT.splitlines() if ln.startswith("DEPLOY_TARGET="))
    command = line.removeprefix("DEPLOY_TARGET=").strip('"').removeprefix("$(").removesuffix(")")
    result = subprocess.run(
        ["bash", "-c", command.replace("$ENV", env)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


@pytest.mark.parametrize("name", ["dev", "staging", "prod"])
def test_bootstrap_reads_the_deploy_target_the_environment_file_names(name: str) -> None:
    env = infra.load_environment(name, REPO / "infra" / "environments")

    assert _bootstrap_deploy_target(name) == env.deploy_target


def _block(condition: str) -> str:
    """The lines of bootstrap's `if [[ "$DEPLOY_TARGET" == X ]]` blocks, joined."""
    lines = SCRIPT.splitlines()
    out = []
    for i, line in enumerate(lines):
        if line.startswith(f'if [[ "$DEPLOY_TARGET" == {condition} ]]'):
            for inner in lines[i:]:
                out.append(inner)
                if inner == "fi" or inner.endswith("; fi"):
                    break
    return "\n".join(out)


def test_the_deployer_gets_the_roles_its_target_needs_and_no_others() -> None:
    cloud_run, vertex = _block("cloud_run"), _block("vertex")
    deployer = '--member="serviceAccount:$(sa mlpipe-deployer)"'

    # Cloud Run: actAs on the predictor's runtime account (run.developer on the service is
    # infra apply's, tested with iam_bindings).
    assert 'add-iam-policy-binding "$(sa mlpipe-predictor)"' in cloud_run
    assert deployer in cloud_run and "roles/iam.serviceAccountUser" in cloud_run
    assert "roles/aiplatform.user" not in cloud_run
    # Vertex AI: upload and deploy, and actAs on the serving account it deploys with.
    assert (
        "roles/aiplatform.user" in vertex
        and 'add-iam-policy-binding "$(sa mlpipe-serving)"' in vertex
    )
    assert "ensure_sa mlpipe-serving" in vertex
    # The serving account reads the registry only.
    assert (
        'bucket_role "$(sa mlpipe-serving)" roles/storage.objectViewer --condition="$REGISTRY_ONLY"'
        in vertex
    )


def test_the_serving_account_is_the_one_the_environment_files_name() -> None:
    for name in ("dev", "staging", "prod"):
        env = infra.load_environment(name, REPO / "infra" / "environments")
        target = infra.resolve(env, name, project="acme-ml", project_number=1)
        # bootstrap: sa mlpipe-serving
        assert target.serving_account == "mlpipe-serving@acme-ml.iam.gserviceaccount.com"


def test_the_predictor_may_rewrite_registry_objects_only() -> None:
    from mlpipe.store import layout

    condition = re.search(r'^REGISTRY_ONLY="(.*)"$', SCRIPT, re.M)
    assert condition is not None
    expression = condition.group(1).split(",title=")[0]
    # Cloud Storage names objects projects/_/buckets/BUCKET/objects/NAME in IAM conditions.
    assert expression == (
        "expression=resource.name.startsWith('projects/_/buckets/${BUCKET}/objects/"
        f"{layout.REGISTRY}')"
    )
    grants = [ln for ln in SCRIPT.splitlines() if 'bucket_role "$(sa mlpipe-predictor)"' in ln]
    # Read everywhere, create quarantine and prediction objects, delete/overwrite in registry/,
    # and, for its batch jobs, in predictions/ and dataflow/.
    assert grants == [
        'bucket_role "$(sa mlpipe-predictor)" roles/storage.objectViewer',
        'bucket_role "$(sa mlpipe-predictor)" roles/storage.objectCreator',
        'bucket_role "$(sa mlpipe-predictor)" roles/storage.objectUser '
        '--condition="$REGISTRY_ONLY"',
        'bucket_role "$(sa mlpipe-predictor)" roles/storage.objectUser '
        '--condition="$PREDICTIONS_ONLY"',
        'bucket_role "$(sa mlpipe-predictor)" roles/storage.objectUser '
        '--condition="$DATAFLOW_ONLY"',
    ]
    for name, prefix in (("PREDICTIONS_ONLY", layout.PREDICTIONS), ("DATAFLOW_ONLY", "dataflow/")):
        found = re.search(rf'^{name}="(.*)"$', SCRIPT, re.M)
        assert found is not None
        assert found.group(1).split(",title=")[0] == (
            f"expression=resource.name.startsWith('projects/_/buckets/${{BUCKET}}/objects/{prefix}')"
        )


def test_bootstrap_imports_the_batch_jobs_trigger_with_its_bucket_and_launcher() -> None:
    """The batch trigger as bootstrap writes it: the committed one with its empty substitutions
    opened, then its heredoc; every substitution jobs/batch/cloudbuild.yaml declares is set."""
    appended = re.search(r'cat >>"\$triggers/batch.yaml" <<EOF\n(.*?)\nEOF\n', SCRIPT, re.S)
    assert appended is not None
    launcher = "gcr.io/dataflow-templates-base/python311-template-launcher-base:latest"
    values = {
        "BUCKET": "acme-ml-mlpipe",
        f"BATCH_LAUNCHER_IMAGE:-{launcher}": launcher,
        "REGION": "us-central1",
        "REPOSITORY": "mlpipe",
        "PROJECT": "acme-ml",
        "BUILD_SA": "mlpipe-build@acme-ml.iam.gserviceaccount.com",
    }
    text = (REPO / "cloudbuild" / "triggers" / "batch.yaml").read_text()
    text = text.replace("substitutions: {}", "substitutions:")
    text += re.sub(r"\$\{([^}]+)\}", lambda m: values[m.group(1)], appended.group(1)) + "\n"

    trigger = yaml.safe_load(text)
    build = yaml.safe_load((REPO / "jobs" / "batch" / "cloudbuild.yaml").read_text())

    assert set(trigger["substitutions"]) == set(build["substitutions"])
    assert trigger["substitutions"]["_BUCKET"] == "acme-ml-mlpipe"
    assert trigger["substitutions"]["_LAUNCHER_IMAGE"] == launcher
    assert trigger["filename"] == "jobs/batch/cloudbuild.yaml"
    assert "serviceAccount" in trigger
