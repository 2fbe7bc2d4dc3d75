"""ingest against the emulators: landing, idempotency, and every kind of bad input."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from google.protobuf import struct_pb2

from mlpipe.messaging import events
from mlpipe.messaging.push import make_envelope
from mlpipe.ml.config import PipelineConfig
from mlpipe.v1 import events_pb2
from mlpipe_ingest.main import app
from tests.integration.conftest import Cloud

pytestmark = pytest.mark.integration


@pytest.fixture
def ingest(
    cloud: Cloud, iris_config: PipelineConfig, monkeypatch: pytest.MonkeyPatch
) -> TestClient:
    monkeypatch.setenv("MLPIPE_PROJECT", cloud.project)
    monkeypatch.setenv("MLPIPE_BUCKET", cloud.storage.bucket_name)
    monkeypatch.setenv("MLPIPE_MAX_INLINE_BYTES", "200000")
    cloud.apply_config(iris_config)
    cloud.watch(events.DATASETS_LANDED, events.PIPELINE_FAILURES)
    with TestClient(app) as client:
        yield client


def request_bytes(
    csv: str = "", records: list[dict] | None = None, request_id: str = "req-1"
) -> bytes:
    request = events_pb2.IngestRequest(request_id=request_id, dataset="iris")
    if records is not None:
        for record in records:
            s = struct_pb2.Struct()
            s.update(record)
            request.inline.records.append(s)
    else:
        request.inline.csv = csv
    return events.encode(request)


def test_inline_csv_lands_once_and_is_announced(
    ingest: TestClient, cloud: Cloud, iris_csv: str
) -> None:
    body = make_envelope(request_bytes(iris_csv), message_id="m1")

    first = ingest.post("/pubsub/push", content=body)
    second = ingest.post(
        "/pubsub/push", content=make_envelope(request_bytes(iris_csv), message_id="m2")
    )

    assert first.status_code == 200 and first.json()["status"] == "landed"
    assert second.status_code == 200 and second.json()["status"] == "duplicate"
    objects = cloud.storage.list("datasets/iris/")
    assert len(objects) == 1
    stored = cloud.storage.read(objects[0], with_metadata=True)
    assert stored is not None
    announced = cloud.pulled(events.DATASETS_LANDED, expect=2)
    assert [e.already_present for e in announced] == [False, True]
    assert stored.metadata["sha256"] == announced[0].dataset.sha256
    assert stored.metadata["row_count"] == "150"
    assert stored.data.decode().splitlines()[0] == (
        "sepal_length,sepal_width,petal_length,petal_width,species"
    )


def test_announcement_carries_run_and_dataset(
    ingest: TestClient, cloud: Cloud, iris_csv: str, iris_config: PipelineConfig
) -> None:
    from mlpipe.store.layout import run_id_for
    from mlpipe.store.storage import sha256_hex

    ingest.post("/pubsub/push", content=make_envelope(request_bytes(iris_csv)))

    landed = cloud.pulled(events.DATASETS_LANDED)
    assert len(landed) == 1
    event = landed[0]
    stored = cloud.storage.read(cloud.storage.path_of(event.dataset.uri))
    assert stored is not None
    assert event.dataset.sha256 == sha256_hex(stored.data)
    assert event.dataset.generation == stored.generation
    assert event.context.request_id == "req-1"
    assert event.context.run_id == run_id_for(event.dataset.sha256, iris_config.sha256())
    assert event.dataset.row_count == 150 and not event.already_present


def test_json_encoded_records_are_accepted(ingest: TestClient, cloud: Cloud) -> None:
    rows = [
        {
            "sepal_length": 5.0 + i / 10,
            "sepal_width": 3.0,
            "petal_length": 1.5,
            "petal_width": 0.2,
            "species": "setosa" if i % 2 else "virginica",
        }
        for i in range(40)
    ]
    request = {"requestId": "json-1", "dataset": "iris", "inline": {"records": rows}}

    reply = ingest.post("/pubsub/push", content=make_envelope(json.dumps(request).encode()))

    assert reply.status_code == 200, reply.text
    assert reply.json()["status"] == "landed"
    landed = cloud.pulled(events.DATASETS_LANDED)
    assert landed[0].dataset.row_count == 40


BAD_CSV_LINE = "sepal_length,sepal_width,petal_length,petal_width,species\n1,2,3,4,setosa\n1,2\n"
NO_TARGET = "sepal_length,sepal_width,petal_length,petal_width\n" + "1,2,3,4\n" * 40


@pytest.mark.parametrize(
    ("name", "data", "reason", "in_message", "request_id"),
    [
        # Undecodable requests are traced by the request_id attribute, the rest by their own.
        ("not a proto", b"\x08\x96\x01\xff\xff\xff", "invalid_message", "IngestRequest", "bad-1"),
        ("bad JSON", b'{"dataset": "iris", "nope": 1}', "invalid_message", "nope", "bad-1"),
        ("malformed CSV", request_bytes(BAD_CSV_LINE), "malformed_csv", "line 3", "bad-1"),
        ("missing target", request_bytes(NO_TARGET), "missing_column", "species", "req-1"),
        ("header only", request_bytes("a,b\n"), "header_only", "no rows", "bad-1"),
        ("too large", request_bytes("x" * 300_000), "payload_too_large", "gs://", "bad-1"),
    ],
)
def test_bad_requests_are_acknowledged_reported_and_kept(
    ingest: TestClient,
    cloud: Cloud,
    name: str,
    data: bytes,
    reason: str,
    in_message: str,
    request_id: str,
) -> None:
    body = make_envelope(data, attributes={"request_id": "bad-1"}, message_id=f"bad-{reason}")

    reply = ingest.post("/pubsub/push", content=body)

    # Acknowledged (2xx) so Pub/Sub does not redeliver what can never succeed.
    assert reply.status_code == 200, name
    assert reply.json()["status"] == "rejected"
    assert reply.json()["reason"] == reason
    failed = cloud.pulled(events.PIPELINE_FAILURES)
    assert [f.reason for f in failed] == [reason]
    assert in_message in failed[0].message
    assert failed[0].context.request_id == request_id
    kept = cloud.storage.read(cloud.storage.path_of(failed[0].quarantine_uri))
    assert kept is not None and kept.data == body
    assert cloud.storage.list("datasets/") == []


def test_unknown_pipeline_is_rejected_with_the_config_path(
    ingest: TestClient, cloud: Cloud
) -> None:
    request = events_pb2.IngestRequest(
        request_id="r", dataset="nosuch", inline=events_pb2.InlineRows(csv="a\n1\n")
    )

    reply = ingest.post("/pubsub/push", content=make_envelope(events.encode(request)))

    assert reply.json()["reason"] == "unknown_pipeline"
    assert "pipelines/nosuch/config.yaml" in reply.json()["detail"]


def test_a_body_that_is_not_an_envelope_gets_400_and_is_kept(
    ingest: TestClient, cloud: Cloud
) -> None:
    reply = ingest.post("/pubsub/push", content=b"hello, not pubsub")

    assert reply.status_code == 400
    assert reply.json()["error"] == "invalid_envelope"
    kept = cloud.storage.read(cloud.storage.path_of(reply.json()["quarantine_uri"]))
    assert kept is not None and kept.data == b"hello, not pubsub"
    assert [f.reason for f in cloud.pulled(events.PIPELINE_FAILURES)] == ["invalid_envelope"]


def test_read_reports_the_generation_it_read(cloud: Cloud) -> None:
    first = cloud.storage.write("x/obj", b"one")
    second = cloud.storage.write("x/obj", b"two")

    live = cloud.storage.read("x/obj")
    pinned = cloud.storage.read("x/obj", generation=second)
    replaced = cloud.storage.read("x/obj", generation=first)

    assert live is not None and live.generation == second and live.data == b"two"
    assert pinned is not None and pinned.data == b"two"
    # Without object versioning (GCS's default) a replaced generation is gone: a run pinned
    # to it reports dataset_missing rather than reading other bytes.
    assert replaced is None
