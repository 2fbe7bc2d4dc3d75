"""What recording a run's cost estimate adds to the deployer's decision.

    uv run --frozen python bench/deployer/cost_record.py            # prints, updates RESULTS.md
    uv run --frozen python bench/deployer/cost_record.py --no-write

On the local stack's emulators (fake-gcs-server, the Pub/Sub emulator; no services): runs
whose records are those of a run the evaluator has judged (config, started, training and
evaluation records, a 100 kB model), each decided by the deployer's real step
(`mlpipe_deployer.deployment.deploy`, gates failed: recorded, published, nothing rolled out).
Baseline, the same run, interleaved: the same step with the estimate's recording switched off;
measured: with it (the estimate from the run's records and objects, written as
runs/<id>/cost.json).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))
from common import REPO, free_base_port, load, machine

from mlpipe.messaging import events, topology
from mlpipe.messaging.publishing import Publisher
from mlpipe.store import layout, run_cost
from mlpipe.store.registry import Registry
from mlpipe.store.storage import Storage, make_client
from mlpipe.v1 import events_pb2
from mlpipe_deployer import deployment, progress
from mlpipe_deployer.deployment import Deployer
from mlpipe_ops import service_runtime
from mlpipe_ops.localstack import LocalStack, client_env

SECTION = "## Deployer: recording a run's cost estimate"


def judged_run(storage: Storage, i: int) -> events_pb2.EvaluationCompleted:
    """A run's records as the trainer, its job and the evaluator leave them; its verdict."""
    run_id = f"{dt.datetime.now(dt.UTC).strftime('%H%M%S')}{i:010x}"[-16:]
    paths = layout.RunPaths(run_id)
    at = dt.datetime(2026, 12, 1, 10, tzinfo=dt.UTC)
    context = events.context(producer="bench", code_version="bench", run_id=run_id, pipeline="iris")
    storage.write(paths.config, b'{"name": "iris"}')
    storage.write(paths.model, b"m" * 100_000)
    started = events_pb2.TrainingStarted(context=context)
    started.context.event_time.FromDatetime(at)
    storage.write(paths.started, events.to_json(started).encode())
    trained = events_pb2.TrainingCompleted(context=context, model_name="iris-classifier")
    trained.context.event_time.FromDatetime(at + dt.timedelta(seconds=40))
    storage.write(paths.training, events.to_json(trained).encode())
    verdict = events_pb2.EvaluationCompleted(
        context=context, model_name="iris-classifier", passed=False
    )
    verdict.context.event_time.FromDatetime(at + dt.timedelta(seconds=45))
    storage.write(paths.evaluation, events.to_json(verdict).encode())
    return verdict


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=40, help="runs decided each way")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()
    load_before = load()
    workdir = Path(tempfile.mkdtemp(prefix="bench-cost-"))
    stack = LocalStack(workdir / "stack", base_port=free_base_port(), project="bench-cost")
    state = stack.up(services=False, progress=lambda _: None)
    costs = service_runtime.cost_environment("local")
    record_cost = progress.record_cost
    timings: dict[str, list[float]] = {"without": [], "with": []}
    try:
        with client_env(state):
            storage = Storage(make_client(state.project), state.bucket)
            topology.create_topics(state.project, topology.TOPOLOGY.topics)
            deps = Deployer(
                storage,
                Publisher(state.project),
                Registry(storage),
                "bench",
                cost_sizes=costs["MLPIPE_COST_SIZES"],
                prices=costs["MLPIPE_PRICES"],
            )
            runs = [judged_run(storage, i) for i in range(2 * args.runs + 2)]
            for warm in runs[:2]:  # the first calls pay the clients' connections
                deployment.deploy(warm, deps)
            for i, verdict in enumerate(runs[2:]):
                mode = "with" if i % 2 else "without"
                progress.record_cost = record_cost if mode == "with" else lambda *_: None
                began = time.perf_counter()
                answer = deployment.deploy(verdict, deps)
                timings[mode].append((time.perf_counter() - began) * 1000)
                assert answer.status == "not_deployed", answer
                recorded = run_cost.read_record(storage, verdict.context.run_id)
                assert (recorded is not None) == (mode == "with"), mode
                assert recorded is None or recorded.cost is not None, recorded
    finally:
        progress.record_cost = record_cost
        stack.down(progress=lambda _: None)
    load_after = load()
    p50 = {mode: statistics.median(values) for mode, values in timings.items()}
    mean = {mode: statistics.fmean(values) for mode, values in timings.items()}
    info = machine()
    lines = [
        SECTION,
        "",
        "The deployer's decision for a run its gates stopped (`mlpipe_deployer.deployment."
        "deploy`: its DeploymentCompleted recorded and published, nothing rolled out), on the "
        "local stack's emulators, with and without recording the run's estimate (`runs/<id>/"
        "cost.json`: its records and objects read, the estimate written). Interleaved in the "
        f"same run, {args.runs} runs each; each run has its config, started, training and "
        "evaluation records and a 100 kB model.",
        "",
        "Command: `uv run --frozen python bench/deployer/cost_record.py`",
        "",
        f"Machine: {info.get('cores')} CPUs ({info.get('cpu')}), Python {info.get('python')}, "
        f"load average {', '.join(f'{x:.2f}' for x in load_before)} at start; "
        f"{', '.join(f'{x:.2f}' for x in load_after)} at the end.",
        "",
        "| decision | runs | p50 ms | mean ms |",
        "|---|---:|---:|---:|",
        f"| without the estimate (baseline) | {args.runs} | {p50['without']:.1f} | "
        f"{mean['without']:.1f} |",
        f"| with the estimate recorded | {args.runs} | {p50['with']:.1f} | {mean['with']:.1f} |",
        "",
        f"- with / without: p50 x{p50['with'] / p50['without']:.2f}, "
        f"mean x{mean['with'] / mean['without']:.2f} "
        f"(+{p50['with'] - p50['without']:.1f} ms at p50)",
        "",
    ]
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        path = REPO / "bench" / "RESULTS.md"
        text = path.read_text()
        start = text.find(SECTION)
        if start < 0:
            text = text.rstrip("\n") + "\n\n" + section
        else:
            end = text.find("\n## ", start + 1)
            text = text[:start] + section + (text[end + 1 :] if end >= 0 else "")
        path.write_text(text)
        print("updated bench/RESULTS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
