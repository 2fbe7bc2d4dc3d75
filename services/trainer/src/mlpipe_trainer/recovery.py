"""What happens when a training job ends without recording a result."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from mlpipe.messaging import events
from mlpipe.runtime.clients import Clients
from mlpipe.store import layout
from mlpipe.store.storage import BadObjectUri
from mlpipe.v1 import events_pb2
from mlpipe_trainer import lease
from mlpipe_trainer.launcher import CrashHandler, JobExit
from mlpipe_trainer.memory import MemoryBudget, object_size, out_of_memory_message

log = logging.getLogger(__name__)


def crash_reporter(
    clients: Clients,
    max_crashes: int = 3,
    memory: MemoryBudget | None = None,
    restart: Callable[[], object] | None = None,
) -> CrashHandler:
    """Release a dead job's claim so that the reconciler starts the run again (`restart`, when
    given, runs it at once); after `max_crashes` crashes, fail the run with `job_crashed` and
    keep the job's log tail. A job the OOM killer ended fails its run at once with
    `out_of_memory`: a retry would only be killed again."""

    def report(started: events_pb2.TrainingStarted, end: JobExit) -> None:
        paths = layout.RunPaths(started.context.run_id)
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
        released = lease.release(clients.storage, paths.claim, crashed=not end.stopping)
        if end.out_of_memory and memory is not None:
            _fail(clients, started, "out_of_memory", _oom_message(clients, started, memory))
            return
        crashes = released.crashes if released is not None else 0
        if crashes < max_crashes:
            log.warning(
                "run %s: claim released after its job exited with %d (%d crash(es) of %d "
                "allowed); the reconciler starts it again",
                started.context.run_id,
                end.code,
                crashes,
                max_crashes,
                extra={"run_id": started.context.run_id},
            )
            if restart is not None and not end.stopping:
                threading.Thread(target=restart, name="restart-run", daemon=True).start()
            return
        tail = end.log_path.read_bytes()[-20_000:] if end.log_path.exists() else b""
        kept = clients.failures.quarantine("job_crashed", tail, key=started.context.run_id)
        _fail(
            clients,
            started,
            "job_crashed",
            f"the training job died {crashes} times without recording a result (last exit "
            f"code {end.code}); its log tail is kept at {kept}",
            kept,
        )

    return report


def _oom_message(
    clients: Clients, started: events_pb2.TrainingStarted, memory: MemoryBudget
) -> str:
    try:
        path = clients.storage.path_of(started.dataset.uri)
    except BadObjectUri:
        size = None
    else:
        size = object_size(clients.storage, path, started.dataset.generation)
    return out_of_memory_message(started.dataset.uri, size, memory.reading())


def _fail(
    clients: Clients,
    started: events_pb2.TrainingStarted,
    reason: str,
    message: str,
    quarantine_uri: str = "",
) -> None:
    """Publish the run's PipelineFailed and record it, so that redeliveries acknowledge."""
    failed = clients.failures.report(
        reason=reason,
        message=message,
        context=started.context,
        dataset=started.dataset,
        # Landed data is immutable: a dataset that cannot be trained here stays where it is.
        quarantine_uri=quarantine_uri or started.dataset.uri,
    )
    clients.storage.write(
        layout.RunPaths(started.context.run_id).failed,
        events.to_json(failed).encode(),
        content_type="application/json",
    )
