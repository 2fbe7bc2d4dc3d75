"""The whole chain through the shipped images: `mlpipe up --containers` runs each service from
services/Dockerfile under Cloud Run's contract (infra/runtime.yaml's memory and CPU, non-root,
read-only root with /tmp in memory, restart on death), against the real emulators.

Needs a Docker engine (`make test-containers` and .ci/run start one); skipped without one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mlpipe.messaging import events
from mlpipe.messaging.publishing import Publisher
from mlpipe.messaging.push import parse_envelope
from mlpipe.store.registry import Registry
from mlpipe.store.storage import Storage, make_client
from mlpipe.v1 import events_pb2
from mlpipe_ops import containers as docker
from mlpipe_ops.follow import EventWatcher
from mlpipe_ops.localstack import SERVICES, LocalStack, StackError, StackState, client_env
from mlpipe_ops.service_runtime import load_runtimes
from mlpipe_ops.statedir import TRACES_DIR
from tests.conftest import REPO, collect, engine_missing, free_base_port, unique, wait_until

pytestmark = pytest.mark.containers
JOB_PAUSE_SECONDS = 4


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackState]:
    missing = engine_missing()
    if missing:
        pytest.skip(missing)
    local = LocalStack(
        tmp_path_factory.mktemp("containers"),
        base_port=free_base_port(),
        project=unique("ctr"),
        bucket=unique("ctr"),
        containers=True,
        # Every training job stalls 4 s before writing anything, so a test can kill the
        # trainer's container while a job is surely running (mlpipe.runtime.faults).
        env={"MLPIPE_FAULT_POINT": f"job.before_artifacts=pause:{JOB_PAUSE_SECONDS}"},
    )
    state = local.up(progress=print, timeout=180)
    try:
        with client_env(state):
            yield state
    finally:
        local.down(progress=print)
        left = [c.name for c in state.containers if c.inspect() is not None]
        assert left == [], f"containers left after down: {left}"


def cli(state: StackState, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mlpipe_ops.cli", *args],
        cwd=REPO,
        env={**os.environ, "MLPIPE_STATE_DIR": state.state_dir},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def served(state: StackState) -> dict:
    return httpx.get(f"{state.url('predictor')}/v1/models", timeout=5).json()["models"]


def test_each_service_runs_as_its_image_under_its_runtime_definition(stack: StackState) -> None:
    runtimes = load_runtimes("local")

    found = {c.service: c.inspect() for c in stack.containers}
    traces = f"{Path(stack.state_dir) / TRACES_DIR}:{docker.TRACES_MOUNT}:rw"

    # The push services (the console is started on its own, by `mlpipe console`).
    assert sorted(found) == sorted(SERVICES)
    for service, info in found.items():
        assert info is not None, service
        host, config = info["HostConfig"], info["Config"]
        env = dict(item.split("=", 1) for item in config["Env"])
        assert config["Image"] == docker.IMAGE.format(service=service)
        assert config["User"] == docker.USER
        assert host["Memory"] == runtimes[service].memory_bytes
        assert host["MemorySwap"] == runtimes[service].memory_bytes  # no swap
        assert host["NanoCpus"] == int(runtimes[service].cpu * 1e9)
        assert host["ReadonlyRootfs"] is True
        assert "/tmp" in host["Tmpfs"]
        assert host["Binds"] == [traces]  # its spans, in the stack's state directory
        assert host["RestartPolicy"]["Name"] == "unless-stopped"
        assert int(config["StopTimeout"]) == docker.STOP_GRACE_SECONDS
        assert env["K_SERVICE"] == f"mlpipe-{service}"
        assert env["PORT"] == str(stack.service_ports[service])
        assert "K_REVISION" in env and "K_CONFIGURATION" in env
        # Nothing from the caller's shell leaks in: only what Cloud Run would set.
        assert "VIRTUAL_ENV" not in env and "PYTEST_CURRENT_TEST" not in env


def test_iris_runs_to_serving_through_the_containers(stack: StackState) -> None:
    result = cli(stack, "run", "--example", "iris", "--timeout", "180")
    predicted = httpx.post(
        f"{stack.url('predictor')}/predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]}
    )
    status = cli(stack, "status")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "serving iris-classifier v1" in result.stdout
    assert predicted.json()["predictions"] == ["setosa"]
    assert status.returncode == 0, status.stderr
    assert "stack (containers):" in status.stdout
    assert f"container mlpipe-trainer-{stack.pubsub_port}  running" in status.stdout
    assert "iris-classifier v1" in status.stdout
    # Each image wrote its spans through the mount, as the processes do.
    written = {p.name.rsplit("-", 1)[0] for p in (Path(stack.state_dir) / TRACES_DIR).glob("*")}
    assert {"ingest", "trainer", "training-job", "evaluator", "deployer", "predictor"} <= written


def test_a_regression_example_runs_to_serving(stack: StackState) -> None:
    result = cli(stack, "run", "--example", "bikeshare", "--timeout", "240")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "serving bikeshare-net-change v1" in result.stdout
    assert served(stack)["bikeshare-net-change"]["version"] == 1


def test_a_csv_missing_a_column_is_quarantined(stack: StackState) -> None:
    storage = Storage(make_client(stack.project), stack.bucket)
    rows = (REPO / "examples/iris/iris.csv").read_text().splitlines()
    # Drop the petal_width column from every row.
    dirty = "\n".join(",".join(r.split(",")[:3] + r.split(",")[4:]) for r in rows) + "\n"
    request_id = uuid.uuid4().hex

    with EventWatcher(stack.project, topics=(events.PIPELINE_FAILURES,)) as watcher:
        Publisher(stack.project).publish(
            events_pb2.IngestRequest(
                request_id=request_id, dataset="iris", inline=events_pb2.InlineRows(csv=dirty)
            )
        )
        failed = collect(watcher, events_pb2.PipelineFailed, timeout=60)[-1]

    assert isinstance(failed, events_pb2.PipelineFailed)
    assert failed.context.request_id == request_id
    assert "petal_width" in failed.message
    kept = storage.read(storage.path_of(failed.quarantine_uri))
    assert kept is not None
    # The whole push envelope is kept: the request, CSV and all, can be replayed as delivered.
    assert b"sepal_length" in parse_envelope(kept.data).data


def test_a_trainer_killed_mid_run_is_restarted_and_the_run_makes_one_version(
    stack: StackState,
) -> None:
    storage = Storage(make_client(stack.project), stack.bucket)
    trainer = next(c for c in stack.containers if c.service == "trainer")
    before = trainer.state()["RestartCount"]
    csv_text = (REPO / "examples/crops/crops.csv").read_text()
    applied = cli(stack, "pipeline", "apply", "examples/crops/pipeline.yaml")
    assert applied.returncode == 0, applied.stdout + applied.stderr

    with EventWatcher(stack.project) as watcher:
        Publisher(stack.project).publish(
            events_pb2.IngestRequest(
                request_id=uuid.uuid4().hex,
                dataset="crops",
                inline=events_pb2.InlineRows(csv=csv_text),
            )
        )
        started = collect(watcher, events_pb2.TrainingStarted, timeout=90)[-1]
        assert isinstance(started, events_pb2.TrainingStarted), started
        # What a crashed instance looks like: the container's process dies by SIGKILL, the
        # job (stalled in its fault point) with it, and nothing is answered.
        time.sleep(1)
        pid = trainer.inspect()["State"]["Pid"]  # type: ignore[index]
        os.kill(pid, 9)
        done = collect(watcher, events_pb2.DeploymentCompleted, started.context.run_id, 240)[-1]

    assert isinstance(done, events_pb2.DeploymentCompleted), done
    assert trainer.state()["RestartCount"] > before
    assert Registry(storage).versions("crop-classifier") == [1]
    wait_until(lambda: served(stack)["crop-classifier"]["version"] == 1, 30, "crops served")


def test_an_invalid_setting_stops_the_stack_with_the_service_log(tmp_path: Path) -> None:
    missing = engine_missing()
    if missing:
        pytest.skip(missing)
    local = LocalStack(
        tmp_path,
        base_port=free_base_port(),
        project=unique("bad"),
        bucket=unique("bad"),
        containers=True,
        env={"MLPIPE_MAX_PUSH_BYTES": "lots"},
    )
    lines: list[str] = []

    with pytest.raises(StackError) as raised:
        local.up(progress=lines.append, timeout=60)

    message = str(raised.value)
    assert "exited during start-up" in message
    assert "MLPIPE_MAX_PUSH_BYTES" in message and "Traceback" not in message
    assert not (tmp_path / "stack.json").exists()
    label = f"label=dev.mlpipe.state-dir={tmp_path.resolve()}"
    assert docker.docker("ps", "--all", "--quiet", "--filter", label).stdout.strip() == ""
    assert any(line.startswith("stopped ingest") for line in lines)
