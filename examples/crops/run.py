"""Run the crops example on a running local stack (`make up`):

    uv run mlpipe run --example crops      (or: uv run python examples/crops/run.py)

Registers pipeline.yaml and publishes the IngestRequest in earthengine-request.json: an Earth
Engine source that composites the season's Sentinel-2-like images by their median and samples
them at labelled fields. The stack's local Earth Engine (mlpipe_ops.standins.earthengine)
runs the export into the landing bucket; ingest's exports check lands it, and the run is
followed until the model serves (or fails). MLPIPE_STATE_DIR picks another stack.

crops.csv (written by generate.py) is the same kind of table as a static file, for an inline
or uploaded run.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

from google.protobuf import json_format

from mlpipe.messaging import events
from mlpipe.messaging.publishing import Publisher
from mlpipe.ml.config import config_path, parse_config
from mlpipe.store.storage import Storage, make_client
from mlpipe.v1 import events_pb2
from mlpipe_ops.cli import DEFAULT_STATE_DIR, follow_run
from mlpipe_ops.follow import EventWatcher
from mlpipe_ops.localstack import StackState, client_env

HERE = Path(__file__).resolve().parent


def crops_request(request_id: str) -> events_pb2.IngestRequest:
    request = json_format.Parse(
        (HERE / "earthengine-request.json").read_text(), events_pb2.IngestRequest()
    )
    request.request_id = request_id
    request.requested_at.CopyFrom(events.timestamp())
    return request


def main() -> int:
    state = StackState.load(Path(os.environ.get("MLPIPE_STATE_DIR", DEFAULT_STATE_DIR)))
    if state is None:
        print("the local stack is not running: start it with `make up`", file=sys.stderr)
        return 1
    if not state.earthengine_url:
        print("this stack has no local Earth Engine: restart it (`make down up`)", file=sys.stderr)
        return 1
    text = (HERE / "pipeline.yaml").read_text()
    config = parse_config(text)
    with client_env(state):
        Storage(make_client(state.project), state.bucket).write(
            config_path(config.name), text.encode()
        )
        request_id = uuid.uuid4().hex
        with EventWatcher(state.project) as watcher:
            t0 = time.monotonic()
            Publisher(state.project).publish(
                crops_request(request_id), attributes={"request_id": request_id}
            )
            print(f"published IngestRequest {request_id} (Earth Engine: {state.earthengine_url})")
            return follow_run(
                state, watcher, request_id, t0, float(os.environ.get("MLPIPE_RUN_TIMEOUT", "180"))
            )


if __name__ == "__main__":
    sys.exit(main())
