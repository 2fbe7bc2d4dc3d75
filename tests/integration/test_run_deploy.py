"""The flags `mlpipe infra run-flags` renders, deployed by the real `gcloud run deploy
--flags-file` against a stand-in of the Cloud Run Admin API on 127.0.0.1: the Service that
gcloud sends is what infra/runtime.yaml and the environment file say.

gcloud derives Cloud Run's regional endpoint by prefixing the region to the host of its
endpoint override (`us-central1-run.googleapis.com`), which no 127.0.0.1 URL survives. So the
overrides name hosts under the reserved `.test` domain and gcloud reaches them through its
HTTP proxy setting, which is the stand-in: each request arrives with its full URL. Anything
else (an HTTPS CONNECT to a real Google host) is refused and fails the test.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from mlpipe.runtime.auth import push_verifier
from mlpipe.runtime.settings import CommonSettings, load_settings
from mlpipe_ops import infra, service_runtime
from mlpipe_ops.cli import app
from tests.conftest import REPO

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("gcloud") is None, reason="the gcloud CLI is not installed"),
]

PROJECT = "acme-ml-dev"
NUMBER = 123456789012
REGION = "us-central1"
SHA = "0123456789abcdef0123456789abcdef01234567"
RUN_HOST = "run.googleapis.test"
USAGE_HOST = "serviceusage.googleapis.test"
KNATIVE = "/apis/serving.knative.dev/v1/namespaces/"
# Cloud Run service names: lowercase letters, digits and hyphens, a letter first, no hyphen
# last, at most 49 characters (reference: namespaces.services, metadata.name).
SERVICE_NAME = re.compile(r"^[a-z](?:[-a-z0-9]{0,47}[a-z0-9])?$")
# IAM on a service lives on the global v1 surface (projects.locations.services).
IAM_PATH = re.compile(
    rf"^/v1/projects/{PROJECT}/locations/{REGION}/services/(?P<name>[^/:]+):(?P<verb>\w+)$"
)


@dataclass
class Request:
    method: str
    host: str
    path: str
    body: Any


@dataclass
class CloudRun:
    """Cloud Run Admin API v1 (the Knative serving surface `gcloud run deploy` uses) and the
    one Service Usage call gcloud makes first. Services are kept in memory by name."""

    port: int = 0
    services: dict[str, dict[str, Any]] = field(default_factory=dict)
    policies: dict[str, dict[str, Any]] = field(default_factory=dict)
    seen: list[Request] = field(default_factory=list)
    polls: dict[str, int] = field(default_factory=dict)

    def sent(self, method: str, host: str = "") -> list[Request]:
        host = host or f"{REGION}-{RUN_HOST}"
        return [r for r in self.seen if r.method == method and r.host == host]

    def answer(self, method: str, host: str, path: str, body: Any) -> tuple[int, Any]:
        if host == USAGE_HOST and method == "GET":
            # Service Usage v1 services.get: the service under the project's number, its state.
            api = path.rsplit("/", 1)[-1]
            return 200, {
                "name": f"projects/{NUMBER}/services/{api}",
                "parent": f"projects/{NUMBER}",
                "config": {"name": api},
                "state": "ENABLED",
            }
        iam = IAM_PATH.match(path)
        if host == RUN_HOST and iam:
            return self.iam(method, iam["name"], iam["verb"], body)
        if host != f"{REGION}-{RUN_HOST}" or not path.startswith(KNATIVE):
            return _error(404, "NOT_FOUND", f"the stand-in does not serve {host}{path}")
        namespace, _, rest = path.removeprefix(KNATIVE).partition("/")
        if namespace not in (PROJECT, str(NUMBER)):
            # The namespace is the project id or number (reference: namespaces.services).
            return _error(404, "NOT_FOUND", f"project {namespace} not found")
        parts = rest.split("/")
        if method == "POST" and parts == ["services"]:
            return self.create(body)
        if len(parts) == 2 and parts[0] == "services":
            name = parts[1]
            if method == "GET":
                return self.get(name)
            if method == "PUT":
                return self.replace(name, body)
        return _error(404, "NOT_FOUND", f"{method} {path} is not a Cloud Run v1 method")

    def iam(self, method: str, name: str, verb: str, body: Any) -> tuple[int, Any]:
        # projects.locations.services.getIamPolicy (GET) and setIamPolicy (POST, the whole
        # policy; an etag that is not the current one is refused with ABORTED, google.iam.v1).
        if name not in self.services:
            return _error(404, "NOT_FOUND", f"Resource '{name}' not found.")
        current = self.policies.setdefault(name, {"version": 1, "etag": etag(1)})
        if verb == "getIamPolicy" and method == "GET":
            return 200, current
        if verb == "setIamPolicy" and method == "POST":
            policy = body["policy"]
            # etag is bytes, base64 in JSON: compare the bytes, not the spelling.
            sent = base64.b64decode(policy.get("etag", ""))
            if sent and sent != base64.b64decode(current["etag"]):
                return _error(409, "ABORTED", "There were concurrent policy changes.")
            serial = int.from_bytes(base64.b64decode(current["etag"]), "big") + 1
            self.policies[name] = {**policy, "version": 1, "etag": etag(serial)}
            return 200, self.policies[name]
        return _error(404, "NOT_FOUND", f"{method} {verb} is not an IAM method")

    def create(self, service: dict[str, Any]) -> tuple[int, Any]:
        # namespaces.services.create: ALREADY_EXISTS for a taken name; the created Service
        # comes back with generation 1 and conditions not yet settled (reconciliation runs on).
        name = service.get("metadata", {}).get("name", "")
        problem = _invalid(service)
        if problem:
            return _error(400, "INVALID_ARGUMENT", problem)
        if name in self.services:
            return _error(409, "ALREADY_EXISTS", f"Resource '{name}' already exists.")
        stored = _settle(service, generation=1, ready="Unknown")
        self.services[name] = stored
        self.polls[name] = 0
        return 200, stored

    def replace(self, name: str, service: dict[str, Any]) -> tuple[int, Any]:
        # namespaces.services.replaceService: the whole Service, next generation.
        if name not in self.services:
            return _error(404, "NOT_FOUND", f"Resource '{name}' not found.")
        problem = _invalid(service)
        if problem:
            return _error(400, "INVALID_ARGUMENT", problem)
        generation = int(self.services[name]["metadata"]["generation"]) + 1
        self.services[name] = _settle(service, generation=generation, ready="Unknown")
        self.polls[name] = 0
        return 200, self.services[name]

    def get(self, name: str) -> tuple[int, Any]:
        # namespaces.services.get: NOT_FOUND for a service that does not exist yet (gcloud then
        # creates it); otherwise the Service, Ready once its revision serves (here: the second
        # read after a change, so gcloud's wait loop is exercised).
        if name not in self.services:
            return _error(404, "NOT_FOUND", f"Resource '{name}' of kind 'SERVICE' does not exist.")
        self.polls[name] += 1
        if self.polls[name] >= 2:
            current = self.services[name]
            self.services[name] = _settle(
                current, generation=int(current["metadata"]["generation"]), ready="True"
            )
        return 200, self.services[name]


def etag(serial: int) -> str:
    return base64.b64encode(serial.to_bytes(8, "big")).decode()


def _error(code: int, status: str, message: str) -> tuple[int, Any]:
    # Google APIs' JSON error body (google.rpc.Status inside "error").
    return code, {"error": {"code": code, "status": status, "message": message}}


_RESERVED_ENV = {"PORT", "K_SERVICE", "K_REVISION", "K_CONFIGURATION"}


def _invalid(service: dict[str, Any]) -> str:
    """The documented limits a Service is refused for (400 INVALID_ARGUMENT), each with its
    page under cloud.google.com/run/docs."""
    name = service.get("metadata", {}).get("name", "")
    if service.get("apiVersion") != "serving.knative.dev/v1" or service.get("kind") != "Service":
        return "apiVersion must be serving.knative.dev/v1 and kind Service"
    if not SERVICE_NAME.match(name):
        return f"metadata.name {name!r} is not a valid service name"
    spec = service["spec"]["template"]["spec"]
    if not 0 <= int(spec.get("containerConcurrency", 80)) <= 1000:  # configuring/concurrency
        return "containerConcurrency must be between 0 and 1000"
    if not 1 <= int(spec.get("timeoutSeconds", 300)) <= 3600:  # configuring/request-timeout
        return "timeoutSeconds must be between 1 and 3600"
    for container in spec["containers"]:
        env = {e["name"] for e in container.get("env", [])}
        if env & _RESERVED_ENV:  # reference/container-contract#env-vars
            return f"env {sorted(env & _RESERVED_ENV)[0]} is reserved"
        memory = container.get("resources", {}).get("limits", {}).get("memory", "512Mi")
        gen2 = (
            service["spec"]["template"]["metadata"]
            .get("annotations", {})
            .get("run.googleapis.com/execution-environment")
            == "gen2"
        )
        if gen2 and service_runtime.memory_bytes(memory) < 512 * 1024**2:
            return "gen2 needs at least 512Mi"  # configuring/services/memory-limits
    return ""


def _settle(service: dict[str, Any], *, generation: int, ready: str) -> dict[str, Any]:
    """The Service as Cloud Run returns it: server-set metadata (the namespace becomes the
    project number, uid, generation), and status with the Ready, ConfigurationsReady and
    RoutesReady conditions (reference: namespaces.services, ServiceStatus)."""
    stored = json.loads(json.dumps(service))
    name = stored["metadata"]["name"]
    metadata = stored["metadata"]
    metadata.update(
        namespace=str(NUMBER),
        uid=metadata.get("uid") or "8d5f4a3b-6f0e-4c7e-9b1a-2f7c3d9e0a11",
        generation=generation,
        resourceVersion=f"AAY{generation:04d}",
        creationTimestamp=metadata.get("creationTimestamp") or "2025-01-01T00:00:00.000000Z",
        selfLink=f"/apis/serving.knative.dev/v1/namespaces/{NUMBER}/services/{name}",
    )
    revision = f"{name}-{generation:05d}-abc"
    conditions = [
        {"type": t, "status": ready, "lastTransitionTime": "2025-01-01T00:00:01Z"}
        for t in ("Ready", "ConfigurationsReady", "RoutesReady")
    ]
    url = f"https://{name}-{NUMBER}.{REGION}.run.app"
    status: dict[str, Any] = {"observedGeneration": generation, "conditions": conditions}
    if ready == "True":
        status |= {
            "latestCreatedRevisionName": revision,
            "latestReadyRevisionName": revision,
            "url": url,
            "address": {"url": url},
            "traffic": [{"revisionName": revision, "percent": 100, "latestRevision": True}],
        }
    stored["status"] = status
    return stored


def _handler(cloud_run: CloudRun) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _proxied(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            # Through a proxy, the request line carries the whole URL (RFC 9112, 3.2.2).
            url = urllib.parse.urlsplit(self.path)
            request = Request(self.command, url.netloc, url.path, json.loads(raw) if raw else None)
            cloud_run.seen.append(request)
            status, body = cloud_run.answer(request.method, request.host, url.path, request.body)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _proxied

        def do_CONNECT(self) -> None:
            # An HTTPS request to a real host: nothing may leave this machine.
            cloud_run.seen.append(Request("CONNECT", self.path, "", None))
            self.send_error(403, "the stand-in only answers the overridden .test hosts")

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def cloud_run() -> Iterator[CloudRun]:
    stand_in = CloudRun()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(stand_in))
    stand_in.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield stand_in
    server.shutdown()
    server.server_close()


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


def gcloud_deploy(cloud_run: CloudRun, service: str, flags: Path, config: Path) -> str:
    """The deploy step of cloudbuild/service.yaml, pointed at the stand-in."""
    env = {
        **os.environ,
        "CLOUDSDK_CONFIG": str(config),
        "CLOUDSDK_API_ENDPOINT_OVERRIDES_RUN": f"http://{RUN_HOST}/",
        "CLOUDSDK_API_ENDPOINT_OVERRIDES_SERVICEUSAGE": f"http://{USAGE_HOST}/",
        "CLOUDSDK_PROXY_TYPE": "http",
        "CLOUDSDK_PROXY_ADDRESS": "127.0.0.1",
        "CLOUDSDK_PROXY_PORT": str(cloud_run.port),
        "CLOUDSDK_AUTH_DISABLE_CREDENTIALS": "true",
        "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
        "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "true",
        "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "true",
    }
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
    assert not [r for r in cloud_run.seen if r.method == "CONNECT"], "gcloud left the stand-in"
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
    cloud_run: CloudRun,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    service: str,
    env: str,
) -> None:
    flags = tmp_path / "run-flags.yaml"
    image = render_flags(service, env, SHA, flags)

    output = gcloud_deploy(cloud_run, service, flags, tmp_path / "gcloud")

    created = cloud_run.sent("POST")
    assert len(created) == 1, [(r.method, r.path) for r in cloud_run.seen]
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
        "MLPIPE_PUSH_AUTH": "oidc",
        # What `mlpipe infra apply` puts on the subscriptions that push to this service.
        "MLPIPE_PUSH_AUDIENCE": f"https://mlpipe-{service}-{NUMBER}.{REGION}.run.app",
        "MLPIPE_PUSH_SERVICE_ACCOUNT": f"mlpipe-push-{service}@{PROJECT}.iam.gserviceaccount.com",
        **({"MLPIPE_TRAINER_IMAGE": image} if service == "trainer" else {}),
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
    assert not [r for r in cloud_run.seen if "IamPolicy" in r.path]
    assert "Service URL" in output, output


def test_a_redeploy_replaces_the_environment_and_keeps_only_the_push_identity_as_invoker(
    cloud_run: CloudRun, tmp_path: Path
) -> None:
    flags = tmp_path / "run-flags.yaml"
    render_flags("evaluator", "dev", "a" * 40, flags)
    gcloud_deploy(cloud_run, "evaluator", flags, tmp_path / "gcloud")
    deployed = cloud_run.services["mlpipe-evaluator"]
    deployed["spec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "SET_BY_HAND", "value": "x"}
    )
    push = f"serviceAccount:mlpipe-push-evaluator@{PROJECT}.iam.gserviceaccount.com"
    # What `mlpipe infra apply` granted, and a public binding someone added by hand.
    cloud_run.policies["mlpipe-evaluator"] = {
        "version": 1,
        "etag": etag(7),
        "bindings": [{"role": "roles/run.invoker", "members": ["allUsers", push]}],
    }

    render_flags("evaluator", "dev", "b" * 40, flags)
    gcloud_deploy(cloud_run, "evaluator", flags, tmp_path / "gcloud")

    replaced = cloud_run.sent("PUT")
    assert len(replaced) == 1
    env = {
        e["name"]: e["value"]
        for e in replaced[0].body["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["MLPIPE_CODE_VERSION"] == "b" * 40
    assert "SET_BY_HAND" not in env
    assert cloud_run.services["mlpipe-evaluator"]["metadata"]["generation"] == 2
    # --no-allow-unauthenticated on an existing service: the policy is written back without
    # allUsers, with infra apply's invoker binding intact.
    assert cloud_run.sent("POST", RUN_HOST), "gcloud did not set the IAM policy"
    assert cloud_run.policies["mlpipe-evaluator"]["bindings"] == [
        {"role": "roles/run.invoker", "members": [push]}
    ]
