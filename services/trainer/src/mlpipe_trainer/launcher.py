"""Local training backend: the job runs as a subprocess of the same code.

A watcher thread reaps the child; if it dies without recording a result (killed, out of
memory, a bug), the watcher reports `job_crashed` and releases the run's claim so a
redelivery or replay can start it again.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from mlpipe import events
from mlpipe.config import PipelineConfig
from mlpipe.v1 import events_pb2

log = logging.getLogger(__name__)

CrashHandler = Callable[[events_pb2.TrainingStarted, int, Path], None]


class LocalJobLauncher:
    backend = "local"

    def __init__(self, log_dir: Path, on_crash: CrashHandler, python: str = sys.executable):
        self.log_dir = log_dir
        self.on_crash = on_crash
        self.python = python
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    def launch(self, started: events_pb2.TrainingStarted, config: PipelineConfig) -> str:
        run_id = started.context.run_id
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{run_id}.log"
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                [self.python, "-m", "mlpipe_trainer.job", "--started", events.to_json(started)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        job_id = f"local-{run_id}-{proc.pid}"
        with self._lock:
            self._children[job_id] = proc
        threading.Thread(
            target=self._watch, args=(job_id, proc, started, log_path), daemon=True, name=job_id
        ).start()
        return job_id

    def _watch(
        self,
        job_id: str,
        proc: subprocess.Popen[bytes],
        started: events_pb2.TrainingStarted,
        log_path: Path,
    ) -> None:
        code = proc.wait()
        with self._lock:
            self._children.pop(job_id, None)
        if code in (0, 2):
            return
        log.error(
            "training job %s exited with %d; log at %s",
            job_id,
            code,
            log_path,
            extra={"run_id": started.context.run_id},
        )
        try:
            self.on_crash(started, code, log_path)
        except Exception:
            log.exception("could not report the crash of %s", job_id)

    def running(self) -> list[str]:
        with self._lock:
            return list(self._children)

    def terminate_all(self, timeout: float = 5.0) -> None:
        """On shutdown: stop children; their runs' claims expire and are retried."""
        with self._lock:
            children = list(self._children.values())
        for proc in children:
            proc.terminate()
        for proc in children:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
