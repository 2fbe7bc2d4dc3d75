"""ingest's gcs source and schema validation against the emulators: CSV, Parquet and JSON
lines from an allowed bucket land; other buckets, unsafe names and rows that break the
pipeline's schema (types, nulls, duplicate keys) are reported and kept."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from mlpipe.messaging import events
from mlpipe.messaging.push import make_envelope
from mlpipe.ml.config import PipelineConfig, parse_config
from mlpipe.store.storage import Storage
from mlpipe.v1 import events_pb2
from mlpipe_ingest.main import app
from tests.conftest import unique
from tests.integration.conftest import Cloud

pytestmark = pytest.mark.integration

STATIONS = """\
name: stations
dataset:
  target: temp
  features: [hour, humidity, site]
  columns: {site: categorical, observed: datetime}
  key: [site, observed]
  required_non_null: [humidity]
  min_rows: 3
model:
  name: stations-temp
  task: regression
  estimator: sklearn.linear_model.Ridge
"""
HEADER = "site,observed,hour,humidity,temp"


def rows(n: int) -> list[str]:
    return [f"s{i % 3},2026-06-01T{i:02d}:00:00Z,{i},{50 + i},{10 + i / 2}" for i in range(n)]


@pytest.fixture
def stations() -> PipelineConfig:
    return parse_config(STATIONS)


@pytest.fixture
def raw(cloud: Cloud) -> Storage:
    """A bucket of raw files that ingest is allowed to read."""
    bucket = cloud.storage.client.create_bucket(unique("raw"))
    return Storage(cloud.storage.client, bucket.name)


@pytest.fixture
def ingest(
    cloud: Cloud, raw: Storage, stations: PipelineConfig, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TestClient]:
    monkeypatch.setenv("MLPIPE_PROJECT", cloud.project)
    monkeypatch.setenv("MLPIPE_BUCKET", cloud.storage.bucket_name)
    monkeypatch.setenv("MLPIPE_SOURCE_BUCKETS", json.dumps([raw.bucket_name]))
    cloud.apply_config(stations)
    cloud.watch(events.DATASETS_LANDED, events.PIPELINE_FAILURES)
    with TestClient(app) as client:
        yield client


def gcs_request(uri: str, fmt: str = "") -> bytes:
    request = events_pb2.IngestRequest(request_id="gcs-1", dataset="stations")
    request.gcs.uri = uri
    request.gcs.format = fmt
    return events.encode(request)


def push(client: TestClient, data: bytes, message_id: str = "m1") -> dict:
    return client.post("/pubsub/push", content=make_envelope(data, message_id=message_id)).json()


def parquet_bytes(n: int) -> bytes:
    cells = [r.split(",") for r in rows(n)]
    table = pa.table(
        {
            "site": [c[0] for c in cells],
            "observed": [c[1] for c in cells],
            "hour": [int(c[2]) for c in cells],
            "humidity": [float(c[3]) for c in cells],
            "temp": [float(c[4]) for c in cells],
        }
    )
    out = io.BytesIO()
    pq.write_table(table, out)
    return out.getvalue()


def jsonl_bytes(n: int) -> bytes:
    names = HEADER.split(",")
    return "\n".join(
        json.dumps(dict(zip(names, r.split(","), strict=True))) for r in rows(n)
    ).encode()


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("in/a.csv", ("\n".join([HEADER, *rows(12)]) + "\n").encode()),
        ("in/a.parquet", parquet_bytes(12)),
        ("in/a.jsonl", jsonl_bytes(12)),
    ],
)
def test_an_object_from_an_allowed_bucket_lands_with_its_schema(
    ingest: TestClient, cloud: Cloud, raw: Storage, name: str, data: bytes
) -> None:
    raw.write(name, data)

    reply = push(ingest, gcs_request(raw.uri(name)))

    assert reply["status"] == "landed", reply
    landed = cloud.pulled(events.DATASETS_LANDED)
    assert landed[0].dataset.row_count == 12
    stored = cloud.storage.read(cloud.storage.path_of(landed[0].dataset.uri), with_metadata=True)
    assert stored is not None
    assert stored.metadata["source"] == raw.uri(name)
    assert stored.metadata["schema"] == (
        "site:categorical,observed:datetime,hour:numeric,humidity:numeric,temp:numeric"
    )


def with_row(row: str) -> bytes:
    return ("\n".join([HEADER, *rows(6), row]) + "\n").encode()


@pytest.mark.parametrize(
    ("data", "reason", "in_message"),
    [
        (with_row("s9,2026-06-02T00:00:00Z,3,abc,12"), "wrong_type", "'humidity'"),
        (with_row("s9,yesterday,3,50,12"), "wrong_type", "'observed'"),
        (with_row("s9,2026-06-02T00:00:00Z,3,,12"), "null_value", "humidity"),
        (with_row("s9,2026-06-02T00:00:00Z,3,50,"), "null_target", "temp"),
        (with_row("s0,2026-06-01T00:00:00Z,3,50,12"), "duplicate_key", "data rows [7]"),
        (("\n".join([HEADER, *rows(2)]) + "\n").encode(), "row_count", "3..10000000"),
        (b"site,hour\ns1,2\ns2,3\ns3,4\n", "missing_column", "temp"),
        (HEADER.encode() + b"\n", "header_only", "no rows"),
        (b"", "empty_dataset", "is empty"),
        (b"\xff\xfe\x00a", "not_utf8", "UTF-8"),
    ],
)
def test_rows_that_break_the_schema_are_rejected_before_landing(
    ingest: TestClient, cloud: Cloud, raw: Storage, data: bytes, reason: str, in_message: str
) -> None:
    raw.write("in/bad.csv", data)

    reply = push(ingest, gcs_request(raw.uri("in/bad.csv")), message_id=f"bad-{reason}")

    assert reply["status"] == "rejected" and reply["reason"] == reason, reply
    failed = cloud.pulled(events.PIPELINE_FAILURES)
    assert [f.reason for f in failed] == [reason]
    assert in_message in failed[0].message and raw.uri("in/bad.csv") in failed[0].message
    assert cloud.storage.read(cloud.storage.path_of(failed[0].quarantine_uri)) is not None
    assert cloud.storage.list("datasets/") == []


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("gs://someone-elses-bucket/x.csv", "bucket_not_allowed"),
        ("gs://{raw}/in/../secret.csv", "bad_object_name"),
        ("gs://{raw}/in/a\x01.csv", "bad_object_name"),
        ("gs://{raw}/in/nothing-here.csv", "unreachable"),
        ("not-a-uri", "bad_object_name"),
    ],
)
def test_objects_ingest_may_not_read_are_rejected(
    ingest: TestClient, cloud: Cloud, raw: Storage, uri: str, reason: str
) -> None:
    reply = push(ingest, gcs_request(uri.format(raw=raw.bucket_name)))

    assert reply["reason"] == reason, reply
    assert [f.reason for f in cloud.pulled(events.PIPELINE_FAILURES)] == [reason]
