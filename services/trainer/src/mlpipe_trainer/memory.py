"""The trainer's memory: the limit of its cgroup, what a local training job will need, and
whether a dataset can ever be trained here.

Local jobs run inside the trainer's container, so their memory counts against the trainer's
limit (Cloud Run's, or a container's). A dataset too large for it is refused before a job
starts (`dataset_too_large`), and a job the kernel's OOM killer ends anyway fails its run at
once (`out_of_memory`) instead of being retried as a crash; both name the limit and the way out.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path

from google.api_core import exceptions as gexc

from mlpipe.store.storage import Storage

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
# cgroup v1 shows "no limit" as the largest page-aligned 64-bit number (9223372036854771712
# with 4 KiB pages); v2 writes "max". No machine has 2**62 bytes.
UNLIMITED = 1 << 62

# A local job's peak memory: a fixed part plus so many bytes per byte of the dataset file.
# Peak RSS of `python -m mlpipe_trainer.job` (the subprocess runner; a warm job shares much of
# the fixed part with the forkserver) on the emulators, by os.wait4's ru_maxrss:
#   iris.csv 3.6 KiB 268 MiB | crops.csv 0.10 MiB 274 MiB | bikeshare.csv 0.50 MiB 277 MiB
#   bikeshare.csv tiled x20/x100/x400 (HistGradientBoosting):
#     CSV      10.2 / 51.1 / 204.2 MiB  ->  384 / 809 / 2387 MiB   slope 10.3 bytes per byte
#     Parquet  0.79 / 3.81 / 15.3 MiB   ->  406 / 785 / 2167 MiB   slope 120
#   crops.csv tiled x10/x40 (RandomForest, 200 trees):
#     CSV      1.17 / 4.69 MiB          ->  303 / 345 MiB          slope 12.0
#     Parquet  0.72 / 2.61 MiB          ->  340 / 379 MiB          slope 21
# CSV is steady (the frame, its training copy and the encoded matrix); Parquet depends on how
# well the file compresses (repeated timestamps and categories 14x, noisy floats 1.3x). The
# Parquet factor sits between the two: a file that compresses better than usual may still
# outgrow the limit, and then fails as `out_of_memory`, never in a loop.
JOB_BASE_BYTES = 280 * MiB  # interpreter, pandas, scikit-learn, pyarrow, the Google clients
BYTES_PER_FILE_BYTE = {"csv": 11, "parquet": 50}
# Part of the limit never planned for: the server's own growth and the estimate's error.
HEADROOM_FRACTION = 0.10
WAY_OUT = (
    "Give the trainer more memory (services.trainer.memory in infra/runtime.yaml) or train "
    "it on Vertex AI (training.backend: vertex in the pipeline config)"
)


def job_peak_bytes(file_bytes: int, fmt: str) -> int:
    """The estimated peak memory of a local training job on a dataset file of this size."""
    return JOB_BASE_BYTES + BYTES_PER_FILE_BYTE.get(fmt, BYTES_PER_FILE_BYTE["csv"]) * file_bytes


def size_text(n: int) -> str:
    """Bytes as people read them: '900 MiB', '4.1 GiB', '2 GiB'."""
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n >= unit:
            value = f"{n / unit:.1f}" if n < 10 * unit and n % unit else f"{n / unit:.0f}"
            return f"{value.removesuffix('.0')} {name}"
    return f"{n} bytes"


# --- the cgroup ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CgroupMemory:
    """The memory controller's figures for the cgroup this process is in."""

    version: int
    path: Path  # the cgroup whose limit binds (the process's own when none does)
    limit: int | None  # bytes; None: unlimited
    usage: int  # bytes charged now, page cache included
    inactive_file: int  # page cache in `usage` the kernel reclaims before it kills anyone
    oom_kills: int  # processes of this cgroup killed by the OOM killer so far

    @property
    def in_use(self) -> int:
        """The working set (usage less inactive page cache), as the kubelet and docker count."""
        return max(0, self.usage - self.inactive_file)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return UNLIMITED
    try:
        return int(text)
    except ValueError:
        return None


def _read_keyed(path: Path, key: str) -> int:
    """The value of `key` in a flat keyed file (memory.stat, memory.events, oom_control)."""
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    return 0


def _own_cgroup(proc_cgroup: Path, version: int) -> str:
    """This process's cgroup path in its hierarchy, from /proc/self/cgroup ("/" if unknown)."""
    with contextlib.suppress(OSError):
        for line in proc_cgroup.read_text().splitlines():
            hierarchy, _, rest = line.partition(":")
            controllers, _, path = rest.partition(":")
            if version == 2 and hierarchy == "0" and not controllers:
                return path
            if version == 1 and "memory" in controllers.split(","):
                return path
    return "/"


def _chain(mount: Path, own: str) -> list[Path]:
    """The process's cgroup directory and its ancestors up to the mount point.

    Inside a container the mount often is the container's own cgroup while /proc/self/cgroup
    still names the host's path for it; then the mount point is the process's cgroup.
    """
    leaf = mount / own.strip("/")
    if not own.strip("/") or not leaf.is_dir():
        return [mount]
    dirs = [leaf]
    while dirs[-1] != mount:
        dirs.append(dirs[-1].parent)
    return dirs


def read_cgroup_memory(
    root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP
) -> CgroupMemory | None:
    """The memory figures of this process's cgroup (v2 or v1), or None where there is none.

    The limit is the lowest of the cgroup's and its ancestors' (a container's limit may sit
    one level up); usage is that cgroup's. The OOM kill count is read on the process's own
    cgroup, where the kernel counts a killed job in both versions.
    """
    if (root / "cgroup.controllers").exists():
        version, mount = 2, root
        limit_file, usage_file, inactive_key = "memory.max", "memory.current", "inactive_file"
    elif (root / "memory").is_dir():
        version, mount = 1, root / "memory"
        limit_file, usage_file = "memory.limit_in_bytes", "memory.usage_in_bytes"
        inactive_key = "total_inactive_file"
    else:
        return None
    dirs = _chain(mount, _own_cgroup(proc_cgroup, version))
    if not any((d / usage_file).exists() for d in dirs):
        return None  # no memory controller here (a v2 tree without it enabled)
    binding, limit = dirs[0], None
    for directory in dirs:
        value = _read_int(directory / limit_file)
        if value is not None and value < UNLIMITED and (limit is None or value < limit):
            binding, limit = directory, value
    if version == 2:
        oom_kills = _read_keyed(dirs[0] / "memory.events", "oom_kill")
    else:
        oom_kills = _read_keyed(dirs[0] / "memory.oom_control", "oom_kill")
    return CgroupMemory(
        version=version,
        path=binding,
        limit=limit,
        usage=_read_int(binding / usage_file) or 0,
        inactive_file=_read_keyed(binding / "memory.stat", inactive_key),
        oom_kills=oom_kills,
    )


# --- the budget ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryReading:
    limit: int | None  # None: no limit, nothing is ever refused
    in_use: int
    oom_kills: int | None  # None where the cgroup cannot be read
    source: str  # where the limit comes from, for messages

    @property
    def limit_text(self) -> str:
        return "none" if self.limit is None else f"{size_text(self.limit)} ({self.source})"


class MemoryBudget:
    """What local jobs may use of the trainer's memory limit.

    A dataset whose job cannot fit beside the trainer itself is refused for good; one that
    fits but not beside the jobs already running waits (its delivery is retried) until they
    end. Each started job reserves its estimate until it exits.
    """

    def __init__(
        self,
        limit_override: int = 0,
        root: Path = CGROUP_ROOT,
        proc_cgroup: Path = PROC_SELF_CGROUP,
    ) -> None:
        self.limit_override = limit_override
        self.root = root
        self.proc_cgroup = proc_cgroup
        self._lock = threading.Lock()
        self._reserved: dict[str, int] = {}
        self._idle_in_use: int | None = None  # the trainer alone, read while no job ran

    def reading(self) -> MemoryReading:
        """The limit (the setting's, else the cgroup's) and what the cgroup uses now."""
        cgroup = read_cgroup_memory(self.root, self.proc_cgroup)
        if self.limit_override:
            limit: int | None = self.limit_override
            source = "MLPIPE_MEMORY_LIMIT_BYTES"
        else:
            limit = cgroup.limit if cgroup else None
            source = f"cgroup v{cgroup.version}" if cgroup else "no cgroup"
        return MemoryReading(
            limit=limit,
            in_use=cgroup.in_use if cgroup else 0,
            oom_kills=cgroup.oom_kills if cgroup else None,
            source=source,
        )

    def oom_kills(self) -> int | None:
        return self.reading().oom_kills

    def too_large(self, uri: str, file_bytes: int, fmt: str) -> str | None:
        """Why a local job could never train this dataset here, or None when it can."""
        now = self.reading()
        with self._lock:
            if not self._reserved or self._idle_in_use is None:
                self._idle_in_use = now.in_use
            idle = self._idle_in_use
        if now.limit is None:
            return None
        need = job_peak_bytes(file_bytes, fmt)
        if idle + need <= now.limit * (1 - HEADROOM_FRACTION):
            return None
        return (
            f"dataset {uri} is {size_text(file_bytes)} (about {size_text(need)} in memory to "
            f"train); the trainer's memory limit is {now.limit_text}, of which the trainer "
            f"itself uses {size_text(idle)} and {HEADROOM_FRACTION:.0%} is kept spare. {WAY_OUT}"
        )

    def reserve(self, run_id: str, file_bytes: int, fmt: str) -> str | None:
        """Reserve a starting job's memory; or say why it must wait for running jobs to end.

        With no other job running it always fits: `too_large` vouched for it.
        """
        need = job_peak_bytes(file_bytes, fmt)
        now = self.reading()
        with self._lock:
            others = {k: v for k, v in self._reserved.items() if k != run_id}
            if others and now.limit is not None:
                idle = self._idle_in_use if self._idle_in_use is not None else now.in_use
                committed = max(now.in_use, idle + sum(others.values()))
                if committed + need > now.limit * (1 - HEADROOM_FRACTION):
                    return (
                        f"run {run_id} waits for memory: its job needs about "
                        f"{size_text(need)}, and the trainer with its {len(others)} running "
                        f"local job(s) takes about {size_text(committed)} of its limit of "
                        f"{now.limit_text}"
                    )
            self._reserved[run_id] = need
        return None

    def release(self, run_id: str) -> None:
        with self._lock:
            self._reserved.pop(run_id, None)

    def reserved(self) -> dict[str, int]:
        with self._lock:
            return dict(self._reserved)


def volunteer_for_oom_killer(adj_file: Path = Path("/proc/self/oom_score_adj")) -> None:
    """Be the OOM killer's first choice (the training job calls it first thing): a local job
    shares the container's limit with the trainer server, and one that outgrows it must die
    alone (its run then fails with `out_of_memory`), not take the server and every other job
    down with it. Any process may raise its own score; where it cannot, nothing changes."""
    with contextlib.suppress(OSError):
        adj_file.write_text("1000")


def out_of_memory_message(uri: str, file_bytes: int | None, reading: MemoryReading) -> str:
    size = f" ({size_text(file_bytes)})" if file_bytes else ""
    limit = (
        f"the trainer's memory limit is {reading.limit_text}"
        if reading.limit is not None
        else "the trainer has no memory limit of its own, so the machine ran out"
    )
    return (
        f"the training job for dataset {uri}{size} was killed by the kernel's out-of-memory "
        f"killer: {limit}. {WAY_OUT}"
    )


def object_size(storage: Storage, path: str, generation: int | None) -> int | None:
    """The size of a stored object from its metadata (no download), or None if it is gone."""
    try:
        blob = storage.bucket.get_blob(path, generation=generation or None)
    except gexc.NotFound:
        return None
    return None if blob is None or blob.size is None else int(blob.size)
