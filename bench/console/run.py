"""The console's page load times with 1,000 recorded runs and 50 versions of one model.

    uv run --frozen python bench/console/run.py            # prints the table, updates RESULTS.md
    uv run --frozen python bench/console/run.py --no-write

On fake-gcs-server (the local stack's emulators, no services): 1,000 runs, each with the four
records a deployed run has (started, training, evaluation, deployment: the events the steps
record, as JSON), and 50 registered versions of iris-classifier with a champion and a canary.
The console runs as its own process (`python -m mlpipe_console`, uvicorn on 127.0.0.1).

Measured: the server's time to answer each page (first request, which builds the run index,
then warm requests), and in Chromium (Playwright, /usr/bin/chromium) the page's load event
(navigation start → loadEventEnd, charts drawn from the console's own vega). The baseline in the
same run: the CLI's way of reading the same runs (`mlpipe runs`: each run's records read one
after the other, mlpipe.store.run_records.run_outcome).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))
from common import REPO, free_base_port, load, machine

from mlpipe.messaging import events
from mlpipe.store import layout
from mlpipe.store.layout import RegistryPaths, RunPaths
from mlpipe.store.registry import CHAMPION, Registry
from mlpipe.store.run_records import run_outcome
from mlpipe.store.storage import Storage, make_client
from mlpipe.v1 import events_pb2
from mlpipe_ops.localstack import HOST, LocalStack, client_env, free_port

RUNS = 1000
VERSIONS = 50
MODEL = "iris-classifier"
CHROMIUM = "/usr/bin/chromium"
RUNS_PAGE = "/runs (first 50 of 1,000)"


def seed(storage: Storage) -> list[str]:
    """1,000 deployed runs and 50 versions; the run ids."""
    start = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)

    def one(i: int) -> str:
        run_id = f"{i:016x}"
        at = start + dt.timedelta(minutes=i)
        context = events.context(
            producer="bench", code_version="bench", run_id=run_id, pipeline="iris"
        )
        context.event_time.FromDatetime(at)
        dataset = events_pb2.DatasetRef(
            uri=storage.uri(f"datasets/iris/dt=2026-11-01/{run_id}.csv"),
            generation=1000 + i,
            sha256=f"{i:064x}",
            name="iris",
            row_count=150,
        )
        paths = RunPaths(run_id)
        started = events_pb2.TrainingStarted(context=context, dataset=dataset, job_id=f"j{i}")
        trained = events_pb2.TrainingCompleted(
            context=context, dataset=dataset, model_name=MODEL, model_uri=storage.uri(paths.model)
        )
        trained.started_at.FromDatetime(at + dt.timedelta(seconds=1))
        trained.finished_at.FromDatetime(at + dt.timedelta(seconds=3))
        evaluated = events_pb2.EvaluationCompleted(
            context=context,
            dataset=dataset,
            model_name=MODEL,
            passed=i % 7 != 0,
            metrics={"accuracy": 0.9 + (i % 10) / 100},
        )
        evaluated.context.event_time.FromDatetime(at + dt.timedelta(seconds=4))
        deployed = events_pb2.DeploymentCompleted(
            context=context,
            dataset=dataset,
            model_name=MODEL,
            deployed=i % 7 != 0,
            version=(i % VERSIONS) + 1,
            reason="" if i % 7 else "gates",
        )
        deployed.context.event_time.FromDatetime(at + dt.timedelta(seconds=5))
        for path, event in (
            (paths.started, started),
            (paths.training, trained),
            (paths.evaluation, evaluated),
            (paths.deployment, deployed),
        ):
            storage.write(path, events.to_json(event).encode(), content_type="application/json")
        return run_id

    with ThreadPoolExecutor(16) as pool:
        run_ids = list(pool.map(one, range(RUNS)))
    registry = RegistryPaths(MODEL)

    def version(n: int) -> None:
        storage.write(registry.version_file(n, "model.joblib"), b"model")
        storage.write_json(
            registry.version_record(n),
            {
                "model": MODEL,
                "version": n,
                "run_id": run_ids[n - 1],
                "model_uri": storage.uri(registry.version_file(n, "model.joblib")),
                "model_sha256": "0" * 64,
                "metrics": {"accuracy": 0.95, "macro_f1": 0.94},
                "artifacts": {},
                "registered_at": (start + dt.timedelta(hours=n)).isoformat(),
            },
        )

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(version, range(1, VERSIONS + 1)))
    reg = Registry(storage)
    for n in range(1, VERSIONS):
        reg.move_alias(MODEL, n, CHAMPION)
    reg.start_canary(MODEL, VERSIONS, 10)
    assert reg.traffic(MODEL).canary == VERSIONS and reg.traffic(MODEL).champion == VERSIONS - 1
    return run_ids


def timed_get(url: str) -> float:
    began = time.perf_counter()
    reply = httpx.get(url, timeout=120)
    elapsed = time.perf_counter() - began
    assert reply.status_code == 200, (url, reply.status_code, reply.text[:300])
    return elapsed * 1000


def browser_loads(urls: dict[str, str], repeats: int) -> dict[str, list[float]]:
    from playwright.sync_api import sync_playwright

    found: dict[str, list[float]] = {name: [] for name in urls}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        for _ in range(repeats):
            for name, url in urls.items():
                page.goto(url, wait_until="load")
                found[name].append(
                    page.evaluate(
                        "() => { const n = performance.getEntriesByType('navigation')[0];"
                        " return n.loadEventEnd - n.startTime; }"
                    )
                )
        browser.close()
    return found


def write_results(section: str) -> None:
    """Replace the "## Console" section of bench/RESULTS.md, keeping every other section."""
    path = REPO / "bench" / "RESULTS.md"
    text = path.read_text()
    start_at = text.find("## Console")
    if start_at == -1:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start_at + 1)
        rest = "" if end == -1 else "\n" + text[end + 1 :]
        text = text[:start_at] + section.rstrip("\n") + "\n" + rest
    path.write_text(text.rstrip("\n") + "\n")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()
    load_before = load()
    workdir = Path(tempfile.mkdtemp(prefix="bench-console-"))
    stack = LocalStack(workdir / "stack", base_port=free_base_port(), project="bench-console")
    state = stack.up(services=False, progress=lambda _: None)
    console = None
    try:
        with client_env(state):
            storage = Storage(make_client(state.project), state.bucket)
            began = time.perf_counter()
            run_ids = seed(storage)
            print(
                f"seeded {RUNS} runs and {VERSIONS} versions in {time.perf_counter() - began:.1f} s"
            )
            began = time.perf_counter()
            rows = [
                run_outcome(storage, run_id) for run_id in layout.run_ids(storage.list(layout.RUNS))
            ]
            baseline_ms = (time.perf_counter() - began) * 1000
            assert len(rows) == RUNS
        port = free_port()
        env = {
            **os.environ,
            **state.client_env(),
            "MLPIPE_CONSOLE_AUTH": "local",
            "MLPIPE_HOST": HOST,
            "MLPIPE_PORT": str(port),
            "MLPIPE_LOG_LEVEL": "WARNING",
        }
        console = subprocess.Popen([sys.executable, "-m", "mlpipe_console"], env=env)
        base = f"http://{HOST}:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the console did not start"
            time.sleep(0.1)
        pages = {
            RUNS_PAGE: f"{base}/runs",
            "/runs?page=10&state=deployed": f"{base}/runs?page=10&state=deployed",
            "/runs/<id> (charts)": f"{base}/runs/{run_ids[500]}",
            "/models (50 versions)": f"{base}/models",
        }
        first = {name: timed_get(url) for name, url in pages.items()}
        warm = {name: [timed_get(url) for _ in range(args.repeats)] for name, url in pages.items()}
        loads = browser_loads(pages, max(3, args.repeats // 2))
    finally:
        if console is not None:
            console.terminate()
            console.wait(15)
        stack.down(progress=lambda _: None)
    load_after = load()

    def ms(values: list[float]) -> str:
        return f"{statistics.median(values):.1f}"

    info = machine()
    lines = [
        "## Console",
        "",
        f"Page load times of the console with {RUNS:,} recorded runs and {VERSIONS} versions of "
        "one model (a champion and a 10% canary), on fake-gcs-server; the console as its own "
        "process (`python -m mlpipe_console`). Server: the time to the full answer over "
        "HTTP (the first request builds the run index: one listing, then every run's records "
        "read 8 at a time; later ones list once and read nothing new). Browser: Chromium's load "
        "event (navigation start to loadEventEnd), the page's scripts and charts included. "
        "Baseline, same run: the CLI's `mlpipe runs` reading (each run's records in turn).",
        "",
        "Command: `uv run --frozen python bench/console/run.py`",
        "",
        f"Machine: {info.get('cores')} CPUs ({info.get('cpu')}), Python {info.get('python')}, "
        "load average "
        f"{', '.join(f'{x:.2f}' for x in load_before)} at start; "
        f"{', '.join(f'{x:.2f}' for x in load_after)} at the end.",
        "",
        f"| page | server, first request ms | server, warm p50 ms (n={args.repeats}) "
        "| browser load event p50 ms |",
        "|---|---:|---:|---:|",
    ]
    for name in pages:
        lines.append(f"| {name} | {first[name]:.1f} | {ms(warm[name])} | {ms(loads[name])} |")
    lines += [
        "",
        f"- baseline: the CLI's reading of the {RUNS:,} runs (`run_outcome` each): "
        f"{baseline_ms:.0f} ms",
        f"- /runs, first request: x{baseline_ms / first[RUNS_PAGE]:.1f} faster than the "
        f"baseline; warm: x{baseline_ms / statistics.median(warm[RUNS_PAGE]):.1f}",
        "",
    ]
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        write_results(section)
        print("updated bench/RESULTS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
