"""The whole chain through real processes: emulators, the uvicorn services, a job subprocess.

Everything goes through Pub/Sub push and fake-gcs-server's own OBJECT_FINALIZE notifications,
exactly as on Cloud Run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from google.protobuf.message import Message

from mlpipe.messaging import events
from mlpipe.messaging.publishing import Publisher
from mlpipe.messaging.push import parse_envelope
from mlpipe.store.registry import Registry
from mlpipe.store.storage import Storage, make_client, sha256_hex
from mlpipe.v1 import events_pb2
from mlpipe_ops.follow import EventWatcher
from mlpipe_ops.localstack import LocalStack, StackState, client_env
from tests.conftest import REPO, collect, free_base_port, unique

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackState]:
    state_dir = tmp_path_factory.mktemp("stack")
    local = LocalStack(
        state_dir, base_port=free_base_port(), project=unique("e2e"), bucket=unique("e2e")
    )
    state = local.up(progress=lambda _: None)
    try:
        with client_env(state):
            yield state
    finally:
        local.down(progress=lambda _: None)
        leftover = [p.name for p in state.processes if p.alive()]
        assert leftover == [], f"still running after down: {leftover}"


def served(state: StackState) -> dict:
    return httpx.get(f"{state.url('predictor')}/v1/models", timeout=5).json()["models"]


def test_cli_runs_the_iris_example_to_serving(stack: StackState) -> None:
    env = {**os.environ, "MLPIPE_STATE_DIR": stack.state_dir}

    result = subprocess.run(
        [sys.executable, "-m", "mlpipe_ops.cli", "run", "--example", "iris", "--timeout", "120"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "quality gates passed" in result.stdout
    assert "min_per_class_f1[setosa]" in result.stdout
    assert "serving iris-classifier v1" in result.stdout
    assert served(stack)["iris-classifier"]["version"] == 1


def test_champion_lineage_and_predictions(stack: StackState) -> None:
    storage = Storage(make_client(stack.project), stack.bucket)
    registry = Registry(storage)

    champion = registry.alias("iris-classifier")
    version = registry.get("iris-classifier", champion or 0)
    reply = httpx.post(
        f"{stack.url('predictor')}/predict",
        json={"instances": [[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5]]},
    )

    assert champion == 1 and version is not None
    lineage = storage.read_json(f"runs/{version.run_id}/lineage.json")
    dataset = storage.read(storage.path_of(lineage["dataset"]["uri"]))
    assert dataset is not None
    assert lineage["dataset"]["sha256"] == sha256_hex(dataset.data)
    config = storage.read(f"runs/{version.run_id}/config.json")
    assert config is not None
    assert lineage["config_sha256"] == sha256_hex(config.data)
    assert version.info["config_sha256"] == lineage["config_sha256"]
    assert lineage["model"]["sha256"] == version.model_sha256
    assert reply.status_code == 200
    assert reply.json() == {
        "predictions": ["setosa", "virginica"],
        "model": "iris-classifier",
        "modelVersionId": "1",
    }


def test_same_request_twice_and_a_redelivered_notification_make_no_new_version(
    stack: StackState,
) -> None:
    storage = Storage(make_client(stack.project), stack.bucket)
    csv_text = (REPO / "examples/iris/iris.csv").read_text()
    publisher = Publisher(stack.project)

    with EventWatcher(stack.project) as watcher:
        for _ in range(2):
            publisher.publish(
                events_pb2.IngestRequest(
                    request_id=uuid.uuid4().hex,
                    dataset="iris",
                    inline=events_pb2.InlineRows(csv=csv_text),
                )
            )
        landed = [collect(watcher, events_pb2.DatasetLanded)[-1] for _ in range(2)]
        # Redeliver the landed object's notification exactly as GCS would send it again.
        first: events_pb2.DatasetLanded = landed[0]  # type: ignore[assignment]
        publisher.publish_raw(
            events.GCS_OBJECTS,
            b"{}",
            {
                "bucketId": stack.bucket,
                "objectId": storage.path_of(first.dataset.uri),
                "objectGeneration": str(first.dataset.generation),
                "eventType": "OBJECT_FINALIZE",
                "payloadFormat": "JSON_API_V1",
            },
        )
        replayed = collect(watcher, events_pb2.DeploymentCompleted, first.context.run_id)

    assert all(e.already_present for e in landed)  # type: ignore[attr-defined]
    assert isinstance(replayed[-1], events_pb2.DeploymentCompleted)
    assert replayed[-1].version == 1
    assert Registry(storage).versions("iris-classifier") == [1]
    assert len(storage.list("datasets/iris/")) == 1


def test_a_direct_upload_becomes_the_next_champion(stack: StackState) -> None:
    storage = Storage(make_client(stack.project), stack.bucket)
    lines = (REPO / "examples/iris/iris.csv").read_text().splitlines()
    reordered = "\n".join([lines[0], *reversed(lines[1:])]) + "\n"

    with EventWatcher(stack.project) as watcher:
        # What `gcloud storage cp iris.csv gs://BUCKET/datasets/iris/dt=.../` does.
        storage.write(
            "datasets/iris/dt=2026-11-24/upload.csv", reordered.encode(), content_type="text/csv"
        )
        # Skip events of earlier runs still being re-published by their redeliveries.
        chain = collect(watcher, events_pb2.DeploymentCompleted)
        while chain[-1].dataset.sha256 != sha256_hex(reordered.encode()):  # type: ignore[attr-defined]
            chain = collect(watcher, events_pb2.DeploymentCompleted)

    done = chain[-1]
    assert isinstance(done, events_pb2.DeploymentCompleted), chain
    assert done.deployed and done.version == 2 and done.previous_version == 1
    assert done.dataset.sha256 == sha256_hex(reordered.encode())
    deadline = time.monotonic() + 30
    while served(stack)["iris-classifier"]["version"] != 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert served(stack)["iris-classifier"]["version"] == 2


def test_garbage_on_the_ingest_topic_is_reported_and_kept(stack: StackState) -> None:
    storage = Storage(make_client(stack.project), stack.bucket)

    with EventWatcher(stack.project, topics=(events.PIPELINE_FAILURES,)) as watcher:
        Publisher(stack.project).publish_raw(
            events.INGEST_REQUESTS, b"\xff\x00garbage", {"request_id": "garbage-1"}
        )
        failed = collect(watcher, events_pb2.PipelineFailed, timeout=30)[-1]

    assert isinstance(failed, events_pb2.PipelineFailed)
    assert failed.reason == "invalid_message" and failed.context.request_id == "garbage-1"
    kept = storage.read(storage.path_of(failed.quarantine_uri))
    assert kept is not None
    # The whole push envelope is kept, so the message can be replayed as it was delivered.
    assert parse_envelope(kept.data).data == b"\xff\x00garbage"


@pytest.mark.parametrize(
    ("example", "model"), [("bikeshare", "bikeshare-net-change"), ("crops", "crop-classifier")]
)
def test_the_other_examples_run_to_serving_with_a_report(
    stack: StackState, example: str, model: str, tmp_path: Path
) -> None:
    env = {**os.environ, "MLPIPE_STATE_DIR": stack.state_dir}

    result = subprocess.run(
        [sys.executable, "-m", "mlpipe_ops.cli", "run", "--example", example, "--timeout", "120"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    run_id = next(
        line.split()[1] for line in result.stdout.splitlines() if line.strip().startswith("run ")
    )
    shown = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlpipe_ops.cli",
            "report",
            run_id,
            "--out",
            str(tmp_path / "report.html"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"serving {model} v1" in result.stdout
    assert shown.returncode == 0, shown.stderr
    assert "gates passed" in shown.stdout
    page = (tmp_path / "report.html").read_text()
    assert "<svg" in page and run_id in page


def test_the_weather_example_lands_its_history_from_bigquery_then_its_providers(
    stack: StackState,
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mlpipe_ops.cli", "run", "--example", "weather"],
        cwd=REPO,
        env={**os.environ, "MLPIPE_STATE_DIR": stack.state_dir, "MLPIPE_RUN_TIMEOUT": "150"},
        capture_output=True,
        text=True,
        timeout=360,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    history, recent = out.split("for the history in BigQuery", 1)[1].split("published", 1)
    # The history is exported by the local BigQuery as Parquet and lands without passing
    # through ingest's memory; the providers' recent hours land as CSV and serve last.
    assert re.search(r"landed gs://\S+/datasets/weather/dt=\S+\.parquet \(\d+ rows\)", history)
    assert "serving weather-temp v1" in history
    assert re.search(r"landed gs://\S+/datasets/weather/dt=\S+\.csv \(\d+ rows\)", recent)
    assert "serving weather-temp v2" in recent


def test_a_run_has_a_timeline_from_request_to_deployment(stack: StackState) -> None:
    from mlpipe_ops.cli_runs import run_timeline

    storage = Storage(make_client(stack.project), stack.bucket)
    version = Registry(storage).get("iris-classifier", 1)
    assert version is not None

    hops = run_timeline(storage, version.run_id)

    assert [label for label, _ in hops] == [
        "requested",
        "landed in GCS",
        "training job started",
        "fit started",
        "model written",
        "evaluated",
        "deployed",
    ]
    times = [when for _, when in hops]
    assert times == sorted(times)


def test_a_run_is_one_trace_across_every_service_and_the_cli_draws_it(
    stack: StackState,
) -> None:
    from mlpipe import tracing
    from mlpipe_ops.statedir import TRACES_DIR

    storage = Storage(make_client(stack.project), stack.bucket)
    version = Registry(storage).get("iris-classifier", 1)
    assert version is not None
    traces = Path(stack.state_dir) / TRACES_DIR
    started = storage.read_json(f"runs/{version.run_id}/started.json") or {}
    recorded = started["context"]["trace_id"]

    def chain() -> list[dict]:
        # The trace the run's records name; the tests before this one redelivered some of its
        # messages, and a delivery that carries no context (a notification sent again by
        # hand) is a trace of its own, found by the run id too.
        return [s for s in tracing.run_spans(traces, version.run_id) if s["trace_id"] == recorded]

    deadline = time.monotonic() + 10  # each process exports every half second
    spans = chain()
    while not any(s["service"] == "predictor" for s in spans) and time.monotonic() < deadline:
        time.sleep(0.2)
        spans = chain()
    ids = {s["span_id"] for s in spans}
    roots = [s for s in spans if s["parent_id"] not in ids]
    timeline = cli(stack, "-m", "mlpipe_ops.cli", "timeline", version.run_id)

    assert {s["service"] for s in spans} >= {
        "ingest",
        "trainer",
        "training-job",
        "evaluator",
        "deployer",
        "predictor",
    }
    assert [r["name"] for r in roots] == ["ingest IngestRequest"]
    names = [s["name"] for s in spans]
    for hop in (
        "trainer ObjectFinalize",  # through the landed object's metadata
        "training job",  # through TRACEPARENT
        "fit",
        "evaluator TrainingCompleted",  # through googclient_traceparent
        "deployer EvaluationCompleted",
        "predictor DeploymentCompleted",
    ):
        assert hop in names, names
    assert timeline.returncode == 0, timeline.stderr
    assert recorded in timeline.stdout.splitlines()[1]  # "trace <id>[, <id> ...]"
    assert "predictor DeploymentCompleted" in timeline.stdout


def cli(stack: StackState, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env={**os.environ, "MLPIPE_STATE_DIR": stack.state_dir},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_drift_from_the_cli_retrains_once_through_the_chain(
    stack: StackState, tmp_path: Path
) -> None:
    if "bikeshare-net-change" not in served(stack):
        ran = cli(
            stack, "-m", "mlpipe_ops.cli", "run", "--example", "bikeshare", "--timeout", "120"
        )
        assert ran.returncode == 0, ran.stdout + ran.stderr
    champion = served(stack)["bikeshare-net-change"]["version"]

    sent = cli(stack, "examples/bikeshare/drift.py", "--rows", "600")
    with EventWatcher(stack.project) as watcher:
        first = cli(
            stack,
            "-m",
            "mlpipe_ops.cli",
            "monitor",
            "check",
            "bikeshare",
            "--out",
            str(tmp_path / "d.html"),
        )
        retrain_id = next(
            line.split()[1] for line in first.stdout.splitlines() if line.startswith("retrain: ")
        )
        retrained: list[Message] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not isinstance(
            retrained[-1:] and retrained[-1],
            events_pb2.DeploymentCompleted | events_pb2.PipelineFailed,
        ):
            for observed in watcher.events(timeout=1.0):
                if observed.event.context.request_id == retrain_id:  # type: ignore[attr-defined]
                    retrained.append(observed.event)
    # New labelled rows arrive: only the cool-down stands in the way of a second retrain.
    more = cli(stack, "examples/bikeshare/drift.py", "--rows", "50", "--seed", "2")
    second = cli(stack, "-m", "mlpipe_ops.cli", "monitor", "check", "bikeshare")

    assert sent.returncode == 0 and more.returncode == 0, sent.stderr + more.stderr
    assert first.returncode == 3, first.stdout + first.stderr  # 3: drift found
    lines = first.stdout.splitlines()
    assert {line.split()[1] for line in lines if line.startswith("  DRIFT ")} >= {
        "temperature_c",
        "wind_kmh",
    }
    stable = {line.split()[1] for line in lines if line.startswith("  stable ")}
    assert {"station", "station_kind", "hour", "weekday"} <= stable
    assert retrain_id.startswith("drift-cli-")
    assert "<svg" in (tmp_path / "d.html").read_text()
    # The retrain went through the whole chain, gated against the champion.
    landed = [e for e in retrained if isinstance(e, events_pb2.DatasetLanded)]
    assert landed and landed[0].context.request_id == retrain_id
    evaluated = [e for e in retrained if isinstance(e, events_pb2.EvaluationCompleted)]
    assert evaluated, [events.to_dict(e) for e in retrained]
    assert evaluated[0].champion_version == champion
    done = retrained[-1]
    assert isinstance(done, events_pb2.DeploymentCompleted), done
    # Drift is still there, but the cool-down holds the second retrain back.
    assert second.returncode == 3
    assert "retrain: none (" in second.stdout and "cool-down" in second.stdout
