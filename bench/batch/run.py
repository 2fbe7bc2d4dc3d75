"""Batch scoring: the Beam job (mlpipe_batch, DirectRunner, N worker processes) against the
predictor's in-process chunked scorer (mlpipe_predictor.batch.run_batch) against a bare
single-process loop (pyarrow batches → pandas → onnxruntime → fastavro), on the same input in
the GCS emulator, the same model (iris, ONNX), the same machine.

    uv run --frozen python bench/batch/run.py --rows 1000000

Each contender runs as its own process (start-up, imports and model load included, as a job
pays them); the figures are its wall time, rows per second, and the peak resident memory of
its whole process tree (sampled every 50 ms from /proc), with each one's ratio to the bare
loop. Every contender's output is read back: its row count must be the input's, and its
predictions for the first 2,000 keys must equal the bare loop's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
MODEL = "iris-classifier"


# --- the contenders' own processes ------------------------------------------------------------
def chunked(project: str, bucket: str, input_uri: str, chunk_rows: int) -> None:
    from mlpipe.store.registry import Registry
    from mlpipe.store.storage import Storage, make_client
    from mlpipe.v1 import events_pb2
    from mlpipe_predictor.batch import run_batch

    storage = Storage(make_client(project), bucket)
    request = events_pb2.BatchPredictionRequest(
        batch_id="bench-chunked",
        model_name=MODEL,
        version=1,
        input_uri=input_uri,
        key_column="id",
        chunk_rows=chunk_rows,
    )
    run_batch(storage, Registry(storage), request)


def bare(project: str, bucket: str, input_uri: str, chunk_rows: int) -> None:
    import fastavro
    import numpy as np
    import pyarrow.parquet as pq

    from mlpipe.ml.model_inputs import onnx_feed_from_frame
    from mlpipe.ml.scoring import load_version, prediction_schema
    from mlpipe.store.registry import Registry
    from mlpipe.store.storage import Storage, make_client

    storage = Storage(make_client(project), bucket)
    model = load_version(Registry(storage), MODEL, 1)
    schema = fastavro.parse_schema(prediction_schema(model.task))
    out = tempfile.SpooledTemporaryFile(max_size=64 * 1024 * 1024)  # noqa: SIM115 (uploaded below)
    writer = fastavro.write.Writer(out, schema, "deflate")
    with storage.bucket.blob(storage.path_of(input_uri)).open("rb") as stream:
        for batch in pq.ParquetFile(stream).iter_batches(batch_size=chunk_rows):
            frame = batch.to_pandas()
            (labels,) = model.session.run(
                model.outputs[:1], onnx_feed_from_frame(frame, model.schema)
            )
            for key, label in zip(
                frame["id"].tolist(), np.asarray(labels).ravel().tolist(), strict=True
            ):
                writer.write(
                    {
                        "key": key,
                        "prediction": str(label),
                        "error": None,
                        "model": MODEL,
                        "model_version": 1,
                    }
                )
    writer.flush()
    out.seek(0)
    storage.bucket.blob("predictions/bench-bare/out.avro").upload_from_file(out)


# --- measuring --------------------------------------------------------------------------------
def tree_rss(root: int) -> int:
    """Resident bytes of `root` and every process under it."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss[int(entry)] = int(line.split()[1]) * 1024
    members = {root}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in members and pid not in members:
                members.add(pid)
                grew = True
    return sum(rss.get(p, 0) for p in members)


def measure(command: list[str], env: dict[str, str]) -> tuple[float, int]:
    """(wall seconds, peak tree RSS bytes) of `command` run to its end; fail if it fails."""
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_rss(child.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = child.communicate()
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    if child.returncode != 0:
        sys.stdout.write(output.decode(errors="replace")[-4000:])
        raise SystemExit(f"{command[:4]} failed with {child.returncode}")
    return wall, peak


def avro_rows(storage: Any, paths: list[str]) -> tuple[int, dict[str, str]]:
    import fastavro

    count, first = 0, {}
    for path in paths:
        found = storage.read(path)
        assert found is not None, path
        for record in fastavro.reader(io.BytesIO(found.data)):
            count += 1
            if record["key"] < "r0000002000":
                first[record["key"]] = record["prediction"]
    return count, first


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk-rows", type=int, default=50_000)
    parser.add_argument("--row-group-rows", type=int, default=100_000)
    parser.add_argument("--contender", choices=["chunked", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--args", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.contender:
        globals()[args.contender](*json.loads(args.args))
        return 0

    import importlib.util

    import numpy as np
    import pandas as pd

    from mlpipe.messaging.batch_jobs import JobSpec
    from mlpipe.store import layout
    from mlpipe.store.storage import Storage, make_client
    from mlpipe_ops.localstack import client_env

    workdir = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    # The serving bench's set-up: emulators, and iris trained and deployed into them (ONNX).
    serving = importlib.util.spec_from_file_location("bench_serving", REPO / "bench/serving/run.py")
    assert serving is not None and serving.loader is not None
    module = importlib.util.module_from_spec(serving)
    serving.loader.exec_module(module)
    stack, _, env = module.deploy_iris(workdir)
    try:
        with client_env(stack.state):
            state = stack.state
            storage = Storage(make_client(state.project), state.bucket)
            rng = np.random.default_rng(7)
            n = args.rows
            frame = pd.DataFrame(
                {
                    "id": [f"r{i:010d}" for i in range(n)],
                    "sepal_length": rng.uniform(4.3, 7.9, n).round(1),
                    "sepal_width": rng.uniform(2.0, 4.4, n).round(1),
                    "petal_length": rng.uniform(1.0, 6.9, n).round(1),
                    "petal_width": rng.uniform(0.1, 2.5, n).round(1),
                }
            )
            buffer = io.BytesIO()
            frame.to_parquet(buffer, row_group_size=args.row_group_rows)
            del frame
            path = f"inputs/bench-{n}.parquet"
            storage.write(path, buffer.getvalue())
            print(
                f"input: {n:,} rows, {len(buffer.getvalue()) / 1e6:.1f} MB parquet, "
                f"row groups of {args.row_group_rows:,}; chunks of {args.chunk_rows:,}"
            )
            input_uri = storage.uri(path)
            spec = JobSpec(
                project=state.project,
                bucket=state.bucket,
                batch_id="bench-beam",
                model=MODEL,
                version=1,
                input_uri=input_uri,
                output_prefix=layout.batch_job_output_prefix(MODEL, dt.date.today(), "bench-beam"),
                key_column="id",
                chunk_rows=args.chunk_rows,
                publish=False,
            )
            contender_args = json.dumps([state.project, state.bucket, input_uri, args.chunk_rows])
            me = [sys.executable, str(Path(__file__).resolve())]
            runs = {
                "bare loop (1 process)": [*me, "--contender", "bare", "--args", contender_args],
                "chunked scorer (predictor, 1 process)": [
                    *me,
                    "--contender",
                    "chunked",
                    "--args",
                    contender_args,
                ],
                f"Beam DirectRunner ({args.workers} workers)": [
                    sys.executable,
                    "-m",
                    "mlpipe_batch",
                    "--spec",
                    spec.to_json(),
                    "--runner=DirectRunner",
                    "--direct_running_mode=multi_processing",
                    f"--direct_num_workers={args.workers}",
                ],
            }
            figures = {}
            for name, command in runs.items():
                wall, peak = measure(command, {**env, "PYTHONPATH": str(REPO)})
                figures[name] = (wall, peak)
                print(f"  {name}: {wall:.1f}s", flush=True)
            outputs = {
                "bare loop (1 process)": ["predictions/bench-bare/out.avro"],
                "chunked scorer (predictor, 1 process)": [
                    p
                    for p in storage.list(f"predictions/{MODEL}/dt=")
                    if p.endswith("/bench-chunked.avro")
                ],
                f"Beam DirectRunner ({args.workers} workers)": [
                    storage.path_of(u) for u in storage.read_json(spec.metrics_path)["output_uris"]
                ],
            }
            checked = {name: avro_rows(storage, paths) for name, paths in outputs.items()}
            baseline = checked["bare loop (1 process)"][1]
            for name, (count, first) in checked.items():
                assert count == n, f"{name} wrote {count} rows of {n}"
                assert first == baseline, f"{name}'s predictions differ from the bare loop's"
            bare_wall, bare_peak = figures["bare loop (1 process)"]
            print(
                f"\n{n:,} rows, every output read back: {n:,} rows each, the first 2,000 "
                "predictions equal\n"
            )
            print("| contender | wall s | rows/s | peak RSS MB | time vs bare | memory vs bare |")
            print("|---|---:|---:|---:|---:|---:|")
            for name, (wall, peak) in figures.items():
                print(
                    f"| {name} | {wall:.1f} | {n / wall:,.0f} | {peak / 1e6:,.0f} | "
                    f"{wall / bare_wall:.2f}x | {peak / bare_peak:.2f}x |"
                )
    finally:
        stack.down(progress=lambda _: None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
