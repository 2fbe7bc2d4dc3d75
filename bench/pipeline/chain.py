"""mlpipe's iris chain, publish → serving, N new runs on a stack of its own.

    uv run --frozen python bench/pipeline/chain.py --runs 10

Starts a LocalStack (Pub/Sub emulator, fake-gcs-server, the five services) on free ports with a
state dir under /tmp, registers examples/iris/pipeline.yaml, then for run i publishes an
IngestRequest whose inline CSV is the iris rows shuffled with seed i (new bytes: a new object,
a new run) and follows it with mlpipe_ops.follow.EventWatcher, made before the first publish.

Wall-clock stamps (time.time(), one clock for every process on this machine): the publish, the
arrival of each event at the watcher, and "serving" — the first GET /v1/models (polled every
5 ms from the moment EvaluationCompleted arrives) that shows the deployed version. Stamps
carried by the events themselves (context.event_time, landed_at, TrainingCompleted.started_at/
finished_at/fit_seconds) and the line each service logs once Pub/Sub has acknowledged its event
split the chain further. The hops reported are cut at those acknowledgements (they add up to
publish → serving and carry no watcher lag); the watcher's arrivals are kept beside them. Run 1
has no champion; runs 2.. also score the champion: the steady state. Before its stack stops,
steps.py times the pieces of each step in process against the same emulators.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from common import IRIS_DIR, free_base_port, load, machine, p50_p95, shuffled_iris_csv
from steps import profile_steps

from mlpipe.messaging import events
from mlpipe.messaging.publishing import Publisher
from mlpipe.ml.config import config_path, parse_config
from mlpipe.store.storage import Storage, make_client
from mlpipe.v1 import events_pb2
from mlpipe_ops.follow import EventWatcher
from mlpipe_ops.localstack import LocalStack, StackState, client_env

STAGES = (
    "DatasetLanded",
    "TrainingStarted",
    "TrainingCompleted",
    "EvaluationCompleted",
    "DeploymentCompleted",
)
# (label, from, to, emulator floor): the chain cut where each step's output is acknowledged by
# Pub/Sub (the producer's own log line, see LOG_MARKS), so the hops add up to publish → serving
# and the watcher's own streaming-pull lag is in none of them. The floor is what the emulator
# alone costs that hop (floor.py): one push delivery, or the bucket notification's; the
# training job is forked by the trainer, no delivery.
HOPS = (
    ("ingest", "publish", "ingest.published", "push"),
    ("GCS notify + trainer", "ingest.published", "trainer.published", "gcs"),
    ("training job", "trainer.published", "job.published", ""),
    ("evaluator", "job.published", "evaluator.published", "push"),
    ("deployer", "evaluator.published", "deployer.published", "push"),
    ("predictor", "deployer.published", "serving", "push"),
)
# The same hops as the watcher sees them (each arrival carries the streaming-pull lag).
ARRIVAL_HOPS = (
    ("ingest", "publish", "DatasetLanded"),
    ("notify+trainer", "DatasetLanded", "TrainingStarted"),
    ("training job", "TrainingStarted", "TrainingCompleted"),
    ("evaluator", "TrainingCompleted", "EvaluationCompleted"),
    ("deployer", "EvaluationCompleted", "DeploymentCompleted"),
    ("predictor", "DeploymentCompleted", "serving"),
)
# The same chain split at the stamps the services put into events and logs (see timeline()).
SEGMENTS = (
    ("publish → ingest step begins (push + config read)", "publish", "ingest.ctx"),
    ("ingest: parse, validate, write object", "ingest.ctx", "landed_at"),
    ("ingest: publish DatasetLanded", "landed_at", "ingest.published"),
    ("object → trainer step begins (GCS notify + push + config read)", "landed_at", "trainer.ctx"),
    (
        "trainer: 404 checks, claim, config, launch, started, publish",
        "trainer.ctx",
        "trainer.published",
    ),
    ("trainer step begins → train() begins (fork, job clients)", "trainer.ctx", "job.started_at"),
    ("train(): read, split, fit, write model/split/lineage", "job.started_at", "job.finished_at"),
    ("  of which fit", "", ""),
    ("job: training.json + publish", "job.finished_at", "job.published"),
    (
        "TrainingCompleted → evaluator scored (push, reads, score x2)",
        "job.published",
        "evaluator.ctx",
    ),
    ("evaluator: metrics, record, publish", "evaluator.ctx", "evaluator.published"),
    (
        "EvaluationCompleted → deployer step begins (push + 1 read)",
        "evaluator.published",
        "deployer.ctx",
    ),
    ("deployer: reads, unpickle, ONNX convert + check", "deployer.ctx", "deployer.compiled"),
    ("deployer: register version (writes)", "deployer.compiled", "deployer.registered"),
    ("deployer: alias, traffic, record, publish", "deployer.registered", "deployer.published"),
    (
        "DeploymentCompleted → predictor swapped (push, reads, load)",
        "deployer.published",
        "predictor.swapped",
    ),
    ("predictor swapped → seen by the 5 ms poll", "predictor.swapped", "serving"),
    (
        "watcher lag: DeploymentCompleted published → arrived",
        "deployer.published",
        "DeploymentCompleted",
    ),
)


def _ts(stamp: Any) -> float:
    """A protobuf Timestamp as epoch seconds (0.0 when unset)."""
    return stamp.seconds + stamp.nanos / 1e9 if stamp.seconds else 0.0


class ServingPoller(threading.Thread):
    """GET /v1/models every `interval` s; remembers when each version of `model` first shows."""

    def __init__(self, url: str, model: str, interval: float = 0.005) -> None:
        super().__init__(daemon=True, name="serving-poller")
        self.url = f"{url}/v1/models"
        self.model = model
        self.interval = interval
        self.first_seen: dict[int, float] = {}
        self.polls = 0
        self._halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=2.0) as client:
            while not self._halt.is_set():
                try:
                    models = client.get(self.url).json()["models"]
                    version = models.get(self.model, {}).get("version")
                except (httpx.HTTPError, ValueError, KeyError):
                    version = None
                seen = time.time()
                self.polls += 1
                if version is not None and version not in self.first_seen:
                    self.first_seen[int(version)] = seen
                self._halt.wait(self.interval)

    def wait_for(self, version: int, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if version in self.first_seen:
                return self.first_seen[version]
            time.sleep(0.002)
        return None

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def one_run(
    i: int,
    state: StackState,
    publisher: Publisher,
    watcher: EventWatcher,
    model: str,
    timeout: float,
) -> dict[str, Any]:
    request_id = uuid.uuid4().hex
    request = events_pb2.IngestRequest(
        request_id=request_id,
        dataset="iris",
        inline=events_pb2.InlineRows(csv=shuffled_iris_csv(i)),
        requested_at=events.timestamp(),
    )
    poller = ServingPoller(state.url("predictor"), model)
    record: dict[str, Any] = {"run": i + 1, "request_id": request_id, "load": load()}
    at: dict[str, float] = {}
    seen: dict[str, Any] = {}
    t_publish = time.time()
    publisher.publish(request, attributes={"request_id": request_id})
    at["publish"] = t_publish
    at["publish_acked"] = time.time()
    run_id = ""
    deadline = time.monotonic() + timeout
    done: events_pb2.DeploymentCompleted | None = None
    while done is None and time.monotonic() < deadline:
        for observed in watcher.events(timeout=max(0.1, deadline - time.monotonic())):
            arrived = time.time()
            event: Any = observed.event
            ctx = event.context
            if not (ctx.request_id == request_id or (run_id and ctx.run_id == run_id)):
                continue
            name = type(event).__name__
            if isinstance(event, events_pb2.PipelineFailed):
                record["error"] = f"{events.pipeline_stage(event)}: {event.reason}: {event.message}"
                if poller.is_alive():
                    poller.stop()
                return record
            if name in at:
                continue  # a redelivery or re-publication: the first arrival counts
            at[name] = arrived
            seen[name] = event
            if isinstance(event, events_pb2.DatasetLanded):
                run_id = ctx.run_id
            elif isinstance(event, events_pb2.EvaluationCompleted):
                poller.start()
            elif isinstance(event, events_pb2.DeploymentCompleted):
                done = event
                break
    if done is None:
        record["error"] = f"no DeploymentCompleted within {timeout:.0f}s; saw {sorted(seen)}"
        if poller.is_alive():
            poller.stop()
        return record
    if not done.deployed:
        record["error"] = f"not deployed: {done.reason}"
        poller.stop()
        return record
    serving = poller.wait_for(done.version, timeout=30.0)
    poller.stop()
    if serving is None:
        record["error"] = f"predictor did not show v{done.version} within 30s"
        return record
    at["serving"] = serving
    landed: Any = seen["DatasetLanded"]
    started: Any = seen["TrainingStarted"]
    trained: Any = seen["TrainingCompleted"]
    evaluated: Any = seen["EvaluationCompleted"]
    record.update(
        run_id=run_id,
        version=done.version,
        previous_version=done.previous_version,
        runtime=done.runtime,
        champion_scored=bool(evaluated.champion_metrics),
        champion_version=evaluated.champion_version,
        accuracy=evaluated.metrics.get("accuracy"),
        fit_seconds=trained.fit_seconds,
        polls=poller.polls,
        at=at,
        stamps={
            "ingest.ctx": _ts(landed.context.event_time),
            "landed_at": _ts(landed.dataset.landed_at),
            "object.time_created": _ts(started.dataset.landed_at),
            "trainer.ctx": _ts(started.context.event_time),
            "job.started_at": _ts(trained.started_at),
            "job.finished_at": _ts(trained.finished_at),
            "job.ctx": _ts(trained.context.event_time),
            "evaluator.ctx": _ts(evaluated.context.event_time),
            "deployer.ctx": _ts(done.context.event_time),
        },
        end_to_end=serving - t_publish,
        arrival_hops={label: at[b] - at[a] for label, a, b in ARRIVAL_HOPS},
    )
    return record


# (log file, message prefix, stamp): lines each service writes at a known point of its step.
# Ingest's and the trainer's own "published" lines carry no run_id (their input has none); the
# line each writes right after publishing does.
LOG_MARKS = (
    ("ingest.log", "landed ", "ingest.published"),
    ("trainer.log", "started ", "trainer.published"),
    ("jobs/*.log", "published ", "job.published"),
    ("evaluator.log", "published ", "evaluator.published"),
    ("deployer.log", "runtime ", "deployer.compiled"),
    ("deployer.log", "registered ", "deployer.registered"),
    ("deployer.log", "published ", "deployer.published"),
    ("predictor.log", "now serving ", "predictor.swapped"),
)


def stamps_from_logs(logs: Path, run_ids: set[str]) -> dict[str, dict[str, float]]:
    """{run_id: {stamp: epoch seconds}} from the services' JSON log lines (LOG_MARKS)."""
    out: dict[str, dict[str, float]] = {r: {} for r in run_ids}
    for pattern, prefix, key in LOG_MARKS:
        for path in sorted(logs.glob(pattern)):
            for line in path.read_text(errors="replace").splitlines():
                if not line.startswith("{") or prefix not in line:
                    continue
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                run_id = entry.get("run_id", "")
                if run_id in out and str(entry.get("message", "")).startswith(prefix):
                    when = dt.datetime.fromisoformat(entry["time"]).timestamp()
                    out[run_id].setdefault(key, when)
    return out


def timeline(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """p50/p95 of each segment of SEGMENTS over the successful runs."""
    rows = []
    for label, a, b in SEGMENTS:
        if not a:
            values = [r["fit_seconds"] for r in records]
        else:
            values = []
            for r in records:
                stamps = {**r["at"], **r["stamps"]}
                if stamps.get(a) and stamps.get(b):
                    values.append(stamps[b] - stamps[a])
        p50, p95 = p50_p95(values)
        rows.append({"segment": label, "p50": p50, "p95": p95, "n": len(values)})
    return rows


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in records if "error" not in r]
    steady = [r for r in ok if r["champion_scored"]]

    def stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
        e2e = [r["end_to_end"] for r in rows]
        p50, p95 = p50_p95(e2e)
        hops = {}
        for label, _, _, floor in HOPS:
            values = [r["hops"][label] for r in rows if label in r["hops"]]
            h50, h95 = p50_p95(values)
            hops[label] = {"p50": h50, "p95": h95, "n": len(values), "floor": floor}
        arrival = {}
        for label, _, _ in ARRIVAL_HOPS:
            h50, h95 = p50_p95([r["arrival_hops"][label] for r in rows])
            arrival[label] = {"p50": h50, "p95": h95}
        return {
            "n": len(rows),
            "p50": p50,
            "p95": p95,
            "hops": hops,
            "arrival_hops": arrival,
            "timeline": timeline(rows),
        }

    return {
        "all": stats(ok),
        "steady": stats(steady),
        "failed": [r for r in records if "error" in r],
        "loads": [r["load"][0] for r in records],
    }


def run_chain(
    runs: int,
    timeout: float,
    state_dir: Path,
    progress: Any = print,
    profile: bool = True,
    containers: bool = False,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """`containers`: the services run as their images (`mlpipe up --containers`); `env`:
    settings for every service (over the stack's own)."""
    base = free_base_port()
    suffix = uuid.uuid4().hex[:8]
    stack = LocalStack(
        state_dir,
        base_port=base,
        project=f"bench-{suffix}",
        bucket=f"bench-{suffix}",
        containers=containers,
        env=env,
    )
    progress(f"chain: starting a stack on ports {base}..{base + 6} (state {state_dir})")
    t0 = time.monotonic()
    state = stack.up(progress=lambda line: progress(f"  {line}"))
    startup = time.monotonic() - t0
    records: list[dict[str, Any]] = []
    pieces: dict[str, Any] = {}
    try:
        with client_env(state):
            storage = Storage(make_client(state.project), state.bucket)
            text = (IRIS_DIR / "pipeline.yaml").read_text()
            config = parse_config(text, source="examples/iris/pipeline.yaml")
            storage.write(config_path(config.name), text.encode(), content_type="application/yaml")
            publisher = Publisher(state.project)
            with EventWatcher(state.project) as watcher:
                for i in range(runs):
                    record = one_run(i, state, publisher, watcher, config.model.name, timeout)
                    records.append(record)
                    if "error" in record:
                        progress(f"  run {i + 1}: FAILED {record['error']}")
                    else:
                        hops = "  ".join(
                            f"{k} {v * 1000:.0f}" for k, v in record["arrival_hops"].items()
                        )
                        progress(
                            f"  run {i + 1}: {record['end_to_end']:.3f}s publish→serving "
                            f"(v{record['version']}, {record['runtime']}, champion "
                            f"{'scored' if record['champion_scored'] else 'none'}, load "
                            f"{record['load'][0]}) arrivals, ms: {hops}"
                        )
            done = [r for r in records if "error" not in r]
            if profile and done:
                progress("  timing the steps' pieces in process (steps.py)")
                pieces = profile_steps(state, done[-1]["run_id"], config.model.name)
        logged = stamps_from_logs(
            Path(state.state_dir) / "logs", {r["run_id"] for r in records if "run_id" in r}
        )
        for r in records:
            if "run_id" in r:
                r["stamps"].update(logged.get(r["run_id"], {}))
                stamps = {**r["at"], **r["stamps"]}
                r["hops"] = {
                    label: stamps[b] - stamps[a]
                    for label, a, b, _ in HOPS
                    if stamps.get(a) and stamps.get(b)
                }
    finally:
        stack.down(progress=lambda _: None)
    return {
        "machine": machine(),
        "stack_startup_seconds": startup,
        "runs": records,
        "summary": summarize(records),
        "pieces": pieces,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=120.0, help="per run, seconds")
    parser.add_argument("--state-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the raw results as JSON")
    args = parser.parse_args()
    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="mlpipe-bench-chain-"))
    result = run_chain(args.runs, args.timeout, state_dir)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print_chain(result)


def print_chain(result: dict[str, Any]) -> None:
    for key, title in (("all", "all runs"), ("steady", "runs with a champion (steady state)")):
        s = result["summary"][key]
        print(
            f"\nmlpipe publish→serving, {title}: n={s['n']} p50 {s['p50']:.3f}s p95 {s['p95']:.3f}s"
        )
        for label, v in s["hops"].items():
            print(f"  {label:<22} p50 {v['p50'] * 1000:7.1f} ms  p95 {v['p95'] * 1000:7.1f} ms")
    if result.get("pieces"):
        print(f"\ninside the steps, in process, ms: {'first':>9} {'warm p50':>9}")
        for label, v in result["pieces"].items():
            if "bytes" in label:
                print(f"  {label:<66} {v['p50']:9.0f} B")
            else:
                print(f"  {label:<66} {v['first'] * 1000:9.1f} {v['p50'] * 1000:9.1f}")
    print("\ntimeline (steady state), ms:")
    for row in result["summary"]["steady"]["timeline"]:
        print(f"  {row['segment']:<72} p50 {row['p50'] * 1000:7.1f}  p95 {row['p95'] * 1000:7.1f}")


if __name__ == "__main__":
    main()
