"""What happens when a training job ends without recording a result."""

from __future__ import annotations

import logging
from pathlib import Path

from mlpipe import events, lineage
from mlpipe.service import Clients
from mlpipe.v1 import events_pb2
from mlpipe_trainer import lease
from mlpipe_trainer.launcher import CrashHandler

log = logging.getLogger(__name__)


def crash_reporter(clients: Clients, max_crashes: int = 3) -> CrashHandler:
    """Release a dead job's claim so the held notification's redelivery retries the run; after
    `max_crashes` crashes, fail the run with `job_crashed` and keep the job's log tail."""

    def report(
        started: events_pb2.TrainingStarted, exit_code: int, log_path: Path, stopping: bool
    ) -> None:
        paths = lineage.RunPaths(started.context.run_id)
        recorded = clients.storage.read(paths.training)
        if recorded is not None:
            # Recorded, but maybe never published (the job died or Pub/Sub was away): publish
            # it now rather than wait for a redelivery that may never come.
            claim = lease.read(clients.storage, paths.claim)
            if claim is None or claim.state != lease.PUBLISHED:
                clients.publisher.publish(
                    events.from_json(events_pb2.TrainingCompleted, recorded.data)
                )
            return
        if clients.storage.exists(paths.failed):
            return
        released = lease.release(clients.storage, paths.claim, crashed=not stopping)
        crashes = released.crashes if released is not None else 0
        if crashes < max_crashes:
            log.warning(
                "run %s: claim released after its job exited with %d (%d crash(es) of %d "
                "allowed); the redelivered notification starts it again",
                started.context.run_id,
                exit_code,
                crashes,
                max_crashes,
                extra={"run_id": started.context.run_id},
            )
            return
        tail = log_path.read_bytes()[-20_000:] if log_path.exists() else b""
        kept = clients.failures.quarantine("job_crashed", tail, key=started.context.run_id)
        failed = clients.failures.report(
            reason="job_crashed",
            message=f"the training job died {crashes} times without recording a result "
            f"(last exit code {exit_code}); its log tail is kept at {kept}",
            context=started.context,
            dataset=started.dataset,
            quarantine_uri=kept,
        )
        clients.storage.write(
            paths.failed, events.to_json(failed).encode(), content_type="application/json"
        )

    return report
