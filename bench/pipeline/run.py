"""Pipeline latency: mlpipe's iris chain (publish → serving) beside KFP local,
Metaflow local and the bare functions, the emulators' own floor per hop, and the data path at
10k, 100k and 1M rows.

    uv run --frozen python bench/pipeline/run.py                 # everything (about 6 min)
    uv run --frozen python bench/pipeline/run.py --skip-scale    # latency only

Each part is also a script of its own (floor.py, chain.py, peers.py, scale.py). Every server
started here binds 127.0.0.1 on free ports with its state under /tmp, and is stopped by PID
when its part ends. The raw results (every sample, with the load average beside it) go to
--out as JSON. Not a test: nothing is asserted; the targets are reported as met or not.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from chain import print_chain, run_chain
from common import load, machine
from floor import measure_floor, print_floor
from peers import print_peers, run_peers
from scale import print_scale, run_scale

E2E_TARGET = 2.0  # seconds, publish → serving, p50
PEER_RATIO_TARGET = 5.0  # KFP local p50 / mlpipe p50
HOP_SLACK = 0.015  # seconds over the emulator floor, p50
SCALE_TARGET = 1.2  # mlpipe / bare at 1M rows


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _load_range(loads: list[float]) -> str:
    return f"{min(loads):.2f}..{max(loads):.2f}" if loads else "-"


def print_table(result: dict[str, Any]) -> None:
    chain, peers, floor = result["chain"], result["peers"], result["floor"]
    steady = chain["summary"]["steady"]
    first = next((r for r in chain["runs"] if "error" not in r), None)
    series = peers["series"]
    kfp, mf = series["kfp"], series["metaflow"]
    steady_loads = [r["load"][0] for r in chain["runs"] if r.get("champion_scored")]
    w = 36
    print("\n" + "=" * 96)
    print("iris: load CSV → RandomForest(100) → holdout accuracy; mlpipe also deploys and serves")
    print("=" * 96)
    print(f"{'pipeline':<{w}} {'p50':>8} {'p95':>8} {'n':>3}  {'vs mlpipe':>9}  load (1 min)")
    rows = [
        ("mlpipe publish → serving (steady)", steady["p50"], steady["p95"], steady["n"], None),
        ("KFP local, 3 components", kfp["p50"], kfp["p95"], kfp["n"], kfp),
        ("Metaflow local, 3 steps", mf["p50"], mf["p95"], mf["n"], mf),
        (
            "bare, one python process (cold)",
            series["bare_cold"]["p50"],
            series["bare_cold"]["p95"],
            series["bare_cold"]["n"],
            series["bare_cold"],
        ),
        (
            "bare, in process (warm floor)",
            series["bare_warm"]["p50"],
            series["bare_warm"]["p95"],
            series["bare_warm"]["n"],
            series["bare_warm"],
        ),
    ]
    for label, p50, p95, n, s in rows:
        ratio = f"{p50 / steady['p50']:8.2f}x" if s is not None else f"{'1.00x':>9}"
        loads = _load_range(s["loads"]) if s is not None else _load_range(steady_loads)
        print(f"{label:<{w}} {p50:7.3f}s {p95:7.3f}s {n:>3}  {ratio}  {loads}")
    if first is not None:
        print(
            f"{'mlpipe run 1 (cold, no champion)':<{w}} {first['end_to_end']:7.3f}s "
            f"{'':>8} {1:>3}  {'':>9}  {first['load'][0]:.2f}"
        )
    kfp_ratio = kfp["p50"] / steady["p50"]
    mf_ratio = mf["p50"] / steady["p50"]
    print(f"\nKFP/mlpipe {kfp_ratio:.2f}x   Metaflow/mlpipe {mf_ratio:.2f}x   (p50 over p50)")
    print(f"target mlpipe p50 ≤ {E2E_TARGET:.0f} s: {_met(steady['p50'] <= E2E_TARGET)}")
    print(f"target KFP ≥ {PEER_RATIO_TARGET:.0f}x mlpipe: {_met(kfp_ratio >= PEER_RATIO_TARGET)}")

    floors = {"push": floor["push"]["p50"], "gcs": floor["gcs"]["p50"], "": 0.0}
    print(
        f"\nmlpipe per hop, steady state (n={steady['n']}), ms; floor = the emulator alone "
        f"(push {floors['push'] * 1000:.0f}, GCS notify {floors['gcs'] * 1000:.0f}, p50)"
    )
    print(
        f"  {'hop':<22} {'p50':>7} {'p95':>7} {'floor':>7} {'over':>7}  "
        f"target ≤ floor+{HOP_SLACK * 1000:.0f}"
    )
    total = 0.0
    for label, h in steady["hops"].items():
        base = floors[h["floor"]]
        over = h["p50"] - base
        total += h["p50"]
        print(
            f"  {label:<22} {h['p50'] * 1000:7.1f} {h['p95'] * 1000:7.1f} {base * 1000:7.1f} "
            f"{over * 1000:7.1f}  {_met(over <= HOP_SLACK)}"
        )
    print(f"  {'sum of hop p50s':<22} {total * 1000:7.1f}")
    print("\nwhere the time goes (steady state), ms:")
    for row in steady["timeline"]:
        print(f"  {row['segment']:<66} p50 {row['p50'] * 1000:7.1f}  p95 {row['p95'] * 1000:7.1f}")
    if "scale" in result:
        at_1m = result["scale"]["sizes"].get("1000000")
        if at_1m:
            print(
                f"\nscale: mlpipe/bare at 1M rows {at_1m['ratio']:.2f}x "
                f"(target ≤ {SCALE_TARGET}x: {_met(at_1m['ratio'] <= SCALE_TARGET)})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="mlpipe chain runs")
    parser.add_argument("--peer-runs", type=int, default=5)
    parser.add_argument("--floor-samples", type=int, default=40)
    parser.add_argument("--scale-repeats", type=int, default=3)
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="raw results as JSON")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mlpipe-bench-pipeline-"))
    out = args.out or work / "results.json"
    result: dict[str, Any] = {"machine": machine(), "load_start": load()}
    print(f"machine {result['machine']}  load {result['load_start']}  work dir {work}")
    result["floor"] = measure_floor(args.floor_samples, work / "floor")
    print_floor(result["floor"])
    result["chain"] = run_chain(args.runs, 120.0, work / "chain")
    print_chain(result["chain"])
    result["peers"] = run_peers(args.peer_runs, work / "peers")
    print_peers(result["peers"])
    if not args.skip_scale:
        result["scale"] = run_scale(args.scale_repeats)
        print_scale(result["scale"])
    result["load_end"] = load()
    out.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"\nload average at start {result['load_start']}, at end {result['load_end']}")
    print(f"raw results: {out}")


if __name__ == "__main__":
    main()
