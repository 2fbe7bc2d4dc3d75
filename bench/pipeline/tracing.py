"""What one trace per run costs: iris publish → serving with tracing off and on.

    uv run --frozen python bench/pipeline/tracing.py --runs 8 --rounds 2

Each round starts two stacks one after the other, the first with MLPIPE_TRACE_EXPORTER=off
(the OpenTelemetry API's no-op tracer, no Pub/Sub library spans) and the second as the local
stack runs by default (every process writes its spans to the state directory's traces/), and
runs chain.py's measurement on each. Rounds alternate the order, so drift in the machine's
load falls on both. Reported: the steady-state p50 and p95 of publish → serving per setting
over every round, the ratio on/off of the p50s, and the spans written per run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from chain import run_chain
from common import machine

from mlpipe import tracing

SETTINGS = {"off": {"MLPIPE_TRACE_EXPORTER": "off"}, "on": {}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=8, help="runs per stack")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    steady: dict[str, list[float]] = {name: [] for name in SETTINGS}
    spans_per_run: list[float] = []
    for round_no in range(args.rounds):
        order = list(SETTINGS) if round_no % 2 == 0 else list(reversed(SETTINGS))
        for name in order:
            state_dir = Path(tempfile.mkdtemp(prefix=f"mlpipe-bench-tracing-{name}-"))
            result = run_chain(
                args.runs, 120.0, state_dir, progress=print, profile=False, env=SETTINGS[name]
            )
            done = [r for r in result["runs"] if "error" not in r]
            steady[name] += [r["end_to_end"] for r in done if r["champion_scored"]]
            if name == "on":
                spans = tracing.read_spans(state_dir / "traces")
                spans_per_run.append(len(spans) / max(1, len(done)))
    report = summarize(steady, spans_per_run)
    print_report(report)
    if args.out:
        args.out.write_text(json.dumps({"machine": machine(), **report}, indent=2))


def summarize(steady: dict[str, list[float]], spans_per_run: list[float]) -> dict[str, Any]:
    def stats(values: list[float]) -> dict[str, float]:
        ordered = sorted(values)
        return {
            "n": len(ordered),
            "p50": statistics.median(ordered),
            "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
        }

    figures = {name: stats(values) for name, values in steady.items() if values}
    ratio = figures["on"]["p50"] / figures["off"]["p50"] if len(figures) == 2 else None
    return {
        "steady": figures,
        "ratio_on_off_p50": ratio,
        "spans_per_run": statistics.mean(spans_per_run) if spans_per_run else 0,
    }


def print_report(report: dict[str, Any]) -> None:
    print("\npublish → serving, steady state (a champion scored), seconds:")
    for name, s in report["steady"].items():
        print(f"  tracing {name:<4} n={s['n']:3d}  p50 {s['p50']:.3f}  p95 {s['p95']:.3f}")
    if report["ratio_on_off_p50"] is not None:
        print(f"  ratio on/off (p50): {report['ratio_on_off_p50']:.3f}")
    print(f"  spans written per run with tracing on: {report['spans_per_run']:.0f}")


if __name__ == "__main__":
    main()
