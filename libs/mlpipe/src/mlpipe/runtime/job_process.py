"""A job run as a local process of its own (the Beam jobs of `jobs/batch` on the DirectRunner,
launched by the predictor's batch step and by ingest's large landings), followed through the
handle its launch returns: {"pid", "host", "log"}.

The process is in a session of its own, so it outlives a restart of the service that started
it and a signal to the service's group does not reach it. A handle names its host: a process
on another host (another instance of the service) cannot be seen, and its state is UNKNOWN.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RUNNING, ENDED, UNKNOWN = "running", "ended", "unknown"
BATCH_JOB_MODULE = "mlpipe_batch"


def direct_runner_command(spec_json: str, mode: str, workers: int, python: str) -> list[str]:
    """`python -m mlpipe_batch --spec …` on Beam's DirectRunner with `workers` processes
    (`mode` multi_processing, or in_memory in that one process)."""
    return [
        python,
        "-m",
        BATCH_JOB_MODULE,
        "--spec",
        spec_json,
        "--runner=DirectRunner",
        f"--direct_running_mode={mode}",
        f"--direct_num_workers={workers}",
    ]


def batch_job_installed() -> bool:
    """Whether the batch job's package is here: looked up, never imported (a service image
    holds only its own service's packages)."""
    return importlib.util.find_spec(BATCH_JOB_MODULE) is not None


@dataclass
class JobProcesses:
    """The job processes one service started, and any other one on this host by its PID."""

    _children: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, command: list[str], log_path: Path) -> dict[str, Any]:
        """Start `command` with its output appended to `log_path`; its handle."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as out:
            child = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self._children[child.pid] = child
        return {"pid": child.pid, "host": socket.gethostname(), "log": str(log_path)}

    def state(self, handle: dict[str, Any]) -> str:
        if handle.get("host") != socket.gethostname():
            return UNKNOWN
        pid = int(handle.get("pid", 0))
        child = self._children.get(pid)
        if child is not None:
            return RUNNING if child.poll() is None else ENDED
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return ENDED
        except PermissionError:
            return RUNNING
        return RUNNING

    def stop(self, handle: dict[str, Any]) -> None:
        """SIGTERM the job's session, if it still runs here."""
        if self.state(handle) == RUNNING:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(handle["pid"]), signal.SIGTERM)

    def wait(self, timeout: float) -> None:
        """Wait for every process started here (tests, shutdown)."""
        for child in list(self._children.values()):
            child.wait(timeout)
