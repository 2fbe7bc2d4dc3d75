"""The flags `mlpipe infra run-flags` renders, deployed by the real `gcloud run deploy
--flags-file` against the local Cloud Run Admin API on 127.0.0.1 (its v1 surface,
mlpipe_ops.standins.cloud_run_v1, reached through gcloud's proxy setting): the Service that
gcloud sends is what infra/runtime.yaml and the environment file say. Anything else (an HTTPS
CONNECT to a real Google host) is refused and fails the test.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from google.auth.credentials import AnonymousCredentials
from google.cloud import run_v2
from typer.testing import CliRunner

from mlpipe.runtime.auth import push_verifier
from mlpipe.runtime.settings import CommonSettings, load_settings
from mlpipe.store.registry import ModelVersion, Traffic
from mlpipe_deployer.targets.cloud_run import CloudRunTarget
from mlpipe_ops import infra, service_runtime
from mlpipe_ops.cli import app
from mlpipe_ops.standins.cloud_run import CloudRunStandIn
from mlpipe_ops.standins.cloud_run_v1 import RUN_HOST, GcloudSurface, etag
from tests.conftest import REPO

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("gcloud") is None, reason="the gcloud CLI is not installed"),
]

PROJECT = "acme-ml-dev"
NUMBER = 123456789012
REGION = "us-central1"
SHA = "0123456789abcdef0123456789abcdef01234567"
KNATIVE = "/apis/serving.knative.dev/v1/namespaces/"


@dataclass
class Deployed:
    stand_in: CloudRunStandIn

    @property
    def gcloud(self) -> GcloudSurface:
        return self.stand_in.gcloud

    def services(self) -> run_v2.ServicesClient:
        return run_v2.ServicesClient(
            transport="rest",
            client_options=self.stand_in.client_options(),
            credentials=AnonymousCredentials(),
        )

    def service(self, name: str) -> run_v2.Service:
        return self.services().get_service(
            name=f"projects/{PROJECT}/locations/{REGION}/services/{name}"
        )


@pytest.fixture
def cloud_run() -> Iterator[Deployed]:
    stand_in = CloudRunStandIn(PROJECT, project_number=str(NUMBER), operation_seconds=0.5)
    yield Deployed(stand_in.start())
    stand_in.stop()


def render_flags(service: str, env: str, code_version: str, output: Path) -> str:
    image = f"{REGION}-docker.pkg.dev/{PROJECT}/mlpipe/{service}:{code_version[:7]}"
    result = CliRunner().invoke(
        app,
        [
            "infra",
            "run-flags",
            service,
            "--env",
            env,
            "--project",
            PROJECT,
            "--project-number",
            str(NUMBER),
            "--image",
            image,
            "--code-version",
            code_version,
            "--output",
            str(output),
        ],
    )
    assert result.exit_code == 0, result.output
    return image


def deploy_args(service: str, flags: Path) -> list[str]:
    """The deploy step's gcloud arguments in cloudbuild/service.yaml with _DEPLOY=direct, as
    Cloud Build runs them."""
    build = yaml.safe_load((REPO / "cloudbuild" / "service.yaml").read_text())
    step = next(s for s in build["steps"] if s["id"] == "deploy")
    assert step["entrypoint"] == "bash"
    lines = [ln.strip() for ln in step["args"][-1].replace("\\\n", " ").splitlines()]
    direct = lines[lines.index("direct)") + 1]
    words = shlex.split(direct)
    assert words[0] == "gcloud"
    return [
        a.replace("${_SERVICE}", service).replace("/workspace/run-flags.yaml", str(flags))
        for a in words[1:]
    ]


def gcloud_deploy(cloud_run: Deployed, service: str, flags: Path, config: Path) -> str:
    """The deploy step of cloudbuild/service.yaml, pointed at the stand-in."""
    env = {**os.environ, "CLOUDSDK_CONFIG": str(config), **cloud_run.gcloud.gcloud_env()}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "NO_PROXY", "no_proxy"):
        env.pop(name, None)
    result = subprocess.run(
        ["gcloud", *deploy_args(service, flags)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not [r for r in cloud_run.gcloud.seen if r.method == "CONNECT"], "gcloud left"
    # A failed IAM update is only a warning to gcloud (the deploy still succeeds).
    assert "Completed with warnings" not in result.stderr, result.stderr
    return result.stderr


def definition(service: str, env: str) -> tuple[service_runtime.ServiceRuntime, infra.Target]:
    runtime = service_runtime.load_runtimes(env, REPO / "infra" / "runtime.yaml")[service]
    environment = infra.load_environment(env, REPO / "infra" / "environments")
    return runtime, infra.resolve(environment, env, project=PROJECT, project_number=NUMBER)


@pytest.mark.parametrize(
    ("service", "env"), [("trainer", "dev"), ("predictor", "prod"), ("deployer", "staging")]
)
def test_gcloud_deploys_the_runtime_definition(
    cloud_run: Deployed,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    service: str,
    env: str,
) -> None:
    flags = tmp_path / "run-flags.yaml"
    image = render_flags(service, env, SHA, flags)

    output = gcloud_deploy(cloud_run, service, flags, tmp_path / "gcloud")

    created = cloud_run.gcloud.sent("POST")
    assert len(created) == 1, [(r.method, r.path) for r in cloud_run.gcloud.seen]
    sent = created[0].body
    runtime, target = definition(service, env)
    template = sent["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    container = template["spec"]["containers"][0]
    assert created[0].path == f"{KNATIVE}{PROJECT}/services"
    assert sent["metadata"]["name"] == f"mlpipe-{service}"
    assert container["image"] == image
    assert container["resources"]["limits"] == {
        "memory": runtime.memory,
        "cpu": f"{runtime.cpu:g}",
    }
    assert template["spec"]["containerConcurrency"] == runtime.concurrency
    assert template["spec"]["timeoutSeconds"] == runtime.timeout_seconds
    assert template["spec"]["serviceAccountName"] == target.runtime_accounts[service]
    # Revision scaling and CPU allocation are annotations of the revision template
    # (Cloud Run reference: RevisionTemplate annotations).
    assert annotations["autoscaling.knative.dev/maxScale"] == str(runtime.max_instances)
    assert annotations.get("autoscaling.knative.dev/minScale", "0") == str(runtime.min_instances)
    throttled = annotations.get("run.googleapis.com/cpu-throttling", "true").lower() == "true"
    assert throttled is not runtime.cpu_always_allocated
    assert annotations["run.googleapis.com/execution-environment"] == "gen2"
    sent_env = {e["name"]: e["value"] for e in container["env"]}
    assert sent_env == {
        "MLPIPE_PROJECT": PROJECT,
        "MLPIPE_BUCKET": f"{PROJECT}-mlpipe",
        "MLPIPE_CODE_VERSION": SHA,
        "MLPIPE_ENV": env,
        # One trace per run, in Cloud Trace (mlpipe.tracing).
        "MLPIPE_TRACE_EXPORTER": "cloud-trace",
        "MLPIPE_PUSH_AUTH": "oidc",
        # What `mlpipe infra apply` puts on the subscriptions that push to this service.
        "MLPIPE_PUSH_AUDIENCE": f"https://mlpipe-{service}-{NUMBER}.{REGION}.run.app",
        "MLPIPE_PUSH_SERVICE_ACCOUNT": f"mlpipe-push-{service}@{PROJECT}.iam.gserviceaccount.com",
        # The trainer's own image and account: what its Vertex AI CustomJobs run as.
        **(
            {
                "MLPIPE_TRAINER_IMAGE": image,
                "MLPIPE_VERTEX_SERVICE_ACCOUNT": target.runtime_accounts["trainer"],
            }
            if service == "trainer"
            else {}
        ),
        # Where the deployer rolls out (the environment file), with this build's predictor.
        **(
            {
                "MLPIPE_DEPLOY_TARGET": target.deploy_target,
                "MLPIPE_REGION": REGION,
                "MLPIPE_CLOUD_RUN_SERVICE": "mlpipe-predictor",
                "MLPIPE_PREDICTOR_IMAGE": image.replace("/deployer:", "/predictor:"),
            }
            if service == "deployer"
            else {}
        ),
        # Batch jobs on Dataflow, as the predictor's own account, from this build's template.
        **(
            {
                "MLPIPE_BATCH_LAUNCHER": "dataflow",
                "MLPIPE_REGION": REGION,
                "MLPIPE_BATCH_DATAFLOW_TEMPLATE": (
                    f"gs://{PROJECT}-mlpipe/dataflow/templates/batch-{SHA}.json"
                ),
                "MLPIPE_BATCH_DATAFLOW_SERVICE_ACCOUNT": target.runtime_accounts["predictor"],
                "MLPIPE_BATCH_DATAFLOW_TEMP_LOCATION": f"gs://{PROJECT}-mlpipe/dataflow/temp",
                "MLPIPE_BATCH_DATAFLOW_STAGING_LOCATION": (
                    f"gs://{PROJECT}-mlpipe/dataflow/staging"
                ),
            }
            if service == "predictor"
            else {}
        ),
        # Sizes and prices of the cost estimates: the deployer records an ended run's, the
        # evaluator's report shows the steps so far, the predictor estimates its batches.
        **(
            service_runtime.cost_environment(env)
            if service in ("deployer", "evaluator", "predictor")
            else {}
        ),
        **runtime.env,
    }
    assert {
        (r.service_url, r.service_account)
        for r in target.routes
        if r.subscription.service == service
    } == {(sent_env["MLPIPE_PUSH_AUDIENCE"], sent_env["MLPIPE_PUSH_SERVICE_ACCOUNT"])}
    # The service starts with it and checks push tokens for that audience and identity.
    for name, value in sent_env.items():
        monkeypatch.setenv(name, value)
    verifier = push_verifier(load_settings(CommonSettings))
    assert verifier is not None
    assert (verifier.audience, verifier.service_account) == (
        sent_env["MLPIPE_PUSH_AUDIENCE"],
        sent_env["MLPIPE_PUSH_SERVICE_ACCOUNT"],
    )
    # --no-allow-unauthenticated on a new service: no IAM call that could add allUsers.
    assert not [r for r in cloud_run.gcloud.seen if "IamPolicy" in r.path]
    assert "Service URL" in output, output


def test_a_redeploy_replaces_the_environment_and_keeps_only_the_push_identity_as_invoker(
    cloud_run: Deployed, tmp_path: Path
) -> None:
    flags = tmp_path / "run-flags.yaml"
    render_flags("evaluator", "dev", "a" * 40, flags)
    gcloud_deploy(cloud_run, "evaluator", flags, tmp_path / "gcloud")
    # A variable set by hand (through the API, as the console would).
    deployed = cloud_run.service("mlpipe-evaluator")
    deployed.template.containers[0].env.append(run_v2.EnvVar(name="SET_BY_HAND", value="x"))
    cloud_run.services().update_service(service=deployed).result(timeout=60)
    generation = cloud_run.service("mlpipe-evaluator").generation
    push = f"serviceAccount:mlpipe-push-evaluator@{PROJECT}.iam.gserviceaccount.com"
    # What `mlpipe infra apply` granted, and a public binding someone added by hand.
    cloud_run.gcloud.policies["mlpipe-evaluator"] = {
        "version": 1,
        "etag": etag(7),
        "bindings": [{"role": "roles/run.invoker", "members": ["allUsers", push]}],
    }

    render_flags("evaluator", "dev", "b" * 40, flags)
    gcloud_deploy(cloud_run, "evaluator", flags, tmp_path / "gcloud")

    replaced = cloud_run.gcloud.sent("PUT")
    assert len(replaced) == 1
    env = {
        e["name"]: e["value"]
        for e in replaced[0].body["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["MLPIPE_CODE_VERSION"] == "b" * 40
    assert "SET_BY_HAND" not in env
    assert cloud_run.service("mlpipe-evaluator").generation == generation + 1
    # --no-allow-unauthenticated on an existing service: the policy is written back without
    # allUsers, with infra apply's invoker binding intact.
    assert cloud_run.gcloud.sent("POST", RUN_HOST), "gcloud did not set the IAM policy"
    assert cloud_run.gcloud.policies["mlpipe-evaluator"]["bindings"] == [
        {"role": "roles/run.invoker", "members": [push]}
    ]


def test_a_code_release_by_gcloud_keeps_the_model_split_until_the_deployer_moves_it(
    cloud_run: Deployed, tmp_path: Path
) -> None:
    """A model rollout (v1, then a 10% canary of v2) by the deployer's Cloud Run target on a
    service that `gcloud run deploy` released, then a second release by gcloud, then the
    promotion: the release gets no traffic, and the promotion serves v2 on the new code."""
    model = "iris-classifier"
    versions = {
        n: ModelVersion(model, n, f"run{n:013d}", f"gs://b/registry/{model}/{n}/m", "s", {})
        for n in (1, 2)
    }
    services = cloud_run.services()
    revisions = run_v2.RevisionsClient(
        transport="rest",
        client_options=cloud_run.stand_in.client_options(),
        credentials=AnonymousCredentials(),
    )
    target = CloudRunTarget(
        PROJECT, REGION, "mlpipe-predictor", "", "x", services=services, revisions=revisions
    )

    def roll_out(traffic: Traffic) -> None:
        rollout = target.apply(model, traffic, versions)
        for _ in range(60):
            if rollout.done:
                return
            time.sleep(0.6)
            rollout = target.apply(model, traffic, versions, rollout.operations)
        raise AssertionError(f"the rollout did not finish: {rollout}")

    def served() -> list[tuple[str, int]]:
        service = cloud_run.service("mlpipe-predictor")
        return sorted((t.revision, t.percent) for t in service.traffic_statuses if t.percent)

    def env_of(revision: str) -> dict[str, str]:
        path = f"projects/{PROJECT}/locations/{REGION}/services/mlpipe-predictor"
        found = revisions.get_revision(name=f"{path}/revisions/{revision}")
        return {e.name: e.value for e in found.containers[0].env}

    flags = tmp_path / "run-flags.yaml"
    render_flags("predictor", "dev", "a" * 40, flags)
    gcloud_deploy(cloud_run, "predictor", flags, tmp_path / "gcloud")
    roll_out(Traffic(1))
    roll_out(Traffic(1, 2, 10))
    before = served()
    assert [p for _, p in before] == [90, 10]
    assert env_of(before[1][0])["MLPIPE_SERVE_VERSION"] == "2"

    image = render_flags("predictor", "dev", "b" * 40, flags)
    output = gcloud_deploy(cloud_run, "predictor", flags, tmp_path / "gcloud")

    # gcloud kept the split pinned to the model's revisions: its own revision serves nothing.
    assert served() == before
    released = cloud_run.service("mlpipe-predictor").latest_created_revision.rsplit("/", 1)[-1]
    assert released not in dict(before)
    assert env_of(released)["MLPIPE_CODE_VERSION"] == "b" * 40
    assert "MLPIPE_SERVE_VERSION" not in env_of(released)  # --set-env-vars replaced the pins
    plain = re.sub(r"\x1b\[[0-9;]*m", "", output)
    assert f"revision [{released}] has been deployed and is serving 0 percent of traffic" in plain

    roll_out(Traffic(2, history=[1]))

    (final,) = served()
    assert final[1] == 100 and final[0] not in dict(before)
    assert env_of(final[0])["MLPIPE_CODE_VERSION"] == "b" * 40
    assert env_of(final[0])["MLPIPE_SERVE_VERSION"] == "2"
    path = f"projects/{PROJECT}/locations/{REGION}/services/mlpipe-predictor"
    assert revisions.get_revision(name=f"{path}/revisions/{final[0]}").containers[0].image == image
