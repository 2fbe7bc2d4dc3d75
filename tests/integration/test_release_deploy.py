"""The Cloud Deploy configuration `mlpipe infra release-config` renders, applied and released by
the real gcloud against a stand-in of the Cloud Deploy API on 127.0.0.1, with the release source
staged in the real GCS emulator (fake-gcs-server).

- `gcloud deploy apply --file=clouddeploy.yaml` parses the file client-side (an unknown field
  is refused before any request) and sends each DeliveryPipeline and Target; the stand-in keeps
  what it was sent.
- `gcloud deploy releases create` (the deploy step of cloudbuild/service.yaml, _DEPLOY=release)
  checks that the Skaffold file is in the source, packs the source, uploads it to the staging
  bucket and creates the release, then its first rollout. Cloud Deploy renders a release on the
  server; the stand-in renders as the reference says Skaffold does for each stage (the stage's
  profile selects the rawYaml manifests, the release's images replace the placeholders), from
  the archive gcloud uploaded.
- `gcloud deploy releases promote` and `gcloud deploy rollouts approve` take the release to
  staging, then to prod through its approval.

The Cloud Deploy API has one global host (gcloud's clouddeploy client is not regional), so its
endpoint override points straight at the stand-in. Each rule the stand-in applies names its
page under cloud.google.com/deploy/docs (REST: api/reference/rest/v1/...).
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import shutil
import subprocess
import tarfile
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

from mlpipe.messaging.topology import TOPOLOGY
from mlpipe.store.storage import make_client
from mlpipe_ops import release
from mlpipe_ops.cli import app
from mlpipe_ops.localstack import StackState
from tests.conftest import REPO

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("gcloud") is None, reason="the gcloud CLI is not installed"),
]

NUMBERS = {"dev": 111111111111, "staging": 222222222222, "prod": 333333333333}
PROJECTS = {"dev": "acme-ml-dev", "staging": "acme-ml-staging", "prod": "acme-ml-prod"}
DELIVERY = PROJECTS["dev"]
REGION = "us-central1"
SHA = "0123456789abcdef0123456789abcdef01234567"
V1 = "/v1/"
# Resource IDs of pipelines, targets, releases and rollouts: [a-z]([a-z0-9-]{0,61}[a-z0-9])?
# (REST: projects.locations.deliveryPipelines, .targets, .releases, .rollouts: name).
RESOURCE_ID = re.compile(r"^[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?$")
# CloudRunLocation.location: "Format must be projects/{project}/locations/{location}".
RUN_LOCATION = re.compile(r"^projects/[^/]+/locations/[^/]+$")
# ExecutionConfig.usages (REST: projects.locations.targets, ExecutionEnvironmentUsage).
USAGES = {"RENDER", "DEPLOY", "VERIFY", "PREDEPLOY", "POSTDEPLOY", "ANALYSIS"}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: Any


@dataclass
class CloudDeploy:
    """Cloud Deploy API v1: delivery pipelines, targets, releases, rollouts and their
    long-running operations, kept in memory by resource name."""

    port: int = 0
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    operations: dict[str, dict[str, Any]] = field(default_factory=dict)
    # What the render of each release wrote, by release name and target ID.
    rendered: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    seen: list[Request] = field(default_factory=list)
    counter: itertools.count = field(default_factory=lambda: itertools.count(1))

    def sent(self, method: str, kind: str) -> list[Request]:
        """The requests on `kind` (the innermost collection of their path)."""
        return [r for r in self.seen if r.method == method and _kind(r.path) == kind]

    def of_kind(self, kind: str) -> dict[str, dict[str, Any]]:
        return {n: r for n, r in self.resources.items() if n.split("/")[-2] == kind}

    # --- routing ---------------------------------------------------------------------------
    def answer(self, request: Request) -> tuple[int, Any]:
        if not request.path.startswith(V1):
            return _error(404, "NOT_FOUND", f"the stand-in does not serve {request.path}")
        name, _, verb = request.path.removeprefix(V1).partition(":")
        parts = name.split("/")
        if len(parts) < 4 or parts[0] != "projects" or parts[2] != "locations":
            return _error(404, "NOT_FOUND", f"{name} is not under projects/P/locations/L")
        kind = parts[-2] if len(parts) % 2 == 0 else parts[-1]
        method = request.method
        if kind == "operations" and method == "GET":
            return self.operation(name)
        if method == "PATCH" and kind in ("deliveryPipelines", "targets"):
            return self.patch(name, kind, request)
        if method == "GET" and len(parts) % 2 == 0 and not verb:
            found = self.resources.get(name)
            if found is None:
                return _error(404, "NOT_FOUND", f"Resource '{name}' was not found")
            return 200, found
        # A collection's path: its parent, then the collection's name.
        parent = name.rsplit("/", 1)[0]
        if method == "POST" and kind == "releases" and len(parts) % 2 == 1:
            return self.create_release(parent, request)
        if method == "GET" and kind == "rollouts" and len(parts) % 2 == 1:
            return self.list_rollouts(parent, request.query)
        if method == "POST" and kind == "rollouts" and len(parts) % 2 == 1:
            return self.create_rollout(parent, request)
        if method == "POST" and kind == "rollouts" and verb == "approve":
            return self.approve(name, request.body or {})
        return _error(404, "NOT_FOUND", f"{method} {request.path} is not a Cloud Deploy method")

    # --- long-running operations -----------------------------------------------------------
    def started(self, parent: str, resource: dict[str, Any], kind: str) -> tuple[int, Any]:
        """Every mutation is a google.longrunning.Operation: not done when returned, done with
        the resource as its response on the next read (so gcloud's wait loop runs)."""
        location = "/".join(parent.split("/")[:4])
        name = f"{location}/operations/operation-{next(self.counter):04d}"
        self.operations[name] = {
            "name": name,
            "metadata": {
                "@type": "type.googleapis.com/google.cloud.deploy.v1.OperationMetadata",
                "target": resource["name"],
                "verb": "create",
            },
            "done": False,
            "_response": {"@type": f"type.googleapis.com/google.cloud.deploy.v1.{kind}"} | resource,
        }
        return 200, {k: v for k, v in self.operations[name].items() if k != "_response"}

    def operation(self, name: str) -> tuple[int, Any]:
        op = self.operations.get(name)
        if op is None:
            return _error(404, "NOT_FOUND", f"operation {name} not found")
        op["done"] = True
        return 200, {
            "name": op["name"],
            "metadata": op["metadata"],
            "done": True,
            "response": op["_response"],
        }

    # --- delivery pipelines and targets ----------------------------------------------------
    def patch(self, name: str, kind: str, request: Request) -> tuple[int, Any]:
        # deliveryPipelines.patch / targets.patch with allowMissing=true creates the resource
        # (REST: "If set to true, updating a ... that does not exist will result in the
        # creation of a new ...").
        body = request.body or {}
        exists = name in self.resources
        if not exists and request.query.get("allowMissing", "").lower() != "true":
            return _error(404, "NOT_FOUND", f"Resource '{name}' was not found")
        resource_id = name.rsplit("/", 1)[-1]
        if not RESOURCE_ID.match(resource_id):
            return _error(400, "INVALID_ARGUMENT", f"invalid resource id {resource_id!r}")
        problem = _invalid_pipeline(body) if kind == "deliveryPipelines" else _invalid_target(body)
        if problem:
            return _error(400, "INVALID_ARGUMENT", problem)
        stored = {
            **body,
            "name": name,
            "uid": self.resources.get(name, {}).get("uid") or f"{next(self.counter):032x}",
            "etag": f"etag-{next(self.counter)}",
        }
        if kind == "targets":
            stored["targetId"] = resource_id
        self.resources[name] = stored
        return self.started(name, stored, "DeliveryPipeline" if kind != "targets" else "Target")

    # --- releases --------------------------------------------------------------------------
    def create_release(self, parent: str, request: Request) -> tuple[int, Any]:
        # releases.create: releaseId is required; the release snapshots its pipeline and the
        # pipeline's targets (deliveryPipelineSnapshot, targetSnapshots), then renders each
        # target (renderState, targetRenders).
        release_id = request.query.get("releaseId", "")
        if not RESOURCE_ID.match(release_id):
            return _error(400, "INVALID_ARGUMENT", f"invalid releaseId {release_id!r}")
        pipeline = self.resources.get(parent)
        if pipeline is None:
            return _error(404, "NOT_FOUND", f"delivery pipeline {parent} not found")
        name = f"{parent}/releases/{release_id}"
        if name in self.resources:
            return _error(409, "ALREADY_EXISTS", f"Resource '{name}' already exists")
        body = request.body or {}
        location = "/".join(parent.split("/")[:4])
        targets = []
        for stage in pipeline["serialPipeline"]["stages"]:
            target = self.resources.get(f"{location}/targets/{stage['targetId']}")
            if target is None:
                # A release needs every target of its pipeline (config-files: targets are
                # created before a release references them).
                return _error(
                    400, "FAILED_PRECONDITION", f"target {stage['targetId']} does not exist"
                )
            targets.append(target)
        renders, rendered = self.render(pipeline, body)
        stored = {
            **body,
            "name": name,
            "uid": f"{next(self.counter):032x}",
            "deliveryPipelineSnapshot": pipeline,
            "targetSnapshots": targets,
            "renderState": "SUCCEEDED"
            if all(r["renderingState"] == "SUCCEEDED" for r in renders.values())
            else "FAILED",
            "targetRenders": renders,
            "createTime": "2025-01-01T00:00:00Z",
        }
        self.resources[name] = stored
        self.rendered[name] = rendered
        return self.started(name, stored, "Release")

    def render(
        self, pipeline: dict[str, Any], release_body: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
        """What Cloud Deploy's render does with Skaffold for each stage
        (using-skaffold/managing-manifests): the source archive's Skaffold config, the stage's
        profiles activated, their rawYaml manifests read, and every image named like one of the
        release's build artifacts replaced by that artifact's tag. The Cloud Run deployer takes
        only serving.knative.dev/v1 Services (skaffold.dev/docs/deployers/cloudrun)."""
        uri = release_body.get("skaffoldConfigUri", "")
        bucket, _, blob = uri.removeprefix("gs://").partition("/")
        archive = make_client(DELIVERY).bucket(bucket).blob(blob).download_as_bytes()
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            files = {
                m.name.removeprefix("./"): tar.extractfile(m).read()  # type: ignore[union-attr]
                for m in tar.getmembers()
                if m.isfile()
            }
        artifacts = {a["image"]: a["tag"] for a in release_body.get("buildArtifacts", [])}
        skaffold_path = release_body.get("skaffoldConfigPath") or "skaffold.yaml"
        configs = list(yaml.safe_load_all(files[skaffold_path]))
        base = str(Path(skaffold_path).parent).removeprefix(".")
        renders: dict[str, Any] = {}
        rendered: dict[str, list[dict[str, Any]]] = {}
        for stage in pipeline["serialPipeline"]["stages"]:
            target = stage["targetId"]
            try:
                manifests = []
                for profile in stage.get("profiles", []):
                    matched = [
                        p for c in configs for p in c.get("profiles", []) if p["name"] == profile
                    ]
                    if not matched:
                        raise ValueError(f"couldn't find profile {profile}")
                    for p in matched:
                        for path in p["manifests"]["rawYaml"]:
                            manifests += yaml.safe_load_all(files[f"{base}{path}".lstrip("/")])
                for manifest in manifests:
                    if (manifest["apiVersion"], manifest["kind"]) != (
                        release.KNATIVE_API_VERSION,
                        "Service",
                    ):
                        raise ValueError("the Cloud Run deployer takes Knative Services only")
                    for container in manifest["spec"]["template"]["spec"]["containers"]:
                        container["image"] = artifacts.get(container["image"], container["image"])
                renders[target] = {"renderingState": "SUCCEEDED"}
                rendered[target] = manifests
            except (KeyError, ValueError) as exc:
                renders[target] = {"renderingState": "FAILED", "failureMessage": str(exc)}
        return renders, rendered

    # --- rollouts --------------------------------------------------------------------------
    def create_rollout(self, release_name: str, request: Request) -> tuple[int, Any]:
        # rollouts.create: rolloutId required; the release must have rendered (renderState
        # SUCCEEDED, for all its targets), the target must be one of its stages; a target with
        # requireApproval holds the rollout in PENDING_APPROVAL / NEEDS_APPROVAL until
        # rollouts.approve.
        rollout_id = request.query.get("rolloutId", "")
        if not RESOURCE_ID.match(rollout_id):
            return _error(400, "INVALID_ARGUMENT", f"invalid rolloutId {rollout_id!r}")
        parent = self.resources.get(release_name)
        if parent is None:
            return _error(404, "NOT_FOUND", f"release {release_name} not found")
        body = request.body or {}
        target_id = body.get("targetId", "")
        snapshot = {t["targetId"]: t for t in parent["targetSnapshots"]}
        if target_id not in snapshot:
            return _error(400, "INVALID_ARGUMENT", f"target {target_id} is not in the pipeline")
        if parent["renderState"] != "SUCCEEDED":
            failed = sorted(
                t for t, r in parent["targetRenders"].items() if r["renderingState"] != "SUCCEEDED"
            )
            return _error(
                400, "FAILED_PRECONDITION", f"release not rendered for {', '.join(failed)}"
            )
        name = f"{release_name}/rollouts/{rollout_id}"
        serial = next(self.counter)
        stored = {
            "name": name,
            "uid": f"{serial:032x}",
            "targetId": target_id,
            "createTime": f"2025-01-01T00:{serial // 60:02d}:{serial % 60:02d}Z",
        }
        if snapshot[target_id].get("requireApproval"):
            stored |= {"approvalState": "NEEDS_APPROVAL", "state": "PENDING_APPROVAL"}
        else:
            stored |= {"approvalState": "DOES_NOT_NEED_APPROVAL"}
            self.deployed(stored)
        self.resources[name] = stored
        return self.started(name, stored, "Rollout")

    def deployed(self, rollout: dict[str, Any]) -> None:
        rollout |= {"state": "SUCCEEDED", "deployEndTime": rollout["createTime"]}

    def approve(self, name: str, body: dict[str, Any]) -> tuple[int, Any]:
        # rollouts.approve: only a rollout pending approval; approved: false rejects it.
        rollout = self.resources.get(name)
        if rollout is None:
            return _error(404, "NOT_FOUND", f"rollout {name} not found")
        if rollout.get("state") != "PENDING_APPROVAL":
            return _error(400, "FAILED_PRECONDITION", f"rollout {name} is not pending approval")
        if body.get("approved"):
            rollout["approvalState"] = "APPROVED"
            self.deployed(rollout)
        else:
            rollout |= {"approvalState": "REJECTED", "state": "APPROVAL_REJECTED"}
        return 200, {}

    def list_rollouts(self, parent: str, query: dict[str, str]) -> tuple[int, Any]:
        # rollouts.list under a release, or every release of a pipeline ("releases/-"), with an
        # AIP-160 filter (here the conjunctions of = and != that gcloud sends) and orderBy.
        prefix = parent.removesuffix("/-") + "/" if parent.endswith("/-") else f"{parent}/"
        found = [
            r
            for n, r in self.of_kind("rollouts").items()
            if n.startswith(prefix) and _matches(r, query.get("filter", ""))
        ]
        order = query.get("orderBy", "")
        if order:
            key = {"DeployEndTime": "deployEndTime", "CreateTime": "createTime"}.get(
                order.split()[0], "createTime"
            )
            found.sort(key=lambda r: r.get(key, ""), reverse=order.endswith("desc"))
        return 200, {"rollouts": found}


def _kind(path: str) -> str:
    parts = path.partition(":")[0].strip("/").split("/")
    return parts[-1] if len(parts) % 2 == 0 else parts[-2]


def _matches(resource: dict[str, Any], expression: str) -> bool:
    for clause in re.split(r"\s+AND\s+", expression.replace("(", "").replace(")", "")):
        if not clause.strip():
            continue
        match = re.fullmatch(r'\s*(\w+)\s*(!=|=)\s*"([^"]*)"\s*', clause)
        assert match, f"the stand-in does not understand the filter {expression!r}"
        key, op, value = match.groups()
        if (resource.get(key, "") == value) != (op == "="):
            return False
    return True


def _invalid_pipeline(body: dict[str, Any]) -> str:
    # DeliveryPipeline: serialPipeline.stages, each with a targetId (the last segment of a
    # target's name) and the Skaffold profiles it renders with (REST: deliveryPipelines, Stage).
    stages = body.get("serialPipeline", {}).get("stages")
    if not stages:
        return "serialPipeline.stages: a pipeline needs at least one stage"
    for stage in stages:
        if not RESOURCE_ID.match(stage.get("targetId", "")):
            return f"stage targetId {stage.get('targetId')!r} is not a target ID"
    return ""


def _invalid_target(body: dict[str, Any]) -> str:
    run = body.get("run", {}).get("location", "")
    if not RUN_LOCATION.match(run):
        return f"run.location {run!r}: format must be projects/{{project}}/locations/{{location}}"
    for config in body.get("executionConfigs", []):
        usages = set(config.get("usages", []))
        if not usages or not usages <= USAGES:  # ExecutionConfig.usages: required, enum
            return f"executionConfigs.usages {sorted(usages)} are not execution usages"
    return ""


def _error(code: int, status: str, message: str) -> tuple[int, Any]:
    return code, {"error": {"code": code, "status": status, "message": message}}


def _handler(stand_in: CloudDeploy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            url = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(url.query))
            request = Request(self.command, url.path, query, json.loads(raw) if raw else None)
            stand_in.seen.append(request)
            status, body = stand_in.answer(request)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def cloud_deploy() -> Iterator[CloudDeploy]:
    stand_in = CloudDeploy()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(stand_in))
    stand_in.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield stand_in
    server.shutdown()
    server.server_close()


def render(out: Path, *, service: str | None = None, tag: str = SHA[:7]) -> Path:
    """`mlpipe infra release-config` for three projects (the committed environment files name
    placeholder projects without numbers)."""
    args = ["infra", "release-config", "--out", str(out), "--code-version", SHA]
    args += ["--image-tag", tag]
    args += ["--registry", f"{REGION}-docker.pkg.dev/{DELIVERY}/mlpipe"]
    for env, project in PROJECTS.items():
        args += ["--project", f"{env}={project}", "--project-number", f"{env}={NUMBERS[env]}"]
    if service:
        args += ["--service", service]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


def gcloud(
    stand_in: CloudDeploy, args: list[str], config: Path, storage: str = ""
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CLOUDSDK_CONFIG": str(config),
        "CLOUDSDK_API_ENDPOINT_OVERRIDES_CLOUDDEPLOY": f"http://127.0.0.1:{stand_in.port}/",
        "CLOUDSDK_AUTH_DISABLE_CREDENTIALS": "true",
        "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
        "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "true",
        "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "true",
    }
    if storage:
        # fake-gcs-server serves the JSON API under /storage/v1/ and uploads under /upload/.
        env["CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE"] = f"{storage}/storage/v1/"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env.pop(name, None)
    return subprocess.run(["gcloud", *args], env=env, capture_output=True, text=True, timeout=180)


def apply(stand_in: CloudDeploy, directory: Path, config: Path) -> str:
    result = gcloud(
        stand_in,
        [
            "deploy",
            "apply",
            f"--file={directory / 'clouddeploy.yaml'}",
            f"--region={REGION}",
            f"--project={DELIVERY}",
        ],
        config,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stderr


def location() -> str:
    return f"projects/{DELIVERY}/locations/{REGION}"


def test_gcloud_applies_one_pipeline_per_service_through_three_targets(
    cloud_deploy: CloudDeploy, tmp_path: Path
) -> None:
    directory = render(tmp_path / "release")

    said = apply(cloud_deploy, directory, tmp_path / "gcloud")

    pipelines = cloud_deploy.of_kind("deliveryPipelines")
    targets = cloud_deploy.of_kind("targets")
    assert sorted(pipelines) == sorted(
        f"{location()}/deliveryPipelines/mlpipe-{s}" for s in TOPOLOGY.deployed
    )
    for pipeline in pipelines.values():
        assert pipeline["serialPipeline"]["stages"] == [
            {"targetId": "mlpipe-dev", "profiles": ["dev"]},
            {"targetId": "mlpipe-staging", "profiles": ["staging"]},
            {"targetId": "mlpipe-prod", "profiles": ["prod"]},
        ]
    assert sorted(targets) == sorted(f"{location()}/targets/mlpipe-{e}" for e in PROJECTS)
    for env, project in PROJECTS.items():
        sent = targets[f"{location()}/targets/mlpipe-{env}"]
        assert sent["run"] == {"location": f"projects/{project}/locations/{REGION}"}
        assert sent.get("requireApproval", False) is (env == "prod")
        assert sent["executionConfigs"] == [
            {
                "usages": ["RENDER", "DEPLOY"],
                "serviceAccount": f"mlpipe-deploy@{DELIVERY}.iam.gserviceaccount.com",
                "artifactStorage": f"gs://{DELIVERY}-mlpipe-releases/artifacts",
            }
        ]
    # gcloud waited for each operation and says what it created.
    assert said.count("Created Cloud Deploy resource") == len(pipelines) + len(targets), said
    unfinished = [op for op in cloud_deploy.operations.values() if not op["done"]]
    assert not unfinished

    # A second apply sends the same resources again (patch, allowMissing): nothing else changes.
    before = {n: {k: v for k, v in r.items() if k != "etag"} for n, r in pipelines.items()}
    apply(cloud_deploy, directory, tmp_path / "gcloud")
    after = cloud_deploy.of_kind("deliveryPipelines")
    assert {n: {k: v for k, v in r.items() if k != "etag"} for n, r in after.items()} == before


@pytest.mark.parametrize(
    ("field", "misspelt", "message"),
    [
        ("requireApproval", "requireAproval", "Target"),
        ("location", "locaton", "CloudRunLocation"),
        ("targetId", "targetID", "Stage"),
        ("artifactStorage", "artifactStore", "ExecutionConfig"),
    ],
)
def test_gcloud_refuses_a_field_the_schema_does_not_have_before_sending_anything(
    cloud_deploy: CloudDeploy, tmp_path: Path, field: str, misspelt: str, message: str
) -> None:
    """What makes the test above mean something: gcloud parses clouddeploy.yaml into its
    DeliveryPipeline and Target messages, nested ones included, and refuses a field they do not
    have before it sends anything."""
    directory = render(tmp_path / "release")
    path = directory / "clouddeploy.yaml"
    path.write_text(path.read_text().replace(f"{field}:", f"{misspelt}:"))

    result = gcloud(
        cloud_deploy,
        ["deploy", "apply", f"--file={path}", f"--region={REGION}", f"--project={DELIVERY}"],
        tmp_path / "gcloud",
    )

    assert result.returncode != 0
    assert f"May not assign arbitrary value {misspelt} to message {message}" in result.stderr
    assert not cloud_deploy.seen


def build_release_script(service: str) -> str:
    """The deploy step of cloudbuild/service.yaml as Cloud Build runs it with _DEPLOY=release
    (substitutions filled in, the release source where this test rendered it)."""
    build = yaml.safe_load((REPO / "cloudbuild" / "service.yaml").read_text())
    step = next(s for s in build["steps"] if s["id"] == "deploy")
    assert step["entrypoint"] == "bash"
    values = {
        "_DEPLOY": "release",
        "_SERVICE": service,
        "_REGION": REGION,
        "_REPOSITORY": "mlpipe",
        "PROJECT_ID": DELIVERY,
        "COMMIT_SHA": SHA,
        "SHORT_SHA": SHA[:7],
    }
    return re.sub(
        r"(?<!\$)\$(?:\{(\w+)\}|(\w+))",
        lambda m: values[m.group(1) or m.group(2)],
        step["args"][-1],
    )


@dataclass
class Delivery:
    stand_in: CloudDeploy
    storage: str
    bucket: str
    config: Path
    source: Path


@pytest.fixture
def delivery(
    cloud_deploy: CloudDeploy, emulators: StackState, tmp_path: Path
) -> Iterator[Delivery]:
    """The pipelines and targets applied, the releases bucket that bootstrap creates, and the
    trainer's release source as the build's release-config step renders it."""
    bucket = f"{DELIVERY}-mlpipe-releases"
    client = make_client(DELIVERY)
    if client.lookup_bucket(bucket) is None:
        client.create_bucket(bucket)
    apply(cloud_deploy, render(tmp_path / "pipeline"), tmp_path / "gcloud")
    source = render(tmp_path / "release", service="trainer")
    yield Delivery(cloud_deploy, emulators.storage_host, bucket, tmp_path / "gcloud", source)
    for blob in client.list_blobs(bucket):
        blob.delete()


def run_build_step(delivery: Delivery, service: str) -> subprocess.CompletedProcess[str]:
    script = build_release_script(service).replace("/workspace/release", str(delivery.source))
    env = {
        **os.environ,
        "CLOUDSDK_CONFIG": str(delivery.config),
        "CLOUDSDK_API_ENDPOINT_OVERRIDES_CLOUDDEPLOY": f"http://127.0.0.1:{delivery.stand_in.port}/",
        "CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE": f"{delivery.storage}/storage/v1/",
        "CLOUDSDK_AUTH_DISABLE_CREDENTIALS": "true",
        "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
        "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "true",
        "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "true",
    }
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env.pop(name, None)
    return subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=180
    )


def test_the_build_creates_a_release_that_renders_each_environment(
    delivery: Delivery,
) -> None:
    stand_in = delivery.stand_in

    result = run_build_step(delivery, "trainer")

    assert result.returncode == 0, result.stdout + result.stderr
    name = f"{location()}/deliveryPipelines/mlpipe-trainer/releases/rel-{SHA[:7]}-trainer"
    created = stand_in.resources[name]
    image = f"{REGION}-docker.pkg.dev/{DELIVERY}/mlpipe/trainer:{SHA[:7]}"
    # What gcloud sent: the image for the placeholder, the Skaffold file in the source it
    # staged in the releases bucket.
    assert created["buildArtifacts"] == [{"image": "trainer", "tag": image}]
    assert created["skaffoldConfigPath"] == "skaffold.yaml"
    assert created["skaffoldConfigUri"].startswith(f"gs://{delivery.bucket}/source/")
    assert created["description"] == f"trainer at {SHA}"
    # The archive holds exactly what release-config rendered.
    uri = created["skaffoldConfigUri"].removeprefix(f"gs://{delivery.bucket}/")
    archive = make_client(DELIVERY).bucket(delivery.bucket).blob(uri).download_as_bytes()
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        packed = {m.name.removeprefix("./") for m in tar.getmembers() if m.isfile()}
    assert packed == {
        p.relative_to(delivery.source).as_posix() for p in delivery.source.rglob("*") if p.is_file()
    }
    # Rendered for every stage, each with its own environment's manifest and the real image.
    assert created["renderState"] == "SUCCEEDED", created["targetRenders"]
    rendered = stand_in.rendered[name]
    assert sorted(rendered) == sorted(f"mlpipe-{e}" for e in PROJECTS)
    for env, project in PROJECTS.items():
        (service,) = rendered[f"mlpipe-{env}"]
        expected = yaml.safe_load((delivery.source / f"manifests/{env}/trainer.yaml").read_text())
        container = service["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == image
        variables = {e["name"]: e["value"] for e in container["env"]}
        # The trainer runs Vertex AI jobs from the image the release deploys.
        assert variables["MLPIPE_TRAINER_IMAGE"] == image
        assert variables["MLPIPE_PROJECT"] == project
        assert variables["MLPIPE_CODE_VERSION"] == SHA
        expected["spec"]["template"]["spec"]["containers"][0]["image"] = image
        assert service == expected
    # The first rollout goes to dev at once.
    rollouts = stand_in.of_kind("rollouts")
    assert [r["targetId"] for r in rollouts.values()] == ["mlpipe-dev"]
    assert next(iter(rollouts.values()))["state"] == "SUCCEEDED"

    # Built again (a retried build of the same commit): the release exists, nothing is created.
    again = run_build_step(delivery, "trainer")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "exists: nothing to create" in again.stdout
    assert len(stand_in.sent("POST", "releases")) == 1


def test_a_release_is_promoted_to_staging_then_waits_for_approval_before_prod(
    delivery: Delivery,
) -> None:
    """docs/deploy.md's walk-through: promote to staging, promote to prod (held for approval),
    reject, promote again, approve."""
    stand_in = delivery.stand_in
    assert run_build_step(delivery, "trainer").returncode == 0
    release_id = f"rel-{SHA[:7]}-trainer"
    where = ["--delivery-pipeline=mlpipe-trainer", f"--region={REGION}", f"--project={DELIVERY}"]

    def deploy(*args: str) -> str:
        done = gcloud(stand_in, ["deploy", *args, *where], delivery.config)
        assert done.returncode == 0, done.stderr
        return done.stderr

    def in_prod() -> list[dict[str, Any]]:
        found = [r for r in stand_in.of_kind("rollouts").values() if r["targetId"] == "mlpipe-prod"]
        return sorted(found, key=lambda r: r["name"])

    deploy("releases", "promote", f"--release={release_id}")
    (staging,) = [
        r for r in stand_in.of_kind("rollouts").values() if r["targetId"] == "mlpipe-staging"
    ]
    assert staging["state"] == "SUCCEEDED"

    said = deploy("releases", "promote", f"--release={release_id}")
    assert "pending approval" in said
    (held,) = in_prod()
    assert (held["state"], held["approvalState"]) == ("PENDING_APPROVAL", "NEEDS_APPROVAL")

    deploy("rollouts", "reject", held["name"].rsplit("/", 1)[-1], f"--release={release_id}")
    assert (held["state"], held["approvalState"]) == ("APPROVAL_REJECTED", "REJECTED")
    assert stand_in.sent("POST", "rollouts")[-1].body == {"approved": False}

    # Rejected is not deployed: promoting again asks again, under a new rollout.
    deploy("releases", "promote", f"--release={release_id}")
    rejected, again = in_prod()
    assert rejected is held and again["name"].endswith("-to-mlpipe-prod-0002")
    assert again["state"] == "PENDING_APPROVAL"

    deploy("rollouts", "approve", again["name"].rsplit("/", 1)[-1], f"--release={release_id}")

    assert (again["state"], again["approvalState"]) == ("SUCCEEDED", "APPROVED")
    assert stand_in.sent("POST", "rollouts")[-1].body == {"approved": True}
    # What prod runs is prod's manifest: its own identity.
    name = f"{location()}/deliveryPipelines/mlpipe-trainer/releases/{release_id}"
    (service,) = stand_in.rendered[name]["mlpipe-prod"]
    account = service["spec"]["template"]["spec"]["serviceAccountName"]
    assert account == f"mlpipe-trainer@{PROJECTS['prod']}.iam.gserviceaccount.com"


def test_a_release_for_a_stage_without_its_profile_fails_to_render(
    delivery: Delivery,
) -> None:
    """The stand-in's render is not a formality: a Skaffold config that lacks a stage's
    profile leaves the release unrendered for that stage, and no rollout is created."""
    skaffold = delivery.source / "skaffold.yaml"
    configs = list(yaml.safe_load_all(skaffold.read_text()))
    configs[0]["profiles"] = [p for p in configs[0]["profiles"] if p["name"] != "staging"]
    skaffold.write_text(yaml.safe_dump_all(configs))

    result = run_build_step(delivery, "trainer")

    name = f"{location()}/deliveryPipelines/mlpipe-trainer/releases/rel-{SHA[:7]}-trainer"
    assert delivery.stand_in.resources[name]["renderState"] == "FAILED"
    assert delivery.stand_in.resources[name]["targetRenders"]["mlpipe-staging"] == {
        "renderingState": "FAILED",
        "failureMessage": "couldn't find profile staging",
    }
    assert result.returncode != 0
    assert "not rendered" in result.stderr, result.stderr
    assert not delivery.stand_in.of_kind("rollouts")
