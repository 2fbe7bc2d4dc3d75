"""A console over real recorded runs on the emulators, for the console's integration and browser
tests: iris v1 (champion) and v2 (a 20% canary) through the real training job code, evaluator
and deployer, a run the trainer failed (its upload kept), a push the evaluator refused (kept,
replayable), a drift check of rows the predictor served and a batch prediction; the
deployer, the predictor and the console under uvicorn on 127.0.0.1."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from google.cloud import pubsub_v1

from mlpipe.messaging import events, topology
from mlpipe.messaging.kept_failures import DEAD_LETTER_ARCHIVE
from mlpipe.messaging.publishing import Publisher
from mlpipe.messaging.push import make_envelope
from mlpipe.ml.config import PipelineConfig, parse_config
from mlpipe.store import layout
from mlpipe.store.registry import Registry
from mlpipe.store.storage import Storage, make_client, sha256_hex
from mlpipe.v1 import events_pb2
from mlpipe_ops import service_runtime
from mlpipe_ops.localstack import free_port
from mlpipe_trainer.training import train
from tests.conftest import REPO, unique, wait_until
from tests.integration.conftest import Cloud, notification

MODEL = "iris-classifier"


@contextmanager
def served(app: Any) -> Iterator[str]:
    """`app` under uvicorn on a free 127.0.0.1 port in this process; its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


def new_cloud() -> Cloud:
    """A project and bucket of their own (as the `cloud` fixture makes), with the dead-letter
    archive the failures page reads."""
    project = unique("proj")
    client = make_client(project)
    bucket = client.create_bucket(unique("bucket"))
    topology.create_topics(project, topology.TOPOLOGY.topics)
    subscriber = pubsub_v1.SubscriberClient()
    subscriber.create_subscription(
        request={
            "name": subscriber.subscription_path(project, DEAD_LETTER_ARCHIVE),
            "topic": f"projects/{project}/topics/{events.DEAD_LETTERS}",
        }
    )
    return Cloud(project, Storage(client, bucket.name), Publisher(project), subscriber)


@dataclass
class ConsoleStack:
    cloud: Cloud
    console_url: str
    deployer_url: str
    # v1, v2, failed, regression (bikeshare) → run id
    runs: dict[str, str] = field(default_factory=dict)
    quarantined: str = ""  # the kept input's path
    check_id: str = ""  # the drift check of served rows
    batch_id: str = ""


def chain_run(
    cloud: Cloud, evaluator: TestClient, deployer_url: str, config: PipelineConfig, csv: str
) -> str:
    """Land `csv`, train on it with the job's code, evaluate it with the evaluator's app and
    deploy it with the deployer's (over HTTP); the run id."""
    data = csv.encode()
    path = f"datasets/{config.name}/dt=2026-11-23/{uuid.uuid4().hex[:16]}.csv"
    generation = cloud.storage.write(path, data, content_type="text/csv")
    run_id = layout.run_id_for(sha256_hex(data), config.sha256())
    cloud.storage.write(layout.RunPaths(run_id).config, config.canonical_json())
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
    started = events_pb2.TrainingStarted(context=context, dataset=dataset)
    cloud.storage.write(layout.RunPaths(run_id).started, events.to_json(started).encode())
    done = train(cloud.storage, started, "t")
    # Recorded as the job records it (mlpipe_trainer.job), before it is published.
    cloud.storage.write(layout.RunPaths(run_id).training, events.to_json(done).encode())
    reply = evaluator.post("/pubsub/push", content=make_envelope(events.encode(done)))
    assert reply.status_code == 200, reply.text
    evaluated = cloud.storage.read(layout.RunPaths(run_id).evaluation)
    assert evaluated is not None, reply.text
    reply = httpx.post(
        f"{deployer_url}/pubsub/push", content=make_envelope(evaluated.data), timeout=60
    )
    assert reply.status_code == 200, reply.text
    assert cloud.storage.exists(layout.RunPaths(run_id).deployment)
    # The evaluator draws the report after answering (mlpipe_evaluator.drawing): the run's
    # page links it once it exists.
    wait_until(lambda: cloud.storage.exists(layout.RunPaths(run_id).report), 90, "the report")
    return run_id


def quarantine_a_failure(cloud: Cloud, evaluator: TestClient) -> tuple[str, str]:
    """A TrainingCompleted naming a model outside the bucket, pushed to the evaluator: the run
    fails and the push is kept whole. (run id, the kept object's path)"""
    run_id = uuid.uuid4().hex[:16]
    bad = events_pb2.TrainingCompleted(
        context=events.context(producer="test", code_version="test", run_id=run_id),
        model_uri="gs://elsewhere/model.joblib",
        model_name=MODEL,
    )
    envelope = make_envelope(
        events.encode(bad),
        attributes={events.EVENT_TYPE_ATTR: bad.DESCRIPTOR.full_name},
        message_id="bad-1",
        subscription=f"projects/{cloud.project}/subscriptions/evaluator-push",
    )
    reply = evaluator.post("/pubsub/push", content=envelope)
    assert reply.status_code == 200, reply.text
    kept = cloud.storage.list(f"{layout.QUARANTINE}missing_run_config/")
    assert len(kept) == 1, kept
    return run_id, kept[0]


def fail_a_run(cloud: Cloud, trainer: TestClient, config: PipelineConfig, csv: str) -> str:
    """An upload without the target column, noticed by the trainer: the run fails before any
    job (runs/<id>/failed.json) and the upload is kept. The run id."""
    cloud.apply_config(config)
    no_target = "\n".join(",".join(line.split(",")[:4]) for line in csv.splitlines()) + "\n"
    path = f"datasets/{config.name}/dt=2026-11-23/upload-bad.csv"
    generation = cloud.storage.write(path, no_target.encode(), content_type="text/csv")
    reply = trainer.post("/pubsub/push", content=notification(cloud, path, generation))
    assert reply.status_code == 200, reply.text
    run_id = layout.run_id_for(sha256_hex(no_target.encode()), config.sha256())
    assert cloud.storage.exists(layout.RunPaths(run_id).failed), reply.text
    return run_id


def serve_and_check(cloud: Cloud, evaluator: TestClient, csv: str) -> tuple[str, str]:
    """The champion served 150 rows with longer petals than it learned from (its prediction
    log flushed to GCS), a batch prediction of the dataset, then the evaluator's drift check.
    (the check's id, the batch's id)"""
    from mlpipe_predictor.main import app as predictor

    lines = csv.strip().splitlines()[1:]
    shifted = [
        {
            "sepal_length": float(a),
            "sepal_width": float(b),
            "petal_length": float(c) + 3,
            "petal_width": float(d),
        }
        for a, b, c, d, _ in (line.split(",") for line in lines)
    ]
    cloud.storage.write("inputs/iris.csv", csv.encode(), content_type="text/csv")
    batch = events_pb2.BatchPredictionRequest(
        batch_id="b1", model_name=MODEL, input_uri=cloud.storage.uri("inputs/iris.csv")
    )
    with served(predictor) as url:
        for start in range(0, len(shifted), 25):
            reply = httpx.post(
                f"{url}/v1/models/{MODEL}:predict",
                json={"instances": shifted[start : start + 25]},
                timeout=30,
            )
            assert reply.status_code == 200, reply.text
        assert httpx.post(f"{url}/v1/monitoring:flush", timeout=30).json()["written"] == 150
        # The split is exact (20 of every 100 requests, the first one the canary's): 2 of the 6
        # went to v2, and the instance records its count of them within about a second.
        registry = Registry(cloud.storage)
        _, round_id = registry.traffic_round(MODEL)
        deadline = time.monotonic() + 15
        while registry.canary_counts(MODEL, round_id) != (2, 0):
            assert time.monotonic() < deadline, registry.canary_counts(MODEL, round_id)
            time.sleep(0.1)
        httpx.post(f"{url}/v1/batchPredictions", content=events.to_json(batch), timeout=30)
        deadline = time.monotonic() + 30
        while not cloud.storage.exists(layout.batch_metrics_path(MODEL, "b1")):
            assert time.monotonic() < deadline, "the batch did not finish"
            time.sleep(0.1)
    check = events_pb2.MonitoringRequest(request_id="check-1", pipeline="iris")
    reply = evaluator.post(
        "/pubsub/push",
        content=make_envelope(
            events.encode(check),
            subscription=f"projects/{cloud.project}/subscriptions/{topology.MONITOR_PUSH}",
        ),
    )
    assert reply.status_code == 200, reply.text
    reports = [p for p in cloud.storage.list(layout.MONITORING) if p.endswith("/drift.json")]
    assert len(reports) == 1, reports
    return reports[0].split("/")[-2], "b1"


def iris() -> tuple[PipelineConfig, str]:
    config = parse_config((REPO / "examples/iris/pipeline.yaml").read_text())
    return config, (REPO / "examples/iris/iris.csv").read_text()


def bikeshare() -> tuple[PipelineConfig, str]:
    """The regression example: its plots are predicted against actual, residuals and the
    error by each of its categorical columns."""
    config = parse_config((REPO / "examples/bikeshare/pipeline.yaml").read_text())
    return config, (REPO / "examples/bikeshare/bikeshare.csv").read_text()


@contextmanager
def console_stack(**console_env: str) -> Iterator[ConsoleStack]:
    """The whole stack; `console_env` overrides the console's settings (local auth by
    default)."""
    cloud = new_cloud()
    config, csv = iris()
    lines = csv.strip().splitlines()
    # The same rows in another order: other bytes, so another run, and a model as good.
    csv_v2 = "\n".join([lines[0], *reversed(lines[1:])]) + "\n"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLPIPE_PROJECT", cloud.project)
        env.setenv("MLPIPE_BUCKET", cloud.storage.bucket_name)
        env.setenv("MLPIPE_PUSH_AUTH", "none")
        env.setenv("MLPIPE_COMPILE_ONNX", "false")
        env.setenv("MLPIPE_CANARY_PERCENT", "20")
        # Sizes and prices, as the local stack gives them to the services that estimate
        # costs (service_environment): the deployer records each ended run's estimate.
        for key, value in service_runtime.cost_environment("local").items():
            env.setenv(key, value)
        from mlpipe_console.main import create_console
        from mlpipe_deployer.main import app as deployer
        from mlpipe_evaluator.main import app as evaluator
        from mlpipe_trainer.main import app as trainer

        with (
            served(deployer) as deployer_url,
            TestClient(evaluator) as scoring,
            TestClient(trainer) as training,
        ):
            v1 = chain_run(cloud, scoring, deployer_url, config, csv)
            v2 = chain_run(cloud, scoring, deployer_url, config, csv_v2)
            regression = chain_run(cloud, scoring, deployer_url, *bikeshare())
            failed = fail_a_run(cloud, training, config, csv)
            _, kept = quarantine_a_failure(cloud, scoring)
            check_id, batch_id = serve_and_check(cloud, scoring, csv)
            env.setenv("MLPIPE_DEPLOYER_URL", deployer_url)
            env.setenv("MLPIPE_CONSOLE_AUTH", "local")
            for key, value in console_env.items():
                env.setenv(key, value)
            with served(create_console()) as console_url:
                yield ConsoleStack(
                    cloud,
                    console_url,
                    deployer_url,
                    {"v1": v1, "v2": v2, "failed": failed, "regression": regression},
                    kept,
                    check_id,
                    batch_id,
                )
    cloud.subscriber.close()
