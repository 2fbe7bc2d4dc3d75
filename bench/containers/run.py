"""The shipped images, measured: size, cold start, memory, and the chain through them.

    uv run --frozen python bench/containers/run.py            # about 10 min on 2 cores
    uv run --frozen python bench/containers/run.py --runs 5 --starts 5 --out /tmp/c.json

Needs a Docker engine (see README). Every server binds 127.0.0.1 on free ports with its state
under /tmp and is stopped when its part ends. Parts:
1. images: each service's image size, and its size over the base image (the base here may be a
   stand-in built by scripts/base-images; the real python:3.11.7-slim-bookworm is about 130 MB).
2. chain: iris publish → serving (bench/pipeline/chain.py's measurement) through the five
   containers, then through five processes, in the same run: the ratio is containers/processes.
3. cold starts, on the container stack: each service's container is replaced by a new one
   (`docker run`, same limits) `--starts` times; time to the first 200 from /healthz, for the
   predictor also to the first served prediction, and the idle memory 3 s after ready.
4. peak memory of every container while the largest example (bikeshare) runs end to end,
   sampled every 0.1 s from the containers' cgroups (usage less inactive file cache, as
   `docker stats` counts it), against each service's declared limit.
Not a test: nothing is asserted; the goals are reported as met or not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))
from chain import run_chain
from common import REPO, free_base_port, machine, p50_p95

from mlpipe_ops import containers as docker
from mlpipe_ops.localstack import HOST, LocalStack, StackState, client_env
from mlpipe_ops.service_runtime import MIB, load_runtimes

READY_TARGET = 1.5  # seconds, p50, docker run → /healthz
IDLE_TARGET = 256 * MIB
PEAK_SHARE_TARGET = 0.75  # of the declared limit
IMAGE_TARGET = 600e6  # bytes, with the real 130 MB base
REAL_BASE = 130e6


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def cgroup_dir(container_id: str) -> Path | None:
    """The container's memory cgroup on this host (cgroup v1 or v2, cgroupfs or systemd)."""
    for candidate in (
        Path(f"/sys/fs/cgroup/memory/docker/{container_id}"),
        Path(f"/sys/fs/cgroup/docker/{container_id}"),
        Path(f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope"),
    ):
        if candidate.is_dir():
            return candidate
    return None


def memory_in_use(cgroup: Path) -> int:
    """Bytes in use less inactive file cache (what `docker stats` shows)."""
    stat = dict(
        (k, int(v))
        for k, v in (line.split() for line in (cgroup / "memory.stat").read_text().splitlines())
    )
    if (cgroup / "memory.usage_in_bytes").exists():  # v1
        return int((cgroup / "memory.usage_in_bytes").read_text()) - stat.get(
            "total_inactive_file", 0
        )
    return int((cgroup / "memory.current").read_text()) - stat.get("inactive_file", 0)


def image_sizes() -> dict[str, Any]:
    base = int(docker.docker("image", "inspect", "-f", "{{.Size}}", docker.BASE_IMAGES[0]).stdout)
    sizes = {}
    for service in load_runtimes():
        image = docker.IMAGE.format(service=service)
        size = int(docker.docker("image", "inspect", "-f", "{{.Size}}", image).stdout)
        sizes[service] = {"bytes": size, "over_base": size - base}
    return {"base_bytes": base, "images": sizes}


def cold_starts(state: StackState, starts: int) -> dict[str, Any]:
    runtimes = load_runtimes()
    out: dict[str, Any] = {}
    for container in state.containers:
        info = container.inspect()
        assert info is not None, container.name
        env = dict(item.split("=", 1) for item in info["Config"]["Env"])
        ready, first_prediction, idle = [], [], []
        for _ in range(starts):
            docker.docker("rm", "--force", container.name)
            t0 = time.monotonic()
            docker.run(container, runtimes[container.service], env, {})
            url = f"http://{HOST}:{container.port}"
            while True:
                try:
                    if httpx.get(f"{url}/healthz", timeout=0.5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.01)
            ready.append(time.monotonic() - t0)
            if container.service == "predictor":
                while True:
                    reply = httpx.post(
                        f"{url}/predict",
                        json={"instances": [[5.1, 3.5, 1.4, 0.2]], "model": "iris-classifier"},
                        timeout=5,
                    )
                    if reply.status_code == 200:
                        break
                    time.sleep(0.01)
                first_prediction.append(time.monotonic() - t0)
            time.sleep(3)
            found = container.inspect()
            cgroup = cgroup_dir(found["Id"]) if found else None
            if cgroup is not None:
                idle.append(memory_in_use(cgroup))
        p50, p95 = p50_p95(ready)
        out[container.service] = {
            "ready_seconds": ready,
            "ready_p50": p50,
            "ready_p95": p95,
            "idle_bytes": max(idle) if idle else None,
            "first_prediction_seconds": first_prediction or None,
        }
    return out


class PeakSampler(threading.Thread):
    def __init__(self, state: StackState, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.cgroups = {}
        for c in state.containers:
            info = c.inspect()
            cgroup = cgroup_dir(info["Id"]) if info else None
            if cgroup is not None:
                self.cgroups[c.service] = cgroup
        self.peak = dict.fromkeys(self.cgroups, 0)
        self.interval = interval
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            for service, cgroup in self.cgroups.items():
                # A restarting container has a new cgroup: skip the sample.
                with contextlib.suppress(OSError, ValueError):
                    self.peak[service] = max(self.peak[service], memory_in_use(cgroup))
            self.halt.wait(self.interval)


def peak_during_example(state: StackState, example: str) -> dict[str, Any]:
    sampler = PeakSampler(state)
    sampler.start()
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "mlpipe_ops.cli", "run", "--example", example, "--timeout", "300"],
        cwd=REPO,
        env={**os.environ, "MLPIPE_STATE_DIR": state.state_dir},
        capture_output=True,
        text=True,
        timeout=400,
    )
    seconds = time.monotonic() - t0
    sampler.halt.set()
    sampler.join()
    return {
        "example": example,
        "ok": done.returncode == 0,
        "seconds": seconds,
        "peak_bytes": sampler.peak,
        "output_tail": done.stdout.splitlines()[-3:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=8, help="iris chain runs per stack kind")
    parser.add_argument("--starts", type=int, default=5, help="cold starts per service")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    docker.check_engine()
    result: dict[str, Any] = {"machine": machine(), "load_at_start": os.getloadavg()}

    tmp = Path(tempfile.mkdtemp(prefix="mlpipe-bench-containers-"))
    print("chain through containers (builds the images first)")
    t0 = time.monotonic()
    result["chain_containers"] = run_chain(
        args.runs, 180.0, tmp / "chain-containers", profile=False, containers=True
    )
    result["build_and_start_seconds"] = time.monotonic() - t0
    print("chain through processes")
    result["chain_processes"] = run_chain(args.runs, 180.0, tmp / "chain-processes", profile=False)
    result["sizes"] = image_sizes()

    print("cold starts and peak memory on a container stack")
    stack = LocalStack(
        tmp / "stack",
        base_port=free_base_port(),
        project="bench-c",
        bucket="bench-c",
        containers=True,
    )
    state = stack.up(progress=lambda line: print(f"  {line}"), timeout=180)
    try:
        with client_env(state):
            result["peak"] = peak_during_example(state, "bikeshare")
            iris = subprocess.run(
                [sys.executable, "-m", "mlpipe_ops.cli", "run", "--example", "iris"],
                cwd=REPO,
                env={**os.environ, "MLPIPE_STATE_DIR": state.state_dir},
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert iris.returncode == 0, iris.stdout + iris.stderr
            result["cold"] = cold_starts(state, args.starts)
    finally:
        stack.down(progress=lambda _: None)
    result["load_at_end"] = os.getloadavg()
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print_result(result)


def print_result(result: dict[str, Any]) -> None:
    runtimes = load_runtimes()
    sizes = result["sizes"]
    nan = float("nan")
    print("\n" + "=" * 100)
    print(f"machine: {result['machine']['cores']} cores, {result['machine']['cpu']}")
    print(
        f"base image {sizes['base_bytes'] / 1e6:.0f} MB here (the real python:3.11.7-slim-"
        f"bookworm is about {REAL_BASE / 1e6:.0f} MB)"
    )
    print(
        f"{'service':<10} {'image MB':>9} {'over base':>9} {'w/ real base':>12} "
        f"{'ready p50 s':>11} {'p95':>6} {'idle MiB':>9} {'peak MiB':>9} {'limit':>6} "
        f"{'peak/limit':>10}"
    )
    for service, runtime in runtimes.items():
        s = sizes["images"][service]
        cold = result["cold"].get(service, {})
        idle = cold.get("idle_bytes") or 0
        peak = result["peak"]["peak_bytes"].get(service, 0)
        print(
            f"{service:<10} {s['bytes'] / 1e6:>9.0f} {s['over_base'] / 1e6:>9.0f} "
            f"{(s['over_base'] + REAL_BASE) / 1e6:>12.0f} "
            f"{cold.get('ready_p50', nan):>11.2f} {cold.get('ready_p95', nan):>6.2f} "
            f"{idle / MIB:>9.0f} {peak / MIB:>9.0f} "
            f"{runtime.memory:>6} {peak / runtime.memory_bytes:>10.0%}"
        )
    first = result["cold"].get("predictor", {}).get("first_prediction_seconds") or []
    if first:
        print(f"predictor: docker run → first served prediction p50 {p50_p95(first)[0]:.2f} s")
    cont = result["chain_containers"]["summary"]["steady"]
    proc = result["chain_processes"]["summary"]["steady"]
    print(
        f"iris publish → serving, steady p50: containers {cont['p50']:.3f} s, processes "
        f"{proc['p50']:.3f} s (n {cont['n']}/{proc['n']}): ratio {cont['p50'] / proc['p50']:.2f}"
    )
    print(
        f"stack start: containers {result['chain_containers']['stack_startup_seconds']:.1f} s "
        f"(images built, cached), processes "
        f"{result['chain_processes']['stack_startup_seconds']:.1f} s"
    )
    peak = result["peak"]
    print(
        f"peak memory example: {peak['example']} ({'ok' if peak['ok'] else 'FAILED'}, "
        f"{peak['seconds']:.1f} s)"
    )
    print("goals:")
    for service, runtime in runtimes.items():
        cold = result["cold"].get(service, {})
        size = sizes["images"][service]["over_base"] + REAL_BASE
        peak_share = peak["peak_bytes"].get(service, 0) / runtime.memory_bytes
        ready = cold.get("ready_p50", 99) <= READY_TARGET
        print(
            f"  {service:<10} ready ≤ {READY_TARGET} s p50: {_met(ready)}; "
            f"idle ≤ 256 MiB: {_met((cold.get('idle_bytes') or 1e12) <= IDLE_TARGET)}; "
            f"peak ≤ 75 % of limit: {_met(peak_share <= PEAK_SHARE_TARGET)}; "
            f"image ≤ 600 MB with the real base: {_met(size <= IMAGE_TARGET)}"
        )


if __name__ == "__main__":
    main()
