"""The local stack's service processes, forked from one interpreter that imported their
packages once (`mlpipe up` without --containers).

Started alone, each service imports its whole stack (pandas, scikit-learn, the Google client
libraries, FastAPI...): five interpreters importing on two cores took most of `mlpipe up`'s
20 s, mostly importing the same packages five times. Here one process imports each package once
and forks each service as soon as what it imports at start is there, so the services share the
work (and, copy-on-write, the memory). The trainer's job forkserver does the same for jobs.

What a service imports at start is learnt: each service, once its /healthz answers, writes the
modules it has loaded to `<state_dir>/prestart/<service>.json`; the next start imports those,
the service needing the fewest first, and forks each service once its modules are in. Without
a record (the first start) every service is forked at once, as separate interpreters would
start. Only third-party and standard modules are imported here: the first-party ones (mlpipe*)
read their settings from the service's own environment, so they are imported in the service,
after the fork. Like the job forkserver, this process is single-threaded in Python and opens no
connection before it forks (numpy's OpenBLAS and jemalloc keep native threads, which handle
fork themselves, as they do in the job forkserver).

Each forked service is its own session (its PID is its process group, as `start_new_session`
gives), with its own variables over this process's environment, its stdout/stderr on its log,
and its module run as `python -m mlpipe_<service>` runs it. The protocol with
mlpipe_ops.localstack, on stdin: the plan (one JSON line), then "go" once the bucket exists; on
stdout: "<name> <pid>" per fork, where a service run as N instances (`mlpipe up --instances N`)
has N entries in the plan, each with its own name, port and log, all forked at its step. A
module that fails to import here is skipped: the service imports it itself, or fails as it
would alone.

Told to stop (SIGTERM or SIGINT) before it has forked every service, as when a failed `mlpipe
up` stops what it started, it stops the services it has forked first: each is in a session
of its own, out of reach of a signal to this process's group, and the stack may not have read
its "<name> <pid>" line yet. The stop signals are blocked across each fork until the child is
listed, and each child puts the default handlers back (and unblocks them) right after it.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import runpy
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

FIRST_PARTY = ("mlpipe",)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def recordable(name: str) -> bool:
    """Modules worth importing ahead: not first-party, not this run's own entry points."""
    return not name.startswith(FIRST_PARTY) and not name.startswith("__")


def load_record(folder: Path, services: list[str]) -> dict[str, list[str]]:
    """What each service imported at its last start (`<folder>/<service>.json`)."""
    record = {}
    for service in services:
        try:
            modules = json.loads((folder / f"{service}.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(modules, list):
            record[service] = [str(m) for m in modules]
    return record


def order(record: dict[str, list[str]], services: list[str]) -> list[tuple[list[str], list[str]]]:
    """(modules to import, services to fork then), the service needing the fewest modules
    beyond what is imported already first, so the earliest forks wait the least."""
    done: set[str] = set()
    left = list(services)
    steps = []
    while left:
        missing = {s: [m for m in record.get(s, []) if m not in done] for s in left}
        fewest = min(len(m) for m in missing.values())
        batch = [s for s in left if len(missing[s]) == fewest]
        # Their modules in each one's recorded order (a package before its submodules).
        modules = list(dict.fromkeys(m for s in batch for m in missing[s]))
        steps.append((modules, batch))
        done.update(modules)
        left = [s for s in left if s not in batch]
    return steps


def _import(modules: list[str]) -> None:
    for name in modules:
        if name in sys.modules:
            continue
        # A module that cannot be imported on its own is left to the service.
        with contextlib.suppress(Exception):
            importlib.import_module(name)


def _record_when_ready(service: str, port: int, folder: Path) -> None:
    """Once the service answers /healthz, record the modules it has loaded."""
    import http.client

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                break
        except OSError:
            pass
        time.sleep(0.2)
    else:
        return
    for _ in range(10):
        try:
            loaded = [m for m in list(sys.modules) if recordable(m)]
            break
        except RuntimeError:  # an import changed sys.modules meanwhile
            time.sleep(0.05)
    else:
        return
    path = folder / f"{service}.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(OSError):
        folder.mkdir(exist_ok=True)
        tmp.write_text(json.dumps(loaded))
        os.replace(tmp, path)


def _child(entry: dict[str, Any], folder: Path) -> NoReturn:
    """In the forked process: become `python -m mlpipe_<service>` in a session of its own."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    # Forked with the stop signals blocked: one sent meanwhile now ends this process.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    os.setsid()
    fd = os.open(entry["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(null)
    os.close(fd)
    os.environ.update(entry["env"])
    # `ps -o comm`, top and the like show which service this is (the command line is ours).
    with contextlib.suppress(OSError):
        Path("/proc/self/comm").write_text(f"mlpipe-{entry['service']}"[:15])
    module = f"mlpipe_{entry['service']}"
    sys.argv = [module]
    threading.Thread(
        target=_record_when_ready,
        args=(entry["service"], int(entry["port"]), folder),
        daemon=True,
        name="prestart-record",
    ).start()
    # As `python -m`: an exception or SystemExit ends this process as it would that one,
    # through the normal interpreter exit (atexit handlers included).
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    sys.exit(0)


def stop_forked(forked: list[int], grace: float = 5.0) -> None:
    """SIGTERM each forked service's session, then SIGKILL what has not exited within `grace`."""
    for pid in forked:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    left = list(forked)
    while left and time.monotonic() < deadline:
        for pid in list(left):
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    left.remove(pid)
        time.sleep(0.05)
    for pid in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def main() -> None:
    t0 = time.monotonic()
    me = os.getpid()
    forked: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        # A child between its fork and its own reset still runs this handler: only the starter
        # stops the others.
        if os.getpid() != me:
            os._exit(128 + signum)
        stop_forked(forked)
        os._exit(128 + signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, stop)
    plan = json.loads(sys.stdin.readline())
    folder = Path(plan["record"])
    entries: dict[str, list[dict[str, Any]]] = {}
    for entry in plan["services"]:
        entries.setdefault(entry["service"], []).append(entry)
    steps = order(load_record(folder, list(entries)), list(entries))
    waited = False
    for modules, batch in steps:
        _import(modules)
        if not waited:
            # The predictor reads the bucket in its lifespan: fork nothing before it exists.
            if sys.stdin.readline().strip() != "go":
                sys.exit(1)
            waited = True
        # One line per step in its log: where the start's time goes.
        print(
            f"prestart: {time.monotonic() - t0:6.2f}s  {len(modules):5d} module(s) imported, "
            f"forking {' '.join(batch)}",
            file=sys.stderr,
            flush=True,
        )
        for entry in (e for service in batch for e in entries[service]):
            sys.stdout.flush()
            # A stop signal arriving between the fork and the append would find the new child
            # missing from `forked` and leave it running: it waits until the child is listed.
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            pid = os.fork()
            if pid == 0:
                _child(entry, folder)
            forked.append(pid)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            print(f"{entry.get('name', entry['service'])} {pid}", flush=True)
    # Every service is forked: end now. A normal exit would first tear down the thousands of
    # modules imported for the services (about half a second of CPU here), and `mlpipe up`
    # waits for this process's exit before it reports the stack up. It has no exit handler to
    # run: it starts no thread, and its only output, the pipe and its log, is flushed.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
