"""The BigQuery source's request builders and error mapping, without a server."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from google.api_core import exceptions as gexc

from mlpipe.errors import PermanentError
from mlpipe.v1 import events_pb2
from mlpipe_ingest.sources_bigquery import (
    ExportUnavailable,
    check_source,
    classify,
    describe,
    extract_job_config,
    job_failure,
    job_ids,
    query_job_config,
    staged_uri,
    table_reference,
)

GSOD = "bigquery-public-data.noaa_gsod.gsod2026"


def source(**fields: object) -> events_pb2.BigQuerySource:
    out = events_pb2.BigQuerySource()
    for name, value in fields.items():
        setattr(out, name, value)
    return out


def test_dates_are_bound_as_date_parameters_of_a_standard_sql_query() -> None:
    config = query_job_config(
        source(query="SELECT 1", start_date="2026-01-01", end_date="2026-01-31")
    )

    api = config.to_api_repr()["query"]
    assert api["useLegacySql"] is False
    assert api["queryParameters"] == [
        {
            "name": "start_date",
            "parameterType": {"type": "DATE"},
            "parameterValue": {"value": "2026-01-01"},
        },
        {
            "name": "end_date",
            "parameterType": {"type": "DATE"},
            "parameterValue": {"value": "2026-01-31"},
        },
    ]


def test_a_query_without_dates_binds_no_parameters() -> None:
    assert (
        "queryParameters" not in query_job_config(source(query="SELECT 1")).to_api_repr()["query"]
    )


def test_a_partition_is_a_decorator_on_the_table() -> None:
    ref = table_reference(source(table=GSOD, partition="20260105"), "billing")

    assert (ref.project, ref.dataset_id, ref.table_id) == (
        "bigquery-public-data",
        "noaa_gsod",
        "gsod2026$20260105",
    )


def test_the_extract_writes_one_parquet_file_in_the_staging_prefix() -> None:
    assert extract_job_config().to_api_repr()["extract"]["destinationFormat"] == "PARQUET"
    assert staged_uri("gs://b/ingest/exports/e1/") == "gs://b/ingest/exports/e1/data.parquet"


def test_job_ids_are_derived_from_the_export_id_and_valid_for_bigquery() -> None:
    assert (
        job_ids("abc123") == job_ids("abc123") == ("mlpipe_abc123_query", "mlpipe_abc123_extract")
    )
    assert job_ids("abc123") != job_ids("abc124")
    with pytest.raises(ValueError, match="cannot name"):
        job_ids("a/b")


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({}, "name a query or a table"),
        ({"table": "just_a_table"}, "is not project.dataset.table"),
        (
            {"query": "SELECT 1", "start_date": "2026-13-01"},
            "start_date '2026-13-01' is not a date",
        ),
        ({"query": "SELECT 1", "start_date": "2026-02-01", "end_date": "2026-01-01"}, "is after"),
        ({"table": GSOD, "start_date": "2026-01-01"}, "a table takes partition"),
        ({"query": "SELECT 1", "partition": "20260101"}, "partition '20260101'"),
        ({"table": GSOD, "partition": "2026-01-01"}, "yyyymmdd"),
    ],
)
def test_a_source_that_cannot_name_a_job_is_refused_naming_the_problem(
    fields: dict[str, object], problem: str
) -> None:
    with pytest.raises(PermanentError) as caught:
        check_source(source(**fields))

    assert caught.value.reason == "invalid_message"
    assert problem in caught.value.message


def test_a_good_source_passes() -> None:
    check_source(source(query="SELECT 1", start_date="2026-01-01", end_date="2026-01-31"))
    check_source(source(table=GSOD, partition="20260105"))
    assert describe(source(table=GSOD, partition="20260105")) == f"bigquery:{GSOD}$20260105"


def _error(cls: type[gexc.GoogleAPICallError], reason: str) -> gexc.GoogleAPICallError:
    return cls("refused", errors=[{"reason": reason, "message": "refused"}])


@pytest.mark.parametrize(
    ("exc", "transient", "reason"),
    [
        (_error(gexc.Forbidden, "quotaExceeded"), True, "quota_exceeded"),
        (_error(gexc.Forbidden, "rateLimitExceeded"), True, "quota_exceeded"),
        (_error(gexc.TooManyRequests, "rateLimitExceeded"), True, "quota_exceeded"),
        (_error(gexc.ServiceUnavailable, "backendError"), True, "unavailable"),
        (ConnectionError("refused"), True, "unavailable"),
        (_error(gexc.NotFound, "notFound"), False, "unknown_table"),
        (_error(gexc.BadRequest, "invalidQuery"), False, "query_error"),
        (_error(gexc.BadRequest, "invalid"), False, "export_failed"),
        (_error(gexc.Forbidden, "accessDenied"), False, "access_denied"),
    ],
)
def test_refusals_map_to_transient_or_a_named_permanent_reason(
    exc: Exception, transient: bool, reason: str
) -> None:
    found = classify(exc, "bigquery:query")

    assert isinstance(found, ExportUnavailable) is transient
    assert found.reason == reason
    assert "bigquery:query" in (found.message if isinstance(found, PermanentError) else str(found))


@pytest.mark.parametrize(
    ("reason", "mapped"),
    [
        ("notFound", "unknown_table"),
        ("invalidQuery", "query_error"),
        ("stopped", "export_cancelled"),
        ("quotaExceeded", "quota_exceeded"),
        ("backendError", "export_failed"),
    ],
)
def test_a_job_that_ended_with_an_error_is_a_named_permanent_failure(
    reason: str, mapped: str
) -> None:
    job = SimpleNamespace(job_id="mlpipe_e1_query", error_result={"reason": reason, "message": "m"})

    found = job_failure(job, "query job")

    assert isinstance(found, PermanentError)
    assert found.reason == mapped
    assert found.message.startswith(f"query job mlpipe_e1_query failed: {reason}: m")


def test_the_ingest_settings_give_the_bigquery_backend_its_project_and_limits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlpipe_ingest.settings import IngestSettings

    monkeypatch.setenv("MLPIPE_PROJECT", "topics-project")
    monkeypatch.setenv("MLPIPE_BUCKET", "landing")
    monkeypatch.setenv("MLPIPE_BIGQUERY_LOCATION", "EU")
    monkeypatch.setenv("MLPIPE_EXPORT_TIMEOUT_SECONDS", "120")
    assert IngestSettings().bigquery_settings().project == "topics-project"  # the default

    monkeypatch.setenv("MLPIPE_BIGQUERY_PROJECT", "billing-project")
    settings = IngestSettings()
    backend = settings.bigquery_settings()

    assert (backend.project, backend.location, backend.timeout_seconds) == (
        "billing-project",
        "EU",
        120.0,
    )
    assert backend.single_file_bytes == 1_000_000_000
    assert settings.bigquery_url == "" and settings.export_chunk_bytes == 8 * 1024 * 1024


def test_a_local_bigquery_that_does_not_answer_is_named_with_what_serves_one() -> None:
    import socket

    from mlpipe_ingest.sources_bigquery import (
        BigQueryExports,
        BigQuerySettings,
        ExportUnavailable,
        bigquery_client,
    )

    with socket.socket() as free:  # a port nothing listens on once closed
        free.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{free.getsockname()[1]}"
    settings = BigQuerySettings(project="p", request_seconds=0.5)
    backend = BigQueryExports(bigquery_client("p", url), settings, local_url=url)
    request = events_pb2.IngestRequest(
        dataset="weather", bigquery=events_pb2.BigQuerySource(table=GSOD)
    )

    with pytest.raises(ExportUnavailable) as refused:
        backend.start(request, "gs://b/ingest/exports/e1/", "e1")

    assert refused.value.reason == "unavailable"
    assert f"nothing answers at the local BigQuery {url}" in refused.value.message
    assert "mlpipe bigquery-standin --port PORT" in refused.value.message
