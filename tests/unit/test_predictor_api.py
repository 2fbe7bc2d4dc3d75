"""The predictor's request path without servers: validation (400/404/413, never 500),
probabilities, the Vertex AI reply shape, and the canary split."""

from __future__ import annotations

import json
import types
import warnings
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from mlpipe.ml.config import parse_config
from mlpipe.ml.data import read_dataset
from mlpipe.ml.modeling import build_pipeline
from mlpipe.ml.scoring import LoadedModel, onnx_session
from mlpipe.ml.split import split_rows
from mlpipe.ml.validation import check_dataset
from mlpipe_deployer.onnx_compile import compile_model
from mlpipe_predictor.api import PredictRoutes
from mlpipe_predictor.models import CanaryWatch, ModelStore, Served
from mlpipe_predictor.monitoring import PredictionLog, ServingMetrics
from tests.conftest import REPO

ROW = [5.1, 3.5, 1.4, 0.2]


def fitted(example: str, **params: Any) -> tuple[dict[str, Any], Any]:
    """(a training bundle as the trainer writes it, the holdout frame) for an example."""
    config = parse_config((REPO / f"examples/{example}/pipeline.yaml").read_text())
    if params:
        config = config.model_copy(
            update={"model": config.model.model_copy(update={"params": params})}
        )
    frame = read_dataset((REPO / f"examples/{example}/{example}.csv").read_bytes(), "csv", "x")
    features = check_dataset(frame, config, "x")
    split = split_rows(frame, config)
    estimator = build_pipeline(config, features)
    train = frame.iloc[split.train]
    estimator.fit(train[features], train[config.dataset.target])
    bundle = {
        "estimator": estimator,
        "features": features,
        "target": config.dataset.target,
        "task": config.model.task,
        "feature_types": {c: config.dataset.column_type(c) for c in features},
        "classes": [str(c) for c in getattr(estimator, "classes_", [])],
    }
    return bundle, frame.iloc[split.holdout]


def loaded(bundle: dict[str, Any], holdout: Any, name: str, version: int = 1) -> LoadedModel:
    """The model as the predictor holds it, ONNX when the deployer's check passes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = compile_model(bundle, holdout)
    model = LoadedModel(
        name, version, "run", "sha", "sklearn", bundle["task"], compiled.schema, bundle["classes"]
    )
    if compiled.onnx:
        model.runtime = "onnx"
        model.session = onnx_session(compiled.onnx, 1)
        model.outputs = [o.name for o in model.session.get_outputs()]
    else:
        model.estimator = bundle["estimator"]
    return model


@pytest.fixture(scope="module")
def iris() -> LoadedModel:
    return loaded(*fitted("iris", n_estimators=10, random_state=0, n_jobs=1), "iris-classifier")


@pytest.fixture(scope="module")
def regressor() -> LoadedModel:
    bundle, holdout = fitted("iris", n_estimators=10, random_state=0, n_jobs=1)
    from sklearn.ensemble import RandomForestRegressor

    estimator = bundle["estimator"]
    estimator.steps[-1] = ("model", RandomForestRegressor(n_estimators=5, random_state=0))
    estimator.fit(holdout[bundle["features"]], range(len(holdout)))
    bundle |= {"task": "regression", "classes": []}
    return loaded(bundle, holdout, "iris-regressor")


def client_for(
    models: dict[str, Served], max_body: int = 4096, log_capacity: int = 1000
) -> TestClient:
    store = ModelStore(registry=None)  # type: ignore[arg-type]
    store._served = models
    state = types.SimpleNamespace(
        store=store,
        settings=types.SimpleNamespace(max_body_bytes=max_body, inline_instances=8),
        serving_metrics=ServingMetrics(),
        # Never flushed here (no storage): the buffer is what the tests look at.
        prediction_log=PredictionLog(storage=None, capacity=log_capacity),  # type: ignore[arg-type]
    )

    class Service:
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            assert scope["type"] != "http", "a predict route reached the framework"

    inner = Service()
    inner.state = state  # type: ignore[attr-defined]
    return TestClient(PredictRoutes(inner))  # type: ignore[arg-type]


@pytest.fixture
def client(iris: LoadedModel) -> Iterator[TestClient]:
    yield client_for({"iris-classifier": Served(iris)})


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"instances": [[1, 2, 3]]}, 400, "instance 0 has 3 values; the model takes 4"),
        ({"instances": [[1, 2, "x", 4]]}, 400, "'petal_length' must be a finite number"),
        ({"instances": [[1, 2, True, 4]]}, 400, "'petal_length' must be a finite number"),
        ({"instances": [ROW, [1, 2, 3, 4, 5]]}, 400, "instance 1 has 5 values"),
        ({"instances": []}, 400, "'instances' must be a non-empty list"),
        ({"instances": {"a": 1}}, 400, "'instances' must be a non-empty list"),
        ({"instances": ["x"]}, 400, "instance 0 must be a list of 4 values or an object"),
        ({"instances": [{"sepal_length": 1}]}, 400, "lacks feature(s) ['sepal_width'"),
        ({"rows": []}, 400, "an object with an 'instances' list"),
        ([ROW], 400, "an object with an 'instances' list"),
        ({"instances": [ROW], "parameters": {"probability": True}}, 400, "unknown parameter"),
        ({"instances": [ROW], "parameters": {"probabilities": 1}}, 400, "true or false"),
        ({"instances": [ROW], "parameters": [1]}, 400, "'parameters' must be an object"),
        ({"instances": [ROW], "model": "other"}, 404, "no model 'other' is being served"),
        ({"instances": [ROW], "model": 3}, 400, "'model' must be a string"),
    ],
)
def test_bad_requests_are_4xx_naming_the_problem(
    client: TestClient, body: Any, status: int, fragment: str
) -> None:
    reply = client.post("/predict", json=body)

    assert reply.status_code == status
    assert fragment in reply.json()["error"]["message"]
    assert reply.json()["error"]["code"] == status


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"{not json", "body is not JSON"),
        (b'{"instances": [[NaN, 1, 2, 3]]}', "must be a finite number, got nan"),
        (b'{"instances": [[1e999, 1, 2, 3]]}', "must be a finite number, got inf"),
        (b"[" * 100_000 + b"]" * 100_000, "body is"),
        (b"\xff\xfe", "body is not JSON"),
    ],
)
def test_malformed_bodies_are_400(client: TestClient, raw: bytes, fragment: str) -> None:
    big = client_for(client.app.app.state.store._served, max_body=1_000_000)  # type: ignore[attr-defined]

    reply = big.post("/predict", content=raw)

    assert reply.status_code in (400, 413)
    assert fragment in reply.json()["error"]["message"]


def test_a_body_over_the_limit_is_413_whether_declared_or_streamed(client: TestClient) -> None:
    body = json.dumps({"instances": [ROW] * 500}).encode()

    declared = client.post("/predict", content=body)
    streamed = client.post("/predict", content=iter([body[:3000], body[3000:]]))

    assert declared.status_code == 413 and "the limit is 4096" in declared.text
    assert streamed.status_code == 413 and "over the 4096-byte limit" in streamed.text


def test_missing_values_are_accepted_only_where_the_pipeline_imputes(
    client: TestClient,
) -> None:
    reply = client.post("/predict", json={"instances": [[5.1, None, 1.4, 0.2]]})

    assert reply.status_code == 200 and reply.json()["predictions"] == ["setosa"]


def test_objects_by_feature_name_and_probabilities(client: TestClient) -> None:
    names = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    named = dict(zip(names, ROW, strict=True))

    reply = client.post(
        "/v1/models/iris-classifier:predict",
        json={"instances": [named, ROW], "parameters": {"probabilities": True}},
    )

    first, second = reply.json()["predictions"]
    assert first == second
    assert first["label"] == "setosa"
    assert first["classes"] == ["setosa", "versicolor", "virginica"]
    assert first["scores"][0] > 0.9 and sum(first["scores"]) == pytest.approx(1.0)


def test_the_vertex_route_answers_with_vertex_fields(client: TestClient) -> None:
    reply = client.post(
        "/v1/projects/p1/locations/europe-west4/endpoints/iris-classifier:predict",
        json={"instances": [ROW] * 20},  # over inline_instances: scored in the thread pool
    )

    assert reply.status_code == 200
    assert reply.json() == {
        "predictions": ["setosa"] * 20,
        "deployedModelId": "1",
        "model": "projects/p1/locations/europe-west4/models/iris-classifier",
        "modelVersionId": "1",
        "modelDisplayName": "iris-classifier",
    }


def test_probabilities_of_a_regressor_are_refused(regressor: LoadedModel) -> None:
    client = client_for({"iris-regressor": Served(regressor)})

    plain = client.post("/predict", json={"instances": [ROW]})
    proba = client.post(
        "/predict", json={"instances": [ROW], "parameters": {"probabilities": True}}
    )

    assert plain.status_code == 200 and isinstance(plain.json()["predictions"][0], float)
    assert proba.status_code == 400
    assert "regression model: it has no probabilities" in proba.json()["error"]["message"]


def test_with_two_models_the_plain_route_needs_a_name(
    iris: LoadedModel, regressor: LoadedModel
) -> None:
    client = client_for({"iris-classifier": Served(iris), "iris-regressor": Served(regressor)})

    unnamed = client.post("/predict", json={"instances": [ROW]})
    named = client.post("/predict", json={"instances": [ROW], "model": "iris-regressor"})

    assert unnamed.status_code == 404
    assert "name the model: this predictor serves iris-classifier, iris-regressor" in unnamed.text
    assert named.status_code == 200 and named.json()["model"] == "iris-regressor"


@pytest.mark.parametrize("percent", [1, 10, 25, 30, 50, 99])
def test_the_canary_gets_exactly_its_percentage_spread_out(iris: LoadedModel, percent: int) -> None:
    canary = LoadedModel(**{**iris.__dict__, "version": 2})
    store = ModelStore(registry=None)  # type: ignore[arg-type]
    store._served = {"m": Served(iris, canary, percent, CanaryWatch(2, 0))}

    picks = [store.route("m")[0].version for _ in range(200)]

    assert Counter(picks)[2] == 2 * percent
    assert Counter(picks[:100])[2] == percent


def test_a_canary_with_an_error_is_never_promoted_by_itself() -> None:
    watch = CanaryWatch(2, promote_after=3)

    asked = [watch.record(ok) for ok in (True, False, True, True, True)]

    assert asked == [False] * 5 and watch.failed == 1
    fresh = CanaryWatch(3, promote_after=2)
    assert [fresh.record(True) for _ in range(4)] == [False, True, False, False]


def test_requests_errors_and_latency_are_counted_per_model_version(iris: LoadedModel) -> None:
    client = client_for({"iris-classifier": Served(iris)})
    for _ in range(3):
        assert (
            client.post("/predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]] * 2}).status_code
            == 200
        )
    assert client.post("/predict", json={"instances": [[1, 2]]}).status_code == 400
    assert (
        client.post("/v1/models/nope:predict", json={"instances": [[1, 2, 3, 4]]}).status_code
        == 404
    )

    state = client.app.state  # type: ignore[attr-defined]
    text = state.serving_metrics.render(state.prediction_log.counts)
    lines = set(text.splitlines())

    assert 'mlpipe_predict_requests_total{model="iris-classifier",version="1"} 3.0' in lines
    assert 'mlpipe_predict_instances_total{model="iris-classifier",version="1"} 6.0' in lines
    # A bad request is counted against the model it named (its version is unknown then).
    assert 'mlpipe_predict_errors_total{model="nope",version="-"} 1.0' in lines
    assert 'mlpipe_predict_errors_total{model="-",version="-"} 1.0' in lines
    assert 'mlpipe_predict_latency_seconds_count{model="iris-classifier",version="1"} 3.0' in lines
    assert (
        'mlpipe_predict_latency_seconds_bucket{le="+Inf",model="iris-classifier",version="1"} 3.0'
        in lines
    )
    assert 'mlpipe_prediction_log_records_total{outcome="sampled"} 6.0' in lines
    assert "# TYPE mlpipe_predict_latency_seconds histogram" in lines


def test_a_full_prediction_log_drops_and_counts_without_failing_requests(iris: LoadedModel) -> None:
    client = client_for({"iris-classifier": Served(iris)}, log_capacity=2)
    for _ in range(5):
        assert (
            client.post("/predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]}).status_code == 200
        )

    log = client.app.state.prediction_log  # type: ignore[attr-defined]
    assert log.counts["sampled"] == 2 and log.counts["dropped"] == 3
    assert len(log._buffer) == 2


def test_a_canary_watch_counts_the_other_instances_successes_and_failures() -> None:
    watch = CanaryWatch(2, promote_after=10)
    watch.others_succeeded = 7  # the other instances' totals at the last check

    asked = [watch.record(True) for _ in range(4)]

    assert asked == [False, False, True, False]
    failed_elsewhere = CanaryWatch(2, promote_after=2)
    failed_elsewhere.others_failed = 1
    assert [failed_elsewhere.record(True) for _ in range(3)] == [False] * 3
