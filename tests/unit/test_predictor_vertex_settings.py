"""The predictor's settings under Vertex AI's custom-container contract: AIP_* variables choose
the port, the routes and the artifact directory, and no push settings are needed."""

from __future__ import annotations

import pytest

from mlpipe.runtime.settings import SettingsError, load_settings
from mlpipe_predictor.settings import PredictorSettings

AIP = {
    "AIP_HTTP_PORT": "7080",
    "AIP_HEALTH_ROUTE": "/v1/endpoints/1/deployedModels/2",
    "AIP_PREDICT_ROUTE": "/v1/endpoints/1/deployedModels/2:predict",
    "AIP_STORAGE_URI": "gs://vertex-copy/registry/iris/versions/3/",
    "MLPIPE_SERVE_MODEL": "iris",
    "MLPIPE_SERVE_VERSION": "3",
}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("MLPIPE_PROJECT", "acme-ml")
    monkeypatch.setenv("MLPIPE_BUCKET", "acme-ml-data")
    monkeypatch.delenv("PORT", raising=False)
    monkeypatch.delenv("MLPIPE_PUSH_AUDIENCE", raising=False)
    monkeypatch.delenv("MLPIPE_PUSH_SERVICE_ACCOUNT", raising=False)
    return monkeypatch


def test_under_vertex_the_predictor_listens_on_aip_http_port_and_takes_no_pushes(
    env: pytest.MonkeyPatch,
) -> None:
    for key, value in AIP.items():
        env.setenv(key, value)
    env.setenv("PORT", "8080")  # AIP_HTTP_PORT comes first

    settings = load_settings(PredictorSettings)

    assert settings.on_vertex and not settings.receives_push
    assert settings.port == 7080
    assert settings.aip_predict_route == AIP["AIP_PREDICT_ROUTE"]
    assert settings.aip_storage_uri == AIP["AIP_STORAGE_URI"]


def test_elsewhere_it_takes_pushes_on_port(env: pytest.MonkeyPatch) -> None:
    env.setenv("PORT", "9000")

    settings = load_settings(PredictorSettings)

    assert not settings.on_vertex and settings.receives_push and settings.port == 9000


@pytest.mark.parametrize("missing", ["AIP_STORAGE_URI", "MLPIPE_SERVE_MODEL"])
def test_under_vertex_a_missing_variable_stops_start_up_naming_it(
    env: pytest.MonkeyPatch, missing: str
) -> None:
    for key, value in AIP.items():
        if key != missing:
            env.setenv(key, value)
    env.delenv(missing, raising=False)

    with pytest.raises(SettingsError, match=missing):
        load_settings(PredictorSettings)


def test_a_bad_port_is_named_by_the_variable_that_was_set(env: pytest.MonkeyPatch) -> None:
    env.setenv("PORT", "eighty")

    with pytest.raises(SettingsError, match="invalid setting PORT:"):
        load_settings(PredictorSettings)
