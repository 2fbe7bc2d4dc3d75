"""Run the weather example on a running local stack (`make up`):

    uv run mlpipe run --example weather      (or: uv run python examples/weather/run.py)

Serves the two providers on 127.0.0.1 (a free port), registers pipeline.yaml, publishes one
IngestRequest whose `http` source lists both URLs, and follows the run until the model serves
(or fails). The server stops when the run is over. MLPIPE_STATE_DIR picks another stack.

The stations' history is landed first from BigQuery (history.py explains why it is a
request of its own): the BigQuery stand-in is served at the URL the stack gave ingest (its
`bigquery (local)` port, or MLPIPE_BIGQUERY_URL for a stack started before it had one), the
history request is published and its run followed to its served model, then the providers'.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from history import history_request, serve_history  # noqa: E402
from providers import Providers  # noqa: E402

from mlpipe.messaging import events  # noqa: E402
from mlpipe.messaging.publishing import Publisher  # noqa: E402
from mlpipe.ml.config import config_path, parse_config  # noqa: E402
from mlpipe.store.storage import Storage, make_client  # noqa: E402
from mlpipe.v1 import events_pb2  # noqa: E402
from mlpipe_ops.cli import DEFAULT_STATE_DIR, follow_run  # noqa: E402
from mlpipe_ops.follow import EventWatcher  # noqa: E402
from mlpipe_ops.localstack import StackState, client_env  # noqa: E402


def weather_request(urls: list[str], request_id: str) -> events_pb2.IngestRequest:
    request = events_pb2.IngestRequest(
        request_id=request_id, dataset="weather", requested_at=events.timestamp()
    )
    request.http.urls.extend(urls)
    request.http.format = "json"
    request.http.records_path = "data.hourly"
    return request


def land_history(state: StackState, bigquery_url: str, timeout: float) -> int:
    """Serve the history in the BigQuery stand-in, publish its request, follow its run."""
    history = serve_history(bigquery_url, state.project, make_client(state.project))
    try:
        request_id = uuid.uuid4().hex
        with EventWatcher(state.project) as watcher:
            t0 = time.monotonic()
            Publisher(state.project).publish(
                history_request(request_id), attributes={"request_id": request_id}
            )
            print(f"published IngestRequest {request_id} for the history in BigQuery")
            return follow_run(state, watcher, request_id, t0, timeout)
    finally:
        history.stop()


def main() -> int:
    state = StackState.load(Path(os.environ.get("MLPIPE_STATE_DIR", DEFAULT_STATE_DIR)))
    if state is None:
        print("the local stack is not running: start it with `make up`", file=sys.stderr)
        return 1
    text = (HERE / "pipeline.yaml").read_text()
    config = parse_config(text)
    providers = Providers()
    try:
        with client_env(state):
            Storage(make_client(state.project), state.bucket).write(
                config_path(config.name), text.encode()
            )
            timeout = float(os.environ.get("MLPIPE_RUN_TIMEOUT", "180"))
            # The stack's ingest calls this URL for its bigquery source (a stack recorded
            # before it had one: MLPIPE_BIGQUERY_URL, or no history).
            bigquery_url = state.bigquery_url or os.environ.get("MLPIPE_BIGQUERY_URL", "")
            if bigquery_url:
                code = land_history(state, bigquery_url, timeout)
                if code != 0:
                    return code
            request_id = uuid.uuid4().hex
            with EventWatcher(state.project) as watcher:
                t0 = time.monotonic()
                Publisher(state.project).publish(
                    weather_request(providers.urls, request_id),
                    attributes={"request_id": request_id},
                )
                print(f"published IngestRequest {request_id} for {providers.urls}")
                return follow_run(state, watcher, request_id, t0, timeout)
    finally:
        providers.stop()


if __name__ == "__main__":
    sys.exit(main())
