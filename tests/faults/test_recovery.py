"""Processes that die, stall or are stopped, against the real local stack.

A supervisor restarts any service that dies, as Cloud Run starts a new instance. Services run
with short leases (a dead job's run is taken over after 4 s, a dead registration after 3 s).

- crash points: every named fault point (mlpipe.faults.POINTS) armed at once, each firing
  once: one run goes through all of them, SIGKILLed at each, and still ends with one version;
- emulator restarts: the Pub/Sub emulator and fake-gcs-server restarted mid-run;
- SIGTERM: the trainer stopped while its job runs hands the run back within Cloud Run's 10 s.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlpipe import faults
from mlpipe.messaging import topology
from mlpipe.messaging.publishing import Publisher
from mlpipe.ml.config import config_path
from mlpipe.store import layout
from mlpipe.store.registry import Registry
from mlpipe.store.storage import Storage, make_client, sha256_hex
from mlpipe.v1 import events_pb2
from mlpipe_ops import infra
from mlpipe_ops.localstack import (
    HOST,
    LocalStack,
    Proc,
    StackState,
    client_env,
    fake_gcs_binary,
    pubsub_emulator_command,
    stop_processes,
)
from tests.conftest import REPO, free_base_port, unique, wait_until

pytestmark = pytest.mark.faults

IRIS_LINES = (REPO / "examples/iris/iris.csv").read_text().strip().splitlines()
FIGURES: dict[str, Any] = {}

SHORT_LEASES = {
    "MLPIPE_TRAINING_LEASE_SECONDS": "4",
    "MLPIPE_REGISTRY_CLAIM_LEASE_SECONDS": "3",
    # Several crash points hit one run's training in a row.
    "MLPIPE_TRAINING_MAX_CRASHES": "8",
    "MLPIPE_PUBLISH_TIMEOUT_SECONDS": "15",
    "MLPIPE_COMPILE_ONNX": "false",
}


class Supervisor:
    """Runs the pipeline's services (and fake-gcs-server on a filesystem backend) as processes it
    started; restarts a service that dies, as Cloud Run would."""

    def __init__(self, state: StackState, root: Path) -> None:
        self.state = state
        self.root = root
        self.procs: dict[str, Proc] = {}
        self.popen: dict[str, subprocess.Popen[bytes]] = {}
        self.env: dict[str, dict[str, str]] = {}
        self.restarts: dict[str, int] = {}
        self.watching = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def base_env(self) -> dict[str, str]:
        return {**os.environ, **self.state.client_env(), **SHORT_LEASES}

    def start(self, name: str, extra: dict[str, str] | None = None) -> None:
        env = {
            **self.base_env(),
            "PORT": str(self.state.service_ports[name]),
            "MLPIPE_HOST": HOST,
            "MLPIPE_JOB_LOG_DIR": str(self.root / "jobs"),
            **(extra or {}),
        }
        self.env[name] = extra or {}
        self._spawn(name, [sys.executable, "-m", f"mlpipe_{name}"], f"mlpipe_{name}", env)
        self.wait_healthy(name)

    def _spawn(self, name: str, cmd: list[str], marker: str, env: dict[str, str]) -> None:
        log = self.root / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        port = self.state.service_ports.get(name, self.state.gcs_port)
        self.procs[name] = Proc(name, popen.pid, port, str(log), marker)
        self.popen[name] = popen

    def wait_healthy(self, name: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        url = f"{self.state.url(name)}/healthz"
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            if self.popen[name].poll() is not None and not self.watching:
                raise AssertionError(f"{name} exited during start-up; see {self.procs[name].log}")
            time.sleep(0.1)
        raise AssertionError(f"{name} not healthy after {timeout}s")

    def stop(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        self.popen[name].wait(timeout=15)

    def restart(self, name: str, extra: dict[str, str] | None = None) -> None:
        with self._lock:
            self.stop(name)
            self.start(name, extra)

    def start_gcs(self) -> None:
        st = self.state
        note = topology.TOPOLOGY.notification
        cmd = [
            str(fake_gcs_binary()),
            *("-scheme", "http", "-host", HOST, "-port", str(st.gcs_port)),
            *("-backend", "filesystem", "-filesystem-root", str(self.root / "gcs")),
            *("-log-level", "warn", "-event.pubsub-project-id", st.project),
            *("-event.pubsub-topic", note.topic, "-event.bucket", st.bucket),
            *("-event.object-prefix", note.object_prefix, "-event.list", "finalize"),
        ]
        self._spawn("fake-gcs-server", cmd, "fake-gcs-server", self.base_env())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{st.storage_host}/storage/v1/b", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        client = make_client(st.project)
        if client.lookup_bucket(st.bucket) is None:
            client.create_bucket(st.bucket)

    def watch(self) -> None:
        self.watching = True
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            for name in topology.TOPOLOGY.services:
                with self._lock:
                    if name in self.popen and self.popen[name].poll() is not None:
                        self.restarts[name] = self.restarts.get(name, 0) + 1
                        self.start(name, self.env.get(name))

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        stop_processes(list(self.procs.values()), progress=lambda _: None)


@pytest.fixture(scope="module")
def supervised(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[StackState, Supervisor]]:
    """Emulators from LocalStack; fake-gcs-server (filesystem) and services from Supervisor."""
    root = tmp_path_factory.mktemp("recovery")
    local = LocalStack(
        root / "stack", base_port=free_base_port(), project=unique("rec"), bucket=unique("rec")
    )
    (root / "stack").mkdir()
    state = local.up(services=False, progress=lambda _: None)
    supervisor = Supervisor(state, root)
    try:
        with client_env(state):
            # The topology as `mlpipe up` applies it: push subscriptions to the services' ports.
            infra.apply(infra.local_target(state.project, state.bucket, state.service_ports))
            # fake-gcs-server again, on disk, so that it can be restarted without losing data.
            gcs = next(p for p in state.processes if p.name == "fake-gcs-server")
            stop_processes([gcs], progress=lambda _: None)
            state.processes.remove(gcs)
            state.save()
            supervisor.start_gcs()
            storage = Storage(make_client(state.project), state.bucket)
            storage.write(config_path("iris"), (REPO / "examples/iris/pipeline.yaml").read_bytes())
            for name in topology.TOPOLOGY.services:
                supervisor.start(name)
            supervisor.watch()
            yield state, supervisor
    finally:
        supervisor.shutdown()
        local.down(progress=lambda _: None)


def fresh_csv(seed: int) -> str:
    """Iris rows in an order of their own: new bytes, so a new run."""
    rows = IRIS_LINES[1:]
    k = seed % len(rows)
    return "\n".join([IRIS_LINES[0], *rows[k:], *rows[:k]]) + "\n"


def request(csv_text: str) -> tuple[events_pb2.IngestRequest, str]:
    req = events_pb2.IngestRequest(
        request_id=f"rec-{uuid.uuid4().hex[:8]}",
        dataset="iris",
        inline=events_pb2.InlineRows(csv=csv_text),
    )
    return req, layout.run_id_for(sha256_hex(csv_text.encode()), _iris_config_sha())


def _iris_config_sha() -> str:
    from mlpipe.ml.config import parse_config

    return parse_config((REPO / "examples/iris/pipeline.yaml").read_text()).sha256()


def assert_one_complete_run(storage: Storage, run_id: str) -> events_pb2.DeploymentCompleted:
    """The run ended deployed with exactly one registry version; nothing partial is visible."""
    paths = layout.RunPaths(run_id)
    recorded = storage.read(paths.deployment)
    assert recorded is not None
    from mlpipe.messaging import events

    deployment = events.from_json(events_pb2.DeploymentCompleted, recorded.data)
    marker = storage.read(paths.training)
    assert marker is not None
    trained = events.from_json(events_pb2.TrainingCompleted, marker.data)
    model = storage.read(paths.model)
    registry = Registry(storage)
    mine = [
        v
        for v in registry.versions("iris-classifier")
        if (mv := registry.get("iris-classifier", v)) is not None and mv.run_id == run_id
    ]
    assert not storage.exists(paths.failed)
    assert deployment.deployed, deployment.reason
    assert mine == [deployment.version]
    # The recorded event, the model object and the registered version are the same bytes.
    assert model is not None and sha256_hex(model.data) == trained.model_sha256
    assert deployment.model_sha256 == trained.model_sha256
    # Every allocated version number belongs to a complete version: no half-registered one.
    claims = storage.list("registry/iris-classifier/version-claims/")
    assert sorted(int(c.rsplit("/", 1)[-1]) for c in claims) == registry.versions("iris-classifier")
    return deployment


def test_a_run_survives_a_kill_at_every_fault_point(
    supervised: tuple[StackState, Supervisor], tmp_path: Path
) -> None:
    state, supervisor = supervised
    storage = Storage(make_client(state.project), state.bucket)
    fired = tmp_path / "fired"
    fired.mkdir()
    armed = {"MLPIPE_FAULT_POINT": ",".join(faults.POINTS), "MLPIPE_FAULT_ONCE_DIR": str(fired)}
    for name in ("ingest", "trainer", "evaluator", "deployer"):
        supervisor.restart(name, armed)
    before = sum(supervisor.restarts.values())
    req, run_id = request(fresh_csv(7))
    t0 = time.monotonic()

    Publisher(state.project).publish(req)
    wait_until(
        lambda: storage.exists(layout.RunPaths(run_id).deployment), 240, "the run's deployment"
    )
    elapsed = time.monotonic() - t0
    # Redeliveries of already-handled events arrive for a while: none may add anything.
    time.sleep(3)

    assert_one_complete_run(storage, run_id)
    assert sorted(p.name for p in fired.iterdir()) == sorted(faults.POINTS)
    restarts = sum(supervisor.restarts.values()) - before
    # Eight points kill a service; the three job.* points kill only the training job.
    assert restarts == len([p for p in faults.POINTS if not p.startswith("job.")])
    FIGURES["crash_points_survived"] = len(faults.POINTS)
    FIGURES["crash_service_restarts"] = restarts
    FIGURES["crash_run_seconds"] = round(elapsed, 1)
    for name in ("ingest", "trainer", "evaluator", "deployer"):
        supervisor.restart(name)


def _restart_pubsub(state: StackState, root: Path) -> None:
    proc = next(p for p in state.processes if p.name == "pubsub-emulator")
    stop_processes([proc], progress=lambda _: None)
    log = root / "pubsub-restarted.log"
    with log.open("ab") as out:
        popen = subprocess.Popen(
            pubsub_emulator_command(state, root / "pubsub-data"),
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **state.client_env()},
            start_new_session=True,
        )
    state.processes[state.processes.index(proc)] = Proc(
        proc.name, popen.pid, proc.port, str(log), proc.marker
    )
    state.save()
    wait_until(
        lambda: httpx.get(f"http://{state.pubsub_host}/", timeout=1).status_code == 200,
        60,
        "the restarted Pub/Sub emulator",
    )
    # The emulator keeps nothing across a restart: apply the topology again, as `mlpipe up`.
    infra.apply(infra.local_target(state.project, state.bucket, state.service_ports))


def test_runs_complete_across_emulator_restarts(
    supervised: tuple[StackState, Supervisor], tmp_path: Path
) -> None:
    state, supervisor = supervised
    storage = Storage(make_client(state.project), state.bucket)
    paused = tmp_path / "paused"
    paused.mkdir()
    supervisor.restart(
        "trainer",
        {"MLPIPE_FAULT_POINT": "job.before_publish=pause:15", "MLPIPE_FAULT_ONCE_DIR": str(paused)},
    )
    supervisor.restart(
        "evaluator",
        {
            "MLPIPE_FAULT_POINT": "evaluator.before_record=pause:6",
            "MLPIPE_FAULT_ONCE_DIR": str(paused),
        },
    )
    req, run_id = request(fresh_csv(11))
    paths = layout.RunPaths(run_id)
    t0 = time.monotonic()

    Publisher(state.project).publish(req)
    # The job has recorded its run and is about to publish: Pub/Sub goes away and comes back.
    wait_until(lambda: storage.exists(paths.training), 60, "the training marker")
    _restart_pubsub(state, Path(state.state_dir))
    # The evaluator has scored the model and is about to record it: GCS restarts.
    wait_until(lambda: (paused / "evaluator.before_record").exists(), 60, "the evaluator pause")
    supervisor.stop("fake-gcs-server")
    supervisor.start_gcs()
    wait_until(lambda: storage.exists(paths.deployment), 120, "the run's deployment")
    # Every service's clients work after both restarts: a new run goes through the chain.
    req2, run2 = request(fresh_csv(23))
    Publisher(state.project).publish(req2)
    wait_until(
        lambda: storage.exists(layout.RunPaths(run2).deployment), 90, "the second deployment"
    )

    assert_one_complete_run(storage, run_id)
    assert_one_complete_run(storage, run2)
    FIGURES["emulator_restarts"] = {"pubsub": 1, "gcs": 1}
    FIGURES["emulator_restart_runs_completed"] = 2
    FIGURES["emulator_restart_seconds"] = round(time.monotonic() - t0, 1)
    supervisor.restart("trainer")
    supervisor.restart("evaluator")


def test_sigterm_hands_a_running_job_back_within_ten_seconds(
    supervised: tuple[StackState, Supervisor], tmp_path: Path
) -> None:
    state, supervisor = supervised
    storage = Storage(make_client(state.project), state.bucket)
    slow = tmp_path / "slow"
    slow.mkdir()
    # The job stalls for a minute before writing anything: it cannot finish in the grace time.
    supervisor.restart(
        "trainer",
        {"MLPIPE_FAULT_POINT": "job.before_artifacts=pause:60", "MLPIPE_FAULT_ONCE_DIR": str(slow)},
    )
    req, run_id = request(fresh_csv(31))
    paths = layout.RunPaths(run_id)
    Publisher(state.project).publish(req)
    wait_until(lambda: (slow / "job.before_artifacts").exists(), 60, "the job's stall")
    job_pid = int((slow / "job.before_artifacts").read_text())

    with supervisor._lock:  # the supervisor must not restart it behind the test's back
        t0 = time.monotonic()
        os.kill(supervisor.procs["trainer"].pid, signal.SIGTERM)
        code = supervisor.popen["trainer"].wait(timeout=15)
        stopped_in = time.monotonic() - t0
        claim = storage.read_json(paths.claim)
        job_alive = Path(f"/proc/{job_pid}").exists() and "Z" not in (
            Path(f"/proc/{job_pid}/stat").read_text().split()[2]
            if Path(f"/proc/{job_pid}/stat").exists()
            else "Z"
        )
        supervisor.start("trainer")
    wait_until(lambda: storage.exists(paths.deployment), 120, "the run's deployment")

    assert stopped_in < 10, f"the trainer took {stopped_in:.1f}s to stop"
    # uvicorn ends by re-raising the SIGTERM it handled: -15 after a graceful shutdown.
    assert code in (0, -signal.SIGTERM)
    assert not job_alive
    # Handed back at once (released, not counted as a crash), not left to its lease.
    assert claim["state"] == "released" and claim["crashes"] == 0, claim
    assert_one_complete_run(storage, run_id)
    FIGURES["sigterm_stop_seconds"] = round(stopped_in, 2)


def mlpipe(state: StackState, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mlpipe_ops.cli", "failures", *args],
        cwd=REPO,
        env={**os.environ, "MLPIPE_STATE_DIR": state.state_dir},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_failures_lists_dead_letters_and_quarantine_and_replays_them_after_a_fix(
    supervised: tuple[StackState, Supervisor],
) -> None:
    from mlpipe.messaging import events

    state, _ = supervised
    storage = Storage(make_client(state.project), state.bucket)
    publisher = Publisher(state.project)
    # A request for a pipeline nobody registered yet: rejected for good and quarantined.
    early, _ = request(fresh_csv(41))
    early.dataset = "iris-late"
    publisher.publish(early)
    kept = wait_until(
        lambda: [
            p for p in storage.list("quarantine/unknown_pipeline/") if "ingest" in p.split("/")[-1]
        ],
        60,
        "the quarantined request",
    )[0]
    # A message the ingest subscription gave up on, as Pub/Sub dead-letters it.
    lost, _ = request(fresh_csv(43))
    dead_id = publisher.publish_raw(
        events.DEAD_LETTERS,
        events.encode(lost),
        {
            events.EVENT_TYPE_ATTR: "mlpipe.v1.IngestRequest",
            "CloudPubSubDeadLetterSourceSubscription": "ingest-push",
            "CloudPubSubDeadLetterSourceDeliveryCount": "10",
            "CloudPubSubDeadLetterSourceSubscriptionProject": state.project,
        },
    )

    listed = mlpipe(state)
    # The fix: register the pipeline the early request named.
    late_config = (REPO / "examples/iris/pipeline.yaml").read_text()
    storage.write(config_path("iris-late"), late_config.replace("name: iris", "name: iris-late"))
    replayed_kept = mlpipe(state, "replay", kept)
    replayed_dead = mlpipe(state, "replay", dead_id)
    again = mlpipe(state, "replay", kept)
    after = mlpipe(state)

    assert listed.returncode == 0, listed.stderr
    # A dead letter's line starts with its message id (a short number, so match the line).
    dead_line = f"\n  {dead_id}  from "
    assert dead_line in listed.stdout and "from ingest-push" in listed.stdout
    assert kept in listed.stdout and "unknown_pipeline" in listed.stdout
    assert replayed_kept.returncode == 0, replayed_kept.stderr
    assert "ingest-requests message" in replayed_kept.stdout
    assert replayed_dead.returncode == 0, replayed_dead.stderr
    # Both replays land their data; the dead letter is gone, the quarantined object says so.
    wait_until(
        lambda: storage.list("datasets/iris-late/") and storage.list("datasets/iris/"), 60, "x"
    )
    landed = {
        b.metadata.get("request_id")
        for prefix in ("datasets/iris-late/", "datasets/iris/")
        for b in storage.client.list_blobs(state.bucket, prefix=prefix)
    }
    assert {early.request_id, lost.request_id} <= landed
    assert again.returncode == 1 and "replayed already" in again.stderr
    assert dead_line not in after.stdout and "[replayed as ingest-requests/" in after.stdout
    FIGURES["failures_replayed"] = 2
