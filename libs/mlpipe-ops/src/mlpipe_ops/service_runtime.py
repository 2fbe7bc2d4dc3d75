"""The runtime definition of each service (`infra/runtime.yaml`): memory, CPU, concurrency,
request timeout, CPU allocation, instances, extra environment and the Secret Manager secrets
mounted as variables.

One definition feeds the Cloud Run deploy (`mlpipe infra run-flags`, which renders
`run_deploy_flags`, and the Cloud Deploy release's service manifests, `mlpipe infra
release-config`; both written from one `CloudRunRevision`), `mlpipe infra plan` (which
compares it with the live services) and the local container stack (`mlpipe up
--containers`), so a service runs locally under the limits it ships with. The environment a
service gets is built in one place, `service_environment`.
Each Cloud Run rule checked here names its source.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mlpipe.messaging.topology import TOPOLOGY
from mlpipe.store.run_cost import CostInputError, PriceTable, ServiceSize, sizes_to_json

if TYPE_CHECKING:
    from mlpipe_ops.infra import Target

RUNTIME_FILE = "runtime.yaml"
PRICES_FILE = "prices.yaml"
_QUANTITY = re.compile(r"^(\d+)(Mi|Gi)$")
# A variable name, and a Secret Manager secret with its version as Cloud Run mounts one
# (`--set-secrets VAR=SECRET:VERSION`; configuring/services/secrets: a version number or latest).
_VARIABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SECRET_VERSION = re.compile(r"^[A-Za-z0-9_-]{1,255}:(latest|[1-9][0-9]*)$")
_UNITS = {"Mi": 1024**2, "Gi": 1024**3}
MIB = 1024**2
GIB = 1024**3


class RuntimeDefinitionError(ValueError):
    """infra/runtime.yaml is missing or invalid; the message names the key."""


def describe_invalid(exc: ValidationError, within: str = "") -> str:
    """Each problem of a YAML file's validation as `key.path: what is wrong`, keys under
    `within` when given."""
    lines = []
    for err in exc.errors():
        where = ".".join(
            [within, *(str(p) for p in err["loc"])] if within else map(str, err["loc"])
        )
        message = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] == "missing":
            message = "required key missing"
        lines.append(f"{where}: {message}" if where else message)
    return "; ".join(lines)


def memory_bytes(quantity: str) -> int:
    match = _QUANTITY.match(quantity)
    if not match:
        raise ValueError(f"{quantity!r} is not a memory size such as 512Mi or 2Gi")
    return int(match.group(1)) * _UNITS[match.group(2)]


class ServiceRuntime(BaseModel):
    """What one service's instances get."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    memory: str
    cpu: float
    concurrency: int = Field(ge=1, le=1000)  # Cloud Run: 1 to 1000 (configuring/concurrency)
    # Cloud Run services: up to 3600 s (configuring/request-timeout).
    timeout_seconds: int = Field(ge=1, le=3600)
    cpu_always_allocated: bool
    min_instances: int = Field(ge=0)
    max_instances: int = Field(ge=1)
    env: dict[str, str] = Field(default_factory=dict)
    # Variable → `<secret>:<version>`: a value that must not be in the repository (a webhook's
    # URL or signing secret), read from Secret Manager by Cloud Run when an instance starts.
    secrets: dict[str, str] = Field(default_factory=dict)

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str) -> str:
        size = memory_bytes(value)
        # Cloud Run (configuring/services/memory-limits): 512 MiB minimum in the second
        # generation execution environment, 32 GiB maximum.
        if not 512 * MIB <= size <= 32 * GIB:
            raise ValueError(f"{value}: Cloud Run allows 512Mi to 32Gi (second generation)")
        return value

    @field_validator("cpu")
    @classmethod
    def _cpu(cls, value: float) -> float:
        # Cloud Run (configuring/services/cpu): 1, 2, 4, 6 or 8 CPUs, or a fraction below 1.
        if value not in (1, 2, 4, 6, 8) and not 0.08 <= value < 1:
            raise ValueError(f"{value}: Cloud Run allows 1, 2, 4, 6 or 8 CPUs, or under 1")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        reserved = sorted(k for k in value if k in CLOUD_RUN_RESERVED)
        if reserved:
            # Cloud Run sets these itself and refuses them (container-contract#env-vars).
            raise ValueError(f"{reserved[0]} is set by Cloud Run itself")
        derived = sorted(k for k in value if k in DERIVED_ENV)
        if derived:
            raise ValueError(
                f"{derived[0]} comes from the environment file and the build "
                f"(service_environment), not from runtime.yaml"
            )
        return value

    @field_validator("secrets")
    @classmethod
    def _secrets(cls, value: dict[str, str]) -> dict[str, str]:
        cls._env(value)
        for name, secret in value.items():
            if not _VARIABLE.match(name):
                raise ValueError(f"{name!r} is not a variable name")
            if not _SECRET_VERSION.match(secret):
                raise ValueError(
                    f"{name}: {secret!r} is not <secret>:<version> (a version number or latest)"
                )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ServiceRuntime:
        size = memory_bytes(self.memory)
        # Cloud Run (configuring/services/memory-limits, "Required minimum CPUs").
        for above, cpus in ((24 * GIB, 8), (16 * GIB, 6), (8 * GIB, 4), (4 * GIB, 2)):
            if size > above and self.cpu < cpus:
                raise ValueError(
                    f"memory {self.memory} needs at least {cpus} CPUs on Cloud Run "
                    f"(more than {above // GIB} GiB), not {self.cpu:g}"
                )
        # Cloud Run (configuring/services/cpu): below 1 CPU, concurrency must be 1 and CPU
        # is allocated only during requests.
        if self.cpu < 1 and (self.concurrency != 1 or self.cpu_always_allocated):
            raise ValueError("under 1 CPU, Cloud Run needs concurrency 1 and request-only CPU")
        both = sorted(set(self.env) & set(self.secrets))
        if both:
            raise ValueError(f"{both[0]} is in both env and secrets")
        if self.min_instances > self.max_instances:
            raise ValueError(
                f"min_instances {self.min_instances} is above max_instances {self.max_instances}"
            )
        return self

    @property
    def memory_bytes(self) -> int:
        return memory_bytes(self.memory)


# Set by Cloud Run in every instance (container-contract, "Environment variables").
CLOUD_RUN_RESERVED = frozenset({"PORT", "K_SERVICE", "K_REVISION", "K_CONFIGURATION"})
# Set by `service_environment` from the environment file and the build.
DERIVED_ENV = frozenset(
    {
        "MLPIPE_PROJECT",
        "MLPIPE_BUCKET",
        "MLPIPE_CODE_VERSION",
        "MLPIPE_ENV",
        "MLPIPE_PUSH_AUTH",
        "MLPIPE_PUSH_AUDIENCE",
        "MLPIPE_PUSH_SERVICE_ACCOUNT",
        "MLPIPE_TRAINER_IMAGE",
        "MLPIPE_VERTEX_SERVICE_ACCOUNT",
        "MLPIPE_DEPLOY_TARGET",
        "MLPIPE_REGION",
        "MLPIPE_CLOUD_RUN_SERVICE",
        "MLPIPE_PREDICTOR_IMAGE",
        "MLPIPE_VERTEX_SERVING_ACCOUNT",
        "MLPIPE_BATCH_LAUNCHER",
        "MLPIPE_BATCH_DATAFLOW_TEMPLATE",
        "MLPIPE_BATCH_DATAFLOW_SERVICE_ACCOUNT",
        "MLPIPE_BATCH_DATAFLOW_TEMP_LOCATION",
        "MLPIPE_BATCH_DATAFLOW_STAGING_LOCATION",
        "MLPIPE_VALIDATION_LAUNCHER",
        "MLPIPE_VALIDATION_DATAFLOW_TEMPLATE",
        "MLPIPE_VALIDATION_DATAFLOW_SERVICE_ACCOUNT",
        "MLPIPE_VALIDATION_DATAFLOW_TEMP_LOCATION",
        "MLPIPE_VALIDATION_DATAFLOW_STAGING_LOCATION",
        "MLPIPE_CONSOLE_AUTH",
        "MLPIPE_CONSOLE_AUDIENCE",
        "MLPIPE_DEPLOYER_URL",
        "MLPIPE_COST_SIZES",
        "MLPIPE_PRICES",
    }
)


def sibling_image(image: str, service: str) -> str:
    """The image of `service` built with `image` (cloudbuild/service.yaml pushes every service
    as <registry>/<service>:<tag>): the same registry and tag."""
    registry, _, name = image.rpartition("/")
    _, colon, tag = name.partition(":")
    if not registry or not colon or not tag or "@" in name:
        raise ValueError(f"{image!r} is not <registry>/<service>:<tag>")
    return f"{registry}/{service}:{tag}"


def runtime_file(directory: Path | None = None) -> Path:
    """`infra/runtime.yaml` beside `directory` (an environments folder) or above the working
    directory or this package."""
    from mlpipe_ops import infra

    return infra.environments_dir(directory).parent / RUNTIME_FILE


def load_runtimes(env: str = "local", path: Path | None = None) -> dict[str, ServiceRuntime]:
    """Every service's runtime in environment `env` (defaults, the service, then `env`'s
    changes)."""
    path = path or runtime_file()
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise RuntimeDefinitionError(f"cannot read {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise RuntimeDefinitionError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RuntimeDefinitionError(f"{path}: expected a mapping at the top level")
    unknown = sorted(set(raw) - {"defaults", "services", "environments"})
    if unknown:
        raise RuntimeDefinitionError(f"{path}: {unknown[0]}: unknown key")
    defaults = raw.get("defaults") or {}
    services = raw.get("services") or {}
    changes = (raw.get("environments") or {}).get(env) or {}
    for where, names in (("services", services), (f"environments.{env}", changes)):
        extra = sorted(set(names) - set(TOPOLOGY.deployed))
        if extra:
            raise RuntimeDefinitionError(
                f"{path}: {where}.{extra[0]}: unknown service "
                f"(known: {', '.join(TOPOLOGY.deployed)})"
            )
    runtimes = {}
    for service in TOPOLOGY.deployed:
        merged: dict[str, Any] = {
            **defaults,
            **(services.get(service) or {}),
            **(changes.get(service) or {}),
        }
        for key in ("env", "secrets"):
            merged[key] = {
                **(defaults.get(key) or {}),
                **((services.get(service) or {}).get(key) or {}),
                **((changes.get(service) or {}).get(key) or {}),
            }
        try:
            runtimes[service] = ServiceRuntime.model_validate(merged)
        except ValidationError as exc:
            raise RuntimeDefinitionError(
                f"{path}: {describe_invalid(exc, within=service)} (env {env})"
            ) from None
    return runtimes


def cost_sizes(runtimes: Mapping[str, ServiceRuntime]) -> dict[str, ServiceSize]:
    """Each service's size as a run's cost estimate prices it (mlpipe.store.run_cost)."""
    return {
        name: ServiceSize(r.cpu, r.memory_bytes / GIB, r.cpu_always_allocated)
        for name, r in runtimes.items()
    }


def load_prices(path: Path | None = None) -> PriceTable:
    """The price table, `infra/prices.yaml` beside runtime.yaml unless `path` is given."""
    path = path or runtime_file().with_name(PRICES_FILE)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CostInputError(f"cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise CostInputError(f"{path}: expected a mapping at the top level")
    return PriceTable.from_mapping(raw)


# The services that estimate costs (mlpipe.store.run_cost): the deployer records an ended
# run's estimate, the evaluator shows the steps so far in its report, the predictor estimates
# its batch jobs, the console computes one for a run that has none recorded.
COST_ESTIMATORS = frozenset({"console", "deployer", "evaluator", "predictor"})


def cost_environment(env: str) -> dict[str, str]:
    """What a service needs to estimate a run's cost, as two variables: every service's
    size (MLPIPE_COST_SIZES) and the price table (MLPIPE_PRICES), compact JSON.

    No service may import this distribution, and infra/ is not in their images: passing
    both in their environment keeps infra/runtime.yaml and infra/prices.yaml the one source
    (a copy shipped as package data could drift), and a deploy carries a change of either."""
    return {
        "MLPIPE_COST_SIZES": sizes_to_json(cost_sizes(load_runtimes(env))),
        "MLPIPE_PRICES": load_prices().to_json(),
    }


def service_environment(
    target: Target,
    service: str,
    runtime: ServiceRuntime,
    *,
    code_version: str,
    image: str = "",
) -> dict[str, str]:
    """Every variable `service` needs on `target`, and nothing else: the project, bucket,
    code version and environment; on GCP, spans to Cloud Trace; how push requests are checked
    (on GCP, the OIDC audience and identity its subscriptions sign with, as `mlpipe infra
    apply` configures them); the trainer's own image and, on GCP, its own account (Vertex AI
    CustomJobs run both); the sizes and prices of the services that estimate costs
    (COST_ESTIMATORS, cost_environment); on GCP, where the deployer rolls models out (the
    environment's deploy_target, the predictor service, the predictor image of the same
    build, the serving identity on Vertex AI); the console the notifier's notices link to;
    then runtime.yaml's `env`.

    Cloud Run sets PORT and K_* itself; the local stack adds the emulators' hosts."""
    env = {
        "MLPIPE_PROJECT": target.project,
        "MLPIPE_BUCKET": target.bucket,
        "MLPIPE_CODE_VERSION": code_version,
        "MLPIPE_ENV": target.env,
    }
    if not target.emulated:
        # One trace per run in Cloud Trace (mlpipe.tracing; each service account holds
        # roles/cloudtrace.agent). The local stack keeps spans in its state directory.
        env["MLPIPE_TRACE_EXPORTER"] = "cloud-trace"
    if service in target.topology.viewers:
        # No push reaches a viewer. Locally everyone may act (the console refuses that away
        # from the emulators); on GCP Identity-Aware Proxy names the user
        # (mlpipe_console.identity) and the deployer, which it asks for rollout steps, is private.
        env["MLPIPE_CONSOLE_AUTH"] = "local" if target.emulated else "iap"
        if not target.emulated:
            env["MLPIPE_CONSOLE_AUDIENCE"] = target.service_url(service)
            # IAP's signed header is checked for this audience: a Cloud Run service behind IAP
            # directly (cloud.google.com/iap/docs/signed-headers-howto); behind a load
            # balancer it is /projects/N/global/backendServices/ID, set in runtime.yaml's env.
            name = target.run_services[service].rsplit("/", 1)[-1]
            env["MLPIPE_CONSOLE_IAP_AUDIENCE"] = (
                f"/projects/{target.project_number}/locations/{target.region}/services/{name}"
            )
        if "deployer" in target.service_urls:
            env["MLPIPE_DEPLOYER_URL"] = target.service_url("deployer")
        # The run page's cost estimate (mlpipe.store.run_cost).
        env |= cost_environment(target.env)
        return env | runtime.env
    if service in COST_ESTIMATORS:
        env |= cost_environment(target.env)
    if target.emulated:
        # The emulator sends no Authorization header (mlpipe.runtime.auth accepts none only there).
        env["MLPIPE_PUSH_AUTH"] = "none"
    else:
        audience, account = target.push_receiver(service)
        env |= {
            "MLPIPE_PUSH_AUTH": "oidc",
            "MLPIPE_PUSH_AUDIENCE": audience,
            "MLPIPE_PUSH_SERVICE_ACCOUNT": account,
        }
    if service == "trainer" and image:
        env["MLPIPE_TRAINER_IMAGE"] = image
    if service == "trainer" and not target.emulated:
        # A Vertex AI CustomJob runs as the trainer's own account unless its config names one:
        # the Custom Code Service Agent could not publish TrainingCompleted.
        env["MLPIPE_VERTEX_SERVICE_ACCOUNT"] = target.runtime_accounts["trainer"]
    if service == "deployer" and not target.emulated:
        env |= {
            "MLPIPE_DEPLOY_TARGET": target.deploy_target,
            "MLPIPE_REGION": target.region,
            "MLPIPE_CLOUD_RUN_SERVICE": target.run_services["predictor"].rsplit("/", 1)[-1],
        }
        if image:
            env["MLPIPE_PREDICTOR_IMAGE"] = sibling_image(image, "predictor")
        if target.deploy_target == "vertex":
            env["MLPIPE_VERTEX_SERVING_ACCOUNT"] = target.serving_account
    if service == "notifier" and "console" in target.service_urls:
        # Notices link to the run's page in the console. Behind a load balancer, people open
        # another address: runtime.yaml's env may set MLPIPE_CONSOLE_URL to it.
        env["MLPIPE_CONSOLE_URL"] = target.service_url("console")
    if service == "predictor" and not target.emulated:
        # Batch jobs run on Dataflow as the predictor's own account (it publishes their
        # completion), from the Flex Template of the same build (jobs/batch/cloudbuild.yaml).
        env |= {
            "MLPIPE_BATCH_LAUNCHER": "dataflow",
            "MLPIPE_REGION": target.region,
            "MLPIPE_BATCH_DATAFLOW_TEMPLATE": batch_template_uri(target.bucket, code_version),
            "MLPIPE_BATCH_DATAFLOW_SERVICE_ACCOUNT": target.runtime_accounts["predictor"],
            "MLPIPE_BATCH_DATAFLOW_TEMP_LOCATION": f"gs://{target.bucket}/dataflow/temp",
            "MLPIPE_BATCH_DATAFLOW_STAGING_LOCATION": f"gs://{target.bucket}/dataflow/staging",
        }
    if service == "ingest" and not target.emulated:
        # A large landing's validation runs on Dataflow as ingest's own account, from the batch
        # job's Flex Template of the same build (the ingest image does not hold the job).
        env |= {
            "MLPIPE_VALIDATION_LAUNCHER": "dataflow",
            "MLPIPE_REGION": target.region,
            "MLPIPE_VALIDATION_DATAFLOW_TEMPLATE": batch_template_uri(target.bucket, code_version),
            "MLPIPE_VALIDATION_DATAFLOW_SERVICE_ACCOUNT": target.runtime_accounts["ingest"],
            "MLPIPE_VALIDATION_DATAFLOW_TEMP_LOCATION": f"gs://{target.bucket}/dataflow/temp",
            "MLPIPE_VALIDATION_DATAFLOW_STAGING_LOCATION": f"gs://{target.bucket}/dataflow/staging",
        }
    return env | runtime.env


def batch_template_uri(bucket: str, code_version: str) -> str:
    """Where jobs/batch/cloudbuild.yaml writes the batch job's Flex Template spec file."""
    return f"gs://{bucket}/dataflow/templates/batch-{code_version}.json"


@dataclass(frozen=True)
class CloudRunRevision:
    """What one service's Cloud Run revision runs with, on one target: the one description that
    both deploy forms are written from, `run_deploy_flags` (`gcloud run deploy`) and
    `mlpipe_ops.release.service_manifest` (the Knative Service Cloud Deploy rolls out)."""

    name: str  # the Cloud Run service, e.g. mlpipe-trainer
    project: str
    region: str
    image: str
    service_account: str
    memory: str
    cpu: str  # as Cloud Run writes a CPU limit: "1", "2", "0.5"
    concurrency: int
    timeout_seconds: int
    min_instances: int
    max_instances: int
    cpu_always_allocated: bool
    env: Mapping[str, str]
    secrets: Mapping[str, str]  # variable → <secret>:<version>, mounted by Cloud Run
    # 512 MiB minimum and a full Linux kernel (configuring/execution-environments).
    execution_environment: str = "gen2"


def cloud_run_revision(
    target: Target,
    service: str,
    runtime: ServiceRuntime,
    *,
    image: str,
    code_version: str,
) -> CloudRunRevision:
    """`service` on `target` as infra/runtime.yaml and the environment file say."""
    if target.emulated:
        raise ValueError(f"env {target.env} is the local emulator stack, not Cloud Run")
    return CloudRunRevision(
        name=target.run_services[service].rsplit("/", 1)[-1],
        project=target.project,
        region=target.region,
        image=image,
        service_account=target.runtime_accounts[service],
        memory=runtime.memory,
        cpu=f"{runtime.cpu:g}",
        concurrency=runtime.concurrency,
        timeout_seconds=runtime.timeout_seconds,
        min_instances=runtime.min_instances,
        max_instances=runtime.max_instances,
        cpu_always_allocated=runtime.cpu_always_allocated,
        env=service_environment(target, service, runtime, code_version=code_version, image=image),
        secrets=runtime.secrets,
    )


def run_deploy_flags(
    target: Target,
    service: str,
    runtime: ServiceRuntime,
    *,
    image: str,
    code_version: str,
) -> dict[str, Any]:
    """The flags of `gcloud run deploy <cloud run service> --flags-file FILE` (see `gcloud
    topic flags-file`): a flag that takes no value maps to None, `--set-env-vars` to a mapping.

    `--set-env-vars` replaces every variable of the service, so a deploy leaves exactly
    `service_environment` behind; `--set-secrets` (only with runtime.yaml's `secrets`) every
    secret mounted as one."""
    revision = cloud_run_revision(target, service, runtime, image=image, code_version=code_version)
    return {
        "--project": revision.project,
        "--region": revision.region,
        "--image": revision.image,
        "--service-account": revision.service_account,
        # Only the push identities (roles/run.invoker, granted by `mlpipe infra apply`).
        "--no-allow-unauthenticated": None,
        "--execution-environment": revision.execution_environment,
        "--memory": revision.memory,
        "--cpu": revision.cpu,
        "--concurrency": revision.concurrency,
        "--timeout": f"{revision.timeout_seconds}s",
        "--min-instances": revision.min_instances,
        "--max-instances": revision.max_instances,
        # CPU outside requests: jobs and flushes that outlive the push (runtime.yaml says which).
        "--no-cpu-throttling" if revision.cpu_always_allocated else "--cpu-throttling": None,
        "--set-env-vars": dict(revision.env),
    } | ({"--set-secrets": dict(revision.secrets)} if revision.secrets else {})


class _FlagsDumper(yaml.SafeDumper):
    """Writes a flag without a value as `--flag:`, as `gcloud topic flags-file` shows it."""


_FlagsDumper.add_representer(
    type(None), lambda dumper, _: dumper.represent_scalar("tag:yaml.org,2002:null", "")
)


def render_flags_file(flags: dict[str, Any], header: str = "") -> str:
    """`flags` as a gcloud flags file; `header` becomes leading comment lines."""
    comments = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
    body = yaml.dump(flags, Dumper=_FlagsDumper, sort_keys=False, default_flow_style=False)
    return comments + body
