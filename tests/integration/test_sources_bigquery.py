"""The BigQuery source through the real google-cloud-bigquery client, against the local BigQuery
stand-in (mlpipe_ops.standins.bigquery) whose extract jobs write Parquet into the GCS emulator.

start/poll/land_export are driven directly, as the export mechanism drives them; the last tests
go through the mechanism itself (mlpipe_ingest.exports: a push, then `check_exports()`)."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlpipe.errors import PermanentError, TransientError
from mlpipe.ml.config import PipelineConfig, parse_config
from mlpipe.store import layout
from mlpipe.v1 import events_pb2
from mlpipe_ingest.sources_bigquery import (
    BigQueryExports,
    BigQuerySettings,
    ExportStatus,
    bigquery_client,
    land_export,
)
from mlpipe_ops.standins.bigquery import GSOD, BigQueryStandIn, gsod
from tests.conftest import unique
from tests.integration.conftest import Cloud

pytestmark = pytest.mark.integration

QUERY = (
    "SELECT stn, date, temp, dewp, slp, wdsp, prcp, max, min "
    f"FROM `{GSOD}` WHERE date BETWEEN @start_date AND @end_date"
)
CONFIG = """
name: gsod
dataset:
  target: temp
  columns: {stn: categorical, date: datetime}
  key: [stn, date]
  min_rows: 50
model:
  name: gsod-temp
  task: regression
  estimator: sklearn.ensemble.HistGradientBoostingRegressor
"""
WHEN = dt.datetime(2026, 6, 1, 12, tzinfo=dt.UTC)


class Clock:
    """Wall time the test moves on (the export's time limit)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def config() -> PipelineConfig:
    return parse_config(CONFIG)


@pytest.fixture
def stand_in(cloud: Cloud) -> Iterator[BigQueryStandIn]:
    bq = BigQueryStandIn(cloud.project, cloud.storage.client, job_seconds=5.0).start()
    yield bq
    bq.stop()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def backend(cloud: Cloud, stand_in: BigQueryStandIn, clock: Clock, **settings: object):  # type: ignore[no-untyped-def]
    options = {"project": cloud.project, "request_seconds": 2.0, **settings}
    return BigQueryExports(
        bigquery_client(cloud.project, stand_in.url),
        BigQuerySettings(**options),  # type: ignore[arg-type]
        clock=clock,
    )


def query_request(
    query: str = QUERY, start: str = "2026-01-01", end: str = "2026-01-31", **fields: object
) -> events_pb2.IngestRequest:
    request = events_pb2.IngestRequest(request_id=unique("bq"), dataset="gsod")
    request.bigquery.query = query
    request.bigquery.start_date = start
    request.bigquery.end_date = end
    for name, value in fields.items():
        setattr(request.bigquery, name, value)
    return request


def staging(cloud: Cloud, export_id: str) -> str:
    return cloud.storage.uri(layout.export_staging_prefix(export_id))


def run_export(
    exports: BigQueryExports,
    stand_in: BigQueryStandIn,
    request: events_pb2.IngestRequest,
    staging_uri: str,
    export_id: str,
) -> tuple[dict[str, str], ExportStatus]:
    """start, then poll (moving the stand-in's clock past each job) until not running."""
    recorded = exports.start(request, staging_uri, export_id)
    for _ in range(6):
        status = exports.poll(recorded)
        if status.state != "running":
            return recorded, status
        stand_in.advance(10)
    raise AssertionError(f"export {export_id} still running: {status}")


def endpoints(stand_in: BigQueryStandIn) -> set[str]:
    """The BigQuery methods the client called, named as the REST reference names them."""
    names = set()
    for method, path in stand_in.calls:
        tail = path.split("/projects/", 1)[1].split("/")[1:]
        if tail == ["jobs"] and method == "POST":
            names.add("jobs.insert")
        elif tail[0] == "jobs" and len(tail) == 2:
            names.add("jobs.get")
        elif tail[0] == "datasets" and len(tail) == 4:
            names.add("tables.get")
        else:
            names.add(f"{method} {'/'.join(tail)}")
    return names


def datasets(cloud: Cloud) -> list[str]:
    return cloud.storage.list(layout.DATASETS)


def test_a_query_exports_one_parquet_file_that_lands_checked_with_its_metadata(
    cloud: Cloud, stand_in: BigQueryStandIn, clock: Clock, config: PipelineConfig
) -> None:
    exports = backend(cloud, stand_in, clock)
    request = query_request()

    recorded = exports.start(request, staging(cloud, "e1"), "e1")
    assert exports.poll(recorded).state == "running"  # the query job is PENDING
    stand_in.advance(10)
    assert exports.poll(recorded).state == "running"  # query DONE: the extract job started
    assert [k for k, _ in stand_in.inserted] == ["query", "extract"]
    stand_in.advance(10)
    status = exports.poll(recorded)
    assert status.state == "done", status
    assert status.objects == (staging(cloud, "e1") + "data.parquet",)

    table = exports.exported_table(recorded)
    landed, digest = land_export(
        cloud.storage,
        request,
        status.objects,
        table,
        config,
        code_version="test",
        chunk_bytes=1 << 20,
        when=WHEN,
    )

    expected = gsod().filter(
        pa.array(
            [dt.date(2026, 1, 1) <= d <= dt.date(2026, 1, 31) for d in gsod()["date"].to_pylist()]
        )
    )
    stored = cloud.storage.read(cloud.storage.path_of(landed.dataset.uri), with_metadata=True)
    assert stored is not None
    rows = pq.read_table(io.BytesIO(stored.data))
    assert rows.num_rows == expected.num_rows == landed.dataset.row_count == 12 * 31
    assert rows.column_names == ["stn", "date", "temp", "dewp", "slp", "wdsp", "prcp", "max", "min"]
    assert rows.schema.field("date").type == pa.date32()
    assert hashlib.sha256(stored.data).hexdigest() == digest.sha256 == landed.dataset.sha256
    assert landed.dataset.uri.endswith(f"datasets/gsod/dt=2026-06-01/{digest.sha256[:16]}.parquet")
    assert stored.metadata["row_count"] == str(12 * 31)
    assert stored.metadata["schema"].startswith("stn:categorical,date:datetime,temp:numeric")
    assert stored.metadata["source"] == "bigquery:query [2026-01-01..2026-01-31]"
    assert stored.metadata["request_id"] == request.request_id
    assert landed.dataset.data_format == events_pb2.DATA_FORMAT_PARQUET
    assert not landed.already_present

    again, _ = land_export(
        cloud.storage,
        request,
        status.objects,
        table,
        config,
        code_version="test",
        chunk_bytes=1 << 20,
        when=WHEN,
    )
    assert again.already_present and again.dataset.generation == landed.dataset.generation
    assert endpoints(stand_in) == {"jobs.insert", "jobs.get", "tables.get"}


def test_a_table_partition_is_exported_without_a_query(
    cloud: Cloud, stand_in: BigQueryStandIn, clock: Clock
) -> None:
    exports = backend(cloud, stand_in, clock)
    request = events_pb2.IngestRequest(request_id="t1", dataset="gsod")
    request.bigquery.table = GSOD
    request.bigquery.partition = "20260105"

    recorded, status = run_export(exports, stand_in, request, staging(cloud, "t1"), "t1")

    assert status.state == "done", status
    assert [k for k, _ in stand_in.inserted] == ["extract"]
    assert exports.exported_table(recorded).num_rows == 12  # one day of 12 stations
    data = cloud.storage.read(cloud.storage.path_of(status.objects[0]))
    assert data is not None
    assert set(pq.read_table(io.BytesIO(data.data))["date"].to_pylist()) == {dt.date(2026, 1, 5)}


def test_a_redelivery_during_a_job_starts_nothing_new(
    cloud: Cloud, stand_in: BigQueryStandIn, clock: Clock
) -> None:
    exports = backend(cloud, stand_in, clock)
    request = query_request()
    first = exports.start(request, staging(cloud, "r1"), "r1")

    second = exports.start(request, staging(cloud, "r1"), "r1")  # 409: looked up
    stand_in.advance(10)
    exports.poll(first)
    exports.poll(second)  # the extract job exists: not started again

    assert second["query_job"] == first["query_job"]
    assert stand_in.inserted == [("query", first["query_job"]), ("extract", first["extract_job"])]


@pytest.mark.parametrize(
    ("query", "reason", "named"),
    [
        ("SELECT * FROM `bigquery-public-data.noaa_gsod.gsod1800`", "unknown_table", "gsod1800"),
        ("SELEKT stn FROM `bigquery-public-data.noaa_gsod.gsod2026`", "query_error", "SELEKT"),
        (f"SELECT nope FROM `{GSOD}` WHERE date >= @start_date", "query_error", "nope"),
    ],
)
def test_a_query_that_cannot_run_fails_naming_the_cause(
    cloud: Cloud, stand_in: BigQueryStandIn, clock: Clock, query: str, reason: str, named: str
) -> None:
    exports = backend(cloud, stand_in, clock)

    _, status = run_export(exports, stand_in, query_request(query), staging(cloud, "q"), "q")

    assert (status.state, status.reason, status.transient) == ("failed", reason, False)
    assert named in status.message
    assert [k for k, _ in stand_in.inserted] == ["query"]
    assert datasets(cloud) == []


def test_an_unknown_table_source_is_refused_at_start(
    cloud: Cloud, stand_in: BigQueryStandIn, clock: Clock
) -> None:
    request = events_pb2.IngestRequest(request_id="u1", dataset="gsod")
    request.bigquery.table = "bigquery-public-data.noaa_gsod.gsod1800"

    with pytest.raises(PermanentError) as caught:
        backend(cloud, stand_in, clock).start(request, staging(cloud, "u1"), "u1")

    assert caught.value.reason == "unknown_table"
    assert "gsod1800" in caught.value.message
    assert stand_in.inserted == []


@pytest.mark.parametrize(
    ("query", "start", "reason", "named"),
    [
        (
            f"SELECT stn, date, dewp FROM `{GSOD}` WHERE date <= @end_date",
            "",
            "missing_column",
            "temp",
        ),
        (
            f"SELECT stn, date, CAST(temp AS STRING) AS temp, dewp FROM `{GSOD}` "
            "WHERE date <= @end_date",
            "",
            "wrong_type",
            "'temp'",
        ),
        (QUERY, "2026-01-29", "row_count", "36 rows"),
    ],
)
def test_an_export_that_does_not_fit_the_dataset_contract_lands_nothing(
    cloud: Cloud,
    stand_in: BigQueryStandIn,
    clock: Clock,
    config: PipelineConfig,
    query: str,
    start: str,
    reason: str,
    named: str,
) -> None:
    exports = backend(cloud, stand_in, clock)
    request = query_request(query, start=start, end="2026-01-31")
    recorded, status = run_export(exports, stand_in, request, staging(cloud, "m"), "m")
    assert status.state == "done", status

    with pytest.raises(PermanentError) as caught:
        land_export(
            cloud.storage,
            request,
            status.objects,
            exports.exported_table(recorded),
            config,
            code_version="test",
            chunk_bytes=1 << 20,
        )

    assert caught.value.reason == reason
    assert named in caught.value.message
    assert caught.value.context.request_id == request.request_id
    assert datasets(cloud) == []


def test_a_quota_refusal_is_transient_and_the_retry_starts_the_job(
    cloud: Cloud, stand_in: BigQueryStandIn, clock: Clock
) -> None:
    exports = backend(cloud, stand_in, clock)
    request = query_request()
    stand_in.refuse_inserts(1, "quotaExceeded")

    with pytest.raises(TransientError, match="quotaExceeded"):
        exports.start(request, staging(cloud, "k1"), "k1")
    assert stand_in.inserted == []

    recorded = exports.start(request, staging(cloud, "k1"), "k1")  # the redelivery
    assert stand_in.inserted == [("query", recorded["query_job"])]

    stand_in.advance(10)
    stand_in.refuse_inserts(1, "quotaExceeded")  # the extract job's insert
    status = exports.poll(recorded)
    assert (status.state, status.transient, status.reason) == ("failed", True, "quota_exceeded")
    _, done = run_export(exports, stand_in, request, staging(cloud, "k1"), "k1")
    assert done.state == "done"


def test_a_rate_limit_is_retried_by_the_client_within_its_short_budget(
    cloud: Cloud, stand_in: BigQueryStandIn, clock: Clock
) -> None:
    exports = backend(cloud, stand_in, clock)
    stand_in.refuse_inserts(2, "rateLimitExceeded")

    recorded = exports.start(query_request(), staging(cloud, "l1"), "l1")

    assert stand_in.inserted == [("query", recorded["query_job"])]


def test_an_export_that_never_finishes_fails_at_its_time_limit_and_is_cancelled(
    cloud: Cloud, stand_in: BigQueryStandIn, clock: Clock
) -> None:
    exports = backend(cloud, stand_in, clock)
    stand_in.job_seconds = 10_000
    recorded = exports.start(query_request(timeout_seconds=60), staging(cloud, "s1"), "s1")
    assert exports.poll(recorded).state == "running"

    clock.now += 61
    status = exports.poll(recorded)

    assert (status.state, status.reason, status.transient) == ("failed", "export_timeout", False)
    assert "limit 60s" in status.message
    assert stand_in.jobs[(cloud.project, recorded["query_job"])].cancelled
    assert datasets(cloud) == []


def test_an_export_done_when_its_time_limit_has_passed_is_done(
    cloud: Cloud, stand_in: BigQueryStandIn, clock: Clock
) -> None:
    exports = backend(cloud, stand_in, clock)
    recorded = exports.start(query_request(timeout_seconds=60), staging(cloud, "d1"), "d1")
    stand_in.advance(10)
    assert exports.poll(recorded).state == "running"  # the extract job started
    stand_in.advance(10)

    clock.now += 61
    status = exports.poll(recorded)

    assert status.state == "done", status


def test_a_result_over_the_single_file_limit_is_refused_before_its_extract(
    cloud: Cloud, stand_in: BigQueryStandIn, clock: Clock
) -> None:
    exports = backend(cloud, stand_in, clock, single_file_bytes=10_000)

    _, status = run_export(exports, stand_in, query_request(), staging(cloud, "b1"), "b1")

    assert (status.state, status.reason) == ("failed", "too_large")
    assert "10000 bytes" in status.message
    assert [k for k, _ in stand_in.inserted] == ["query"]


def test_a_result_larger_than_a_chunk_is_hashed_in_bounded_reads(
    cloud: Cloud, stand_in: BigQueryStandIn, clock: Clock, config: PipelineConfig
) -> None:
    exports = backend(cloud, stand_in, clock)
    request = query_request(start="2026-01-01", end="2026-03-31")
    recorded, status = run_export(exports, stand_in, request, staging(cloud, "c1"), "c1")
    chunk = 4096

    landed, digest = land_export(
        cloud.storage,
        request,
        status.objects,
        exports.exported_table(recorded),
        config,
        code_version="test",
        chunk_bytes=chunk,
    )

    staged = cloud.storage.read(cloud.storage.path_of(status.objects[0]))
    assert staged is not None and len(staged.data) > 4 * chunk
    assert digest.largest_chunk <= chunk
    assert digest.chunks == -(-len(staged.data) // chunk)
    assert digest.sha256 == hashlib.sha256(staged.data).hexdigest() == landed.dataset.sha256


def test_through_the_export_mechanism_a_bigquery_request_lands_once(
    cloud: Cloud, stand_in: BigQueryStandIn, clock: Clock, config: PipelineConfig
) -> None:
    """For the export mechanism: a push starts the export and is acknowledged, a redelivery
    starts nothing, `check_exports()` polls the record until the Parquet lands once and
    DatasetLanded is published."""
    from mlpipe.messaging import events
    from mlpipe.messaging.push import make_envelope
    from mlpipe_ingest import exports as mechanism

    cloud.apply_config(config)
    cloud.watch(events.DATASETS_LANDED, events.PIPELINE_FAILURES)
    request = query_request()
    backend_ = backend(cloud, stand_in, clock)
    exporter = mechanism.Exports(  # the mechanism, with the BigQuery backend registered
        cloud.storage, cloud.publisher, code_version="test", backends={"bigquery": backend_}
    )
    body = make_envelope(events.encode(request))

    assert exporter.push(body).status in ("exporting", "started")
    assert exporter.push(body).status in ("exporting", "started")  # the redelivery
    for _ in range(4):
        stand_in.advance(10)
        mechanism.check_exports(exporter)

    landed = cloud.pulled(events.DATASETS_LANDED)
    assert len(landed) == 1 and landed[0].dataset.row_count == 12 * 31
    assert [k for k, _ in stand_in.inserted] == ["query", "extract"]


def test_a_restart_during_a_bigquery_export_keeps_the_record_and_a_new_instance_lands_it(
    cloud: Cloud, stand_in: BigQueryStandIn, clock: Clock, config: PipelineConfig
) -> None:
    """The instance that started the export goes away while its jobs run; another, with its
    own client, finds the record, follows the same jobs and lands the file once."""
    from mlpipe.messaging import events
    from mlpipe.messaging.push import make_envelope
    from mlpipe_ingest import exports as mechanism

    cloud.apply_config(config)
    cloud.watch(events.DATASETS_LANDED, events.PIPELINE_FAILURES)
    body = make_envelope(events.encode(query_request()))

    def instance() -> mechanism.Exports:
        return mechanism.Exports(
            cloud.storage,
            cloud.publisher,
            code_version="test",
            backends={"bigquery": backend(cloud, stand_in, clock)},
        )

    assert instance().push(body).status in ("exporting", "started")
    second = instance()  # the first is gone: nothing of it is used again
    assert second.push(body).status in ("exporting", "started")  # a redelivery reaches it
    for _ in range(4):
        stand_in.advance(10)
        mechanism.check_exports(second)

    landed = cloud.pulled(events.DATASETS_LANDED)
    assert len(landed) == 1 and landed[0].dataset.row_count == 12 * 31
    assert [k for k, _ in stand_in.inserted] == ["query", "extract"]  # no job started twice
    assert cloud.pulled(events.PIPELINE_FAILURES, expect=0, timeout=0.5) == []


def test_through_the_export_mechanism_an_unknown_table_is_reported_and_quarantined(
    cloud: Cloud, stand_in: BigQueryStandIn, clock: Clock, config: PipelineConfig
) -> None:
    """For the export mechanism: a failed export becomes PipelineFailed naming the table, the
    request is kept under quarantine/, the record is finished, and nothing lands."""
    from mlpipe.messaging import events
    from mlpipe.messaging.push import make_envelope
    from mlpipe_ingest import exports as mechanism

    cloud.apply_config(config)
    cloud.watch(events.DATASETS_LANDED, events.PIPELINE_FAILURES)
    request = query_request("SELECT * FROM `bigquery-public-data.noaa_gsod.gsod1800`")
    exporter = mechanism.Exports(
        cloud.storage,
        cloud.publisher,
        code_version="test",
        backends={"bigquery": backend(cloud, stand_in, clock)},
    )

    exporter.push(make_envelope(events.encode(request)))
    for _ in range(3):
        stand_in.advance(10)
        mechanism.check_exports(exporter)

    failed = cloud.pulled(events.PIPELINE_FAILURES)
    assert [f.reason for f in failed] == ["unknown_table"]
    assert "gsod1800" in failed[0].message
    assert cloud.storage.read(cloud.storage.path_of(failed[0].quarantine_uri)) is not None
    assert datasets(cloud) == []
    assert cloud.pulled(events.DATASETS_LANDED, expect=0, timeout=0.5) == []


def test_through_the_ingest_service_a_bigquery_request_lands(
    cloud: Cloud, stand_in: BigQueryStandIn, config: PipelineConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service's wiring: a push to ingest starts the export (the BigQuery backend is
    registered beside Earth Engine's), and `POST /v1/exports:check` lands it."""
    from fastapi.testclient import TestClient

    from mlpipe.messaging import events
    from mlpipe.messaging.push import make_envelope

    monkeypatch.setenv("MLPIPE_PROJECT", cloud.project)
    monkeypatch.setenv("MLPIPE_BUCKET", cloud.storage.bucket_name)
    monkeypatch.setenv("MLPIPE_BIGQUERY_URL", stand_in.url)
    cloud.apply_config(config)
    cloud.watch(events.DATASETS_LANDED)
    from mlpipe_ingest.main import app

    with TestClient(app) as ingest:
        reply = ingest.post("/pubsub/push", content=make_envelope(events.encode(query_request())))
        assert reply.json()["status"] == "exporting", reply.text
        states = []
        for _ in range(4):
            stand_in.advance(10)
            states = [c["state"] for c in ingest.post("/v1/exports:check").json()["exports"]]

    assert states == ["landed"]
    landed = cloud.pulled(events.DATASETS_LANDED)
    assert len(landed) == 1 and landed[0].dataset.row_count == 12 * 31


def test_an_exports_jobs_carry_its_pipeline_environment_request_and_export_as_labels(
    cloud: Cloud, stand_in: BigQueryStandIn, clock: Clock
) -> None:
    exports = backend(cloud, stand_in, clock, env="Staging")
    request = query_request()

    recorded, status = run_export(exports, stand_in, request, staging(cloud, "lab1"), "lab1")

    assert status.state == "done", status
    client = bigquery_client(cloud.project, stand_in.url)
    expected = {
        "mlpipe-pipeline": "gsod",
        "mlpipe-env": "staging",  # sanitised to Google's label rules
        "mlpipe-request-id": request.request_id.lower(),
        "mlpipe-export-id": "lab1",
    }
    for job_id in (recorded["query_job"], recorded["extract_job"]):
        assert client.get_job(job_id, location=recorded["location"]).labels == expected


def test_the_stand_in_refuses_a_job_whose_labels_break_the_rules(
    cloud: Cloud, stand_in: BigQueryStandIn
) -> None:
    from google.api_core import exceptions as gexc
    from google.cloud import bigquery

    client = bigquery_client(cloud.project, stand_in.url)
    config = bigquery.QueryJobConfig(use_legacy_sql=False, labels={"Team": "ml"})

    with pytest.raises(gexc.BadRequest, match="label key 'Team' must start with a lowercase"):
        client.query("SELECT 1", job_config=config, job_id=unique("bad-labels"), job_retry=None)
