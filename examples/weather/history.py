"""The weather example's history: the same stations' earlier hourly observations, kept in
BigQuery and landed by ingest's `bigquery` source before the providers' recent ones.

An IngestRequest names one source (`source` is a oneof), and a pipeline trains one run per
landed object, so history and recent observations are two requests into the same dataset,
history first: its query selects the columns the `weather` pipeline's `dataset:` section
expects, so it lands as a complete weather dataset of its own (checked from BigQuery's table
metadata, never read by ingest), and its run is followed to its served model before the
providers' request is published. Each landing is one version of the dataset; the model that
serves at the end is the one trained on the providers' recent observations, measured by the
same gates as the history's.

Locally the history lives in the BigQuery stand-in (mlpipe_ops.standins.bigquery), served by
run.py while the example runs, at the URL ingest was started with (MLPIPE_BIGQUERY_URL).
"""

from __future__ import annotations

import datetime as dt
from urllib.parse import urlsplit

import pyarrow as pa
from google.cloud import storage as gcs
from providers import STATIONS, observations

from mlpipe.messaging import events
from mlpipe.v1 import events_pb2
from mlpipe_ops.standins.bigquery import BigQueryStandIn, Table

PROJECT, DATASET, TABLE = "mlpipe-examples", "weather", "hourly"
HISTORY_TABLE = f"{PROJECT}.{DATASET}.{TABLE}"
HISTORY_START = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
HISTORY_DAYS = 14
QUERY = (
    "SELECT provider, station, observed_at, hour, humidity, cloud_cover, wind_ms, temp_c "
    f"FROM `{HISTORY_TABLE}` "
    "WHERE CAST(observed_at AS DATE) BETWEEN @start_date AND @end_date"
)


def history_table(days: int = HISTORY_DAYS) -> Table:
    """The stations' hourly history as a BigQuery table (observed_at a TIMESTAMP)."""
    rows = [
        row
        for provider in STATIONS
        for row in observations(provider, days, seed=1, start=HISTORY_START)
    ]
    columns = {name: [r[name] for r in rows] for name in rows[0]}
    columns["observed_at"] = [
        dt.datetime.fromisoformat(str(v).replace("Z", "+00:00")) for v in columns["observed_at"]
    ]
    types = {
        "provider": pa.string(),
        "station": pa.string(),
        "observed_at": pa.timestamp("us", tz="UTC"),
        "hour": pa.int64(),
    }
    data = pa.table({k: pa.array(v, type=types.get(k, pa.float64())) for k, v in columns.items()})
    return Table(PROJECT, DATASET, TABLE, data, location="US")


def history_request(
    request_id: str, days: int = HISTORY_DAYS, timeout_seconds: int = 300
) -> events_pb2.IngestRequest:
    request = events_pb2.IngestRequest(
        request_id=request_id, dataset="weather", requested_at=events.timestamp()
    )
    end = HISTORY_START.date() + dt.timedelta(days=days - 1)
    request.bigquery.query = QUERY
    request.bigquery.start_date = HISTORY_START.date().isoformat()
    request.bigquery.end_date = end.isoformat()
    request.bigquery.location = "US"
    request.bigquery.timeout_seconds = timeout_seconds
    return request


def serve_history(url: str, project: str, storage_client: gcs.Client) -> BigQueryStandIn:
    """The BigQuery stand-in at `url` (the port ingest's MLPIPE_BIGQUERY_URL names), holding
    the history table; its extracts write into the stack's GCS emulator."""
    port = urlsplit(url).port
    if port is None:
        raise ValueError(f"MLPIPE_BIGQUERY_URL {url!r} names no port")
    return BigQueryStandIn(
        project, storage_client, port=port, job_seconds=0.5, catalogue=[history_table()]
    ).start()
