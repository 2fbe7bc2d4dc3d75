"""Named fault points, for the fault suite (tests/faults) only.

Code calls `fault_point("trainer.after_claim")` at the places where a process could die or
stall. Nothing happens unless the process was started with `MLPIPE_FAULT_POINT` naming that
point, so the cost in production is one dict lookup. The value is `<point>` (SIGKILL this
process there, as an out-of-memory kill or a lost instance would) or `<point>=pause:<seconds>`
(stall there, to stop or restart something around it). Several are separated by commas.

`MLPIPE_FAULT_ONCE_DIR=<dir>` makes each point fire once across processes and restarts: the
first process to create `<dir>/<point>` fires, every later one passes, so a restarted service
or a relaunched job runs through the point normally. docs/reliability.md lists every point.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time

log = logging.getLogger(__name__)

# Every point the code calls, in chain order; the fault suite checks it covers them.
POINTS = (
    "ingest.after_land",  # dataset object written, DatasetLanded not yet published
    "trainer.after_claim",  # run claimed, no job started
    "trainer.after_launch",  # job started, TrainingStarted not recorded or published
    "job.before_artifacts",  # training job fitted, nothing written
    "job.after_model",  # model.joblib written, split/lineage/marker not
    "job.before_publish",  # training.json written, TrainingCompleted not published
    "evaluator.before_record",  # metrics and report written, evaluation.json not
    "evaluator.before_publish",  # evaluation.json written, EvaluationCompleted not published
    "deployer.after_claim",  # registry claim taken, version not written
    "deployer.after_register",  # version registered, champion alias not moved
    "deployer.before_publish",  # deployment.json written, DeploymentCompleted not published
)
# Points of a batch job (mlpipe_batch), outside the training chain the recovery suite walks.
BATCH_POINTS = (
    "batch.before_metrics",  # every shard written, the metrics not
)


def _parse(value: str) -> dict[str, float | None]:
    """{point: None (kill) or seconds to pause}."""
    faults: dict[str, float | None] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, _, action = item.partition("=")
        if action.startswith("pause:"):
            faults[name] = float(action.removeprefix("pause:"))
        elif action in ("", "kill"):
            faults[name] = None
        else:
            raise ValueError(f"MLPIPE_FAULT_POINT: unknown action {action!r} for {name!r}")
    return faults


_FAULTS = _parse(os.environ.get("MLPIPE_FAULT_POINT", ""))


def _claim_once(name: str) -> bool:
    """True if this process may fire `name` (no once-dir is set, or it got there first)."""
    directory = os.environ.get("MLPIPE_FAULT_ONCE_DIR", "")
    if not directory:
        return True
    try:
        fd = os.open(os.path.join(directory, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with contextlib.suppress(OSError):
        os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    return True


def fault_point(name: str) -> None:
    """Die or stall here if this process was started to do so; otherwise nothing."""
    if name not in _FAULTS or not _claim_once(name):
        return
    pause = _FAULTS[name]
    if pause is None:
        log.warning("fault point %s: killing process %d", name, os.getpid())
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    else:
        log.warning("fault point %s: pausing %.1fs", name, pause)
        time.sleep(pause)


def reload_from_environment() -> None:
    """Read MLPIPE_FAULT_POINT again (a forked job gets its environment after import)."""
    global _FAULTS
    _FAULTS = _parse(os.environ.get("MLPIPE_FAULT_POINT", ""))
