"""Code releases through environments with Cloud Deploy: what `mlpipe infra release-config`
renders from the one runtime definition (infra/runtime.yaml) and the environment files.

- `clouddeploy.yaml`: one DeliveryPipeline per service, `mlpipe-<service>`, each with the
  serial stages dev → staging → prod, and one Target per environment (shared by every
  service's pipeline), whose Cloud Run location is that environment's project and region; an
  environment whose file says `approval: required` (prod) requires approval. A pipeline per
  service because each service is built and released on its own (its own trigger, its own
  commits): a release rolls out one service, a rollback or a pending approval concerns that
  service only, and a target's "current release" names one service.
- `skaffold.yaml`: one Skaffold config (module) per service, with a profile per environment
  that selects that environment's manifest; Cloud Deploy renders each stage with the stage's
  profile and deploys it with Skaffold's Cloud Run deployer.
- `manifests/<env>/<service>.yaml`: the Knative Service Cloud Run accepts, written from the
  same `CloudRunRevision` as the `gcloud run deploy` flags, with the image left as a
  placeholder (`image: <service>`) that the release's `--images=<service>=IMAGE` replaces.

Everything here is a pure function of its inputs; the CLI reads the files and writes the result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from mlpipe_ops.infra import Target
from mlpipe_ops.service_runtime import CloudRunRevision, ServiceRuntime, cloud_run_revision

# The environments a release goes through, in order (issue 22: dev → staging → prod); model
# promotions (`mlpipe promote MODEL VERSION --to ENV`, docs/promotion.md) follow the same order.
# Which of them wait for an approval is each environment file's `approval: required`
# (infra.Environment.approval): the one source of truth for releases and promotions alike.
PROMOTION: tuple[str, ...] = ("dev", "staging", "prod")

# Cloud Deploy configuration files (cloud.google.com/deploy/docs/config-files: "apiVersion:
# deploy.cloud.google.com/v1"; gcloud's manifest_util accepts only it and v1beta1).
DEPLOY_API_VERSION = "deploy.cloud.google.com/v1"
# Cloud Deploy's Cloud Run quickstart (cloud.google.com/deploy/docs/deploy-app-run) writes its
# skaffold.yaml as skaffold/v4beta7; every Skaffold that Cloud Deploy runs today (2.8 and later)
# reads it.
SKAFFOLD_API_VERSION = "skaffold/v4beta7"
# Cloud Run's YAML is the Admin API v1 Service (cloud.google.com/run/docs/reference/yaml/v1).
KNATIVE_API_VERSION = "serving.knative.dev/v1"

# Runs Cloud Deploy's render and deploy jobs (cloud.google.com/deploy/docs/
# cloud-deploy-service-account, "execution service account"); infra/bootstrap.sh creates it in
# the delivery project, the first environment's.
EXECUTION_ACCOUNT = "mlpipe-deploy"
HEADER = (
    "Rendered by `mlpipe infra release-config` from infra/runtime.yaml and\n"
    "infra/environments/*.yaml. Do not edit: change those and render again."
)


@dataclass(frozen=True)
class Stage:
    """One environment a release reaches: its resolved target and its services' runtimes."""

    env: str
    target: Target
    runtimes: Mapping[str, ServiceRuntime]


def approval_stages(stages: Sequence[Stage]) -> list[str]:
    """The stages whose rollouts wait for an approval, in order."""
    return [s.env for s in stages if s.target.approval_required]


def pipeline_id(service: str) -> str:
    return f"mlpipe-{service}"


def target_id(env: str) -> str:
    return f"mlpipe-{env}"


def image_placeholder(service: str) -> str:
    """The image name a manifest carries until the release replaces it (Skaffold matches an
    `image:` field by this name: `--images=<service>=<registry>/<service>:<tag>`)."""
    return service


def image_reference(registry: str, service: str, tag: str) -> str:
    """The image cloudbuild/service.yaml builds and pushes for `service`."""
    return f"{registry}/{service}:{tag}"


def manifest_path(env: str, service: str) -> str:
    """Relative to the skaffold.yaml that names it (Skaffold resolves rawYaml paths so)."""
    return f"manifests/{env}/{service}.yaml"


def execution_account(delivery_project: str) -> str:
    return f"{EXECUTION_ACCOUNT}@{delivery_project}.iam.gserviceaccount.com"


def releases_bucket(delivery_project: str) -> str:
    """Where a release's source is staged (cloudbuild/service.yaml: source/) and its render and
    deploy outputs are kept (artifacts/); infra/bootstrap.sh creates it and grants on it only."""
    return f"{delivery_project}-mlpipe-releases"


def _secret_key_ref(secret_version: str) -> dict[str, str]:
    """`<secret>:<version>` as a manifest names it: the secret, and its version as the key."""
    secret, _, version = secret_version.partition(":")
    return {"name": secret, "key": version}


def service_manifest(revision: CloudRunRevision, *, image: str) -> dict[str, Any]:
    """The Knative Service for `revision`, as Cloud Run's YAML reference describes each field
    (cloud.google.com/run/docs/reference/yaml/v1, "Cloud Run service YAML"). Beside each, the
    `gcloud run deploy` flag that `run_deploy_flags` writes from the same revision.

    Nothing here touches IAM: the Cloud Run deployer replaces the Service, never its policy, so
    the service stays closed to all but the push identities `mlpipe infra apply` lets in (what
    `--no-allow-unauthenticated` guarantees on the direct path)."""
    annotations = {
        # --min-instances / --max-instances: revision annotations
        # autoscaling.knative.dev/minScale and maxScale (YAML reference, template.metadata).
        "autoscaling.knative.dev/minScale": str(revision.min_instances),
        "autoscaling.knative.dev/maxScale": str(revision.max_instances),
        # --cpu-throttling / --no-cpu-throttling: run.googleapis.com/cpu-throttling, "false"
        # for CPU always allocated (YAML reference; configuring/cpu-allocation).
        "run.googleapis.com/cpu-throttling": "false" if revision.cpu_always_allocated else "true",
        # --execution-environment: run.googleapis.com/execution-environment, gen1 or gen2
        # (YAML reference; configuring/execution-environments).
        "run.googleapis.com/execution-environment": revision.execution_environment,
    }
    container = {
        # --image: containers[].image (YAML reference), here the Skaffold placeholder.
        "image": image,
        # --set-env-vars: containers[].env, name/value pairs (YAML reference); --set-secrets:
        # more entries, each valueFrom.secretKeyRef with the secret's name and its version as
        # the key (YAML reference, env; configuring/services/secrets, "Access secrets").
        "env": [{"name": name, "value": value} for name, value in revision.env.items()]
        + [
            {
                "name": name,
                "valueFrom": {"secretKeyRef": _secret_key_ref(ref)},
            }
            for name, ref in revision.secrets.items()
        ],
        # --memory / --cpu: containers[].resources.limits.memory and .cpu (YAML reference;
        # configuring/services/memory-limits, configuring/services/cpu).
        "resources": {"limits": {"cpu": revision.cpu, "memory": revision.memory}},
    }
    return {
        "apiVersion": KNATIVE_API_VERSION,
        "kind": "Service",
        # The service name (YAML reference: metadata.name). Project and region come from the
        # Cloud Deploy target (its run.location), so neither metadata.namespace nor the
        # cloud.googleapis.com/location label is written.
        "metadata": {"name": revision.name},
        "spec": {
            "template": {
                "metadata": {"annotations": annotations},
                "spec": {
                    # --concurrency: containerConcurrency (YAML reference; 1 to 1000,
                    # configuring/concurrency).
                    "containerConcurrency": revision.concurrency,
                    # --timeout: timeoutSeconds (YAML reference; up to 3600,
                    # configuring/request-timeout).
                    "timeoutSeconds": revision.timeout_seconds,
                    # --service-account: serviceAccountName (YAML reference).
                    "serviceAccountName": revision.service_account,
                    "containers": [container],
                },
            }
        },
    }


def delivery_pipeline(service: str, envs: Sequence[str]) -> dict[str, Any]:
    """The DeliveryPipeline of `service` (config-files, "Delivery pipeline config"): one serial
    stage per environment, each rendered with that environment's Skaffold profile."""
    return {
        "apiVersion": DEPLOY_API_VERSION,
        "kind": "DeliveryPipeline",
        "metadata": {"name": pipeline_id(service)},
        "description": f"mlpipe {service}: {' → '.join(envs)}",
        "serialPipeline": {
            "stages": [{"targetId": target_id(env), "profiles": [env]} for env in envs]
        },
    }


def deploy_target(stage: Stage, delivery_project: str) -> dict[str, Any]:
    """The Target of one environment (config-files, "Target definitions"): Cloud Run in the
    environment's project and region (`run.location: projects/P/locations/R`), approval where
    the environment's file says `approval: required`, render and deploy as the execution
    account, outputs kept in the releases bucket."""
    env = stage.env
    approval = stage.target.approval_required
    return {
        "apiVersion": DEPLOY_API_VERSION,
        "kind": "Target",
        "metadata": {"name": target_id(env)},
        "description": f"mlpipe {env}: Cloud Run in {stage.target.project}"
        + (" (approval required)" if approval else ""),
        "requireApproval": approval,
        "run": {"location": stage.target.location},
        # usages RENDER and DEPLOY run as serviceAccount, in Cloud Build's default pool, and
        # write to artifactStorage, "a bucket or a path within a bucket" (config-files,
        # executionConfigs; REST projects.locations.targets, ExecutionConfig).
        "executionConfigs": [
            {
                "usages": ["RENDER", "DEPLOY"],
                "serviceAccount": execution_account(delivery_project),
                "artifactStorage": f"gs://{releases_bucket(delivery_project)}/artifacts",
            }
        ],
    }


def skaffold_config(service: str, envs: Sequence[str]) -> dict[str, Any]:
    """The Skaffold config (module `mlpipe-<service>`) of one service: a profile per environment
    whose rawYaml is that environment's manifest, deployed by the Cloud Run deployer
    (`deploy.cloudrun: {}`: Cloud Deploy supplies the project and region of each target)."""
    return {
        "apiVersion": SKAFFOLD_API_VERSION,
        "kind": "Config",
        "metadata": {"name": pipeline_id(service)},
        "profiles": [
            {"name": env, "manifests": {"rawYaml": [manifest_path(env, service)]}} for env in envs
        ],
        "deploy": {"cloudrun": {}},
    }


def _dump_all(documents: Sequence[Mapping[str, Any]]) -> str:
    comments = "".join(f"# {line}\n" for line in HEADER.splitlines())
    return comments + yaml.safe_dump_all(
        documents, sort_keys=False, default_flow_style=False, allow_unicode=True
    )


def release_files(
    stages: Sequence[Stage],
    *,
    services: Sequence[str],
    registry: str,
    tag: str,
    code_version: str,
) -> dict[str, str]:
    """Every file of the release configuration, by path relative to its directory.

    `registry` and `tag` name the images the release deploys (`image_reference`): the trainer
    runs Vertex AI jobs from its own image (MLPIPE_TRAINER_IMAGE), so that variable is the
    image the placeholder becomes. The pipelines live in the first stage's project."""
    if not stages:
        raise ValueError("a delivery pipeline needs at least one stage")
    envs = [s.env for s in stages]
    delivery_project = stages[0].target.project
    files = {
        "clouddeploy.yaml": _dump_all(
            [
                *(delivery_pipeline(service, envs) for service in services),
                *(deploy_target(stage, delivery_project) for stage in stages),
            ]
        ),
        "skaffold.yaml": _dump_all([skaffold_config(service, envs) for service in services]),
    }
    for stage in stages:
        for service in services:
            revision = cloud_run_revision(
                stage.target,
                service,
                stage.runtimes[service],
                image=image_reference(registry, service, tag),
                code_version=code_version,
            )
            files[manifest_path(stage.env, service)] = _dump_all(
                [service_manifest(revision, image=image_placeholder(service))]
            )
    return files
