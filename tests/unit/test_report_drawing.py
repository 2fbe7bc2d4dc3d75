"""Report pages drawn by the low-priority worker process: the same page as drawn in process,
the worker niced (WORKER_NICE), and a worker that died replaced by the next page."""

from __future__ import annotations

import os

import pytest

from mlpipe.errors import PermanentError
from mlpipe.v1 import events_pb2
from mlpipe_evaluator import plots, report
from mlpipe_evaluator.drawing import WORKER_NICE, Drawer, DrawingFailed

EVENT = events_pb2.EvaluationCompleted(model_name="iris-classifier", passed=True)
DATA = {
    "plots": [
        plots.confusion_matrix(["a", "b"], [[3, 1], [0, 4]]),
        plots.roc_curves(
            ["a", "b", "a", "b"], [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]], ["a", "b"]
        ),
    ]
}
DETAILS = {"labels": ["a", "b"], "confusion_matrix": [[3, 1], [0, 4]]}


@pytest.fixture
def drawer() -> Drawer:
    made = Drawer(timeout=60)
    yield made
    made.close()


def test_the_worker_draws_the_page_drawn_in_process_at_the_lowest_priority(
    drawer: Drawer,
) -> None:
    page = drawer.page(EVENT, DETAILS, {"split": "stratified"}, DATA)

    assert page == report.render(EVENT, DETAILS, {"split": "stratified"}, DATA)
    assert drawer._proc is not None
    assert os.getpriority(os.PRIO_PROCESS, drawer._proc.pid) == WORKER_NICE


def test_a_dead_worker_fails_that_page_and_the_next_page_starts_another(drawer: Drawer) -> None:
    drawer.page(EVENT, DETAILS, None, DATA)
    assert drawer._proc is not None
    first = drawer._proc.pid
    drawer._proc.kill()
    drawer._proc.wait()

    page = drawer.page(EVENT, DETAILS, None, DATA)

    assert drawer._proc is not None and drawer._proc.pid != first
    assert page.count("<svg") == 2


def test_a_page_the_worker_cannot_draw_is_a_permanent_error(drawer: Drawer) -> None:
    with pytest.raises(PermanentError, match="could not be drawn"):
        drawer.page(EVENT, DETAILS, None, {"plots": "not a list of plots"})

    assert drawer.page(EVENT, DETAILS, None, DATA).count("<svg") == 2  # still serving


def test_a_stalled_worker_is_stopped(drawer: Drawer) -> None:
    drawer.page(EVENT, DETAILS, None, DATA)
    assert drawer._proc is not None
    proc = drawer._proc
    os.kill(proc.pid, 19)  # SIGSTOP: alive, never answering
    drawer.timeout = 0.5

    with pytest.raises(DrawingFailed, match="stalled"):
        drawer.page(EVENT, DETAILS, None, DATA)

    assert proc.poll() is not None and drawer._proc is None


def test_a_worker_whose_service_is_gone_leaves_quietly() -> None:
    # The service killed mid-page (a fault point, kill -9): the worker finds no one to answer.
    import json
    import subprocess
    import sys

    from mlpipe.messaging import events

    worker = subprocess.Popen(
        [sys.executable, "-m", "mlpipe_evaluator.drawing"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert worker.stdin is not None and worker.stdout is not None
    worker.stdout.close()  # what the service's death does to the pipe's reading end
    ask = {"evaluation": events.to_json(EVENT), "details": DETAILS, "lineage": None, "plots": DATA}
    worker.stdin.write(json.dumps(ask) + "\n")
    worker.stdin.flush()
    _, stderr = worker.communicate(timeout=60)

    assert worker.returncode == 0
    assert "Traceback" not in stderr, stderr
