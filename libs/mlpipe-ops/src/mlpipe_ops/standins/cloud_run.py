"""A local Cloud Run Admin API v2: services and revisions, answering as the reference says.

The real `google-cloud-run` clients drive it over REST (`transport="rest"`,
`client_options={"api_endpoint": stand_in.url}`, anonymous credentials):
- services.create and services.patch (long-running operations), services.get;
- revisions.list and revisions.get;
- operations.get for every operation name the above return.

It keeps what the Cloud Run control plane keeps: the Service (the desired state: a revision
template and a traffic list), the revisions each new template made, and the operation that
reconciles one change. Operations finish `operation_seconds` after they start, on a clock the
caller may move (`advance`). By default nothing is run: a revision "serves" when its image is
one the stand-in knows (`images`, every image when not given). With `run_containers=True`,
each new revision runs its image on the local Docker engine under Cloud Run's container
contract, and its change finishes once the container listens on PORT (or fails when it exits
first); `revision_url` is where that revision answers.

Every rule and its source are listed in docs/cloud-run-standin.md; the comments name the rule.
"""

from __future__ import annotations

import json
import random
import re
import string
import threading
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from google.cloud import run_v2

from mlpipe_ops import containers as docker
from mlpipe_ops.service_runtime import memory_bytes
from mlpipe_ops.standins.cloud_run_v1 import GcloudSurface, Request
from mlpipe_ops.standins.google_api import (
    ApiError,
    check_labels,
    close,
    dumps,
    read_body,
    send_json,
    serve,
    timestamp,
)

DEFAULT_PROJECT_NUMBER = "123456789012"
HOST = "127.0.0.1"
LABEL = "dev.mlpipe.cloud-run-standin"
LOG_TAIL_LINES = 20
SERVICE_TYPE = "type.googleapis.com/google.cloud.run.v2.Service"
REVISION = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION
LATEST = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST
# Rule 5: a service id is a lowercase letter, then up to 48 of [a-z0-9-], not ending in '-'.
SERVICE_ID = re.compile(r"^[a-z](?:[-a-z0-9]{0,47}[a-z0-9])?$")
# Rule 13: a revision name is at most 63 of [a-z0-9-] (a DNS label).
REVISION_NAME = re.compile(r"^[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?$")
# Rule 17: a tag is a DNS label part of the tagged URL.
TAG = re.compile(r"^[a-z](?:[-a-z0-9]{0,44}[a-z0-9])?$")
PATH = re.compile(
    r"^/v2/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)"
    r"(?:/(?P<kind>services|operations)(?:/(?P<id>[^/:]+))?"
    r"(?:/revisions(?:/(?P<revision>[^/]+))?)?)?$"
)


@dataclass
class _Operation:
    name: str
    service: tuple[str, str]
    generation: int
    due: float
    done: bool = False
    error: dict[str, Any] | None = None
    # Refusals the control plane reports through the operation, not the request (rule 16).
    fails_with: ApiError | None = None


@dataclass
class _Service:
    location: str
    service_id: str
    body: run_v2.Service
    created: str
    generation: int = 1
    revisions: dict[str, run_v2.Revision] = field(default_factory=dict)
    # The revision each generation's template made (rule 12); a failed one never serves.
    latest_created: str = ""
    failed: dict[str, str] = field(default_factory=dict)  # revision → why it is not ready
    # What the last change that reconciled without error serves (rule 8).
    observed_generation: int = 0
    latest_ready: str = ""
    serving: list[run_v2.TrafficTargetStatus] = field(default_factory=list)


class CloudRunStandIn:
    """The stand-in: `start()` serves it on 127.0.0.1 in a thread, `stop()` ends it."""

    def __init__(
        self,
        project_id: str,
        *,
        project_number: str = DEFAULT_PROJECT_NUMBER,
        port: int = 0,
        operation_seconds: float = 0.5,
        images: Collection[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
        region: str = "us-central1",
        run_containers: bool = False,
        cloud_env: dict[str, str] | None = None,
        start_timeout: float = 240.0,
    ) -> None:
        if not project_number.isdigit():
            raise ValueError(f"a project number is all digits, not {project_number!r}")
        self.project_id = project_id
        self.project_number = project_number
        self.port = port
        self.operation_seconds = operation_seconds
        self.images = None if images is None else set(images)
        self._clock = clock
        self._offset = 0.0
        self._random = random.Random(seed)
        self._lock = threading.RLock()
        self._services: dict[tuple[str, str], _Service] = {}
        self._operations: dict[str, _Operation] = {}
        self._server: ThreadingHTTPServer | None = None
        # Every request that changed a service: (method, service name). Tests count them.
        self.changes: list[tuple[str, str]] = []
        self.id = uuid.uuid4().hex[:8]
        self.region = region
        # The v1 (Knative) surface `gcloud run deploy` uses, over the same services.
        self.gcloud = GcloudSurface(self)
        self.run_containers = run_containers
        # Locally, Google Cloud is the emulators: every container gets their hosts.
        self.cloud_env = dict(cloud_env or {})
        self.start_timeout = start_timeout
        self._ports: dict[str, int] = {}
        self._started: list[str] = []
        self._stopping = threading.Event()

    # --- life cycle --------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def client_options(self) -> dict[str, str]:
        return {"api_endpoint": self.url}

    def start(self) -> CloudRunStandIn:
        self._server = serve(_handler(self), self.port, "cloud-run")
        self.port = self._server.server_address[1]
        return self

    def stop(self) -> None:
        """Stops serving and removes every container the stand-in started (and no other)."""
        self._stopping.set()
        close(self._server)
        self._server = None
        for name in self._started:
            docker.docker("rm", "--force", name, check=False, timeout=60)
        self._started.clear()

    def revision_url(self, revision: str) -> str:
        """Where a running revision's container answers (run_containers only)."""
        return f"http://{HOST}:{self._ports[revision]}"

    def container_name(self, revision: str) -> str:
        return f"cloudrun-{self.id}-{revision}"[:128]

    def __enter__(self) -> CloudRunStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def now(self) -> float:
        return self._clock() + self._offset

    def advance(self, seconds: float) -> None:
        """Move the stand-in's clock on: operations due by then finish at the next request."""
        self._offset += seconds

    def add_image(self, image: str) -> None:
        """An image pushed to the registry the stand-in knows (rule 20)."""
        if self.images is not None:
            self.images.add(image)

    # --- requests ----------------------------------------------------------------------------
    def handle(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> Any:
        with self._lock:
            self._finish_due()
            match = PATH.match(path)
            if not match:
                raise ApiError("NOT_FOUND", f"the stand-in does not serve {path}")
            project, location = match["project"], match["location"]
            if project not in (self.project_id, self.project_number):
                # Rule 3: another project is not ours (no IAM here).
                raise ApiError("PERMISSION_DENIED", f"Permission denied on project {project}.")
            kind, rid, revision = match["kind"], match["id"], match["revision"]
            if kind == "operations" and rid and method == "GET":
                return self._operation_json(self._operation(location, rid))
            if kind != "services":
                raise ApiError("NOT_FOUND", f"{method} {path} is not a Cloud Run v2 method")
            if rid is None:
                if method == "POST":
                    return self._create(location, query.get("serviceId", [""])[0], body)
                raise ApiError("UNIMPLEMENTED", f"{method} {path}: not served by the stand-in")
            if "/revisions" in path:
                svc = self._service(location, rid)
                if revision is None and method == "GET":
                    return {"revisions": [self._revision_json(svc, r) for r in svc.revisions]}
                if revision is not None and method == "GET":
                    if revision not in svc.revisions:
                        raise ApiError("NOT_FOUND", f"Revision '{revision}' does not exist.")
                    return self._revision_json(svc, revision)
                raise ApiError("UNIMPLEMENTED", f"{method} {path}: not served by the stand-in")
            if method == "GET":
                return self._service_json(self._service(location, rid))
            if method == "PATCH":
                allow_missing = query.get("allowMissing", ["false"])[0] == "true"
                if (location, rid) not in self._services and allow_missing:
                    return self._create(location, rid, body)
                return self._update(location, rid, body)
            raise ApiError("UNIMPLEMENTED", f"{method} {path}: not served by the stand-in")

    def handle_gcloud(self, method: str, host: str, path: str, body: Any) -> Any:
        """A request through the proxy setting (its full URL): the v1 surface."""
        with self._lock:
            self._finish_due()
            return self.gcloud.handle(method, host, path, body)

    def service_message(self, location: str, service_id: str) -> run_v2.Service:
        return self._service_message(self._service(location, service_id))

    def create_service(self, location: str, service_id: str, service: run_v2.Service) -> Any:
        if not SERVICE_ID.match(service_id):
            raise ApiError("INVALID_ARGUMENT", f"serviceId {service_id!r} is not a valid name")
        if (location, service_id) in self._services:
            # Rule 7.
            raise ApiError("ALREADY_EXISTS", f"Resource '{service_id}' already exists.")
        svc = _Service(location, service_id, run_v2.Service(), created=timestamp())
        new_name, deferred = self._check(svc, service)
        self._services[(location, service_id)] = svc
        self.changes.append(("create", service_id))
        return self._apply(svc, service, new_name, deferred, generation=1)

    def replace_service(self, location: str, service_id: str, service: run_v2.Service) -> Any:
        svc = self._service(location, service_id)
        if service.etag and service.etag != self._etag(svc):
            # Rule 9: an etag that is not the current one is a concurrent change.
            raise ApiError("ABORTED", "The service has been modified; read it again and retry.")
        new_name, deferred = self._check(svc, service)
        self.changes.append(("update", service_id))
        return self._apply(svc, service, new_name, deferred, generation=svc.generation + 1)

    def _service(self, location: str, service_id: str) -> _Service:
        svc = self._services.get((location, service_id))
        if svc is None:
            # Rule 6: an unknown service is NOT_FOUND.
            raise ApiError(
                "NOT_FOUND", f"Resource '{service_id}' of kind 'SERVICE' does not exist."
            )
        return svc

    def _operation(self, location: str, op_id: str) -> _Operation:
        name = self._name(location, "operations", op_id)
        if name not in self._operations:
            raise ApiError("NOT_FOUND", f"Operation '{name}' not found.")
        return self._operations[name]

    def _name(self, location: str, kind: str, rid: str) -> str:
        # Rule 2: names carry the project number (assumed, as Vertex AI and Cloud Run v1 do).
        return f"projects/{self.project_number}/locations/{location}/{kind}/{rid}"

    # --- create and update -------------------------------------------------------------------
    def _parse(self, body: Any) -> run_v2.Service:
        try:
            return run_v2.Service.from_json(json.dumps(body or {}), ignore_unknown_fields=True)
        except Exception as exc:
            raise ApiError("INVALID_ARGUMENT", f"Invalid JSON payload received. {exc}") from None

    def _create(self, location: str, service_id: str, body: Any) -> Any:
        return self.create_service(location, service_id, self._parse(body))

    def _update(self, location: str, service_id: str, body: Any) -> Any:
        self._service(location, service_id)
        service = self._parse(body)
        sent = service.name.rsplit("/", 1)[-1] if service.name else service_id
        if sent != service_id:
            raise ApiError("INVALID_ARGUMENT", f"service.name {service.name!r} is not {service_id}")
        return self.replace_service(location, service_id, service)

    def _check(self, svc: _Service, service: run_v2.Service) -> tuple[str, ApiError | None]:
        """Refuses what the reference refuses; returns the name of the revision the request
        makes ("" for none) and the error its operation will end with, if any."""
        template = service.template
        # Rule 27: labels of the service and of its revision template follow Google's label
        # rules; a namespaced key (prefix/name, Kubernetes' form, which gcloud's Knative
        # surface sets: client.knative.dev/nonce) is left to the Knative rules.
        for where, found in (("labels", service.labels), ("template.labels", template.labels)):
            check_labels({k: v for k, v in found.items() if "/" not in k}, where)
        if not template.containers or not template.containers[0].image:
            # Rule 10: a revision template names at least one container image.
            raise ApiError("INVALID_ARGUMENT", "template.containers[0].image: must be specified")
        for container in template.containers:
            reserved = {e.name for e in container.env} & {"PORT", "K_SERVICE", "K_REVISION"}
            if reserved:
                # Rule 11.
                names = ", ".join(sorted(reserved))
                raise ApiError(
                    "INVALID_ARGUMENT", f"The following reserved env names were provided: {names}."
                )
        new_name = self._new_revision_name(svc, service)
        if new_name:
            if not REVISION_NAME.match(new_name) or not new_name.startswith(svc.service_id + "-"):
                # Rule 13.
                raise ApiError(
                    "INVALID_ARGUMENT",
                    f"template.revision {new_name!r} must start with '{svc.service_id}-' and be "
                    "at most 63 of [a-z0-9-]",
                )
            if new_name in svc.revisions:
                # Rule 14: a revision is immutable; its name cannot be given to a new template.
                raise ApiError(
                    "ALREADY_EXISTS",
                    f"Revision named '{new_name}' with different configuration already exists.",
                )
        return new_name, self._check_traffic(svc, service, new_name)

    def _check_traffic(
        self, svc: _Service, service: run_v2.Service, new_name: str
    ) -> ApiError | None:
        traffic = service.traffic
        if not traffic:
            return None  # Rule 15: no traffic means 100% to the latest ready revision.
        total = 0
        tags: set[str] = set()
        deferred = None
        for target in traffic:
            if target.percent < 0 or target.percent > 100:
                raise ApiError("INVALID_ARGUMENT", f"percent {target.percent} is not 0..100")
            total += target.percent
            if target.type_ == REVISION:
                # Rule 16: a revision target names a revision of this service that exists, or
                # the one this request creates.
                if not target.revision:
                    raise ApiError("INVALID_ARGUMENT", "traffic.revision: must be specified")
                if target.revision not in svc.revisions and target.revision != new_name:
                    deferred = deferred or ApiError(
                        "INTERNAL",
                        f"Revision '{target.revision}' does not exist or is deleted. Update all "
                        "traffic to route to currently available revisions.",
                    )
            elif target.type_ == LATEST:
                if target.revision:
                    raise ApiError("INVALID_ARGUMENT", "a LATEST target names no revision")
            else:
                raise ApiError("INVALID_ARGUMENT", "traffic.type: must be REVISION or LATEST")
            if target.tag:
                # Rule 17: tags are unique and DNS labels.
                if not TAG.match(target.tag):
                    raise ApiError("INVALID_ARGUMENT", f"tag {target.tag!r} is not valid")
                if target.tag in tags:
                    raise ApiError("INVALID_ARGUMENT", f"tag {target.tag!r} is used twice")
                tags.add(target.tag)
        if total != 100:
            # Rule 15: the percentages add up to 100.
            raise ApiError(
                "INVALID_ARGUMENT", f"The traffic percentages add up to {total}, not 100."
            )
        return deferred

    def _new_revision_name(self, svc: _Service, service: run_v2.Service) -> str:
        """The revision this request's template makes, or "" when the template is unchanged
        (rule 12)."""
        if svc.revisions and _template_key(service.template) == _template_key(svc.body.template):
            return ""
        if service.template.revision:
            return service.template.revision
        # Rule 12: a generated name is '<service>-<generation, 5 digits>-<3 letters>'.
        letters = "".join(self._random.choice(string.ascii_lowercase) for _ in range(3))
        generation = svc.generation + 1 if svc.revisions else 1
        return f"{svc.service_id}-{generation:05d}-{letters}"

    def _apply(
        self,
        svc: _Service,
        service: run_v2.Service,
        new_name: str,
        deferred: ApiError | None,
        *,
        generation: int,
    ) -> Any:
        stored = run_v2.Service(service)
        stored.template.revision = service.template.revision
        svc.body = stored
        svc.generation = generation
        if new_name:
            revision = run_v2.Revision(
                name=self._name(svc.location, "services", svc.service_id)
                + f"/revisions/{new_name}",
                uid=str(uuid.uuid4()),
                generation=1,
                labels=dict(service.template.labels),
                annotations=dict(service.template.annotations),
                service=self._name(svc.location, "services", svc.service_id),
                containers=list(service.template.containers),
                service_account=service.template.service_account,
                scaling=service.template.scaling,
                timeout=service.template.timeout,
                max_instance_request_concurrency=service.template.max_instance_request_concurrency,
                execution_environment=service.template.execution_environment,
                reconciling=True,
            )
            svc.revisions[new_name] = revision
            svc.latest_created = new_name
            if self.run_containers:
                self._start_revision(svc, revision, new_name)
        op_id = str(uuid.UUID(int=self._random.getrandbits(128)))
        op = _Operation(
            self._name(svc.location, "operations", op_id),
            (svc.location, svc.service_id),
            generation,
            due=self.now() + self.operation_seconds,
            fails_with=deferred,
        )
        self._operations[op.name] = op
        return self._operation_json(op)

    # --- reconciliation ----------------------------------------------------------------------
    def _finish_due(self) -> None:
        now = self.now()
        for op in sorted(self._operations.values(), key=lambda o: o.due):
            if op.done or op.due > now:
                continue
            svc = self._services[op.service]
            op.done = True
            if op.generation != svc.generation:
                continue  # Rule 22: superseded by a later change, which reconciles instead.
            created = svc.latest_created
            revision = svc.revisions.get(created)
            if revision is not None and revision.reconciling and self.run_containers:
                op.done = False  # Rule 25: done once the container listens, or has failed.
                continue
            if revision is not None and revision.reconciling:
                revision.reconciling = False
                missing = [
                    c.image
                    for c in revision.containers
                    if self.images is not None and c.image not in self.images
                ]
                if missing:
                    # Rule 20: a revision whose image cannot be pulled never becomes ready.
                    svc.failed[created] = f"Image '{missing[0]}' not found."
                    op.error = ApiError(
                        "FAILED_PRECONDITION",
                        f"Revision '{created}' is not ready and cannot serve traffic. "
                        + svc.failed[created],
                    ).rpc_status()
                    continue
            if op.fails_with is not None:
                op.error = op.fails_with.rpc_status()
                continue
            if any(t.type_ == REVISION and t.revision in svc.failed for t in svc.body.traffic):
                # Rule 20: traffic cannot go to a revision that failed.
                bad = next(t.revision for t in svc.body.traffic if t.revision in svc.failed)
                op.error = ApiError(
                    "FAILED_PRECONDITION",
                    f"Revision '{bad}' is not ready and cannot serve traffic.",
                ).rpc_status()
                continue
            # Rule 8: reconciled; the service serves what it says.
            ready = [n for n in svc.revisions if n not in svc.failed]
            svc.latest_ready = ready[-1] if ready else ""
            svc.observed_generation = op.generation
            svc.serving = _resolve_traffic(svc.body.traffic, svc.latest_ready)

    # --- containers (run_containers) ---------------------------------------------------------
    def _start_revision(self, svc: _Service, revision: run_v2.Revision, name: str) -> None:
        port = _free_port()
        self._ports[name] = port
        container = revision.containers[0]
        limits = dict(container.resources.limits)
        memory = str(memory_bytes(limits.get("memory", "512Mi")))
        # Rule 25: the container contract's variables, then the revision's own.
        env = {
            "PORT": str(port),
            "K_SERVICE": svc.service_id,
            "K_REVISION": name,
            "K_CONFIGURATION": svc.service_id,
            **self.cloud_env,
            **{e.name: e.value for e in container.env},
        }
        args = ["run", "--detach", "--name", self.container_name(name), "--network", "host"]
        args += ["--label", f"{LABEL}={self.id}", "--user", docker.USER]
        args += ["--memory", memory, "--memory-swap", memory]
        args += ["--cpus", limits.get("cpu", "1"), "--read-only"]
        args += ["--tmpfs", f"/tmp:rw,nosuid,nodev,mode=1777,size={memory}"]
        for key, value in env.items():
            args += ["--env", f"{key}={value}"]
        self._started.append(self.container_name(name))
        threading.Thread(
            target=self._watch_revision, args=(svc, name, args, container.image), daemon=True
        ).start()

    def _watch_revision(self, svc: _Service, name: str, args: list[str], image: str) -> None:
        container = self.container_name(name)
        started = docker.docker(*args, image, check=False, timeout=120)
        why = ""
        if started.returncode != 0:
            why = f"Image '{image}' not found. {started.stderr.strip()[-300:]}"
        else:
            why = self._wait_listening(container, self._ports[name])
        with self._lock:
            revision = svc.revisions[name]
            revision.reconciling = False
            if why:
                svc.failed[name] = why
            self._finish_containers(svc, name)

    def _wait_listening(self, container: str, port: int) -> str:
        """Empty once the container accepts TCP connections on `port`; else why it did not."""
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline and not self._stopping.is_set():
            if not _port_open(port):
                state = docker.docker(
                    "inspect", "--format", "{{.State.Running}}", container, check=False
                )
                if state.stdout.strip() != "true":
                    break
                time.sleep(0.25)
                continue
            return ""
        logs = docker.docker("logs", "--tail", str(LOG_TAIL_LINES), container, check=False)
        tail = (logs.stdout + logs.stderr).strip()
        # Rule 25: the message Cloud Run gives a container that never listened.
        return (
            "The user-provided container failed to start and listen on the port defined "
            f"provided by the PORT={port} environment variable within the allocated timeout. "
            f"Logs for this revision: {tail[-2000:]}"
        )

    def _finish_containers(self, svc: _Service, name: str) -> None:
        """The change that made revision `name` ends now, as the clock-driven ones do."""
        for op in self._operations.values():
            if op.service != (svc.location, svc.service_id) or op.done:
                continue
            if op.generation != svc.generation:
                op.done = True
                continue
            op.done = True
            if name in svc.failed:
                op.error = ApiError(
                    "FAILED_PRECONDITION",
                    f"Revision '{name}' is not ready and cannot serve traffic. " + svc.failed[name],
                ).rpc_status()
            elif op.fails_with is not None:
                op.error = op.fails_with.rpc_status()
            else:
                ready = [n for n in svc.revisions if n not in svc.failed]
                svc.latest_ready = ready[-1] if ready else ""
                svc.observed_generation = op.generation
                svc.serving = _resolve_traffic(svc.body.traffic, svc.latest_ready)

    def _reconciling(self, svc: _Service) -> bool:
        return any(
            not op.done
            for op in self._operations.values()
            if op.service == (svc.location, svc.service_id)
        )

    def _etag(self, svc: _Service) -> str:
        return f'"{svc.service_id}-{svc.generation}"'

    # --- JSON --------------------------------------------------------------------------------
    def _service_message(self, svc: _Service) -> run_v2.Service:
        out = run_v2.Service(svc.body)
        out.name = self._name(svc.location, "services", svc.service_id)
        out.uid = str(uuid.uuid5(uuid.NAMESPACE_URL, out.name))
        out.generation = svc.generation
        out.create_time = svc.created  # type: ignore[assignment]
        out.etag = self._etag(svc)
        reconciling = self._reconciling(svc)
        out.reconciling = reconciling
        out.observed_generation = svc.observed_generation
        out.latest_created_revision = (
            f"{out.name}/revisions/{svc.latest_created}" if svc.latest_created else ""
        )
        latest_ready = svc.latest_ready
        out.latest_ready_revision = f"{out.name}/revisions/{latest_ready}" if latest_ready else ""
        # Rule 16: traffic names revisions by their id, as the request does.
        out.traffic_statuses = list(svc.serving)
        out.uri = f"https://{svc.service_id}-{self.project_number}.{svc.location}.run.app"
        failed = not reconciling and svc.observed_generation != svc.generation
        out.terminal_condition = run_v2.Condition(
            type_="Ready",
            state=(
                run_v2.Condition.State.CONDITION_RECONCILING
                if reconciling
                else run_v2.Condition.State.CONDITION_FAILED
                if failed
                else run_v2.Condition.State.CONDITION_SUCCEEDED
            ),
        )
        return out

    def _service_json(self, svc: _Service) -> Any:
        return json.loads(run_v2.Service.to_json(self._service_message(svc)))

    def _revision_json(self, svc: _Service, name: str) -> Any:
        revision = run_v2.Revision(svc.revisions[name])
        ready = name not in svc.failed and not revision.reconciling
        revision.conditions = [
            run_v2.Condition(
                type_="Ready",
                state=(
                    run_v2.Condition.State.CONDITION_SUCCEEDED
                    if ready
                    else run_v2.Condition.State.CONDITION_RECONCILING
                    if revision.reconciling
                    else run_v2.Condition.State.CONDITION_FAILED
                ),
                message=svc.failed.get(name, ""),
            )
        ]
        return json.loads(run_v2.Revision.to_json(revision))

    def _operation_json(self, op: _Operation) -> Any:
        svc = self._services[op.service]
        service = {"@type": SERVICE_TYPE, **self._service_json(svc)}
        out: dict[str, Any] = {"name": op.name, "metadata": service, "done": op.done}
        if op.error is not None:
            out["error"] = op.error
        elif op.done:
            out["response"] = service
        return out


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def _template_key(template: run_v2.RevisionTemplate) -> str:
    return run_v2.RevisionTemplate.to_json(template, sort_keys=True)


def _resolve_traffic(traffic: Any, latest_ready: str) -> list[run_v2.TrafficTargetStatus]:
    if not traffic:
        traffic = [run_v2.TrafficTarget(type_=LATEST, percent=100)]
    return [
        run_v2.TrafficTargetStatus(
            type_=t.type_,
            revision=latest_ready if t.type_ == LATEST else t.revision,
            percent=t.percent,
            tag=t.tag,
        )
        for t in traffic
    ]


def _handler(stand_in: CloudRunStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            raw = read_body(self)
            url = urlsplit(self.path)
            try:
                body = json.loads(raw) if raw else None
                if url.netloc:
                    # Through a proxy the request line carries the whole URL (RFC 9112, 3.2.2):
                    # gcloud, on the v1 surface.
                    answer = stand_in.handle_gcloud(self.command, url.netloc, url.path, body)
                else:
                    answer = stand_in.handle(self.command, url.path, parse_qs(url.query), body)
                status, data = 200, dumps(answer)
            except ApiError as exc:
                status, data = exc.http_status, dumps(exc.body())
            except json.JSONDecodeError as exc:
                error = ApiError("INVALID_ARGUMENT", f"Invalid JSON payload received. {exc}")
                status, data = error.http_status, dumps(error.body())
            send_json(self, status, data)

        do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

        def do_CONNECT(self) -> None:
            # An HTTPS request to a real host through the proxy: nothing may leave this machine.
            stand_in.gcloud.seen.append(Request("CONNECT", self.path, "", None))
            self.send_error(403, "the stand-in only answers the overridden .test hosts")

        def log_message(self, *args: object) -> None:
            pass

    return Handler
