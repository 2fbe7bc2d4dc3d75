"""Batch scoring: the Beam job (mlpipe_batch, DirectRunner, N worker processes) against the
predictor's in-process chunked scorer (mlpipe_predictor.batch.run_batch) against a bare
single-process loop (pyarrow batches → pandas → the model → fastavro), on the same input in
the GCS emulator, the same model, the same machine. The model runs as the deployer registered
it: under onnxruntime when it compiled to ONNX, else the scikit-learn pipeline (every process
with OMP_NUM_THREADS=1, so each is one thread of scoring).

    uv run --frozen python bench/batch/run.py --rows 10000000              # bike-share
    uv run --frozen python bench/batch/run.py --rows 1000000 --example iris

The model is trained by the trainer's own code on the example's dataset (examples/bikeshare:
a gradient-boosted regressor on calendar, station and weather features; examples/iris: a
random forest classifier) and registered by the deployer's own step (ONNX, checked on the
holdout). The input is random rows of that example's features, generated a million at a time
into one Parquet object.

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
MODELS = {"bikeshare": "bikeshare-net-change", "iris": "iris-classifier"}
STATIONS = {
    "central-station": "commuter_hub",
    "harbour-front": "leisure",
    "university": "campus",
    "old-town": "leisure",
    "business-park": "office",
    "riverside": "residential",
    "hospital": "office",
    "stadium": "leisure",
}


# --- the contenders' own processes ------------------------------------------------------------
def chunked(project: str, bucket: str, input_uri: str, chunk_rows: int, model: str) -> None:
    from mlpipe.store.registry import Registry
    from mlpipe.store.storage import Storage, make_client
    from mlpipe.v1 import events_pb2
    from mlpipe_predictor.batch import run_batch

    storage = Storage(make_client(project), bucket)
    request = events_pb2.BatchPredictionRequest(
        batch_id="bench-chunked",
        model_name=model,
        version=1,
        input_uri=input_uri,
        key_column="id",
        chunk_rows=chunk_rows,
    )
    run_batch(storage, Registry(storage), request)


def bare(project: str, bucket: str, input_uri: str, chunk_rows: int, name: str) -> None:
    import fastavro
    import numpy as np
    import pyarrow.parquet as pq

    from mlpipe.ml.model_inputs import onnx_feed_from_frame
    from mlpipe.ml.scoring import load_version, prediction_schema
    from mlpipe.store.registry import Registry
    from mlpipe.store.storage import Storage, make_client

    storage = Storage(make_client(project), bucket)
    model = load_version(Registry(storage), name, 1)
    cast = float if model.task == "regression" else str
    schema = fastavro.parse_schema(prediction_schema(model.task))
    out = tempfile.SpooledTemporaryFile(max_size=64 * 1024 * 1024)  # noqa: SIM115 (uploaded below)
    writer = fastavro.write.Writer(out, schema, "deflate")
    with storage.bucket.blob(storage.path_of(input_uri)).open("rb") as stream:
        for batch in pq.ParquetFile(stream).iter_batches(batch_size=chunk_rows):
            frame = batch.to_pandas()
            if model.runtime == "onnx":
                (labels,) = model.session.run(
                    model.outputs[:1], onnx_feed_from_frame(frame, model.schema)
                )
            else:  # the pipeline as the deployer kept it, when it does not compile to ONNX
                labels = model.estimator.predict(frame[[f.name for f in model.schema]])
            for key, label in zip(
                frame["id"].tolist(), np.asarray(labels).ravel().tolist(), strict=True
            ):
                writer.write(
                    {
                        "key": key,
                        "prediction": cast(label),
                        "error": None,
                        "model": name,
                        "model_version": 1,
                    }
                )
    writer.flush()
    out.seek(0)
    storage.bucket.blob("predictions/bench-bare/out.avro").upload_from_file(out)


# --- the model, trained and registered by the pipeline's own code -----------------------------
def deploy(workdir: Path, example: str, estimator: str | None) -> tuple[Any, dict[str, str]]:
    """Emulators + the example's model trained and deployed into them (version 1), with
    `estimator` (a class and its params as JSON, `module.Class{"param": 1}`) in place of the
    example's own when given. Returns (the stack, the env a job's process needs)."""
    import yaml

    from mlpipe.messaging import events, topology
    from mlpipe.messaging.publishing import Publisher
    from mlpipe.messaging.push import make_envelope, parse_envelope
    from mlpipe.ml.config import parse_config
    from mlpipe.store import layout
    from mlpipe.store.registry import Registry
    from mlpipe.store.storage import Storage, make_client, sha256_hex
    from mlpipe.v1 import events_pb2
    from mlpipe_deployer.deployment import Deployer
    from mlpipe_ops.localstack import LocalStack, client_env
    from mlpipe_trainer.training import train
    from tests.conftest import free_base_port

    stack = LocalStack(workdir / "stack", base_port=free_base_port(), project="bench-batch")
    state = stack.up(services=False, progress=lambda _: None)
    with client_env(state):
        topology.create_topics(state.project, topology.TOPOLOGY.topics)
        storage = Storage(make_client(state.project), state.bucket)
        raw = yaml.safe_load((REPO / f"examples/{example}/pipeline.yaml").read_text())
        if estimator:
            name, _, params = estimator.partition("{")
            raw["model"]["estimator"] = name
            raw["model"]["params"] = json.loads("{" + params) if params else {}
        config = parse_config(yaml.safe_dump(raw))
        data = (REPO / f"examples/{example}/{example}.csv").read_bytes()
        path = f"datasets/{example}/dt=2026-11-23/bench.csv"
        generation = storage.write(path, data, content_type="text/csv")
        run_id = layout.run_id_for(sha256_hex(data), config.sha256())
        storage.write(f"runs/{run_id}/config.json", config.canonical_json())
        context = events.context(
            producer="bench",
            code_version="bench",
            run_id=run_id,
            pipeline=example,
            config_sha256=config.sha256(),
        )
        dataset = events_pb2.DatasetRef(
            uri=storage.uri(path), generation=generation, sha256=sha256_hex(data), name=example
        )
        done = train(storage, events_pb2.TrainingStarted(context=context, dataset=dataset), "b")
        evaluation = events_pb2.EvaluationCompleted(
            context=done.context,
            dataset=done.dataset,
            model_uri=done.model_uri,
            model_sha256=done.model_sha256,
            model_name=done.model_name,
            passed=True,
        )
        registry = Registry(storage)
        Deployer(storage, Publisher(state.project), registry, "bench")(
            parse_envelope(make_envelope(events.encode(evaluation)))
        )
        version = registry.get(MODELS[example], 1)
        assert version is not None, "the deployer registered nothing"
        print(
            f"deployed {MODELS[example]} v1 ({config.model.estimator}): runtime "
            f"{version.info.get('runtime')}; {version.info.get('runtime_note')}"[:300]
        )
        env = {**os.environ, **state.client_env()}
    return stack, env


def features(example: str, first: int, n: int, rng: Any) -> Any:
    """`n` random rows of the example's features, keyed r<first>... (a pyarrow table)."""
    import numpy as np
    import pyarrow as pa

    keys = pa.array([f"r{i:010d}" for i in range(first, first + n)])
    if example == "iris":
        columns = {
            name: rng.uniform(low, high, n).round(1)
            for name, (low, high) in {
                "sepal_length": (4.3, 7.9),
                "sepal_width": (2.0, 4.4),
                "petal_length": (1.0, 6.9),
                "petal_width": (0.1, 2.5),
            }.items()
        }
        return pa.table({"id": keys, **columns})
    hours = rng.integers(0, 24 * 42, n)
    stations = np.array(list(STATIONS))
    which = rng.integers(0, len(stations), n)
    stamps = np.datetime64("2026-05-04T00:00:00") + hours.astype("timedelta64[h]")
    return pa.table(
        {
            "id": keys,
            "timestamp": pa.array(np.datetime_as_string(stamps) + "Z"),
            "station": pa.array(stations[which]).dictionary_encode(),
            "station_kind": pa.array(
                np.array([STATIONS[s] for s in stations])[which]
            ).dictionary_encode(),
            "hour": hours % 24,
            "weekday": (hours // 24) % 7,
            "temperature_c": rng.normal(14, 6, n).round(1),
            "precipitation_mm": np.maximum(0, rng.normal(-0.5, 1.0, n)).round(2),
            "wind_kmh": np.abs(rng.normal(12, 5, n)).round(1),
        }
    )


def write_input(path: Path, example: str, rows: int, row_group_rows: int) -> None:
    """The input as one Parquet file, generated a million rows at a time."""
    import numpy as np
    import pyarrow.parquet as pq

    rng = np.random.default_rng(7)
    writer = None
    for first in range(0, rows, 1_000_000):
        table = features(example, first, min(1_000_000, rows - first), rng)
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=row_group_rows)
    assert writer is not None
    writer.close()


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


def measure(command: list[str], env: dict[str, str]) -> tuple[float, int, float]:
    """(wall seconds, peak tree RSS bytes, CPU seconds) of `command` run to its end; fail if it
    fails. The CPU seconds (user + system of the process and every descendant reaped) depend
    far less than the wall time on what else the machine runs."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
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
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if child.returncode != 0:
        sys.stdout.write(output.decode(errors="replace")[-4000:])
        raise SystemExit(f"{command[:4]} failed with {child.returncode}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, peak, cpu


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
    parser.add_argument("--example", choices=sorted(MODELS), default="bikeshare")
    parser.add_argument(
        "--estimator",
        help="the model's estimator instead of the example's, e.g. "
        "'sklearn.ensemble.RandomForestRegressor{\"n_estimators\": 50}'",
    )
    parser.add_argument(
        "--without-chunked",
        action="store_true",
        help="run only the bare loop and the Beam job (the chunked scorer is the slowest)",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk-rows", type=int, default=50_000)
    parser.add_argument("--row-group-rows", type=int, default=100_000)
    parser.add_argument("--contender", choices=["chunked", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--args", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.contender:
        globals()[args.contender](*json.loads(args.args))
        return 0

    from mlpipe.messaging.batch_jobs import JobSpec
    from mlpipe.store import layout
    from mlpipe.store.storage import Storage, make_client
    from mlpipe_ops.localstack import client_env

    model = MODELS[args.example]
    workdir = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    stack, env = deploy(workdir, args.example, args.estimator)
    try:
        with client_env(stack.state):
            state = stack.state
            storage = Storage(make_client(state.project), state.bucket)
            n = args.rows
            local = workdir / "input.parquet"
            write_input(local, args.example, n, args.row_group_rows)
            path = f"inputs/bench-{args.example}-{n}.parquet"
            storage.bucket.blob(path).upload_from_filename(str(local))
            print(
                f"input: {n:,} rows of {args.example} features, "
                f"{local.stat().st_size / 1e6:.1f} MB parquet, "
                f"row groups of {args.row_group_rows:,}; chunks of {args.chunk_rows:,}; "
                f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
            )
            local.unlink()
            input_uri = storage.uri(path)
            spec = JobSpec(
                project=state.project,
                bucket=state.bucket,
                batch_id="bench-beam",
                model=model,
                version=1,
                input_uri=input_uri,
                output_prefix=layout.batch_job_output_prefix(model, dt.date.today(), "bench-beam"),
                key_column="id",
                chunk_rows=args.chunk_rows,
                publish=False,
            )
            contender_args = json.dumps(
                [state.project, state.bucket, input_uri, args.chunk_rows, model]
            )
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
            if args.without_chunked:
                del runs["chunked scorer (predictor, 1 process)"]
            figures = {}
            for name, command in runs.items():
                wall, peak, cpu = measure(
                    command, {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
                )
                figures[name] = (wall, peak, cpu)
                print(f"  {name}: {wall:.1f}s, {cpu:.1f} CPU s", flush=True)
            outputs = {
                "bare loop (1 process)": ["predictions/bench-bare/out.avro"],
                "chunked scorer (predictor, 1 process)": [
                    p
                    for p in storage.list(f"predictions/{model}/dt=")
                    if p.endswith("/bench-chunked.avro")
                ],
                f"Beam DirectRunner ({args.workers} workers)": [
                    storage.path_of(u) for u in storage.read_json(spec.metrics_path)["output_uris"]
                ],
            }
            checked = {
                name: avro_rows(storage, paths) for name, paths in outputs.items() if name in runs
            }
            baseline = checked["bare loop (1 process)"][1]
            for name, (count, first) in checked.items():
                assert count == n, f"{name} wrote {count} rows of {n}"
                assert first == baseline, f"{name}'s predictions differ from the bare loop's"
            bare_wall, bare_peak, bare_cpu = figures["bare loop (1 process)"]
            print(
                f"\n{n:,} rows, every output read back: {n:,} rows each, the first 2,000 "
                "predictions equal\n"
            )
            print(
                "| contender | wall s | rows/s | CPU s | rows per CPU s | peak RSS MB "
                "| time vs bare | CPU vs bare | memory vs bare |"
            )
            print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
            for name, (wall, peak, cpu) in figures.items():
                print(
                    f"| {name} | {wall:.1f} | {n / wall:,.0f} | {cpu:.1f} | {n / cpu:,.0f} | "
                    f"{peak / 1e6:,.0f} | {wall / bare_wall:.2f}x | {cpu / bare_cpu:.2f}x | "
                    f"{peak / bare_peak:.2f}x |"
                )
    finally:
        stack.down(progress=lambda _: None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
