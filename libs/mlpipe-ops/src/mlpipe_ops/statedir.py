"""The local stack's state directory: what it holds, whether it can be trusted, who uses it,
and wiping it.

    <state_dir>/stack.json      the running stack: PIDs, containers, ports (mlpipe_ops.localstack)
    <state_dir>/gcs/            fake-gcs-server's objects (`-backend filesystem`): the bucket
    <state_dir>/pubsub-data/    the Pub/Sub emulator's data directory (it keeps no messages)
    <state_dir>/logs/           each process's log, the training jobs' logs
    <state_dir>/reports/        HTML reports saved by `mlpipe report`
    <state_dir>/reconcile.json  what `mlpipe up`'s reconcile pass re-published (.reconcile)
    <state_dir>/gcs-checked.json  objects found intact, so that a start checks only new ones
    <state_dir>/prestart/       the modules each service imports at start (.prestart)
    <state_dir>/balancer/       haproxy's configuration with --instances N (.balancer)

How fake-gcs-server 1.54 keeps an object on disk (internal/backend/fs.go): the bytes in
`gcs/<bucket>/<object name>`, written to a temporary file and renamed into place; its attributes
(generation, md5, custom metadata...) as JSON in the file's `user.metadata` extended attribute,
set after the rename, or in a `<file>.metadata` sidecar where the filesystem has no user
extended attributes. A file without readable attributes makes every listing of its bucket fail,
and a file whose bytes differ from its recorded md5 is refused by the client libraries: both are
reported here, naming the file, before anything starts.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

STATE_FILE = "stack.json"
GCS_DIR = "gcs"
PUBSUB_DIR = "pubsub-data"
LOGS_DIR = "logs"
REPORTS_DIR = "reports"
RECONCILE_FILE = "reconcile.json"
CHECKED_FILE = "gcs-checked.json"
PRESTART_DIR = "prestart"
BALANCER_DIR = "balancer"  # mlpipe_ops.balancer.CONFIG_DIR
TRACES_DIR = "traces"  # the services' spans, one JSON lines file per process (mlpipe.tracing)
# What `mlpipe down --wipe` removes: everything the stack writes into its state directory.
DATA = (
    GCS_DIR,
    PUBSUB_DIR,
    LOGS_DIR,
    REPORTS_DIR,
    RECONCILE_FILE,
    CHECKED_FILE,
    PRESTART_DIR,
    BALANCER_DIR,
    TRACES_DIR,
    STATE_FILE,
)

XATTR = "user.metadata"
SIDECAR = ".metadata"
BUCKET_RECORD = ".bucketMetadata"


# --- objects ------------------------------------------------------------------------------------
def _uses_xattrs(root: Path) -> bool:
    """As fake-gcs-server decides: extended attributes when the root directory supports them."""
    try:
        os.getxattr(root, XATTR)
    except OSError as exc:
        return exc.errno == errno.ENODATA
    return True


def _attributes(path: Path, xattrs: bool) -> tuple[dict[str, object] | None, str]:
    """The object's recorded attributes, or None and why they cannot be read."""
    try:
        raw = (
            os.getxattr(path, XATTR)
            if xattrs
            else (path.parent / (path.name + SIDECAR)).read_bytes()
        )
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOENT):
            return None, "it has no recorded attributes (a write cut short)"
        return None, f"its attributes cannot be read ({exc.strerror})"
    try:
        attrs = json.loads(raw)
    except ValueError as exc:
        return None, f"its recorded attributes are not JSON ({exc})"
    if not isinstance(attrs, dict) or not isinstance(attrs.get("Generation"), int):
        return None, "its recorded attributes have no generation"
    return attrs, ""


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return base64.b64encode(digest.digest()).decode()


def object_files(root: Path) -> Iterator[tuple[str, Path]]:
    """(bucket directory name, file) for every object file under fake-gcs-server's root."""
    if not root.is_dir():
        return
    xattrs = _uses_xattrs(root)
    for bucket in sorted(p for p in root.iterdir() if p.is_dir()):
        for folder, _, files in os.walk(bucket):
            for name in sorted(files):
                if not xattrs and name.endswith(SIDECAR):
                    continue
                yield bucket.name, Path(folder) / name


def check_objects(state_dir: Path) -> list[str]:
    """One line per object file fake-gcs-server could not serve faithfully; [] when all are.

    Each file's attributes are read; its bytes are hashed against the recorded md5 unless the
    file is unchanged (size, mtime, generation) since a previous check found it intact.
    """
    root = state_dir / GCS_DIR
    if not root.is_dir():
        return []
    xattrs = _uses_xattrs(root)
    cache_path = state_dir / CHECKED_FILE
    try:
        checked = json.loads(cache_path.read_text())
        checked = checked if isinstance(checked, dict) else {}
    except (OSError, ValueError):
        checked = {}
    problems: list[str] = []
    still: dict[str, list[int]] = {}
    for _, path in object_files(root):
        attrs, why = _attributes(path, xattrs)
        if attrs is None:
            problems.append(f"{path}: {why}{_temporary_hint(path)}")
            continue
        try:
            st = path.stat()
        except OSError as exc:
            problems.append(f"{path}: cannot be read ({exc.strerror})")
            continue
        key = str(path.relative_to(root))
        stamp = [st.st_size, st.st_mtime_ns, int(str(attrs["Generation"]))]
        if checked.get(key) != stamp:
            try:
                actual = _md5(path)
            except OSError as exc:
                problems.append(f"{path}: cannot be read ({exc.strerror})")
                continue
            if attrs.get("Md5Hash") and actual != attrs["Md5Hash"]:
                problems.append(
                    f"{path}: its bytes do not match its recorded md5 (recorded "
                    f"{attrs['Md5Hash']}, found {actual}): the object was changed outside the "
                    f"stack or its write was cut short"
                )
                continue
        still[key] = stamp
    with contextlib.suppress(OSError):
        _write_atomic(cache_path, json.dumps(still).encode())
    return problems


def _temporary_hint(path: Path) -> str:
    """fake-gcs-server writes `.<name><digits>` beside `<name>` and renames it: a leftover one
    is a write that never completed."""
    if path.name.startswith("."):
        stem = path.name[1:].rstrip("0123456789")
        if stem and (path.parent / stem).exists():
            return f"; it is the temporary file of an unfinished write of {path.parent / stem}"
    return ""


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename: a reader never sees half of it."""
    _write_atomic(path, text.encode())


# --- who uses it --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Holder:
    pid: int
    command: str
    session: int = 0  # the stack starts each process in its own session: its PID

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.command})"


def _command(pid: str) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    words = raw.rstrip(b"\0").split(b"\0")
    text = " ".join(w.decode(errors="replace") for w in words)
    return text if len(text) <= 120 else text[:117] + "..."


def _pids() -> list[str]:
    try:
        return [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []


def _ancestors() -> set[str]:
    """This process and its parents (a `uv run` or shell started with the directory in its
    arguments is not a stack)."""
    found = set()
    pid = str(os.getpid())
    while pid not in found and pid != "0":
        found.add(pid)
        try:
            pid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
        except (OSError, IndexError):
            break
    return found


def processes_using(state_dir: Path) -> list[Holder]:
    """Processes whose command line names `state_dir` or that hold a file in it open (each
    process of a stack logs into it): a stack started from it that stack.json may not record.
    This process and its parents are left out."""
    target = str(state_dir.resolve())
    skip = _ancestors()
    found = []
    for pid in _pids():
        if pid in skip:
            continue
        base = Path(f"/proc/{pid}")
        try:
            hit = target.encode() in (base / "cmdline").read_bytes()
            fds = [] if hit else os.listdir(base / "fd")
        except OSError:
            continue  # gone, or another user's: not one this user could have started
        for fd in fds:
            with contextlib.suppress(OSError):
                link = os.readlink(base / "fd" / fd)
                if link == target or link.startswith(target + "/"):
                    hit = True
                    break
        if hit:
            found.append(Holder(int(pid), _command(pid), _session(pid)))
    return found


def _session(pid: str) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])
    except (OSError, IndexError, ValueError):
        return 0


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local address is HEXIP:HEXPORT; state 0A is LISTEN; the inode is the 10th field.
            if (
                len(fields) > 9
                and fields[3] == "0A"
                and int(fields[1].rsplit(":", 1)[1], 16) == port
            ):
                inodes.add(fields[9])
    return inodes


def port_holder(port: int) -> str:
    """Who listens on `port`: "pid N (command)", or what can be said when that is not visible."""
    inodes = _listening_inodes(port)
    if inodes:
        sockets = {f"socket:[{inode}]" for inode in inodes}
        for pid in _pids():
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    with contextlib.suppress(OSError):
                        if os.readlink(f"/proc/{pid}/fd/{fd}") in sockets:
                            return str(Holder(int(pid), _command(pid)))
    holder = _ss_holder(port)
    if holder:
        return holder
    if inodes:
        return "a process this user cannot see (another user's, or in another namespace)"
    return "a socket that is bound but not listening, or one this user cannot see"


def _ss_holder(port: int) -> str:
    """`ss -ltnpH`'s owner of `port`, where ss exists and can say."""
    if shutil.which("ss") is None:
        return ""
    try:
        out = subprocess.run(
            ["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True, timeout=5
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    # users:(("python3",pid=123,fd=3))
    for line in out.splitlines():
        if "pid=" in line:
            name = line.split('(("', 1)[-1].split('"', 1)[0]
            pid = line.split("pid=", 1)[1].split(",", 1)[0]
            return f"pid {pid} ({name})"
    return ""


# --- wiping -------------------------------------------------------------------------------------
def _size(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() or p.is_symlink())


def describe(state_dir: Path) -> list[tuple[str, int, int]]:
    """(entry, files, bytes) of the stack's data present in `state_dir`."""
    found = []
    for name in DATA:
        path = state_dir / name
        if not path.exists():
            continue
        files = 1 if path.is_file() else sum(1 for p in path.rglob("*") if p.is_file())
        found.append((name, files, _size(path)))
    return found


def wipe(state_dir: Path) -> list[tuple[str, int, int]]:
    """Remove the stack's data from `state_dir`; return what was removed as (entry, files,
    bytes). Anything else in the directory is left alone."""
    removed = describe(state_dir)
    for name, _, _ in removed:
        path = state_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return removed


def human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"
