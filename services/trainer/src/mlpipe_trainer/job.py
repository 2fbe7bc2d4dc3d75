"""The training job process: `python -m mlpipe_trainer.job --started <TrainingStarted JSON>`.

The same entry point runs as the local subprocess and as the container of a cloud job. It
reads the trainer's settings (mlpipe_trainer.settings). Its exit codes are below; any other
means it crashed (the launcher releases the run's claim).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mlpipe import tracing
from mlpipe.errors import PermanentError
from mlpipe.messaging import events
from mlpipe.runtime.clients import Clients
from mlpipe.runtime.logs import bind_run_id, setup_logging
from mlpipe.runtime.settings import load_settings
from mlpipe.runtime.steps import record_and_publish
from mlpipe.store import layout
from mlpipe.store.storage import Storage, make_client
from mlpipe.v1 import events_pb2
from mlpipe_trainer import lease
from mlpipe_trainer.memory import volunteer_for_oom_killer
from mlpipe_trainer.settings import TrainerSettings
from mlpipe_trainer.training import train

log = logging.getLogger("mlpipe_trainer.job")


# Exit codes: the run is recorded (trained); it failed permanently (reported); another
# delivery took the run over (this job recorded nothing). The launcher needs to do nothing
# after any of them.
RECORDED, FAILED, SUPERSEDED = 0, 2, 3


def main(argv: list[str] | None = None) -> int:
    volunteer_for_oom_killer()
    parser = argparse.ArgumentParser(prog="mlpipe_trainer.job")
    parser.add_argument("--started", required=True, help="TrainingStarted event as JSON")
    args = parser.parse_args(argv)
    settings = load_settings(TrainerSettings)
    setup_logging("training-job", settings.log_level, settings.project)
    started = events.from_json(events_pb2.TrainingStarted, args.started)
    bind_run_id(started.context.run_id)
    try:
        settings.start_tracing("training-job")
    except tracing.TracingError as exc:
        log.warning("training without a trace: %s", exc)
    try:
        # Under the trainer's delivery span (TRACEPARENT), or a trace of its own.
        with tracing.span(
            "training job",
            parent=os.environ.get(tracing.ENV_TRACEPARENT, ""),
            attributes={tracing.RUN_ID: started.context.run_id},
        ):
            return _main(settings, started)
    finally:
        tracing.flush()  # a forked job leaves by os._exit: nothing queued may wait for atexit


def _main(settings: TrainerSettings, started: events_pb2.TrainingStarted) -> int:
    clients = Clients.create(settings, stage="training-job", receives_push=False)
    paths = layout.RunPaths(started.context.run_id)
    heartbeat = lease.Heartbeat(
        Storage(make_client(settings.project), settings.bucket),
        paths.claim,
        settings.training_lease_seconds,
        started.job_id or f"pid-{os.getpid()}",
    )
    try:
        heartbeat.start()
        return _run(clients, started, paths, heartbeat, settings.code_version)
    except lease.LostClaim as exc:
        log.warning("stopping without recording anything: %s", exc)
        return SUPERSEDED
    finally:
        heartbeat.stop()


def _run(
    clients: Clients,
    started: events_pb2.TrainingStarted,
    paths: layout.RunPaths,
    heartbeat: lease.Heartbeat,
    code_version: str,
) -> int:
    try:
        # Writes nothing until the model is fitted; `before_write` renews the claim first, so
        # no other delivery can take the run over while the artifacts are written.
        completed = train(clients.storage, started, code_version, before_write=heartbeat.renew)
    except PermanentError as exc:
        heartbeat.renew()
        failed = clients.failures.report(
            reason=exc.reason,
            message=exc.message,
            context=started.context,
            dataset=started.dataset,
            quarantine_uri=started.dataset.uri,  # landed data is immutable: it stays there
        )
        clients.storage.write(
            paths.failed, events.to_json(failed).encode(), content_type="application/json"
        )
        heartbeat.published()
        return FAILED
    # The marker is written last and holds the event, so a redelivery can re-publish it. It
    # is created only if absent: should an earlier attempt have recorded the run, its event
    # stands and is the one published.
    record_and_publish(clients.storage, clients.publisher, paths.training, completed, stage="job")
    heartbeat.published()
    return RECORDED


if __name__ == "__main__":
    sys.exit(main())
