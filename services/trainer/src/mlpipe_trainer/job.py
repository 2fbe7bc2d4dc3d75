"""The training job process: `python -m mlpipe_trainer.job --started <TrainingStarted JSON>`.

The same entry point runs as the local subprocess and as the container of a cloud job. Exit
codes: 0 trained, 2 failed permanently (reported), 1 crashed (the launcher reports it).
"""

from __future__ import annotations

import argparse
import logging
import sys

from mlpipe import events, lineage
from mlpipe.errors import PermanentError
from mlpipe.logs import bind_run_id, setup_logging
from mlpipe.service import Clients
from mlpipe.settings import CommonSettings, load_settings
from mlpipe.v1 import events_pb2
from mlpipe_trainer.training import train

log = logging.getLogger("mlpipe_trainer.job")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlpipe_trainer.job")
    parser.add_argument("--started", required=True, help="TrainingStarted event as JSON")
    args = parser.parse_args(argv)
    settings = load_settings(CommonSettings)
    setup_logging("training-job", settings.log_level, settings.project)
    started = events.from_json(events_pb2.TrainingStarted, args.started)
    bind_run_id(started.context.run_id)
    clients = Clients.create(settings, stage="training-job", receives_push=False)
    paths = lineage.RunPaths(started.context.run_id)
    try:
        completed = train(clients.storage, started, settings.code_version)
    except PermanentError as exc:
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
        return 2
    # The marker is written last and holds the event, so a redelivery can re-publish it.
    clients.storage.write(
        paths.training, events.to_json(completed).encode(), content_type="application/json"
    )
    clients.publisher.publish(completed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
