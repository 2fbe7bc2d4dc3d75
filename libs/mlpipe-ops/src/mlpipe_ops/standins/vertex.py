"""A local Vertex AI: the part of the v1 REST API mlpipe uses, answering as the reference says.

The real `google-cloud-aiplatform` clients drive it over REST (`transport="rest"`,
`client_options={"api_endpoint": stand_in.url}`, anonymous credentials):
- ModelService: models.upload (a long-running operation), models.get (`name`, `name@version`,
  `name@alias`), models.listVersions, models.mergeVersionAliases;
- EndpointService: endpoints.create (LRO), get, patch (traffic split), deployModel (LRO),
  undeployModel (LRO); PredictionService: endpoints.predict;
- JobService: customJobs.create, get, cancel;
- operations.get for every operation name the above return.

deployModel runs the model's container image on the local Docker engine under Vertex AI's
custom-container contract (AIP_* variables, health route, predict route); customJobs run their
worker's container to completion. Locally, "Google Cloud" is the emulators: containers get the
STORAGE_EMULATOR_HOST and PUBSUB_EMULATOR_HOST the stand-in was given.

Every rule and its source are listed in docs/vertex-standin.md; the comments name the rule.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import httpx

from mlpipe_ops import containers as docker
from mlpipe_ops.standins.google_api import (
    ApiError,
    check_labels,
    close,
    dumps,
    json_handler,
    serve,
    status_for_http,
    timestamp,
)
from mlpipe_ops.standins.vertex_runtime import HOST, ContainerRun, Runtime, expand, expand_env

log = logging.getLogger(__name__)

DEFAULT_PROJECT_NUMBER = "123456789012"
TYPE = "type.googleapis.com/google.cloud.aiplatform.v1."
# UploadModelRequest.model_id: up to 63 of [a-z0-9_-], not starting with a digit or hyphen.
MODEL_ID = re.compile(r"^[a-z_][a-z0-9_-]{0,62}$")
# Model.version_aliases and MergeVersionAliasesRequest.version_aliases.
ALIAS = re.compile(r"^[a-z][a-zA-Z0-9-]{0,126}[a-z0-9]$")
# CreateEndpointRequest.endpoint_id: a letter then up to 63 of [a-z0-9-] ending in a letter or
# digit; or up to 9 digits without a leading zero.
ENDPOINT_ID_WORD = re.compile(r"^[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?$")
ENDPOINT_ID_NUMBER = re.compile(r"^[1-9][0-9]{0,8}$")
# DeployedModel.id when the caller provides one: 1-10 digits.
DEPLOYED_MODEL_ID = re.compile(r"^[0-9]{1,10}$")
DEFAULT_ALIAS = "default"
MAX_DEPLOYMENT_TIMEOUT = 7200.0  # ModelContainerSpec.deployment_timeout: at most 2 hours
KEPT_MODEL_FIELDS = (
    "displayName",
    "description",
    "versionDescription",
    "labels",
    "artifactUri",
    "metadataSchemaUri",
    "metadata",
    "predictSchemata",
)
ENDPOINT_FIELDS = ("displayName", "description", "labels")
JOB_FIELDS = ("displayName", "jobSpec", "labels")
# Rule 76: Vertex AI's label keys and values are at most 64 characters (CustomJob.labels,
# Model.labels, Endpoint.labels), one more than elsewhere in Google Cloud.
VERTEX_LABEL_LENGTH = 64
JOB_TERMINAL = ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED")


@dataclass
class Operation:
    name: str
    metadata_type: str
    created: str
    updated: str
    done: bool = False
    response: dict[str, Any] | None = None
    error: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "metadata": {
                "@type": TYPE + self.metadata_type,
                "genericMetadata": {"createTime": self.created, "updateTime": self.updated},
            },
            "done": self.done,
        }
        if self.error is not None:
            out["error"] = self.error
        elif self.response is not None:
            out["response"] = self.response
        return out


@dataclass
class ModelVersion:
    version_id: str
    body: dict[str, Any]
    container_spec: dict[str, Any]
    image_id: str  # the image as ingested at upload: later tags of the same name do not matter
    aliases: list[str]
    created: str
    updated: str


@dataclass
class Model:
    location: str
    model_id: str
    created: str
    versions: dict[str, ModelVersion] = field(default_factory=dict)
    next_version: int = 1


@dataclass
class Deployed:
    id: str
    body: dict[str, Any]
    model: tuple[str, str]  # (location, model id)
    version_id: str
    container: str
    port: int
    predict_route: str


@dataclass
class Endpoint:
    location: str
    endpoint_id: str
    body: dict[str, Any]
    created: str
    updated: str
    deployed: dict[str, Deployed] = field(default_factory=dict)
    traffic: dict[str, int] = field(default_factory=dict)
    pending: set[str] = field(default_factory=set)
    etag: str = ""


@dataclass
class Job:
    location: str
    job_id: str
    body: dict[str, Any]
    created: str
    updated: str
    state: str = "JOB_STATE_QUEUED"
    start: str = ""
    end: str = ""
    error: dict[str, Any] | None = None
    container: str = ""
    cancel: threading.Event = field(default_factory=threading.Event)


class VertexStandIn:
    """The stand-in: `start()` serves it on 127.0.0.1 in a thread, `stop()` ends it and removes
    every container it started (and nothing else)."""

    def __init__(
        self,
        project_id: str,
        *,
        project_number: str = DEFAULT_PROJECT_NUMBER,
        port: int = 0,
        storage_emulator_host: str = "",
        pubsub_emulator_host: str = "",
        operation_seconds: float = 0.5,
        deploy_timeout: float = 300.0,
        log_dir: str | Path | None = None,
        seed: int | None = None,
        local_env: dict[str, str] | None = None,
    ) -> None:
        if not project_number.isdigit():
            raise ValueError(f"a project number is all digits, not {project_number!r}")
        self.project_id = project_id
        self.project_number = project_number
        self.id = uuid.uuid4().hex[:8]
        self.port = port
        self.operation_seconds = operation_seconds
        self.deploy_timeout = deploy_timeout
        self.log_dir = Path(log_dir) if log_dir else None
        # Locally, Google Cloud is the emulators: every container the stand-in runs gets them.
        self.cloud_env = {
            key: value
            for key, value in (
                ("STORAGE_EMULATOR_HOST", storage_emulator_host),
                ("PUBSUB_EMULATOR_HOST", pubsub_emulator_host),
            )
            if value
        }
        # What every container needs on this machine and never on Vertex (rule 51), e.g.
        # MLPIPE_HOST=127.0.0.1: on the shared host network a server binds 127.0.0.1 only.
        self.cloud_env.update(local_env or {})
        self.runtime = Runtime(self.id)
        self._random = random.Random(seed)
        self._ids = random.Random(seed)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._models: dict[tuple[str, str], Model] = {}
        self._reserved_models: set[tuple[str, str]] = set()
        self._endpoints: dict[tuple[str, str], Endpoint] = {}
        self._reserved_endpoints: set[tuple[str, str]] = set()
        self._jobs: dict[tuple[str, str], Job] = {}
        self._operations: dict[str, Operation] = {}
        self._server: ThreadingHTTPServer | None = None
        self._http = httpx.Client(timeout=60.0)

    # --- life cycle --------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def client_options(self) -> dict[str, str]:
        return {"api_endpoint": self.url}

    def start(self) -> VertexStandIn:
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        handler = json_handler(self, "vertex", ("GET", "POST", "PATCH", "DELETE"))
        self._server = serve(handler, self.port, "vertex")
        self.port = self._server.server_address[1]
        log.info("Vertex AI stand-in %s on %s", self.id, self.url)
        return self

    def stop(self, progress: Callable[[str], None] = lambda _: None) -> None:
        self._stop.set()
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.cancel.set()
        close(self._server)
        self._server = None
        for thread in list(self._threads):
            thread.join(timeout=30)
        for name in self.runtime.started():
            self._keep_logs(name)
        self.runtime.remove_all(progress)
        self._http.close()

    def __enter__(self) -> VertexStandIn:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def containers(self) -> list[str]:
        """Names of the containers this stand-in runs now."""
        return self.runtime.started()

    # --- HTTP --------------------------------------------------------------------------------
    def handle(self, method: str, raw_path: str, raw_body: bytes) -> tuple[int, bytes]:
        try:
            split = urlsplit(raw_path)
            path = unquote(split.path)
            query = {key: values[-1] for key, values in parse_qs(split.query).items()}
            try:
                body = json.loads(raw_body) if raw_body.strip() else {}
            except json.JSONDecodeError as exc:
                raise ApiError("INVALID_ARGUMENT", f"Invalid JSON payload: {exc}") from None
            if not isinstance(body, dict):
                raise ApiError("INVALID_ARGUMENT", "The request body must be a JSON object.")
            return 200, dumps(self._route(method, path, query, body, raw_body))
        except ApiError as exc:
            return exc.http_status, dumps(exc.body())
        except Exception as exc:  # the stand-in's own fault: answer it as Google would
            log.exception("Vertex AI stand-in failed on %s %s", method, raw_path)
            error = ApiError("INTERNAL", f"Vertex AI stand-in error: {exc!r}")
            return error.http_status, dumps(error.body())

    def _route(
        self,
        method: str,
        path: str,
        query: dict[str, str],
        body: dict[str, Any],
        raw_body: bytes,
    ) -> dict[str, Any]:
        # The clients' operations transport reads operations under /ui/ (its first http rule
        # for GetOperation); everything else is under /v1/.
        prefix = path[:4]
        if prefix not in ("/v1/", "/ui/"):
            raise ApiError("NOT_FOUND", f"The stand-in serves /v1/ and /ui/ paths, not {path}.")
        head, _, last = path[len(prefix) :].rpartition("/")
        last, _, verb = last.partition(":")
        parts = [*(head.split("/") if head else []), last]
        if len(parts) < 4 or parts[0] != "projects" or parts[2] != "locations":
            raise ApiError("NOT_FOUND", f"Unknown resource {path}.")
        self._check_project(parts[1])
        location, tail = parts[3], parts[4:]
        kind = tuple(tail[0::2])
        ids = tail[1::2]
        if len(tail) >= 2 and tail[-2] == "operations" and method == "GET" and not verb:
            return self.get_operation(location, tail)
        if kind == ("models",) and len(tail) == 1 and method == "POST" and verb == "upload":
            return self.upload_model(location, body)
        if kind == ("models",) and len(tail) == 2:
            if method == "GET" and not verb:
                return self.get_model(location, ids[0])
            if method == "GET" and verb == "listVersions":
                return self.list_model_versions(location, ids[0], query)
            if method == "POST" and verb == "mergeVersionAliases":
                return self.merge_version_aliases(location, ids[0], body)
        if kind == ("endpoints",) and len(tail) == 1 and method == "POST" and not verb:
            return self.create_endpoint(location, body, query)
        if kind == ("endpoints",) and len(tail) == 2:
            if method == "GET" and not verb:
                return self.get_endpoint(location, ids[0])
            if method == "PATCH" and not verb:
                return self.update_endpoint(location, ids[0], body, query)
            if method == "POST" and verb == "deployModel":
                return self.deploy_model(location, ids[0], body)
            if method == "POST" and verb == "undeployModel":
                return self.undeploy_model(location, ids[0], body)
            if method == "POST" and verb == "predict":
                return self.predict(location, ids[0], body, raw_body, path)
        if kind == ("customJobs",) and len(tail) == 1 and method == "POST" and not verb:
            return self.create_custom_job(location, body)
        if kind == ("customJobs",) and len(tail) == 2:
            if method == "GET" and not verb:
                return self.get_custom_job(location, ids[0])
            if method == "POST" and verb == "cancel":
                return self.cancel_custom_job(location, ids[0])
        raise ApiError(
            "UNIMPLEMENTED", f"The Vertex AI stand-in does not implement {method} {path}."
        )

    # --- names -------------------------------------------------------------------------------
    def _check_project(self, project: str) -> None:
        # Requests may name the project by id or by number; nothing else is ours.
        if project not in (self.project_id, self.project_number):
            raise ApiError("PERMISSION_DENIED", f"Permission denied on resource project {project}.")

    def _parent(self, location: str) -> str:
        # Names the service returns carry the project number, whatever the request used.
        return f"projects/{self.project_number}/locations/{location}"

    def _parse(self, name: str, collection: str) -> tuple[str, str]:
        """(location, id) of `projects/P/locations/L/<collection>/ID`, P an id or a number."""
        parts = name.split("/")
        if (
            len(parts) != 6
            or parts[0] != "projects"
            or parts[2] != "locations"
            or parts[4] != collection
            or not parts[5]
        ):
            raise ApiError(
                "INVALID_ARGUMENT",
                f"Invalid resource name {name!r}: expected "
                f"projects/{{project}}/locations/{{location}}/{collection}/{{id}}.",
            )
        self._check_project(parts[1])
        return parts[3], parts[5]

    def _new_id(self) -> str:
        # Ids the service generates are long decimal numbers.
        return str(self._ids.randrange(10**18, 10**19))

    # --- operations --------------------------------------------------------------------------
    def _operation(self, resource: str, metadata_type: str) -> Operation:
        now = timestamp()
        op = Operation(f"{resource}/operations/{self._new_id()}", metadata_type, now, now)
        with self._lock:
            self._operations[op.name.rsplit("/", 1)[1]] = op
        return op

    def _run_later(self, op: Operation, work: Callable[[], dict[str, Any]]) -> None:
        """Finish `op` in the background: it reads done=false until `work` has returned."""

        def run() -> None:
            if self._stop.wait(self.operation_seconds):
                return
            try:
                response: dict[str, Any] | None = work()
                error = None
            except ApiError as exc:
                response, error = None, exc.rpc_status()
            except Exception as exc:
                log.exception("operation %s failed", op.name)
                response, error = None, ApiError("INTERNAL", repr(exc)).rpc_status()
            with self._lock:
                op.response, op.error = response, error
                op.updated = timestamp()
                op.done = True

        self._spawn(run, op.name)

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def get_operation(self, location: str, tail: list[str]) -> dict[str, Any]:
        with self._lock:
            op = self._operations.get(tail[-1])
            wanted = f"{self._parent(location)}/{'/'.join(tail)}"
            if op is None or op.name != wanted:
                raise ApiError("NOT_FOUND", f"Operation {wanted} not found.")
            return op.to_json()

    # --- models ------------------------------------------------------------------------------
    def upload_model(self, location: str, body: dict[str, Any]) -> dict[str, Any]:
        model = body.get("model")
        if not isinstance(model, dict) or not model:
            raise ApiError("INVALID_ARGUMENT", "UploadModelRequest.model is required.")
        if not model.get("displayName"):
            raise ApiError("INVALID_ARGUMENT", "Model.display_name is required.")
        check_labels(model.get("labels"), "Model.labels", VERTEX_LABEL_LENGTH)  # Rule 76
        spec = model.get("containerSpec") or {}
        if not spec.get("imageUri"):
            raise ApiError(
                "INVALID_ARGUMENT",
                "Model.container_spec.image_uri is required (the stand-in serves custom "
                "containers only).",
            )
        aliases = [str(a) for a in model.get("versionAliases") or []]
        for alias in aliases:
            if not ALIAS.match(alias):
                raise ApiError(
                    "INVALID_ARGUMENT",
                    f"Invalid version alias {alias!r}: it must match [a-z][a-zA-Z0-9-]{{0,126}}"
                    "[a-z0-9].",
                )
        timeout = _seconds(spec.get("deploymentTimeout"))
        if timeout is not None and not 0 < timeout <= MAX_DEPLOYMENT_TIMEOUT:
            raise ApiError(
                "INVALID_ARGUMENT", "container_spec.deployment_timeout is at most 2 hours."
            )
        model_id = str(body.get("modelId") or "")
        parent_model = str(body.get("parentModel") or "")
        if model_id and not MODEL_ID.match(model_id):
            raise ApiError(
                "INVALID_ARGUMENT",
                f"Invalid model_id {model_id!r}: up to 63 characters of [a-z0-9_-]; the first "
                "character cannot be a number or hyphen.",
            )
        with self._lock:
            if parent_model:
                parent_location, target = self._parse(parent_model, "models")
                if parent_location != location:
                    raise ApiError(
                        "INVALID_ARGUMENT",
                        f"parent_model {parent_model} is not in location {location}.",
                    )
                if model_id and model_id != target:
                    raise ApiError(
                        "INVALID_ARGUMENT",
                        f"model_id {model_id!r} differs from parent_model {parent_model}.",
                    )
                if (location, target) not in self._models:
                    raise ApiError("NOT_FOUND", f"Model {parent_model} not found.")
            else:
                target = model_id or self._new_id()
                key = (location, target)
                if key in self._models or key in self._reserved_models:
                    raise ApiError(
                        "ALREADY_EXISTS",
                        f"Model {self._parent(location)}/models/{target} already exists.",
                    )
                self._reserved_models.add(key)
            op = self._operation(
                f"{self._parent(location)}/models/{target}", "UploadModelOperationMetadata"
            )
        kept = {k: model[k] for k in KEPT_MODEL_FIELDS if k in model}

        def work() -> dict[str, Any]:
            image_id = self._ingest_image(str(spec["imageUri"]))
            with self._lock:
                found = self._models.get((location, target))
                if found is None:
                    found = Model(location, target, timestamp())
                    self._models[(location, target)] = found
                vid = str(found.next_version)
                found.next_version += 1
                # The first version gets the `default` alias; an alias another version holds
                # moves to this one.
                wanted = ([DEFAULT_ALIAS] if not found.versions else []) + aliases
                for other in found.versions.values():
                    other.aliases = [a for a in other.aliases if a not in wanted]
                now = timestamp()
                found.versions[vid] = ModelVersion(
                    vid, kept, dict(spec), image_id, list(dict.fromkeys(wanted)), now, now
                )
                return {
                    "@type": TYPE + "UploadModelResponse",
                    "model": f"{self._parent(location)}/models/{target}",
                    "modelVersionId": vid,
                }

        def upload() -> dict[str, Any]:
            try:
                return work()
            finally:
                with self._lock:
                    self._reserved_models.discard((location, target))

        self._run_later(op, upload)
        return op.to_json()

    def _ingest_image(self, image: str) -> str:
        # UploadModel ingests the container image; afterwards its original path is not used.
        try:
            done = docker.docker("image", "inspect", "--format", "{{.Id}}", image, check=False)
        except docker.DockerError as exc:
            raise ApiError("UNAVAILABLE", f"No Docker engine to ingest {image}: {exc}") from None
        if done.returncode != 0:
            raise ApiError(
                "INVALID_ARGUMENT",
                f"Container image {image} cannot be read (not on the local Docker engine).",
            )
        return done.stdout.strip()

    def _version(self, location: str, ref: str) -> tuple[Model, ModelVersion]:
        """The model version `ref` names: `ID`, `ID@<version id>` or `ID@<alias>`."""
        model_id, _, wanted = ref.partition("@")
        model = self._models.get((location, model_id))
        name = f"{self._parent(location)}/models/{ref}"
        if model is None:
            raise ApiError("NOT_FOUND", f"Model {name} not found.")
        wanted = wanted or DEFAULT_ALIAS
        if wanted in model.versions:
            return model, model.versions[wanted]
        for version in model.versions.values():
            if wanted in version.aliases:
                return model, version
        raise ApiError("NOT_FOUND", f"Model {name} not found.")

    def _model_json(self, model: Model, version: ModelVersion, versioned: bool) -> dict[str, Any]:
        name = f"{self._parent(model.location)}/models/{model.model_id}"
        refs = [
            {"endpoint": self._endpoint_name(ep), "deployedModelId": d.id}
            for ep in self._endpoints.values()
            for d in ep.deployed.values()
            if d.model == (model.location, model.model_id) and d.version_id == version.version_id
        ]
        out = {
            **version.body,
            # ListModelVersions names carry the version id; GetModel's the model alone.
            "name": f"{name}@{version.version_id}" if versioned else name,
            "versionId": version.version_id,
            "versionAliases": list(version.aliases),
            "versionCreateTime": version.created,
            "versionUpdateTime": version.updated,
            "createTime": model.created,
            "updateTime": version.updated,
            "supportedDeploymentResourcesTypes": ["DEDICATED_RESOURCES"],
        }
        if refs:
            out["deployedModels"] = refs
        return out

    def get_model(self, location: str, ref: str) -> dict[str, Any]:
        with self._lock:
            model, version = self._version(location, ref)
            return self._model_json(model, version, versioned=False)

    def list_model_versions(
        self, location: str, model_id: str, query: dict[str, str]
    ) -> dict[str, Any]:
        if query.get("filter"):
            raise ApiError("UNIMPLEMENTED", "The stand-in does not filter model versions.")
        with self._lock:
            model = self._models.get((location, model_id))
            if model is None or "@" in model_id:
                raise ApiError(
                    "NOT_FOUND", f"Model {self._parent(location)}/models/{model_id} not found."
                )
            versions = sorted(model.versions.values(), key=lambda v: int(v.version_id))
            return {"models": [self._model_json(model, v, versioned=True) for v in versions]}

    def merge_version_aliases(
        self, location: str, ref: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        model_id, _, version_id = ref.partition("@")
        if not version_id.isdigit():
            raise ApiError(
                "INVALID_ARGUMENT",
                "MergeVersionAliasesRequest.name must name a version by its id: "
                "projects/{project}/locations/{location}/models/{model}@{version_id}.",
            )
        changes = [str(a) for a in body.get("versionAliases") or []]
        if not changes:
            raise ApiError("INVALID_ARGUMENT", "version_aliases is required.")
        for change in changes:
            if not ALIAS.match(change.removeprefix("-")):
                raise ApiError("INVALID_ARGUMENT", f"Invalid version alias {change!r}.")
        add = {c for c in changes if not c.startswith("-")}
        remove = {c[1:] for c in changes if c.startswith("-")}
        add, remove = add - remove, remove - add  # adding and removing one alias cancel out
        if DEFAULT_ALIAS in remove:
            raise ApiError(
                "INVALID_ARGUMENT",
                "The default alias cannot be removed: one version must carry it; move it by "
                "adding it to another version.",
            )
        with self._lock:
            model, version = self._version(location, f"{model_id}@{version_id}")
            if version.version_id != version_id:
                raise ApiError("NOT_FOUND", f"Model version {ref} not found.")
            for other in model.versions.values():
                if other is not version:
                    other.aliases = [a for a in other.aliases if a not in add]
            version.aliases = [a for a in version.aliases if a not in remove]
            version.aliases += sorted(add - set(version.aliases))
            version.updated = timestamp()
            return self._model_json(model, version, versioned=False)

    # --- endpoints ---------------------------------------------------------------------------
    def _endpoint_name(self, endpoint: Endpoint) -> str:
        return f"{self._parent(endpoint.location)}/endpoints/{endpoint.endpoint_id}"

    def _endpoint(self, location: str, endpoint_id: str) -> Endpoint:
        found = self._endpoints.get((location, endpoint_id))
        if found is None:
            raise ApiError(
                "NOT_FOUND", f"Endpoint {self._parent(location)}/endpoints/{endpoint_id} not found."
            )
        return found

    def _endpoint_json(self, endpoint: Endpoint) -> dict[str, Any]:
        out: dict[str, Any] = {
            **endpoint.body,
            "name": self._endpoint_name(endpoint),
            "deployedModels": [d.body for d in endpoint.deployed.values()],
            "etag": endpoint.etag,
            "createTime": endpoint.created,
            "updateTime": endpoint.updated,
        }
        if endpoint.traffic:
            out["trafficSplit"] = dict(endpoint.traffic)
        return out

    def create_endpoint(
        self, location: str, body: dict[str, Any], query: dict[str, str]
    ) -> dict[str, Any]:
        if not body.get("displayName"):
            raise ApiError("INVALID_ARGUMENT", "Endpoint.display_name is required.")
        check_labels(body.get("labels"), "Endpoint.labels", VERTEX_LABEL_LENGTH)  # Rule 76
        endpoint_id = query.get("endpointId") or query.get("endpoint_id") or ""
        if endpoint_id and not (
            ENDPOINT_ID_WORD.match(endpoint_id) or ENDPOINT_ID_NUMBER.match(endpoint_id)
        ):
            raise ApiError(
                "INVALID_ARGUMENT",
                f"Invalid endpoint_id {endpoint_id!r}: a letter then up to 63 of [a-z0-9-] "
                "ending in a letter or digit, or up to 9 digits without a leading zero.",
            )
        with self._lock:
            endpoint_id = endpoint_id or self._new_id()
            key = (location, endpoint_id)
            if key in self._endpoints or key in self._reserved_endpoints:
                raise ApiError("ALREADY_EXISTS", f"Endpoint {endpoint_id} already exists.")
            now = timestamp()
            kept: dict[str, Any] = {k: body[k] for k in ENDPOINT_FIELDS if k in body}
            endpoint = Endpoint(location, endpoint_id, kept, now, now, etag=uuid.uuid4().hex)
            # Reserved now, visible once the operation is done.
            self._reserved_endpoints.add(key)
            op = self._operation(self._endpoint_name(endpoint), "CreateEndpointOperationMetadata")

        def work() -> dict[str, Any]:
            with self._lock:
                self._reserved_endpoints.discard(key)
                self._endpoints[key] = endpoint
                return {"@type": TYPE + "Endpoint", **self._endpoint_json(endpoint)}

        self._run_later(op, work)
        return op.to_json()

    def get_endpoint(self, location: str, endpoint_id: str) -> dict[str, Any]:
        with self._lock:
            return self._endpoint_json(self._endpoint(location, endpoint_id))

    def _check_split(
        self, split: Any, known: set[str], endpoint: Endpoint, allow_empty: bool
    ) -> dict[str, int]:
        """A traffic split: known deployed model ids only, percentages that add up to 100."""
        if not isinstance(split, dict):
            raise ApiError("INVALID_ARGUMENT", "traffic_split must be a map of id to percent.")
        out: dict[str, int] = {}
        for key, value in split.items():
            try:
                percent = int(value)
            except (TypeError, ValueError):
                raise ApiError("INVALID_ARGUMENT", f"Invalid percentage {value!r}.") from None
            if not 0 <= percent <= 100:
                raise ApiError("INVALID_ARGUMENT", f"Invalid traffic percentage {percent}.")
            out[str(key)] = percent
        unknown = sorted(k for k in out if k not in known)
        if unknown:
            raise ApiError(
                "INVALID_ARGUMENT",
                f"The following DeployedModel ID(s) [{', '.join(unknown)}] do not exist in "
                f"Endpoint {self._endpoint_name(endpoint)}.",
            )
        total = sum(out.values())
        if not (total == 100 or (allow_empty and not out)):
            raise ApiError(
                "INVALID_ARGUMENT",
                f"The traffic split percentages must add up to 100, not {total}: {out}.",
            )
        return out

    def update_endpoint(
        self, location: str, endpoint_id: str, body: dict[str, Any], query: dict[str, str]
    ) -> dict[str, Any]:
        mask = query.get("updateMask") or query.get("update_mask") or ""
        paths = [_snake(p.strip()) for p in mask.split(",") if p.strip()]
        if not paths:
            raise ApiError("INVALID_ARGUMENT", "UpdateEndpointRequest.update_mask is required.")
        supported = {"traffic_split", "display_name", "description", "labels"}
        unsupported = [p for p in paths if p not in supported]
        if unsupported:
            raise ApiError(
                "UNIMPLEMENTED", f"The stand-in does not update {', '.join(unsupported)}."
            )
        if "labels" in paths:
            check_labels(body.get("labels"), "Endpoint.labels", VERTEX_LABEL_LENGTH)  # Rule 76
        with self._lock:
            endpoint = self._endpoint(location, endpoint_id)
            if "traffic_split" in paths:
                endpoint.traffic = self._check_split(
                    body.get("trafficSplit") or {},
                    set(endpoint.deployed),
                    endpoint,
                    allow_empty=True,  # an empty split: the endpoint takes no traffic
                )
            for path in paths:
                if path == "display_name":
                    if not body.get("displayName"):
                        raise ApiError("INVALID_ARGUMENT", "Endpoint.display_name is required.")
                    endpoint.body["displayName"] = body["displayName"]
                elif path in ("description", "labels"):
                    key = _camel(path)
                    if key in body:
                        endpoint.body[key] = body[key]
                    else:
                        endpoint.body.pop(key, None)
            endpoint.updated = timestamp()
            endpoint.etag = uuid.uuid4().hex
            return self._endpoint_json(endpoint)

    def deploy_model(self, location: str, endpoint_id: str, body: dict[str, Any]) -> dict[str, Any]:
        requested = body.get("deployedModel")
        if not isinstance(requested, dict) or not requested.get("model"):
            raise ApiError("INVALID_ARGUMENT", "deployed_model.model is required.")
        model_location, model_ref = self._parse(str(requested["model"]), "models")
        dedicated = requested.get("dedicatedResources")
        if not isinstance(dedicated, dict):
            raise ApiError(
                "INVALID_ARGUMENT",
                "This model supports only dedicated resources: set "
                "deployed_model.dedicated_resources.",
            )
        if not isinstance(dedicated.get("machineSpec"), dict):
            raise ApiError("INVALID_ARGUMENT", "dedicated_resources.machine_spec is required.")
        if int(dedicated.get("minReplicaCount") or 0) < 1:
            raise ApiError(
                "INVALID_ARGUMENT", "dedicated_resources.min_replica_count must be at least 1."
            )
        with self._lock:
            endpoint = self._endpoint(location, endpoint_id)
            model, version = self._version(model_location, model_ref)
            taken = set(endpoint.deployed) | endpoint.pending
            deployed_id = str(requested.get("id") or "")
            if deployed_id:
                if not DEPLOYED_MODEL_ID.match(deployed_id):
                    raise ApiError(
                        "INVALID_ARGUMENT",
                        f"Invalid DeployedModel id {deployed_id!r}: 1-10 digits.",
                    )
                if deployed_id in taken:
                    raise ApiError("ALREADY_EXISTS", f"DeployedModel {deployed_id} already exists.")
            else:
                deployed_id = self._new_id()
                while deployed_id in taken:
                    deployed_id = self._new_id()
            split: dict[str, int] | None = None
            if body.get("trafficSplit"):
                # "0" is the model being deployed; a non-empty split replaces the endpoint's.
                given = self._check_split(
                    body["trafficSplit"], set(endpoint.deployed) | {"0"}, endpoint, False
                )
                split = {(deployed_id if k == "0" else k): v for k, v in given.items()}
            endpoint.pending.add(deployed_id)
            op = self._operation(self._endpoint_name(endpoint), "DeployModelOperationMetadata")
            spec = dict(version.container_spec)
            model_name = f"{self._parent(model.location)}/models/{model.model_id}"
            deployed_body = {
                **{k: v for k, v in requested.items() if k not in ("id", "model")},
                "id": deployed_id,
                "model": model_name,
                "modelVersionId": version.version_id,
                "displayName": requested.get("displayName") or version.body["displayName"],
            }
            artifact_uri = str(version.body.get("artifactUri", ""))
            image_id = version.image_id
        timeout = _seconds(spec.get("deploymentTimeout")) or self.deploy_timeout

        def work() -> dict[str, Any]:
            try:
                deployed = self._start_model_server(
                    endpoint_id, deployed_id, spec, image_id, artifact_uri, timeout
                )
            finally:
                with self._lock:
                    endpoint.pending.discard(deployed_id)
            deployed.body = {**deployed_body, "createTime": timestamp()}
            deployed.model = (model.location, model.model_id)
            deployed.version_id = version.version_id
            with self._lock:
                endpoint.deployed[deployed_id] = deployed
                if split is not None:
                    endpoint.traffic = split
                endpoint.updated = timestamp()
                endpoint.etag = uuid.uuid4().hex
            return {"@type": TYPE + "DeployModelResponse", "deployedModel": deployed.body}

        self._run_later(op, work)
        return op.to_json()

    def _start_model_server(
        self,
        endpoint_id: str,
        deployed_id: str,
        spec: dict[str, Any],
        image_id: str,
        artifact_uri: str,
        timeout: float,
    ) -> Deployed:
        """Run the model's container under the custom-container contract; return once its
        health route answers 200, or raise FAILED_PRECONDITION with its last log lines."""
        port = self.runtime.ports.take()
        base = f"/v1/endpoints/{endpoint_id}/deployedModels/{deployed_id}"
        health_route = str(spec.get("healthRoute") or base)
        predict_route = str(spec.get("predictRoute") or f"{base}:predict")
        aip = {
            "AIP_HTTP_PORT": str(port),
            "AIP_HEALTH_ROUTE": health_route,
            "AIP_PREDICT_ROUTE": predict_route,
            "AIP_STORAGE_URI": artifact_uri,
            "AIP_DEPLOYED_MODEL_ID": deployed_id,
            "AIP_ENDPOINT_ID": endpoint_id,
            "AIP_MODE": "PREDICTION",
        }
        env = {**self.cloud_env, **expand_env(spec.get("env") or [], aip), **aip}
        name = f"vertex-{self.id}-{deployed_id}"
        run = ContainerRun(
            name=name,
            image=image_id,
            command=tuple(expand(str(c), env) for c in spec.get("command") or []),
            args=tuple(expand(str(a), env) for a in spec.get("args") or []),
            env=env,
        )
        try:
            self.runtime.start(run)
        except docker.DockerError as exc:
            self.runtime.stop(name)
            self.runtime.ports.give_back(port)
            raise ApiError("FAILED_PRECONDITION", f"Model server could not start: {exc}") from None
        ready, why = self.runtime.wait_healthy(
            name, f"http://{HOST}:{port}{health_route}", timeout, self._stop
        )
        if not ready:
            tail = self.runtime.logs(name)
            self._keep_logs(name)
            self.runtime.stop(name)
            self.runtime.ports.give_back(port)
            if why == "exited":
                message = "Model server exited unexpectedly."
            else:
                message = (
                    "Model server never became ready. Please validate that your model file or "
                    f"container configuration are valid. ({why} after {timeout:g}s on "
                    f"{health_route})"
                )
            raise ApiError(
                "FAILED_PRECONDITION",
                f"{message} Model server logs (container {name}, last lines):\n{tail}",
            )
        return Deployed(deployed_id, {}, ("", ""), "", name, port, predict_route)

    def undeploy_model(
        self, location: str, endpoint_id: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        deployed_id = str(body.get("deployedModelId") or "")
        if not deployed_id:
            raise ApiError("INVALID_ARGUMENT", "deployed_model_id is required.")
        with self._lock:
            endpoint = self._endpoint(location, endpoint_id)
            deployed = endpoint.deployed.get(deployed_id)
            if deployed is None:
                raise ApiError(
                    "NOT_FOUND",
                    f"DeployedModel {deployed_id} not found in Endpoint "
                    f"{self._endpoint_name(endpoint)}.",
                )
            others = set(endpoint.deployed) - {deployed_id}
            if body.get("trafficSplit"):
                split = self._check_split(
                    body["trafficSplit"], set(endpoint.deployed), endpoint, False
                )
            else:
                split = dict(endpoint.traffic)
            # Refused while the model keeps traffic, unless it is the last one (the split then
            # ends up empty).
            if split.get(deployed_id, 0) > 0 and others:
                raise ApiError(
                    "FAILED_PRECONDITION",
                    f"DeployedModel {deployed_id} has {split[deployed_id]}% of the traffic of "
                    f"Endpoint {self._endpoint_name(endpoint)}; move it to other deployed "
                    "models first (endpoints.patch, or this request's traffic_split).",
                )
            remaining = {k: v for k, v in split.items() if k != deployed_id} if others else {}
            op = self._operation(self._endpoint_name(endpoint), "UndeployModelOperationMetadata")

        def work() -> dict[str, Any]:
            with self._lock:
                endpoint.deployed.pop(deployed_id, None)
                endpoint.traffic = remaining
                endpoint.updated = timestamp()
                endpoint.etag = uuid.uuid4().hex
            self._keep_logs(deployed.container)
            self.runtime.stop(deployed.container)
            self.runtime.ports.give_back(deployed.port)
            return {"@type": TYPE + "UndeployModelResponse"}

        self._run_later(op, work)
        return op.to_json()

    def predict(
        self, location: str, endpoint_id: str, body: dict[str, Any], raw_body: bytes, path: str
    ) -> dict[str, Any]:
        if "instances" not in body:
            raise ApiError("INVALID_ARGUMENT", "PredictRequest.instances is required.")
        with self._lock:
            endpoint = self._endpoint(location, endpoint_id)
            shares = [(k, v) for k, v in endpoint.traffic.items() if v > 0]
            if not shares:
                requested = path[4:].rsplit(":", 1)[0]
                raise ApiError(
                    "FAILED_PRECONDITION", f"Endpoint {requested} doesn't have traffic_split."
                )
            chosen = self._random.choices([k for k, _ in shares], [v for _, v in shares])[0]
            deployed = endpoint.deployed[chosen]
            model = self._models[deployed.model]
            display = str(deployed.body.get("displayName", ""))
            model_display = str(model.versions[deployed.version_id].body.get("displayName", ""))
        url = f"http://{HOST}:{deployed.port}{deployed.predict_route}"
        try:
            answer = self._http.post(
                url, content=raw_body, headers={"Content-Type": "application/json"}
            )
        except httpx.HTTPError as exc:
            raise ApiError(
                "UNAVAILABLE", f"DeployedModel {chosen} ({display}) did not answer: {exc!r}"
            ) from None
        if answer.status_code != 200:
            raise ApiError(
                status_for_http(answer.status_code),
                f"DeployedModel {chosen} answered {answer.status_code}: {answer.text[:2000]}",
            )
        try:
            served = answer.json()
        except ValueError:
            served = None
        if not isinstance(served, dict):
            raise ApiError(
                "INTERNAL", f"DeployedModel {chosen} answered no JSON object: {answer.text[:500]}"
            )
        return {
            **served,
            "deployedModelId": chosen,
            "model": f"{self._parent(model.location)}/models/{model.model_id}",
            "modelVersionId": deployed.version_id,
            "modelDisplayName": model_display,
        }

    # --- custom jobs -------------------------------------------------------------------------
    def _job_json(self, job: Job) -> dict[str, Any]:
        out: dict[str, Any] = {
            **job.body,
            "name": f"{self._parent(job.location)}/customJobs/{job.job_id}",
            "state": job.state,
            "createTime": job.created,
            "updateTime": job.updated,
        }
        if job.start:
            out["startTime"] = job.start
        if job.end:
            out["endTime"] = job.end
        if job.error is not None:
            out["error"] = job.error
        return out

    def create_custom_job(self, location: str, body: dict[str, Any]) -> dict[str, Any]:
        if not body.get("displayName"):
            raise ApiError("INVALID_ARGUMENT", "CustomJob.display_name is required.")
        spec = body.get("jobSpec")
        if not isinstance(spec, dict):
            raise ApiError("INVALID_ARGUMENT", "CustomJob.job_spec is required.")
        pools = spec.get("workerPoolSpecs")
        if not isinstance(pools, list) or not pools or not isinstance(pools[0], dict):
            raise ApiError("INVALID_ARGUMENT", "CustomJob.job_spec.worker_pool_specs is required.")
        first = pools[0]
        if first.get("pythonPackageSpec"):
            raise ApiError("UNIMPLEMENTED", "The stand-in runs container workers only.")
        container = first.get("containerSpec") or {}
        if not container.get("imageUri"):
            raise ApiError(
                "INVALID_ARGUMENT", "worker_pool_specs[0].container_spec.image_uri is required."
            )
        busy = [p for p in pools[1:] if isinstance(p, dict) and int(p.get("replicaCount") or 0)]
        if busy or int(first.get("replicaCount") or 1) != 1:
            raise ApiError(
                "UNIMPLEMENTED", "The stand-in runs one replica of the first worker pool only."
            )
        # Rule 76: labels, at most 64 characters a key or value.
        check_labels(body.get("labels"), "CustomJob.labels", VERTEX_LABEL_LENGTH)
        kept: dict[str, Any] = {k: body[k] for k in JOB_FIELDS if k in body}
        with self._lock:
            now = timestamp()
            job = Job(location, self._new_id(), kept, now, now)
            self._jobs[(location, job.job_id)] = job
            out = self._job_json(job)
        self._spawn(lambda: self._run_job(job, container, spec), f"job-{job.job_id}")
        return out

    def _set_state(self, job: Job, state: str, error: dict[str, Any] | None = None) -> None:
        with self._lock:
            job.state = state
            job.updated = timestamp()
            if state == "JOB_STATE_RUNNING":
                job.start = job.updated
            if state in JOB_TERMINAL:
                job.end = job.updated
                job.error = error

    def _run_job(self, job: Job, container: dict[str, Any], spec: dict[str, Any]) -> None:
        cancelled = ApiError("CANCELLED", "CustomJob was cancelled.").rpc_status()
        if job.cancel.wait(self.operation_seconds):
            self._set_state(job, "JOB_STATE_CANCELLED", cancelled)
            return
        self._set_state(job, "JOB_STATE_PENDING")
        env = {**self.cloud_env, **expand_env(container.get("env") or [], {})}
        env["CLOUD_ML_JOB_ID"] = job.job_id
        output = (spec.get("baseOutputDirectory") or {}).get("outputUriPrefix")
        if output:
            root = str(output).rstrip("/")
            env["AIP_MODEL_DIR"] = f"{root}/model/"
            env["AIP_CHECKPOINT_DIR"] = f"{root}/checkpoints/"
            env["AIP_TENSORBOARD_LOG_DIR"] = f"{root}/logs/"
        name = f"vertex-{self.id}-job-{job.job_id}"
        run = ContainerRun(
            name=name,
            image=str(container["imageUri"]),
            command=tuple(str(c) for c in container.get("command") or []),
            args=tuple(str(a) for a in container.get("args") or []),
            env=env,
        )
        with self._lock:
            job.container = name
        try:
            self.runtime.start(run)
        except docker.DockerError as exc:
            self.runtime.stop(name)
            self._set_state(
                job,
                "JOB_STATE_FAILED",
                ApiError(
                    "INVALID_ARGUMENT", f"The replica workerpool0-0 could not start: {exc}"
                ).rpc_status(),
            )
            return
        self._set_state(job, "JOB_STATE_RUNNING")
        code = self.runtime.wait_exit(name, job.cancel)
        tail = self.runtime.logs(name)
        if code is None:  # cancelled (or the stand-in is stopping): SIGTERM, then SIGKILL
            self._set_state(job, "JOB_STATE_CANCELLING")
            self._keep_logs(name)
            self.runtime.stop(name, grace=10)
            self._set_state(job, "JOB_STATE_CANCELLED", cancelled)
            return
        self._keep_logs(name)
        self.runtime.stop(name)
        if code == 0:
            self._set_state(job, "JOB_STATE_SUCCEEDED")
        else:
            self._set_state(
                job,
                "JOB_STATE_FAILED",
                ApiError(
                    "INVALID_ARGUMENT",
                    f"The replica workerpool0-0 exited with a non-zero status of {code}. "
                    f"Termination reason: Error. Last log lines:\n{tail}",
                ).rpc_status(),
            )

    def _job(self, location: str, job_id: str) -> Job:
        job = self._jobs.get((location, job_id))
        if job is None:
            raise ApiError(
                "NOT_FOUND", f"CustomJob {self._parent(location)}/customJobs/{job_id} not found."
            )
        return job

    def get_custom_job(self, location: str, job_id: str) -> dict[str, Any]:
        with self._lock:
            return self._job_json(self._job(location, job_id))

    def cancel_custom_job(self, location: str, job_id: str) -> dict[str, Any]:
        with self._lock:
            job = self._job(location, job_id)
            if job.state in JOB_TERMINAL:
                raise ApiError(
                    "FAILED_PRECONDITION",
                    f"CustomJob {job_id} is already in a final state ({job.state}).",
                )
            if job.state in ("JOB_STATE_RUNNING", "JOB_STATE_PENDING"):
                job.state = "JOB_STATE_CANCELLING"
                job.updated = timestamp()
            job.cancel.set()
        return {}

    # --- logs --------------------------------------------------------------------------------
    def _keep_logs(self, name: str) -> None:
        if self.log_dir is None:
            return
        with contextlib.suppress(OSError, docker.DockerError):
            (self.log_dir / f"{name}.log").write_text(self.runtime.logs(name, tail=100_000) + "\n")


def _seconds(duration: Any) -> float | None:
    """A google.protobuf.Duration in JSON ("600s", "1.5s") as seconds."""
    if not duration:
        return None
    text = str(duration)
    try:
        return float(text.removesuffix("s"))
    except ValueError:
        raise ApiError("INVALID_ARGUMENT", f"Invalid duration {text!r}.") from None


def _snake(path: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), path)


def _camel(path: str) -> str:
    head, *rest = path.split("_")
    return head + "".join(word.title() for word in rest)
