"""The local stack's start, measured: `mlpipe up` → ready, phase by phase, and what each service
pays to import.

    uv run --frozen python bench/stack/start.py                      # processes, 5 starts
    uv run --frozen python bench/stack/start.py --parts processes,containers,imports --out s.json
    git archive COMMIT libs/mlpipe-ops | tar -x -C /tmp/before       # then, before and now:
    uv run --frozen python bench/stack/start.py --before /tmp/before/libs/mlpipe-ops/src

Each start runs `python -m mlpipe_ops.cli up` as a user would (its own interpreter, so the
CLI's own import counts), on free ports with one state directory kept across the starts (as a
user's `.mlpipe/` is: `up` after `down`), and stops it with `mlpipe down`. One warm-up start
and stop comes first and is not counted (bytecode compiled, page cache warm, images built).
With `--before`, the older ops code (PYTHONPATH puts it ahead of the installed one; the
services and the library are the current ones) starts in turn with the current code.
A phase's figure is when its line of `mlpipe up`'s output appeared, in seconds since the
command started; `ready` is when the command exited (every service answers /healthz).

`imports`: each service's import (`python -X importtime -c "import mlpipe_<svc>.main"`),
the packages that take longest (each one's import, what it imports first included:
a package pulled in by another is counted inside that one too), and its time to /healthz
started alone against running emulators (its lifespan included), median of `--runs`.
Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))
from common import REPO, free_base_port, load, machine, percentile

from mlpipe.messaging import topology
from mlpipe_ops.localstack import HOST, LocalStack, client_env

SERVICES = topology.TOPOLOGY.services
# A package shorter than this to import is not worth naming.
NOTABLE_SECONDS = 0.05


def package_of(module: str) -> str:
    """The distribution-level package of a module: `google.cloud.storage.blob` →
    `google.cloud.storage`, `sklearn.utils` → `sklearn`."""
    parts = module.split(".")
    if parts[0] == "google":
        return ".".join(parts[: 3 if len(parts) > 2 and parts[1] == "cloud" else 2])
    return parts[0]


def phase_of(line: str) -> str | None:
    """The phase a line of `mlpipe up`'s output reports (None: not one)."""
    words = line.split()
    if not words:
        return None
    first = words[0]
    if first == "pubsub":
        return "pubsub"
    if first in ("topology", "fake-gcs-server", "reconcile", "state", *SERVICES):
        return first
    if first == "image":
        return "images"
    return None


def one_start(
    state_dir: Path, base_port: int, containers: bool, env: dict[str, str]
) -> dict[str, float]:
    cmd = [sys.executable, "-m", "mlpipe_ops.cli", "up", "--state-dir", str(state_dir)]
    cmd += ["--base-port", str(base_port), *(["--containers"] if containers else [])]
    t0 = time.monotonic()
    popen = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert popen.stdout is not None
    marks: dict[str, float] = {}
    output = []
    for line in popen.stdout:
        output.append(line)
        phase = phase_of(line)
        if phase is not None:
            # A phase that prints several lines (images, reconcile) ends at its last.
            marks[phase] = time.monotonic() - t0
    code = popen.wait()
    marks["ready"] = time.monotonic() - t0
    if code != 0:
        raise RuntimeError(f"mlpipe up exited {code}:\n{''.join(output)}")
    return marks


def stop(state_dir: Path, env: dict[str, str]) -> float:
    t0 = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "mlpipe_ops.cli", "down", "--state-dir", str(state_dir)],
        cwd=REPO,
        env=env,
        capture_output=True,
        check=True,
        timeout=300,
    )
    return time.monotonic() - t0


def summary(samples: list[dict[str, float]], downs: list[float]) -> dict[str, Any]:
    phases = sorted(
        {k for s in samples for k in s},
        key=lambda k: percentile([s[k] for s in samples if k in s], 50),
    )
    return {
        "runs": len(samples),
        "p50": {k: round(percentile([s[k] for s in samples if k in s], 50), 2) for k in phases},
        "max": {k: round(max(s[k] for s in samples if k in s), 2) for k in phases},
        "down_p50": round(percentile(downs, 50), 2),
        "samples": samples,
        "load": load(),
    }


def starts(runs: int, containers: bool, before: Path | None) -> dict[str, Any]:
    """`runs` counted starts of the current code, and with `before` as many of the mlpipe-ops
    source tree there, alternating (before, now, before, now...) so that both meet the same
    load on this machine."""
    root = Path(tempfile.mkdtemp(prefix="bench-stack-"))
    variants = {"now": {**os.environ, "PYTHONUNBUFFERED": "1"}}
    if before is not None:
        variants = {
            "before": {**variants["now"], "PYTHONPATH": str(before)},
            **variants,
        }
    base = free_base_port()
    samples: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    downs: dict[str, list[float]] = {k: [] for k in variants}
    try:
        for i in range(runs + 1):
            for label, env in variants.items():
                marks = one_start(root / label, base, containers, env)
                took = stop(root / label, env)
                if i:  # the first start warms caches (and builds images): not counted
                    samples[label].append(marks)
                    downs[label].append(took)
                    shown = ", ".join(f"{k} {v:.2f}" for k, v in marks.items())
                    print(f"  {label} {i}: {shown}", flush=True)
    finally:
        for label, env in variants.items():
            subprocess.run(
                [sys.executable, "-m", "mlpipe_ops.cli", "down", "--state-dir", str(root / label)],
                cwd=REPO,
                env=env,
                capture_output=True,
                timeout=300,
            )
        shutil.rmtree(root, ignore_errors=True)
    return {label: summary(samples[label], downs[label]) for label in variants}


def import_profile(module: str) -> dict[str, Any]:
    """`python -X importtime -c "import <module>"`: the total and the heavy packages' times."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    heavy: dict[str, float] = {}
    total = 0.0
    pattern = re.compile(r"import time:\s+\d+ \|\s+(\d+) \| (\s*)(\S+)")
    for line in done.stderr.splitlines():
        found = pattern.match(line)
        if not found:
            continue
        cumulative, name = int(found[1]) / 1e6, found[3]
        if name == module:
            total = cumulative
        # A package's own line comes after its submodules' and includes them: its largest.
        key = package_of(name)
        heavy[key] = max(heavy.get(key, 0.0), round(cumulative, 2))
    # First-party packages count everything they import: the third-party ones say more.
    heavy = {k: v for k, v in heavy.items() if v >= NOTABLE_SECONDS and not k.startswith("mlpipe")}
    return {
        "import_s": round(total, 2),
        "heavy": dict(sorted(heavy.items(), key=lambda kv: -kv[1])),
    }


def imports(runs: int) -> dict[str, Any]:
    """Each service's import profile and its time to /healthz started alone."""
    root = Path(tempfile.mkdtemp(prefix="bench-imports-"))
    stack = LocalStack(
        root / "stack", base_port=free_base_port(), project="mlpipe-bench", bucket="mlpipe-bench"
    )
    state = stack.up(services=False, progress=lambda _: None)
    found: dict[str, Any] = {}
    try:
        _, own = stack._services()
        cli = [import_profile("mlpipe_ops.cli") for _ in range(runs)]
        found["cli"] = {**cli[0], "import_s": percentile([c["import_s"] for c in cli], 50)}
        for name in SERVICES:
            profiles = [import_profile(f"mlpipe_{name}.main") for _ in range(runs)]
            ready = []
            for _ in range(runs):
                env = {
                    **os.environ,
                    **state.client_env(),
                    **own[name],
                    "PORT": str(state.service_ports[name]),
                    "MLPIPE_JOB_LOG_DIR": str(root / "jobs"),
                }
                ready.append(time_to_healthz(name, state.service_ports[name], env, root))
            found[name] = {
                **profiles[0],
                "import_s": percentile([p["import_s"] for p in profiles], 50),
                "healthz_s": round(percentile(ready, 50), 2),
            }
            print(f"  {name}: {found[name]}")
    finally:
        with client_env(state):
            stack.down(progress=lambda _: None)
        shutil.rmtree(root, ignore_errors=True)
    return found


def time_to_healthz(name: str, port: int, env: dict[str, str], root: Path) -> float:
    log = (root / f"{name}.log").open("ab")
    t0 = time.monotonic()
    popen = subprocess.Popen(
        [sys.executable, "-m", f"mlpipe_{name}"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        while popen.poll() is None:
            try:
                if httpx.get(f"http://{HOST}:{port}/healthz", timeout=1).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"{name} exited; see {log.name}")
    finally:
        popen.terminate()
        popen.wait(timeout=30)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--parts",
        default="processes",
        help="comma-separated: processes (`mlpipe up`), containers (`mlpipe up --containers`, "
        "needs a Docker engine), imports (each service's imports)",
    )
    parser.add_argument(
        "--before",
        type=Path,
        help="an older libs/mlpipe-ops/src to measure in turn with the current one (e.g. "
        "`git archive COMMIT libs/mlpipe-ops | tar -x -C /tmp/before`, then "
        "/tmp/before/libs/mlpipe-ops/src)",
    )
    parser.add_argument("--out", type=Path, help="the figures as JSON, written after each part")
    args = parser.parse_args()
    report: dict[str, Any] = {"machine": machine(), "load_before": load()}
    for part in args.parts.split(","):
        print(f"{part}:", flush=True)
        if part == "imports":
            report[part] = imports(args.runs)
        else:
            report[part] = starts(args.runs, part == "containers", args.before)
            print(json.dumps({k: v["p50"] for k, v in report[part].items()}), flush=True)
        report["load_after"] = load()
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
