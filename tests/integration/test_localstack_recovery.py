"""The whole local stack killed mid-run (kill -9 of every process, as a power cut), then
`mlpipe up` on the same state directory: the run completes, with exactly one model version.

The training job stalls before writing anything (mlpipe.faults, once), so the stack dies with a
claimed, half-trained run and the Pub/Sub emulator takes the held notification with it; only
the reconcile pass of `up` can finish the run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from mlpipe.messaging import events
from mlpipe.messaging.publishing import Publisher
from mlpipe.ml.config import config_path, parse_config
from mlpipe.store import layout
from mlpipe.store.registry import CHAMPION, Registry
from mlpipe.store.storage import Storage, make_client, sha256_hex
from mlpipe.v1 import events_pb2
from mlpipe_ops.localstack import LocalStack, StackState, client_env
from tests.conftest import REPO, free_base_port, unique, wait_until

pytestmark = pytest.mark.e2e

MODEL = "iris-classifier"


def kill_everything(state: StackState) -> None:
    """SIGKILL every process group of the stack: services, emulators, the emulator's java,
    the trainer's forkserver and its paused job."""
    for proc in state.processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    for proc in state.processes:
        # The emulators are this process's children; the services are not (mlpipe_ops.prestart
        # forked them), and are gone once their parent reaps them.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(proc.pid, 0)


def test_a_run_killed_with_the_whole_stack_completes_after_up_with_one_version(
    tmp_path: Path,
) -> None:
    state_dir, base, name = tmp_path / "state", free_base_port(), unique("rec")
    once = tmp_path / "fired"
    once.mkdir()
    # The job pauses before writing its artifacts, once: the restarted stack trains normally.
    faults = {
        "MLPIPE_FAULT_POINT": "job.before_artifacts=pause:60",
        "MLPIPE_FAULT_ONCE_DIR": str(once),
    }
    first = LocalStack(state_dir, base_port=base, project=name, bucket=name, env=faults)
    state = first.up(progress=lambda _: None)
    text = (REPO / "examples/iris/pipeline.yaml").read_text()
    csv_text = (REPO / "examples/iris/iris.csv").read_text()
    run_id = layout.run_id_for(sha256_hex(csv_text.encode()), parse_config(text).sha256())
    paths = layout.RunPaths(run_id)
    try:
        with client_env(state):
            storage = Storage(make_client(state.project), state.bucket)
            storage.write(config_path("iris"), text.encode())
            Publisher(state.project).publish(
                events_pb2.IngestRequest(
                    request_id=uuid.uuid4().hex,
                    dataset="iris",
                    inline=events_pb2.InlineRows(csv=csv_text),
                    requested_at=events.timestamp(),
                )
            )
            wait_until(lambda: (once / "job.before_artifacts").exists(), 90, "the job's pause")
            assert storage.exists(paths.claim) and not storage.exists(paths.training)
    finally:
        kill_everything(state)
    wait_until(lambda: not any(p.alive() for p in state.processes), 10, "every process dead")
    lines: list[str] = []

    second = LocalStack(state_dir, base_port=base, project=name, bucket=name, env=faults)
    state = second.up(progress=lines.append)
    try:
        with client_env(state):
            storage = Storage(make_client(state.project), state.bucket)
            wait_until(lambda: storage.exists(paths.deployment), 120, "the run's deployment")
            served = wait_until(
                lambda: (
                    httpx.get(f"{state.url('predictor')}/v1/models", timeout=5)
                    .json()["models"]
                    .get(MODEL)
                ),
                30,
                "the predictor serving the model",
            )
            registry = Registry(storage)
            versions = registry.versions(MODEL)
            champion = registry.alias(MODEL, CHAMPION)
            mine = registry.get(MODEL, versions[0]) if versions else None
            # `mlpipe runs`, as a user would look after the restart.
            runs = subprocess.run(
                [sys.executable, "-m", "mlpipe_ops.cli", "runs", "--state-dir", str(state_dir)],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=60,
            )
    finally:
        second.down(progress=lambda _: None)

    print("\n".join(lines))
    said = [line for line in lines if line.startswith("reconcile")]
    # Re-driven once, by the notification of its dataset (at once, or once its claim lapsed).
    published = [line for line in said if "(message " in line]
    assert len(published) == 1 and run_id in published[0], said
    assert "OBJECT_FINALIZE notification" in published[0], said
    assert versions == [1] and champion == 1
    assert mine is not None and mine.run_id == run_id
    assert served["version"] == 1
    assert f"{run_id}  iris         deployed      v1" in runs.stdout
