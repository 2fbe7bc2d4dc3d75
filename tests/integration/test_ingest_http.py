"""ingest's HTTP route for callers that are not Pub/Sub (`POST /v1/ingest`), against the
emulators: the same landing as a push, idempotent on the request id, and bad input kept."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from mlpipe.messaging import events
from mlpipe.store import layout
from mlpipe.store.storage import sha256_hex
from mlpipe.v1 import events_pb2
from tests.integration.conftest import Cloud
from tests.integration.test_ingest import ingest  # noqa: F401  (the fixture)

pytestmark = pytest.mark.integration

BINARY = {"content-type": "application/x-protobuf"}


def iris_request(csv: str, request_id: str = "http-1") -> events_pb2.IngestRequest:
    request = events_pb2.IngestRequest(request_id=request_id, dataset="iris")
    request.inline.csv = csv
    return request


def test_a_json_request_lands_and_answers_the_run_to_follow(
    ingest: TestClient,  # noqa: F811
    cloud: Cloud,
    iris_csv: str,
) -> None:
    reply = ingest.post(
        "/v1/ingest",
        content=events.to_json(iris_request(iris_csv)),
        headers={"content-type": "application/json"},
    )

    assert reply.status_code == 200, reply.text
    body = reply.json()
    landed = cloud.pulled(events.DATASETS_LANDED, expect=1)[0]
    assert body["status"] == "landed" and body["request_id"] == "http-1"
    assert body["run_id"] == landed.context.run_id
    assert body["follow"] == f"mlpipe status {landed.context.run_id}"
    assert body["dataset_uri"] == landed.dataset.uri
    assert landed.context.request_id == "http-1"
    assert len(cloud.storage.list("datasets/iris/")) == 1


def test_the_same_request_again_gets_the_same_answer_and_lands_nothing_twice(
    ingest: TestClient,  # noqa: F811
    cloud: Cloud,
    iris_csv: str,
) -> None:
    request = iris_request(iris_csv, "http-again")
    first = ingest.post("/v1/ingest", content=events.encode(request), headers=BINARY)
    # The same request in the other encoding is the same request.
    again = ingest.post("/v1/ingest", content=events.to_json(request))

    assert first.status_code == again.status_code == 200
    assert again.json() == {**first.json(), "repeated": True}
    assert len(cloud.storage.list("datasets/iris/")) == 1
    record = cloud.storage.read_json(layout.direct_request_path("ingest", "http-again"))
    assert record["caller"] == "local" and record["reply"]["run_id"] == first.json()["run_id"]

    # The same request id with other content is refused, naming where the first is recorded.
    other = iris_request(iris_csv.replace("5.1", "5.2", 1), "http-again")
    reused = ingest.post("/v1/ingest", content=events.encode(other), headers=BINARY)
    assert reused.status_code == 409
    assert "http-again" in reused.json()["detail"]
    assert len(cloud.storage.list("datasets/iris/")) == 1


def test_a_request_without_an_id_is_idempotent_on_its_content(
    ingest: TestClient,  # noqa: F811
    iris_csv: str,
) -> None:
    request = iris_request(iris_csv, "")
    first = ingest.post("/v1/ingest", content=events.encode(request), headers=BINARY)
    again = ingest.post("/v1/ingest", content=events.encode(request), headers=BINARY)

    assert first.status_code == 200 and again.json()["repeated"] is True
    expected = sha256_hex(request.SerializeToString(deterministic=True))[:32]
    assert first.json()["request_id"] == again.json()["request_id"] == expected


def test_a_body_that_is_not_an_ingest_request_is_400_and_kept(
    ingest: TestClient,  # noqa: F811
    cloud: Cloud,
) -> None:
    sent = b'{"dataset": "iris", "no_such_field": 1}'
    reply = ingest.post("/v1/ingest", content=sent, headers={"content-type": "application/json"})

    assert reply.status_code == 400
    body = reply.json()
    assert body["error"] == "invalid_message" and "no_such_field" in body["detail"]
    kept = cloud.storage.read(cloud.storage.path_of(body["quarantine_uri"]))
    assert kept is not None and kept.data == sent


def test_a_rejected_request_is_422_with_its_reason_and_where_it_was_kept(
    ingest: TestClient,  # noqa: F811
    cloud: Cloud,
    iris_csv: str,
) -> None:
    no_target = "\n".join(line.rsplit(",", 1)[0] for line in iris_csv.splitlines())
    reply = ingest.post(
        "/v1/ingest", content=events.encode(iris_request(no_target, "http-bad")), headers=BINARY
    )

    assert reply.status_code == 422, reply.text
    body = reply.json()
    assert body["reason"] == "missing_column" and "species" in body["detail"]
    assert body["quarantine_uri"].startswith(cloud.storage.uri("quarantine/missing_column/"))
    failed = cloud.pulled(events.PIPELINE_FAILURES, expect=1)[0]
    assert failed.reason == "missing_column" and failed.quarantine_uri == body["quarantine_uri"]
    assert cloud.storage.list("datasets/iris/") == []
    # A final answer: the same request again gets it without failing twice.
    again = ingest.post(
        "/v1/ingest", content=events.encode(iris_request(no_target, "http-bad")), headers=BINARY
    )
    assert again.status_code == 422 and again.json()["repeated"] is True


def test_a_request_id_that_cannot_name_an_object_is_refused(
    ingest: TestClient,  # noqa: F811
    iris_csv: str,
) -> None:
    reply = ingest.post(
        "/v1/ingest", content=events.encode(iris_request(iris_csv, "../x")), headers=BINARY
    )
    assert reply.status_code == 400 and "request_id" in reply.json()["detail"]
