"""Shared fixtures: the real emulators, started once per test session on free ports."""

from __future__ import annotations

import contextlib
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.message import Message

from mlpipe.v1 import events_pb2
from mlpipe_ops import containers as docker
from mlpipe_ops.follow import EventWatcher
from mlpipe_ops.localstack import LocalStack, StackState, client_env, port_free

REPO = Path(__file__).resolve().parents[1]


def free_base_port(count: int = 10) -> int:
    """A base port with `count` consecutive free ports after it."""
    rng = random.Random()
    for _ in range(200):
        # Below Linux's ephemeral range (32768 and up): an outgoing connection never takes
        # a port between the check and the bind.
        base = rng.randrange(20000, 32000)
        if all(port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no run of free ports found")


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `check` until it returns something truthy (errors count as not yet); return it,
    or fail the test naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            found = check()
            if found:
                return found
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {timeout}s")


def collect(
    watcher: EventWatcher, until: type[Message], run_id: str = "", timeout: float = 90.0
) -> list[Message]:
    """Events (of `run_id`, when given) until one of type `until` or a failure arrives."""
    seen: list[Message] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for observed in watcher.events(timeout=1.0):
            event = observed.event
            if run_id and event.context.run_id != run_id:  # type: ignore[attr-defined]
                continue
            seen.append(event)
            if isinstance(event, until | events_pb2.PipelineFailed):
                return seen
            break
    raise AssertionError(
        f"no {until.__name__} within {timeout}s; saw {[type(e).__name__ for e in seen]}"
    )


def engine_missing() -> str:
    """Why there is no Docker engine ("" when there is); on CI its absence is a failure."""
    try:
        docker.check_engine()
    except docker.DockerError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs a Docker engine for this suite: {exc}")
        return str(exc)
    return ""


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def emulators(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackState]:
    """The Pub/Sub emulator and fake-gcs-server, for integration tests."""
    stack = LocalStack(
        tmp_path_factory.mktemp("emulators"),
        base_port=free_base_port(),
        project=unique("session"),
        bucket=unique("session"),
    )
    state = stack.up(services=False, progress=lambda _: None)
    with client_env(state):
        yield state
    stack.down(progress=lambda _: None)
