"""Serving benchmark: the mlpipe predictor over HTTP vs `mlflow models serve` vs bare in-process
predict, on the same RandomForest(100) iris model.

    uv run --frozen python bench/serving/run.py            # prints the table, updates RESULTS.md

The iris pipeline is trained by the trainer's own code and deployed by the deployer's own step
(ONNX compiled and checked on the holdout) into fake-gcs-server; the predictor runs as a real
`python -m mlpipe_predictor` process on 127.0.0.1. MLflow gets the very same fitted pipeline
(the registered artifact), saved with mlflow.sklearn, served by `mlflow models serve
--env-manager local` from its own virtualenv (created here with uv, outside the project's
dependencies). MLflow is pinned (MLFLOW_SPEC) and its model is saved with its requirements
written out (`pip_requirements`), not inferred: inference runs pip against the machine's own
configuration, and where that pip is missing or differs MLflow's dedup step fails with "The
specified requirements versions are incompatible" (mlflow/utils/environment.py runs `pip
install --dry-run` to compare two pins of one package), so on a fresh machine the side-by-side
never ran. One row per request, two loads: one client on one keep-alive connection,
sequential; then 16 concurrent clients, each on its own keep-alive connection, against the
predictor (one uvicorn worker) and MLflow at its default workers (`mlflow models serve`: 1).
Latency percentiles and requests per second. Not a test: nothing here is asserted.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

ROW = [5.1, 3.5, 1.4, 0.2]
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
MLFLOW_VENV = Path(os.environ.get("MLPIPE_BENCH_MLFLOW_VENV", "/tmp/mlpipe-bench-mlflow"))
# Pinned, so every machine measures the same MLflow (3.17.2: the newest whose every wheel the
# package index here carries); MLPIPE_BENCH_MLFLOW_SPEC overrides.
MLFLOW_VERSION = "3.17.2"
MLFLOW_SPEC = os.environ.get("MLPIPE_BENCH_MLFLOW_SPEC", f"mlflow=={MLFLOW_VERSION}")
CONCURRENT_CLIENTS = 16


PLAIN_ROUTE = "mlpipe predictor, HTTP `POST /predict`"
LOGGING_OFF = "mlpipe predictor, HTTP `POST /predict`, prediction logging off"


def machine_note() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, "
        f"load average {load} at start"
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def measure(call: Callable[[], Any], count: int, warmup: int, budget: float) -> dict[str, float]:
    """Run `call` sequentially: `warmup` unmeasured, then `count` (or until `budget` s)."""
    for _ in range(warmup):
        call()
    latencies = []
    began = time.perf_counter()
    for _ in range(count):
        t0 = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - t0)
        if time.perf_counter() - began > budget:
            break
    elapsed = time.perf_counter() - began
    return {
        "n": len(latencies),
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "mean_ms": statistics.fmean(latencies) * 1e3,
        "rps": len(latencies) / elapsed,
    }


def measure_concurrent(
    make_call: Callable[[], Callable[[], Any]], clients: int, count: int, budget: float
) -> dict[str, float]:
    """`clients` threads, each with its own call (its own connection), `count` calls in all
    (or until `budget` s); latency per call, throughput over the whole."""
    calls = [make_call() for _ in range(clients)]
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    left = [count]

    began = [0.0]  # set once every client is warm, as they all start
    ready = threading.Barrier(clients + 1, action=lambda: began.__setitem__(0, time.perf_counter()))

    def run(call: Callable[[], Any]) -> None:
        mine = []
        try:
            for _ in range(20):  # warm-up, all clients at once (an idle one would time out)
                call()
        except BaseException as exc:
            errors.append(exc)
        ready.wait()
        while not errors and time.perf_counter() - began[0] < budget:
            with lock:
                if left[0] <= 0:
                    break
                left[0] -= 1
            t0 = time.perf_counter()
            try:
                call()
            except BaseException as exc:  # reported below, not swallowed
                errors.append(exc)
                break
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    ready.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began[0]
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed: {errors[0]}")
    return {
        "n": len(latencies),
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "mean_ms": statistics.fmean(latencies) * 1e3,
        "rps": len(latencies) / elapsed,
        # Kept-alive connections the server closed, reopened by the client.
        "reconnects": sum(int(getattr(call, "reconnects", 0)) for call in calls),
    }


class HttpClient:
    """One keep-alive connection; raises unless the server answers 200."""

    def __init__(self, port: int, path: str, body: dict[str, Any]) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.path = path
        self.body = json.dumps(body).encode()
        self.headers = {"Content-Type": "application/json"}
        self.last: Any = None
        self.reconnects = 0

    def __call__(self) -> None:
        try:
            self.connection.request("POST", self.path, self.body, self.headers)
            reply = self.connection.getresponse()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            # The server closed the kept-alive connection: open another, as any HTTP
            # client's pool does, and count it.
            self.connection.close()
            self.reconnects += 1
            self.connection.request("POST", self.path, self.body, self.headers)
            reply = self.connection.getresponse()
        data = reply.read()
        if reply.status != 200:
            raise RuntimeError(f"{self.path}: HTTP {reply.status}: {data[:300]!r}")
        self.last = data


def wait_http(port: int, path: str, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server on port {port} exited ({proc.returncode})")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", path)
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"nothing answered 200 on 127.0.0.1:{port}{path} within {timeout}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server this script started (its own process group), by PID."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


# --- the model, trained and deployed by the pipeline's own code ---------------------------------
def deploy_iris(workdir: Path) -> tuple[Any, Any, dict[str, str]]:
    """Emulators + the iris model trained and deployed into them. Returns (stack, the fitted
    pipeline, the env a predictor process needs)."""
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

    stack = LocalStack(workdir / "stack", base_port=free_base_port(), project="bench-serving")
    state = stack.up(services=False, progress=lambda _: None)
    with client_env(state):
        topology.create_topics(state.project, topology.TOPOLOGY.topics)
        storage = Storage(make_client(state.project), state.bucket)
        config = parse_config((REPO / "examples/iris/pipeline.yaml").read_text())
        data = (REPO / "examples/iris/iris.csv").read_bytes()
        path = "datasets/iris/dt=2026-11-23/bench.csv"
        generation = storage.write(path, data, content_type="text/csv")
        run_id = layout.run_id_for(sha256_hex(data), config.sha256())
        storage.write(f"runs/{run_id}/config.json", config.canonical_json())
        context = events.context(
            producer="bench",
            code_version="bench",
            run_id=run_id,
            pipeline="iris",
            config_sha256=config.sha256(),
        )
        dataset = events_pb2.DatasetRef(
            uri=storage.uri(path), generation=generation, sha256=sha256_hex(data), name="iris"
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
        version = registry.get("iris-classifier", 1)
        assert version is not None, "the deployer registered nothing"
        import joblib

        bundle = joblib.load(io.BytesIO(registry.load_artifact(version)))
        print(f"deployed iris-classifier v1: runtime {version.info.get('runtime')}")
        print(f"  {version.info.get('runtime_note')}")
        env = {**os.environ, **state.client_env()}
    return stack, bundle["estimator"], env


# --- MLflow -----------------------------------------------------------------------------------
def mlflow_python() -> Path:
    import sklearn

    python = MLFLOW_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run(["uv", "venv", "-q", "-p", "3.11", str(MLFLOW_VENV)], check=True)
    # Every run: a venv left with another MLflow gets the pinned one (nothing to do if it has).
    print(f"{MLFLOW_SPEC} in {MLFLOW_VENV} (its own venv, not the project's)")
    subprocess.run(
        [
            "uv",
            "pip",
            "install",
            "-q",
            "--python",
            str(python),
            MLFLOW_SPEC,
            f"scikit-learn=={sklearn.__version__}",  # the pickle needs the same version
        ],
        check=True,
    )
    return python


def mlflow_model(estimator: Any, workdir: Path) -> tuple[Path, str]:
    import joblib

    python = mlflow_python()
    pickled = workdir / "iris.joblib"
    joblib.dump(estimator, pickled)
    target = workdir / "mlflow-model"
    script = (
        "import joblib, sys, cloudpickle, sklearn, pandas as pd, mlflow, mlflow.sklearn\n"
        "m = joblib.load(sys.argv[1])\n"
        f"x = pd.DataFrame([{ROW!r}], columns={FEATURES!r})\n"
        # Written out, each package once, so MLflow infers nothing through pip.
        "reqs = [f'mlflow=={mlflow.__version__}', f'scikit-learn=={sklearn.__version__}',\n"
        "        f'cloudpickle=={cloudpickle.__version__}', f'pandas=={pd.__version__}']\n"
        # MLflow 3's default (skops) refuses the trees unless told to trust them; cloudpickle
        # was its default for years, and loading is not part of what is measured.
        "mlflow.sklearn.save_model(m, sys.argv[2], input_example=x, pip_requirements=reqs,\n"
        "    serialization_format=mlflow.sklearn.SERIALIZATION_FORMAT_CLOUDPICKLE)\n"
        "print(mlflow.__version__)\n"
    )
    out = subprocess.run(
        [str(python), "-c", script, str(pickled), str(target)],
        capture_output=True,
        text=True,
        # Its check of requirements through pip: nothing to check when they are written out.
        env={**os.environ, "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true"},
    )
    if out.returncode != 0:
        raise RuntimeError(f"saving the MLflow model failed: {out.stderr.strip()[-600:]}")
    return target, out.stdout.strip().splitlines()[-1]


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def free_port() -> int:
    from mlpipe_ops.localstack import free_port as pick

    return pick()


# --- the report -------------------------------------------------------------------------------
def table(rows: list[tuple[str, dict[str, float]]]) -> str:
    lines = [
        "| server | requests | p50 ms | p99 ms | mean ms | req/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {int(r['n'])} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
            f"{r['mean_ms']:.3f} | {r['rps']:.0f} |"
        )
    return "\n".join(lines)


def write_results(section: str) -> None:
    """Replace the "## Serving" section of bench/RESULTS.md, keeping every other section."""
    path = REPO / "bench" / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start_at = text.find("## Serving")
    if start_at == -1:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start_at + 1)
        rest = "" if end == -1 else "\n" + text[end + 1 :]
        text = text[:start_at] + section.rstrip("\n") + "\n" + rest
    path.write_text(text.rstrip("\n") + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="per HTTP server")
    parser.add_argument(
        "--log-requests",
        type=int,
        default=20000,
        help="requests for the prediction-logging on/off comparison (spans several flushes)",
    )
    parser.add_argument("--budget", type=float, default=30.0, help="seconds per server at most")
    parser.add_argument("--no-mlflow", action="store_true", help="skip MLflow")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()

    note = machine_note()
    started_load = os.getloadavg()[0]
    print(note)
    results: list[tuple[str, dict[str, float]]] = []
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="mlpipe-bench-") as tmp:
        workdir = Path(tmp)
        stack, estimator, env = deploy_iris(workdir)
        servers: list[subprocess.Popen[bytes]] = []
        try:
            import pandas as pd

            frame = pd.DataFrame([ROW], columns=FEATURES)
            results.append(
                (
                    "in-process sklearn `pipeline.predict` (no HTTP)",
                    measure(lambda: estimator.predict(frame), 300, 20, args.budget),
                )
            )
            from mlpipe.ml.scoring import load_version
            from mlpipe.store.registry import Registry
            from mlpipe.store.storage import Storage, make_client
            from mlpipe_ops.localstack import client_env

            with client_env(stack.state):
                registry = Registry(Storage(make_client(stack.state.project), stack.state.bucket))
                loaded = load_version(registry, "iris-classifier", 1)
            results.append(
                (
                    f"in-process mlpipe runtime ({loaded.runtime}, validation included, no HTTP)",
                    measure(lambda: loaded.predict([ROW]), 20000, 500, args.budget),
                )
            )

            # Prediction logging off first, then on (the default): the same requests.
            for rate, routes in (
                ("0", ((LOGGING_OFF, "/predict"),)),
                (
                    "1",
                    (
                        (PLAIN_ROUTE, "/predict"),
                        (
                            "mlpipe predictor, HTTP Vertex `…/endpoints/iris-classifier:predict`",
                            "/v1/projects/p/locations/l/endpoints/iris-classifier:predict",
                        ),
                    ),
                ),
            ):
                port = free_port()
                predictor_env = {
                    **env,
                    "PORT": str(port),
                    "MLPIPE_HOST": "127.0.0.1",
                    "MLPIPE_PREDICTION_LOG_RATE": rate,
                }
                predictor = start(
                    [sys.executable, "-m", "mlpipe_predictor"], predictor_env, workdir / "p.log"
                )
                servers.append(predictor)
                wait_http(port, "/readyz", 60, predictor)
                for label, path in routes:
                    client = HttpClient(port, path, {"instances": [ROW]})
                    # The logging comparison runs long enough to include background flushes.
                    count = (
                        args.log_requests if label in (PLAIN_ROUTE, LOGGING_OFF) else args.requests
                    )
                    results.append((label, measure(client, count, 200, args.budget)))
                print("mlpipe reply:", client.last.decode())
                if rate == "1":
                    results.append(
                        (
                            f"{PLAIN_ROUTE}, {CONCURRENT_CLIENTS} concurrent clients",
                            measure_concurrent(
                                lambda port=port: HttpClient(  # type: ignore[misc]
                                    port, "/predict", {"instances": [ROW]}
                                ),
                                CONCURRENT_CLIENTS,
                                args.requests * 4,
                                args.budget,
                            ),
                        )
                    )
                stop(predictor)

            if not args.no_mlflow:
                try:
                    model_dir, version = mlflow_model(estimator, workdir)
                    port = free_port()
                    mlflow = start(
                        [
                            str(MLFLOW_VENV / "bin" / "mlflow"),
                            "models",
                            "serve",
                            "-m",
                            str(model_dir),
                            "--env-manager",
                            "local",
                            "-h",
                            "127.0.0.1",
                            "-p",
                            str(port),
                        ],
                        {
                            **os.environ,
                            # It runs `uvicorn` by name: its venv's bin must come first.
                            "PATH": f"{MLFLOW_VENV / 'bin'}:{os.environ.get('PATH', '')}",
                            "MLFLOW_TRACKING_URI": f"file://{workdir}/mlruns",
                        },
                        workdir / "mlflow.log",
                    )
                    servers.append(mlflow)
                    wait_http(port, "/ping", 120, mlflow)
                    client = HttpClient(
                        port,
                        "/invocations",
                        {"dataframe_split": {"columns": FEATURES, "data": [ROW]}},
                    )
                    results.append(
                        (
                            f"MLflow {version} `mlflow models serve`, HTTP `POST /invocations`",
                            measure(client, args.requests, 50, args.budget),
                        )
                    )
                    print("mlflow reply:", client.last.decode())
                    body = {"dataframe_split": {"columns": FEATURES, "data": [ROW]}}
                    results.append(
                        (
                            f"MLflow {version} `mlflow models serve` (default workers: 1), "
                            f"{CONCURRENT_CLIENTS} concurrent clients",
                            measure_concurrent(
                                lambda port=port: HttpClient(  # type: ignore[misc]
                                    port, "/invocations", body
                                ),
                                CONCURRENT_CLIENTS,
                                args.requests * 4,
                                args.budget,
                            ),
                        )
                    )
                except (subprocess.CalledProcessError, RuntimeError, OSError) as exc:
                    problems.append(f"MLflow could not be measured: {exc}")
                    print(problems[-1])
        finally:
            for server in servers:
                stop(server)
            stack.down(progress=lambda _: None)
    load_after = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    busy = max(started_load, os.getloadavg()[0]) > 0.5

    print()
    print(table(results))
    named = dict(results)
    ours = named[PLAIN_ROUTE]
    quiet = named[LOGGING_OFF]
    ratios = [
        "prediction logging on (every request) vs off: "
        f"p50 x{ours['p50_ms'] / quiet['p50_ms']:.3f}, "
        f"p99 x{ours['p99_ms'] / quiet['p99_ms']:.3f}, "
        f"throughput x{ours['rps'] / quiet['rps']:.3f}"
    ]
    mlflow_rows = [r for name, r in results if name.startswith("MLflow")]
    if mlflow_rows:
        theirs = mlflow_rows[0]
        ratios.append(
            f"one client: throughput x{ours['rps'] / theirs['rps']:.1f} MLflow's; "
            f"p50 {theirs['p50_ms'] / ours['p50_ms']:.1f}x lower; "
            f"p99 {theirs['p99_ms'] / ours['p99_ms']:.1f}x lower"
        )
    if len(mlflow_rows) > 1:
        ours_many = named[f"{PLAIN_ROUTE}, {CONCURRENT_CLIENTS} concurrent clients"]
        theirs_many = mlflow_rows[1]
        ratios.append(
            f"{CONCURRENT_CLIENTS} concurrent clients: throughput "
            f"x{ours_many['rps'] / theirs_many['rps']:.1f} MLflow's; "
            f"p50 {theirs_many['p50_ms'] / ours_many['p50_ms']:.1f}x lower; "
            f"p99 {theirs_many['p99_ms'] / ours_many['p99_ms']:.1f}x lower"
        )
    sklearn_row = results[0][1]
    ratios.append(
        f"HTTP p50 {ours['p50_ms']:.3f} ms vs in-process sklearn p50 {sklearn_row['p50_ms']:.3f} "
        f"ms (x{sklearn_row['p50_ms'] / ours['p50_ms']:.1f} faster over HTTP than sklearn "
        f"without HTTP)"
    )
    for name, r in results:
        if r.get("reconnects"):
            ratios.append(
                f"{name}: the server closed {int(r['reconnects'])} kept-alive connection(s) "
                f"during the run; each was reopened (counted in its latency)"
            )
    for line in ratios:
        print(line)
    section = "\n".join(
        [
            "## Serving",
            "",
            "One row per request on 127.0.0.1: one client on one keep-alive connection, "
            f"sequential; then {CONCURRENT_CLIENTS} concurrent clients (threads of this "
            "script, each on its own keep-alive connection, sharing the machine's CPUs with "
            "the server). The same fitted RandomForest(100) iris pipeline everywhere (trained by "
            "the trainer's code, deployed by the deployer's step: ONNX compiled and checked on "
            "the holdout). The predictor runs as `python -m mlpipe_predictor` (uvicorn with "
            "httptools and uvloop, one worker), with its prediction log on (the default: every "
            "request recorded and written to GCS in the background) and, for comparison, off; "
            f"MLflow {MLFLOW_SPEC} as `mlflow models serve --env-manager local` (its defaults: "
            "one uvicorn worker) from its own virtualenv, its model saved with its "
            "requirements written out (no inference through pip).",
            "",
            "Command: `uv run --frozen python bench/serving/run.py`",
            "",
            f"Machine: {note}; load average {load_after} at the end. "
            + (
                "Other processes were using the CPUs (see the load), so absolute numbers are "
                "noisy; the ratios compare servers measured in the same run."
                if busy
                else "The ratios compare servers measured in the same run."
            ),
            "",
            table(results),
            "",
            *(f"- {line}" for line in ratios + problems),
            "",
        ]
    )
    if not args.no_write:
        write_results(section)
        print("updated bench/RESULTS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
