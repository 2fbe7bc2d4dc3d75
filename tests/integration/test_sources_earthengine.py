"""The earth_engine source end to end: the ingest service drives the real earthengine-api
client against the local Earth Engine (mlpipe_ops.standins.earthengine), which writes its CSV
into the GCS emulator; the exports check lands it, or fails it with the request kept."""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from mlpipe.messaging import events
from mlpipe.messaging.push import make_envelope
from mlpipe.ml.config import PipelineConfig, parse_config
from mlpipe.store import layout
from mlpipe.v1 import events_pb2
from mlpipe_ops.standins.earthengine import (
    SYNTHETIC_FIELDS,
    SYNTHETIC_S2,
    EarthEngineStandIn,
)
from tests.conftest import REPO
from tests.integration.conftest import Cloud

pytestmark = pytest.mark.integration

REGION = {
    "type": "Polygon",
    "coordinates": [[[4.0, 50.0], [6.0, 50.0], [6.0, 53.0], [4.0, 53.0], [4.0, 50.0]]],
}
BANDS = ["B2", "B3", "B4", "B8", "B11", "B12"]


@pytest.fixture
def crops() -> PipelineConfig:
    return parse_config((REPO / "examples/crops/pipeline.yaml").read_text())


@pytest.fixture
def standin(emulators: Any) -> Iterator[EarthEngineStandIn]:
    with EarthEngineStandIn(
        storage_emulator_host=os.environ["STORAGE_EMULATOR_HOST"], export_seconds=0.2
    ) as s:
        yield s


@pytest.fixture
def env(
    cloud: Cloud,
    standin: EarthEngineStandIn,
    crops: PipelineConfig,
    monkeypatch: pytest.MonkeyPatch,
) -> Cloud:
    monkeypatch.setenv("MLPIPE_PROJECT", cloud.project)
    monkeypatch.setenv("MLPIPE_BUCKET", cloud.storage.bucket_name)
    monkeypatch.setenv("MLPIPE_EARTHENGINE_URL", standin.url)
    monkeypatch.setenv("MLPIPE_EARTHENGINE_MAX_RETRIES", "0")
    monkeypatch.setenv("MLPIPE_EXPORT_BACKOFF_SECONDS", "0.2")
    cloud.apply_config(crops)
    cloud.watch(events.DATASETS_LANDED, events.PIPELINE_FAILURES)
    return cloud


@pytest.fixture
def ingest(env: Cloud) -> Iterator[TestClient]:
    from mlpipe_ingest.main import app

    with TestClient(app) as client:
        yield client


def request(request_id: str = "ee-1", **change: Any) -> events_pb2.IngestRequest:
    source = events_pb2.EarthEngineSource(
        image_collection=SYNTHETIC_S2,
        bands=BANDS,
        start_date="2026-04-01",
        end_date="2026-10-01",
        reducer=events_pb2.EARTH_ENGINE_REDUCER_MEDIAN,
        scale=10,
        region_geojson=json.dumps(REGION),
        samples_asset=SYNTHETIC_FIELDS,
        class_property="crop",
        properties=["field_id", "region"],
    )
    for key, value in change.items():
        if isinstance(value, list):
            del getattr(source, key)[:]
            getattr(source, key).extend(value)
        else:
            setattr(source, key, value)
    return events_pb2.IngestRequest(request_id=request_id, dataset="crops", earth_engine=source)


def push(client: TestClient, req: events_pb2.IngestRequest, message_id: str = "m1") -> Any:
    reply = client.post(
        "/pubsub/push", content=make_envelope(events.encode(req), message_id=message_id)
    )
    return reply


def check_until_finished(client: TestClient, timeout: float = 10.0) -> list[dict[str, Any]]:
    """POST /v1/exports:check (as Cloud Scheduler does) until no export is open."""
    deadline = time.monotonic() + timeout
    while True:
        reply = client.post("/v1/exports:check")
        assert reply.status_code == 200, reply.text
        checked = reply.json()["exports"]
        if all(c["state"] != "exporting" for c in checked) or time.monotonic() > deadline:
            return checked
        time.sleep(0.1)


def datasets(cloud: Cloud) -> list[str]:
    return cloud.storage.list(layout.dataset_prefix("crops"))


def test_an_export_lands_as_a_dataset(ingest: TestClient, env: Cloud) -> None:
    reply = push(ingest, request())

    assert reply.status_code == 200, reply.text
    assert reply.json()["status"] == "exporting"
    assert datasets(env) == []  # nothing landed inside the push
    checked = check_until_finished(ingest)

    assert [c["state"] for c in checked] == ["landed"]
    landed = env.pulled(events.DATASETS_LANDED)
    assert len(landed) == 1
    assert landed[0].dataset.row_count == 1200
    assert list(landed[0].columns) == ["field_id", "region", "crop", *BANDS]
    stored = env.storage.read(env.storage.path_of(landed[0].dataset.uri), with_metadata=True)
    assert stored is not None
    assert stored.metadata["source"].startswith(f"gs://{env.storage.bucket_name}/ingest/exports/")
    header, first = stored.data.decode().splitlines()[:2]
    assert header == "field_id,region,crop," + ",".join(BANDS)
    assert first.split(",")[2] in {"corn", "wheat", "soy", "barley"}
    assert env.pulled(events.PIPELINE_FAILURES, expect=0, settle=0.2) == []


def test_a_redelivery_during_the_export_starts_nothing(
    ingest: TestClient, env: Cloud, standin: EarthEngineStandIn
) -> None:
    standin.fail_next("never_finish")
    first = push(ingest, request(), message_id="m1").json()
    again = push(ingest, request(), message_id="m1").json()

    assert first["status"] == again["status"] == "exporting"
    assert again["job"] == first["job"]
    assert [m for m, p in standin.requests if p.endswith("table:export")] == ["POST"]
    assert len(standin.operations()) == 1


def test_a_restart_during_the_export_keeps_the_record_and_the_check_finishes_it(
    env: Cloud, standin: EarthEngineStandIn
) -> None:
    from mlpipe_ingest.main import app

    with TestClient(app) as first:
        assert push(first, request()).json()["status"] == "exporting"
    # The service went away while Earth Engine ran the export; a new instance checks it.
    with TestClient(app) as second:
        checked = check_until_finished(second)

    assert [c["state"] for c in checked] == ["landed"]
    assert len(env.pulled(events.DATASETS_LANDED)) == 1
    assert len(standin.operations()) == 1


def test_a_redelivery_after_landing_republishes_the_landing(ingest: TestClient, env: Cloud) -> None:
    push(ingest, request())
    check_until_finished(ingest)
    first = env.pulled(events.DATASETS_LANDED)

    reply = push(ingest, request(), message_id="m2").json()

    assert reply["status"] == "duplicate"
    again = env.pulled(events.DATASETS_LANDED)
    assert [e.dataset.uri for e in again] == [first[0].dataset.uri]
    assert len(datasets(env)) == 1


def failed_with(env: Cloud, reason: str) -> events_pb2.PipelineFailed:
    failed = env.pulled(events.PIPELINE_FAILURES)
    assert [f.reason for f in failed] == [reason], [(f.reason, f.message) for f in failed]
    quarantined = env.storage.read(env.storage.path_of(failed[0].quarantine_uri))
    assert quarantined is not None
    # The push body is kept whole, as for any rejected push.
    data = base64.b64decode(json.loads(quarantined.data)["message"]["data"])
    kept = events.decode(events_pb2.IngestRequest, data)
    assert kept.earth_engine.class_property == "crop"
    assert datasets(env) == []
    return failed[0]


@pytest.mark.parametrize(
    ("change", "reason", "named"),
    [
        ({"image_collection": "NO/SUCH/COLLECTION"}, "unknown_asset", "NO/SUCH/COLLECTION"),
        ({"samples_asset": "projects/x/assets/none"}, "unknown_asset", "projects/x/assets/none"),
        ({"bands": ["B4", "B99"]}, "unknown_band", "B99"),
        ({"start_date": "2030-01-01", "end_date": "2030-02-01"}, "empty_composite", "empty"),
    ],
)
def test_an_export_that_earth_engine_fails_is_reported_and_kept(
    ingest: TestClient, env: Cloud, change: dict[str, Any], reason: str, named: str
) -> None:
    assert push(ingest, request(**change)).json()["status"] == "exporting"

    checked = check_until_finished(ingest)

    assert [c["state"] for c in checked] == ["failed"]
    failed = failed_with(env, reason)
    assert named in failed.message


def test_a_region_without_pixels_is_an_empty_sample(ingest: TestClient, env: Cloud) -> None:
    elsewhere = {
        "type": "Polygon",
        "coordinates": [[[10.0, 40.0], [11.0, 40.0], [11.0, 41.0], [10.0, 41.0], [10.0, 40.0]]],
    }
    push(ingest, request(region_geojson=json.dumps(elsewhere)))

    check_until_finished(ingest)

    failed = failed_with(env, "empty_sample")
    assert "no sample point" in failed.message


def test_a_bad_request_is_refused_before_anything_starts(
    ingest: TestClient, env: Cloud, standin: EarthEngineStandIn
) -> None:
    reply = push(ingest, request(scale=0, region_geojson="{"))

    assert reply.status_code == 200
    assert reply.json()["status"] == "rejected"
    failed = failed_with(env, "invalid_export")
    assert "scale" in failed.message and "region_geojson" in failed.message
    assert not [p for _, p in standin.requests if p.endswith("table:export")]


@pytest.mark.parametrize(
    ("mode", "reason"), [("export_failed", "export_failed"), ("cancelled", "export_cancelled")]
)
def test_a_failed_or_cancelled_export_is_reported_and_kept(
    ingest: TestClient, env: Cloud, standin: EarthEngineStandIn, mode: str, reason: str
) -> None:
    standin.fail_next("export_failed" if mode == "export_failed" else "never_finish")
    reply = push(ingest, request()).json()
    if mode == "cancelled":
        # Someone cancels the task in Earth Engine (the Code Editor's task list, say).
        standin.cancel_operation(reply["job"]["operation"])

    check_until_finished(ingest)

    failed = failed_with(env, reason)
    assert reply["job"]["operation"] in failed.message


def test_a_quota_error_is_retried_not_failed(
    ingest: TestClient, env: Cloud, standin: EarthEngineStandIn
) -> None:
    standin.fail_next("quota", 1)
    standin.fail_next("quota_on_poll", 2)

    refused = push(ingest, request())
    assert refused.status_code == 503  # Pub/Sub redelivers with its own backoff
    accepted = push(ingest, request())
    assert accepted.json()["status"] == "exporting"
    checked = [ingest.post("/v1/exports:check").json()["exports"][0]]
    assert checked[0]["transient"] is True
    waiting = ingest.post("/v1/exports:check").json()["exports"][0]
    assert "waiting_until" in waiting  # backing off: no call to Earth Engine this time

    final = check_until_finished(ingest)

    assert [c["state"] for c in final] == ["landed"]
    assert len(env.pulled(events.DATASETS_LANDED)) == 1
    assert env.pulled(events.PIPELINE_FAILURES, expect=0, settle=0.2) == []


def test_an_export_that_never_finishes_fails_at_its_time_limit(
    ingest: TestClient, env: Cloud, standin: EarthEngineStandIn
) -> None:
    standin.fail_next("never_finish")
    reply = push(ingest, request(time_limit_seconds=0.5)).json()

    check_until_finished(ingest, timeout=5)

    failed = failed_with(env, "export_timeout")
    assert "did not finish" in failed.message and reply["job"]["operation"] in failed.message
    states = {o["name"]: o["metadata"]["state"] for o in standin.operations()}
    assert states[reply["job"]["operation"]] == "CANCELLED"


def test_ingest_checks_its_exports_itself_on_a_timer(
    env: Cloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local stack has no Cloud Scheduler: MLPIPE_EXPORT_CHECK_SECONDS lands the export."""
    monkeypatch.setenv("MLPIPE_EXPORT_CHECK_SECONDS", "0.2")
    from mlpipe_ingest.main import app

    with TestClient(app) as client:
        assert push(client, request()).json()["status"] == "exporting"
        landed = env.pulled(events.DATASETS_LANDED, timeout=10)

    assert [e.dataset.row_count for e in landed] == [1200]


def test_a_request_for_an_unknown_pipeline_starts_nothing(
    ingest: TestClient, env: Cloud, standin: EarthEngineStandIn
) -> None:
    req = request()
    req.dataset = "no-such-pipeline"

    reply = push(ingest, req)

    assert reply.json()["status"] == "rejected"
    failed = env.pulled(events.PIPELINE_FAILURES)
    assert [f.reason for f in failed] == ["unknown_pipeline"]
    assert not [p for _, p in standin.requests if p.endswith("table:export")]


def test_an_export_being_finished_by_another_check_is_left_to_it_until_its_lease_ends(
    ingest: TestClient, env: Cloud, standin: EarthEngineStandIn
) -> None:
    export_id = push(ingest, request()).json()["export_id"]
    standin.wait_all()
    path = layout.export_record_path(export_id)
    record = env.storage.read_json(path)
    record["finishing_until"] = "2999-01-01T00:00:00+00:00"  # another instance is landing it
    env.storage.write_json(path, record)

    held = ingest.post("/v1/exports:check").json()["exports"]
    record["finishing_until"] = "2000-01-01T00:00:00+00:00"  # ... and died doing so
    env.storage.write_json(path, record)
    finished = check_until_finished(ingest)

    assert held == [
        {
            "export_id": export_id,
            "kind": "earth_engine",
            "state": "exporting",
            "detail": "being finished by another check",
        }
    ]
    assert [c["state"] for c in finished] == ["landed"]
    assert len(env.pulled(events.DATASETS_LANDED)) == 1


def test_a_quota_that_outlasts_the_delivery_budget_is_reported(
    ingest: TestClient, env: Cloud, standin: EarthEngineStandIn
) -> None:
    standin.fail_next("quota", 2)
    envelope = json.loads(make_envelope(events.encode(request()), message_id="m1"))

    for attempt, status in ((4, 503), (5, 200)):
        envelope["deliveryAttempt"] = attempt
        reply = ingest.post("/pubsub/push", content=json.dumps(envelope).encode())
        assert reply.status_code == status, reply.text

    failed = failed_with(env, "export_not_started")
    assert "delivery 5" in failed.message and "Too many tasks" in failed.message
    assert standin.operations() == []
