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
