"""Drift checks on the emulators: the bike-share model served by the real predictor app, its
prediction log written to GCS, the evaluator's check reading it back."""

from __future__ import annotations

import io
import random
import time

import httpx
import pandas as pd
import pytest

from mlpipe.messaging import events, topology
from mlpipe.messaging.push import make_envelope, parse_envelope
from mlpipe.ml.config import PipelineConfig, parse_config
from mlpipe.v1 import events_pb2
from mlpipe_evaluator.evaluation import Evaluator
from tests.integration.conftest import REPO, Cloud
from tests.integration.test_serving import deploy, predictor, trained

pytestmark = pytest.mark.integration

FEATURES = [
    "station",
    "station_kind",
    "hour",
    "weekday",
    "temperature_c",
    "precipitation_mm",
    "wind_kmh",
]
SHIFTED = {"temperature_c", "wind_kmh"}


@pytest.fixture
def bikeshare(cloud: Cloud) -> tuple[PipelineConfig, pd.DataFrame]:
    """The bike-share example trained, registered and made champion on this test's bucket."""
    config = parse_config((REPO / "examples/bikeshare/pipeline.yaml").read_text())
    cloud.apply_config(config)
    csv_text = (REPO / "examples/bikeshare/bikeshare.csv").read_text()
    done = deploy(cloud, trained(cloud, config, csv_text))
    assert done.deployed, done.reason
    return config, pd.read_csv(io.StringIO(csv_text))


def serve_requests(cloud: Cloud, monkeypatch: pytest.MonkeyPatch, rows: pd.DataFrame) -> None:
    """Send `rows` to the predictor, 25 instances a request, and flush its prediction log."""
    with predictor(cloud, monkeypatch, MLPIPE_PREDICTION_LOG_FLUSH_SECONDS="60") as served:
        records = rows[FEATURES].to_dict(orient="records")
        for start in range(0, len(records), 25):
            reply = httpx.post(
                f"{served.url}/v1/models/bikeshare-net-change:predict",
                json={"instances": records[start : start + 25]},
                timeout=30,
            )
            assert reply.status_code == 200, reply.text
        flushed = httpx.post(f"{served.url}/v1/monitoring:flush", timeout=30).json()
        metrics = httpx.get(f"{served.url}/metrics", timeout=10).text
    assert flushed["written"] == len(records) and flushed["dropped"] == 0
    assert (
        f'mlpipe_predict_instances_total{{model="bikeshare-net-change",version="1"}} {len(records)}'
        in metrics
    )


def drawn(frame: pd.DataFrame, n: int, seed: int, shift: bool) -> pd.DataFrame:
    rows = frame.sample(n=n, random_state=seed).reset_index(drop=True)
    if shift:
        # A heat wave with strong wind: the weather the model never trained on.
        rng = random.Random(seed)
        rows["temperature_c"] = [round(t + 11 + rng.gauss(0, 1), 1) for t in rows["temperature_c"]]
        rows["wind_kmh"] = [round(w * 2.2 + 8, 1) for w in rows["wind_kmh"]]
    return rows


def run_check(cloud: Cloud, request_id: str) -> dict:
    evaluator = Evaluator(cloud.storage, cloud.publisher, "test")
    request = events_pb2.MonitoringRequest(request_id=request_id, pipeline="bikeshare")
    subscription = f"projects/{cloud.project}/subscriptions/{topology.MONITOR_PUSH}"
    result = evaluator(
        parse_envelope(make_envelope(events.encode(request), subscription=subscription))
    )
    report = cloud.storage.read_json(
        f"monitoring/bikeshare-net-change/reports/{result.detail['check_id']}/drift.json"
    )
    assert report is not None and report["status"] == result.status
    return report


def test_shifted_weather_is_detected_by_feature_and_retrains_once(
    cloud: Cloud,
    monkeypatch: pytest.MonkeyPatch,
    bikeshare: tuple[PipelineConfig, pd.DataFrame],
) -> None:
    _, frame = bikeshare
    labelled = drawn(frame, 300, seed=7, shift=True)
    cloud.storage.write("labels/bikeshare/heatwave.csv", labelled.to_csv(index=False).encode())
    serve_requests(cloud, monkeypatch, drawn(frame, 600, seed=1, shift=True))
    cloud.watch(events.DRIFT_DETECTED, events.INGEST_REQUESTS)

    first = run_check(cloud, "check-1")
    second = run_check(cloud, "check-2")

    drifted = {f["name"] for f in first["features"] if f["drifted"]}
    assert first["status"] == "drift"
    assert drifted == SHIFTED, first["features"]
    detected = cloud.pulled(events.DRIFT_DETECTED, expect=2)
    assert len(detected) == 2
    assert {f.name for f in detected[0].features if f.drifted} == SHIFTED
    assert detected[0].report_uri.endswith("/reports/check-1/drift.html")
    # The retrain happens once: the second check is inside the cool-down.
    retrains = cloud.pulled(events.INGEST_REQUESTS, expect=1, settle=1.0)
    assert [r.request_id for r in retrains] == ["drift-check-1"]
    assert first["retrain_request_id"] == "drift-check-1"
    assert second["status"] == "drift" and second["retrain_request_id"] == ""
    assert "cool-down" in second["retrain_note"]
    # What it asks ingest to land: the champion's dataset plus the labelled rows.
    combined = cloud.storage.read(cloud.storage.path_of(retrains[0].gcs.uri))
    assert combined is not None
    assert len(pd.read_csv(io.BytesIO(combined.data))) == len(frame) + len(labelled)
    html = cloud.storage.read("monitoring/bikeshare-net-change/reports/check-1/drift.html")
    assert html is not None and b"temperature_c" in html.data and b"<svg" in html.data


def test_requests_from_the_training_distribution_raise_no_alarm(
    cloud: Cloud,
    monkeypatch: pytest.MonkeyPatch,
    bikeshare: tuple[PipelineConfig, pd.DataFrame],
) -> None:
    config, frame = bikeshare
    train_rows = frame[pd.to_datetime(frame["timestamp"]) < pd.Timestamp(config.split.cutoff)]
    serve_requests(cloud, monkeypatch, drawn(train_rows, 600, seed=11, shift=False))
    cloud.watch(events.DRIFT_DETECTED)

    report = run_check(cloud, "calm")

    assert report["status"] == "stable", [f for f in report["features"] if f["drifted"]]
    assert not report["prediction"]["drifted"]
    assert cloud.pulled(events.DRIFT_DETECTED, expect=1, timeout=2.0) == []


def test_too_few_served_rows_give_no_verdict(
    cloud: Cloud, bikeshare: tuple[PipelineConfig, pd.DataFrame]
) -> None:
    report = run_check(cloud, "early")

    assert report["status"] == "not_enough_data"
    assert "fewer than monitoring.min_samples (200)" in report["verdict"]


def test_the_prediction_log_is_written_in_batches_off_the_request_path(
    cloud: Cloud, monkeypatch: pytest.MonkeyPatch, bikeshare: tuple[PipelineConfig, pd.DataFrame]
) -> None:
    _, frame = bikeshare
    rows = frame[FEATURES].head(40).to_dict(orient="records")
    with predictor(cloud, monkeypatch, MLPIPE_PREDICTION_LOG_FLUSH_SECONDS="0.2") as served:
        for row in rows:
            assert httpx.post(f"{served.url}/predict", json={"instances": [row]}).status_code == 200
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            counts = httpx.get(f"{served.url}/v1/monitoring").json()["prediction_log"]
            if counts["written"] == len(rows):
                break
            time.sleep(0.1)
    assert counts == {"sampled": 40, "dropped": 0, "written": 40, "write_failed": 0}
    written = [
        line
        for path in cloud.storage.list("monitoring/bikeshare-net-change/")
        for line in cloud.storage.read(path).data.decode().splitlines()  # type: ignore[union-attr]
    ]
    assert len(written) == 40
    assert all('"version":1' in line and '"temperature_c"' in line for line in written)


def test_labelled_rows_already_in_the_champions_dataset_start_no_retrain(
    cloud: Cloud, bikeshare: tuple[PipelineConfig, pd.DataFrame]
) -> None:
    from mlpipe_evaluator.monitor import retrain_request

    config, frame = bikeshare
    labelled = drawn(frame, 50, seed=3, shift=True)
    cloud.storage.write("labels/bikeshare/a.csv", labelled.to_csv(index=False).encode())
    with_labels = pd.concat([frame, labelled], ignore_index=True).to_csv(index=False).encode()
    more = drawn(frame, 20, seed=4, shift=True)

    none_new, why = retrain_request(cloud.storage, config, with_labels, "csv", "c1")
    cloud.storage.write("labels/bikeshare/b.csv", more.to_csv(index=False).encode())
    request, note = retrain_request(cloud.storage, config, with_labels, "csv", "c2")

    assert none_new is None and why.startswith("no new labelled rows")
    assert request is not None and note.endswith("+ 20 new labelled rows")


def test_the_cool_down_holds_across_a_period_boundary(cloud: Cloud) -> None:
    import datetime as dt

    from mlpipe.ml.config import MonitoringSpec, RetrainSpec
    from mlpipe_evaluator.monitor import claim_retrain

    spec = MonitoringSpec(retrain=RetrainSpec(enabled=True, cooldown_minutes=60))
    before = dt.datetime(2026, 11, 23, 5, 59, 30, tzinfo=dt.UTC)
    after = before + dt.timedelta(minutes=1)  # the next clock hour, one minute later
    later = before + dt.timedelta(minutes=61)

    first = claim_retrain(cloud.storage, "m", spec, before, "c1")
    second = claim_retrain(cloud.storage, "m", spec, after, "c2")
    third = claim_retrain(cloud.storage, "m", spec, later, "c3")

    assert first[0] and not second[0] and "cool-down" in second[1]
    assert third[0], third[1]
