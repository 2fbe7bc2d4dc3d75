"""The predictor as Vertex AI runs it (AIP_* variables), in this process against the emulators:
it serves the version at AIP_STORAGE_URI (a copy in another bucket, as Vertex makes one) on
AIP_HEALTH_ROUTE and AIP_PREDICT_ROUTE, with no push route and no push settings."""

from __future__ import annotations

import httpx
import pytest

from mlpipe.messaging import events
from mlpipe.messaging.push import make_envelope
from mlpipe.ml.config import PipelineConfig
from mlpipe.store import layout
from mlpipe.store.storage import Storage, make_client
from tests.conftest import unique
from tests.integration.conftest import Cloud
from tests.integration.test_serving import SETOSA, VIRGINICA, deploy, predictor, trained

pytestmark = pytest.mark.integration

HEALTH = "/v1/endpoints/55/deployedModels/66"
PREDICT = f"{HEALTH}:predict"


def test_the_predictor_serves_vertex_ais_routes_from_aip_storage_uri(
    cloud: Cloud, monkeypatch: pytest.MonkeyPatch, iris_config: PipelineConfig, iris_csv: str
) -> None:
    done = deploy(cloud, trained(cloud, iris_config, iris_csv))
    client = make_client(cloud.project)
    copy = Storage(client, client.create_bucket(unique("vertex-copy")).name)
    source = layout.RegistryPaths(done.model_name).version(done.version)
    for path in cloud.storage.list(source):
        found = cloud.storage.read(path)
        assert found is not None
        copy.write(f"model/{path.rsplit('/', 1)[1]}", found.data)
    empty = client.create_bucket(unique("empty")).name

    env = dict(
        MLPIPE_BUCKET=empty,  # nothing to read there: only AIP_STORAGE_URI holds the model
        MLPIPE_PUSH_AUTH="oidc",  # and no MLPIPE_PUSH_AUDIENCE / _SERVICE_ACCOUNT
        AIP_HTTP_PORT="1",  # uvicorn is given its port here; the setting is unit-tested
        AIP_HEALTH_ROUTE=HEALTH,
        AIP_PREDICT_ROUTE=PREDICT,
        AIP_STORAGE_URI=copy.uri("model/"),
        MLPIPE_SERVE_MODEL=done.model_name,
        MLPIPE_SERVE_VERSION=str(done.version),
    )
    with (
        predictor(cloud, monkeypatch, **env) as served,
        httpx.Client(base_url=served.url, timeout=30) as http,
    ):
        health = http.get(HEALTH)
        answer = http.post(PREDICT, json={"instances": [SETOSA, VIRGINICA]})
        push = http.post("/pubsub/push", content=make_envelope(events.encode(done)))

    assert health.status_code == 200
    assert health.json()["models"][done.model_name]["version"] == done.version
    assert answer.status_code == 200
    assert answer.json() == {"predictions": ["setosa", "virginica"]}
    assert push.status_code == 404
