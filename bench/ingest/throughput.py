"""Rows/s landed by ingest's http and gcs sources for one large CSV, against the raw upload
of the same bytes (what `gcloud storage cp` into datasets/ costs).

    uv run python bench/ingest/throughput.py [--rows 500000] [--repeat 3]

Starts its own emulators (fake-gcs-server and the Pub/Sub emulator) on free ports and an HTTP
server on 127.0.0.1, runs the ingest app in process, and stops everything it started. Each
repeat uses fresh bytes (a different seed), so nothing is reported as already landed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from fastapi.testclient import TestClient

from mlpipe.messaging import events, topology
from mlpipe.messaging.push import make_envelope
from mlpipe.ml.config import config_path, parse_config
from mlpipe.store.storage import Storage, make_client
from mlpipe.v1 import events_pb2
from mlpipe_ops.localstack import LocalStack, client_env, port_free

CONFIG = """\
name: bench
dataset:
  target: y
  columns: {site: categorical}
  min_rows: 1
model:
  name: bench-model
  task: regression
  estimator: sklearn.linear_model.Ridge
"""


def make_csv(rows: int, seed: int) -> bytes:
    rng = random.Random(seed)
    lines = ["site,x1,x2,x3,x4,y"]
    for i in range(rows):
        a, b, c, d = (round(rng.uniform(0, 100), 3) for _ in range(4))
        lines.append(f"s{i % 50},{a},{b},{c},{d},{round(a * 0.3 - b * 0.1 + rng.gauss(0, 1), 3)}")
    return ("\n".join(lines) + "\n").encode()


def free_base() -> int:
    for base in range(23000, 40000, 17):
        if all(port_free(base + i) for i in range(7)):
            return base
    raise RuntimeError("no free ports")


def serve(bodies: dict[str, bytes]) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = bodies[self.path]
            self.send_response(200)
            self.send_header("Content-Type", "text/csv")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    stack = LocalStack(
        Path(tempfile.mkdtemp(prefix="bench-ingest-")),
        base_port=free_base(),
        project="bench-ingest",
        bucket="bench-ingest",
    )
    state = stack.up(services=False, progress=lambda _: None)
    bodies: dict[str, bytes] = {}
    server = serve(bodies)
    timings: dict[str, list[float]] = {"raw upload": [], "gcs source": [], "http source": []}
    try:
        with client_env(state):
            client = make_client(state.project)
            storage = Storage(client, state.bucket)
            raw = Storage(client, client.create_bucket("bench-raw").name)
            topology.create_topics(state.project, topology.TOPOLOGY.topics)
            storage.write(config_path("bench"), parse_config(CONFIG).to_yaml().encode())
            os.environ |= {
                "MLPIPE_PROJECT": state.project,
                "MLPIPE_BUCKET": state.bucket,
                "MLPIPE_SOURCE_BUCKETS": json.dumps([raw.bucket_name]),
                "MLPIPE_SOURCE_MAX_BYTES": str(1 << 30),
                "MLPIPE_LOG_LEVEL": "WARNING",
            }
            from mlpipe_ingest.main import app

            with TestClient(app) as ingest:
                for n in range(args.repeat):
                    for kind in timings:
                        data = make_csv(args.rows, seed=n * 10 + list(timings).index(kind))
                        request = events_pb2.IngestRequest(
                            request_id=f"{kind}-{n}", dataset="bench"
                        )
                        if kind == "raw upload":
                            t0 = time.perf_counter()
                            storage.write(f"datasets/bench/dt=2026-11-23/raw-{n}.csv", data)
                            timings[kind].append(time.perf_counter() - t0)
                            continue
                        if kind == "gcs source":
                            raw.write(f"in/{n}.csv", data)
                            request.gcs.uri = raw.uri(f"in/{n}.csv")
                        else:
                            bodies[f"/{n}.csv"] = data
                            port = server.server_address[1]
                            request.http.urls.append(f"http://127.0.0.1:{port}/{n}.csv")
                            request.http.format = "csv"
                        t0 = time.perf_counter()
                        reply = ingest.post(
                            "/pubsub/push", content=make_envelope(events.encode(request))
                        )
                        timings[kind].append(time.perf_counter() - t0)
                        assert reply.json()["status"] == "landed", reply.json()
        size = len(make_csv(args.rows, 0))
        print(f"{args.rows} rows, {size / 1e6:.1f} MB CSV, median of {args.repeat}")
        base = statistics.median(timings["raw upload"])
        for kind, values in timings.items():
            median = statistics.median(values)
            print(
                f"{kind:12} {median:7.2f} s  {args.rows / median:10,.0f} rows/s  "
                f"{median / base:5.1f}x the raw upload"
            )
    finally:
        server.shutdown()
        server.server_close()
        stack.down(progress=lambda _: None)


if __name__ == "__main__":
    main()
