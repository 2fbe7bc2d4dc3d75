"""`mlpipe console`: the console against the running local stack (`mlpipe up`), on 127.0.0.1.

It gets the environment its Cloud Run revision would get on the local target
(service_environment: everyone is "local" and may act, the deployer is the stack's), plus the
emulators' hosts. It is not one of the stack's services: it starts only when asked for.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import webbrowser
from pathlib import Path
from typing import Annotated

import typer

from mlpipe_ops import infra, statedir
from mlpipe_ops.cli_runs import DEFAULT_STATE_DIR, StateDir, running_stack
from mlpipe_ops.localstack import HOST, StackState, free_port
from mlpipe_ops.service_runtime import RuntimeDefinitionError, load_runtimes, service_environment


def console_environment(state: StackState, port: int) -> dict[str, str]:
    """The console's variables for this stack, listening on `port`."""
    runtimes = load_runtimes("local")
    target = infra.local_target(state.project, state.bucket, state.service_ports)
    own = service_environment(
        target, "console", runtimes["console"], code_version=state.code_version
    )
    hosts = {k: v for k, v in state.client_env().items() if k.endswith("_EMULATOR_HOST")}
    # The console's own spans go where the services' do, and it reads theirs from there.
    traces = {
        "MLPIPE_TRACE_EXPORTER": "file",
        "MLPIPE_TRACE_DIR": str(Path(state.state_dir) / statedir.TRACES_DIR),
    }
    return {**own, **hosts, **traces, "MLPIPE_HOST": HOST, "MLPIPE_PORT": str(port)}


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=1) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def console(
    port: Annotated[int, typer.Option(help="Where to listen (0: a free port).")] = 0,
    open_browser: Annotated[bool, typer.Option("--open", help="Open it in a browser.")] = False,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Serve the console (runs, models, failures, drift, batches) for the local stack; Ctrl-C
    stops it."""
    state = running_stack(state_dir)
    if not state.running():
        typer.secho("the local stack is not running; start it with `mlpipe up`", fg="red", err=True)
        raise typer.Exit(1)
    port = port or free_port()
    try:
        env = {**os.environ, **console_environment(state, port)}
    except (RuntimeDefinitionError, infra.InfraError) as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(1) from None
    url = f"http://{HOST}:{port}"
    # SIGTERM stops it like Ctrl-C: the console process it started goes with it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    process = subprocess.Popen([sys.executable, "-m", "mlpipe_console"], env=env)
    try:
        deadline = time.monotonic() + 30
        while not _answers(url):
            if process.poll() is not None:
                typer.secho(f"the console stopped (exit {process.returncode})", fg="red", err=True)
                raise typer.Exit(1)
            if time.monotonic() > deadline:
                typer.secho(f"the console did not answer at {url} in 30 s", fg="red", err=True)
                raise typer.Exit(1)
            time.sleep(0.1)
        typer.echo(f"console: {url}  (Ctrl-C stops it)")
        sys.stdout.flush()
        if open_browser:
            webbrowser.open(url)
        process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


def register(app: typer.Typer) -> None:
    app.command()(console)
