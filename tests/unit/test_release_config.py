"""`mlpipe infra release-config`: the Cloud Deploy pipelines and targets, the Skaffold config and
the Cloud Run service manifests of a release, rendered from infra/runtime.yaml and the
environment files; checked against the flags `gcloud run deploy` gets from the same definition,
against Cloud Run's YAML reference (a rule per field, each with its source) and against
Skaffold's schema.

They are rendered in the build (cloudbuild/service.yaml, step release-config), not committed:
they name each fork's projects and project numbers and the commit being released, and the
Cloud Deploy release keeps what was rendered. (tests/integration/test_release_deploy.py
applies and releases them with the real gcloud.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from mlpipe.messaging.topology import TOPOLOGY
from mlpipe_ops import infra, release, service_runtime
from mlpipe_ops.cli import app

REPO = Path(__file__).resolve().parents[2]
ENVIRONMENTS = REPO / "infra" / "environments"
SHA = "0123456789abcdef0123456789abcdef01234567"
REGISTRY = "us-central1-docker.pkg.dev/acme-ml-dev/mlpipe"
PROJECTS = {"dev": "acme-ml-dev", "staging": "acme-ml-staging", "prod": "acme-ml-prod"}
NUMBERS = {"dev": 111, "staging": 222, "prod": 333}


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["infra", "release-config", *args])
    return result.exit_code, result.output


def render(out: Path, *extra: str) -> dict[str, str]:
    args = ["--out", str(out), "--code-version", SHA, "--registry", REGISTRY]
    for env, project in PROJECTS.items():
        args += ["--project", f"{env}={project}", "--project-number", f"{env}={NUMBERS[env]}"]
    code, said = invoke(*args, *extra)
    assert code == 0, said
    return {p.relative_to(out).as_posix(): p.read_text() for p in out.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return render(tmp_path_factory.mktemp("release"))


def stage(env: str) -> release.Stage:
    runtimes = service_runtime.load_runtimes(env, REPO / "infra" / "runtime.yaml")
    target = infra.resolve(
        infra.load_environment(env, ENVIRONMENTS),
        env,
        project=PROJECTS[env],
        project_number=NUMBERS[env],
        runtimes=runtimes,
    )
    return release.Stage(env, target, runtimes)


# --- the files --------------------------------------------------------------------------------
def test_release_config_writes_the_pipelines_the_skaffold_config_and_a_manifest_per_stage(
    rendered: dict[str, str],
) -> None:
    assert sorted(rendered) == sorted(
        [
            "clouddeploy.yaml",
            "skaffold.yaml",
            *(f"manifests/{e}/{s}.yaml" for e in release.PROMOTION for s in TOPOLOGY.deployed),
        ]
    )
    for text in rendered.values():
        assert text.startswith("# Rendered by `mlpipe infra release-config`")


def test_rendering_again_gives_the_same_bytes(rendered: dict[str, str], tmp_path: Path) -> None:
    assert render(tmp_path / "again") == rendered


def test_a_release_for_one_service_carries_only_that_service(tmp_path: Path) -> None:
    files = render(tmp_path / "trainer", "--service", "trainer")

    assert sorted(f for f in files if f.startswith("manifests/")) == [
        f"manifests/{e}/trainer.yaml" for e in ("dev", "prod", "staging")
    ]
    (config,) = yaml.safe_load_all(files["skaffold.yaml"])
    assert config["metadata"]["name"] == "mlpipe-trainer"


def test_one_pipeline_per_service_through_dev_staging_prod_with_approval_before_prod(
    rendered: dict[str, str],
) -> None:
    documents = list(yaml.safe_load_all(rendered["clouddeploy.yaml"]))
    pipelines = [d for d in documents if d["kind"] == "DeliveryPipeline"]
    targets = {d["metadata"]["name"]: d for d in documents if d["kind"] == "Target"}

    assert {d["apiVersion"] for d in documents} == {"deploy.cloud.google.com/v1"}
    assert [p["metadata"]["name"] for p in pipelines] == [f"mlpipe-{s}" for s in TOPOLOGY.deployed]
    for pipeline in pipelines:
        assert pipeline["serialPipeline"]["stages"] == [
            {"targetId": f"mlpipe-{env}", "profiles": [env]} for env in ("dev", "staging", "prod")
        ]
    assert sorted(targets) == ["mlpipe-dev", "mlpipe-prod", "mlpipe-staging"]
    for env, project in PROJECTS.items():
        target = targets[f"mlpipe-{env}"]
        # Each environment's own project and region (its environment file).
        assert target["run"] == {"location": f"projects/{project}/locations/us-central1"}
        assert target["requireApproval"] is (env == "prod")
        # Rendered and deployed as the execution account of the delivery project (dev's).
        assert target["executionConfigs"] == [
            {
                "usages": ["RENDER", "DEPLOY"],
                "serviceAccount": "mlpipe-deploy@acme-ml-dev.iam.gserviceaccount.com",
                "artifactStorage": "gs://acme-ml-dev-mlpipe-releases/artifacts",
            }
        ]
    # Resource IDs: [a-z]([a-z0-9-]{0,61}[a-z0-9])? (Cloud Deploy REST reference, name fields).
    for document in documents:
        assert re.fullmatch(r"[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?", document["metadata"]["name"])


def test_each_skaffold_profile_selects_its_environment_s_manifest(
    rendered: dict[str, str],
) -> None:
    configs = list(yaml.safe_load_all(rendered["skaffold.yaml"]))

    assert [c["metadata"]["name"] for c in configs] == [f"mlpipe-{s}" for s in TOPOLOGY.deployed]
    for service, config in zip(TOPOLOGY.deployed, configs, strict=True):
        assert config["apiVersion"] == release.SKAFFOLD_API_VERSION
        assert config["kind"] == "Config"
        assert config["deploy"] == {"cloudrun": {}}
        assert config["profiles"] == [
            {"name": env, "manifests": {"rawYaml": [f"manifests/{env}/{service}.yaml"]}}
            for env in ("dev", "staging", "prod")
        ]
        for profile in config["profiles"]:
            assert profile["manifests"]["rawYaml"][0] in rendered


# --- Skaffold's schema ------------------------------------------------------------------------
# The documented fields of the parts of a Skaffold config written here (skaffold.dev/docs/
# references/yaml, v4beta7: Config's apiVersion, kind, metadata.name, profiles[].name,
# profiles[].manifests.rawYaml, deploy.cloudrun with projectid, region, hooks).
SKAFFOLD_FIELDS = {
    (): {"apiVersion", "kind", "metadata", "requires", "build", "test", "manifests", "deploy",
         "portForward", "resourceSelector", "verify", "customActions", "profiles"},
    ("metadata",): {"name", "labels", "annotations"},
    ("profiles", "[]"): {"name", "activation", "requiresAllActivations", "patches", "build",
                         "test", "manifests", "deploy", "portForward", "resourceSelector",
                         "verify", "customActions"},
    ("profiles", "[]", "manifests"): {"rawYaml", "kustomize", "helm", "kpt", "transform",
                                      "validate", "hooks"},
    ("deploy",): {"docker", "helm", "kpt", "kubectl", "cloudrun", "statusCheck",
                  "statusCheckDeadlineSeconds", "tolerateFailuresUntilDeadline", "kubeContext",
                  "logs"},
    ("deploy", "cloudrun"): {"projectid", "region", "hooks"},
}  # fmt: skip


def _mappings(value: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dict]]:
    if isinstance(value, dict):
        yield path, value
        for key, inner in value.items():
            yield from _mappings(inner, (*path, key))
    elif isinstance(value, list):
        for item in value:
            yield from _mappings(item, (*path, "[]"))


def test_the_skaffold_config_uses_only_documented_fields(rendered: dict[str, str]) -> None:
    for config in yaml.safe_load_all(rendered["skaffold.yaml"]):
        for path, mapping in _mappings(config):
            if path in SKAFFOLD_FIELDS:
                unknown = set(mapping) - SKAFFOLD_FIELDS[path]
                assert not unknown, (path, unknown)
            else:
                assert path == ("profiles", "[]", "manifests", "rawYaml"), path


def skaffold_schema() -> str:
    """Skaffold's published JSON schema for the config version written, read at run time from
    outside this repository: $SKAFFOLD_SCHEMA (a file), or a clone of
    GoogleContainerTools/skaffold ($SKAFFOLD_REPO, a git directory), else skipped."""
    version = release.SKAFFOLD_API_VERSION.split("/")[1]
    if os.environ.get("SKAFFOLD_SCHEMA"):
        return Path(os.environ["SKAFFOLD_SCHEMA"]).read_text()
    clone = Path(
        os.environ.get("SKAFFOLD_REPO", "/work/.mirror/GoogleContainerTools+skaffold/repo")
    )
    if not clone.exists() or shutil.which("git") is None:
        pytest.skip("no Skaffold schema: set SKAFFOLD_SCHEMA or SKAFFOLD_REPO")
    shown = subprocess.run(
        ["git", f"--git-dir={clone}", "show", f"HEAD:docs-v2/content/en/schemas/{version}.json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if shown.returncode != 0:
        pytest.skip(f"the Skaffold clone has no {version} schema: {shown.stderr.strip()}")
    return shown.stdout


def schema_errors(schema: str, documents: list[dict[str, Any]]) -> list[str]:
    """The schema's complaints, from a Python that has jsonschema (this workspace does not
    depend on it: the system's is used, or the test is skipped)."""
    candidates = [Path(d) / "python3" for d in os.environ.get("PATH", "").split(os.pathsep)]
    for python in candidates:
        if python.is_file() and os.access(python, os.X_OK):
            probe = subprocess.run([python, "-c", "import jsonschema"], capture_output=True)
            if probe.returncode == 0:
                break
    else:
        pytest.skip("no Python with jsonschema on PATH to validate against Skaffold's schema")
    script = (
        "import json, sys, jsonschema\n"
        "schema, documents = json.load(sys.stdin)\n"
        "validator = jsonschema.Draft7Validator(schema)\n"
        "print(json.dumps([e.message for d in documents for e in validator.iter_errors(d)]))\n"
    )
    done = subprocess.run(
        [python, "-c", script],
        input=json.dumps([json.loads(schema), documents]),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout))


def test_the_skaffold_config_is_valid_under_skaffold_s_schema(rendered: dict[str, str]) -> None:
    schema = skaffold_schema()
    documents = list(yaml.safe_load_all(rendered["skaffold.yaml"]))

    assert schema_errors(schema, documents) == []
    # The schema refuses what Skaffold would: a misspelt field is an error.
    misspelt = json.loads(json.dumps(documents[0]).replace('"rawYaml"', '"rawYml"'))
    assert schema_errors(schema, [misspelt])


# --- Cloud Run's YAML reference ---------------------------------------------------------------
def _integer_string(low: int, high: int | None = None) -> Callable[[Any], bool]:
    return lambda v: (
        isinstance(v, str) and v.isdigit() and low <= int(v) <= (high if high else int(v))
    )


# Every field a rendered manifest may carry, the rule its value follows, and where Cloud Run
# documents both (pages under cloud.google.com/run/docs; the YAML reference is
# reference/yaml/v1, "Cloud Run service YAML"). `[]` is any list item.
A = "spec.template.metadata.annotations."
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "apiVersion": (lambda v: v == "serving.knative.dev/v1", "reference/yaml/v1"),
    "kind": (lambda v: v == "Service", "reference/yaml/v1"),
    # lowercase letters, digits and hyphens, a letter first, no hyphen last, at most 49.
    "metadata.name": (
        lambda v: bool(re.fullmatch(r"[a-z](?:[-a-z0-9]{0,47}[a-z0-9])?", v)),
        "reference/rest/v1/namespaces.services (metadata.name)",
    ),
    A + "autoscaling.knative.dev/minScale": (
        _integer_string(0),
        "reference/yaml/v1 (MIN_INSTANCES); configuring/min-instances",
    ),
    A + "autoscaling.knative.dev/maxScale": (
        _integer_string(1),
        "reference/yaml/v1 (MAX_INSTANCES); configuring/max-instances",
    ),
    A + "run.googleapis.com/cpu-throttling": (
        lambda v: v in ("true", "false"),
        "reference/yaml/v1 (CPU_ALLOCATION); configuring/cpu-allocation",
    ),
    A + "run.googleapis.com/execution-environment": (
        lambda v: v in ("gen1", "gen2"),
        "reference/yaml/v1 (EXECUTION_ENVIRONMENT); configuring/execution-environments",
    ),
    "spec.template.spec.containerConcurrency": (
        lambda v: isinstance(v, int) and 0 <= v <= 1000,
        "reference/yaml/v1 (MAX_CONCURRENCY); configuring/concurrency",
    ),
    "spec.template.spec.timeoutSeconds": (
        lambda v: isinstance(v, int) and 1 <= v <= 3600,
        "reference/yaml/v1 (REQUEST_TIMEOUT); configuring/request-timeout",
    ),
    "spec.template.spec.serviceAccountName": (
        lambda v: bool(re.fullmatch(r"[a-z][-a-z0-9]{4,28}[a-z0-9]@[-a-z0-9.]+", v)),
        "reference/yaml/v1 (SERVICE_ACCOUNT); securing/service-identity",
    ),
    "spec.template.spec.containers.[].image": (
        lambda v: isinstance(v, str) and bool(v),
        "reference/yaml/v1 (IMAGE_URL); the Skaffold placeholder until the release",
    ),
    "spec.template.spec.containers.[].env.[].name": (
        lambda v: (
            isinstance(v, str) and v not in {"PORT", "K_SERVICE", "K_REVISION", "K_CONFIGURATION"}
        ),
        "reference/yaml/v1 (env); reference/container-contract#env-vars (reserved names)",
    ),
    "spec.template.spec.containers.[].env.[].value": (
        lambda v: isinstance(v, str),
        "reference/yaml/v1 (env: name/value strings)",
    ),
    "spec.template.spec.containers.[].resources.limits.cpu": (
        lambda v: v in ("1", "2", "4", "6", "8") or 0.08 <= float(v) < 1,
        "reference/yaml/v1 (CPU); configuring/services/cpu",
    ),
    "spec.template.spec.containers.[].resources.limits.memory": (
        lambda v: bool(re.fullmatch(r"\d+(Mi|Gi)", v)),
        "reference/yaml/v1 (MEMORY); configuring/services/memory-limits",
    ),
}


def _leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _leaves(inner, f"{path}{key}.")
    elif isinstance(value, list):
        for item in value:
            yield from _leaves(item, f"{path}[].")
    else:
        yield path.removesuffix("."), value


def test_every_manifest_field_is_one_cloud_run_documents_with_a_valid_value(
    rendered: dict[str, str],
) -> None:
    checked = set()
    for path, text in rendered.items():
        if not path.startswith("manifests/"):
            continue
        (manifest,) = yaml.safe_load_all(text)
        for field, value in _leaves(manifest):
            assert field in RULES, f"{path}: {field} is not in the rule table"
            rule, source = RULES[field]
            assert rule(value), f"{path}: {field}={value!r} breaks {source}"
            checked.add(field)
    # Every rule is used: a field dropped from the manifests is noticed.
    assert checked == set(RULES)


def test_the_rule_table_refuses_what_cloud_run_refuses() -> None:
    for field, bad in [
        (A + "run.googleapis.com/cpu-throttling", False),
        (A + "autoscaling.knative.dev/maxScale", 10),
        ("spec.template.spec.timeoutSeconds", 3601),
        ("spec.template.spec.containerConcurrency", 1001),
        ("spec.template.spec.containers.[].env.[].name", "PORT"),
        ("spec.template.spec.containers.[].resources.limits.memory", "2G"),
        ("metadata.name", "Mlpipe-trainer"),
    ]:
        assert not RULES[field][0](bad), field


# --- one definition: the manifest says what the flags say ------------------------------------
def _annotation(manifest: dict[str, Any], key: str) -> str:
    return str(manifest["spec"]["template"]["metadata"]["annotations"][key])


def _spec(manifest: dict[str, Any]) -> dict[str, Any]:
    return dict(manifest["spec"]["template"]["spec"])


def _container(manifest: dict[str, Any]) -> dict[str, Any]:
    return dict(_spec(manifest)["containers"][0])


# Each `gcloud run deploy` flag and where the manifest says the same (None: not the manifest's
# business; the Cloud Deploy target carries project and region, and the manifest never touches
# IAM, which keeps the service closed as --no-allow-unauthenticated does).
FLAG_IN_MANIFEST: dict[str, Callable[[dict[str, Any]], Any] | None] = {
    "--project": None,
    "--region": None,
    "--no-allow-unauthenticated": None,
    "--image": None,  # a placeholder here; the release names the image (see below)
    "--service-account": lambda m: _spec(m)["serviceAccountName"],
    "--execution-environment": lambda m: _annotation(m, "run.googleapis.com/execution-environment"),
    "--memory": lambda m: _container(m)["resources"]["limits"]["memory"],
    "--cpu": lambda m: _container(m)["resources"]["limits"]["cpu"],
    "--concurrency": lambda m: _spec(m)["containerConcurrency"],
    "--timeout": lambda m: f"{_spec(m)['timeoutSeconds']}s",
    "--min-instances": lambda m: int(_annotation(m, "autoscaling.knative.dev/minScale")),
    "--max-instances": lambda m: int(_annotation(m, "autoscaling.knative.dev/maxScale")),
    "--cpu-throttling": lambda m: (
        None if _annotation(m, "run.googleapis.com/cpu-throttling") == "true" else "absent"
    ),
    "--no-cpu-throttling": lambda m: (
        None if _annotation(m, "run.googleapis.com/cpu-throttling") == "false" else "absent"
    ),
    "--set-env-vars": lambda m: {e["name"]: e["value"] for e in _container(m)["env"]},
}


@pytest.mark.parametrize("env", release.PROMOTION)
@pytest.mark.parametrize("service", TOPOLOGY.deployed)
def test_the_manifest_says_what_the_deploy_flags_say(
    rendered: dict[str, str], env: str, service: str
) -> None:
    each = stage(env)
    image = release.image_reference(REGISTRY, service, SHA[:7])
    flags = service_runtime.run_deploy_flags(
        each.target, service, each.runtimes[service], image=image, code_version=SHA
    )
    (manifest,) = yaml.safe_load_all(rendered[f"manifests/{env}/{service}.yaml"])

    assert set(flags) <= set(FLAG_IN_MANIFEST), set(flags) - set(FLAG_IN_MANIFEST)
    for flag, value in flags.items():
        read = FLAG_IN_MANIFEST[flag]
        if read is not None:
            assert read(manifest) == value, flag
    assert manifest["metadata"]["name"] == f"mlpipe-{service}"
    assert _container(manifest)["image"] == release.image_placeholder(service)
    # The trainer's own image, for Vertex AI jobs: the image the release will deploy.
    if service == "trainer":
        assert flags["--set-env-vars"]["MLPIPE_TRAINER_IMAGE"] == image
    # Where the deployer rolls out, from the environment file; the predictor of this build.
    if service == "deployer":
        env_vars = flags["--set-env-vars"]
        assert env_vars["MLPIPE_DEPLOY_TARGET"] == each.target.deploy_target
        assert env_vars["MLPIPE_PREDICTOR_IMAGE"] == release.image_reference(
            REGISTRY, "predictor", SHA[:7]
        )
        assert env_vars["MLPIPE_CLOUD_RUN_SERVICE"] == "mlpipe-predictor"
        assert env_vars["MLPIPE_REGION"] == each.target.region
    # Project and region are the target's.
    documents = yaml.safe_load_all(rendered["clouddeploy.yaml"])
    target = next(d for d in documents if d["metadata"]["name"] == f"mlpipe-{env}")
    assert (
        target["run"]["location"] == f"projects/{flags['--project']}/locations/{flags['--region']}"
    )


def test_prod_keeps_one_predictor_warm_in_its_manifest(rendered: dict[str, str]) -> None:
    prod = yaml.safe_load(rendered["manifests/prod/predictor.yaml"])
    dev = yaml.safe_load(rendered["manifests/dev/predictor.yaml"])

    assert _annotation(prod, "autoscaling.knative.dev/minScale") == "1"
    assert _annotation(dev, "autoscaling.knative.dev/minScale") == "0"


# --- what is wrong, said before anything is written -------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "dev: project_number is not set"),
        (["--project-number", "dev=1", "--project-number", "staging=2"], "prod: project_number"),
        (["--service", "scorer"], "'scorer' is not a service"),
        (["--project-number", "qa=1"], "'qa' is not a release stage"),
        (["--project-number", "dev"], "--project-number 'dev': expected ENV=VALUE"),
        (["--project-number", "dev=one"], "--project-number: invalid literal"),
        (["--project", "dev=other-project"], "pass its --project-number too"),
    ],
)
def test_release_config_explains_what_is_wrong(
    tmp_path: Path, args: list[str], message: str
) -> None:
    code, said = invoke("--out", str(tmp_path / "out"), "--code-version", SHA, *args)

    assert code == 1
    assert message in said
    assert not (tmp_path / "out").exists()


def test_release_config_defaults_to_the_first_environment_s_registry_and_the_short_sha(
    tmp_path: Path,
) -> None:
    args = ["--out", str(tmp_path), "--code-version", SHA, "--service", "trainer"]
    for env, number in NUMBERS.items():
        args += ["--project-number", f"{env}={number}"]

    code, said = invoke(*args)

    assert code == 0, said
    manifest = yaml.safe_load((tmp_path / "manifests/staging/trainer.yaml").read_text())
    variables = {e["name"]: e["value"] for e in _container(manifest)["env"]}
    assert variables["MLPIPE_TRAINER_IMAGE"] == (
        f"us-central1-docker.pkg.dev/mlpipe-dev/mlpipe/trainer:{SHA[:7]}"
    )
    assert "pipelines mlpipe-trainer (dev → staging → prod; approval before prod)" in said


@pytest.mark.parametrize("deploy_target", ["cloud_run", "vertex"])
def test_the_deployer_starts_on_its_environment_s_target_with_the_rendered_variables(
    monkeypatch: pytest.MonkeyPatch, deploy_target: str
) -> None:
    from mlpipe.runtime.settings import load_settings
    from mlpipe_deployer.settings import DeployerSettings

    each = stage("dev")
    target = dataclasses.replace(each.target, deploy_target=deploy_target)
    image = release.image_reference(REGISTRY, "deployer", SHA[:7])
    flags = service_runtime.run_deploy_flags(
        target, "deployer", each.runtimes["deployer"], image=image, code_version=SHA
    )
    for name in list(os.environ):
        if name.startswith("MLPIPE_"):
            monkeypatch.delenv(name)
    for name, value in flags["--set-env-vars"].items():
        monkeypatch.setenv(name, value)
    if deploy_target == "vertex":
        monkeypatch.setenv("MLPIPE_VERTEX_ENDPOINT", "1234")  # created by the operator

    settings = load_settings(DeployerSettings)

    assert settings.deploy_target == deploy_target
    assert settings.predictor_image == release.image_reference(REGISTRY, "predictor", SHA[:7])
    assert settings.cloud_run_service == "mlpipe-predictor"
    serving = flags["--set-env-vars"].get("MLPIPE_VERTEX_SERVING_ACCOUNT")
    assert serving == (
        f"mlpipe-serving@{PROJECTS['dev']}.iam.gserviceaccount.com"
        if deploy_target == "vertex"
        else None
    )


def test_the_runtime_definition_may_not_set_what_the_environment_file_decides() -> None:
    with pytest.raises(ValueError, match="MLPIPE_DEPLOY_TARGET comes from the environment file"):
        service_runtime.ServiceRuntime.model_validate({"env": {"MLPIPE_DEPLOY_TARGET": "vertex"}})
