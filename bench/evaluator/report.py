"""The evaluation step before and after the matplotlib report, on iris and bikeshare, in one
process (compute only: storage reads and writes are the same objects either way, but for
plots.json).

    uv run --frozen python bench/evaluator/report.py [--repeats 9] [--base 7cf8261]

- base, before the verdict: score the holdout + the hand-drawn SVG report of the base
  commit (its report.render, loaded from git), which the verdict waited for;
- current, before the verdict: score the holdout (the report comes after the verdict);
- current, after the verdict: plots.json's numbers (permutation importance included) and the
  matplotlib report; `first` is the process's first report (iris: matplotlib's import in it).

The pieces are timed in turn, round after round, and each one's median reported.

The champion's importances come from its recorded plots.json, so they cost nothing here; when
it has none they are measured once more on the holdout (the `champion measured` line).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from threadpoolctl import threadpool_limits

from mlpipe.ml.config import parse_config
from mlpipe.ml.data import read_dataset
from mlpipe.ml.modeling import build_pipeline
from mlpipe.ml.split import split_rows
from mlpipe.ml.validation import check_dataset
from mlpipe.v1 import events_pb2
from mlpipe_evaluator import report
from mlpipe_evaluator.evaluation import Champion, Evaluated, plot_data, scored

REPO = Path(__file__).resolve().parents[2]


def base_report(commit: str) -> types.ModuleType:
    source = subprocess.run(
        ["git", "show", f"{commit}:services/evaluator/src/mlpipe_evaluator/report.py"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout
    module = types.ModuleType("base_report")
    sys.modules[module.__name__] = module
    exec(compile(source, f"{commit}:report.py", "exec"), module.__dict__)
    return module


def interleaved(fns: list[Callable[[], Any]], repeats: int) -> list[float]:
    """The median seconds of each of `fns`, called in turn `repeats` times after one warm-up
    round (a busy machine's load then weighs on each alike)."""
    for fn in fns:
        fn()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, samples, strict=True):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return [statistics.median(s) for s in samples]


def once(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def setup(example: str) -> tuple[Any, dict[str, Any], Any]:
    config = parse_config((REPO / f"examples/{example}/pipeline.yaml").read_text())
    frame = read_dataset((REPO / f"examples/{example}/{example}.csv").read_bytes(), "csv", example)
    features = check_dataset(frame, config, example)
    split = split_rows(frame, config)
    estimator = build_pipeline(config, features)
    train = frame.iloc[split.train]
    estimator.fit(train[features], train[config.dataset.target])
    bundle = {"estimator": estimator, "features": features, "task": config.model.task}
    return config, bundle, frame.iloc[split.holdout]


def measure(
    example: str, old: types.ModuleType, repeats: int
) -> tuple[float, float, float, float, float]:
    """(base to verdict, current to verdict, first after, after, after with the champion
    measured) in seconds."""
    event = events_pb2.EvaluationCompleted(model_name="bench", passed=True)
    config, bundle, holdout = setup(example)
    model = scored(bundle, holdout, config)

    def base_step() -> None:
        old.render(event, scored(bundle, holdout, config).details, None)

    def current_step() -> None:
        scored(bundle, holdout, config)

    def after_verdict(champion: Champion) -> None:
        found = Evaluated(config, bundle, holdout, model, champion)
        with threadpool_limits(limits=1):  # as evaluate() draws it
            data = plot_data(None, "0" * 16, found)  # type: ignore[arg-type]  # reads nothing
            report.render(event, model.details, None, data)

    first = once(lambda: after_verdict(Champion(None, 0, "")))
    base, current, after, champion = interleaved(
        [
            base_step,
            current_step,
            lambda: after_verdict(Champion(None, 0, "")),
            lambda: after_verdict(Champion({}, 1, "", bundle, "")),
        ],
        repeats,
    )
    return base, current, first, after, champion


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--base", default="7cf8261")
    args = parser.parse_args()
    old = base_report(args.base)
    print(f"load average {os.getloadavg()[0]:.2f} at start, {os.cpu_count()} cores")
    rows = [(example, *measure(example, old, args.repeats)) for example in ("iris", "bikeshare")]
    print(f"load average {os.getloadavg()[0]:.2f} at end\n")
    print(
        f"{'example':10s} {'base: to verdict':>17s} {'current: to verdict':>20s} {'ratio':>6s}"
        f" {'after verdict (first)':>22s} {'after verdict':>14s} {'champion measured':>18s}"
    )
    for example, base, current, first, after, champion in rows:
        print(
            f"{example:10s} {base * 1e3:14.1f} ms {current * 1e3:17.1f} ms {current / base:6.2f}"
            f" {first * 1e3:19.1f} ms {after * 1e3:11.1f} ms {champion * 1e3:15.1f} ms"
        )


if __name__ == "__main__":
    main()
