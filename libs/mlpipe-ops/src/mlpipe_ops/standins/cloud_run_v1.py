"""The Cloud Run Admin API **v1** surface of the local Cloud Run (the Knative serving API that
`gcloud run deploy` uses), over the same services and revisions as the v2 surface in
`mlpipe_ops.standins.cloud_run`: a service deployed by gcloud is the one the deployer's v2
client then rolls models out on.

gcloud derives Cloud Run's regional endpoint by prefixing the region to the host of its
endpoint override (`us-central1-run.googleapis.com`), which no 127.0.0.1 URL survives. So the
overrides name hosts under the reserved `.test` domain and gcloud reaches them through its
HTTP proxy setting, which is the stand-in: each request arrives with its full URL
(`gcloud_env` gives the variables). Anything else (an HTTPS CONNECT to a real Google host) is
refused.

Rules V1 to V8 in docs/cloud-run-standin.md; the comments name them.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from google.cloud import run_v2

from mlpipe_ops.service_runtime import memory_bytes
from mlpipe_ops.standins.google_api import ApiError

if TYPE_CHECKING:
    from mlpipe_ops.standins.cloud_run import CloudRunStandIn

RUN_HOST = "run.googleapis.test"
USAGE_HOST = "serviceusage.googleapis.test"
KNATIVE = "/apis/serving.knative.dev/v1/namespaces/"
# V2: a service name is lowercase letters, digits and hyphens, a letter first, no hyphen last,
# at most 49 characters (reference: namespaces.services, metadata.name).
SERVICE_NAME = re.compile(r"^[a-z](?:[-a-z0-9]{0,47}[a-z0-9])?$")
IAM_PATH = re.compile(
    r"^/v1/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/services/"
    r"(?P<name>[^/:]+):(?P<verb>\w+)$"
)
RESERVED_ENV = {"PORT", "K_SERVICE", "K_REVISION", "K_CONFIGURATION"}
MIN_SCALE = "autoscaling.knative.dev/minScale"
MAX_SCALE = "autoscaling.knative.dev/maxScale"
CPU_THROTTLING = "run.googleapis.com/cpu-throttling"
EXECUTION_ENVIRONMENT = "run.googleapis.com/execution-environment"
GEN2 = run_v2.ExecutionEnvironment.EXECUTION_ENVIRONMENT_GEN2
GEN1 = run_v2.ExecutionEnvironment.EXECUTION_ENVIRONMENT_GEN1
LATEST = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST
REVISION = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION


@dataclass
class Request:
    method: str
    host: str
    path: str
    body: Any


@dataclass
class GcloudSurface:
    stand_in: CloudRunStandIn
    seen: list[Request] = field(default_factory=list)
    policies: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def region_host(self) -> str:
        return f"{self.stand_in.region}-{RUN_HOST}"

    def sent(self, method: str, host: str = "") -> list[Request]:
        host = host or self.region_host
        return [r for r in self.seen if r.method == method and r.host == host]

    def gcloud_env(self) -> dict[str, str]:
        """What gcloud needs to deploy to this stand-in and nowhere else."""
        return {
            "CLOUDSDK_API_ENDPOINT_OVERRIDES_RUN": f"http://{RUN_HOST}/",
            "CLOUDSDK_API_ENDPOINT_OVERRIDES_SERVICEUSAGE": f"http://{USAGE_HOST}/",
            "CLOUDSDK_PROXY_TYPE": "http",
            "CLOUDSDK_PROXY_ADDRESS": "127.0.0.1",
            "CLOUDSDK_PROXY_PORT": str(self.stand_in.port),
            "CLOUDSDK_AUTH_DISABLE_CREDENTIALS": "true",
            "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
            "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "true",
            "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "true",
        }

    # --- requests ----------------------------------------------------------------------------
    def handle(self, method: str, host: str, path: str, body: Any) -> Any:
        self.seen.append(Request(method, host, path, body))
        stand_in = self.stand_in
        if host == USAGE_HOST and method == "GET":
            # Service Usage v1 services.get: the API under the project's number, enabled.
            api = path.rsplit("/", 1)[-1]
            number = stand_in.project_number
            return {
                "name": f"projects/{number}/services/{api}",
                "parent": f"projects/{number}",
                "config": {"name": api},
                "state": "ENABLED",
            }
        iam = IAM_PATH.match(path)
        if host == RUN_HOST and iam:
            self._project(iam["project"])
            return self._iam(method, iam["location"], iam["name"], iam["verb"], body)
        if host != self.region_host or not path.startswith(KNATIVE):
            raise ApiError("NOT_FOUND", f"the stand-in does not serve {host}{path}")
        namespace, _, rest = path.removeprefix(KNATIVE).partition("/")
        self._project(namespace)
        parts = rest.split("/")
        location = stand_in.region
        if method == "POST" and parts == ["services"]:
            problem = _invalid(body)
            if problem:
                raise ApiError("INVALID_ARGUMENT", problem)
            name = body["metadata"]["name"]
            stand_in.create_service(location, name, to_v2(body))
            return self.knative(location, name)
        if len(parts) == 2 and parts[0] == "services":
            name = parts[1]
            if method == "GET":
                return self.knative(location, name)
            if method == "PUT":
                problem = _invalid(body)
                if problem:
                    raise ApiError("INVALID_ARGUMENT", problem)
                stand_in.replace_service(location, name, to_v2(body))
                return self.knative(location, name)
        raise ApiError("NOT_FOUND", f"{method} {path} is not a Cloud Run v1 method")

    def _project(self, project: str) -> None:
        # V1: the namespace is the project id or number (reference: namespaces.services).
        if project not in (self.stand_in.project_id, self.stand_in.project_number):
            raise ApiError("NOT_FOUND", f"project {project} not found")

    def _iam(self, method: str, location: str, name: str, verb: str, body: Any) -> Any:
        # V8: projects.locations.services.getIamPolicy (GET) and setIamPolicy (POST, the whole
        # policy; an etag that is not the current one is refused with ABORTED, google.iam.v1).
        self.stand_in.service_message(location, name)  # NOT_FOUND for a missing service
        current = self.policies.setdefault(name, {"version": 1, "etag": etag(1)})
        if verb == "getIamPolicy" and method == "GET":
            return current
        if verb == "setIamPolicy" and method == "POST":
            policy = body["policy"]
            # etag is bytes, base64 in JSON: compare the bytes, not the spelling.
            sent = base64.b64decode(policy.get("etag", ""))
            if sent and sent != base64.b64decode(current["etag"]):
                raise ApiError("ABORTED", "There were concurrent policy changes.")
            serial = int.from_bytes(base64.b64decode(current["etag"]), "big") + 1
            self.policies[name] = {**policy, "version": 1, "etag": etag(serial)}
            return self.policies[name]
        raise ApiError("NOT_FOUND", f"{method} {verb} is not an IAM method")

    # --- the Knative form of a service ------------------------------------------------------
    def knative(self, location: str, name: str) -> dict[str, Any]:
        """V3: the Service as Cloud Run v1 returns it: server-set metadata (the namespace is the
        project number), and status with the Ready, ConfigurationsReady and RoutesReady
        conditions, Ready "True" once the latest change reconciled, "False" if it failed,
        "Unknown" while it runs (reference: namespaces.services, ServiceStatus)."""
        service = self.stand_in.service_message(location, name)
        number = self.stand_in.project_number
        out = to_knative(service)
        created = service.create_time
        out["metadata"].update(
            name=name,
            namespace=number,
            uid=service.uid,
            generation=int(service.generation),
            resourceVersion=f"AAY{int(service.generation):04d}",
            creationTimestamp=(created.isoformat() if isinstance(created, dt.datetime) else ""),
            selfLink=f"{KNATIVE}{number}/services/{name}",
        )
        out["metadata"].setdefault("labels", {})["cloud.googleapis.com/location"] = location
        if service.reconciling:
            ready = "Unknown"
        elif service.observed_generation == service.generation:
            ready = "True"
        else:
            ready = "False"
        conditions = [
            {"type": t, "status": ready, "lastTransitionTime": "2025-01-01T00:00:01Z"}
            for t in ("Ready", "ConfigurationsReady", "RoutesReady")
        ]
        if ready == "False":
            conditions[0]["message"] = "the latest change failed to reconcile"
        latest_created = service.latest_created_revision.rsplit("/", 1)[-1]
        latest_ready = service.latest_ready_revision.rsplit("/", 1)[-1]
        status: dict[str, Any] = {
            "observedGeneration": int(service.observed_generation),
            "conditions": conditions,
            "latestCreatedRevisionName": latest_created,
        }
        if latest_ready:
            status |= {
                "latestReadyRevisionName": latest_ready,
                "url": service.uri,
                "address": {"url": service.uri},
                "traffic": [
                    {
                        "revisionName": t.revision,
                        "percent": t.percent,
                        **({"tag": t.tag} if t.tag else {}),
                        **({"latestRevision": True} if t.type_ == LATEST else {}),
                    }
                    for t in service.traffic_statuses
                ],
            }
        out["status"] = status
        return out


def etag(serial: int) -> str:
    return base64.b64encode(serial.to_bytes(8, "big")).decode()


def _invalid(service: Any) -> str:
    """V4: the documented limits a Service is refused for (400 INVALID_ARGUMENT), each with its
    page under cloud.google.com/run/docs."""
    if not isinstance(service, dict):
        return "the body must be a Service"
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
    annotations = service["spec"]["template"].get("metadata", {}).get("annotations", {})
    for container in spec["containers"]:
        env = {e["name"] for e in container.get("env", [])}
        if env & RESERVED_ENV:  # reference/container-contract#env-vars
            return f"env {sorted(env & RESERVED_ENV)[0]} is reserved"
        memory = container.get("resources", {}).get("limits", {}).get("memory", "512Mi")
        if annotations.get(EXECUTION_ENVIRONMENT) == "gen2" and memory_bytes(memory) < 512 * 2**20:
            return "gen2 needs at least 512Mi"  # configuring/services/memory-limits
    return ""


def to_v2(knative: dict[str, Any]) -> run_v2.Service:
    """V5: the v2 Service a Knative Service stands for: the revision template's name, labels,
    annotations (scaling, CPU allocation and execution environment in their v2 fields), the
    spec's concurrency, timeout, service account and containers, and the traffic list
    (reference: the v1 YAML reference and the fields of google.cloud.run.v2.Service)."""
    template = knative["spec"]["template"]
    meta = dict(template.get("metadata") or {})
    spec = template["spec"]
    annotations = dict(meta.get("annotations") or {})
    scaling = run_v2.RevisionScaling()
    if MIN_SCALE in annotations:
        scaling.min_instance_count = int(annotations.pop(MIN_SCALE))
    if MAX_SCALE in annotations:
        scaling.max_instance_count = int(annotations.pop(MAX_SCALE))
    throttled = annotations.pop(CPU_THROTTLING, "true").lower() == "true"
    environment = annotations.pop(EXECUTION_ENVIRONMENT, "")
    containers = []
    for c in spec.get("containers", []):
        containers.append(
            run_v2.Container(
                name=c.get("name", ""),
                image=c.get("image", ""),
                command=list(c.get("command", [])),
                args=list(c.get("args", [])),
                env=[
                    run_v2.EnvVar(name=e["name"], value=str(e.get("value", "")))
                    for e in c.get("env", [])
                ],
                resources=run_v2.ResourceRequirements(
                    limits=dict(c.get("resources", {}).get("limits", {})),
                    cpu_idle=throttled,
                ),
                ports=[
                    run_v2.ContainerPort(
                        name=p.get("name", ""), container_port=int(p["containerPort"])
                    )
                    for p in c.get("ports", [])
                ],
            )
        )
    out = run_v2.Service(
        template=run_v2.RevisionTemplate(
            revision=meta.get("name", ""),
            labels=dict(meta.get("labels") or {}),
            annotations=annotations,
            scaling=scaling,
            service_account=spec.get("serviceAccountName", ""),
            max_instance_request_concurrency=int(spec.get("containerConcurrency", 80)),
            timeout=dt.timedelta(seconds=int(spec.get("timeoutSeconds", 300))),
            execution_environment=GEN2 if environment == "gen2" else GEN1 if environment else 0,
            containers=containers,
        )
    )
    for t in knative["spec"].get("traffic", []):
        latest = bool(t.get("latestRevision"))
        out.traffic.append(
            run_v2.TrafficTarget(
                type_=LATEST if latest else REVISION,
                revision="" if latest else t.get("revisionName", ""),
                percent=int(t.get("percent", 0)),
                tag=t.get("tag", ""),
            )
        )
    return out


def to_knative(service: run_v2.Service) -> dict[str, Any]:
    """V5 the other way: the Knative form of a v2 Service's template and traffic."""
    template = service.template
    annotations = dict(template.annotations)
    if template.scaling.min_instance_count:
        annotations[MIN_SCALE] = str(template.scaling.min_instance_count)
    if template.scaling.max_instance_count:
        annotations[MAX_SCALE] = str(template.scaling.max_instance_count)
    if template.execution_environment == GEN2:
        annotations[EXECUTION_ENVIRONMENT] = "gen2"
    elif template.execution_environment == GEN1:
        annotations[EXECUTION_ENVIRONMENT] = "gen1"
    containers = []
    for c in template.containers:
        if "resources" in c and not c.resources.cpu_idle:
            annotations[CPU_THROTTLING] = "false"
        container: dict[str, Any] = {"image": c.image}
        if c.name:
            container["name"] = c.name
        if c.command:
            container["command"] = list(c.command)
        if c.args:
            container["args"] = list(c.args)
        if c.env:
            container["env"] = [{"name": e.name, "value": e.value} for e in c.env]
        if c.resources.limits:
            container["resources"] = {"limits": dict(c.resources.limits)}
        if c.ports:
            container["ports"] = [
                {"name": p.name, "containerPort": p.container_port} for p in c.ports
            ]
        containers.append(container)
    meta: dict[str, Any] = {}
    if template.revision:
        meta["name"] = template.revision
    if template.labels:
        meta["labels"] = dict(template.labels)
    if annotations:
        meta["annotations"] = annotations
    spec: dict[str, Any] = {
        "containerConcurrency": template.max_instance_request_concurrency or 80,
        # proto-plus reads a Duration field as a timedelta.
        "timeoutSeconds": (
            int(template.timeout.total_seconds())  # type: ignore[attr-defined]
            if "timeout" in template
            else 300
        ),
        "containers": containers,
    }
    if template.service_account:
        spec["serviceAccountName"] = template.service_account
    traffic = [
        {
            **({"latestRevision": True} if t.type_ == LATEST else {"revisionName": t.revision}),
            "percent": t.percent,
            **({"tag": t.tag} if t.tag else {}),
        }
        for t in service.traffic
    ] or [{"latestRevision": True, "percent": 100}]  # Knative's default: all to the latest
    return {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {},
        "spec": {"template": {"metadata": meta, "spec": spec}, "traffic": traffic},
    }
