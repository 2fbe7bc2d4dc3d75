"""What every pipeline-latency script shares: percentiles, the machine and its load, free ports,
the iris data, and the venvs the peers are installed into."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
IRIS_DIR = REPO / "examples" / "iris"
VENVS = REPO / "bench" / ".venvs"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list; NaN for an empty one."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def p50_p95(values: list[float]) -> tuple[float, float]:
    return percentile(values, 50), percentile(values, 95)


def load() -> tuple[float, float, float]:
    one, five, fifteen = os.getloadavg()
    return round(one, 2), round(five, 2), round(fifteen, 2)


def machine() -> dict[str, Any]:
    cpu = "unknown CPU"
    mem_gib = 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / 1024 / 1024
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def free_base_port(count: int = 7) -> int:
    """A base port with `count` consecutive free ports on 127.0.0.1 (as tests/conftest.py)."""
    from mlpipe_ops.localstack import port_free

    rng = random.Random()
    for _ in range(200):
        # Below Linux's ephemeral range (32768 and up): an outgoing connection never takes
        # a port between the check and the bind.
        base = rng.randrange(20000, 32000)
        if all(port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no run of free ports found")


def iris_rows() -> tuple[list[str], list[list[str]]]:
    with (IRIS_DIR / "iris.csv").open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        return header, [row for row in reader if row]


def shuffled_iris_csv(seed: int) -> str:
    """The iris rows in an order fixed by `seed`: different bytes, so a new object and run."""
    header, rows = iris_rows()
    random.Random(seed).shuffle(rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


@dataclass
class Series:
    """Timings of one pipeline (seconds), with the load average seen at each sample."""

    name: str
    seconds: list[float] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)
    note: str = ""
    error: str = ""

    def add(self, seconds: float) -> None:
        self.seconds.append(seconds)
        self.loads.append(load()[0])

    def summary(self) -> dict[str, Any]:
        p50, p95 = p50_p95(self.seconds)
        return {
            "name": self.name,
            "n": len(self.seconds),
            "p50": p50,
            "p95": p95,
            "min": min(self.seconds) if self.seconds else float("nan"),
            "load_min": min(self.loads) if self.loads else float("nan"),
            "load_max": max(self.loads) if self.loads else float("nan"),
            "seconds": self.seconds,
            "loads": self.loads,
            "note": self.note,
            "error": self.error,
        }


def ensure_venv(name: str, packages: list[str], probe: str) -> Path:
    """bench/.venvs/<name> with `packages`, made with uv (PyPI) unless `probe` imports already.

    The peers never enter the project's lock: each lives in its own venv, on the same
    interpreter as the project so the comparison is like for like. Its modules are compiled
    to bytecode once: this machine sets PYTHONDONTWRITEBYTECODE=1, so without it every task
    process of a peer would compile pandas and scikit-learn from source again.
    """
    venv = VENVS / name
    python = venv / "bin" / "python"
    ready = python.exists() and (
        subprocess.run([str(python), "-c", probe], capture_output=True, timeout=120).returncode == 0
    )
    if not ready:
        VENVS.mkdir(parents=True, exist_ok=True)
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run(
            ["uv", "venv", "-q", "--allow-existing", str(venv), "--python", base], check=True
        )
        subprocess.run(
            ["uv", "pip", "install", "-q", "--python", str(python), *packages], check=True
        )
    marker = venv / ".bytecode-compiled"
    if not ready or not marker.exists():
        site = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        subprocess.run([str(python), "-m", "compileall", "-q", "-j", "0", site], check=False)
        marker.touch()
    return python


def installed_versions(python: Path, dists: list[str]) -> dict[str, str]:
    code = (
        "import json, importlib.metadata as m\n"
        f"print(json.dumps({{d: m.version(d) for d in {dists!r}}}))"
    )
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout))
