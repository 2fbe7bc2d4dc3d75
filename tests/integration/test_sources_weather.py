"""The weather example through ingest: two providers served on 127.0.0.1 merge into one
dataset that passes the example pipeline's schema (key, non-null, types)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from types import ModuleType

import pytest
from fastapi.testclient import TestClient

from mlpipe.messaging import events
from mlpipe.messaging.push import make_envelope
from mlpipe.ml.config import parse_config
from mlpipe.v1 import events_pb2
from mlpipe_ingest.main import app
from tests.conftest import REPO
from tests.integration.conftest import Cloud

pytestmark = pytest.mark.integration
EXAMPLE = REPO / "examples/weather"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"weather_{name}", EXAMPLE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def providers() -> Iterator[object]:
    served = load("providers").Providers(days=2)
    yield served
    served.stop()


def test_the_weather_providers_land_as_one_dataset(
    cloud: Cloud, monkeypatch: pytest.MonkeyPatch, providers: object
) -> None:
    monkeypatch.setenv("MLPIPE_PROJECT", cloud.project)
    monkeypatch.setenv("MLPIPE_BUCKET", cloud.storage.bucket_name)
    cloud.apply_config(parse_config((EXAMPLE / "pipeline.yaml").read_text()))
    cloud.watch(events.DATASETS_LANDED, events.PIPELINE_FAILURES)
    request = events_pb2.IngestRequest(request_id="w1", dataset="weather")
    request.http.urls.extend(providers.urls)  # type: ignore[attr-defined]
    request.http.records_path = "data.hourly"

    with TestClient(app) as ingest:
        reply = ingest.post("/pubsub/push", content=make_envelope(events.encode(request)))

    assert reply.json()["status"] == "landed", reply.json()
    landed = cloud.pulled(events.DATASETS_LANDED)
    assert landed[0].dataset.row_count == (3 + 2) * 48
    assert {"provider", "station", "temp_c"} <= set(landed[0].columns)


def test_the_history_from_bigquery_and_the_providers_land_as_two_versions_of_one_dataset(
    cloud: Cloud, monkeypatch: pytest.MonkeyPatch, providers: object
) -> None:
    """The example's history (history.py) through the real BigQuery client and the stand-in:
    its query's export fits the weather contract and lands, then the providers' request lands
    in the same dataset. Driven through the BigQuery backend directly; through the export
    mechanism once ingest has it."""
    from mlpipe.store import layout
    from mlpipe_ingest.sources_bigquery import (
        BigQueryExports,
        BigQuerySettings,
        bigquery_client,
        land_export,
    )

    monkeypatch.syspath_prepend(str(EXAMPLE))  # history.py imports providers.py as run.py does
    history = load("history")
    config = parse_config((EXAMPLE / "pipeline.yaml").read_text())
    stand_in = history.serve_history("http://127.0.0.1:0", cloud.project, cloud.storage.client)
    try:
        exports = BigQueryExports(
            bigquery_client(cloud.project, stand_in.url), BigQuerySettings(cloud.project)
        )
        request = history.history_request("h1")
        staging = cloud.storage.uri(layout.export_staging_prefix("h1"))
        recorded = exports.start(request, staging, "h1")
        for _ in range(4):
            stand_in.advance(1)
            status = exports.poll(recorded)
        assert status.state == "done", status
        landed_history, _ = land_export(
            cloud.storage,
            request,
            status.objects,
            exports.exported_table(recorded),
            config,
            code_version="test",
            chunk_bytes=64 * 1024,
        )
    finally:
        stand_in.stop()
    assert landed_history.dataset.row_count == 5 * 24 * history.HISTORY_DAYS

    test_the_weather_providers_land_as_one_dataset(cloud, monkeypatch, providers)

    landed = cloud.storage.list(layout.dataset_prefix("weather"))
    assert len(landed) == 2
    assert cloud.storage.path_of(landed_history.dataset.uri) in landed
    assert {p.rsplit(".", 1)[-1] for p in landed} == {"parquet", "csv"}
