"""How long a new dataset's notification waits for its TrainingStarted while jobs run.

Five datasets start five training jobs that never finish (their claims hold a long lease);
then new datasets land one by one, and each one's delay is timed from the publication of its
OBJECT_FINALIZE notification to the TrainingStarted the trainer publishes for it. The trainer
is the real step (mlpipe_trainer.start.TrainingStarter) behind the real push adapter, on the
Pub/Sub emulator and fake-gcs-server, with a push subscription configured as the local stack
configures it; only the job launcher starts nothing (a job that runs for as long as the
measurement does).

    uv run --frozen python bench/trainer/delivery_delay.py [--running 5] [--new 5]

A trainer that holds each running job's notification with 503 keeps five deliveries in
redelivery on the subscription; one that acknowledges them once their runs are recorded
keeps none.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from google.cloud import pubsub_v1

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from mlpipe.messaging import events  # noqa: E402
from mlpipe.messaging.publishing import Publisher  # noqa: E402
from mlpipe.ml.config import PipelineConfig, config_path, parse_config  # noqa: E402
from mlpipe.runtime.clients import Clients  # noqa: E402
from mlpipe.runtime.failures import FailureReporter  # noqa: E402
from mlpipe.runtime.service import create_app  # noqa: E402
from mlpipe.runtime.settings import CommonSettings, load_settings  # noqa: E402
from mlpipe.store.storage import Storage, make_client, sha256_hex  # noqa: E402
from mlpipe.v1 import events_pb2  # noqa: E402
from mlpipe_ops.localstack import LocalStack, client_env  # noqa: E402
from mlpipe_trainer.start import TrainingStarter  # noqa: E402
from tests.conftest import free_base_port  # noqa: E402


class EndlessJobs:
    """The local backend's place: each job "runs" until the measurement ends."""

    backend = "local"
    start_lease_seconds = 3600.0

    def launch(self, started: events_pb2.TrainingStarted, config: PipelineConfig) -> str:
        return f"endless-{started.context.run_id}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Push replies by status code, over the timed part of the measurement.
REPLIES: dict[int, int] = {}


def serve_trainer(project: str, bucket: str, port: int) -> uvicorn.Server:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings = load_settings(CommonSettings)
        storage = Storage(make_client(project), bucket)
        publisher = Publisher(project)
        failures = FailureReporter(storage, publisher, stage="trainer", code_version="bench")
        app.state.clients = Clients(settings, storage, publisher, failures)
        app.state.step = TrainingStarter(
            storage, publisher, {"local": EndlessJobs()}, "bench", 3600.0
        )
        yield

    app = create_app("trainer", lifespan)

    @app.middleware("http")
    async def count(request, call_next):  # type: ignore[no-untyped-def]
        response = await call_next(request)
        REPLIES[response.status_code] = REPLIES.get(response.status_code, 0) + 1
        return response

    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, daemon=True, name="trainer").start()
    while not server.started:
        time.sleep(0.05)
    return server


def land(storage: Storage, csv: bytes, n: int) -> tuple[str, int, str]:
    data = csv + f"{5 + n / 1000:.3f},3.0,1.4,0.2,setosa\n".encode()  # one run per n
    path = f"datasets/iris/dt=2026-11-23/bench-{uuid.uuid4().hex[:12]}.csv"
    sha = sha256_hex(data)
    generation = storage.write(path, data, content_type="text/csv", metadata={"sha256": sha})
    return path, generation, sha


def notify(
    publisher: pubsub_v1.PublisherClient, topic: str, bucket: str, path: str, gen: int, sha: str
) -> None:
    resource = {
        "kind": "storage#object",
        "bucket": bucket,
        "name": path,
        "generation": str(gen),
        "metadata": {"sha256": sha},
    }
    publisher.publish(
        topic,
        json.dumps(resource).encode(),
        bucketId=bucket,
        objectId=path,
        objectGeneration=str(gen),
        eventType="OBJECT_FINALIZE",
        payloadFormat="JSON_API_V1",
    ).result(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--running", type=int, default=5, help="jobs running meanwhile")
    parser.add_argument("--new", type=int, default=5, help="new datasets timed")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds before timing")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mlpipe-delay-"))
    stack = LocalStack(
        root,
        base_port=free_base_port(),
        project=f"delay-{uuid.uuid4().hex[:8]}",
        bucket=f"delay-{uuid.uuid4().hex[:8]}",
    )
    state = stack.up(services=False, progress=lambda _: None)
    try:
        with client_env(state):
            return measure(state.project, state.bucket, args)
    finally:
        stack.down(progress=lambda _: None)


def measure(project: str, bucket: str, args: argparse.Namespace) -> int:
    own = f"{project}-t"  # topics of this measurement only (the stack's own have no trainer)
    storage = Storage(make_client(own), bucket)
    config = parse_config((REPO / "examples/iris/pipeline.yaml").read_text())
    storage.write(config_path(config.name), config.to_yaml().encode())
    csv = (REPO / "examples/iris/iris.csv").read_bytes()
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    topics = {
        t: publisher.topic_path(own, t)
        for t in (events.GCS_OBJECTS, events.TRAINING_STARTED, events.PIPELINE_FAILURES)
    }
    for path in topics.values():
        publisher.create_topic(request={"name": path})
    port = free_port()
    server = serve_trainer(own, bucket, port)
    # As the local stack configures a push subscription: no retry policy (the emulator then
    # retries a refused push about once a second), many attempts.
    subscriber.create_subscription(
        request={
            "name": subscriber.subscription_path(own, "trainer-push"),
            "topic": topics[events.GCS_OBJECTS],
            "push_config": {"push_endpoint": f"http://127.0.0.1:{port}/pubsub/push"},
            "ack_deadline_seconds": 60,
        }
    )
    watch = subscriber.subscription_path(own, "started-watch")
    subscriber.create_subscription(
        request={"name": watch, "topic": topics[events.TRAINING_STARTED]}
    )
    seen: dict[str, float] = {}

    def on_started(message: pubsub_v1.subscriber.message.Message) -> None:
        started = events.decode(events_pb2.TrainingStarted, message.data)
        seen.setdefault(started.dataset.sha256, time.monotonic())
        message.ack()

    stream = subscriber.subscribe(watch, on_started)
    try:
        shas = []
        for n in range(args.running):
            path, gen, sha = land(storage, csv, n)
            notify(publisher, topics[events.GCS_OBJECTS], bucket, path, gen, sha)
            shas.append(sha)
        deadline = time.monotonic() + 120
        while not all(s in seen for s in shas) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not all(s in seen for s in shas):
            print("the running jobs did not all start", file=sys.stderr)
            return 1
        time.sleep(args.settle)
        REPLIES.clear()
        t_start = time.monotonic()
        delays = []
        for n in range(args.new):
            path, gen, sha = land(storage, csv, 100 + n)
            t0 = time.monotonic()
            notify(publisher, topics[events.GCS_OBJECTS], bucket, path, gen, sha)
            while sha not in seen and time.monotonic() - t0 < 300:
                time.sleep(0.01)
            delays.append(seen.get(sha, float("inf")) - t0)
            time.sleep(1.0)
        timed = time.monotonic() - t_start
    finally:
        stream.cancel()
        server.should_exit = True
    refused = sum(n for code, n in REPLIES.items() if code >= 500)
    print(
        f"push replies while timing ({timed:.0f} s): {dict(sorted(REPLIES.items()))}; "
        f"{refused / timed:.1f} refused pushes/s"
    )
    print(
        f"{args.running} jobs running: notification → TrainingStarted "
        f"median {statistics.median(delays):.3f} s, max {max(delays):.3f} s "
        f"over {len(delays)} new datasets ({', '.join(f'{d:.3f}' for d in delays)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
