"""Where the Vertex AI stand-in runs containers: the local Docker engine, host networking.

A deployed model's container and a CustomJob's worker each run as one container named
`vertex-<stand-in id>-<deployed model id>` or `vertex-<stand-in id>-job-<job id>` and labelled
with the stand-in's id, so the stand-in removes exactly the containers it started. The
container gets only the environment the request asked for plus what Vertex AI sets; nothing
from the caller's shell.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import httpx

from mlpipe_ops import containers as docker
from mlpipe_ops.localstack import port_free

LABEL = "dev.mlpipe.vertex-standin"
HOST = "127.0.0.1"
LOG_TAIL_LINES = 20
_VARIABLE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(value: str, known: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion, as ModelContainerSpec.command/args/env document it: a
    known variable is replaced, an unknown reference stays as written, `$$` escapes a `$`."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return known.get(name, match.group(0))

    return _VARIABLE.sub(replace, value)


def expand_env(entries: Sequence[Mapping[str, str]], base: Mapping[str, str]) -> dict[str, str]:
    """A container's `env` list, each entry expanded against `base` and the entries before it."""
    env: dict[str, str] = {}
    for entry in entries:
        name = str(entry.get("name", ""))
        if name:
            env[name] = expand(str(entry.get("value", "")), {**base, **env})
    return env


class PortPool:
    """Free ports on 127.0.0.1 for AIP_HTTP_PORT, never handed out twice by one stand-in."""

    def __init__(self) -> None:
        self._taken: set[int] = set()
        self._lock = threading.Lock()
        self._random = random.Random()

    def take(self) -> int:
        with self._lock:
            for _ in range(500):
                # Below Linux's ephemeral range (32768 and up), so no outgoing connection takes
                # the port between this check and the container's bind.
                port = self._random.randrange(20000, 32000)
                if port not in self._taken and port_free(port):
                    self._taken.add(port)
                    return port
        raise docker.DockerError("no free port found for a container")

    def give_back(self, port: int) -> None:
        with self._lock:
            self._taken.discard(port)


@dataclass(frozen=True)
class ContainerRun:
    """One container the stand-in starts: a model server or a job's worker."""

    name: str
    image: str
    command: tuple[str, ...]
    args: tuple[str, ...]
    env: Mapping[str, str]

    def docker_args(self, standin_id: str) -> list[str]:
        args = ["run", "--detach", "--name", self.name, "--network", "host"]
        args += ["--label", f"{LABEL}={standin_id}"]
        for key, value in self.env.items():
            args += ["--env", f"{key}={value}"]
        # `command` replaces the image's ENTRYPOINT and then its CMD is ignored; `args` alone
        # replaces CMD (ModelContainerSpec.command/args, Kubernetes' command/args). Docker's
        # --entrypoint takes one executable and clears the image's CMD the same way.
        if self.command:
            args += ["--entrypoint", self.command[0], self.image, *self.command[1:], *self.args]
        else:
            args += [self.image, *self.args]
        return args


class Runtime:
    """Starts, watches and removes the stand-in's containers."""

    def __init__(self, standin_id: str) -> None:
        self.standin_id = standin_id
        self.ports = PortPool()
        self._started: set[str] = set()
        self._lock = threading.Lock()

    def start(self, run: ContainerRun) -> None:
        with self._lock:
            self._started.add(run.name)
        docker.docker(*run.docker_args(self.standin_id), timeout=120)

    def running(self, name: str) -> bool:
        done = docker.docker("inspect", "--format", "{{json .State}}", name, check=False)
        if done.returncode != 0:
            return False
        return bool(json.loads(done.stdout or "{}").get("Running"))

    def logs(self, name: str, tail: int = LOG_TAIL_LINES) -> str:
        done = docker.docker("logs", "--tail", str(tail), name, check=False, timeout=30)
        return (done.stdout + done.stderr).strip()

    def wait_exit(self, name: str, stop: threading.Event) -> int | None:
        """The container's exit code once it ends; None if `stop` is set first or it is gone."""
        while not stop.is_set():
            done = docker.docker(
                "inspect", "--format", "{{json .State}}", name, check=False, timeout=30
            )
            if done.returncode != 0:
                return None
            state = json.loads(done.stdout or "{}")
            if not state.get("Running") and state.get("Status") in ("exited", "dead"):
                return int(state.get("ExitCode", 1))
            stop.wait(0.5)
        return None

    def wait_healthy(
        self, name: str, url: str, timeout: float, stop: threading.Event
    ) -> tuple[bool, str]:
        """Poll `url` until it answers 200 (True), the container exits or `timeout` passes
        (False, with the reason)."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline and not stop.is_set():
                try:
                    answer = client.get(url)
                    if answer.status_code == 200:
                        return True, ""
                    last = f"the health route answered {answer.status_code}"
                except httpx.HTTPError as exc:
                    last = f"the health route did not answer ({type(exc).__name__})"
                if not self.running(name):
                    return False, "exited"
                stop.wait(0.25)
        return False, last

    def stop(self, name: str, grace: int = 0) -> None:
        """Stop (SIGTERM, SIGKILL after `grace` seconds) and remove one of our containers."""
        with self._lock:
            ours = name in self._started
        if not ours:
            return
        if grace:
            docker.docker("stop", "--time", str(grace), name, check=False, timeout=grace + 60)
        docker.docker("rm", "--force", name, check=False, timeout=60)
        with self._lock:
            self._started.discard(name)

    def remove_all(self, progress: Callable[[str], None] = lambda _: None) -> None:
        with self._lock:
            names = sorted(self._started)
        for name in names:
            self.stop(name)
            progress(f"removed container {name}")

    def started(self) -> list[str]:
        with self._lock:
            return sorted(self._started)
