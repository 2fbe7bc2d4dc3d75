"""The Vertex AI training backend at its client boundary: the exact CustomJob request, and
the request the real client library puts on the wire."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import aiplatform_v1

from mlpipe.errors import PermanentError
from mlpipe.messaging import events
from mlpipe.ml.config import parse_config
from mlpipe.v1 import events_pb2
from mlpipe_trainer.vertex import VertexJobLauncher, VertexTarget, custom_job_request

REPO = Path(__file__).resolve().parents[2]
TARGET = VertexTarget(
    project="acme-ml",
    bucket="acme-ml-data",
    image="us-central1-docker.pkg.dev/acme-ml/mlpipe/trainer:abc1234",
    code_version="abc1234DEF",
    env="prod",
    service_account="mlpipe-trainer@acme-ml.iam.gserviceaccount.com",
)


def crops_config(**vertex: object) -> object:
    text = (
        (REPO / "examples/crops/pipeline.yaml")
        .read_text()
        .replace("backend: local", "backend: vertex")
    )
    for key, value in vertex.items():
        text = text.replace(f"    {key}: ", f"    {key}: {value}  # was ")
    return parse_config(text)


def started_event() -> events_pb2.TrainingStarted:
    return events_pb2.TrainingStarted(
        context=events_pb2.RunContext(
            run_id="0123456789abcdef", pipeline="crops", code_version="abc1234DEF"
        ),
        dataset=events_pb2.DatasetRef(
            uri="gs://acme-ml-data/datasets/crops/dt=2026-11-23/a.csv",
            generation=7,
            sha256="ab" * 32,
            name="crops",
        ),
        backend="vertex",
    )


def test_custom_job_request_has_machine_accelerators_image_args_and_labels() -> None:
    started = started_event()

    request = custom_job_request(started, crops_config(), TARGET)

    assert request.parent == "projects/acme-ml/locations/us-central1"
    job = request.custom_job
    assert job.display_name == "mlpipe-crops-0123456789abcdef"
    assert job.labels == {
        "mlpipe-run-id": "0123456789abcdef",
        "mlpipe-pipeline": "crops",
        "mlpipe-commit": "abc1234def",
        "mlpipe-env": "prod",
    }
    (pool,) = job.job_spec.worker_pool_specs
    assert pool.replica_count == 1
    assert pool.machine_spec.machine_type == "n1-standard-8"
    assert pool.machine_spec.accelerator_type == aiplatform_v1.AcceleratorType.NVIDIA_TESLA_T4
    assert pool.machine_spec.accelerator_count == 1
    container = pool.container_spec
    assert container.image_uri == TARGET.image
    assert list(container.command) == ["python", "-m", "mlpipe_trainer.job"]
    assert list(container.args) == ["--started", events.to_json(started)]
    assert {e.name: e.value for e in container.env} == {
        "MLPIPE_PROJECT": "acme-ml",
        "MLPIPE_BUCKET": "acme-ml-data",
        "MLPIPE_CODE_VERSION": "abc1234DEF",
        "MLPIPE_ENV": "prod",
    }
    assert (
        job.job_spec.base_output_directory.output_uri_prefix
        == "gs://acme-ml-data/runs/0123456789abcdef/vertex/"
    )
    # No account in the pipeline: the trainer's own, never the Custom Code Service Agent.
    assert job.job_spec.service_account == "mlpipe-trainer@acme-ml.iam.gserviceaccount.com"


def test_a_job_without_any_service_account_is_refused_naming_the_settings() -> None:
    without = VertexTarget("acme-ml", "acme-ml-data", TARGET.image, "abc1234DEF", "prod")

    with pytest.raises(PermanentError) as failure:
        custom_job_request(started_event(), crops_config(), without)

    assert failure.value.reason == "invalid_config"
    assert "training.vertex.service_account" in failure.value.message
    assert "MLPIPE_VERTEX_SERVICE_ACCOUNT" in failure.value.message


def test_service_account_and_cpu_only_machines() -> None:
    config = parse_config(
        (REPO / "examples/crops/pipeline.yaml")
        .read_text()
        .replace(
            "    accelerator_type: NVIDIA_TESLA_T4\n    accelerator_count: 1\n",
            "    service_account: trainer@acme-ml.iam.gserviceaccount.com\n",
        )
    )

    request = custom_job_request(started_event(), config, TARGET)

    spec = request.custom_job.job_spec
    assert spec.service_account == "trainer@acme-ml.iam.gserviceaccount.com"
    assert spec.worker_pool_specs[0].machine_spec.accelerator_count == 0
    assert (
        spec.worker_pool_specs[0].machine_spec.accelerator_type
        == aiplatform_v1.AcceleratorType.ACCELERATOR_TYPE_UNSPECIFIED
    )


def test_an_unknown_accelerator_is_a_permanent_error_naming_it() -> None:
    config = parse_config(
        (REPO / "examples/crops/pipeline.yaml")
        .read_text()
        .replace("NVIDIA_TESLA_T4", "NVIDIA_GTX_1080")
    )

    with pytest.raises(PermanentError, match="NVIDIA_GTX_1080") as failure:
        custom_job_request(started_event(), config, TARGET)

    assert failure.value.reason == "invalid_config"
    assert "NVIDIA_TESLA_T4" in failure.value.message


class _Recorder(BaseHTTPRequestHandler):
    seen: list[tuple[str, dict]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Recorder.seen.append((self.path, body))
        reply = json.dumps(
            {"name": "projects/acme-ml/locations/us-central1/customJobs/42", **body}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def vertex_stand_in() -> Iterator[str]:
    """An HTTP server on 127.0.0.1 that records what the real client library sends."""
    server = HTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Recorder.seen.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_launcher_sends_exactly_the_built_request(vertex_stand_in: str) -> None:
    def client(region: str) -> aiplatform_v1.JobServiceClient:
        assert region == "us-central1"
        return aiplatform_v1.JobServiceClient(
            transport="rest",
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": vertex_stand_in},
        )

    config = crops_config()
    job_name = VertexJobLauncher(TARGET, client).launch(started_event(), config)

    assert job_name == "projects/acme-ml/locations/us-central1/customJobs/42"
    ((path, body),) = _Recorder.seen
    assert path.split("?")[0] == "/v1/projects/acme-ml/locations/us-central1/customJobs"
    expected = custom_job_request(started_event(), config, TARGET).custom_job
    assert aiplatform_v1.CustomJob.from_json(json.dumps(body)) == expected
    pool = body["jobSpec"]["workerPoolSpecs"][0]
    # The REST transport sends enums as integers (enum-encoding=int).
    assert pool["machineSpec"] == {
        "machineType": "n1-standard-8",
        "acceleratorType": aiplatform_v1.AcceleratorType.NVIDIA_TESLA_T4.value,
        "acceleratorCount": 1,
    }
    assert pool["containerSpec"]["args"] == ["--started", events.to_json(started_event())]
