"""Local training backend: each job is its own process, started one of two ways.

- `warm` (default): forked from a forkserver that imported the training stack (pandas,
  scikit-learn, the Google clients) once, so a job starts in milliseconds instead of seconds.
  The forkserver is single-threaded and opens no connections, so forking it is safe; each job
  still gets its own process, memory and crash isolation.
- `subprocess`: a fresh `python -m mlpipe_trainer.job`, exactly what a cloud job runs.

A watcher thread reaps each child; if it dies without recording a result (killed, a bug, a
shutdown), the watcher releases the run's claim so that the reconciler starts it again (see
mlpipe_trainer.start.reconcile and mlpipe_trainer.lease); after repeated crashes the run
fails with `job_crashed`. A job the
OOM killer ended (SIGKILL while the cgroup's oom_kill count rose) would only be killed again:
its run fails at once with `out_of_memory` (mlpipe_trainer.memory).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Protocol

from mlpipe import tracing
from mlpipe.messaging import events
from mlpipe.ml.config import PipelineConfig
from mlpipe.v1 import events_pb2
from mlpipe_trainer.job import FAILED, RECORDED, SUPERSEDED
from mlpipe_trainer.memory import MemoryBudget
from mlpipe_trainer.settings import Runner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobExit:
    """How a local job ended without recording a result."""

    code: int
    log_path: Path
    stopping: bool  # the trainer is shutting down and stopped it
    out_of_memory: bool = False  # the kernel's OOM killer ended it


CrashHandler = Callable[[events_pb2.TrainingStarted, JobExit], None]

# Imported once by the forkserver; every warm job inherits them.
PRELOAD = [
    "mlpipe_trainer.job",
    "mlpipe_trainer.training",
    "mlpipe.ml.modeling",
    "mlpipe.ml.data",
    "mlpipe.ml.split",
    "mlpipe.runtime.clients",
    "sklearn.ensemble",
    "sklearn.linear_model",
    "pandas",
    "mlpipe_trainer.warm",  # last: a tiny read, split and fit with everything above imported
]


class Child(Protocol):
    @property
    def pid(self) -> int | None: ...

    def wait(self) -> int: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


class _ForkedChild:
    def __init__(self, process: BaseProcess) -> None:
        self.process = process

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def wait(self) -> int:
        self.process.join()
        return self.process.exitcode if self.process.exitcode is not None else -1

    def terminate(self) -> None:
        self.process.terminate()

    def kill(self) -> None:
        self.process.kill()


# The forkserver keeps the environment it started with; each job gets the launcher's current
# settings explicitly, as a subprocess would.
PASSED_ENV = ("MLPIPE_", "PUBSUB_EMULATOR_HOST", "STORAGE_EMULATOR_HOST", "GOOGLE_")


def killed_by_oom(code: int, oom_kills_before: int | None, oom_kills_after: int | None) -> bool:
    """A job that died of SIGKILL while its cgroup's OOM kill count rose was the OOM killer's
    victim (the job volunteers to be: mlpipe_trainer.job sets its oom_score_adj to 1000)."""
    if oom_kills_before is None or oom_kills_after is None:
        return False
    return code == -signal.SIGKILL and oom_kills_after > oom_kills_before


def _run_job(started_json: str, log_path: str, env: dict[str, str]) -> None:
    """The warm job's body, in the forked child: same entry point as the subprocess job."""
    for key in [k for k in os.environ if k.startswith((*PASSED_ENV, tracing.ENV_TRACEPARENT))]:
        del os.environ[key]
    os.environ.update(env)
    from mlpipe import faults

    faults.reload_from_environment()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (lives with the job)
    sys.stderr = sys.stdout
    from mlpipe_trainer.job import main

    sys.exit(main(["--started", started_json]))


class LocalJobLauncher:
    backend = "local"

    def __init__(
        self,
        log_dir: Path,
        on_crash: CrashHandler,
        runner: Runner = "warm",
        python: str = sys.executable,
        memory: MemoryBudget | None = None,
    ):
        self.log_dir = log_dir
        self.on_crash = on_crash
        self.runner = runner
        self.python = python
        # Its reservations end when the job exits; its OOM kill count tells how.
        self.memory = memory
        self._children: dict[str, Child] = {}
        self._watchers: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._context = multiprocessing.get_context("forkserver")
        if runner == "warm":
            self._context.set_forkserver_preload(PRELOAD)

    def warm_up(self) -> None:
        """Start the forkserver now (it imports PRELOAD), not on the first job's clock."""
        if self.runner == "warm":
            t0 = time.monotonic()
            probe = self._context.Process(target=int)
            probe.start()
            probe.join()
            log.info("forkserver warm in %.1fs", time.monotonic() - t0)

    def launch(self, started: events_pb2.TrainingStarted, config: PipelineConfig) -> str:
        run_id = started.context.run_id
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{run_id}.log"
        oom_kills = self.memory.oom_kills() if self.memory is not None else None
        child: Child
        # The job's spans continue the delivery's trace (mlpipe.tracing).
        trace_env = tracing.job_environment()
        if self.runner == "warm":
            env = {k: v for k, v in os.environ.items() if k.startswith(PASSED_ENV)}
            env.update(trace_env)
            process = self._context.Process(
                target=_run_job,
                name=f"job-{run_id}",
                args=(events.to_json(started), str(log_path), env),
            )
            process.start()
            child = _ForkedChild(process)
        else:
            with log_path.open("ab") as out:
                child = subprocess.Popen(
                    [self.python, "-m", "mlpipe_trainer.job", "--started", events.to_json(started)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, **trace_env},
                )
        job_id = f"local-{run_id}-{child.pid}"
        watcher = threading.Thread(
            target=self._watch,
            args=(job_id, child, started, log_path, oom_kills),
            daemon=True,
            name=job_id,
        )
        with self._lock:
            self._children[job_id] = child
            self._watchers[job_id] = watcher
        watcher.start()
        return job_id

    def _watch(
        self,
        job_id: str,
        child: Child,
        started: events_pb2.TrainingStarted,
        log_path: Path,
        oom_kills: int | None,
    ) -> None:
        code = child.wait()
        with self._lock:
            self._children.pop(job_id, None)
        try:
            if self.memory is not None:
                self.memory.release(started.context.run_id)
            if code in (RECORDED, FAILED, SUPERSEDED):
                return
            stopping = self._stopping
            out_of_memory = (
                not stopping
                and self.memory is not None
                and killed_by_oom(code, oom_kills, self.memory.oom_kills())
            )
            cause = " (stopped by the shutdown)" if stopping else ""
            if out_of_memory:
                cause = " (killed by the out-of-memory killer)"
            (log.warning if stopping else log.error)(
                "training job %s exited with %d%s; log at %s",
                job_id,
                code,
                cause,
                log_path,
                extra={"run_id": started.context.run_id},
            )
            try:
                self.on_crash(started, JobExit(code, log_path, stopping, out_of_memory))
            except Exception:
                log.exception("could not report the end of %s", job_id)
        finally:
            with self._lock:
                self._watchers.pop(job_id, None)

    def running(self) -> list[str]:
        with self._lock:
            return list(self._children)

    def terminate_all(self, grace: float = 3.0, timeout: float = 2.0) -> None:
        """On shutdown: give running jobs `grace` seconds to finish, then stop them and
        release their claims, so that a reconciler (another instance's, or Cloud Scheduler's
        call) starts them again elsewhere.
        Within Cloud Run's 10 s between SIGTERM and SIGKILL."""
        self._stopping = True
        deadline = time.monotonic() + grace
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            children = list(self._children.values())
        for child in children:
            child.terminate()
        deadline = time.monotonic() + timeout
        for child in children:
            waiter = threading.Thread(target=child.wait, daemon=True)
            waiter.start()
            waiter.join(max(0.1, deadline - time.monotonic()))
            if waiter.is_alive():
                child.kill()
        # The watchers release the claims; wait for them before the process exits.
        with self._lock:
            watchers = list(self._watchers.values())
        for watcher in watchers:
            watcher.join(max(0.1, deadline + 1.0 - time.monotonic()))
