"""The BigQuery stand-in's own rules (docs/bigquery-standin.md) through the real client, for
what ingest's source does not exercise: shards, the single-file limit, cancel, locations."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pyarrow.parquet as pq
import pytest
from google.api_core import exceptions as gexc
from google.cloud import bigquery

from mlpipe_ingest.sources_bigquery import bigquery_client
from mlpipe_ops.standins.bigquery import GSOD, BigQueryStandIn
from tests.integration.conftest import Cloud

pytestmark = pytest.mark.integration
PARQUET = bigquery.ExtractJobConfig(destination_format="PARQUET")


@pytest.fixture
def stand_in(cloud: Cloud) -> Iterator[BigQueryStandIn]:
    bq = BigQueryStandIn(cloud.project, cloud.storage.client, job_seconds=5.0).start()
    yield bq
    bq.stop()


def done(stand_in: BigQueryStandIn, client: bigquery.Client, job_id: str) -> bigquery.job._AsyncJob:
    stand_in.advance(10)
    job = client.get_job(job_id, location="US")
    assert job.state == "DONE"
    return job


def test_a_wildcard_uri_is_filled_with_shards_counted_in_the_statistics(
    cloud: Cloud, stand_in: BigQueryStandIn
) -> None:
    client = bigquery_client(cloud.project, stand_in.url)
    uri = cloud.storage.uri("exports/w/part-*.parquet")

    client.extract_table(GSOD, uri, job_id="w1", location="US", job_config=PARQUET)
    job = done(stand_in, client, "w1")

    names = cloud.storage.list("exports/w/")
    assert names == ["exports/w/part-000000000000.parquet", "exports/w/part-000000000001.parquet"]
    assert job.destination_uri_file_counts == [2]
    rows = sum(pq.read_table(io.BytesIO(cloud.storage.read(n).data)).num_rows for n in names)  # type: ignore[union-attr]
    assert rows == 12 * 90


def test_a_single_uri_over_the_limit_fails_the_job_and_writes_nothing(
    cloud: Cloud, stand_in: BigQueryStandIn
) -> None:
    stand_in.single_file_bytes = 1000
    client = bigquery_client(cloud.project, stand_in.url)

    client.extract_table(
        GSOD,
        cloud.storage.uri("exports/s/one.parquet"),
        job_id="s1",
        location="US",
        job_config=PARQUET,
    )
    job = done(stand_in, client, "s1")

    assert job.error_result["reason"] == "invalid"
    assert "too large to be exported to a single file" in job.error_result["message"]
    assert cloud.storage.list("exports/s/") == []


def test_a_cancelled_job_ends_stopped(cloud: Cloud, stand_in: BigQueryStandIn) -> None:
    client = bigquery_client(cloud.project, stand_in.url)
    client.query(f"SELECT stn FROM `{GSOD}`", job_id="c1", location="US", job_retry=None)

    client.cancel_job("c1", location="US")
    job = client.get_job("c1", location="US")

    assert job.state == "DONE"
    assert job.error_result["reason"] == "stopped"


def test_a_job_is_found_only_in_its_location_and_a_query_runs_where_its_tables_are(
    cloud: Cloud, stand_in: BigQueryStandIn
) -> None:
    client = bigquery_client(cloud.project, stand_in.url)
    client.query(f"SELECT stn FROM `{GSOD}`", job_id="l1", location="US", job_retry=None)

    with pytest.raises(gexc.NotFound):
        client.get_job("l1", location="EU")
    client.query(f"SELECT stn FROM `{GSOD}`", job_id="l2", location="EU", job_retry=None)
    stand_in.advance(10)
    eu = client.get_job("l2", location="EU")
    assert eu.error_result["reason"] == "notFound"
    assert "not found in location EU" in eu.error_result["message"]


def test_query_results_report_the_schema_and_row_count_but_serve_no_rows(
    cloud: Cloud, stand_in: BigQueryStandIn
) -> None:
    client = bigquery_client(cloud.project, stand_in.url)
    job = client.query(
        f"SELECT stn, temp FROM `{GSOD}` WHERE date = @day",
        job_config=bigquery.QueryJobConfig(
            query_parameters=[bigquery.ScalarQueryParameter("day", "DATE", "2026-01-05")]
        ),
        job_id="r1",
        location="US",
        job_retry=None,
    )
    stand_in.advance(10)

    with pytest.raises(gexc.BadRequest, match="serves no result rows"):
        list(job.result())  # a clear refusal, not an empty result
    table = client.get_table(client.get_job("r1", location="US").destination)
    assert table.num_rows == 12
    assert [(f.name, f.field_type) for f in table.schema] == [("stn", "STRING"), ("temp", "FLOAT")]


@pytest.mark.parametrize(
    ("query", "rows", "error"),
    [
        (f"SELECT `temp`, stn FROM `{GSOD}` LIMIT 3", 3, ""),
        (f"SELECT temp FROM {GSOD} WHERE stn = '720000'", 90, ""),
        ("SELECT temp FROM noaa_gsod.gsod2026", 0, "notFound"),  # the job's project has none
        (f"SELECT COUNT(*) AS n FROM `{GSOD}` WHERE EXTRACT(MONTH FROM date) = 2", 1, ""),
        (f"DELETE FROM `{GSOD}` WHERE TRUE", 0, "invalidQuery"),
    ],
)
def test_queries_name_tables_as_bigquery_does(
    cloud: Cloud, stand_in: BigQueryStandIn, query: str, rows: int, error: str
) -> None:
    client = bigquery_client(cloud.project, stand_in.url)
    client.query(query, job_id="t1", location="US", job_retry=None)

    job = done(stand_in, client, "t1")

    if error:
        assert job.error_result["reason"] == error
    else:
        assert job.error_result is None
        assert client.get_table(job.destination).num_rows == rows
