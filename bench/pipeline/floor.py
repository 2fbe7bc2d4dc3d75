"""The emulators' own floor: how long a hop takes when the service does nothing.

    uv run --frozen python bench/pipeline/floor.py --samples 40

On a stack of its own (the two emulators only, free ports, state under /tmp), three deliveries
to a tiny local endpoint that only notes the time (a stdlib HTTP server, no FastAPI):

- push: publish to a topic whose push subscription posts to the endpoint (the product's push
  settings: ack deadline 60 s, backoff 1..60 s); publish call → request received.
- gcs: write an object under the notification prefix of fake-gcs-server; the notification
  topic's push subscription posts to the endpoint; write call → request received.
- pull: publish an event to a topic followed by mlpipe_ops.follow.EventWatcher (streaming pull, as
  the chain benchmark watches); publish call → event dequeued. This is the watcher's own lag,
  inside every arrival chain.py records.

Samples are sequential (each waits for its delivery), so they measure latency, not throughput.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
import uuid
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from common import free_base_port, load, p50_p95
from google.cloud import pubsub_v1
from google.pubsub_v1.types import PushConfig, RetryPolicy, Subscription

from mlpipe.messaging import events, topology
from mlpipe.messaging.publishing import Publisher
from mlpipe.store.storage import Storage, make_client
from mlpipe.v1 import events_pb2
from mlpipe_ops.follow import EventWatcher
from mlpipe_ops.localstack import HOST, LocalStack, client_env, free_port


class Endpoint:
    """POST / → note (key, time) and answer 204; the key is the `seq` attribute, or the
    object name for a storage notification."""

    def __init__(self) -> None:
        self.received: dict[str, float] = {}
        self.cond = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn answers

            def do_POST(self) -> None:
                now = time.time()
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                try:
                    attrs = json.loads(body)["message"].get("attributes") or {}
                    key = attrs.get("seq") or attrs.get("objectId") or ""
                except (ValueError, KeyError, TypeError):
                    key = ""
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                with outer.cond:
                    outer.received.setdefault(key, now)
                    outer.cond.notify_all()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((HOST, free_port()), Handler)
        self.url = f"http://{HOST}:{self.server.server_port}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, key: str, timeout: float = 30.0) -> float | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while key not in self.received:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)
            return self.received[key]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Jitter:
    """A random pause before each sample: the emulators deliver from polling loops, so a
    sample sent right after the previous delivery would always land at the same phase of the
    loop (the worst one). The pipeline's events arrive at random phases; so do these."""

    def __init__(self, upto: float, seed: int = 0) -> None:
        self.upto = upto
        self.rng = random.Random(seed)

    def sleep(self) -> None:
        if self.upto > 0:
            time.sleep(self.rng.uniform(0, self.upto))


def push_subscription(project: str, name: str, topic: str, url: str) -> Subscription:
    # The product's push subscription settings (the defaults of
    # mlpipe.messaging.topology.PushSubscription).
    return Subscription(
        name=f"projects/{project}/subscriptions/{name}",
        topic=f"projects/{project}/topics/{topic}",
        push_config=PushConfig(push_endpoint=url),
        ack_deadline_seconds=60,
        retry_policy=RetryPolicy(
            minimum_backoff=timedelta(seconds=1), maximum_backoff=timedelta(seconds=60)
        ),
    )


def measure_floor(
    samples: int, state_dir: Path, progress: Any = print, jitter_ms: float = 200.0
) -> dict[str, Any]:
    base = free_base_port(2)
    suffix = uuid.uuid4().hex[:8]
    stack = LocalStack(
        state_dir, base_port=base, project=f"floor-{suffix}", bucket=f"floor-{suffix}"
    )
    progress(f"floor: starting the emulators on ports {base}, {base + 1} (state {state_dir})")
    state = stack.up(services=False, progress=lambda line: progress(f"  {line}"))
    endpoint = Endpoint()
    result: dict[str, Any] = {"samples": samples, "jitter_ms": jitter_ms, "load_start": load()}
    jitter = Jitter(jitter_ms / 1000)
    try:
        with client_env(state):
            project = state.project
            publisher = Publisher(project)
            subscriber = pubsub_v1.SubscriberClient()
            topology.create_topics(project, ("floor-push", "floor-pull", "floor-ack"))
            note = topology.TOPOLOGY.notification
            subscriber.create_subscription(
                request=push_subscription(project, "floor-push", "floor-push", endpoint.url)
            )
            subscriber.create_subscription(
                request=push_subscription(project, "floor-gcs", note.topic, endpoint.url)
            )
            storage = Storage(make_client(project), state.bucket)
            # One untimed delivery each first: connections and the emulators' first-use paths.
            for phase in ("warm", "timed"):
                n = 3 if phase == "warm" else samples
                push, push_ack, gcs, gcs_ack = [], [], [], []
                for i in range(n):
                    key = f"{phase}-{i}"
                    jitter.sleep()
                    t0 = time.time()
                    publisher.publish_raw("floor-push", b"x", {"seq": key})
                    acked = time.time()
                    got = endpoint.wait(key)
                    if got is not None:
                        push.append(got - t0)
                        push_ack.append(acked - t0)
                    name = f"{note.object_prefix}floor/{phase}-{i}-{suffix}.bin"
                    jitter.sleep()
                    t0 = time.time()
                    storage.write(name, b"x")
                    acked = time.time()
                    got = endpoint.wait(name)
                    if got is not None:
                        gcs.append(got - t0)
                        gcs_ack.append(acked - t0)
            pull = []
            with EventWatcher(project, topics=("floor-pull",)) as watcher:
                for phase in ("warm", "timed"):
                    n = 3 if phase == "warm" else samples
                    pull = []
                    for _ in range(n):
                        jitter.sleep()
                        event = events_pb2.DatasetLanded(
                            context=events.context(producer="floor", code_version="bench")
                        )
                        t0 = time.time()
                        publisher.publish(event, topic="floor-pull")
                        got = next(iter(watcher.events(timeout=30.0)), None)
                        if got is not None:
                            pull.append(time.time() - t0)
            # The publish call alone, as every step makes it (it waits for the server's ack):
            # mlpipe's Publisher (batching up to 5 ms) beside one that sends each at once.
            at_once = Publisher(
                project,
                client=pubsub_v1.PublisherClient(
                    batch_settings=pubsub_v1.types.BatchSettings(max_messages=1)
                ),
            )
            ack_product, ack_at_once = [], []
            event = events_pb2.DatasetLanded()
            for i in range(samples + 3):
                for publisher_, values in ((publisher, ack_product), (at_once, ack_at_once)):
                    t0 = time.perf_counter()
                    publisher_.publish(event, topic="floor-ack")
                    if i >= 3:
                        values.append(time.perf_counter() - t0)
            subscriber.close()
        for label, values in (
            ("push", push),
            ("push_publish_ack", push_ack),
            ("gcs", gcs),
            ("gcs_write_ack", gcs_ack),
            ("pull", pull),
            ("publish_ack_product", ack_product),
            ("publish_ack_at_once", ack_at_once),
        ):
            p50, p95 = p50_p95(values)
            result[label] = {"n": len(values), "p50": p50, "p95": p95, "min": min(values)}
        result["load_end"] = load()
    finally:
        endpoint.close()
        stack.down(progress=lambda _: None)
    return result


def print_floor(result: dict[str, Any]) -> None:
    labels = {
        "push": "Pub/Sub push: publish → endpoint",
        "push_publish_ack": "  of which the publish call (ack)",
        "gcs": "GCS notification: write → endpoint",
        "gcs_write_ack": "  of which the write call",
        "pull": "streaming pull (EventWatcher): publish → dequeued",
        "publish_ack_product": "publish call, mlpipe Publisher (max_latency 5 ms)",
        "publish_ack_at_once": "publish call, BatchSettings(max_messages=1)",
    }
    print(
        f"\nemulator floor, {result['samples']} sequential samples each "
        f"(random pause 0..{result['jitter_ms']:.0f} ms before each), ms:"
    )
    for key, label in labels.items():
        v = result[key]
        print(f"  {label:<52} p50 {v['p50'] * 1000:6.1f}  p95 {v['p95'] * 1000:6.1f}")
    print(f"  load average {result['load_start']} → {result['load_end']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--jitter-ms", type=float, default=200.0, help="random pause before each sample (0: none)"
    )
    args = parser.parse_args()
    state_dir = Path(tempfile.mkdtemp(prefix="mlpipe-bench-floor-"))
    result = measure_floor(args.samples, state_dir, jitter_ms=args.jitter_ms)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print_floor(result)


if __name__ == "__main__":
    main()
