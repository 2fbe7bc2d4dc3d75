"""The trainer's memory limit: cgroup v1 and v2 readers on fake trees, the job's estimate and
the refusal message, reservations of running jobs, and how a job killed by the OOM killer is
told from one that crashed."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mlpipe.messaging import events
from mlpipe.ml.config import parse_config
from mlpipe.v1 import events_pb2
from mlpipe_trainer.launcher import JobExit, LocalJobLauncher, killed_by_oom
from mlpipe_trainer.memory import (
    JOB_BASE_BYTES,
    GiB,
    MemoryBudget,
    MiB,
    job_peak_bytes,
    read_cgroup_memory,
    size_text,
    volunteer_for_oom_killer,
)

V1_NO_LIMIT = "9223372036854771712"
IRIS = parse_config(
    (Path(__file__).resolve().parents[2] / "examples/iris/pipeline.yaml").read_text()
)
URI = "gs://acme-ml-data/datasets/big/dt=2026-11-23/x.csv"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def v2_tree(
    root: Path,
    own: str = "/",
    *,
    limit: str = "max",
    current: int = 300 * MiB,
    inactive_file: int = 0,
    oom_kills: int = 0,
) -> Path:
    """A cgroup v2 mount at `root`; the process's cgroup `own` gets the figures given."""
    write(root / "cgroup.controllers", "cpuset cpu io memory pids\n")
    leaf = root / own.strip("/")
    write(leaf / "memory.max", f"{limit}\n")
    write(leaf / "memory.current", f"{current}\n")
    write(leaf / "memory.stat", f"anon 1000\nfile 2000\ninactive_file {inactive_file}\n")
    write(
        leaf / "memory.events",
        f"low 0\nhigh 0\nmax 7\noom 2\noom_kill {oom_kills}\noom_group_kill 0\n",
    )
    write(root.parent / "proc-self-cgroup", f"0::{own}\n")
    return root.parent / "proc-self-cgroup"


def v1_tree(
    root: Path,
    own: str = "/",
    *,
    limit: str = V1_NO_LIMIT,
    usage: int = 300 * MiB,
    inactive_file: int = 0,
    oom_kills: int = 0,
    proc_path: str | None = None,
) -> Path:
    """A cgroup v1 hierarchy at `root` (memory controller at root/memory)."""
    (root / "cpu").mkdir(parents=True, exist_ok=True)
    leaf = root / "memory" / own.strip("/")
    write(leaf / "memory.limit_in_bytes", f"{limit}\n")
    write(leaf / "memory.usage_in_bytes", f"{usage}\n")
    write(
        leaf / "memory.stat",
        f"cache 0\nrss 0\ninactive_file 1\ntotal_inactive_file {inactive_file}\n",
    )
    write(leaf / "memory.oom_control", f"oom_kill_disable 0\nunder_oom 0\noom_kill {oom_kills}\n")
    write(
        root.parent / "proc-self-cgroup",
        f"12:pids:/x\n4:memory:{proc_path or own}\n2:cpu,cpuacct:/x\n0::/\n",
    )
    return root.parent / "proc-self-cgroup"


# --- cgroup v2 --------------------------------------------------------------------------


def test_v2_limit_working_set_and_oom_kills(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    proc = v2_tree(
        root, limit=str(2 * GiB), current=700 * MiB, inactive_file=200 * MiB, oom_kills=3
    )

    found = read_cgroup_memory(root, proc)

    assert found is not None
    assert (found.version, found.limit, found.oom_kills) == (2, 2 * GiB, 3)
    assert found.in_use == 500 * MiB  # the inactive page cache is reclaimed before any kill


def test_v2_max_means_no_limit(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    proc = v2_tree(root, limit="max")

    found = read_cgroup_memory(root, proc)

    assert found is not None and found.limit is None


def test_v2_limit_of_a_parent_binds_and_oom_kills_are_read_on_the_own_cgroup(
    tmp_path: Path,
) -> None:
    root = tmp_path / "cgroup"
    proc = v2_tree(root, "/pod/trainer", limit="max", oom_kills=1)
    write(root / "pod/memory.max", f"{GiB}\n")
    write(root / "pod/memory.current", f"{600 * MiB}\n")
    write(root / "pod/memory.events", "oom_kill 9\n")

    found = read_cgroup_memory(root, proc)

    assert found is not None
    assert found.limit == GiB and found.path == root / "pod"
    assert found.usage == 600 * MiB
    assert found.oom_kills == 1


def test_v2_namespaced_mount_is_the_process_cgroup(tmp_path: Path) -> None:
    # In a container the mount is its own cgroup, while /proc/self/cgroup may name the host's
    # path for it.
    root = tmp_path / "cgroup"
    proc = v2_tree(root, limit=str(512 * MiB))
    write(proc, "0::/system.slice/docker-abc.scope\n")

    found = read_cgroup_memory(root, proc)

    assert found is not None and found.limit == 512 * MiB and found.path == root


def test_v2_without_the_memory_controller_is_no_cgroup(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "cgroup.controllers", "cpu pids\n")
    write(tmp_path / "proc-self-cgroup", "0::/\n")

    assert read_cgroup_memory(root, tmp_path / "proc-self-cgroup") is None


def test_no_cgroup_at_all(tmp_path: Path) -> None:
    assert read_cgroup_memory(tmp_path / "absent", tmp_path / "absent-proc") is None


# --- cgroup v1 --------------------------------------------------------------------------


def test_v1_limit_working_set_and_oom_kills(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    proc = v1_tree(
        root,
        limit=str(2 * GiB),
        usage=900 * MiB,
        inactive_file=100 * MiB,
        oom_kills=2,
        proc_path="/docker/0123abcd",  # not under the mount: the mount is the container's
    )

    found = read_cgroup_memory(root, proc)

    assert found is not None
    assert (found.version, found.limit, found.oom_kills) == (1, 2 * GiB, 2)
    assert found.in_use == 800 * MiB  # total_inactive_file, not the cgroup's own line


def test_v1_huge_limit_means_no_limit(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    proc = v1_tree(root, limit=V1_NO_LIMIT)

    found = read_cgroup_memory(root, proc)

    assert found is not None and found.limit is None


def test_v1_nested_cgroup_under_a_limited_parent(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    proc = v1_tree(root, "/process_api/job", limit=V1_NO_LIMIT, oom_kills=4)
    write(root / "memory/process_api/memory.limit_in_bytes", f"{768 * MiB}\n")
    write(root / "memory/process_api/memory.usage_in_bytes", f"{100 * MiB}\n")
    write(root / "memory/memory.limit_in_bytes", f"{V1_NO_LIMIT}\n")

    found = read_cgroup_memory(root, proc)

    assert found is not None
    assert found.limit == 768 * MiB and found.usage == 100 * MiB and found.oom_kills == 4


# --- the estimate and the refusal ---------------------------------------------------------


def test_estimate_grows_with_the_file_and_parquet_counts_more_per_byte() -> None:
    assert job_peak_bytes(0, "csv") == JOB_BASE_BYTES
    assert job_peak_bytes(100 * MiB, "csv") == JOB_BASE_BYTES + 11 * 100 * MiB
    assert job_peak_bytes(10 * MiB, "parquet") > job_peak_bytes(10 * MiB, "csv")


@pytest.mark.parametrize(
    ("n", "text"),
    [(900 * MiB, "900 MiB"), (2 * GiB, "2 GiB"), (int(4.1 * GiB), "4.1 GiB"), (1536, "1.5 KiB")],
)
def test_sizes_read_as_people_write_them(n: int, text: str) -> None:
    assert size_text(n) == text


def test_a_dataset_too_large_for_the_limit_is_refused_naming_the_limit_and_the_way_out(
    tmp_path: Path,
) -> None:
    root = tmp_path / "cgroup"
    budget = MemoryBudget(root=root, proc_cgroup=v2_tree(root, limit=str(2 * GiB)))

    problem = budget.too_large(URI, 900 * MiB, "csv")

    assert problem is not None
    assert problem.startswith(f"dataset {URI} is 900 MiB (about 9.9 GiB in memory to train)")
    assert "the trainer's memory limit is 2 GiB (cgroup v2)" in problem
    assert "the trainer itself uses 300 MiB" in problem
    assert "services.trainer.memory in infra/runtime.yaml" in problem
    assert "training.backend: vertex" in problem


def test_a_dataset_that_fits_beside_the_trainer_is_not_refused(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    budget = MemoryBudget(root=root, proc_cgroup=v2_tree(root, limit=str(2 * GiB)))

    # 300 MiB in use + 280 MiB + 11 x 100 MiB = 1680 MiB, under 90% of 2 GiB.
    assert budget.too_large(URI, 100 * MiB, "csv") is None
    assert budget.too_large(URI, 120 * MiB, "csv") is not None  # 1900 MiB: over it


def test_no_limit_never_refuses(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    budget = MemoryBudget(root=root, proc_cgroup=v1_tree(root, limit=V1_NO_LIMIT))

    assert budget.too_large(URI, 1 << 40, "parquet") is None
    assert (
        MemoryBudget(root=tmp_path / "none", proc_cgroup=tmp_path / "none").reading().limit is None
    )


def test_the_setting_overrides_the_cgroup_limit(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    budget = MemoryBudget(512 * MiB, root=root, proc_cgroup=v1_tree(root, limit=V1_NO_LIMIT))

    problem = budget.too_large(URI, 40 * MiB, "csv")

    assert problem is not None and "512 MiB (MLPIPE_MEMORY_LIMIT_BYTES)" in problem


def test_a_job_that_fits_alone_waits_for_running_jobs_instead_of_failing(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    budget = MemoryBudget(root=root, proc_cgroup=v2_tree(root, limit=str(2 * GiB)))
    assert budget.too_large(URI, 60 * MiB, "csv") is None  # 300 + 280 + 660 MiB: fits alone

    first = budget.reserve("run-1", 60 * MiB, "csv")
    second = budget.reserve("run-2", 60 * MiB, "csv")  # 300 + 2 x 940 MiB: not beside it
    budget.release("run-1")
    again = budget.reserve("run-2", 60 * MiB, "csv")

    assert first is None
    assert second is not None and "run run-2 waits for memory" in second
    assert "the trainer with its 1 running local job(s) takes about 1.2 GiB" in second
    assert again is None and set(budget.reserved()) == {"run-2"}
    # A refusal for good is judged on the trainer alone, not on the jobs it runs now.
    assert budget.too_large(URI, 60 * MiB, "csv") is None


def test_alone_a_job_always_starts_once_it_was_not_refused(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    proc = v2_tree(root, limit=str(2 * GiB))
    budget = MemoryBudget(root=root, proc_cgroup=proc)
    assert budget.too_large(URI, 100 * MiB, "csv") is None
    write(root / "memory.current", f"{500 * MiB}\n")  # the server grew meanwhile

    assert budget.reserve("run-1", 100 * MiB, "csv") is None


# --- out of memory ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "before", "after", "oom"),
    [
        (-9, 0, 1, True),
        (-9, 1, 1, False),  # SIGKILL from someone else
        (1, 0, 1, False),  # another process was the victim; this one crashed
        (-9, None, 1, False),  # the counter could not be read
        (-15, 0, 1, False),
    ],
)
def test_killed_by_oom(code: int, before: int | None, after: int | None, oom: bool) -> None:
    assert killed_by_oom(code, before, after) is oom


def fake_job(tmp_path: Path, events_file: Path, bump: bool) -> Path:
    """An executable the launcher runs in place of python: it counts an OOM kill in the fake
    cgroup (as the kernel would) when `bump`, then SIGKILLs itself."""
    script = tmp_path / ("oom-job" if bump else "killed-job")
    bump_line = f"echo 'oom_kill 1' > {events_file}\n" if bump else ""
    script.write_text(f"#!/bin/sh\n{bump_line}kill -KILL $$\n")
    script.chmod(0o755)
    return script


def started_event(run_id: str) -> events_pb2.TrainingStarted:
    return events_pb2.TrainingStarted(
        context=events.context(producer="test", code_version="test", run_id=run_id),
        dataset=events_pb2.DatasetRef(uri=URI, generation=1, format="csv"),
        backend="local",
    )


@pytest.mark.parametrize("bump", [True, False])
def test_the_launcher_tells_an_oom_kill_from_another_sigkill(tmp_path: Path, bump: bool) -> None:
    root = tmp_path / "cgroup"
    budget = MemoryBudget(root=root, proc_cgroup=v2_tree(root, limit=str(GiB)))
    ended: list[JobExit] = []
    done = threading.Event()

    def on_crash(started: events_pb2.TrainingStarted, end: JobExit) -> None:
        ended.append(end)
        done.set()

    launcher = LocalJobLauncher(
        tmp_path / "logs",
        on_crash,
        runner="subprocess",
        python=str(fake_job(tmp_path, root / "memory.events", bump)),
        memory=budget,
    )
    assert budget.reserve("run-oom", MiB, "csv") is None

    launcher.launch(started_event("run-oom"), IRIS)

    assert done.wait(10)
    assert ended[0].code == -9 and not ended[0].stopping
    assert ended[0].out_of_memory is bump
    assert budget.reserved() == {}  # the job's reservation ends with it


def test_the_job_volunteers_for_the_oom_killer(tmp_path: Path) -> None:
    adj = tmp_path / "oom_score_adj"
    adj.write_text("0")

    volunteer_for_oom_killer(adj)

    assert adj.read_text() == "1000"


@pytest.mark.skipif(not os.path.exists("/proc/self/oom_score_adj"), reason="needs Linux /proc")
def test_an_unprivileged_process_may_raise_its_own_oom_score() -> None:
    # As an ordinary user (the containers run as one): root drops to nobody first, which
    # clears its capabilities; the change of user also makes /proc/self root's until the
    # process says it is dumpable again, as one started as that user is.
    code = (
        "import ctypes, os\n"
        "from mlpipe_trainer.memory import volunteer_for_oom_killer\n"
        "if os.getuid() == 0:\n"
        "    os.setgid(65534); os.setuid(65534)\n"
        "    ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE\n"
        "volunteer_for_oom_killer()\n"
        "print(os.getuid(), open('/proc/self/oom_score_adj').read())\n"
    )

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    uid, adj = out.stdout.split()
    assert uid != "0" and adj == "1000"
