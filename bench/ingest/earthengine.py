"""Request to DatasetLanded for an Earth Engine source of N sample points, through the real
earthengine-api client against the local Earth Engine, against landing the same exported CSV
as a `gcs` source (the baseline: what the landing itself costs).

    uv run python bench/ingest/earthengine.py [--rows 100000] [--repeat 3]

Starts its own emulators on free ports and the local Earth Engine in process (export delay 0:
what is measured is the client, the stand-in's evaluation and CSV write, the checks and the
landing), runs the ingest app in process, and stops everything it started. The exports check
is called back to back (as a busy scheduler would), so the figure is not a polling interval.
Each repeat is a new request id, so a new export; its rows are the same, so the landing
after the first is "already present" by content: the baseline lands the same bytes the same
way, first once to warm up.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from fastapi.testclient import TestClient

from mlpipe.messaging import events, topology
from mlpipe.messaging.push import make_envelope
from mlpipe.ml.config import config_path, parse_config
from mlpipe.store.storage import Storage, make_client
from mlpipe.v1 import events_pb2
from mlpipe_ops.localstack import LocalStack, client_env, port_free
from mlpipe_ops.standins.earthengine import (
    SYNTHETIC_FIELDS,
    SYNTHETIC_S2,
    Catalogue,
    EarthEngineStandIn,
)

REPO = Path(__file__).resolve().parents[2]
REGION = {
    "type": "Polygon",
    "coordinates": [[[4.0, 50.0], [6.0, 50.0], [6.0, 53.0], [4.0, 53.0], [4.0, 50.0]]],
}


def free_base() -> int:
    for base in range(24000, 40000, 17):
        if all(port_free(base + i) for i in range(8)):
            return base
    raise RuntimeError("no free ports")


def ee_request(request_id: str) -> events_pb2.IngestRequest:
    source = events_pb2.EarthEngineSource(
        image_collection=SYNTHETIC_S2,
        bands=["B2", "B3", "B4", "B8", "B11", "B12"],
        start_date="2026-04-01",
        end_date="2026-10-01",
        scale=10,
        region_geojson=json.dumps(REGION),
        samples_asset=SYNTHETIC_FIELDS,
        class_property="crop",
        properties=["field_id", "region"],
    )
    return events_pb2.IngestRequest(request_id=request_id, dataset="crops", earth_engine=source)


def _seconds(stamp: str) -> float:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    stack = LocalStack(
        Path(tempfile.mkdtemp(prefix="bench-ee-")),
        base_port=free_base(),
        project="bench-ee",
        bucket="bench-ee",
    )
    state = stack.up(services=False, progress=lambda _: None)
    timings: dict[str, list[float]] = {"push": [], "export": [], "request to landed": []}
    baseline: list[float] = []
    try:
        with client_env(state):
            standin = EarthEngineStandIn(
                state.project,
                storage_emulator_host=state.storage_host,
                export_seconds=0.0,
                catalogue=Catalogue.synthetic(args.rows),
            ).start()
            storage = Storage(make_client(state.project), state.bucket)
            topology.create_topics(state.project, topology.TOPOLOGY.topics)
            config = parse_config((REPO / "examples/crops/pipeline.yaml").read_text())
            storage.write(config_path("crops"), config.to_yaml().encode())
            os.environ |= {
                "MLPIPE_PROJECT": state.project,
                "MLPIPE_BUCKET": state.bucket,
                "MLPIPE_EARTHENGINE_URL": standin.url,
                "MLPIPE_LOG_LEVEL": "WARNING",
            }
            from mlpipe_ingest.main import app

            with TestClient(app) as ingest:
                exported = ""
                for n in range(args.repeat):
                    request = ee_request(f"bench-{n}")
                    t0 = time.perf_counter()
                    reply = ingest.post(
                        "/pubsub/push",
                        content=make_envelope(events.encode(request), message_id=f"m{n}"),
                    )
                    timings["push"].append(time.perf_counter() - t0)
                    assert reply.json()["status"] == "exporting", reply.json()
                    while True:
                        checked = ingest.post("/v1/exports:check").json()["exports"]
                        if all(c["state"] == "landed" for c in checked):
                            break
                        assert all(c["state"] in ("exporting", "landed") for c in checked), checked
                    timings["request to landed"].append(time.perf_counter() - t0)
                    op = next(
                        o
                        for o in standin.operations()
                        if o["name"] == reply.json()["job"]["operation"]
                    )
                    meta = op["metadata"]
                    timings["export"].append(
                        _seconds(meta["endTime"]) - _seconds(meta["createTime"])
                    )
                    exported = exported or next(
                        c["dataset_uri"] for c in checked if c.get("dataset_uri")
                    )
                # The baseline: the same rows landed from a CSV already in the bucket.
                staged = next(
                    p for p in storage.list("ingest/exports/") if p.endswith("samples.csv")
                )
                for n in range(args.repeat + 1):
                    gcs = events_pb2.IngestRequest(request_id=f"gcs-{n}", dataset="crops")
                    gcs.gcs.uri = storage.uri(staged)
                    t0 = time.perf_counter()
                    reply = ingest.post(
                        "/pubsub/push",
                        content=make_envelope(events.encode(gcs), message_id=f"g{n}"),
                    )
                    assert reply.json()["status"] in ("landed", "duplicate"), reply.json()
                    if n:
                        baseline.append(time.perf_counter() - t0)
            standin.stop()
        size = len(storage.read(staged).data)  # type: ignore[union-attr]
        print(f"{args.rows} sample points, {size / 1e6:.1f} MB CSV, median of {args.repeat}")
        base = statistics.median(baseline)
        for kind, values in timings.items():
            median = statistics.median(values)
            print(f"{kind:20} {median:7.2f} s  {median / base:5.1f}x the gcs landing")
        print(f"{'gcs source landing':20} {base:7.2f} s    1.0x (baseline: {exported})")
    finally:
        stack.down(progress=lambda _: None)


if __name__ == "__main__":
    main()
