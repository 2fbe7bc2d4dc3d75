"""The predictor over real HTTP (uvicorn on 127.0.0.1) against the emulators: the Vertex AI
client library unchanged, ONNX serving with its holdout check, safe loading, hot swap under
load, and batch prediction."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import fastavro
import httpx
import pytest
import uvicorn
from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import aiplatform_v1
from google.protobuf import json_format, struct_pb2

from mlpipe.messaging import events, topology
from mlpipe.messaging.push import make_envelope, parse_envelope
from mlpipe.ml.config import PipelineConfig, parse_config
from mlpipe.store import layout
from mlpipe.store.registry import Registry
from mlpipe.store.storage import sha256_hex
from mlpipe.v1 import events_pb2
from mlpipe_deployer.deployment import Deployer
from mlpipe_ops.localstack import free_port
from mlpipe_trainer.training import train
from tests.integration.conftest import Cloud

pytestmark = pytest.mark.integration

SETOSA = [5.1, 3.5, 1.4, 0.2]
VIRGINICA = [6.7, 3.0, 5.2, 2.3]
VERSICOLOR = [5.9, 3.0, 4.2, 1.5]
PROBES = [SETOSA, VIRGINICA, VERSICOLOR] * 10
# v2 of the swap test learns renamed species, so its answers tell which version gave them.
RENAMED = {"setosa": "versicolor", "versicolor": "virginica", "virginica": "setosa"}


# --- making a deployed model the way the chain does -----------------------------------------
def trained(cloud: Cloud, config: PipelineConfig, csv_text: str) -> events_pb2.EvaluationCompleted:
    """Land `csv_text`, run the real training job code on it, and say it passed its gates."""
    data = csv_text.encode()
    path = f"datasets/{config.name}/dt=2026-11-23/{uuid.uuid4().hex[:16]}.csv"
    generation = cloud.storage.write(path, data, content_type="text/csv")
    run_id = layout.run_id_for(sha256_hex(data), config.sha256())
    cloud.storage.write(f"runs/{run_id}/config.json", config.canonical_json())
    context = events.context(
        producer="test",
        code_version="test",
        run_id=run_id,
        pipeline=config.name,
        config_sha256=config.sha256(),
    )
    dataset = events_pb2.DatasetRef(
        uri=cloud.storage.uri(path),
        generation=generation,
        sha256=sha256_hex(data),
        name=config.name,
        format="csv",
    )
    done = train(cloud.storage, events_pb2.TrainingStarted(context=context, dataset=dataset), "t")
    return events_pb2.EvaluationCompleted(
        context=done.context,
        dataset=done.dataset,
        model_uri=done.model_uri,
        model_sha256=done.model_sha256,
        model_name=done.model_name,
        passed=True,
        metrics={"accuracy": 1.0},
        holdout_rows=done.holdout_rows,
    )


def deploy(
    cloud: Cloud, evaluation: events_pb2.EvaluationCompleted, **options: Any
) -> events_pb2.DeploymentCompleted:
    """Run the deployer's real step on `evaluation`; return the DeploymentCompleted it made."""
    deployer = Deployer(cloud.storage, cloud.publisher, Registry(cloud.storage), "test", **options)
    deployer(parse_envelope(make_envelope(events.encode(evaluation))))
    recorded = cloud.storage.read(layout.RunPaths(evaluation.context.run_id).deployment)
    assert recorded is not None
    return events.from_json(events_pb2.DeploymentCompleted, recorded.data)


def renamed_iris(csv_text: str) -> str:
    lines = csv_text.strip().splitlines()
    rows = [line.rsplit(",", 1) for line in lines[1:]]
    return "\n".join([lines[0], *(f"{x},{RENAMED[y]}" for x, y in rows)]) + "\n"


@dataclass
class Served:
    url: str
    server: uvicorn.Server

    def push(self, event: events_pb2.DeploymentCompleted) -> dict:
        reply = httpx.post(
            f"{self.url}/pubsub/push",
            content=make_envelope(events.encode(event)),
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        return reply.json()


@contextmanager
def predictor(cloud: Cloud, monkeypatch: pytest.MonkeyPatch, **env: str) -> Iterator[Served]:
    """The predictor app under uvicorn on a free 127.0.0.1 port, in this process."""
    monkeypatch.setenv("MLPIPE_PROJECT", cloud.project)
    monkeypatch.setenv("MLPIPE_BUCKET", cloud.storage.bucket_name)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from mlpipe_predictor.main import app

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the predictor did not start"
    try:
        yield Served(f"http://127.0.0.1:{port}", server)
    finally:
        server.should_exit = True
        thread.join(15)


@pytest.fixture
def iris_v1(
    cloud: Cloud, iris_config: PipelineConfig, iris_csv: str
) -> events_pb2.DeploymentCompleted:
    return deploy(cloud, trained(cloud, iris_config, iris_csv))


# --- the Vertex AI client library, unchanged ------------------------------------------------
def test_the_vertex_ai_client_library_predicts_against_the_predictor(
    cloud: Cloud, monkeypatch: pytest.MonkeyPatch, iris_v1: events_pb2.DeploymentCompleted
) -> None:
    with predictor(cloud, monkeypatch) as served:
        options = ClientOptions(api_endpoint=served.url)
        client = aiplatform_v1.PredictionServiceClient(
            transport="rest", client_options=options, credentials=AnonymousCredentials()
        )
        endpoints = aiplatform_v1.EndpointServiceClient(
            transport="rest", client_options=options, credentials=AnonymousCredentials()
        )
        endpoint = "projects/p1/locations/us-central1/endpoints/iris-classifier"
        instances = [json_format.ParseDict(row, struct_pb2.Value()) for row in (SETOSA, VIRGINICA)]

        reply = client.predict(endpoint=endpoint, instances=instances)
        with_scores = client.predict(
            endpoint=endpoint,
            instances=instances[:1],
            parameters=json_format.ParseDict({"probabilities": True}, struct_pb2.Value()),
        )
        described = endpoints.get_endpoint(name=endpoint)
        with pytest.raises(gexc.BadRequest) as bad:
            client.predict(
                endpoint=endpoint, instances=[json_format.ParseDict([1, 2], struct_pb2.Value())]
            )
        with pytest.raises(gexc.NotFound):
            client.predict(
                endpoint="projects/p1/locations/us-central1/endpoints/nope", instances=instances
            )

    assert list(reply.predictions) == ["setosa", "virginica"]
    assert reply.deployed_model_id == "1"
    assert reply.model == "projects/p1/locations/us-central1/models/iris-classifier"
    assert reply.model_version_id == "1"
    assert reply.model_display_name == "iris-classifier"
    scored = dict(with_scores.predictions[0])
    assert scored["label"] == "setosa"
    assert list(scored["classes"]) == ["setosa", "versicolor", "virginica"]
    scores = list(scored["scores"])
    assert scores[0] > 0.9 and sum(scores) == pytest.approx(1.0)
    assert described.name == endpoint
    assert [(d.id, d.model_version_id) for d in described.deployed_models] == [("1", "1")]
    assert dict(described.traffic_split) == {"1": 100}
    assert "has 2 values; the model takes 4" in str(bad.value)


# --- ONNX, its check, and safe loading ------------------------------------------------------
def test_the_deployer_serves_onnx_only_after_it_agrees_on_the_holdout(
    cloud: Cloud, monkeypatch: pytest.MonkeyPatch, iris_v1: events_pb2.DeploymentCompleted
) -> None:
    version = Registry(cloud.storage).get("iris-classifier", 1)
    assert version is not None

    with predictor(cloud, monkeypatch) as served:
        models = httpx.get(f"{served.url}/v1/models").json()["models"]

    assert iris_v1.runtime == "onnx"
    assert "ONNX agrees with scikit-learn: 0 label(s) differ" in iris_v1.runtime_note
    assert "30 holdout row(s) + 4 probe(s)" in iris_v1.runtime_note
    assert version.artifact("model.onnx") is not None
    assert version.info["input_schema"][0] == {
        "kind": "numeric",
        "name": "sepal_length",
        "nullable": True,
    }
    assert models["iris-classifier"]["runtime"] == "onnx"


def test_the_model_is_compiled_once_while_it_is_evaluated(
    cloud: Cloud,
    monkeypatch: pytest.MonkeyPatch,
    iris_config: PipelineConfig,
    iris_csv: str,
) -> None:
    from mlpipe_deployer import deployment

    evaluation = trained(cloud, iris_config, iris_csv)
    training_done = events_pb2.TrainingCompleted(
        context=evaluation.context,
        dataset=evaluation.dataset,
        model_uri=evaluation.model_uri,
        model_sha256=evaluation.model_sha256,
        model_name=evaluation.model_name,
    )
    calls: list[str] = []
    compile_for = deployment.compile_for

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(threading.current_thread().name)
        return compile_for(*args, **kwargs)

    monkeypatch.setattr(deployment, "compile_for", counted)
    deployer = Deployer(cloud.storage, cloud.publisher, Registry(cloud.storage), "test")
    subscription = f"projects/{cloud.project}/subscriptions/{deployment.TRAINED_PUSH}"

    early = deployer(
        parse_envelope(make_envelope(events.encode(training_done), subscription=subscription))
    )
    again = deployer(
        parse_envelope(make_envelope(events.encode(training_done), subscription=subscription))
    )
    deployer(parse_envelope(make_envelope(events.encode(evaluation))))

    recorded = cloud.storage.read(layout.RunPaths(evaluation.context.run_id).deployment)
    assert recorded is not None
    done = events.from_json(events_pb2.DeploymentCompleted, recorded.data)
    assert (early.status, again.status) == ("compiling", "duplicate")
    # Compiled once, by the background worker; the deployment took its result.
    assert len(calls) == 1 and calls[0].startswith("precompile"), calls
    assert done.deployed and done.runtime == "onnx", done.runtime_note


def test_without_onnx_the_pipeline_is_served_by_sklearn_and_the_event_says_why(
    cloud: Cloud, monkeypatch: pytest.MonkeyPatch, iris_config: PipelineConfig, iris_csv: str
) -> None:
    deployed = deploy(cloud, trained(cloud, iris_config, iris_csv), compile_onnx=False)

    with predictor(cloud, monkeypatch) as served:
        reply = httpx.post(f"{served.url}/predict", json={"instances": [SETOSA]}).json()
        models = httpx.get(f"{served.url}/v1/models").json()["models"]

    assert deployed.runtime == "sklearn"
    assert "ONNX compilation is off" in deployed.runtime_note
    assert reply["predictions"] == ["setosa"]
    assert models["iris-classifier"]["runtime"] == "sklearn"


def test_a_tampered_artifact_is_never_loaded(
    cloud: Cloud, monkeypatch: pytest.MonkeyPatch, iris_config: PipelineConfig, iris_csv: str
) -> None:
    deploy(cloud, trained(cloud, iris_config, iris_csv), compile_onnx=False)
    version = Registry(cloud.storage).get("iris-classifier", 1)
    assert version is not None
    # A pickle that would run code when loaded: the sha256 check must stop it first.
    marker = f"/tmp/mlpipe-pwned-{uuid.uuid4().hex}"
    evil = b"cos\nsystem\n(S'touch " + marker.encode() + b"'\ntR."
    cloud.storage.write(cloud.storage.path_of(version.model_uri), evil)

    with predictor(cloud, monkeypatch) as served:
        ready = httpx.get(f"{served.url}/readyz")

    import os

    assert ready.status_code == 503
    assert not os.path.exists(marker)


# --- hot swap ---------------------------------------------------------------------------------
def test_a_deployment_under_load_fails_no_request_and_mixes_no_versions(
    cloud: Cloud,
    monkeypatch: pytest.MonkeyPatch,
    iris_config: PipelineConfig,
    iris_csv: str,
    iris_v1: events_pb2.DeploymentCompleted,
) -> None:
    v2_evaluation = trained(cloud, iris_config, renamed_iris(iris_csv))
    expected = {
        "1": ["setosa", "virginica", "versicolor"] * 10,
        "2": ["versicolor", "setosa", "virginica"] * 10,
    }
    replies: list[tuple[float, int, dict]] = []
    stop = threading.Event()

    with predictor(cloud, monkeypatch) as served:

        def load() -> None:
            with httpx.Client(base_url=served.url) as client:
                while not stop.is_set():
                    sent = time.monotonic()
                    reply = client.post("/predict", json={"instances": PROBES})
                    replies.append((sent, reply.status_code, reply.json()))

        workers = [threading.Thread(target=load) for _ in range(3)]
        for worker in workers:
            worker.start()
        time.sleep(0.5)
        v2 = deploy(cloud, v2_evaluation)
        serving = served.push(v2)
        swapped = time.monotonic()
        time.sleep(0.5)
        stop.set()
        for worker in workers:
            worker.join()

    versions = [body.get("modelVersionId") for _, _, body in replies]
    assert serving["version"] == 2
    assert all(status == 200 for _, status, _ in replies), {s for _, s, _ in replies}
    # Each answer is entirely one version's: the predictions match the version it names.
    assert all(body["predictions"] == expected[body["modelVersionId"]] for *_, body in replies)
    assert versions.count("1") > 10 and versions.count("2") > 10
    # Once the swap is answered, every request sent after it is served by the new version.
    assert {body["modelVersionId"] for sent, _, body in replies if sent > swapped} == {"2"}


# --- batch prediction -------------------------------------------------------------------------
def test_batch_prediction_scores_a_gcs_dataset_in_chunks_into_avro(
    cloud: Cloud,
    monkeypatch: pytest.MonkeyPatch,
    iris_csv: str,
    iris_v1: events_pb2.DeploymentCompleted,
) -> None:
    lines = iris_csv.strip().splitlines()
    header = "id," + ",".join(lines[0].split(",")[:4])
    rows = [f"r{i}," + ",".join(line.split(",")[:4]) for i, line in enumerate(lines[1:])]
    rows[3] = "r3,5.1,,1.4,0.2"  # missing: imputed, as in training
    rows[4] = "r4,5.1,abc,1.4,0.2"  # not a number: that row is reported, the rest scored
    cloud.storage.write("inputs/iris.csv", ("\n".join([header, *rows]) + "\n").encode())
    request = events_pb2.BatchPredictionRequest(
        batch_id="b1",
        model_name="iris-classifier",
        input_uri=cloud.storage.uri("inputs/iris.csv"),
        key_column="id",
        chunk_rows=40,
    )

    with predictor(cloud, monkeypatch) as served:
        started = httpx.post(f"{served.url}/v1/batchPredictions", content=events.to_json(request))
        deadline = time.monotonic() + 30
        state: dict = {}
        while time.monotonic() < deadline:
            state = httpx.get(f"{served.url}/v1/batchPredictions/iris-classifier/b1").json()
            if state.get("state") != "running":
                break
            time.sleep(0.1)
        again = httpx.post(f"{served.url}/v1/batchPredictions", content=events.to_json(request))

    assert started.status_code in (200, 202)
    assert state["state"] == "succeeded", state
    assert state["rows"] == 150 and state["invalid_rows"] == 1 and state["chunks"] == 4
    assert state["model_version"] == 1
    assert again.json()["state"] == "succeeded"  # done once: not scored again
    output = cloud.storage.read(cloud.storage.path_of(state["output_uri"]))
    metrics = cloud.storage.read_json("predictions/iris-classifier/metrics/b1.json")
    assert output is not None and metrics == {
        k: v for k, v in state.items() if k not in ("state", "cost")
    }
    # Its estimate, as recorded (this predictor has no sizes or prices: it says so).
    assert state["cost"] == cloud.storage.read_json(layout.batch_cost_path("iris-classifier", "b1"))
    assert "MLPIPE_COST_SIZES is not set" in state["cost"]["no_estimate"]
    assert "/dt=" in state["output_uri"] and state["output_uri"].endswith("/b1.avro")
    import io

    records = list(fastavro.reader(io.BytesIO(output.data)))
    assert len(records) == 150
    assert records[0] == {
        "key": "r0",
        "prediction": "setosa",
        "error": None,
        "model": "iris-classifier",
        "model_version": 1,
    }
    assert records[3]["prediction"] == "setosa"
    assert records[4]["prediction"] is None and records[4]["error"] == "sepal_width is not a number"


def test_a_batch_request_delivery_is_acknowledged_only_when_its_job_is_done(
    cloud: Cloud,
    monkeypatch: pytest.MonkeyPatch,
    iris_v1: events_pb2.DeploymentCompleted,
    iris_csv: str,
) -> None:
    cloud.storage.write("inputs/iris.csv", iris_csv.encode())
    request = events_pb2.BatchPredictionRequest(
        batch_id="pushed",
        model_name="iris-classifier",
        input_uri=cloud.storage.uri("inputs/iris.csv"),
    )
    # As the batch-prediction-requests subscription delivers it (no event_type attribute).
    subscription = f"projects/{cloud.project}/subscriptions/{topology.BATCH_PUSH}"

    def deliver() -> httpx.Response:
        return httpx.post(
            f"{served.url}/pubsub/push",
            content=make_envelope(events.encode(request), subscription=subscription),
        )

    with predictor(cloud, monkeypatch) as served:
        first = deliver()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if cloud.storage.exists("predictions/iris-classifier/metrics/pushed.json"):
                break
            time.sleep(0.1)
        redelivered = deliver()

    # Not acknowledged while running: a job lost with its process would start again.
    assert first.status_code == 503 and first.json()["status"] == "held"
    assert "still running" in first.json()["detail"]
    assert redelivered.status_code == 200, redelivered.text
    assert redelivered.json()["status"] == "succeeded" and redelivered.json()["rows"] == 150
    metrics = cloud.storage.read_json("predictions/iris-classifier/metrics/pushed.json")
    assert metrics["rows"] == 150 and metrics["model_version"] == 1


def test_a_failed_batch_delivery_is_quarantined_once(
    cloud: Cloud,
    monkeypatch: pytest.MonkeyPatch,
    iris_v1: events_pb2.DeploymentCompleted,
) -> None:
    request = events_pb2.BatchPredictionRequest(
        batch_id="missing-input",
        model_name="iris-classifier",
        input_uri=cloud.storage.uri("inputs/not-there.csv"),
    )
    attributes = {events.EVENT_TYPE_ATTR: request.DESCRIPTOR.full_name}

    with predictor(cloud, monkeypatch) as served:
        replies = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            reply = httpx.post(
                f"{served.url}/pubsub/push",
                content=make_envelope(events.encode(request), attributes=attributes),
            )
            replies.append(reply)
            if reply.status_code != 503:
                break
            time.sleep(0.2)

    last = replies[-1]
    assert last.status_code == 200 and last.json()["status"] == "rejected", last.text
    assert "not-there.csv" in last.json()["detail"]
    quarantined = last.json()["quarantine_uri"].removeprefix(f"gs://{cloud.storage.bucket_name}/")
    assert cloud.storage.exists(quarantined)


def test_the_crops_model_with_categories_and_missing_bands_serves_from_onnx(
    cloud: Cloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import REPO

    config = parse_config((REPO / "examples/crops/pipeline.yaml").read_text())
    csv_text = (REPO / "examples/crops/crops.csv").read_text()
    deployed = deploy(cloud, trained(cloud, config, csv_text))
    header = csv_text.splitlines()[0].split(",")
    row = dict(zip(header, csv_text.splitlines()[1].split(","), strict=True))
    instance: dict[str, Any] = {
        k: (v if k == "region" else float(v))
        for k, v in row.items()
        if k not in ("field_id", "crop")
    }
    instance["B2"] = None  # a cloud-masked band: imputed like in training
    with predictor(cloud, monkeypatch) as served:
        reply = httpx.post(
            f"{served.url}/v1/models/crop-classifier:predict", json={"instances": [instance]}
        )
        unseen = httpx.post(
            f"{served.url}/v1/models/crop-classifier:predict",
            json={"instances": [instance | {"region": "atlantis"}]},
        )
        wrong = httpx.post(
            f"{served.url}/v1/models/crop-classifier:predict",
            json={"instances": [instance | {"region": 3}]},
        )

    assert deployed.runtime == "onnx", deployed.runtime_note
    assert reply.status_code == 200 and reply.json()["predictions"] == [row["crop"]]
    assert unseen.status_code == 200
    assert wrong.status_code == 400 and "'region' must be a string" in wrong.text
