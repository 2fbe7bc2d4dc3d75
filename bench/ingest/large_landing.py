"""A large `gcs` landing, request to landed, on ingest's two paths in one run: read into the
service (MLPIPE_INGEST_BEAM_MIN_BYTES=0) and validated by the Beam job (mlpipe_batch.validate,
a local process on the DirectRunner) then copied server-side. Rows/s, the ratio, and the
ingest process's peak memory (VmHWM) in each; the job's peak (sampled RSS) beside it.

    uv run --frozen python bench/ingest/large_landing.py [--rows 1000000] [--repeat 1]

Starts its own emulators on free ports and one ingest process per path (`python -m
mlpipe_ingest` on 127.0.0.1), and stops everything it started. The Beam path's time runs from
the push to the exports check that landed it (checks every 0.25 s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from mlpipe.messaging import events, topology
from mlpipe.messaging.push import make_envelope
from mlpipe.ml.config import config_path, parse_config
from mlpipe.store import layout
from mlpipe.store.storage import Storage, make_client
from mlpipe.v1 import events_pb2
from mlpipe_ops.localstack import LocalStack, client_env, port_free

sys.path.insert(0, str(Path(__file__).parent))
from throughput import CONFIG, free_base, make_csv


def _kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _tree(pid: int) -> list[int]:
    """pid and its descendants (the DirectRunner's workers)."""
    out = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return out
    for child in children:
        out += _tree(int(child))
    return out


class Sampler:
    """The largest summed RSS of a process tree, sampled every 50 ms."""

    def __init__(self) -> None:
        self.pid = 0
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            if self.pid:
                rss = sum(_kib(p, "VmRSS") for p in _tree(self.pid))
                self.peak_kib = max(self.peak_kib, rss)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def start_ingest(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "mlpipe_ingest"],
            env={**env, "PORT": str(port), "MLPIPE_HOST": "127.0.0.1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code < 500:
                return child
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    child.kill()
    raise RuntimeError(f"ingest did not start on {port}; see {log}")


def land(url: str, request: events_pb2.IngestRequest, storage: Storage, job: Sampler) -> float:
    t0 = time.perf_counter()
    reply = httpx.post(
        f"{url}/pubsub/push", content=make_envelope(events.encode(request)), timeout=600
    ).json()
    if reply["status"] == "landed":
        return time.perf_counter() - t0
    assert reply["status"] == "exporting", reply
    export_id = reply["export_id"]
    while True:
        if not job.pid:
            record = storage.read_json(layout.validation_job_path(export_id)) or {}
            job.pid = int((record.get("handle") or {}).get("pid", 0))
        (checked,) = [
            e
            for e in httpx.post(f"{url}/v1/exports:check", timeout=600).json()["exports"]
            if e["export_id"] == export_id
        ]
        if checked["state"] == "landed":
            return time.perf_counter() - t0
        assert checked["state"] == "exporting", checked
        time.sleep(0.25)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2, help="the local job's workers")
    parser.add_argument("--mode", default="in_memory", choices=["multi_processing", "in_memory"])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-large-"))
    stack = LocalStack(work, base_port=free_base(), project="bench-large", bucket="bench-large")
    state = stack.up(services=False, progress=lambda _: None)
    results: dict[str, dict[str, list[float]]] = {}
    try:
        with client_env(state):
            client = make_client(state.project)
            storage = Storage(client, state.bucket)
            raw = Storage(client, client.create_bucket("bench-large-raw").name)
            topology.create_topics(state.project, topology.TOPOLOGY.topics)
            storage.write(config_path("bench"), parse_config(CONFIG).to_yaml().encode())
            base_env = {
                **os.environ,
                "MLPIPE_PROJECT": state.project,
                "MLPIPE_BUCKET": state.bucket,
                "MLPIPE_SOURCE_BUCKETS": json.dumps([raw.bucket_name]),
                "MLPIPE_SOURCE_MAX_BYTES": str(1 << 30),
                "MLPIPE_LOG_LEVEL": "WARNING",
                "MLPIPE_VALIDATION_LOCAL_WORKERS": str(args.workers),
                "MLPIPE_VALIDATION_LOCAL_MODE": args.mode,
            }
            paths = {
                "in the service": {"MLPIPE_INGEST_BEAM_MIN_BYTES": "0"},
                "Beam job": {"MLPIPE_INGEST_BEAM_MIN_BYTES": "1"},
            }
            size = 0
            for n, (name, extra) in enumerate(paths.items()):
                port = next(p for p in range(41000, 42000) if port_free(p))
                child = start_ingest({**base_env, **extra}, port, work / f"ingest-{n}.log")
                seconds, jobs = [], []
                try:
                    for r in range(args.repeat):
                        data = make_csv(args.rows, seed=100 * n + r)
                        size = len(data)
                        raw.write(f"in/{n}-{r}.csv", data)
                        request = events_pb2.IngestRequest(request_id=f"{n}-{r}", dataset="bench")
                        request.gcs.uri = raw.uri(f"in/{n}-{r}.csv")
                        job = Sampler()
                        seconds.append(land(f"http://127.0.0.1:{port}", request, storage, job))
                        job.stop()
                        jobs.append(job.peak_kib / 1024)
                    peak = _kib(child.pid, "VmHWM") / 1024
                finally:
                    child.terminate()
                    child.wait(20)
                results[name] = {"seconds": seconds, "peak_mib": [peak], "job_mib": jobs}
        print(
            f"{args.rows:,} rows, {size / 1e6:.1f} MB CSV, gcs source, median of {args.repeat}; "
            f"the job on the DirectRunner, {args.mode}, {args.workers} workers"
        )
        base = statistics.median(results["in the service"]["seconds"])
        for name, r in results.items():
            median = statistics.median(r["seconds"])
            job = max(r["job_mib"]) if any(r["job_mib"]) else 0.0
            print(
                f"{name:15} {median:7.2f} s  {args.rows / median:10,.0f} rows/s  "
                f"{median / base:5.2f}x the in-service time  ingest peak "
                f"{r['peak_mib'][0]:7.1f} MiB  job peak {job:7.1f} MiB"
            )
    finally:
        stack.down(progress=lambda _: None)


if __name__ == "__main__":
    main()
