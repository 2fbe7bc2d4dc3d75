"""Report pages drawn in a worker process of their own, at a lower CPU priority.

Drawing is pure Python for a second or so. In the service's process it would hold the GIL
against the next delivery's scoring, and on a machine the services share (the local stack)
take a core from the deployer and the predictor acting on the verdict just published. The
worker (`python -m mlpipe_evaluator.drawing`) is started on the first report, never at
service start, imports matplotlib once, and is niced to WORKER_NICE: it yields the CPU to the
service's own work without starving when the machine is busy (at 19 the
scheduler gives it 15/1024 of each busy process's share; at 5, 335/1024). One page
at a time, as JSON lines over its stdin and stdout; a worker that dies or stalls is stopped
and the next page starts a new one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import subprocess
import sys
import threading
from typing import Any

from mlpipe.errors import PermanentError
from mlpipe.messaging import events
from mlpipe.v1 import events_pb2

log = logging.getLogger(__name__)

PAGE_TIMEOUT_SECONDS = 50.0  # under the push subscription's 60 s ack deadline
WORKER_NICE = 5


class DrawingFailed(RuntimeError):
    """The worker died or did not answer in time (the delivery fails and is redelivered)."""


class Drawer:
    def __init__(self, timeout: float = PAGE_TIMEOUT_SECONDS) -> None:
        self.timeout = timeout
        self._proc: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()

    def page(
        self,
        evaluation: events_pb2.EvaluationCompleted,
        details: dict[str, Any],
        lineage: dict[str, Any] | None,
        plots: dict[str, Any] | None,
        cost: dict[str, Any] | None = None,
    ) -> str:
        """report.render's page, drawn by the worker."""
        ask = {
            "evaluation": events.to_json(evaluation),
            "details": details,
            "lineage": lineage,
            "plots": plots,
            "cost": cost,
        }
        with self._lock:
            proc = self._worker()
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(json.dumps(ask) + "\n")
                proc.stdin.flush()
                ready, _, _ = select.select([proc.stdout], [], [], self.timeout)
                line = proc.stdout.readline() if ready else ""
            except (BrokenPipeError, OSError) as exc:
                line = ""
                log.warning("report worker pipe failed: %s", exc)
            if not line:
                state = "stalled" if proc.poll() is None else "died"
                self._stop()
                raise DrawingFailed(f"the report worker {state}")
        answer = json.loads(line)
        if "error" in answer:
            # Answered: the same page would fail again, so this is no reason to redeliver.
            raise PermanentError(
                "report_failed", f"the report could not be drawn: {answer['error']}"
            )
        return str(answer["page"])

    def _worker(self) -> subprocess.Popen[str]:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "mlpipe_evaluator.drawing"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        return self._proc

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def close(self) -> None:
        with self._lock:
            if self._proc is not None and self._proc.stdin is not None:
                self._proc.stdin.close()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=5)
            self._stop()


def serve() -> None:
    """The worker: one page per line of stdin, until it closes."""
    os.nice(WORKER_NICE)
    from mlpipe_evaluator import report  # matplotlib comes with the first page

    for line in sys.stdin:
        try:
            ask = json.loads(line)
            evaluation = events.from_json(events_pb2.EvaluationCompleted, ask["evaluation"])
            answer = {
                "page": report.render(
                    evaluation, ask["details"], ask["lineage"], ask["plots"], ask.get("cost")
                )
            }
        except Exception as exc:  # answered, so the service names it instead of waiting
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            # The service that asked is gone (killed mid-page): no one to answer, and its
            # marker keeps the run for the next start. Leave without a traceback.
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return


# One worker per service process, shared by every Evaluator in it.
DRAWER = Drawer()

if __name__ == "__main__":
    serve()
