"""The local Vertex AI (mlpipe_ops.standins.vertex) driven by the real google-cloud-aiplatform
clients over REST: models with versions and aliases, endpoints with deployed containers and
traffic splits, predictions, operations and CustomJobs, answered as docs/vertex-standin.md says.

The model server is a tiny image (tests/integration/vertex_echo) that honours the custom-container
contract and echoes its deployed model id and environment. Needs a Docker engine (`make
test-cloud`; .ci/run starts one): skipped without one, failed under CI=true.
"""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from google.api_core import exceptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import aiplatform
from google.cloud import aiplatform_v1 as v1
from google.longrunning import operations_pb2
from google.protobuf import duration_pb2, json_format

from mlpipe_ops import containers as docker
from mlpipe_ops.standins.vertex import VertexStandIn
from mlpipe_ops.standins.vertex_runtime import LABEL
from tests.conftest import REPO, engine_missing

pytestmark = pytest.mark.cloud

PROJECT_NUMBER = "123456789012"
LOCATION = "us-central1"
ECHO_IMAGE = "mlpipe-vertex-echo:test"
PYTHON_IMAGE = "python:3.11.7-slim-bookworm"
STORAGE_HOST = "127.0.0.1:4443"
PUBSUB_HOST = "127.0.0.1:8085"


@pytest.fixture(scope="module")
def echo_image() -> str:
    missing = engine_missing()
    if missing:
        pytest.skip(missing)
    docker.docker(
        "build", "--network", "host", "-q", "-t", ECHO_IMAGE,
        str(REPO / "tests" / "integration" / "vertex_echo"),
        timeout=600,
    )  # fmt: skip
    return ECHO_IMAGE


@pytest.fixture(scope="module")
def standin(echo_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VertexStandIn]:
    vertex = VertexStandIn(
        f"vx-{uuid.uuid4().hex[:8]}",
        project_number=PROJECT_NUMBER,
        storage_emulator_host=STORAGE_HOST,
        pubsub_emulator_host=PUBSUB_HOST,
        operation_seconds=0.3,
        log_dir=tmp_path_factory.mktemp("vertex-logs"),
        seed=17,
    ).start()
    try:
        yield vertex
    finally:
        vertex.stop()
        left = docker.docker(
            "ps", "--all", "--quiet", "--filter", f"label={LABEL}={vertex.id}", check=False
        ).stdout.split()
        assert left == [], f"containers left after stop: {left}"


@pytest.fixture(scope="module")
def clients(standin: VertexStandIn) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "transport": "rest",
        "client_options": standin.client_options(),
        "credentials": AnonymousCredentials(),
    }
    return {
        "models": v1.ModelServiceClient(**kwargs),
        "endpoints": v1.EndpointServiceClient(**kwargs),
        "jobs": v1.JobServiceClient(**kwargs),
        "predictions": v1.PredictionServiceClient(**kwargs),
    }


def by_id(standin: VertexStandIn) -> str:
    """The location, named with the project id (requests may use id or number)."""
    return f"projects/{standin.project_id}/locations/{LOCATION}"


def by_number() -> str:
    return f"projects/{PROJECT_NUMBER}/locations/{LOCATION}"


def status_of(error: exceptions.GoogleAPICallError) -> str:
    """The google.rpc.Code name in a refused REST call's JSON error body."""
    assert error.response is not None
    body: dict[str, Any] = error.response.json()
    return str(body["error"]["status"])


def echo_model(
    display_name: str, *, aliases: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> v1.Model:
    return v1.Model(
        display_name=display_name,
        artifact_uri=f"gs://models-{display_name}/artifacts/",
        version_aliases=list(aliases),
        container_spec=v1.ModelContainerSpec(
            image_uri=ECHO_IMAGE,
            env=[v1.EnvVar(name=k, value=v) for k, v in (env or {}).items()],
        ),
    )


def dedicated() -> v1.DedicatedResources:
    return v1.DedicatedResources(
        machine_spec=v1.MachineSpec(machine_type="n1-standard-2"), min_replica_count=1
    )


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"{what} did not happen within {timeout}s")


@pytest.fixture(scope="module")
def versions(standin: VertexStandIn, clients: dict[str, Any]) -> dict[str, str]:
    """The `echo-…` model: version 1 (alias v1), version 2 (aliases v2, canary)."""
    models = clients["models"]
    model_id = f"echo-{uuid.uuid4().hex[:8]}"
    first = models.upload_model(
        request=v1.UploadModelRequest(
            parent=by_id(standin), model=echo_model(model_id, aliases=("v1",)), model_id=model_id
        )
    )
    assert first.operation.done is False  # the operation finishes later; the client polls
    uploaded = first.result(timeout=60)
    second = models.upload_model(
        request=v1.UploadModelRequest(
            parent=by_id(standin),
            parent_model=f"{by_id(standin)}/models/{model_id}",
            model=echo_model(model_id, aliases=("v2", "canary")),
        )
    ).result(timeout=60)
    return {"name": uploaded.model, "v1": uploaded.model_version_id, "v2": second.model_version_id}


def test_upload_makes_versions_with_aliases_named_by_project_number(
    standin: VertexStandIn, clients: dict[str, Any], versions: dict[str, str]
) -> None:
    models = clients["models"]
    name = versions["name"]

    default = models.get_model(name=name.replace(PROJECT_NUMBER, standin.project_id))
    canary = models.get_model(name=f"{name}@canary")
    second = models.get_model(name=f"{name}@2")
    listed = list(models.list_model_versions(name=name))

    assert name.startswith(f"{by_number()}/models/echo-")
    assert (versions["v1"], versions["v2"]) == ("1", "2")
    assert default.name == name and default.version_id == "1"
    assert sorted(default.version_aliases) == ["default", "v1"]
    assert canary.version_id == "2" and sorted(second.version_aliases) == ["canary", "v2"]
    assert [m.name for m in listed] == [f"{name}@1", f"{name}@2"]


def test_merge_version_aliases_moves_an_alias_and_keeps_default(
    clients: dict[str, Any], versions: dict[str, str]
) -> None:
    models = clients["models"]
    name = versions["name"]

    moved = models.merge_version_aliases(name=f"{name}@1", version_aliases=["canary", "-v1"])
    with pytest.raises(exceptions.BadRequest) as removing_default:
        models.merge_version_aliases(name=f"{name}@1", version_aliases=["-default"])
    models.merge_version_aliases(name=f"{name}@2", version_aliases=["canary"])  # back again

    assert sorted(moved.version_aliases) == ["canary", "default"]
    assert models.get_model(name=f"{name}@canary").version_id == "2"
    assert status_of(removing_default.value) == "INVALID_ARGUMENT"


def test_upload_refuses_what_the_reference_refuses(
    standin: VertexStandIn, clients: dict[str, Any]
) -> None:
    models = clients["models"]
    refused = {}
    for case, request in {
        "model id starting with a digit": v1.UploadModelRequest(
            parent=by_id(standin), model_id="1model", model=echo_model("x")
        ),
        "no display name": v1.UploadModelRequest(
            parent=by_id(standin),
            model=v1.Model(container_spec=v1.ModelContainerSpec(image_uri=ECHO_IMAGE)),
        ),
        "alias that looks like a version id": v1.UploadModelRequest(
            parent=by_id(standin), model=echo_model("x", aliases=("7",))
        ),
    }.items():
        with pytest.raises(exceptions.BadRequest) as error:
            models.upload_model(request=request)
        refused[case] = status_of(error.value)
    with pytest.raises(exceptions.Forbidden) as foreign:
        models.get_model(name=f"projects/someone-else/locations/{LOCATION}/models/m")
    # A failed operation carries a google.rpc.Code, so the client raises the exact class.
    with pytest.raises(exceptions.InvalidArgument, match="cannot be read"):
        models.upload_model(
            parent=by_id(standin),
            model=v1.Model(
                display_name="x",
                container_spec=v1.ModelContainerSpec(image_uri="mlpipe-no-such-image:none"),
            ),
        ).result(timeout=60)

    assert refused == dict.fromkeys(refused, "INVALID_ARGUMENT")
    assert status_of(foreign.value) == "PERMISSION_DENIED"


@pytest.fixture(scope="module")
def endpoint(standin: VertexStandIn, clients: dict[str, Any], versions: dict[str, str]) -> str:
    """An endpoint with version 1 deployed at 100 %; its name."""
    endpoints = clients["endpoints"]
    created = endpoints.create_endpoint(
        parent=by_id(standin), endpoint=v1.Endpoint(display_name="echo")
    ).result(timeout=60)
    endpoints.deploy_model(
        endpoint=created.name,
        deployed_model=v1.DeployedModel(
            model=f"{versions['name']}@1", dedicated_resources=dedicated()
        ),
        traffic_split={"0": 100},
    ).result(timeout=180)
    return str(created.name)


def upload_version(clients: dict[str, Any], model: str, body: v1.Model) -> v1.UploadModelResponse:
    """Upload `body` as a new version of `model`; the operation's result."""
    parent = model.split("/models/")[0]
    request = v1.UploadModelRequest(parent=parent, parent_model=model, model=body)
    return clients["models"].upload_model(request=request).result(timeout=60)


def test_deploy_runs_the_model_container_under_the_custom_container_contract(
    standin: VertexStandIn, clients: dict[str, Any], versions: dict[str, str], endpoint: str
) -> None:
    found = clients["endpoints"].get_endpoint(name=endpoint)
    deployed = found.deployed_models[0]
    aiplatform.init(
        project=standin.project_id,
        location=LOCATION,
        api_endpoint=standin.url,
        api_transport="rest",
        credentials=AnonymousCredentials(),
    )

    answer = aiplatform.Endpoint(endpoint).predict(instances=[[5.1, 3.5, 1.4, 0.2]])
    env = answer.metadata["env"]
    image_env = json.loads(
        docker.docker("image", "inspect", "--format", "{{json .Config.Env}}", ECHO_IMAGE).stdout
    )
    own = {entry.split("=", 1)[0] for entry in image_env} | {"HOSTNAME", "HOME"}

    assert endpoint.startswith(f"{by_number()}/endpoints/")
    assert deployed.id.isdigit() and deployed.model == versions["name"]
    assert deployed.model_version_id == "1" and dict(found.traffic_split) == {deployed.id: 100}
    assert answer.deployed_model_id == deployed.id and answer.model_version_id == "1"
    assert answer.model_resource_name == versions["name"]
    assert answer.predictions == [{"deployed": deployed.id, "instance": [5.1, 3.5, 1.4, 0.2]}]
    endpoint_id = endpoint.rsplit("/", 1)[1]
    base = f"/v1/endpoints/{endpoint_id}/deployedModels/{deployed.id}"
    assert {k: v for k, v in env.items() if k not in own} == {
        "AIP_HTTP_PORT": env["AIP_HTTP_PORT"],
        "AIP_HEALTH_ROUTE": base,
        "AIP_PREDICT_ROUTE": f"{base}:predict",
        "AIP_STORAGE_URI": f"gs://models-{versions['name'].rsplit('/', 1)[1]}/artifacts/",
        "AIP_DEPLOYED_MODEL_ID": deployed.id,
        "AIP_ENDPOINT_ID": endpoint_id,
        "AIP_MODE": "PREDICTION",
        "STORAGE_EMULATOR_HOST": STORAGE_HOST,
        "PUBSUB_EMULATOR_HOST": PUBSUB_HOST,
    }
    assert f"vertex-{standin.id}-{deployed.id}" in standin.containers()


def test_a_split_that_does_not_sum_to_100_is_refused(
    clients: dict[str, Any], versions: dict[str, str], endpoint: str
) -> None:
    endpoints = clients["endpoints"]
    current = endpoints.get_endpoint(name=endpoint).deployed_models[0].id
    statuses, messages = [], []

    for attempt in (
        lambda: endpoints.update_endpoint(
            endpoint=v1.Endpoint(name=endpoint, traffic_split={current: 90}),
            update_mask={"paths": ["traffic_split"]},
        ),
        lambda: endpoints.update_endpoint(
            endpoint=v1.Endpoint(name=endpoint, traffic_split={current: 50, "42": 50}),
            update_mask={"paths": ["traffic_split"]},
        ),
        lambda: endpoints.deploy_model(
            endpoint=endpoint,
            deployed_model=v1.DeployedModel(
                model=f"{versions['name']}@2", dedicated_resources=dedicated()
            ),
            traffic_split={"0": 50, current: 40},
        ),
    ):
        with pytest.raises(exceptions.BadRequest) as error:
            attempt()
        statuses.append(status_of(error.value))
        messages.append(str(error.value))

    assert statuses == ["INVALID_ARGUMENT"] * 3
    assert "The following DeployedModel ID(s) [42] do not exist" in messages[1]
    assert dict(endpoints.get_endpoint(name=endpoint).traffic_split) == {current: 100}


@pytest.fixture(scope="module")
def canary(clients: dict[str, Any], versions: dict[str, str], endpoint: str) -> dict[str, str]:
    """Version 2 deployed beside version 1 with 10 % of the traffic; both deployed ids."""
    endpoints = clients["endpoints"]
    stable = endpoints.get_endpoint(name=endpoint).deployed_models[0].id
    deployed = endpoints.deploy_model(
        endpoint=endpoint,
        deployed_model=v1.DeployedModel(
            model=f"{versions['name']}@canary", dedicated_resources=dedicated()
        ),
        traffic_split={"0": 10, stable: 90},
    ).result(timeout=180)
    return {"stable": stable, "canary": deployed.deployed_model.id}


def test_a_10_percent_canary_gets_10_percent_of_1000_predictions(
    clients: dict[str, Any], endpoint: str, canary: dict[str, str]
) -> None:
    predictions = clients["predictions"]

    served = collections.Counter(
        predictions.predict(endpoint=endpoint, instances=[[i]]).deployed_model_id
        for i in range(1000)
    )
    found = clients["endpoints"].get_endpoint(name=endpoint)

    assert dict(found.traffic_split) == {canary["stable"]: 90, canary["canary"]: 10}
    assert {d.model_version_id for d in found.deployed_models} == {"1", "2"}
    assert sum(served.values()) == 1000 and set(served) == set(canary.values())
    assert 70 <= served[canary["canary"]] <= 130, served


def test_undeploy_is_refused_while_the_model_has_traffic_then_done_after_the_split_moves(
    standin: VertexStandIn, clients: dict[str, Any], endpoint: str, canary: dict[str, str]
) -> None:
    endpoints = clients["endpoints"]
    with pytest.raises(exceptions.BadRequest) as refused:
        endpoints.undeploy_model(endpoint=endpoint, deployed_model_id=canary["stable"])

    endpoints.update_endpoint(
        endpoint=v1.Endpoint(
            name=endpoint, traffic_split={canary["canary"]: 100, canary["stable"]: 0}
        ),
        update_mask={"paths": ["traffic_split"]},
    )
    endpoints.undeploy_model(endpoint=endpoint, deployed_model_id=canary["stable"]).result(
        timeout=120
    )
    found = endpoints.get_endpoint(name=endpoint)
    served = {
        clients["predictions"].predict(endpoint=endpoint, instances=[[1]]).deployed_model_id
        for _ in range(20)
    }

    assert status_of(refused.value) == "FAILED_PRECONDITION"
    assert [d.id for d in found.deployed_models] == [canary["canary"]]
    assert dict(found.traffic_split) == {canary["canary"]: 100}
    assert served == {canary["canary"]}
    assert f"vertex-{standin.id}-{canary['stable']}" not in standin.containers()


def test_a_model_server_that_exits_fails_the_deployment_with_its_last_log_lines(
    standin: VertexStandIn, clients: dict[str, Any], versions: dict[str, str], endpoint: str
) -> None:
    model_id = versions["name"].rsplit("/", 1)[1]
    broken = upload_version(
        clients,
        versions["name"],
        echo_model(model_id, aliases=("broken",), env={"ECHO_EXIT_AT_START": "no model"}),
    )
    before = set(standin.containers())

    with pytest.raises(exceptions.FailedPrecondition) as failed:
        clients["endpoints"].deploy_model(
            endpoint=endpoint,
            deployed_model=v1.DeployedModel(
                model=f"{versions['name']}@{broken.model_version_id}",
                dedicated_resources=dedicated(),
            ),
        ).result(timeout=180)

    assert "Model server exited unexpectedly" in str(failed.value)
    assert "echo: refusing to start: no model" in str(failed.value)
    assert set(standin.containers()) == before


def test_a_model_server_that_never_gets_healthy_fails_after_its_deployment_timeout(
    standin: VertexStandIn, clients: dict[str, Any], versions: dict[str, str], endpoint: str
) -> None:
    model_id = versions["name"].rsplit("/", 1)[1]
    model = echo_model(model_id, env={"ECHO_NEVER_READY": "1"})
    model.container_spec.deployment_timeout = duration_pb2.Duration(seconds=4)
    slow = upload_version(clients, versions["name"], model)

    started = time.monotonic()
    with pytest.raises(exceptions.FailedPrecondition) as failed:
        clients["endpoints"].deploy_model(
            endpoint=endpoint,
            deployed_model=v1.DeployedModel(
                model=f"{versions['name']}@{slow.model_version_id}",
                dedicated_resources=dedicated(),
            ),
        ).result(timeout=180)

    assert "Model server never became ready" in str(failed.value)
    assert "the health route answered 503" in str(failed.value)
    assert "echo: serving on 127.0.0.1:" in str(failed.value)
    assert time.monotonic() - started < 60


def run_job(
    standin: VertexStandIn, jobs: v1.JobServiceClient, name: str, command: list[str]
) -> v1.CustomJob:
    return jobs.create_custom_job(
        parent=by_id(standin),
        custom_job=v1.CustomJob(
            display_name=name,
            job_spec=v1.CustomJobSpec(
                worker_pool_specs=[
                    v1.WorkerPoolSpec(
                        machine_spec=v1.MachineSpec(machine_type="n1-standard-4"),
                        replica_count=1,
                        container_spec=v1.ContainerSpec(
                            image_uri=PYTHON_IMAGE,
                            command=command,
                            env=[v1.EnvVar(name="MLPIPE_RUN", value=name)],
                        ),
                    )
                ],
                base_output_directory=v1.GcsDestination(output_uri_prefix="gs://b/runs/r1/"),
            ),
        ),
    )


def finished(jobs: v1.JobServiceClient, name: str, timeout: float = 120) -> v1.CustomJob:
    terminal = {
        v1.JobState.JOB_STATE_SUCCEEDED,
        v1.JobState.JOB_STATE_FAILED,
        v1.JobState.JOB_STATE_CANCELLED,
    }
    return wait_for(
        lambda: (job := jobs.get_custom_job(name=name)).state in terminal and job,
        timeout,
        f"{name} ending",
    )


def test_custom_jobs_run_their_container_to_succeeded_or_failed(
    standin: VertexStandIn, clients: dict[str, Any]
) -> None:
    jobs = clients["jobs"]
    show = (
        "import json, os; print(json.dumps({k: v for k, v in os.environ.items() "
        "if k.startswith(('AIP_', 'CLOUD_ML', 'MLPIPE_', 'STORAGE_', 'PUBSUB_'))}))"
    )
    good = run_job(standin, jobs, "train-ok", ["python", "-c", show])
    bad = run_job(
        standin,
        jobs,
        "train-bad",
        ["python", "-c", "import sys; print('bad rows in the dataset'); sys.exit(4)"],
    )

    succeeded, failed = finished(jobs, good.name), finished(jobs, bad.name)
    job_id = good.name.rsplit("/", 1)[1]
    logs = json.loads((standin.log_dir / f"vertex-{standin.id}-job-{job_id}.log").read_text())

    assert good.name.startswith(f"{by_number()}/customJobs/")
    assert good.state == v1.JobState.JOB_STATE_QUEUED
    assert succeeded.state == v1.JobState.JOB_STATE_SUCCEEDED and not succeeded.error.message
    assert succeeded.start_time and succeeded.end_time
    assert logs == {
        "CLOUD_ML_JOB_ID": job_id,
        "MLPIPE_RUN": "train-ok",
        "AIP_MODEL_DIR": "gs://b/runs/r1/model/",
        "AIP_CHECKPOINT_DIR": "gs://b/runs/r1/checkpoints/",
        "AIP_TENSORBOARD_LOG_DIR": "gs://b/runs/r1/logs/",
        "STORAGE_EMULATOR_HOST": STORAGE_HOST,
        "PUBSUB_EMULATOR_HOST": PUBSUB_HOST,
    }
    assert failed.state == v1.JobState.JOB_STATE_FAILED
    assert "exited with a non-zero status of 4" in failed.error.message
    assert "bad rows in the dataset" in failed.error.message
    assert not any(name.endswith(job_id) for name in standin.containers())


def test_a_cancelled_custom_job_ends_cancelled_with_code_1(
    standin: VertexStandIn, clients: dict[str, Any]
) -> None:
    jobs = clients["jobs"]
    sleeper = (
        "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(143)); "
        "print('training', flush=True); time.sleep(120)"
    )
    job = run_job(standin, jobs, "train-long", ["python", "-c", sleeper])
    wait_for(
        lambda: jobs.get_custom_job(name=job.name).state == v1.JobState.JOB_STATE_RUNNING,
        60,
        "the job running",
    )

    jobs.cancel_custom_job(name=job.name)
    cancelled = finished(jobs, job.name)
    with pytest.raises(exceptions.BadRequest) as again:
        jobs.cancel_custom_job(name=job.name)

    assert cancelled.state == v1.JobState.JOB_STATE_CANCELLED
    assert cancelled.error.code == 1
    assert status_of(again.value) == "FAILED_PRECONDITION"


def test_operations_are_read_by_the_names_the_calls_returned(
    standin: VertexStandIn, clients: dict[str, Any], versions: dict[str, str]
) -> None:
    upload = clients["models"].upload_model(
        request=v1.UploadModelRequest(
            parent=by_id(standin),
            parent_model=versions["name"],
            model=echo_model(versions["name"].rsplit("/", 1)[1]),
        )
    )
    name = upload.operation.name
    upload.result(timeout=60)

    done = clients["models"].get_operation(operations_pb2.GetOperationRequest(name=name))
    response = json_format.MessageToDict(done.response)

    assert name.startswith(f"{versions['name']}/operations/")
    assert done.done and response["model"] == versions["name"]


def test_the_command_serves_until_sigterm() -> None:
    command = [sys.executable, "-m", "mlpipe_ops.cli_standins", "--project", "p-cli"]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
    ) as served:
        try:
            assert served.stdout is not None
            url = served.stdout.readline().strip()
            models = v1.ModelServiceClient(
                transport="rest",
                client_options={"api_endpoint": url},
                credentials=AnonymousCredentials(),
            )
            with pytest.raises(exceptions.NotFound) as missing:
                models.get_model(name=f"projects/p-cli/locations/{LOCATION}/models/none")
        finally:
            served.send_signal(signal.SIGTERM)
            code = served.wait(timeout=30)

    assert url.startswith("http://127.0.0.1:")
    assert f"{by_number()}/models/none not found" in str(missing.value)
    assert code == 0
