"""The local stack's service processes, forked from one interpreter that imported their packages
once (mlpipe_ops.prestart): what it imports and when it forks, and that each service is its own
process, session and log, as when it started alone."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from mlpipe_ops import prestart, statedir
from mlpipe_ops.localstack import LocalStack
from tests.conftest import free_base_port, unique, wait_until

pytestmark = pytest.mark.integration


def test_the_service_needing_the_fewest_modules_forks_first_and_each_import_happens_once() -> None:
    record = {
        "ingest": ["json", "pandas"],
        "evaluator": ["json", "pandas", "sklearn"],
        "predictor": ["json", "pandas", "sklearn", "onnxruntime"],
        "trainer": ["json", "pandas", "sklearn", "google.cloud.aiplatform_v1"],
    }

    steps = prestart.order(record, ["trainer", "predictor", "evaluator", "ingest", "deployer"])

    assert steps == [
        ([], ["deployer"]),  # nothing recorded yet: forked at once, it imports for itself
        (["json", "pandas"], ["ingest"]),
        (["sklearn"], ["evaluator"]),
        (["google.cloud.aiplatform_v1", "onnxruntime"], ["trainer", "predictor"]),
    ]


def test_first_party_modules_are_never_imported_ahead() -> None:
    # They read the service's own settings (mlpipe.faults reads MLPIPE_FAULT_POINT at import).
    assert not prestart.recordable("mlpipe.faults")
    assert not prestart.recordable("mlpipe_trainer.main")
    assert not prestart.recordable("__main__")
    assert prestart.recordable("sklearn.ensemble")


def test_services_are_forked_after_their_recorded_imports_each_in_its_own_session(
    tmp_path: Path,
) -> None:
    state_dir, base, name = tmp_path / "state", free_base_port(), unique("pre")
    records = state_dir / statedir.PRESTART_DIR

    # First start: nothing recorded, every service forked at once; each records its imports.
    local = LocalStack(state_dir, base_port=base, project=name, bucket=name)
    local.up(progress=lambda _: None)
    try:
        wait_until(lambda: len(list(records.glob("*.json"))) == 6, 30, "six records")
    finally:
        local.down(progress=lambda _: None)
    recorded = {p.stem: json.loads(p.read_text()) for p in records.glob("*.json")}
    # Second start: imports first, then forks.
    local = LocalStack(state_dir, base_port=base, project=name, bucket=name)
    state = local.up(progress=lambda _: None)
    try:
        services = {p.name: p for p in state.processes if p.name in state.service_ports}
        health = {n: httpx.get(f"{state.url(n)}/healthz", timeout=5).json() for n in services}
        sessions = {n: os.getsid(p.pid) for n, p in services.items()}
        names = {n: Path(f"/proc/{p.pid}/comm").read_text().strip() for n, p in services.items()}
        logged = (state_dir / "logs" / "prestart.log").read_text().splitlines()
    finally:
        local.down(progress=lambda _: None)

    assert set(recorded) == set(state.service_ports)
    for service, modules in recorded.items():
        assert "uvicorn" in modules and "fastapi" in modules, service
        assert not [m for m in modules if m.startswith("mlpipe")], service
    assert "sklearn" in recorded["trainer"] and "sklearn" not in recorded["ingest"]
    assert sorted(services) == sorted(state.service_ports)
    # One instance each (the default): each service on its own port, no load balancer.
    assert state.instance_ports == {} and {p.port for p in services.values()} == set(
        state.service_ports.values()
    )
    assert not any(p.name == "haproxy" for p in state.processes)
    assert not (state_dir / statedir.BALANCER_DIR).exists()
    assert {n: h["service"] for n, h in health.items()} == {n: n for n in services}
    assert sessions == {n: p.pid for n, p in services.items()}
    assert names == {n: f"mlpipe-{n}"[:15] for n in services}
    # First start: nothing imported ahead, all forked at once. Second: imports, then forks.
    steps = [line.split(None, 2)[2] for line in logged if line.startswith("prestart:")]
    assert steps[0].startswith("0 module(s) imported, forking ")
    assert sorted(steps[0].split("forking ")[1].split()) == sorted(services)
    second = [(int(s.split()[0]), s.split("forking ")[1].split()) for s in steps[1:]]
    assert second[0][0] > 0
    assert sorted(n for _, batch in second for n in batch) == sorted(services)


def test_a_failed_start_stops_every_fork_even_one_reported_after_the_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start fails just as the starter is told to fork, before it has reported any fork,
    and the stop comes late (a loaded machine): the starter forks all six and exits before
    it is signalled. Every fork it made is still stopped, none is left holding the state."""
    from mlpipe_ops import localstack

    state_dir, base, name = tmp_path / "state", free_base_port(), unique("pre")
    local = LocalStack(state_dir, base_port=base, project=name, bucket=name)
    start_processes = local._start_processes

    def fork_then_fail(*args: object) -> Callable[[], None]:
        go = start_processes(*args)  # type: ignore[arg-type]

        def failing_go() -> None:
            go()
            raise localstack.StackError("a failure right after the services were told to fork")

        return failing_go

    stop_processes = localstack.stop_processes

    def late_stop(processes: list[localstack.Proc], *args: object, **kwargs: object) -> None:
        starter = next((p for p in processes if p.name == "prestart"), None)
        if starter is not None:
            wait_until(lambda: not starter.alive(), 60, "the starter forks all and exits")
        stop_processes(processes, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(local, "_start_processes", fork_then_fail)
    monkeypatch.setattr(localstack, "stop_processes", late_stop)

    with pytest.raises(localstack.StackError, match="right after the services were told"):
        local.up(progress=lambda _: None, timeout=120)

    try:
        wait_until(lambda: not statedir.processes_using(state_dir), 30, "every fork stopped")
    except AssertionError:
        left = statedir.processes_using(state_dir)
        raise AssertionError(f"still holding the state directory: {left}") from None
