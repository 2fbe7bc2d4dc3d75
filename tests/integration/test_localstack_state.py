"""The local stack's state directory: the bucket outlives the stack, and a state directory that
cannot be trusted, or a port someone else holds, stops `up` with a message naming the culprit.

Every stack here is the real one (`LocalStack.up(services=False)`: the Pub/Sub emulator and
fake-gcs-server on its filesystem backend), restarted on the same state directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.api_core import exceptions as gexc

from mlpipe.store.registry import CHAMPION, Registry
from mlpipe.store.storage import Storage, make_client
from mlpipe_ops import statedir
from mlpipe_ops.localstack import LocalStack, StackError, StackState, client_env
from tests.conftest import REPO, free_base_port, unique

pytestmark = pytest.mark.integration

MODEL = "state-model"


def stack(state_dir: Path, base_port: int, name: str) -> LocalStack:
    return LocalStack(state_dir, base_port=base_port, project=name, bucket=name)


@contextlib.contextmanager
def running(local: LocalStack) -> Iterator[Storage]:
    state = local.up(services=False, progress=lambda _: None)
    try:
        with client_env(state):
            yield Storage(make_client(state.project), state.bucket)
    finally:
        local.down(progress=lambda _: None)


def kill_everything(state_dir: Path) -> None:
    """SIGKILL every process of the stack recorded in `state_dir`, as a crash or power cut."""
    state = StackState.load(state_dir)
    assert state is not None
    for proc in state.processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    for proc in state.processes:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(proc.pid, 0)


def seed(storage: Storage) -> dict[str, int]:
    """What the pipeline's code relies on: markers created with if_generation_match=0, custom
    metadata, a registered version and a champion alias moved by compare-and-swap."""
    generations = {
        "claim": storage.create_if_absent("runs/r1/claim.json", b'{"state": "running"}') or 0,
        "dataset": storage.write(
            "datasets/iris/dt=2026-01-01/a.csv",
            b"a,b\n1,2\n",
            content_type="text/csv",
            metadata={"sha256": "abc", "request_id": "req-1"},
        ),
    }
    registry = Registry(storage)
    version, created = registry.register(MODEL, "r1", b"model-bytes", {"metrics": {"acc": 0.9}})
    assert created and version.version == 1
    assert registry.move_alias(MODEL, 1) == (True, None)
    return generations


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict[str, int]]:
    """A stopped stack's state directory holding `seed`'s objects."""
    root = tmp_path_factory.mktemp("seeded") / "state"
    name = unique("state")
    with running(stack(root, free_base_port(), name)) as storage:
        generations = seed(storage)
    return root, name, generations


def copy_of(seeded: tuple[Path, str, dict[str, int]], tmp_path: Path) -> Path:
    # copy2 keeps the extended attributes where fake-gcs-server keeps each object's metadata.
    return Path(shutil.copytree(seeded[0], tmp_path / "state", copy_function=shutil.copy2))


def test_objects_keep_generations_metadata_and_preconditions_across_restarts(
    tmp_path: Path,
) -> None:
    state_dir, name, base = tmp_path / "state", unique("state"), free_base_port()
    with running(stack(state_dir, base, name)) as storage:
        generations = seed(storage)

    # A clean stop, then a kill -9 of every process: the objects are the same after each.
    for stop in ("down", "kill -9"):
        local = stack(state_dir, base, name)
        with running(local) as storage:
            registry = Registry(storage)
            claim = storage.read("runs/r1/claim.json")
            dataset = storage.read("datasets/iris/dt=2026-01-01/a.csv", with_metadata=True)
            assert claim is not None and claim.generation == generations["claim"], stop
            assert dataset is not None and dataset.generation == generations["dataset"], stop
            assert dataset.metadata == {"sha256": "abc", "request_id": "req-1"}
            # A generation-addressed read (the trainer reads the notified generation).
            older = storage.read("datasets/iris/dt=2026-01-01/a.csv", generation=dataset.generation)
            assert older is not None and older.data == b"a,b\n1,2\n"
            assert registry.versions(MODEL) == [1]
            assert registry.alias(MODEL, CHAMPION) == 1
            assert (mv := registry.get(MODEL, 1)) is not None and mv.run_id == "r1"
            assert registry.load_artifact(mv) == b"model-bytes"
            # Preconditions still hold against what was written before the restart.
            assert storage.create_if_absent("runs/r1/claim.json", b"{}") is None
            with pytest.raises(gexc.PreconditionFailed):
                storage.write("runs/r1/claim.json", b"{}", if_generation_match=claim.generation + 1)
            assert registry.register(MODEL, "r1", b"other", {})[1] is False
            if stop == "kill -9":
                kill_everything(state_dir)
                local.down(progress=lambda _: None)

    with running(stack(state_dir, base, name)) as storage:
        # A compare-and-swap on a generation written before two restarts succeeds once.
        moved = storage.write("runs/r1/claim.json", b"{}", if_generation_match=generations["claim"])
        assert moved != generations["claim"]
        registry = Registry(storage)
        assert registry.register(MODEL, "r2", b"second", {})[0].version == 2
        assert registry.move_alias(MODEL, 2) == (True, 1)


def test_a_stack_record_that_is_not_json_is_named_and_nothing_starts(
    seeded: tuple[Path, str, dict[str, int]], tmp_path: Path
) -> None:
    state_dir = copy_of(seeded, tmp_path)
    record = state_dir / "stack.json"
    record.write_text('{"project": "half-writ')

    with pytest.raises(StackError) as raised:
        stack(state_dir, free_base_port(), seeded[1]).up(services=False, progress=lambda _: None)

    assert str(record) in str(raised.value) and "not a stack record" in str(raised.value)
    assert statedir.processes_using(state_dir) == []


def test_object_files_that_cannot_be_served_are_named_and_nothing_starts(
    seeded: tuple[Path, str, dict[str, int]], tmp_path: Path
) -> None:
    state_dir = copy_of(seeded, tmp_path)
    bucket = state_dir / "gcs" / seeded[1]
    no_attributes = bucket / "runs/r1/claim.json"
    os.removexattr(no_attributes, statedir.XATTR)
    changed = bucket / "datasets/iris/dt=2026-01-01/a.csv"
    with changed.open("r+b") as f:
        f.write(b"X")  # same size, other bytes; the attributes stay
    # What fake-gcs-server leaves when it is killed between writing and renaming a file.
    temporary = bucket / "registry" / MODEL / "aliases" / ".champion123456"
    temporary.write_bytes(b"{")
    local = stack(state_dir, free_base_port(), seeded[1])

    with pytest.raises(StackError) as raised:
        local.up(services=False, progress=lambda _: None)

    message = str(raised.value)
    assert f"{no_attributes}: it has no recorded attributes" in message
    assert f"{changed}: its bytes do not match its recorded md5" in message
    assert f"{temporary}: it has no recorded attributes" in message
    assert "temporary file of an unfinished write" in message
    assert "3 object file(s)" in message
    assert statedir.processes_using(state_dir) == [] and not (state_dir / "stack.json").exists()
    # Moved out of the way, the rest is served again.
    for path in (no_attributes, changed, temporary):
        path.rename(tmp_path / path.name)
    with running(local) as storage:
        assert Registry(storage).versions(MODEL) == [1]


def test_a_port_in_use_names_the_port_and_the_process_holding_it(tmp_path: Path) -> None:
    base = free_base_port()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket, time\n"
            f"s = socket.socket(); s.bind(('127.0.0.1', {base + 3})); s.listen()\n"
            "print('ready', flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        with pytest.raises(StackError) as raised:
            stack(tmp_path / "state", base, unique("port")).up(progress=lambda _: None)
    finally:
        holder.kill()
        holder.wait()

    message = str(raised.value)
    assert f"port {base + 3} (trainer) is held by pid {holder.pid} ({sys.executable} -c" in message
    assert "--base-port" in message
    assert statedir.processes_using(tmp_path / "state") == []


def mlpipe(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mlpipe_ops.cli", *args, "--state-dir", str(state_dir)],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


def on_a_terminal(state_dir: Path, answer: str, *args: str) -> tuple[int, str]:
    """Run `mlpipe down --wipe` with a terminal on stdin and type `answer` at its prompt."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlpipe_ops.cli", "down", "--wipe", *args],
        cwd=REPO,
        env={**os.environ, "MLPIPE_STATE_DIR": str(state_dir)},
        stdin=follower,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    seen = b""
    deadline = time.monotonic() + 60
    while b"?" not in seen and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            seen += os.read(leader, 4096)
    os.write(leader, answer.encode() + b"\n")
    code = proc.wait(timeout=60)
    with contextlib.suppress(OSError):
        while chunk := os.read(leader, 4096):
            seen += chunk
    os.close(leader)
    return code, seen.decode(errors="replace")


def test_down_wipe_asks_on_a_terminal_needs_yes_otherwise_and_stops_its_stack_first(
    seeded: tuple[Path, str, dict[str, int]], tmp_path: Path
) -> None:
    state_dir = copy_of(seeded, tmp_path)
    local = stack(state_dir, free_base_port(), seeded[1])
    state = local.up(services=False, progress=lambda _: None)

    without_terminal = mlpipe(state_dir, "down", "--wipe")
    declined, prompt = on_a_terminal(state_dir, "n")
    kept = sorted(p.name for p in state_dir.iterdir())
    wiped = mlpipe(state_dir, "down", "--wipe", "--yes")

    assert without_terminal.returncode == 1 and "add --yes" in without_terminal.stderr
    assert declined == 1 and f"Delete the local stack's data in {state_dir}" in prompt
    assert {"gcs", "logs", "pubsub-data", "stack.json"} <= set(kept)
    assert wiped.returncode == 0, wiped.stderr
    assert not any(p.alive() for p in state.processes)
    assert "stopped fake-gcs-server" in wiped.stdout
    for entry in ("gcs", "logs", "pubsub-data"):
        assert f"removed {state_dir / entry} (" in wiped.stdout
    assert sorted(p.name for p in state_dir.iterdir()) == []
    assert mlpipe(state_dir, "down", "--wipe", "--yes").stdout.strip() == (
        f"nothing to wipe in {state_dir}"
    )


def test_down_wipe_on_a_terminal_deletes_when_confirmed(
    seeded: tuple[Path, str, dict[str, int]], tmp_path: Path
) -> None:
    state_dir = copy_of(seeded, tmp_path)

    code, output = on_a_terminal(state_dir, "y")

    assert code == 0, output
    assert f"removed {state_dir / 'gcs'} (" in output and not (state_dir / "gcs").exists()


def test_down_wipe_refuses_while_a_stack_it_does_not_record_uses_the_directory(
    seeded: tuple[Path, str, dict[str, int]], tmp_path: Path
) -> None:
    state_dir = copy_of(seeded, tmp_path)
    # A stack started from this directory whose stack.json was lost: fake-gcs-server's
    # command line names the directory, the others log into it.
    local = stack(state_dir, free_base_port(), seeded[1])
    state = local.up(services=False, progress=lambda _: None)
    (state_dir / "stack.json").rename(tmp_path / "stack.json")
    try:
        refused = mlpipe(state_dir, "down", "--wipe", "--yes")
        left = sorted(p.name for p in (state_dir / "gcs").iterdir())
    finally:
        (tmp_path / "stack.json").rename(state_dir / "stack.json")
        local.down(progress=lambda _: None)

    assert refused.returncode == 1
    assert "not wiping" in refused.stderr and "Stop it first" in refused.stderr
    for proc in state.processes:
        assert f"pid {proc.pid} (" in refused.stderr
    assert left == [seeded[1], f"{seeded[1]}.bucketMetadata"]


def test_a_record_that_cannot_be_read_is_named_by_down_and_cleared_by_wipe(
    seeded: tuple[Path, str, dict[str, int]], tmp_path: Path
) -> None:
    state_dir = copy_of(seeded, tmp_path)
    (state_dir / "stack.json").write_text("not json")

    down = mlpipe(state_dir, "down")
    status = mlpipe(state_dir, "status")
    wiped = mlpipe(state_dir, "down", "--wipe", "--yes")

    assert down.returncode == 1 and f"{state_dir / 'stack.json'} is not a stack record" in (
        down.stderr
    )
    assert status.returncode == 1 and "is not a stack record" in status.stderr
    assert wiped.returncode == 0 and f"removed {state_dir / 'stack.json'}" in wiped.stdout
    assert sorted(p.name for p in state_dir.iterdir()) == []


def test_the_check_reads_each_unchanged_object_once(
    seeded: tuple[Path, str, dict[str, int]], tmp_path: Path
) -> None:
    state_dir = copy_of(seeded, tmp_path)
    (state_dir / statedir.CHECKED_FILE).unlink(missing_ok=True)

    assert statedir.check_objects(state_dir) == []
    checked = json.loads((state_dir / statedir.CHECKED_FILE).read_text())
    # A second check trusts what is unchanged; a changed file is hashed again.
    target = state_dir / "gcs" / seeded[1] / "runs/r1/claim.json"
    attrs = os.getxattr(target, statedir.XATTR)
    target.write_bytes(b'{"state": "xxxxxxx"}')
    os.setxattr(target, statedir.XATTR, attrs)
    again = statedir.check_objects(state_dir)

    assert "runs/r1/claim.json" in {k.split("/", 1)[1] for k in checked}
    assert len(again) == 1 and str(target) in again[0]
