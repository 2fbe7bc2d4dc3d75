"""Large landings on the emulators: a `gcs` source over MLPIPE_INGEST_BEAM_MIN_BYTES (one byte
here, so small files take that path) is validated by the Beam job (mlpipe_batch.validate), run
as a local process or by the local Dataflow (mlpipe_ops.standins.dataflow), and landed by a
server-side copy; the push only starts it, the exports check finishes it."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from mlpipe.messaging import events
from mlpipe.messaging.push import make_envelope
from mlpipe.messaging.validation_jobs import ValidationSpec
from mlpipe.ml.config import PipelineConfig, parse_config
from mlpipe.store import layout
from mlpipe.store.storage import Storage
from mlpipe.v1 import events_pb2
from mlpipe_ingest.large_landing import validation_job_name
from mlpipe_ingest.main import app
from mlpipe_ops.standins.dataflow import DataflowStandIn, template_spec
from tests.conftest import REPO, unique, wait_until
from tests.integration.conftest import Cloud, job_started, notification

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
TEMPLATE = "templates/batch.json"


def rows(n: int) -> list[str]:
    return [
        f"s{i % 3},2026-06-{1 + i // 24:02d}T{i % 24:02d}:00:00Z,{i},{50 + i},{i / 2}"
        for i in range(n)
    ]


def csv_of(lines: list[str]) -> bytes:
    return ("\n".join([HEADER, *lines]) + "\n").encode()


@pytest.fixture
def raw(cloud: Cloud) -> Storage:
    bucket = cloud.storage.client.create_bucket(unique("raw"))
    return Storage(cloud.storage.client, bucket.name)


def settings_env(cloud: Cloud, raw: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLPIPE_PROJECT", cloud.project)
    monkeypatch.setenv("MLPIPE_BUCKET", cloud.storage.bucket_name)
    monkeypatch.setenv("MLPIPE_SOURCE_BUCKETS", json.dumps([raw.bucket_name]))
    monkeypatch.setenv("MLPIPE_INGEST_BEAM_MIN_BYTES", "1")
    monkeypatch.setenv("MLPIPE_VALIDATION_CHUNK_ROWS", "5")  # several parts per file
    monkeypatch.setenv("MLPIPE_VALIDATION_LOCAL_MODE", "in_memory")


@pytest.fixture
def ingest(cloud: Cloud, raw: Storage, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    settings_env(cloud, raw, monkeypatch)
    cloud.apply_config(parse_config(STATIONS))
    cloud.watch(events.DATASETS_LANDED, events.PIPELINE_FAILURES)
    with TestClient(app) as client:
        yield client


def gcs_request(uri: str, request_id: str = "big-1", dataset: str = "stations") -> bytes:
    request = events_pb2.IngestRequest(request_id=request_id, dataset=dataset)
    request.gcs.uri = uri
    return events.encode(request)


def push(client: TestClient, data: bytes, message_id: str = "m1") -> dict:
    reply = client.post("/pubsub/push", content=make_envelope(data, message_id=message_id))
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


def checked_until_done(client: TestClient, timeout: float = 120) -> dict:
    """POST /v1/exports:check until the one export is no longer running."""

    def finished() -> dict | None:
        (export,) = client.post("/v1/exports:check").json()["exports"]
        return export if export["state"] != "exporting" else None

    return dict(wait_until(finished, timeout, "the validation job's verdict"))


def test_a_valid_large_landing_is_copied_by_content_and_trains(
    cloud: Cloud,
    raw: Storage,
    monkeypatch: pytest.MonkeyPatch,
    iris_config: PipelineConfig,
    iris_csv: str,
    services: dict[str, TestClient],
) -> None:
    settings_env(cloud, raw, monkeypatch)
    cloud.apply_config(iris_config)
    cloud.watch(events.DATASETS_LANDED)  # the services watch the failures
    data = iris_csv.encode()
    raw.write("big/iris.csv", data)

    with TestClient(app) as ingest:
        started = push(ingest, gcs_request(raw.uri("big/iris.csv"), dataset=iris_config.name))
        done = checked_until_done(ingest)

    assert started["status"] == "exporting", started
    assert done["state"] == "landed", done
    (landed,) = cloud.pulled(events.DATASETS_LANDED)
    sha = hashlib.sha256(data).hexdigest()
    assert landed.dataset.sha256 == sha and landed.dataset.row_count == 150
    path = cloud.storage.path_of(landed.dataset.uri)
    assert path.startswith(f"datasets/{iris_config.name}/dt=") and path.endswith(f"/{sha[:16]}.csv")
    stored = cloud.storage.read(path, with_metadata=True)
    assert stored is not None and stored.data == data  # the bytes as they were, copied
    assert stored.metadata["source"] == raw.uri("big/iris.csv")
    assert stored.metadata["row_count"] == "150"
    assert landed.context.run_id == layout.run_id_for(sha, iris_config.sha256())
    reply = services["trainer"].post(
        "/pubsub/push",
        content=notification(cloud, path, stored.generation, metadata=stored.metadata),
    )
    assert job_started(reply), reply.text


def test_a_bad_row_fails_the_landing_naming_the_file_and_the_row(
    ingest: TestClient, cloud: Cloud, raw: Storage
) -> None:
    lines = rows(20)
    lines[12] = "s0,2026-06-09T01:00:00Z,12,humid,6.0"  # data row 13, in the third part
    raw.write("big/stations.csv", csv_of(lines))
    uri = raw.uri("big/stations.csv")

    push(ingest, gcs_request(uri))
    done = checked_until_done(ingest)

    assert done["state"] == "failed" and done["reason"] == "wrong_type", done
    (failed,) = cloud.pulled(events.PIPELINE_FAILURES)
    assert failed.reason == "wrong_type"
    assert uri in failed.message and "first bad data row 13" in failed.message
    assert "'humid'" in failed.message and "'humidity'" in failed.message
    assert failed.quarantine_uri and cloud.storage.exists(
        cloud.storage.path_of(failed.quarantine_uri)
    )
    assert raw.read("big/stations.csv") is not None  # the input stays where it was
    assert cloud.storage.list(layout.dataset_prefix("stations")) == []
    assert cloud.pulled(events.DATASETS_LANDED, expect=0, timeout=0.5) == []


def test_a_key_repeated_across_parts_fails_on_its_second_row(
    ingest: TestClient, cloud: Cloud, raw: Storage
) -> None:
    lines = rows(20)
    lines[17] = lines[2]  # data row 18 repeats data row 3's key, two parts later
    raw.write("big/repeated.csv", csv_of(lines))

    push(ingest, gcs_request(raw.uri("big/repeated.csv")))
    done = checked_until_done(ingest)

    assert done["state"] == "failed" and done["reason"] == "duplicate_key", done
    (failed,) = cloud.pulled(events.PIPELINE_FAILURES)
    assert "first bad data row 18" in failed.message and "[3, 18]" in failed.message


@pytest.fixture
def dataflow(cloud: Cloud, tmp_path) -> Iterator[DataflowStandIn]:
    metadata = json.loads((REPO / "jobs/batch/metadata.json").read_text())
    spec = template_spec("us-docker.pkg.dev/p/mlpipe/batch:test", metadata)
    cloud.storage.write(TEMPLATE, json.dumps(spec).encode())
    stand_in = DataflowStandIn(cloud.project, env=dict(os.environ), log_dir=tmp_path).start()
    yield stand_in
    stand_in.stop()


def test_redeliveries_of_a_large_landing_start_one_dataflow_job(
    cloud: Cloud,
    raw: Storage,
    monkeypatch: pytest.MonkeyPatch,
    dataflow: DataflowStandIn,
) -> None:
    settings_env(cloud, raw, monkeypatch)
    bucket = cloud.storage.bucket_name
    monkeypatch.setenv("MLPIPE_VALIDATION_LAUNCHER", "dataflow")
    monkeypatch.setenv("MLPIPE_REGION", "us-central1")
    monkeypatch.setenv("MLPIPE_VALIDATION_DATAFLOW_TEMPLATE", f"gs://{bucket}/{TEMPLATE}")
    monkeypatch.setenv("MLPIPE_VALIDATION_DATAFLOW_TEMP_LOCATION", f"gs://{bucket}/dataflow/temp")
    monkeypatch.setenv("MLPIPE_VALIDATION_DATAFLOW_ENDPOINT", dataflow.url)
    cloud.apply_config(parse_config(STATIONS))
    cloud.watch(events.DATASETS_LANDED, events.PIPELINE_FAILURES)
    raw.write("big/stations.csv", csv_of(rows(30)))
    body = gcs_request(raw.uri("big/stations.csv"))

    with TestClient(app) as ingest:
        with ThreadPoolExecutor(3) as pool:
            first = list(
                pool.map(
                    lambda n: ingest.post(
                        "/pubsub/push", content=make_envelope(body, message_id=f"m{n}")
                    ),
                    range(3),
                )
            )
        again = [push(ingest, body, message_id=f"r{n}") for n in range(2)]
        done = checked_until_done(ingest)
        after = push(ingest, body, message_id="late")

    # A delivery racing the one launching is answered 503 (Pub/Sub redelivers it); none
    # starts a second job.
    assert sorted(r.status_code for r in first)[0] == 200
    assert {r.json()["status"] for r in first if r.status_code == 200} == {"exporting"}
    assert [r["status"] for r in again] == ["exporting", "exporting"]
    (job,) = dataflow.jobs()
    launches = [b for _, path, b in dataflow.seen if path.endswith(":launch")]
    assert len(launches) == 1
    spec = ValidationSpec.from_json(launches[0]["launchParameter"]["parameters"]["spec"])
    assert spec.input_uri == raw.uri("big/stations.csv") and spec.format == "csv"
    assert job.name == validation_job_name(spec)
    assert launches[0]["launchParameter"]["containerSpecGcsPath"] == f"gs://{bucket}/{TEMPLATE}"
    assert done["state"] == "landed", done
    assert after["status"] == "duplicate"
    landed = cloud.pulled(events.DATASETS_LANDED, expect=2)
    assert len(landed) == 2 and landed[0].dataset.uri == landed[1].dataset.uri
    assert landed[0].dataset.row_count == 30


def parquet_of(n: int) -> bytes:
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
    pq.write_table(table, out, row_group_size=7)
    return out.getvalue()


def test_a_large_parquet_landing_lands_as_parquet(
    ingest: TestClient, cloud: Cloud, raw: Storage
) -> None:
    data = parquet_of(20)
    raw.write("big/stations.parquet", data)

    started = push(ingest, gcs_request(raw.uri("big/stations.parquet")))
    done = checked_until_done(ingest)

    assert started["status"] == "exporting" and done["state"] == "landed", done
    (landed,) = cloud.pulled(events.DATASETS_LANDED)
    assert landed.dataset.row_count == 20
    assert landed.dataset.sha256 == hashlib.sha256(data).hexdigest()
    assert landed.dataset.uri.endswith(".parquet")
    assert landed.dataset.data_format == events_pb2.DATA_FORMAT_PARQUET
    assert cloud.storage.read(cloud.storage.path_of(landed.dataset.uri)).data == data


def test_an_object_under_the_threshold_keeps_the_in_service_path(
    cloud: Cloud, raw: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings_env(cloud, raw, monkeypatch)
    data = csv_of(rows(12))
    monkeypatch.setenv("MLPIPE_INGEST_BEAM_MIN_BYTES", str(len(data) + 1))
    cloud.apply_config(parse_config(STATIONS))
    raw.write("small/stations.csv", data)

    with TestClient(app) as ingest:
        reply = push(ingest, gcs_request(raw.uri("small/stations.csv")))

    assert reply["status"] == "landed", reply
    assert cloud.storage.list(layout.EXPORTS) == []


def test_a_file_lacking_a_column_fails_as_a_whole(
    ingest: TestClient, cloud: Cloud, raw: Storage
) -> None:
    lines = [",".join(r.split(",")[:3] + r.split(",")[4:]) for r in rows(8)]  # no humidity
    raw.write("big/narrow.csv", ("\n".join(["site,observed,hour,temp", *lines]) + "\n").encode())

    push(ingest, gcs_request(raw.uri("big/narrow.csv")))
    done = checked_until_done(ingest)

    assert done["state"] == "failed" and done["reason"] == "missing_column", done
    (failed,) = cloud.pulled(events.PIPELINE_FAILURES)
    assert "the file as a whole" in failed.message and "['humidity']" in failed.message
