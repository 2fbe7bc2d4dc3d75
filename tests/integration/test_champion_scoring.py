"""A new champion scores the next days (the bike-share nightly's last hops) on the emulators:
the deployer's real decision, the predictor under uvicorn, its batch request on Pub/Sub, the
rows, the Avro and the metrics; a redelivery, a canary and a blocked model start nothing."""

from __future__ import annotations

import dataclasses
import io
import threading
import time

import fastavro
import httpx
import pandas as pd
import pytest

from mlpipe.messaging import events, topology
from mlpipe.messaging.push import make_envelope
from mlpipe.ml.config import PipelineConfig, parse_config
from mlpipe.ml.scoring_rows import KEY_COLUMN
from mlpipe.store import layout
from mlpipe.v1 import events_pb2
from mlpipe_ops.follow import EventWatcher
from mlpipe_ops.localstack import StackState
from mlpipe_ops.run_progress import SCORING_TOPICS, follow_run
from tests.conftest import REPO
from tests.integration.conftest import Cloud
from tests.integration.test_serving import Served, deploy, predictor, trained

pytestmark = pytest.mark.integration

MODEL = "bikeshare-net-change"
BATCH = "scoring-v1-20260615"  # version 1; the data ends on 2026-06-14
STATIONS = 8


@pytest.fixture
def bikeshare(cloud: Cloud) -> PipelineConfig:
    config = parse_config((REPO / "examples/bikeshare/pipeline.yaml").read_text())
    cloud.apply_config(config)
    return config


@pytest.fixture
def champion(cloud: Cloud, bikeshare: PipelineConfig) -> events_pb2.DeploymentCompleted:
    csv_text = (REPO / "examples/bikeshare/bikeshare.csv").read_text()
    return deploy(cloud, trained(cloud, bikeshare, csv_text), compile_onnx=False)


def deliver_batch(served: Served, request: events_pb2.BatchPredictionRequest) -> httpx.Response:
    """Deliver `request` as the batch subscription does until it is acknowledged."""
    subscription = f"projects/x/subscriptions/{topology.BATCH_PUSH}"
    deadline = time.monotonic() + 60
    while True:
        reply = httpx.post(
            f"{served.url}/pubsub/push",
            content=make_envelope(events.encode(request), subscription=subscription),
            timeout=60,
        )
        if reply.status_code != 503 or time.monotonic() > deadline:
            return reply
        time.sleep(0.2)


def test_a_new_champion_scores_every_station_for_the_next_days_once(
    cloud: Cloud, monkeypatch: pytest.MonkeyPatch, champion: events_pb2.DeploymentCompleted
) -> None:
    assert champion.deployed and events.rollout_action(champion) == "promote"
    cloud.watch(events.BATCH_PREDICTION_REQUESTS, events.BATCH_PREDICTIONS_COMPLETED)

    with predictor(cloud, monkeypatch) as served:
        first = served.push(champion)
        (request,) = cloud.pulled(events.BATCH_PREDICTION_REQUESTS)
        redelivered = served.push(champion)
        again = cloud.pulled(events.BATCH_PREDICTION_REQUESTS, expect=1, timeout=2, settle=1)
        scored = deliver_batch(served, request)
        (completed,) = cloud.pulled(events.BATCH_PREDICTIONS_COMPLETED)

    # The champion is served, and its scoring requested once, under a deterministic batch.
    assert first["status"] == "serving" and first["version"] == 1
    assert first["scoring"]["batch_id"] == BATCH and first["scoring"]["rows"] == 48 * STATIONS
    assert isinstance(request, events_pb2.BatchPredictionRequest)
    assert request.batch_id == BATCH and request.version == 1 and request.model_name == MODEL
    assert request.key_column == KEY_COLUMN
    assert request.context.run_id == champion.context.run_id
    assert request.input_uri == cloud.storage.uri(layout.scoring_input_path(MODEL, BATCH))
    assert redelivered["scoring"]["scoring"] == "already requested"
    assert again == []  # the redelivery published nothing
    recorded = cloud.storage.read(layout.scoring_request_path(MODEL, BATCH))
    assert recorded is not None
    assert events.from_json(events_pb2.BatchPredictionRequest, recorded.data) == request
    # The rows written first: every station at every hour of the next two days.
    found = cloud.storage.read(layout.scoring_input_path(MODEL, BATCH))
    assert found is not None
    rows = pd.read_csv(io.BytesIO(found.data))
    assert len(rows) == 48 * STATIONS and rows["station"].nunique() == STATIONS
    assert rows["timestamp"].min() == "2026-06-15T00:00:00Z"
    assert rows["timestamp"].max() == "2026-06-16T23:00:00Z"
    # The batch: Avro with a prediction per row, the metrics, BatchPredictionCompleted.
    assert scored.status_code == 200 and scored.json()["status"] == "succeeded", scored.text
    assert isinstance(completed, events_pb2.BatchPredictionCompleted)
    assert completed.batch_id == BATCH and completed.rows == 48 * STATIONS
    assert completed.scored_rows == 48 * STATIONS and completed.model_version == 1
    (uri,) = completed.output_uris
    assert f"predictions/{MODEL}/dt=" in uri and uri.endswith(f"/{BATCH}.avro")
    avro = cloud.storage.read(cloud.storage.path_of(uri))
    assert avro is not None
    records = list(fastavro.reader(io.BytesIO(avro.data)))
    assert {r["key"] for r in records} == set(rows[KEY_COLUMN])
    assert all(isinstance(r["prediction"], float) and r["error"] is None for r in records)
    metrics = cloud.storage.read_json(layout.batch_metrics_path(MODEL, BATCH))
    assert metrics["rows"] == 48 * STATIONS and metrics["model_version"] == 1


def test_a_canary_or_a_blocked_model_scores_nothing(
    cloud: Cloud, monkeypatch: pytest.MonkeyPatch, champion: events_pb2.DeploymentCompleted
) -> None:
    canary = events_pb2.DeploymentCompleted()
    canary.CopyFrom(champion)
    canary.model_alias = events.MODEL_ALIAS.of("canary")
    canary.rollout_action = events.ROLLOUT_ACTION.of("canary")
    blocked = events_pb2.DeploymentCompleted()
    blocked.CopyFrom(champion)
    blocked.deployed = False
    blocked.reason = "quality gates failed: rmse"
    cloud.watch(events.BATCH_PREDICTION_REQUESTS)

    with predictor(cloud, monkeypatch) as served:
        replies = [served.push(canary), served.push(blocked)]

    assert cloud.pulled(events.BATCH_PREDICTION_REQUESTS, timeout=2) == []
    assert all("scoring" not in reply for reply in replies), replies
    assert cloud.storage.list(f"predictions/{MODEL}/") == []


def test_a_champion_whose_rows_cannot_be_made_is_reported_and_kept(
    cloud: Cloud, monkeypatch: pytest.MonkeyPatch, champion: events_pb2.DeploymentCompleted
) -> None:
    cloud.storage.bucket.blob(cloud.storage.path_of(champion.dataset.uri)).delete()
    cloud.watch(events.PIPELINE_FAILURES)

    with predictor(cloud, monkeypatch) as served:
        reply = httpx.post(
            f"{served.url}/pubsub/push", content=make_envelope(events.encode(champion)), timeout=60
        )

    assert reply.status_code == 200 and reply.json()["status"] == "rejected", reply.text
    (failed,) = cloud.pulled(events.PIPELINE_FAILURES)
    assert isinstance(failed, events_pb2.PipelineFailed)
    assert failed.reason == "dataset_missing" and champion.dataset.uri in failed.message
    assert failed.context.run_id == champion.context.run_id
    assert cloud.storage.exists(cloud.storage.path_of(reply.json()["quarantine_uri"]))


def test_the_schedule_s_follower_prints_the_hops_then_the_predictions(
    cloud: Cloud,
    emulators: StackState,
    monkeypatch: pytest.MonkeyPatch,
    champion: events_pb2.DeploymentCompleted,
    capsys: pytest.CaptureFixture[str],
) -> None:
    landed = events_pb2.DatasetLanded(context=champion.context, dataset=champion.dataset)
    deployed = events_pb2.DeploymentCompleted()
    deployed.CopyFrom(champion)
    for event in (landed, deployed):
        event.context.request_id = "bikeshare-nightly-test"
    cloud.watch(events.BATCH_PREDICTION_REQUESTS)
    outcome: dict[str, int] = {}

    with predictor(cloud, monkeypatch) as served:
        state = dataclasses.replace(
            emulators,
            project=cloud.project,
            bucket=cloud.storage.bucket_name,
            service_ports={"predictor": int(served.url.rsplit(":", 1)[1])},
        )
        with EventWatcher(cloud.project, SCORING_TOPICS) as watcher:
            follower = threading.Thread(
                target=lambda: outcome.update(
                    code=follow_run(
                        state, watcher, "bikeshare-nightly-test", time.monotonic(), 90, scoring=True
                    )
                )
            )
            follower.start()
            cloud.publisher.publish(landed)
            cloud.publisher.publish(deployed)
            served.push(deployed)  # as predictor-push delivers it
            (request,) = cloud.pulled(events.BATCH_PREDICTION_REQUESTS)
            deliver_batch(served, request)
            follower.join(120)

    printed = capsys.readouterr().out
    assert outcome == {"code": 0}, printed
    assert f"ingest     landed {champion.dataset.uri}" in printed
    assert f"deployer   {MODEL} v1 is champion (was none)" in printed
    assert f"predictor  serving {MODEL} v1" in printed
    assert f"scored {48 * STATIONS} of {48 * STATIONS} rows (batch {BATCH}, in-process)" in printed
    avro = cloud.storage.uri(f"predictions/{MODEL}/dt=")
    assert f"predictions {avro}" in printed and f"/{BATCH}.avro" in printed
    metrics = cloud.storage.uri(layout.batch_metrics_path(MODEL, BATCH))
    assert f"metrics     {metrics}" in printed


def test_the_schedule_s_follower_says_a_blocked_model_scores_nothing(
    cloud: Cloud, emulators: StackState, capsys: pytest.CaptureFixture[str]
) -> None:
    context = events.context(
        producer="test", code_version="test", run_id="0123456789abcdef", pipeline="bikeshare"
    )
    context.request_id = "bikeshare-nightly-blocked"
    dataset = events_pb2.DatasetRef(uri=cloud.storage.uri("datasets/bikeshare/x.csv"))
    blocked = events_pb2.DeploymentCompleted(
        context=context,
        dataset=dataset,
        model_name=MODEL,
        deployed=False,
        reason="quality gates failed: min_r2: 0.7237 < 0.99",
    )
    state = dataclasses.replace(emulators, project=cloud.project)

    with EventWatcher(cloud.project, SCORING_TOPICS) as watcher:
        cloud.publisher.publish(events_pb2.DatasetLanded(context=context, dataset=dataset))
        cloud.publisher.publish(blocked)
        code = follow_run(
            state, watcher, "bikeshare-nightly-blocked", time.monotonic(), 60, scoring=True
        )

    printed = capsys.readouterr().out
    assert code == 1, printed
    assert "deployer   not deployed: quality gates failed: min_r2: 0.7237 < 0.99" in printed
    assert "no scoring: the model is not the champion" in printed
    assert "batch " not in printed
