"""Send the served bike-share model a heat wave, and drop labelled rows from it, so that
`mlpipe monitor check bikeshare` finds drift and retrains (on a running local stack):

    uv run mlpipe run --example bikeshare
    uv run python examples/bikeshare/drift.py            # 600 requests of hot, windy weather
    uv run mlpipe monitor check bikeshare --open         # drift in temperature_c and wind_kmh

`--calm` sends rows drawn from the training weeks instead (no drift expected). The labelled
rows' net change comes from the same generator as the example data. MLPIPE_STATE_DIR picks
another stack.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import random
import sys
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from generate import net_change  # noqa: E402

from mlpipe.store.storage import Storage, make_client  # noqa: E402
from mlpipe_ops.localstack import StackState, client_env  # noqa: E402

MODEL = "bikeshare-net-change"
FEATURES = [
    "station",
    "station_kind",
    "hour",
    "weekday",
    "temperature_c",
    "precipitation_mm",
    "wind_kmh",
]
TRAINING_UNTIL = "2026-06-08"  # the pipeline's split cutoff


def rows(count: int, seed: int, heat_wave: bool) -> list[tuple[str, dict]]:
    """(timestamp, instance) pairs drawn from the training weeks, in a heat wave or not."""
    with (HERE / "bikeshare.csv").open() as handle:
        training = [r for r in csv.DictReader(handle) if r["timestamp"] < TRAINING_UNTIL]
    rng = random.Random(seed)
    drawn = []
    for row in rng.sample(training, count):
        instance: dict = {k: row[k] for k in ("station", "station_kind")}
        instance |= {k: int(row[k]) for k in ("hour", "weekday")}
        instance |= {k: float(row[k]) for k in ("temperature_c", "precipitation_mm", "wind_kmh")}
        if heat_wave:
            instance["temperature_c"] = round(instance["temperature_c"] + 11 + rng.gauss(0, 1), 1)
            instance["wind_kmh"] = round(instance["wind_kmh"] * 2.2 + 8, 1)
        drawn.append((row["timestamp"], instance))
    return drawn


def labelled(drawn: list[tuple[str, dict]], seed: int) -> bytes:
    """The rows with the net change the example's generator gives them. They keep the hour
    they were drawn from: the pipeline splits on a fixed date, and rows after it would only
    join the holdout (a pipeline with `split.cutoff` unset holds out the latest rows instead)."""
    rng = random.Random(seed)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["timestamp", *FEATURES, "net_change"])
    for stamp, r in drawn:
        target = net_change(
            r["station_kind"],
            r["hour"],
            r["weekday"],
            r["temperature_c"],
            r["precipitation_mm"],
            r["wind_kmh"],
            rng,
        )
        writer.writerow([stamp, *(r[k] for k in FEATURES), target])
    return out.getvalue().encode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--calm", action="store_true", help="rows from the training weeks")
    parser.add_argument("--labels", type=int, default=300, help="labelled rows to drop (0: none)")
    args = parser.parse_args()
    state = StackState.load(Path(os.environ.get("MLPIPE_STATE_DIR", ".mlpipe")))
    if state is None:
        print("the local stack is not running: start it with `make up`", file=sys.stderr)
        return 1
    instances = [i for _, i in rows(args.rows, args.seed, heat_wave=not args.calm)]
    url = f"{state.url('predictor')}/v1/models/{MODEL}:predict"
    with httpx.Client(timeout=30) as client:
        for start in range(0, len(instances), 25):
            reply = client.post(url, json={"instances": instances[start : start + 25]})
            if reply.status_code != 200:
                print(f"predict failed: {reply.status_code} {reply.text}", file=sys.stderr)
                return 1
    print(f"sent {len(instances)} {'calm' if args.calm else 'heat-wave'} rows to {url}")
    if args.labels and not args.calm:
        kind = "heatwave"
        path = f"labels/bikeshare/{kind}-{args.seed}.csv"
        data = labelled(rows(args.labels, args.seed + 1000, heat_wave=True), args.seed)
        with client_env(state):
            uri = Storage(make_client(state.project), state.bucket).write(path, data)
        print(f"wrote {args.labels} labelled rows to gs://{state.bucket}/{path} (generation {uri})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
