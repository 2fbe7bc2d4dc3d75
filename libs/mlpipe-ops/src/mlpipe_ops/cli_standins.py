"""`mlpipe vertex-standin`, `mlpipe bigquery-standin` and `mlpipe earthengine-standin`: local
Vertex AI (mlpipe_ops.standins.vertex), BigQuery (mlpipe_ops.standins.bigquery) and Earth
Engine (mlpipe_ops.standins.earthengine) in the foreground.

Each serves on 127.0.0.1 until Ctrl-C or SIGTERM, then removes every container it started. Point
the aiplatform clients at it with `client_options={"api_endpoint": "http://127.0.0.1:PORT"}`,
`transport="rest"` and anonymous credentials. Also runnable as `python -m
mlpipe_ops.cli_standins`.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from mlpipe.store.storage import make_client
from mlpipe_ops.standins.vertex import DEFAULT_PROJECT_NUMBER, VertexStandIn

# The BigQuery and Earth Engine stand-ins are imported by their commands: they bring duckdb,
# pyarrow and numpy, which every `mlpipe` command (`mlpipe up` among them) would otherwise pay
# for at its start.


def serve_until_stopped(
    name: str,
    start: Callable[[], Any],
    where: Callable[[], str],
    stop: Callable[[], Any],
    label: Callable[[], str] = lambda: "",
    url: Callable[[], str] | None = None,
) -> None:
    """Start a stand-in, say where it is (its URL alone on stdout, for a caller to read), and
    serve until Ctrl-C or SIGTERM, then stop it."""
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    start()
    typer.echo(f"{name} stand-in{label()} on {where()}", err=True)
    typer.echo((url or where)())  # stdout: the one line a caller reads
    try:
        while not stopping.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        stop()
        typer.echo(f"{name} stand-in stopped", err=True)


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
    serve_until_stopped(
        "Vertex AI",
        standin.start,
        lambda: standin.url,
        lambda: standin.stop(progress=lambda line: typer.echo(line, err=True)),
        lambda: f" {standin.id}",
    )


def bigquery_standin(
    project: Annotated[
        str,
        typer.Option(envvar="MLPIPE_PROJECT", help="Project id the jobs run in."),
    ],
    storage_emulator_host: Annotated[
        str,
        typer.Option(envvar="STORAGE_EMULATOR_HOST", help="GCS emulator extracts write to."),
    ],
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0: any free one).")] = 0,
    job_seconds: Annotated[float, typer.Option(help="How long each job runs.")] = 0.5,
) -> None:
    """Serve a local BigQuery (query and extract jobs over a synthetic GSOD table)."""
    from mlpipe_ops.standins.bigquery import BigQueryStandIn

    os.environ["STORAGE_EMULATOR_HOST"] = storage_emulator_host
    standin = BigQueryStandIn(project, make_client(project), port=port, job_seconds=job_seconds)
    serve_until_stopped(
        "BigQuery",
        standin.start,
        lambda: f"{standin.url}: {sorted(standin.tables)}",
        standin.stop,
        url=lambda: standin.url,
    )


def earthengine_standin(
    project: Annotated[
        str, typer.Option(envvar="MLPIPE_PROJECT", help="Project the requests may name.")
    ] = "mlpipe-local",
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0: any free one).")] = 0,
    storage_emulator_host: Annotated[
        str,
        typer.Option(envvar="STORAGE_EMULATOR_HOST", help="GCS emulator the exports write to."),
    ] = "",
    export_seconds: Annotated[float, typer.Option(help="How long each export takes.")] = 1.0,
    fields: Annotated[int, typer.Option(help="Labelled fields in the synthetic table.")] = 1200,
) -> None:
    """Serve a local Earth Engine (table exports to GCS, operations) on 127.0.0.1.

    Point earthengine-api at it: `ee.Initialize(AnonymousCredentials(), url=URL, project=P)`,
    or ingest with MLPIPE_EARTHENGINE_URL=URL (`mlpipe up` starts one and does that)."""
    from mlpipe_ops.standins.earthengine import Catalogue, EarthEngineStandIn

    standin = EarthEngineStandIn(
        project,
        port=port,
        storage_emulator_host=storage_emulator_host,
        export_seconds=export_seconds,
        catalogue=Catalogue.synthetic(fields),
    )
    serve_until_stopped("Earth Engine", standin.start, lambda: standin.url, standin.stop)


if __name__ == "__main__":
    typer.run(vertex_standin)
