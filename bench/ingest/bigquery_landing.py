"""Memory and time of landing one BigQuery export (land_export: chunked sha256, server-side
rewrite) against the in-memory way (download the object whole, hash it, upload it again).

    uv run python bench/ingest/bigquery_landing.py [--stations 1000] [--days 365] [--chunk-kib 1024]

Starts its own emulators (fake-gcs-server and the Pub/Sub emulator) on free ports and the
BigQuery stand-in, exports a synthetic GSOD table of stations x days rows through the real
BigQuery client to the GCS emulator, then lands that one Parquet object both ways and prints
the peak of Python allocations (tracemalloc) and the wall time of each; stops what it started.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlpipe.ml.config import parse_config
from mlpipe.store import layout
from mlpipe.store.storage import Storage, make_client
from mlpipe.v1 import events_pb2
from mlpipe_ingest.sources_bigquery import (
    BigQueryExports,
    BigQuerySettings,
    bigquery_client,
    land_export,
)
from mlpipe_ops.localstack import LocalStack, client_env, port_free
from mlpipe_ops.standins.bigquery import PUBLIC, BigQueryStandIn, Table, gsod

CONFIG = """\
name: gsod
dataset:
  target: temp
  columns: {stn: categorical, date: datetime}
  exclude: [name]
  min_rows: 10
model:
  name: gsod-temp
  task: regression
  estimator: sklearn.linear_model.Ridge
"""


def free_base() -> int:
    for base in range(24000, 40000, 19):
        if all(port_free(base + i) for i in range(7)):
            return base
    raise RuntimeError("no free ports")


def measured(what: Callable[[], Any]) -> tuple[Any, float, int]:
    tracemalloc.start()
    t0 = time.perf_counter()
    result = what()
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return result, seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stations", type=int, default=1000)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--chunk-kib", type=int, default=1024)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-bq-"))
    stack = LocalStack(root, base_port=free_base(), project="bench-bq", bucket="bench-bq")
    state = stack.up(services=False, progress=lambda _: None)
    try:
        with client_env(state):
            client = make_client(state.project)
            bucket = client.create_bucket(f"bench-bq-{os.getpid()}")
            storage = Storage(client, bucket.name)
            table = Table(PUBLIC, "noaa_gsod", "big", gsod(args.stations, args.days), "US", "date")
            stand_in = BigQueryStandIn(
                state.project, client, job_seconds=0.0, catalogue=[table]
            ).start()
            try:
                exports = BigQueryExports(
                    bigquery_client(state.project, stand_in.url),
                    BigQuerySettings(state.project),
                )
                request = events_pb2.IngestRequest(request_id="bench", dataset="gsod")
                request.bigquery.table = table.full_id
                staging = storage.uri(layout.export_staging_prefix("bench"))
                recorded = exports.start(request, staging, "bench")
                status = exports.poll(recorded)
                while status.state == "running":
                    status = exports.poll(recorded)
                assert status.state == "done", status
                exported = exports.exported_table(recorded)
            finally:
                stand_in.stop()
            staged_path = storage.path_of(status.objects[0])
            size = int(storage.bucket.get_blob(staged_path).size)  # type: ignore[union-attr]
            config = parse_config(CONFIG)

            (landed, digest), t_stream, peak_stream = measured(
                lambda: land_export(
                    storage,
                    request,
                    status.objects,
                    exported,
                    config,
                    code_version="bench",
                    chunk_bytes=args.chunk_kib * 1024,
                )
            )

            def in_memory() -> str:
                data = storage.bucket.blob(staged_path).download_as_bytes()
                sha = hashlib.sha256(data).hexdigest()
                storage.create_if_absent(f"bench/in-memory/{sha[:16]}.parquet", data)
                return sha

            sha, t_memory, peak_memory = measured(in_memory)
            assert sha == digest.sha256 == landed.dataset.sha256
    finally:
        stack.down(progress=lambda _: None)

    print(f"export: {exported.num_rows} rows, Parquet object {size} bytes")
    print("| way | wall s | peak Python allocations (tracemalloc) |")
    print("|---|---:|---:|")
    print(
        f"| land_export, {args.chunk_kib} KiB ranged reads ({digest.chunks}) + GCS rewrite "
        f"| {t_stream:.3f} | {peak_stream / 1e6:.2f} MB |"
    )
    print(f"| download whole + sha256 + upload | {t_memory:.3f} | {peak_memory / 1e6:.2f} MB |")
    print(
        f"- peak memory x{peak_memory / max(peak_stream, 1):.1f} lower with land_export; "
        f"time x{t_stream / t_memory:.2f} of the in-memory way"
    )


if __name__ == "__main__":
    main()
