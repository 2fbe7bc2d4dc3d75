"""The fault suites at N = 3: the local stack with three instances of each service behind its
load balancer (`mlpipe up --instances 3`), as Cloud Run scales a service out.

- duplicate storm: a run's every event delivered three times, spread over the instances and
  partly concurrent: exactly one version, one evaluation, one deployment;
- crash points: every named fault point fires once, each killing the one instance that reached
  it while the others carry on (a dead instance is replaced at once, as Cloud Run does, and is
  back some seconds later): the run still ends with one version;
- the 1,000-request burst through the balancer: none lost;
- hot swap under load across instances: no request fails, and none is answered by a version
  older than the registry's when it arrived, minus the convergence window.

Each test prints its figures; the session's summary line collects them.
"""

from __future__ import annotations

import concurrent.futures
import os
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
from mlpipe.messaging.publishing import Publisher
from mlpipe.ml.config import config_path, parse_config
from mlpipe.store import layout
from mlpipe.store.registry import Registry
from mlpipe.store.storage import Storage, make_client
from mlpipe.v1 import events_pb2
from mlpipe_ops.follow import EventWatcher
from mlpipe_ops.localstack import LocalStack, Proc, StackState, client_env
from tests.conftest import REPO, free_base_port, unique, wait_until
from tests.faults.test_faults import (
    IRIS,
    burst_of_a_thousand,
    envelope,
    log_problems,
    push,
    wait_for,
)
from tests.faults.test_recovery import SHORT_LEASES, assert_one_complete_run, fresh_csv, request

pytestmark = pytest.mark.faults

N = 3
MODEL = "iris-classifier"
# The predictor instances' registry watch (1 s) plus loading a version, with room for a
# loaded machine: what "the registry's version at arrival minus the convergence window" allows.
CONVERGENCE_SECONDS = 5.0
# A killed instance is replaced at once, as Cloud Run does; a new one takes seconds to
# start, and the others carry the work meanwhile.
REPLACE_AFTER_SECONDS = 0.0
FIGURES: dict[str, Any] = {}


class Replacer:
    """Replaces a dead service instance after REPLACE_AFTER_SECONDS, as Cloud Run starts a new
    instance for one that crashed; records which instances died and when."""

    def __init__(self, local: LocalStack, state: StackState) -> None:
        self.local = local
        self.state = state
        # (instance, how many of its service's other instances were up when it was found dead)
        self.deaths: list[tuple[str, int]] = []
        self.replaced: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._dead_since: dict[str, float] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def instances(self) -> list[Proc]:
        with self._lock:
            return [p for p in self.state.processes if p.service]

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            for proc in self.instances():
                if proc.alive():
                    continue
                if proc.name not in self._dead_since:
                    self._dead_since[proc.name] = time.monotonic()
                    others = [
                        p
                        for p in self.instances()
                        if p.service == proc.service and p.name != proc.name and p.alive()
                    ]
                    self.deaths.append((proc.name, len(others)))
                if time.monotonic() - self._dead_since[proc.name] > REPLACE_AFTER_SECONDS:
                    self._replace(proc)

    def _replace(self, proc: Proc) -> None:
        _, own = self.local._services()
        env = {
            **os.environ,
            **self.local.extra_env,
            **own[proc.service],
            "PORT": str(proc.port),
            "MLPIPE_JOB_LOG_DIR": str(self.local.logs / "jobs"),
        }
        with open(proc.log, "ab") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", f"mlpipe_{proc.service}"],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        new = Proc(
            proc.name, popen.pid, proc.port, proc.log, f"mlpipe_{proc.service}", proc.service
        )
        with self._lock:
            self.state.processes[self.state.processes.index(proc)] = new
            self.state.save()
        del self._dead_since[proc.name]
        self.replaced.append(proc.name)


@pytest.fixture(scope="module")
def fault_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every fault point armed in every instance, each "fired" already: none fires until the
    crash-point test removes its marker (mlpipe.faults' once-dir)."""
    folder = tmp_path_factory.mktemp("fired")
    for point in faults.POINTS:
        (folder / point).write_text("disarmed\n")
    return folder


@pytest.fixture(scope="module")
def scaled(
    tmp_path_factory: pytest.TempPathFactory, fault_dir: Path
) -> Iterator[tuple[LocalStack, StackState]]:
    local = LocalStack(
        tmp_path_factory.mktemp("instances"),
        base_port=free_base_port(10 + 6 * N),
        project=unique("scale"),
        bucket=unique("scale"),
        instances=N,
        env={
            **SHORT_LEASES,
            "MLPIPE_FAULT_POINT": ",".join(faults.POINTS),
            "MLPIPE_FAULT_ONCE_DIR": str(fault_dir),
        },
    )
    state = local.up(progress=lambda _: None)
    try:
        with client_env(state):
            Storage(make_client(state.project), state.bucket).write(
                config_path("iris"), (REPO / "examples/iris/pipeline.yaml").read_bytes()
            )
            yield local, state
    finally:
        local.down(progress=lambda _: None)
        print(f"\nfault suite figures at N={N}: {FIGURES}")


@pytest.fixture(scope="module")
def stack(scaled: tuple[LocalStack, StackState]) -> StackState:
    return scaled[1]


@pytest.fixture(scope="module")
def storage(stack: StackState) -> Storage:
    return Storage(make_client(stack.project), stack.bucket)


def generations(storage: Storage, paths: list[str]) -> dict[str, int | None]:
    found = {p: storage.read(p) for p in paths}
    return {p: (o.generation if o else None) for p, o in found.items()}


# --- duplicate storm --------------------------------------------------------------------------
def test_a_duplicate_storm_across_instances_makes_one_version_evaluation_and_deployment(
    stack: StackState, storage: Storage
) -> None:
    lines = IRIS.strip().splitlines()
    csv_text = "\n".join([lines[0], *sorted(lines[1:], reverse=True)]) + "\n"  # a new run
    req = events_pb2.IngestRequest(
        request_id=f"storm-{uuid.uuid4().hex[:8]}",
        dataset="iris",
        inline=events_pb2.InlineRows(csv=csv_text),
    )
    with EventWatcher(stack.project) as watcher:
        publisher = Publisher(stack.project)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda _: publisher.publish(req), range(3)))
        chain = wait_for(
            watcher, lambda e: isinstance(e, events_pb2.DeploymentCompleted), timeout=180
        )
        time.sleep(2)
        chain += [o.event for o in watcher.events(timeout=1.0)]
    by_type = {type(e).__name__: e for e in chain}
    done = by_type["DeploymentCompleted"]
    assert isinstance(done, events_pb2.DeploymentCompleted) and done.deployed
    run_id = done.context.run_id
    paths = layout.RunPaths(run_id)
    records = [paths.training, paths.evaluation, paths.deployment]
    before = generations(storage, records)

    # Every event again, three times each, through the balancer: the copies land on
    # different instances, two of them at once.
    replays = [
        ("ingest", req),
        ("trainer", by_type["DatasetLanded"]),
        ("evaluator", by_type["TrainingCompleted"]),
        ("deployer", by_type["EvaluationCompleted"]),
        ("deployer", by_type["TrainingCompleted"]),
        ("predictor", done),
    ]
    statuses: list[int] = []
    for service, event in replays:
        bodies = [envelope(event, f"dup-{service}-{i}") for i in range(3)]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(lambda b, s=service: push(stack, s, b), bodies))
        statuses += [r.status_code for r in replies]
    time.sleep(2)

    registry = Registry(storage)
    mine = [
        v
        for v in registry.versions(MODEL)
        if (mv := registry.get(MODEL, v)) is not None and mv.run_id == run_id
    ]
    after = generations(storage, records)
    FIGURES["storm_duplicate_deliveries"] = 2 + len(statuses)
    FIGURES["storm_versions_for_the_run"] = len(mine)
    print(f"\nduplicate storm at N={N}: {len(statuses) + 2} duplicates, versions {mine}")
    assert statuses == [200] * len(statuses)
    assert mine == [done.version]
    # One evaluation and one deployment: their records were written once, never again.
    assert None not in before.values() and after == before
    assert log_problems(stack) == []


# --- crash points -----------------------------------------------------------------------------
def test_a_run_survives_each_crash_point_killing_one_instance_while_the_others_carry_on(
    scaled: tuple[LocalStack, StackState], storage: Storage, fault_dir: Path
) -> None:
    local, state = scaled
    replacer = Replacer(local, state)
    replacer.start()
    req, run_id = request(fresh_csv(11))
    try:
        for point in faults.POINTS:
            (fault_dir / point).unlink()  # armed: the first instance to get there dies
        t0 = time.monotonic()
        Publisher(state.project).publish(req)
        wait_until(
            lambda: storage.exists(layout.RunPaths(run_id).deployment), 300, "the run's deployment"
        )
        elapsed = time.monotonic() - t0
        time.sleep(3)  # redeliveries of handled events: none may add anything
        deaths = list(replacer.deaths)
    finally:
        replacer.stop()

    assert_one_complete_run(storage, run_id)
    fired = sorted(p.name for p in fault_dir.iterdir() if p.read_text() != "disarmed\n")
    killed_services = [name.rsplit("-", 1)[0] for name, _ in deaths]
    FIGURES["crash_points_fired"] = len(fired)
    FIGURES["crash_instances_killed"] = [name for name, _ in deaths]
    # How many instances of the service were still up at each kill (up to N - 1).
    FIGURES["crash_others_up_at_each_kill"] = [others for _, others in deaths]
    FIGURES["crash_instances_replaced"] = len(replacer.replaced)
    FIGURES["crash_run_seconds"] = round(elapsed, 1)
    print(
        f"\ncrash points at N={N}: {len(fired)} fired, instances killed {killed_services}, "
        f"run done in {elapsed:.1f}s"
    )
    assert fired == sorted(faults.POINTS)
    # Eight points kill a service instance; the three job.* ones only the training job.
    assert len(deaths) == len([p for p in faults.POINTS if not p.startswith("job.")])
    # Each kill took one instance: the service's other instances were there to carry on
    # at the first kill of each service (later ones may meet a replacement still starting).
    firsts = {}
    for (_, others), service in zip(deaths, killed_services, strict=True):
        firsts.setdefault(service, others)
    assert all(others == N - 1 for others in firsts.values()), deaths
    wait_until(
        lambda: all(p.alive() for p in state.processes if p.service),
        120,
        "every instance replaced",
    )


# --- the burst --------------------------------------------------------------------------------
def test_a_burst_of_a_thousand_requests_through_the_balancers_loses_none(
    stack: StackState,
) -> None:
    # Fifteen service processes share the machine's cores: slower than at N = 1, never lossy.
    figures = burst_of_a_thousand(stack, within=360.0)
    lost_ids = figures.pop("lost_ids")
    FIGURES["burst"] = figures
    print(f"\nburst at N={N}: {figures}")
    assert figures["lost"] == 0, f"lost: {lost_ids}"
    assert figures["failed_with_reason"] == 100


# --- hot swap under load ----------------------------------------------------------------------
def test_a_hot_swap_under_load_across_instances_fails_nothing_and_serves_nothing_stale(
    stack: StackState, storage: Storage
) -> None:
    from tests.integration.conftest import Cloud
    from tests.integration.test_serving import PROBES, RENAMED, deploy, renamed_iris, trained

    cloud = Cloud(stack.project, storage, Publisher(stack.project), None)  # type: ignore[arg-type]
    config = parse_config((REPO / "examples/iris/pipeline.yaml").read_text())
    registry = Registry(storage)
    old = deploy(cloud, trained(cloud, config, fresh_csv(23)))
    new_evaluation = trained(cloud, config, renamed_iris(fresh_csv(29)))
    wait_until(
        lambda: all(
            httpx.get(f"{u}/v1/models", timeout=5).json()["models"][MODEL]["version"] == old.version
            for u in stack.instance_urls("predictor")
        ),
        60,
        "every instance serving the old version",
    )
    plain = ["setosa", "virginica", "versicolor"] * 10  # what PROBES get from iris
    renamed = [RENAMED[s] for s in plain]
    replies: list[tuple[float, int, dict[str, Any]]] = []
    champion_at: list[tuple[float, int]] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=stack.url("predictor"), timeout=30) as client:
            while not stop.is_set():
                sent = time.monotonic()
                reply = client.post("/predict", json={"instances": PROBES})
                replies.append((sent, reply.status_code, reply.json()))

    def follow_registry() -> None:
        while not stop.is_set():
            champion_at.append((time.monotonic(), registry.alias(MODEL) or 0))
            time.sleep(0.05)

    threads = [threading.Thread(target=load) for _ in range(4)]
    threads.append(threading.Thread(target=follow_registry))
    for thread in threads:
        thread.start()
    time.sleep(2)
    new = deploy(cloud, new_evaluation)
    deployed = time.monotonic()
    time.sleep(CONVERGENCE_SECONDS + 3)
    stop.set()
    for thread in threads:
        thread.join()

    def registry_version(at: float) -> int:
        """The champion the registry named at `at` (as last seen before it)."""
        seen = [v for t, v in champion_at if t <= at]
        return seen[-1] if seen else old.version

    stale = [
        (sent, int(body["modelVersionId"]))
        for sent, status, body in replies
        if status == 200
        and int(body["modelVersionId"]) < registry_version(sent - CONVERGENCE_SECONDS)
    ]
    moved = next((t for t, v in champion_at if v == new.version), deployed)
    last_old = max(
        (s for s, _, b in replies if b.get("modelVersionId") == str(old.version)), default=0.0
    )
    FIGURES["hot_swap"] = {
        "requests": len(replies),
        "failed": sum(1 for _, status, _ in replies if status != 200),
        "stale_beyond_window": len(stale),
        "old_version_served_after_alias_moved_s": round(max(0.0, last_old - moved), 2),
    }
    print(f"\nhot swap at N={N}: {FIGURES['hot_swap']}")
    assert all(status == 200 for _, status, _ in replies), {s for _, s, _ in replies}
    assert stale == []
    # Each answer is entirely one version's.
    expected = {str(old.version): plain, str(new.version): renamed}
    assert all(body["predictions"] == expected[body["modelVersionId"]] for *_, body in replies)
    assert {b["modelVersionId"] for _, _, b in replies} == set(expected)
    assert log_problems(stack) == []
