"""Faults against the real local stack (emulators and the services as processes): every
event of a run delivered three times, some concurrently; a catalogue of bad inputs at every
entry point; a burst of a thousand ingest requests.

Each test prints its figures (`-s` or the captured output of a failure shows them); the
session's summary line collects them.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.protobuf.message import Message

from mlpipe.messaging import events
from mlpipe.messaging.publishing import Publisher
from mlpipe.messaging.push import make_envelope
from mlpipe.ml.config import config_path
from mlpipe.store.registry import Registry
from mlpipe.store.storage import Storage, make_client
from mlpipe.v1 import events_pb2
from mlpipe_ops.follow import EventWatcher
from mlpipe_ops.localstack import LocalStack, StackState, client_env
from tests.conftest import REPO, free_base_port, unique

pytestmark = pytest.mark.faults

IRIS = (REPO / "examples/iris/iris.csv").read_text()
FIGURES: dict[str, Any] = {}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackState]:
    state_dir = tmp_path_factory.mktemp("faults")
    local = LocalStack(
        state_dir, base_port=free_base_port(), project=unique("faults"), bucket=unique("faults")
    )
    state = local.up(progress=lambda _: None)
    try:
        with client_env(state):
            Storage(make_client(state.project), state.bucket).write(
                config_path("iris"), (REPO / "examples/iris/pipeline.yaml").read_bytes()
            )
            yield state
    finally:
        local.down(progress=lambda _: None)
        print(f"\nfault suite figures: {json.dumps(FIGURES)}")


@pytest.fixture(scope="module")
def storage(stack: StackState) -> Storage:
    return Storage(make_client(stack.project), stack.bucket)


def wait_for(
    watcher: EventWatcher, done: Callable[[Message], bool], timeout: float = 60.0
) -> list[Message]:
    seen: list[Message] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for observed in watcher.events(timeout=0.5):
            seen.append(observed.event)
            if done(observed.event):
                return seen
    raise AssertionError(f"timed out; saw {[events.to_dict(e) for e in seen][:5]}")


def push(stack: StackState, service: str, body: bytes, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{stack.url(service)}/pubsub/push", content=body, timeout=timeout)


def envelope(event: Message, message_id: str, subscription: str = "") -> bytes:
    attrs = {events.EVENT_TYPE_ATTR: event.DESCRIPTOR.full_name}
    run_id = getattr(getattr(event, "context", None), "run_id", "")
    if run_id:
        attrs["run_id"] = run_id
    return make_envelope(
        events.encode(event),
        attributes=attrs,
        message_id=message_id,
        subscription=subscription or "projects/p/subscriptions/s",
    )


def log_problems(stack: StackState) -> list[str]:
    """Unhandled exceptions in the services' logs: tracebacks or 'unexpected error' lines."""
    found = []
    for log in Path(stack.state_dir, "logs").glob("*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if "Traceback" in line or "unexpected error" in line:
                # The start (the message) and the end (where the exception was raised).
                shown = line if len(line) <= 600 else f"{line[:300]} … {line[-300:]}"
                found.append(f"{log.name}: {shown}")
    return found


# --- 1. duplicate storm -------------------------------------------------------------------
def test_every_event_of_a_run_delivered_three_times_makes_one_version(
    stack: StackState, storage: Storage
) -> None:
    lines = IRIS.strip().splitlines()
    csv_text = "\n".join([lines[0], *sorted(lines[1:])]) + "\n"  # new bytes: a new run
    request = events_pb2.IngestRequest(
        request_id=f"storm-{uuid.uuid4().hex[:8]}",
        dataset="iris",
        inline=events_pb2.InlineRows(csv=csv_text),
    )
    with EventWatcher(stack.project) as watcher:
        # The request itself, three times at once through Pub/Sub.
        publisher = Publisher(stack.project)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda _: publisher.publish(request), range(3)))
        chain = wait_for(watcher, lambda e: isinstance(e, events_pb2.DeploymentCompleted))
        time.sleep(2)  # let the duplicates' own echoes arrive
        chain += [o.event for o in watcher.events(timeout=1.0)]

    by_type = {type(e).__name__: e for e in chain}
    done = by_type["DeploymentCompleted"]
    assert isinstance(done, events_pb2.DeploymentCompleted) and done.deployed
    run_id = done.context.run_id
    # Then every event of the run again, three times each, two of them concurrently.
    replays = [
        ("ingest", request),
        ("trainer", by_type["DatasetLanded"]),
        ("evaluator", by_type["TrainingCompleted"]),
        ("deployer", by_type["EvaluationCompleted"]),
        ("deployer", by_type["TrainingCompleted"]),  # the early-compile subscription
        ("predictor", done),
    ]
    statuses: list[int] = []
    for service, event in replays:
        bodies = [envelope(event, f"dup-{service}-{i}") for i in range(3)]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            replies = list(pool.map(lambda b, s=service: push(stack, s, b), bodies))
        statuses += [r.status_code for r in replies]
    time.sleep(2)

    registry = Registry(storage)
    versions = [registry.get("iris-classifier", v) for v in registry.versions("iris-classifier")]
    runs_versions = [v for v in versions if v is not None and v.run_id == run_id]
    FIGURES["duplicate_deliveries"] = 2 + len(statuses)
    assert statuses == [200] * len(statuses)
    assert len(runs_versions) == 1
    assert registry.version_for_run("iris-classifier", run_id) == done.version
    assert storage.list(f"runs/{run_id}/") and storage.exists(f"runs/{run_id}/deployment.json")


# --- 2. the poison catalogue --------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def raw_envelope(data: bytes, **attrs: str) -> bytes:
    return json.dumps(
        {
            "message": {
                "data": _b64(data),
                "attributes": attrs,
                "messageId": uuid.uuid4().hex[:8],
                "publishTime": "2026-11-23T00:00:00Z",
            },
            "subscription": "projects/p/subscriptions/s",
        }
    ).encode()


def ingest_json(payload: dict[str, Any]) -> bytes:
    return raw_envelope(json.dumps(payload).encode(), request_id=uuid.uuid4().hex[:8])


PUSH_BODIES: list[tuple[str, str, bytes, int]] = [
    # (what, service, body, expected status)
    ("empty body", "ingest", b"", 400),
    ("not JSON", "ingest", b"{{{", 400),
    ("JSON array", "trainer", b"[]", 400),
    ("no message", "evaluator", b'{"subscription": "s"}', 400),
    ("message not an object", "deployer", b'{"message": "x"}', 400),
    ("data not base64", "predictor", b'{"message": {"data": "!!!", "messageId": "1"}}', 400),
    ("attributes not strings", "ingest", b'{"message": {"data": "", "attributes": {"a": 1}}}', 400),
    (
        "deliveryAttempt not a number",
        "ingest",
        b'{"message": {"data": ""}, "deliveryAttempt": "x"}',
        400,
    ),
    ("binary garbage as IngestRequest", "ingest", raw_envelope(b"\xff\x00\x13garbage"), 200),
    (
        "JSON with an unknown field",
        "ingest",
        ingest_json({"dataset": "iris", "colour": "red"}),
        200,
    ),
    (
        "JSON with a wrong type",
        "ingest",
        ingest_json({"dataset": ["iris"], "inline": {"csv": "a"}}),
        200,
    ),
    ("no source", "ingest", ingest_json({"requestId": "x", "dataset": "iris"}), 200),
    (
        "unknown pipeline",
        "ingest",
        ingest_json({"dataset": "nope", "inline": {"csv": "a\n1\n"}}),
        200,
    ),
    (
        "pipeline name with ..",
        "ingest",
        ingest_json({"dataset": "../iris", "inline": {"csv": "a\n1\n"}}),
        200,
    ),
    (
        "CSV without the target",
        "ingest",
        ingest_json(
            {
                "dataset": "iris",
                "inline": {
                    "csv": "sepal_length,sepal_width,petal_length,petal_width\n1,2,3,4\n" * 1
                },
            }
        ),
        200,
    ),
    (
        "CSV with a text feature",
        "ingest",
        ingest_json({"dataset": "iris", "inline": {"csv": IRIS.replace("5.1,3.5", "five,3.5", 1)}}),
        200,
    ),
    ("empty CSV", "ingest", ingest_json({"dataset": "iris", "inline": {"csv": ""}}), 200),
    (
        "header only",
        "ingest",
        ingest_json({"dataset": "iris", "inline": {"csv": IRIS.splitlines()[0] + "\n"}}),
        200,
    ),
    (
        "ragged rows",
        "ingest",
        ingest_json({"dataset": "iris", "inline": {"csv": IRIS + "1,2\n"}}),
        200,
    ),
    (
        "too few rows",
        "ingest",
        ingest_json(
            {"dataset": "iris", "inline": {"csv": "\n".join(IRIS.splitlines()[:5]) + "\n"}}
        ),
        200,
    ),
    (
        "inline over the cap",
        "ingest",
        ingest_json({"dataset": "iris", "inline": {"csv": "sepal_length\n" + "1\n" * 3_000_000}}),
        200,
    ),
    (
        "http URL that refuses",
        "ingest",
        ingest_json({"dataset": "iris", "http": {"urls": ["http://127.0.0.1:9/x.csv"]}}),
        200,  # no delivery count (no dead-letter policy): permanent at once, as documented
    ),
    (
        "gcs object outside allowed buckets",
        "ingest",
        ingest_json({"dataset": "iris", "gcs": {"uri": "gs://someone-else/x.csv"}}),
        200,
    ),
    ("garbage TrainingCompleted", "evaluator", raw_envelope(b"\xffnope"), 200),
    (
        "TrainingCompleted with a bad run id",
        "evaluator",
        envelope(
            events_pb2.TrainingCompleted(context=events_pb2.RunContext(run_id="../../x")), "p1"
        ),
        200,
    ),
    (
        "EvaluationCompleted for a missing model",
        "deployer",
        envelope(
            events_pb2.EvaluationCompleted(
                context=events_pb2.RunContext(run_id="0123456789abcdef"),
                model_name="iris-classifier",
                passed=True,
                model_uri="gs://x/none.joblib",
                model_sha256="0" * 64,
            ),
            "p2",
        ),
        200,
    ),
    (
        "notification for an object outside datasets/",
        "trainer",
        raw_envelope(
            b"{}",
            bucketId="b",
            objectId="notes/readme.txt",
            objectGeneration="1",
            eventType="OBJECT_FINALIZE",
            payloadFormat="JSON_API_V1",
        ),
        200,
    ),
    (
        "notification with a non-numeric generation",
        "trainer",
        raw_envelope(
            b"{}",
            bucketId="b",
            objectId="datasets/iris/dt=2026-01-01/x.csv",
            objectGeneration="many",
            eventType="OBJECT_FINALIZE",
        ),
        200,  # a valid envelope with a bad notification: acknowledged, kept, reported
    ),
    (
        "DeploymentCompleted for a model never registered",
        "predictor",
        envelope(
            events_pb2.DeploymentCompleted(model_name="ghost", deployed=True, version=3), "p3"
        ),
        200,
    ),
    (
        "batch request with a .. model",
        "predictor",
        envelope(
            events_pb2.BatchPredictionRequest(
                batch_id="b1", model_name="..", input_uri="gs://x/y.csv"
            ),
            "p4",
        ),
        200,
    ),
]

PREDICTS: list[tuple[str, Any, int]] = [
    ("not JSON", b"{{", 400),
    ("no instances", {"rows": []}, 400),
    ("empty instances", {"instances": []}, 400),
    ("instances not a list", {"instances": "abc"}, 400),
    ("wrong feature count", {"instances": [[1, 2, 3]]}, 400),
    ("a string for a number", {"instances": [["a", 2, 3, 4]]}, 400),
    ("a missing named feature", {"instances": [{"sepal_length": 1}]}, 400),
    ("unknown parameter", {"instances": [[1, 2, 3, 4]], "parameters": {"temperature": 2}}, 400),
    ("unknown model", {"instances": [[1, 2, 3, 4]], "model": "ghost"}, 404),
    ("body over the limit", {"instances": [[1.0, 2.0, 3.0, 4.0]] * 80_000}, 413),
]


def served_or_known(event: Message) -> bool:
    if isinstance(event, events_pb2.DatasetLanded):
        return event.already_present
    return isinstance(event, events_pb2.DeploymentCompleted)


def test_the_poison_catalogue_gets_its_documented_answers(
    stack: StackState, storage: Storage
) -> None:
    # The iris model must be served for the predict cases.
    with EventWatcher(stack.project) as watcher:
        Publisher(stack.project).publish(
            events_pb2.IngestRequest(
                request_id="poison-base", dataset="iris", inline=events_pb2.InlineRows(csv=IRIS)
            )
        )
        wait_for(watcher, served_or_known)
    results = []
    for what, service, body, expected in PUSH_BODIES:
        reply = push(stack, service, body)
        results.append((what, service, expected, reply.status_code, reply.text[:200]))
    for what, body, expected in PREDICTS:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        reply = httpx.post(f"{stack.url('predictor')}/predict", content=content, timeout=30)
        detail = reply.json().get("error", {}).get("message", "") if reply.content else ""
        results.append((what, "predict", expected, reply.status_code, detail))
        assert detail, f"{what}: no message naming the problem"

    for what, service, _, status, text in results:
        print(f"  {service:<9} {status}  {what}: {text[:150]}")
    wrong = [r for r in results if r[2] != r[3]]
    FIGURES["bad_inputs"] = len(results)
    assert len(results) >= 30
    assert wrong == [], "\n".join(f"{w}: expected {e}, got {g} {t}" for w, _, e, g, t in wrong)
    # Every push that was acknowledged as rejected kept its input in quarantine.
    rejected = [r for r in results if r[3] == 200 and '"rejected"' in r[4]]
    assert rejected and storage.list("quarantine/")
    assert log_problems(stack) == []


# --- 3. a burst -------------------------------------------------------------------------------
# Cloud Run's defaults for a liveness probe (the Admin API's Probe: timeoutSeconds defaults to
# 1, failureThreshold to 3): a probe fails past 1 s, and 3 failures in a row restart it.
LIVENESS_TIMEOUT = 1.0
LIVENESS_FAILURES = 3


def burst_of_a_thousand(stack: StackState, within: float = 180.0) -> dict[str, Any]:
    """A thousand ingest requests published at once (one in ten naming no pipeline); its
    figures once every one is accounted for by a DatasetLanded or a PipelineFailed (or
    `within` seconds have passed). Shared with the suite at N instances (test_instances.py)."""
    publisher = Publisher(stack.project)
    good = IRIS  # identical bytes: one landing, the rest recognised as already there
    ids = [f"burst-{i:04d}" for i in range(1000)]
    requests = [
        events_pb2.IngestRequest(
            request_id=rid,
            # One in ten names a pipeline that does not exist: those fail with a reason.
            dataset="iris" if i % 10 else "no-such-pipeline",
            inline=events_pb2.InlineRows(csv=good),
        )
        for i, rid in enumerate(ids)
    ]
    slowest_health = 0.0
    # Cloud Run restarts an instance whose liveness probe fails LIVENESS_FAILURES times in a
    # row, each failing past LIVENESS_TIMEOUT: the longest such run of slow answers per service.
    slow_in_a_row = dict.fromkeys(("ingest", "trainer", "predictor"), 0)
    most_slow_in_a_row = 0
    accounted: dict[str, str] = {}
    topics = (events.DATASETS_LANDED, events.PIPELINE_FAILURES)
    with EventWatcher(stack.project, topics=topics) as watcher:
        started = time.monotonic()
        futures = [
            publisher.client.publish(
                publisher.topic_path(events.INGEST_REQUESTS),
                events.encode(r),
                request_id=r.request_id,
                event_type=r.DESCRIPTOR.full_name,
            )
            for r in requests
        ]
        for f in futures:
            f.result(timeout=60)
        published = time.monotonic() - started
        deadline = time.monotonic() + within
        while len(accounted) < len(ids) and time.monotonic() < deadline:
            for service in ("ingest", "trainer", "predictor"):
                t0 = time.monotonic()
                httpx.get(f"{stack.url(service)}/healthz", timeout=5).raise_for_status()
                answered = time.monotonic() - t0
                slowest_health = max(slowest_health, answered)
                slow = answered >= LIVENESS_TIMEOUT
                slow_in_a_row[service] = slow_in_a_row[service] + 1 if slow else 0
                most_slow_in_a_row = max(most_slow_in_a_row, slow_in_a_row[service])
            for observed in watcher.events(timeout=0.2):
                event = observed.event
                rid = event.context.request_id  # type: ignore[attr-defined]
                if rid.startswith("burst-"):
                    accounted.setdefault(rid, type(event).__name__)
        took = time.monotonic() - started

    failed = sum(1 for v in accounted.values() if v == "PipelineFailed")
    return {
        "requests": len(ids),
        "accounted": len(accounted),
        "landed": len(accounted) - failed,
        "failed_with_reason": failed,
        "lost": len(ids) - len(accounted),
        "lost_ids": sorted(set(ids) - set(accounted))[:10],
        "publish_seconds": round(published, 2),
        "all_accounted_seconds": round(took, 2),
        "slowest_health_seconds": round(slowest_health, 3),
        "most_slow_health_answers_in_a_row": most_slow_in_a_row,
    }


def test_a_burst_of_a_thousand_requests_is_all_accounted_for(stack: StackState) -> None:
    figures = burst_of_a_thousand(stack)
    lost_ids = figures.pop("lost_ids")
    FIGURES["burst"] = figures
    print(f"burst: {figures}")
    assert figures["lost"] == 0, f"lost: {lost_ids}"
    assert figures["failed_with_reason"] == 100
    # Slow health answers are counted as Cloud Run's liveness probe would: never enough of
    # them in a row for it to restart a service mid-burst.
    assert figures["most_slow_health_answers_in_a_row"] < LIVENESS_FAILURES
    assert log_problems(stack) == []
