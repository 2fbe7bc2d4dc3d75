"""Provision the topology (`mlpipe.messaging.topology`) in one environment: the local emulators or a
GCP project, with the settings of `infra/environments/<env>.yaml`.

`plan()` reads what exists and lists the changes that would make it match; `apply()` runs
that same plan, so a second apply finds nothing to do. Every request is built by a pure
function below, so tests assert exactly what would be sent to the APIs that cannot be reached
from here (Cloud Scheduler, IAM, GCS notifications, Cloud Run).

Locally (target `emulator`) there is no OIDC, no IAM and no Cloud Scheduler, and the bucket
notification is fake-gcs-server's start-up flags: the plan says so instead of pretending.
Apply creates and updates; it never deletes.
"""

from __future__ import annotations

import contextlib
import json
import re
import string
import zoneinfo
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import yaml
from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1, scheduler_v1, storage
from google.cloud.storage.notification import BucketNotification
from google.iam.v1 import iam_policy_pb2, policy_pb2  # type: ignore[import-untyped]
from google.protobuf import duration_pb2, field_mask_pb2, json_format
from google.pubsub_v1.types import (
    DeadLetterPolicy,
    PushConfig,
    RetryPolicy,
    Subscription,
    UpdateSubscriptionRequest,
)
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mlpipe.messaging import events
from mlpipe.messaging.kept_failures import DEAD_LETTER_ARCHIVE
from mlpipe.messaging.topology import (
    PUSH_PATH,
    TOPOLOGY,
    PullSubscription,
    PushSubscription,
    Topology,
)
from mlpipe.v1 import events_pb2
from mlpipe_ops.service_runtime import ServiceRuntime, describe_invalid

if TYPE_CHECKING:
    from google.cloud import run_v2

T = TypeVar("T")
PROJECT_PATTERN = r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$"
ENV_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
# What `{...}` in an environment file's templates may name.
PLACEHOLDERS = frozenset({"service", "project", "project_number", "region", "port"})
INGEST_REQUEST = events_pb2.IngestRequest.DESCRIPTOR.full_name


class InfraError(RuntimeError):
    """An environment file is invalid or cannot be applied; the message says what to fix."""


# --- environment files ----------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScheduleSpec(_Strict):
    """A Cloud Scheduler job that publishes one request (JSON) on a cron schedule: an
    IngestRequest to the ingest topic (the default), or a MonitoringRequest (a drift check) to
    the monitoring topic."""

    name: str = Field(pattern=r"^[a-zA-Z][a-zA-Z0-9_-]{0,62}$")
    kind: Literal["ingest", "monitoring"] = "ingest"
    description: str = ""
    schedule: str = Field(description="unix-cron, five fields, e.g. '0 3 * * *'")
    time_zone: str = "Etc/UTC"
    request: dict[str, Any] | None = Field(
        default=None, description="The IngestRequest in its JSON form."
    )
    request_file: str | None = Field(
        default=None, description="Or a JSON file holding it, relative to the environment file."
    )

    @model_validator(mode="before")
    @classmethod
    def _read_request_file(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict) or data.get("request_file") is None:
            return data
        if data.get("request") is not None:
            raise ValueError("give request or request_file, not both")
        base = Path((info.context or {}).get("base_dir", "."))
        path = base / str(data["request_file"])
        try:
            loaded = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"request_file {path}: {exc}") from exc
        return {**data, "request": loaded}

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        fields = value.split()
        if len(fields) != 5 or not all(re.fullmatch(r"[0-9A-Za-z*/,-]+", f) for f in fields):
            raise ValueError(f"{value!r} is not a five-field unix-cron expression")
        return value

    @field_validator("time_zone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone (e.g. Europe/Berlin)") from None
        return value

    @model_validator(mode="after")
    def _request_is_an_ingest_request(self) -> ScheduleSpec:
        if self.request is None:
            raise ValueError("request (or request_file) is required")
        try:
            message = self.message()
        except json_format.ParseError as exc:
            kind = message_type(self.kind).DESCRIPTOR.full_name
            raise ValueError(f"request is not a valid {kind}: {exc}") from None
        if isinstance(message, events_pb2.MonitoringRequest):
            if not message.pipeline:
                raise ValueError("request.pipeline is required")
            return self
        if not message.dataset:
            raise ValueError("request.dataset is required")
        if message.WhichOneof("source") is None:
            raise ValueError("request needs a source (e.g. inline)")
        return self

    def message(self) -> events_pb2.IngestRequest | events_pb2.MonitoringRequest:
        return json_format.ParseDict(self.request or {}, message_type(self.kind)())

    def ingest_request(self) -> events_pb2.IngestRequest:
        return json_format.ParseDict(self.request or {}, events_pb2.IngestRequest())

    @property
    def topic(self) -> str:
        return events.MONITORING_REQUESTS if self.kind == "monitoring" else events.INGEST_REQUESTS


def message_type(
    kind: str,
) -> type[events_pb2.IngestRequest] | type[events_pb2.MonitoringRequest]:
    return events_pb2.MonitoringRequest if kind == "monitoring" else events_pb2.IngestRequest


class ServiceSettings(_Strict):
    url: str = Field(description="This service's URL, instead of the service_url template.")


class SubscriptionSettings(_Strict):
    push_service_account: str = Field(
        description="The identity whose OIDC token signs this subscription's push requests."
    )


class Environment(_Strict):
    """One `infra/environments/<env>.yaml`. Templates may use {service}, {project},
    {project_number}, {region} and, on the emulator, {port} (the running stack's)."""

    target: Literal["emulator", "gcp"]
    project: str = Field(pattern=PROJECT_PATTERN)
    project_number: int | None = Field(default=None, ge=1)
    region: str | None = None
    bucket: str
    service_url: str = Field(description="Each service's base URL: push endpoint and audience.")
    cloud_run_service: str = "mlpipe-{service}"
    runtime_service_account: str = "mlpipe-{service}@{project}.iam.gserviceaccount.com"
    serving_service_account: str = Field(
        default="mlpipe-serving@{project}.iam.gserviceaccount.com",
        description="The identity the predictor runs as on Vertex AI (deploy_target vertex): "
        "DeployedModel.service_account.",
    )
    services: dict[str, ServiceSettings] = Field(default_factory=dict)
    subscriptions: dict[str, SubscriptionSettings] = Field(default_factory=dict)
    deploy_target: Literal["local", "cloud_run", "vertex"] = Field(
        description="Where the deployer rolls out champions (the predictor it serves from)."
    )
    schedules: list[ScheduleSpec] = Field(default_factory=list)
    # The one statement of which environments need a person's approval: model promotions into
    # it wait for `mlpipe approve` (docs/promotion.md), and code releases into it wait for
    # `gcloud deploy rollouts approve` (its Cloud Deploy target's requireApproval, release.py).
    approval: Literal["required", "none"] = Field(
        default="none",
        description="required: a promotion or release into this environment waits for approval.",
    )
    approval_expires_hours: float = Field(
        default=72.0,
        gt=0,
        description="A model promotion's approval request expires this long after it is made.",
    )

    @property
    def approval_required(self) -> bool:
        return self.approval == "required"

    @model_validator(mode="after")
    def _consistent(self) -> Environment:
        problems = []
        unknown = sorted(set(self.services) - set(TOPOLOGY.services))
        if unknown:
            problems.append(
                f"services.{unknown[0]}: unknown service (known: {', '.join(TOPOLOGY.services)})"
            )
        push_names = [s.name for s in TOPOLOGY.push]
        unknown = sorted(set(self.subscriptions) - set(push_names))
        if unknown:
            problems.append(
                f"subscriptions.{unknown[0]}: unknown push subscription (known: "
                f"{', '.join(push_names)})"
            )
        templates = {
            "bucket": self.bucket,
            "service_url": self.service_url,
            "cloud_run_service": self.cloud_run_service,
            "runtime_service_account": self.runtime_service_account,
            "serving_service_account": self.serving_service_account,
            **{f"services.{k}.url": v.url for k, v in self.services.items()},
            **{
                f"subscriptions.{k}.push_service_account": v.push_service_account
                for k, v in self.subscriptions.items()
            },
        }
        for where, template in templates.items():
            try:
                named = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
            except ValueError as exc:
                problems.append(f"{where}: {exc}")
                continue
            allowed = PLACEHOLDERS if self.target == "emulator" else PLACEHOLDERS - {"port"}
            for name in sorted(named - allowed):
                problems.append(
                    f"{where}: unknown placeholder {{{name}}} (use {', '.join(sorted(allowed))})"
                )
        if self.target == "gcp":
            if not self.region:
                problems.append("region: required for a gcp environment")
            missing = [n for n in push_names if n not in self.subscriptions]
            if missing:
                problems.append(
                    f"subscriptions.{missing[0]}.push_service_account: required for a gcp "
                    f"environment (push requests are signed with an OIDC token)"
                )
        elif self.subscriptions:
            name = next(iter(self.subscriptions))
            problems.append(
                f"subscriptions.{name}: the emulator has no OIDC; push service accounts "
                f"belong to gcp environments"
            )
        names = [s.name for s in self.schedules]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            problems.append(f"schedules: name {duplicates[0]!r} is used twice")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def environments_dir(explicit: Path | None = None) -> Path:
    """`explicit`, else the first `infra/environments` above the working directory or this
    package (the repository checkout)."""
    if explicit is not None:
        return explicit
    for base in [Path.cwd(), *Path.cwd().parents, *Path(__file__).resolve().parents]:
        candidate = base / "infra" / "environments"
        if candidate.is_dir():
            return candidate
    raise InfraError(
        "no infra/environments folder above the working directory; run from the repository "
        "or pass --environments-dir (MLPIPE_INFRA_DIR)"
    )


def load_environment(name: str, directory: Path | None = None) -> Environment:
    if not ENV_NAME_PATTERN.match(name):
        raise InfraError(f"{name!r} is not an environment name (lowercase letters, digits, -)")
    directory = environments_dir(directory)
    path = directory / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in directory.glob("*.yaml"))) or "none"
        raise InfraError(f"no environment {name!r}: {path} does not exist (known: {known})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InfraError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise InfraError(f"{path}: expected a mapping at the top level")
    try:
        return Environment.model_validate(raw, context={"base_dir": path.parent})
    except ValidationError as exc:
        raise InfraError(f"{path}: {describe_invalid(exc)}") from None


# --- an environment resolved for one project --------------------------------------------------
@dataclass(frozen=True)
class PushRoute:
    """One push subscription and the service that receives it."""

    subscription: PushSubscription
    service_url: str  # the OIDC audience; the endpoint is under it
    service_account: str = ""  # signs the OIDC token; none on the emulator
    cloud_run_service: str = ""  # full resource name of the receiving Cloud Run service

    @property
    def endpoint(self) -> str:
        return self.service_url + PUSH_PATH


@dataclass(frozen=True)
class Target:
    env: str
    kind: Literal["emulator", "gcp"]
    project: str
    bucket: str
    deploy_target: str
    routes: tuple[PushRoute, ...]
    region: str = ""
    project_number: int | None = None
    runtime_accounts: Mapping[str, str] = field(default_factory=dict)
    # Each service's Cloud Run resource name (gcp only).
    run_services: Mapping[str, str] = field(default_factory=dict)
    # What each Cloud Run service runs with (infra/runtime.yaml for this environment).
    runtimes: Mapping[str, ServiceRuntime] = field(default_factory=dict)
    schedules: tuple[ScheduleSpec, ...] = ()
    # Every deployed service's base URL (service_url or its services.<name>.url override).
    service_urls: Mapping[str, str] = field(default_factory=dict)
    topology: Topology = TOPOLOGY
    # The predictor's identity on Vertex AI (gcp only).
    serving_account: str = ""
    # Releases and model promotions into this environment wait for approval (its file's
    # `approval: required`).
    approval_required: bool = False

    @property
    def emulated(self) -> bool:
        return self.kind == "emulator"

    def topic_path(self, topic: str) -> str:
        return f"projects/{self.project}/topics/{topic}"

    def subscription_path(self, name: str) -> str:
        return f"projects/{self.project}/subscriptions/{name}"

    @property
    def location(self) -> str:
        return f"projects/{self.project}/locations/{self.region}"

    def service_url(self, service: str) -> str:
        if service not in self.service_urls:
            raise InfraError(f"{self.env}: no URL known for {service}")
        return self.service_urls[service]

    def push_receiver(self, service: str) -> tuple[str, str]:
        """The OIDC audience and the identity of the push requests that reach `service`.

        A service checks one of each (mlpipe.runtime.auth.PushVerifier), so every subscription that
        pushes to it must sign as the same account."""
        routes = [r for r in self.routes if r.subscription.service == service]
        if not routes:
            raise InfraError(f"{service}: no push subscription reaches it in the topology")
        identities = {r.service_account: r.subscription.name for r in routes}
        if len(identities) > 1:
            listed = ", ".join(f"{name} as {account}" for account, name in identities.items())
            raise InfraError(
                f"{self.env}: the subscriptions that push to {service} sign as different "
                f"accounts ({listed}); {service} checks one push identity "
                f"(MLPIPE_PUSH_SERVICE_ACCOUNT): give them the same push_service_account"
            )
        return routes[0].service_url, routes[0].service_account

    def describe(self) -> str:
        where = "the emulators" if self.emulated else f"GCP, region {self.region}"
        return (
            f"env {self.env}: project {self.project} on {where}, bucket gs://{self.bucket}, "
            f"models deploy to {self.deploy_target}"
        )


def _fill(template: str, where: str, values: Mapping[str, object]) -> str:
    try:
        return template.format_map(dict(values))
    except KeyError as exc:
        name = exc.args[0]
        if name == "port":
            raise InfraError(
                f"{where} uses {{port}}, which only a running local stack provides"
            ) from None
        raise InfraError(f"{where}: no value for {{{name}}}") from None


def resolve(
    env: Environment,
    name: str,
    *,
    project: str | None = None,
    project_number: int | None = None,
    bucket: str | None = None,
    ports: Mapping[str, int] | None = None,
    runtimes: Mapping[str, ServiceRuntime] | None = None,
    topology: Topology = TOPOLOGY,
) -> Target:
    """Fill in `env`'s templates for one project (the file's, or `project`); `ports` are a
    running local stack's service ports, `runtimes` the services' runtime definitions (which
    a GCP plan compares with the deployed services)."""
    gcp = env.target == "gcp"
    if project and not re.match(PROJECT_PATTERN, project):
        raise InfraError(f"--project {project!r} is not a GCP project id")
    if project and project != env.project and gcp and project_number is None:
        raise InfraError(
            f"--project {project} is not {name}.yaml's project ({env.project}): pass its "
            f"--project-number too"
        )
    project = project or env.project
    number = project_number or env.project_number
    if gcp and number is None:
        raise InfraError(
            f"{name}: project_number is not set; put it in infra/environments/{name}.yaml or "
            f"pass --project-number (gcloud projects describe {project} "
            f"--format='value(projectNumber)')"
        )
    values: dict[str, object] = {"project": project, "region": env.region or ""}
    if number is not None:
        values["project_number"] = number
    runtime: dict[str, str] = {}
    run_services: dict[str, str] = {}
    serving = ""
    if gcp:
        serving = _fill(env.serving_service_account, "serving_service_account", values)
        for service in topology.deployed:
            per_service = {**values, "service": service}
            runtime[service] = _fill(
                env.runtime_service_account, "runtime_service_account", per_service
            )
            run_services[service] = f"projects/{project}/locations/{env.region}/services/" + _fill(
                env.cloud_run_service, "cloud_run_service", per_service
            )
    urls: dict[str, str] = {}
    for service in topology.deployed:
        per_service = {**values, "service": service}
        if ports is not None and service in ports:
            per_service["port"] = ports[service]
        elif ports is not None:
            continue  # a local stack that does not run it
        override = env.services.get(service)
        urls[service] = _fill(
            override.url if override else env.service_url,
            f"services.{service}.url" if override else "service_url",
            per_service,
        ).rstrip("/")
    routes = []
    for sub in topology.push:
        per_service = {**values, "service": sub.service}
        if ports is not None and sub.service in ports:
            per_service["port"] = ports[sub.service]
        override = env.services.get(sub.service)
        url = _fill(
            override.url if override else env.service_url,
            f"services.{sub.service}.url" if override else "service_url",
            per_service,
        ).rstrip("/")
        account = ""
        if gcp:
            account = _fill(
                env.subscriptions[sub.name].push_service_account,
                f"subscriptions.{sub.name}.push_service_account",
                per_service,
            )
        routes.append(PushRoute(sub, url, account, run_services.get(sub.service, "")))
    return Target(
        env=name,
        kind=env.target,
        project=project,
        bucket=bucket or _fill(env.bucket, "bucket", values),
        deploy_target=env.deploy_target,
        routes=tuple(routes),
        region=env.region or "",
        project_number=number,
        runtime_accounts=runtime,
        run_services=run_services,
        runtimes=dict(runtimes or {}),
        schedules=tuple(env.schedules),
        topology=topology,
        serving_account=serving,
        service_urls=urls,
        approval_required=env.approval_required,
    )


def storage_place(env: Environment, name: str) -> tuple[str, str]:
    """The project and bucket of environment `name`: what a command that only reads and writes
    its bucket and publishes to its topics needs (a bucket template may use {project} and
    {region}, and {project_number} when the file sets it)."""
    values: dict[str, object] = {"project": env.project, "region": env.region or ""}
    if env.project_number is not None:
        values["project_number"] = env.project_number
    return env.project, _fill(env.bucket, f"{name}.yaml: bucket", values)


def local_target(
    project: str,
    bucket: str,
    ports: Mapping[str, int],
    directory: Path | None = None,
) -> Target:
    """The `local` environment for one running stack (its project, bucket and ports)."""
    env = load_environment("local", directory)
    if env.target != "emulator":
        raise InfraError("infra/environments/local.yaml: target must be emulator")
    return resolve(env, "local", project=project, bucket=bucket, ports=ports)


# --- request builders (pure) ------------------------------------------------------------------
# On the Pub/Sub emulator a push subscription gets no retry policy. The emulator's retry-policy
# redelivery can stop for good: when two failed deliveries of one subscription fall due in the
# same millisecond, its delayed-message bookkeeping throws, and the task that redelivers that
# subscription's expired messages dies silently (seen with emulator 0.8.20: three deliveries
# refused while a service restarted were never pushed again). Without a retry policy the
# emulator pushes a refused message again after about a second, so it is allowed the most
# attempts Pub/Sub accepts before dead-lettering (about a hundred seconds of retrying).
EMULATOR_MAX_DELIVERY_ATTEMPTS = 100


def push_subscription(target: Target, route: PushRoute) -> Subscription:
    sub = route.subscription
    push_config = PushConfig(push_endpoint=route.endpoint)
    if route.service_account:
        push_config.oidc_token = PushConfig.OidcToken(
            service_account_email=route.service_account, audience=route.service_url
        )
    subscription = Subscription(
        name=target.subscription_path(sub.name),
        topic=target.topic_path(sub.topic),
        push_config=push_config,
        ack_deadline_seconds=sub.ack_deadline_seconds,
        dead_letter_policy=DeadLetterPolicy(
            dead_letter_topic=target.topic_path(target.topology.dead_letter_topic),
            max_delivery_attempts=(
                EMULATOR_MAX_DELIVERY_ATTEMPTS if target.emulated else sub.max_delivery_attempts
            ),
        ),
    )
    if not target.emulated:
        subscription.retry_policy = RetryPolicy(
            minimum_backoff=timedelta(seconds=sub.min_backoff_seconds),
            maximum_backoff=timedelta(seconds=sub.max_backoff_seconds),
        )
    return subscription


def pull_subscription(target: Target, pull: PullSubscription) -> Subscription:
    return Subscription(
        name=target.subscription_path(pull.name),
        topic=target.topic_path(pull.topic),
        ack_deadline_seconds=pull.ack_deadline_seconds,
        message_retention_duration=timedelta(days=pull.retention_days),
    )


# (update-mask path, what it is, how to read it): the fields a subscription is compared on.
_SUBSCRIPTION_FIELDS: tuple[tuple[str, str, Callable[[Any], Any]], ...] = (
    ("push_config", "push endpoint", lambda s: s.push_config.push_endpoint),
    (
        "push_config",
        "OIDC service account",
        lambda s: s.push_config.oidc_token.service_account_email,
    ),
    ("push_config", "OIDC audience", lambda s: s.push_config.oidc_token.audience),
    ("ack_deadline_seconds", "ack deadline", lambda s: s.ack_deadline_seconds),
    ("dead_letter_policy", "dead-letter topic", lambda s: s.dead_letter_policy.dead_letter_topic),
    (
        "dead_letter_policy",
        "max delivery attempts",
        lambda s: s.dead_letter_policy.max_delivery_attempts,
    ),
    ("retry_policy", "minimum backoff", lambda s: s.retry_policy.minimum_backoff),
    ("retry_policy", "maximum backoff", lambda s: s.retry_policy.maximum_backoff),
    ("message_retention_duration", "retention", lambda s: s.message_retention_duration),
)


def _show(value: Any) -> str:
    if isinstance(value, timedelta):
        return f"{value.total_seconds():g}s"
    if value in ("", None):
        return "(none)"
    return str(value)


def subscription_differences(
    desired: Subscription, existing: Subscription
) -> list[tuple[str, str]]:
    """(update-mask path, description) for each managed field where `existing` differs.

    Only what `desired` sets is compared: Pub/Sub fills in defaults we do not manage."""
    found = []
    for path, label, read in _SUBSCRIPTION_FIELDS:
        is_message = path != "ack_deadline_seconds"
        if is_message and not Subscription.pb(desired).HasField(path):
            # Pub/Sub sets no retry policy of its own: one that is there but not wanted is drift.
            if path == "retry_policy" and Subscription.pb(existing).HasField(path):
                found.append((path, f"{label} {_show(read(existing))} → (none)"))
            continue
        want, have = read(desired), read(existing)
        if want != have:
            found.append((path, f"{label} {_show(have)} → {_show(want)}"))
    return found


def update_subscription_request(
    desired: Subscription, differences: list[tuple[str, str]]
) -> UpdateSubscriptionRequest:
    paths = sorted({path for path, _ in differences})
    return UpdateSubscriptionRequest(
        subscription=desired, update_mask=field_mask_pb2.FieldMask(paths=paths)
    )


def scheduler_job(target: Target, schedule: ScheduleSpec) -> scheduler_v1.Job:
    request = schedule.message()
    if isinstance(request, events_pb2.MonitoringRequest):
        what, topic = f"a drift check of {request.pipeline}", schedule.topic
    else:
        what, topic = f"an IngestRequest for {request.dataset}", target.topology.schedule_topic
    return scheduler_v1.Job(
        name=f"{target.location}/jobs/{schedule.name}",
        description=schedule.description or f"mlpipe {target.env}: publishes {what}",
        schedule=schedule.schedule,
        time_zone=schedule.time_zone,
        pubsub_target=scheduler_v1.PubsubTarget(
            topic_name=target.topic_path(topic),
            data=events.to_json(request).encode(),
            attributes={
                events.EVENT_TYPE_ATTR: request.DESCRIPTOR.full_name,
                "encoding": "JSON",
            },
        ),
    )


@dataclass(frozen=True)
class ServiceCheck:
    """A route of a service that Cloud Scheduler calls on GCP: it finishes or restarts work the
    service recorded, since an idle Cloud Run instance gets no CPU for a timer of its own (the
    local stack's services run the same function on a timer instead)."""

    name: str
    service: str
    path: str
    schedule: str
    what: str


SERVICE_CHECKS = (
    ServiceCheck(
        "mlpipe-deployer-rollouts-check",
        "deployer",
        "/v1/rollouts:check",
        "* * * * *",
        "finishes rollouts whose cloud operations have ended (docs/deploy.md)",
    ),
    ServiceCheck(
        "mlpipe-trainer-reconcile",
        "trainer",
        "/v1/runs:reconcile",
        "* * * * *",
        "restarts training runs whose lease lapsed (docs/reliability.md)",
    ),
    ServiceCheck(
        "mlpipe-ingest-exports-check",
        "ingest",
        "/v1/exports:check",
        "* * * * *",
        "lands or fails sources' cloud exports that have ended (docs/ingest-sources.md)",
    ),
)


def check_job(target: Target, check: ServiceCheck) -> scheduler_v1.Job:
    """The Cloud Scheduler job that POSTs to `check`'s route with an OIDC token.

    https://cloud.google.com/scheduler/docs/http-target-auth: the token's account must belong
    to the job's project and, for Cloud Run, hold roles/run.invoker on the service; whoever
    creates the job needs iam.serviceAccounts.actAs on it (OidcToken.service_account_email).
    The service's push identity already holds run.invoker on it (iam_bindings), and the
    audience is the service URL, as for its push subscriptions."""
    audience, account = target.push_receiver(check.service)
    return scheduler_v1.Job(
        name=f"{target.location}/jobs/{check.name}",
        description=f"mlpipe {target.env}: {check.service} {check.what}",
        schedule=check.schedule,
        time_zone="Etc/UTC",
        http_target=scheduler_v1.HttpTarget(
            uri=audience.rstrip("/") + check.path,
            http_method=scheduler_v1.HttpMethod.POST,
            oidc_token=scheduler_v1.OidcToken(service_account_email=account, audience=audience),
        ),
    )


def create_job_request(target: Target, job: scheduler_v1.Job) -> scheduler_v1.CreateJobRequest:
    """Create `job` (a schedule's, or a service check's) in the target's location."""
    return scheduler_v1.CreateJobRequest(parent=target.location, job=job)


_JOB_FIELDS: tuple[tuple[str, str, Callable[[Any], Any]], ...] = (
    ("description", "description", lambda j: j.description),
    ("schedule", "schedule", lambda j: j.schedule),
    ("time_zone", "time zone", lambda j: j.time_zone),
    ("pubsub_target", "topic", lambda j: j.pubsub_target.topic_name),
    ("pubsub_target", "request", lambda j: j.pubsub_target.data),
    ("pubsub_target", "attributes", lambda j: dict(j.pubsub_target.attributes)),
    ("http_target", "uri", lambda j: j.http_target.uri),
    ("http_target", "method", lambda j: j.http_target.http_method),
    ("http_target", "token account", lambda j: j.http_target.oidc_token.service_account_email),
    ("http_target", "token audience", lambda j: j.http_target.oidc_token.audience),
)


def job_differences(desired: scheduler_v1.Job, existing: scheduler_v1.Job) -> list[tuple[str, str]]:
    found = []
    for path, label, read in _JOB_FIELDS:
        want, have = read(desired), read(existing)
        if want != have:
            shown = "changed" if label == "request" else f"{_show(have)} → {_show(want)}"
            found.append((path, f"{label} {shown}"))
    return found


def update_job_request(
    desired: scheduler_v1.Job, differences: list[tuple[str, str]]
) -> scheduler_v1.UpdateJobRequest:
    return scheduler_v1.UpdateJobRequest(
        job=desired,
        update_mask=field_mask_pb2.FieldMask(paths=sorted({p for p, _ in differences})),
    )


def bucket_notification(client: storage.Client, target: Target) -> BucketNotification:
    """The bucket's notification to Pub/Sub, as google-cloud-storage creates it."""
    note = target.topology.notification
    return client.bucket(target.bucket).notification(
        topic_name=note.topic,
        topic_project=target.project,
        event_types=list(note.event_types),
        blob_name_prefix=note.object_prefix,
        payload_format=note.payload_format,
    )


def notification_matches(existing: BucketNotification, desired: BucketNotification) -> bool:
    def key(n: BucketNotification) -> tuple[Any, ...]:
        return (
            n.topic_project,
            n.topic_name,
            n.blob_name_prefix or "",
            n.payload_format,
            sorted(n.event_types or []),
        )

    return key(existing) == key(desired)


@dataclass(frozen=True)
class IamBinding:
    resource: str  # full resource name: a topic, a subscription or a Cloud Run service
    role: str
    member: str
    why: str

    @property
    def kind(self) -> Literal["topic", "subscription", "run service"]:
        if "/subscriptions/" in self.resource:
            return "subscription"
        if "/services/" in self.resource:
            return "run service"
        return "topic"


def iam_bindings(target: Target) -> list[IamBinding]:
    """Every role binding the topology needs in a GCP project, on the narrowest resource."""
    number = target.project_number
    pubsub_agent = f"serviceAccount:service-{number}@gcp-sa-pubsub.iam.gserviceaccount.com"
    storage_agent = f"serviceAccount:service-{number}@gs-project-accounts.iam.gserviceaccount.com"
    topo = target.topology
    bindings = [
        IamBinding(
            target.topic_path(topo.dead_letter_topic),
            "roles/pubsub.publisher",
            pubsub_agent,
            "Pub/Sub forwards undeliverable messages here",
        )
    ]
    bindings += [
        IamBinding(
            target.subscription_path(r.subscription.name),
            "roles/pubsub.subscriber",
            pubsub_agent,
            "Pub/Sub acknowledges the messages it dead-letters",
        )
        for r in target.routes
    ]
    bindings.append(
        IamBinding(
            target.topic_path(topo.notification.topic),
            "roles/pubsub.publisher",
            storage_agent,
            "Cloud Storage publishes the bucket's notifications here",
        )
    )
    bindings += [
        IamBinding(
            r.cloud_run_service,
            "roles/run.invoker",
            f"serviceAccount:{r.service_account}",
            f"{r.subscription.name} pushes with this identity's OIDC token",
        )
        for r in target.routes
    ]
    for service in topo.deployed:
        for topic in topo.publishes.get(service, ()):
            bindings.append(
                IamBinding(
                    target.topic_path(topic),
                    "roles/pubsub.publisher",
                    f"serviceAccount:{target.runtime_accounts[service]}",
                    f"{service} publishes its events here",
                )
            )
    if target.deploy_target == "cloud_run" and "predictor" in target.run_services:
        bindings.append(
            IamBinding(
                target.run_services["predictor"],
                "roles/run.developer",
                f"serviceAccount:{target.runtime_accounts['deployer']}",
                "the Cloud Run target makes the predictor's revisions and moves their traffic "
                "(this service only; actAs on the predictor's account: infra/bootstrap.sh)",
            )
        )
    if "console" in target.runtime_accounts:
        console = f"serviceAccount:{target.runtime_accounts['console']}"
        bindings.append(
            IamBinding(
                target.subscription_path(DEAD_LETTER_ARCHIVE),
                "roles/pubsub.subscriber",
                console,
                "the console lists dead letters and acknowledges the ones it replays",
            )
        )
        if "deployer" in target.run_services:
            bindings.append(
                IamBinding(
                    target.run_services["deployer"],
                    "roles/run.invoker",
                    console,
                    "the console's promote and rollback call the deployer's routes",
                )
            )
    # Two subscriptions pushing to one service with one identity need one invoker binding.
    unique: dict[tuple[str, str, str], IamBinding] = {}
    for binding in bindings:
        unique.setdefault((binding.resource, binding.role, binding.member), binding)
    return list(unique.values())


def policy_with(policy: policy_pb2.Policy, role: str, member: str) -> policy_pb2.Policy | None:
    """`policy` plus `member` in `role` (etag kept, so a concurrent edit is refused), or None
    when it is already there."""
    unconditional = [b for b in policy.bindings if b.role == role and not b.HasField("condition")]
    if any(member in b.members for b in unconditional):
        return None
    updated = policy_pb2.Policy()
    updated.CopyFrom(policy)
    for binding in updated.bindings:
        if binding.role == role and not binding.HasField("condition"):
            binding.members.append(member)
            break
    else:
        updated.bindings.add(role=role, members=[member])
    return updated


def set_iam_policy_request(
    binding: IamBinding, current: policy_pb2.Policy
) -> iam_policy_pb2.SetIamPolicyRequest | None:
    policy = policy_with(current, binding.role, binding.member)
    if policy is None:
        return None
    return iam_policy_pb2.SetIamPolicyRequest(resource=binding.resource, policy=policy)


# What a Cloud Run service's revision template must say, per infra/runtime.yaml: (label, how to
# read it from a run_v2.Service's template, how to say it). Read from the live service and from
# the same service with the definition applied, so both sides go through one reader.
def _cpu(quantity: str) -> float | str:
    try:
        return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)
    except ValueError:
        return quantity


def _memory(quantity: str) -> int | str:
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?", quantity)
    if not match:
        return quantity
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    units |= {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    return int(match.group(1)) * units.get(match.group(2) or "", 1)


def _limits(template: Any) -> Mapping[str, str]:
    return template.containers[0].resources.limits if template.containers else {}


_RUN_FIELDS: tuple[tuple[str, Callable[[Any], Any], Callable[[Any], str]], ...] = (
    (
        "memory",
        lambda t: _memory(_limits(t).get("memory", "")),
        lambda t: _show(_limits(t).get("memory")),
    ),
    ("CPU", lambda t: _cpu(_limits(t).get("cpu", "")), lambda t: _show(_limits(t).get("cpu"))),
    (
        "concurrency",
        lambda t: t.max_instance_request_concurrency,
        lambda t: str(t.max_instance_request_concurrency),
    ),
    ("timeout", lambda t: t.timeout, lambda t: _show(t.timeout)),
    (
        "min instances",
        lambda t: t.scaling.min_instance_count,
        lambda t: str(t.scaling.min_instance_count),
    ),
    (
        "max instances",
        lambda t: t.scaling.max_instance_count,
        lambda t: str(t.scaling.max_instance_count),
    ),
    (
        "CPU allocation",
        lambda t: bool(t.containers and t.containers[0].resources.cpu_idle),
        lambda t: (
            "during requests" if t.containers and t.containers[0].resources.cpu_idle else "always"
        ),
    ),
    (
        "execution environment",
        lambda t: t.execution_environment,
        lambda t: t.execution_environment.name,
    ),
    ("service account", lambda t: t.service_account, lambda t: _show(t.service_account)),
)


def run_service_wanted(
    live: run_v2.Service, runtime: ServiceRuntime, service_account: str
) -> run_v2.Service:
    """`live` with the revision template set as `runtime` says; its image, variables and
    everything else are the deploy's, kept as they are (and its etag, so a concurrent deploy
    is refused, not overwritten)."""
    from google.cloud import run_v2

    wanted = run_v2.Service(live)
    template = wanted.template
    if not template.containers:
        template.containers.append(run_v2.Container())
    resources = template.containers[0].resources
    resources.limits["memory"] = runtime.memory
    resources.limits["cpu"] = f"{runtime.cpu:g}"
    # cpu_idle: CPU only while requests are handled (false: allocated for the whole
    # instance lifetime), the v2 form of `--cpu-throttling`.
    resources.cpu_idle = not runtime.cpu_always_allocated
    template.max_instance_request_concurrency = runtime.concurrency
    template.timeout = duration_pb2.Duration(seconds=runtime.timeout_seconds)
    template.scaling.min_instance_count = runtime.min_instances
    template.scaling.max_instance_count = runtime.max_instances
    template.execution_environment = run_v2.ExecutionEnvironment(
        run_v2.ExecutionEnvironment.EXECUTION_ENVIRONMENT_GEN2
    )
    template.service_account = service_account
    # A named revision cannot be created twice: let Cloud Run name the new one.
    template.revision = ""
    return wanted


def run_service_differences(live: run_v2.Service, wanted: run_v2.Service) -> list[str]:
    """What differs between the live revision template and the wanted one, as plan shows it."""
    return [
        f"{label} {say(live.template)} → {say(wanted.template)}"
        for label, read, say in _RUN_FIELDS
        if read(live.template) != read(wanted.template)
    ]


def update_run_service_request(wanted: run_v2.Service) -> run_v2.UpdateServiceRequest:
    from google.cloud import run_v2

    return run_v2.UpdateServiceRequest(service=wanted)


# --- plan and apply ---------------------------------------------------------------------------
class Clients:
    """The API clients a plan reads with and applies through. Those not given are made on
    first use with default credentials (the emulators' when PUBSUB_EMULATOR_HOST and
    STORAGE_EMULATOR_HOST are set)."""

    def __init__(
        self,
        project: str,
        *,
        publisher: Any = None,
        subscriber: Any = None,
        storage_client: Any = None,
        scheduler: Any = None,
        run: Any = None,
    ) -> None:
        self.project = project
        self._publisher = publisher
        self._subscriber = subscriber
        self._storage = storage_client
        self._scheduler = scheduler
        self._run = run

    @property
    def publisher(self) -> Any:
        if self._publisher is None:
            self._publisher = pubsub_v1.PublisherClient()
        return self._publisher

    @property
    def subscriber(self) -> Any:
        if self._subscriber is None:
            self._subscriber = pubsub_v1.SubscriberClient()
        return self._subscriber

    @property
    def storage(self) -> Any:
        if self._storage is None:
            from mlpipe.store.storage import make_client

            self._storage = make_client(self.project)
        return self._storage

    @property
    def scheduler(self) -> Any:
        if self._scheduler is None:
            self._scheduler = scheduler_v1.CloudSchedulerClient()
        return self._scheduler

    @property
    def run(self) -> Any:
        if self._run is None:
            # Imported here: only a GCP plan needs the Cloud Run admin client.
            from google.cloud import run_v2

            self._run = run_v2.ServicesClient()
        return self._run

    def iam_client(self, binding: IamBinding) -> Any:
        return {"topic": self.publisher, "subscription": self.subscriber}.get(
            binding.kind, self.run
        )


@dataclass
class Change:
    action: str  # create, update, replace, bind; blocked when it cannot be made yet
    kind: str
    name: str
    detail: str = ""
    run: Callable[[], object] | None = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        return f"{self.action} {self.kind} {self.name}{': ' + self.detail if self.detail else ''}"


@dataclass
class Plan:
    target: Target
    changes: list[Change]
    notes: list[str] = field(default_factory=list)

    @property
    def pending(self) -> list[Change]:
        return [c for c in self.changes if c.run is not None]

    @property
    def blocked(self) -> list[Change]:
        return [c for c in self.changes if c.run is None]

    def summary(self, applied: bool = False) -> str:
        if not self.changes:
            return "no changes: it matches the topology"
        blocked = f"; {len(self.blocked)} blocked" if self.blocked else ""
        return f"{len(self.pending)} change(s) {'applied' if applied else 'to apply'}{blocked}"

    def lines(self) -> list[str]:
        """The plan as `mlpipe infra plan` prints it."""
        return [
            self.target.describe(),
            *(f"  {c}" for c in self.changes),
            *(f"  note: {n}" for n in self.notes),
            self.summary(),
        ]


def _topic_change(topic: str, path: str, clients: Clients) -> Change | None:
    try:
        clients.publisher.get_topic(request={"topic": path})
    except gexc.NotFound:

        def create() -> None:
            with contextlib.suppress(gexc.AlreadyExists):
                clients.publisher.create_topic(request={"name": path})

        return Change("create", "topic", topic, run=create)
    return None


def topic_changes(target: Target, clients: Clients) -> list[Change]:
    asks = [
        partial(_topic_change, topic, target.topic_path(topic), clients)
        for topic in target.topology.topics
    ]
    return [c for c in concurrently(asks) if c is not None]


def _subscription_change(
    kind: str, desired: Subscription, detail: str, clients: Clients
) -> Change | None:
    short = desired.name.rsplit("/", 1)[-1]
    try:
        existing = clients.subscriber.get_subscription(request={"subscription": desired.name})
    except gexc.NotFound:

        def create() -> None:
            with contextlib.suppress(gexc.AlreadyExists):
                clients.subscriber.create_subscription(request=desired)

        return Change("create", kind, short, detail, run=create)
    if existing.topic != desired.topic:
        return Change(
            "blocked",
            kind,
            short,
            f"attached to {existing.topic}, not {desired.topic}; a subscription's topic cannot "
            f"change: delete it, then apply again",
        )
    differences = subscription_differences(desired, existing)
    if not differences:
        return None
    return Change(
        "update",
        kind,
        short,
        "; ".join(d for _, d in differences),
        run=partial(
            clients.subscriber.update_subscription,
            request=update_subscription_request(desired, differences),
        ),
    )


def subscription_changes(target: Target, clients: Clients) -> list[Change]:
    asks = [
        partial(
            _subscription_change,
            "push subscription",
            push_subscription(target, route),
            f"→ {route.endpoint}",
            clients,
        )
        for route in target.routes
    ]
    asks += [
        partial(
            _subscription_change, "pull subscription", pull_subscription(target, pull), "", clients
        )
        for pull in target.topology.pull
    ]
    return [c for c in concurrently(asks) if c is not None]


# Changes of these kinds are independent of each other (each names its own resource, and
# what it needs, a topic, was made in an earlier group): `apply` makes each group's at once.
CONCURRENT_KINDS = {
    "topic": "topics",
    "push subscription": "subscriptions",
    "pull subscription": "subscriptions",
}
CONCURRENCY = 8


def concurrently(calls: Sequence[Callable[[], T]]) -> list[T]:
    """Each call's result, in the calls' order, made up to CONCURRENCY at a time (the Pub/Sub
    clients are thread-safe). The first call to fail, in that order, raises its error once every
    call has ended."""
    if len(calls) < 2:
        return [call() for call in calls]
    with ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="infra") as pool:
        futures = [pool.submit(call) for call in calls]
        wait(futures)
    return [future.result() for future in futures]


def _add_binding(clients: Clients, binding: IamBinding, attempts: int = 3) -> None:
    """Read-modify-write with the policy's etag; a concurrent edit makes it read again."""
    client = clients.iam_client(binding)
    for attempt in range(attempts):
        current = client.get_iam_policy(request={"resource": binding.resource})
        request = set_iam_policy_request(binding, current)
        if request is None:
            return
        try:
            client.set_iam_policy(request=request)
            return
        except gexc.Aborted:
            if attempt == attempts - 1:
                raise


def iam_changes(target: Target, clients: Clients) -> list[Change]:
    policies: dict[str, policy_pb2.Policy | None] = {}
    changes = []
    for binding in iam_bindings(target):
        if binding.resource not in policies:
            client = clients.iam_client(binding)
            try:
                policies[binding.resource] = client.get_iam_policy(
                    request={"resource": binding.resource}
                )
            except gexc.NotFound:
                # A topic or subscription this apply creates first; a service not deployed.
                policies[binding.resource] = (
                    None if binding.kind == "run service" else policy_pb2.Policy()
                )
        policy = policies[binding.resource]
        name = f"{binding.role} on {binding.resource}"
        if policy is None:
            changes.append(
                Change(
                    "blocked",
                    "iam binding",
                    name,
                    f"{binding.member}: the service is not deployed yet; deploy it "
                    f"(cloudbuild/), then apply again",
                )
            )
        elif policy_with(policy, binding.role, binding.member) is not None:
            changes.append(
                Change(
                    "bind",
                    "iam binding",
                    name,
                    f"{binding.member} ({binding.why})",
                    run=partial(_add_binding, clients, binding),
                )
            )
    return changes


def notification_changes(target: Target, clients: Clients) -> list[Change]:
    note = target.topology.notification
    name = f"gs://{target.bucket}/{note.object_prefix} → {note.topic}"
    if clients.storage.lookup_bucket(target.bucket) is None:
        return [
            Change(
                "blocked",
                "bucket notification",
                name,
                f"bucket gs://{target.bucket} does not exist; infra/bootstrap.sh creates it",
            )
        ]
    desired = bucket_notification(clients.storage, target)
    existing = list(clients.storage.bucket(target.bucket).list_notifications())
    if any(notification_matches(n, desired) for n in existing):
        return []
    stale = [
        n for n in existing if n.topic_project == target.project and n.topic_name == note.topic
    ]
    detail = f"{', '.join(note.event_types)}, {note.payload_format}"

    def create() -> None:
        for old in stale:
            old.delete()
        bucket_notification(clients.storage, target).create()

    if stale:
        ids = ", ".join(str(n.notification_id) for n in stale)
        return [Change("replace", "bucket notification", name, f"{detail} (was {ids})", create)]
    return [Change("create", "bucket notification", name, detail, create)]


def schedule_changes(target: Target, clients: Clients) -> list[Change]:
    """The environment's schedules, then the services' scheduled checks (SERVICE_CHECKS)."""
    wanted: list[tuple[str, scheduler_v1.Job, str]] = []
    for schedule in target.schedules:
        topic = target.topology.schedule_topic if schedule.kind == "ingest" else schedule.topic
        detail = f"'{schedule.schedule}' {schedule.time_zone} → {topic}"
        wanted.append((schedule.name, scheduler_job(target, schedule), detail))
    for check in SERVICE_CHECKS:
        job = check_job(target, check)
        wanted.append((check.name, job, f"'{check.schedule}' Etc/UTC → POST {job.http_target.uri}"))
    changes = []
    for name, desired, detail in wanted:
        try:
            existing = clients.scheduler.get_job(name=desired.name)
        except gexc.NotFound:
            request = create_job_request(target, desired)
            changes.append(
                Change(
                    "create",
                    "schedule",
                    name,
                    detail,
                    run=partial(clients.scheduler.create_job, request=request),
                )
            )
            continue
        differences = job_differences(desired, existing)
        if differences:
            update = update_job_request(desired, differences)
            changes.append(
                Change(
                    "update",
                    "schedule",
                    name,
                    "; ".join(d for _, d in differences),
                    run=partial(clients.scheduler.update_job, request=update),
                )
            )
    return changes


def emulator_notes(target: Target) -> list[str]:
    note = target.topology.notification
    return [
        f"bucket notification: fake-gcs-server publishes {', '.join(note.event_types)} for "
        f"gs://{target.bucket}/{note.object_prefix} to {note.topic}; its start-up flags set "
        f"that (`mlpipe up`), not this plan",
        f"schedules: Cloud Scheduler is not emulated; {len(target.schedules)} schedule(s) in "
        f"{target.env}.yaml are not applied (fire one with `mlpipe schedule run NAME --env local`)",
        "IAM and OIDC: the emulator has neither; push requests carry no Authorization header",
    ]


# Cloud Run rolls out a new revision before the update's operation is done.
RUN_UPDATE_TIMEOUT_SECONDS = 600.0


def _update_run_service(clients: Clients, request: run_v2.UpdateServiceRequest) -> None:
    clients.run.update_service(request=request).result(timeout=RUN_UPDATE_TIMEOUT_SECONDS)


def run_service_changes(target: Target, clients: Clients) -> tuple[list[Change], list[str]]:
    """Each deployed service whose revision template differs from infra/runtime.yaml, and a
    note for each service that is not deployed yet (its first deploy applies the definition)."""
    changes, notes = [], []
    for service, runtime in target.runtimes.items():
        name = target.run_services[service]
        short = name.rsplit("/", 1)[-1]
        try:
            live = clients.run.get_service(name=name)
        except gexc.NotFound:
            notes.append(
                f"cloud run service {short}: not deployed yet; cloudbuild/service.yaml deploys "
                f"it with infra/runtime.yaml's settings"
            )
            continue
        wanted = run_service_wanted(live, runtime, target.runtime_accounts[service])
        differences = run_service_differences(live, wanted)
        if differences:
            changes.append(
                Change(
                    "update",
                    "cloud run service",
                    short,
                    "; ".join(differences),
                    run=partial(_update_run_service, clients, update_run_service_request(wanted)),
                )
            )
    return changes, notes


def plan(target: Target, clients: Clients | None = None) -> Plan:
    """What `apply` would change, in the order it would: topics, subscriptions, IAM (which a
    notification needs first), the bucket notification, schedules, then the Cloud Run
    services' runtime settings (infra/runtime.yaml)."""
    clients = clients or Clients(target.project)
    changes = topic_changes(target, clients) + subscription_changes(target, clients)
    if target.emulated:
        return Plan(target, changes, emulator_notes(target))
    changes += iam_changes(target, clients)
    changes += notification_changes(target, clients)
    changes += schedule_changes(target, clients)
    run_changes, notes = run_service_changes(target, clients)
    if not target.runtimes:
        notes.append("cloud run services: no runtime definition given, so not compared")
    return Plan(target, changes + run_changes, notes)


def apply(
    target: Target,
    clients: Clients | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> Plan:
    """Make `target` match the topology; return the plan that was carried out. Blocked
    changes are left for the caller to report."""
    planned = plan(target, clients)
    pending = planned.pending
    i = 0
    while i < len(pending):
        group = CONCURRENT_KINDS.get(pending[i].kind)
        j = i + 1
        while group and j < len(pending) and CONCURRENT_KINDS.get(pending[j].kind) == group:
            j += 1
        concurrently([change.run for change in pending[i:j] if change.run is not None])
        for change in pending[i:j]:
            progress(str(change))
        i = j
    return planned
