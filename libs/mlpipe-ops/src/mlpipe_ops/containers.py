"""The pipeline's services as their shipped images, run on the local Docker engine under Cloud Run's
container contract (`mlpipe up --containers`).

What each container gets, and the Cloud Run rule it stands for:
- the image built from services/Dockerfile with `SERVICE=<name>`, exactly what Cloud Build
  pushes (its own locked dependencies, non-root user 10001);
- `PORT`, `K_SERVICE`, `K_REVISION`, `K_CONFIGURATION` (container-contract, "Environment
  variables");
- the memory and CPU limits of infra/runtime.yaml, with no swap (configuring/memory-limits:
  "instances that exceed their allowed memory limit are terminated");
- a read-only root with /tmp in memory, sized to the memory limit, so what is written there
  counts against it (container-contract, "Filesystem access": the filesystem is in memory);
- SIGTERM on stop, SIGKILL 10 s later (container-contract, "Instance shutdown");
- a restart when the process dies (Cloud Run replaces a crashed instance).
Every container shares the host's network and binds 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlpipe_ops.service_runtime import ServiceRuntime

# Cloud Run: SIGTERM, then SIGKILL after 10 seconds (container-contract, "Instance shutdown").
STOP_GRACE_SECONDS = 10
# The tag of the images a local stack builds and runs; MLPIPE_IMAGE_TAG keeps the images of two
# checkouts apart on one engine.
IMAGE = "mlpipe-{service}:" + (os.environ.get("MLPIPE_IMAGE_TAG") or "local")
# ...and the names of their containers, where two checkouts run stacks on one engine.
NAME_SUFFIX = f"-{os.environ['MLPIPE_IMAGE_TAG']}" if os.environ.get("MLPIPE_IMAGE_TAG") else ""
USER = "10001:10001"  # services/Dockerfile's user
BASE_IMAGES = ("python:3.11.7-slim-bookworm", "ghcr.io/astral-sh/uv:0.13.9")
# The batch job's image (jobs/batch/Dockerfile) and what it is built from besides those: Beam's
# SDK image, and Dataflow's Python template launcher, whose release a build names (Cloud Build:
# _LAUNCHER_IMAGE, pinned; a local build: this name, scripts/base-images --batch's stand-in
# where it cannot be pulled).
BATCH_IMAGE = "mlpipe-batch:" + (os.environ.get("MLPIPE_IMAGE_TAG") or "local")
BATCH_BASE_IMAGES = (
    "apache/beam_python3.11_sdk:2.77.0",
    "gcr.io/dataflow-templates-base/python311-template-launcher-base:latest",
)
# Each container of a local stack carries its state directory under this label.
STATE_LABEL = "dev.mlpipe.state-dir"


class DockerError(RuntimeError):
    """The Docker engine is missing, refused a request, or a container failed; says what to do."""


def docker(
    *args: str, timeout: float = 60.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(
            ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise DockerError(
            "the docker command is not installed (Debian: apt-get install docker.io)"
        ) from None
    except subprocess.TimeoutExpired:
        raise DockerError(
            f"`docker {' '.join(args[:2])}` did not answer in {timeout:.0f}s"
        ) from None
    if check and done.returncode != 0:
        raise DockerError(f"`docker {' '.join(args[:2])}` failed: {done.stderr.strip()[-800:]}")
    return done


def check_engine() -> None:
    """Raise unless a Docker engine answers."""
    done = docker("info", "--format", "{{.ServerVersion}}", timeout=20, check=False)
    if done.returncode != 0:
        raise DockerError(
            "no Docker engine answers (`docker info` failed). Start one, for example "
            "`dockerd --bridge=none --iptables=false --ip-masq=false &` (the stack uses host "
            "networking on 127.0.0.1 only), then run this again. "
            f"docker said: {done.stderr.strip()[-300:]}"
        )


def ensure_base_images(root: Path, progress: Callable[[str], None], batch: bool = False) -> None:
    """Pull the Dockerfile's base images (with `batch`, the batch job's too), or build
    stand-ins when they cannot be pulled."""
    wanted = (*BASE_IMAGES, *(BATCH_BASE_IMAGES if batch else ()))
    missing = [i for i in wanted if docker("image", "inspect", i, check=False).returncode]
    if not missing:
        return
    progress(f"base images      {', '.join(missing)} missing: scripts/base-images")
    done = subprocess.run(
        [str(root / "scripts" / "base-images"), *(["--batch"] if batch else [])],
        capture_output=True,
        text=True,
        timeout=900,
    )
    for line in done.stderr.splitlines():
        if line.startswith("base-images:"):
            progress(f"                 {line.removeprefix('base-images: ')}")
    if done.returncode != 0:
        raise DockerError(f"scripts/base-images failed:\n{done.stderr.strip()[-1500:]}")


def build(service: str, root: Path, code_version: str) -> tuple[str, float]:
    """Build `service`'s image from services/Dockerfile; return its tag and seconds taken."""
    image = IMAGE.format(service=service)
    args = {"SERVICE": service, "MLPIPE_CODE_VERSION": code_version}
    return image, _build(root / "services" / "Dockerfile", args, image, root)


def build_batch(root: Path) -> tuple[str, float]:
    """Build the batch job's image from jobs/batch/Dockerfile as jobs/batch/cloudbuild.yaml
    does (the launcher release, the image's own name for its workers); return its tag and
    seconds taken."""
    args = {"LAUNCHER_IMAGE": BATCH_BASE_IMAGES[1], "IMAGE": BATCH_IMAGE}
    return BATCH_IMAGE, _build(root / "jobs" / "batch" / "Dockerfile", args, BATCH_IMAGE, root)


def _build(dockerfile: Path, args: Mapping[str, str], image: str, root: Path) -> float:
    t0 = time.monotonic()
    flags = [f for name, value in args.items() for f in ("--build-arg", f"{name}={value}")]
    done = subprocess.run(
        [
            "docker",
            "build",
            "--network",
            "host",
            "-f",
            str(dockerfile),
            *flags,
            "-t",
            image,
            str(root),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-25:])
        raise DockerError(f"building {image} failed:\n{tail}")
    return time.monotonic() - t0


def build_all(
    services: Sequence[str], root: Path, code_version: str
) -> Iterator[tuple[str, float]]:
    """Build every service's image at once (each `docker build` mostly waits on the engine's
    cache checks and context upload); yield (tag, seconds) as each finishes."""
    with ThreadPoolExecutor(max_workers=len(services) or 1) as pool:
        futures = [pool.submit(build, s, root, code_version) for s in services]
        for future in as_completed(futures):
            yield future.result()


@dataclass
class Container:
    """One service's container in a local stack (what `stack.json` records)."""

    name: str
    service: str
    port: int
    image: str
    log: str  # where its output is kept once the container is removed

    def inspect(self) -> dict[str, Any] | None:
        done = docker("inspect", self.name, check=False, timeout=20)
        if done.returncode != 0:
            return None
        found: list[dict[str, Any]] = json.loads(done.stdout)
        return found[0] if found else None

    def state(self) -> dict[str, Any]:
        """Docker's State of the container ({} when it does not exist)."""
        info = self.inspect()
        return {**info["State"], "RestartCount": info["RestartCount"]} if info else {}

    def alive(self) -> bool:
        """Running or being restarted: Cloud Run would still have the service."""
        state = self.state()
        return bool(state) and (state.get("Running") or state.get("Restarting")) is True

    def logs(self, tail: int | None = None) -> str:
        args = ["logs", *(["--tail", str(tail)] if tail else []), self.name]
        done = docker(*args, check=False, timeout=30)
        return (done.stdout + done.stderr).strip()

    def describe(self) -> str:
        """One line: running/restarting/exited, restarts, and memory in use."""
        state = self.state()
        if not state:
            return "gone"
        word = str(state.get("Status", "?"))
        restarts = int(state.get("RestartCount", 0))
        extra = f", restarted {restarts}x" if restarts else ""
        if not state.get("Running"):
            extra += f", last exit code {state.get('ExitCode')}"
        if state.get("OOMKilled"):
            extra += ", killed for memory (OOM)"
        return f"{word}{extra}"


def run(
    container: Container,
    runtime: ServiceRuntime,
    env: Mapping[str, str],
    labels: Mapping[str, str],
    mounts: Mapping[str, str] | None = None,
) -> None:
    """Start `container` under its runtime definition (see the module docstring); `mounts`:
    host directory → container path, written by the container (the local stack's spans)."""
    memory = str(runtime.memory_bytes)
    args = [
        "run",
        "--detach",
        "--name",
        container.name,
        "--network",
        "host",
        "--user",
        USER,
        "--memory",
        memory,
        "--memory-swap",
        memory,
        "--cpus",
        f"{runtime.cpu:g}",
        "--read-only",
        "--tmpfs",
        f"/tmp:rw,nosuid,nodev,mode=1777,size={memory}",
        "--stop-signal",
        "SIGTERM",
        "--stop-timeout",
        str(STOP_GRACE_SECONDS),
        "--restart",
        "unless-stopped",
    ]
    for key, value in labels.items():
        args += ["--label", f"{key}={value}"]
    for key, value in env.items():
        args += ["--env", f"{key}={value}"]
    for host, inside in (mounts or {}).items():
        args += ["--volume", f"{host}:{inside}:rw"]
    docker(*args, container.image, timeout=60)


# Where a container writes its spans: the stack's traces directory, mounted.
TRACES_MOUNT = "/var/mlpipe/traces"


def cloud_run_env(service: str, port: int, code_version: str) -> dict[str, str]:
    """The variables Cloud Run sets in every instance (container-contract)."""
    name = f"mlpipe-{service}"
    return {
        "PORT": str(port),
        "K_SERVICE": name,
        "K_CONFIGURATION": name,
        "K_REVISION": f"{name}-{code_version.replace('-dirty', '')[:12] or 'local'}",
    }


def labelled(label: str, value: str) -> list[str]:
    """Names of the containers, running or not, whose `label` is `value` ([] without an
    engine: then none runs)."""
    try:
        done = docker(
            "ps",
            "--all",
            "--filter",
            f"label={label}={value}",
            "--format",
            "{{.Names}}",
            timeout=20,
            check=False,
        )
    except DockerError:
        return []
    return done.stdout.split() if done.returncode == 0 else []


def stop(containers: list[Container], progress: Callable[[str], None]) -> None:
    """Stop (SIGTERM, SIGKILL after the grace) and remove each container, keeping its logs."""
    present = [c for c in containers if c.inspect() is not None]
    if not present:
        return
    # One `docker stop` for all: they get SIGTERM together, as a whole stack going down.
    docker(
        "stop",
        "--time",
        str(STOP_GRACE_SECONDS),
        *[c.name for c in present],
        check=False,
        timeout=STOP_GRACE_SECONDS + 60,
    )
    for c in present:
        with contextlib.suppress(OSError):
            Path(c.log).write_text(c.logs() + "\n")
        docker("rm", "--force", c.name, check=False, timeout=60)
        progress(f"stopped {c.service} (container {c.name}; its log kept in {c.log})")
