"""A dataset too large for the trainer's memory fails with a reason that names the limit and
the way out, never in an OOM-kill loop: refused before a job starts, held while running jobs
hold the memory, and failed at once when the OOM killer ends a job (here for real, in a
cgroup v1 memory cgroup, where this machine lets the tests make one)."""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from mlpipe.messaging import events
from mlpipe.messaging.push import parse_envelope
from mlpipe.ml.config import PipelineConfig, parse_config
from mlpipe.runtime.clients import Clients
from mlpipe.runtime.settings import CommonSettings, load_settings
from mlpipe.runtime.steps import Outcome
from mlpipe.store import layout
from mlpipe.store.storage import sha256_hex
from mlpipe.v1 import events_pb2
from mlpipe_trainer import lease
from mlpipe_trainer.launcher import JobExit, LocalJobLauncher
from mlpipe_trainer.memory import MemoryBudget, MiB
from mlpipe_trainer.recovery import crash_reporter
from mlpipe_trainer.start import TrainingStarter
from tests.conftest import REPO, wait_until
from tests.integration.conftest import Cloud, notification

pytestmark = pytest.mark.integration

BIKESHARE = (REPO / "examples/bikeshare/bikeshare.csv").read_bytes()


def bikeshare_times(n: int) -> bytes:
    """bikeshare.csv with its rows repeated `n` times (about n x 0.5 MiB)."""
    header, _, rows = BIKESHARE.partition(b"\n")
    return header + b"\n" + rows * n


def land(cloud: Cloud, data: bytes, *, by_ingest: bool) -> tuple[str, int, dict[str, str]]:
    """Put a bikeshare dataset in place: as ingest lands it (sha256 in its metadata) or as a
    user's direct upload (none)."""
    path = f"datasets/bikeshare/dt=2026-11-23/{uuid.uuid4().hex[:12]}.csv"
    metadata = {"sha256": sha256_hex(data)} if by_ingest else {}
    generation = cloud.storage.write(path, data, content_type="text/csv", metadata=metadata)
    return path, generation, metadata


@pytest.fixture
def bikeshare(cloud: Cloud) -> PipelineConfig:
    config = parse_config((REPO / "examples/bikeshare/pipeline.yaml").read_text())
    cloud.apply_config(config)
    return config


@pytest.fixture
def trainer_env(cloud: Cloud, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The settings of a trainer (and of the jobs it starts) on this test's project."""
    monkeypatch.setenv("MLPIPE_PROJECT", cloud.project)
    monkeypatch.setenv("MLPIPE_BUCKET", cloud.storage.bucket_name)
    monkeypatch.setenv("MLPIPE_JOB_LOG_DIR", str(tmp_path / "jobs"))
    cloud.watch(events.TRAINING_STARTED, events.TRAINING_COMPLETED, events.PIPELINE_FAILURES)
    return tmp_path / "jobs"


@pytest.fixture
def small_trainer(trainer_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The real trainer service, told its memory limit is Cloud Run's default, 512 MiB."""
    monkeypatch.setenv("MLPIPE_MEMORY_LIMIT_BYTES", str(512 * MiB))
    monkeypatch.setenv("MLPIPE_JOB_RUNNER", "subprocess")  # no job starts: skip the warm-up
    from mlpipe_trainer.main import app

    with TestClient(app) as client:
        yield client


class RecordingLauncher:
    """The local backend's place in the step, starting nothing: it notes what it was asked."""

    backend = "local"

    def __init__(self) -> None:
        self.launched: list[str] = []

    def launch(self, started: events_pb2.TrainingStarted, config: PipelineConfig) -> str:
        self.launched.append(started.context.run_id)
        return f"local-{started.context.run_id}-1"


def fake_cgroup(tmp_path: Path, limit: int, current: int) -> tuple[Path, Path]:
    """A cgroup v2 tree (root, /proc/self/cgroup) with the trainer's limit and usage."""
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    (root / "memory.max").write_text(f"{limit}\n")
    (root / "memory.current").write_text(f"{current}\n")
    (root / "memory.events").write_text("oom_kill 0\n")
    (tmp_path / "proc-self-cgroup").write_text("0::/\n")
    return root, tmp_path / "proc-self-cgroup"


@pytest.mark.parametrize("by_ingest", [True, False], ids=["landed-by-ingest", "direct-upload"])
def test_a_dataset_too_large_for_the_memory_limit_is_refused_before_any_job(
    cloud: Cloud, bikeshare: PipelineConfig, small_trainer: TestClient, by_ingest: bool
) -> None:
    data = bikeshare_times(40)  # 20 MiB: about 499 MiB to train, over 90% of 512 MiB
    path, generation, metadata = land(cloud, data, by_ingest=by_ingest)
    size = len(data) if by_ingest else 0  # an upload's notification here lacks it: looked up
    body = notification(cloud, path, generation, "too-large", size=size, metadata=metadata)

    reply = small_trainer.post("/pubsub/push", content=body)

    assert reply.status_code == 200, reply.text
    assert reply.json()["status"] == "rejected"
    assert reply.json()["reason"] == "dataset_too_large"
    failed = cloud.pulled(events.PIPELINE_FAILURES)
    assert len(failed) == 1
    event = failed[0]
    assert isinstance(event, events_pb2.PipelineFailed)
    assert events.pipeline_stage(event) == "trainer" and event.reason == "dataset_too_large"
    uri = cloud.storage.uri(path)
    assert event.message.startswith(f"dataset {uri} is 20 MiB (about 499 MiB in memory to train)")
    assert "the trainer's memory limit is 512 MiB (MLPIPE_MEMORY_LIMIT_BYTES)" in event.message
    assert "services.trainer.memory in infra/runtime.yaml" in event.message
    assert "training.backend: vertex" in event.message
    assert event.dataset.uri == uri
    # The input is kept: the notification, to replay once the trainer has more memory.
    assert event.quarantine_uri.startswith(cloud.storage.uri("quarantine/dataset_too_large/"))
    kept = cloud.storage.read(cloud.storage.path_of(event.quarantine_uri))
    assert kept is not None
    assert parse_envelope(kept.data).attributes["objectId"] == path
    assert cloud.pulled(events.TRAINING_STARTED, expect=0, timeout=0.5) == []
    if by_ingest:
        # The run is known, and nothing of it is recorded: a replay is a fresh start.
        run_id = layout.run_id_for(metadata["sha256"], bikeshare.sha256())
        assert event.context.run_id == run_id
        paths = layout.RunPaths(run_id)
        assert not cloud.storage.exists(paths.claim)
        assert not cloud.storage.exists(paths.failed)


def test_a_job_that_fits_alone_waits_while_running_jobs_hold_the_memory(
    cloud: Cloud, bikeshare: PipelineConfig, tmp_path: Path
) -> None:
    # 1 GiB limit, 300 MiB in use: bikeshare.csv's job (about 286 MiB) fits alone.
    root, proc = fake_cgroup(tmp_path, limit=1024 * MiB, current=300 * MiB)
    memory = MemoryBudget(root=root, proc_cgroup=proc)
    launcher = RecordingLauncher()
    deps = TrainingStarter(
        cloud.storage, cloud.publisher, {"local": launcher}, "test", 120.0, memory=memory
    )
    path, generation, metadata = land(cloud, BIKESHARE, by_ingest=True)
    body = notification(cloud, path, generation, "waits", size=len(BIKESHARE), metadata=metadata)
    run_id = layout.run_id_for(metadata["sha256"], bikeshare.sha256())
    assert memory.reserve("another-run", 40 * MiB, "csv") is None  # a running job: ~720 MiB

    waiting = deps(parse_envelope(body))

    assert waiting.outcome is Outcome.TRANSIENT
    assert f"run {run_id} waits for memory" in waiting.detail["detail"]
    assert launcher.launched == []
    claim = lease.read(cloud.storage, layout.RunPaths(run_id).claim)
    assert claim is not None and claim.state == lease.RELEASED and claim.crashes == 0

    memory.release("another-run")  # that job ended
    assert deps(parse_envelope(body)).status == "training"

    assert launcher.launched == [run_id]
    assert set(memory.reserved()) == {run_id}


def test_a_job_killed_by_the_oom_killer_fails_its_run_at_once(
    cloud: Cloud, bikeshare: PipelineConfig, trainer_env: Path, tmp_path: Path
) -> None:
    clients = Clients(
        load_settings(CommonSettings), cloud.storage, cloud.publisher, cloud.reporter("trainer")
    )
    memory = MemoryBudget(768 * MiB)
    data = bikeshare_times(4)
    path, generation, metadata = land(cloud, data, by_ingest=True)
    body = notification(cloud, path, generation, "oom", size=len(data), metadata=metadata)
    deps = TrainingStarter(
        cloud.storage, cloud.publisher, {"local": RecordingLauncher()}, "test", 120.0
    )
    assert deps(parse_envelope(body)).status == "training"  # claimed; its job "started"
    run_id = layout.run_id_for(metadata["sha256"], bikeshare.sha256())
    paths = layout.RunPaths(run_id)
    recorded = cloud.storage.read(paths.started)
    assert recorded is not None
    started = events.from_json(events_pb2.TrainingStarted, recorded.data)
    report = crash_reporter(clients, max_crashes=3, memory=memory)

    report(started, JobExit(-9, tmp_path / "job.log", stopping=False, out_of_memory=True))

    failed = [e for e in cloud.pulled(events.PIPELINE_FAILURES) if e.reason == "out_of_memory"]
    assert len(failed) == 1
    assert failed[0].context.run_id == run_id
    assert failed[0].message == (
        f"the training job for dataset {cloud.storage.uri(path)} (2 MiB) was killed by the "
        "kernel's out-of-memory killer: the trainer's memory limit is 768 MiB "
        "(MLPIPE_MEMORY_LIMIT_BYTES). Give the trainer more memory (services.trainer.memory "
        "in infra/runtime.yaml) or train it on Vertex AI (training.backend: vertex in the "
        "pipeline config)"
    )
    assert failed[0].quarantine_uri == cloud.storage.uri(path)  # landed data stays as it is
    assert cloud.storage.exists(paths.failed)
    claim = lease.read(cloud.storage, paths.claim)
    assert claim is not None and claim.state == lease.RELEASED
    # Not retried: a redelivery of the notification is acknowledged.
    again = deps(parse_envelope(body))
    assert again.status == "duplicate" and again.detail["detail"] == "run already failed"


CGROUP_LIMIT = 350 * MiB  # an idle job takes about 270 MiB; on bikeshare x40 about 500 MiB


@pytest.fixture
def memory_cgroup(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A cgroup v1 memory cgroup of CGROUP_LIMIT under this process's own, and a
    /proc/self/cgroup naming it; skipped where none can be made (not root, cgroup v2)."""
    mount = Path("/sys/fs/cgroup/memory")
    own = next(
        (
            line.split(":", 2)[2]
            for line in Path("/proc/self/cgroup").read_text().splitlines()
            if "memory" in line.split(":", 2)[1].split(",")
        ),
        None,
    )
    if own is None or not (mount / own.strip("/")).is_dir():
        pytest.skip("needs a cgroup v1 memory hierarchy")
    child = mount / own.strip("/") / f"mlpipe-test-{uuid.uuid4().hex[:8]}"
    try:
        child.mkdir()
        (child / "memory.limit_in_bytes").write_text(str(CGROUP_LIMIT))
    except OSError as exc:
        pytest.skip(f"cannot make a memory cgroup here: {exc}")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(f"4:memory:{own.rstrip('/')}/{child.name}\n")
    yield child, proc
    wait_until(lambda: not (child / "cgroup.procs").read_text().strip(), 10, "the cgroup emptied")
    wait_until(lambda: child.rmdir() is None, 10, "the cgroup removed")


def test_a_job_the_oom_killer_ends_for_real_fails_its_run_once(
    cloud: Cloud,
    bikeshare: PipelineConfig,
    trainer_env: Path,
    memory_cgroup: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    cgroup, proc = memory_cgroup
    python = tmp_path / "python-in-cgroup"
    python.write_text(f'#!/bin/sh\necho $$ > {cgroup}/cgroup.procs\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    memory = MemoryBudget(root=Path("/sys/fs/cgroup"), proc_cgroup=proc)
    assert memory.reading().limit == CGROUP_LIMIT
    clients = Clients(
        load_settings(CommonSettings), cloud.storage, cloud.publisher, cloud.reporter("trainer")
    )
    launcher = LocalJobLauncher(
        trainer_env,
        crash_reporter(clients, max_crashes=3, memory=memory),
        runner="subprocess",
        python=str(python),
        memory=memory,
    )
    # No estimate in the step (it would refuse this dataset): the job must start and outgrow.
    deps = TrainingStarter(cloud.storage, cloud.publisher, {"local": launcher}, "test", 120.0)
    data = bikeshare_times(40)
    path, generation, metadata = land(cloud, data, by_ingest=True)
    body = notification(cloud, path, generation, "oom-real", size=len(data), metadata=metadata)
    run_id = layout.run_id_for(metadata["sha256"], bikeshare.sha256())
    t0 = time.monotonic()

    assert deps(parse_envelope(body)).status == "training"

    failed = cloud.pulled(events.PIPELINE_FAILURES, timeout=90)
    took = time.monotonic() - t0
    assert [f.reason for f in failed] == ["out_of_memory"], [f.message for f in failed]
    assert "memory limit is 350 MiB (cgroup v1)" in failed[0].message
    assert failed[0].context.run_id == run_id
    assert (memory.reading().oom_kills or 0) >= 1
    assert cloud.storage.exists(layout.RunPaths(run_id).failed)
    assert cloud.pulled(events.TRAINING_COMPLETED, expect=0, timeout=0.5) == []
    again = deps(parse_envelope(body))
    assert again.status == "duplicate"  # no second job, no crash loop
    assert launcher.running() == []
    print(f"job OOM-killed and its run failed {took:.1f}s after the notification")
