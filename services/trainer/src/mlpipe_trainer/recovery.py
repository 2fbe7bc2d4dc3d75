"""What happens when a training job dies without recording a result."""

from __future__ import annotations

from pathlib import Path

from mlpipe import lineage
from mlpipe.service import Clients
from mlpipe.v1 import events_pb2
from mlpipe_trainer.launcher import CrashHandler


def crash_reporter(clients: Clients) -> CrashHandler:
    def report(started: events_pb2.TrainingStarted, exit_code: int, log_path: Path) -> None:
        paths = lineage.RunPaths(started.context.run_id)
        if clients.storage.exists(paths.training) or clients.storage.exists(paths.failed):
            return
        tail = log_path.read_bytes()[-20_000:] if log_path.exists() else b""
        kept = clients.failures.quarantine("job_crashed", tail, key=started.context.run_id)
        clients.failures.report(
            reason="job_crashed",
            message=f"training job exited with code {exit_code} before recording a result; "
            f"its log tail is kept at {kept}; the run's claim is released so a "
            f"redelivery of the dataset notification retries it",
            context=started.context,
            dataset=started.dataset,
            quarantine_uri=kept,
        )
        clients.storage.delete(paths.claim)

    return report
