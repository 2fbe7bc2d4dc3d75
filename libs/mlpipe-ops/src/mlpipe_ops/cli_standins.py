"""`mlpipe vertex-standin`: the local Vertex AI (mlpipe_ops.standins.vertex) in the foreground.

It serves on 127.0.0.1 until Ctrl-C or SIGTERM, then removes every container it started. Point
the aiplatform clients at it with `client_options={"api_endpoint": "http://127.0.0.1:PORT"}`,
`transport="rest"` and anonymous credentials. Also runnable as `python -m
mlpipe_ops.cli_standins`.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from mlpipe_ops.standins.vertex import DEFAULT_PROJECT_NUMBER, VertexStandIn


def vertex_standin(
    project: Annotated[
        str,
        typer.Option(envvar="MLPIPE_PROJECT", help="Project id the requests may name."),
    ],
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0: any free one).")] = 0,
    project_number: Annotated[
        str, typer.Option(help="Project number every returned resource name carries.")
    ] = DEFAULT_PROJECT_NUMBER,
    storage_emulator_host: Annotated[
        str,
        typer.Option(envvar="STORAGE_EMULATOR_HOST", help="GCS emulator the containers are given."),
    ] = "",
    pubsub_emulator_host: Annotated[
        str,
        typer.Option(
            envvar="PUBSUB_EMULATOR_HOST", help="Pub/Sub emulator the containers are given."
        ),
    ] = "",
    log_dir: Annotated[
        Path | None, typer.Option(help="Keep each container's log here when it is removed.")
    ] = None,
) -> None:
    """Serve a local Vertex AI (models, endpoints, predict, CustomJobs) on 127.0.0.1."""
    standin = VertexStandIn(
        project,
        project_number=project_number,
        port=port,
        storage_emulator_host=storage_emulator_host,
        pubsub_emulator_host=pubsub_emulator_host,
        log_dir=log_dir,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    standin.start()
    typer.echo(f"Vertex AI stand-in {standin.id} on {standin.url}", err=True)
    typer.echo(standin.url)  # stdout: the one line a caller reads
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        standin.stop(progress=lambda line: typer.echo(line, err=True))
        typer.echo("Vertex AI stand-in stopped", err=True)


if __name__ == "__main__":
    typer.run(vertex_standin)
