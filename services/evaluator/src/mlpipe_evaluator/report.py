"""A run's self-contained HTML report: gates, metrics (challenger and champion), a confusion
matrix or residual plot as inline SVG, and the lineage. No external assets, no scripts."""

from __future__ import annotations

import html
import math
from typing import Any

from mlpipe.messaging import events
from mlpipe.v1 import events_pb2
from mlpipe_evaluator.metrics import NOT_APPLIED

STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#1b1f24;max-width:64rem}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccd;padding:.25rem .6rem;
text-align:left;font-variant-numeric:tabular-nums}th{background:#f3f4f8}
.pass{color:#116329;font-weight:600}.fail{color:#b3261e;font-weight:600}.skip{color:#6b6f76}
.verdict{font-size:1.2rem;padding:.4rem .8rem;display:inline-block;border-radius:.3rem}
.verdict.pass{background:#dff5e3}.verdict.fail{background:#fde2e0}
code{font-size:.85rem}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _num(value: float) -> str:
    return (
        "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"
    )


def gate_table(gates: list[events_pb2.GateResult]) -> str:
    rows = []
    for g in gates:
        skipped = g.note.startswith(NOT_APPLIED)
        verdict = "skipped" if skipped else "pass" if g.passed else "FAIL"
        css = "skip" if skipped else "pass" if g.passed else "fail"
        threshold = "" if skipped else f"{events.gate_comparison(g)} {g.threshold:.4g}"
        rows.append(
            f"<tr><td>{_e(g.name)}</td><td>{_e(g.kind)}</td><td>{_num(g.value)}</td>"
            f"<td>{_e(threshold)}</td><td class='{css}'>{verdict}</td>"
            f"<td>{_e(g.note)}</td></tr>"
        )
    return (
        "<table><tr><th>gate</th><th>kind</th><th>value</th><th>threshold</th>"
        "<th>verdict</th><th>note</th></tr>" + "".join(rows) + "</table>"
    )


def metrics_table(
    metrics: dict[str, float], champion: dict[str, float] | None, champion_version: int
) -> str:
    head = "<tr><th>metric</th><th>this run</th>"
    if champion:
        head += f"<th>champion v{champion_version}</th><th>Δ</th>"
    rows = [head + "</tr>"]
    for key in sorted(metrics):
        row = f"<tr><td>{_e(key)}</td><td>{_num(metrics[key])}</td>"
        if champion:
            other = champion.get(key)
            delta = "" if other is None else f"{metrics[key] - other:+.4f}"
            row += f"<td>{_num(other) if other is not None else ''}</td><td>{delta}</td>"
        rows.append(row + "</tr>")
    return "<table>" + "".join(rows) + "</table>"


def confusion_svg(labels: list[str], matrix: list[list[int]]) -> str:
    n = len(labels)
    cell, left, top = 56, 120, 120
    width, height = left + cell * n + 20, top + cell * n + 20
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"role='img' aria-label='confusion matrix'>",
        f"<text x='{left + cell * n / 2}' y='20' text-anchor='middle' "
        f"font-size='13'>predicted</text>",
        f"<text x='14' y='{top + cell * n / 2}' font-size='13' "
        f"transform='rotate(-90 14 {top + cell * n / 2})' text-anchor='middle'>actual</text>",
    ]
    for j, label in enumerate(labels):
        x = left + j * cell + cell / 2
        parts.append(
            f"<text x='{x}' y='{top - 8}' font-size='11' text-anchor='start' "
            f"transform='rotate(-35 {x} {top - 8})'>{_e(label)}</text>"
        )
    for i, row in enumerate(matrix):
        total = sum(row) or 1
        y = top + i * cell
        parts.append(
            f"<text x='{left - 6}' y='{y + cell / 2 + 4}' font-size='11' "
            f"text-anchor='end'>{_e(labels[i])}</text>"
        )
        for j, count in enumerate(row):
            share = count / total
            shade = int(245 - 180 * share)
            fill = f"rgb({shade},{shade + 5 if shade < 250 else 250},255)"
            colour = "#fff" if share > 0.6 else "#1b1f24"
            x = left + j * cell
            parts.append(
                f"<rect x='{x}' y='{y}' width='{cell}' height='{cell}' fill='{fill}' "
                f"stroke='#99a'/><text x='{x + cell / 2}' y='{y + cell / 2 + 5}' "
                f"font-size='14' text-anchor='middle' fill='{colour}'>{count}</text>"
            )
    parts.append("</svg>")
    return "".join(parts)


def residual_svg(points: list[list[float]]) -> str:
    width, height, pad = 560, 320, 44
    if not points:
        return "<p>no residuals</p>"
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    limit = max(abs(min(ys)), abs(max(ys))) or 1.0
    span = (x1 - x0) or 1.0

    def sx(v: float) -> float:
        return pad + (v - x0) / span * (width - 2 * pad)

    def sy(v: float) -> float:
        return height / 2 - v / limit * (height / 2 - pad)

    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"role='img' aria-label='residuals against predictions'>",
        f"<rect x='0' y='0' width='{width}' height='{height}' fill='#fbfbfd'/>",
        f"<line x1='{pad}' y1='{height / 2}' x2='{width - pad}' y2='{height / 2}' "
        f"stroke='#889' stroke-dasharray='4 3'/>",
        f"<text x='{width / 2}' y='{height - 8}' font-size='12' text-anchor='middle'>"
        f"predicted ({x0:.3g} … {x1:.3g})</text>",
        f"<text x='12' y='{height / 2}' font-size='12' transform='rotate(-90 12 "
        f"{height / 2})' text-anchor='middle'>residual (±{limit:.3g})</text>",
    ]
    parts += [
        f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='2.5' fill='#3558c8' fill-opacity='0.55'/>"
        for x, y in points
    ]
    parts.append("</svg>")
    return "".join(parts)


def render(
    evaluation: events_pb2.EvaluationCompleted,
    details: dict[str, Any],
    lineage: dict[str, Any] | None,
) -> str:
    ctx = evaluation.context
    verdict = "passed" if evaluation.passed else "failed"
    metrics = dict(evaluation.metrics)
    champion = dict(evaluation.champion_metrics) or None
    if "confusion_matrix" in details:
        plot = "<h2>Confusion matrix (holdout)</h2>" + confusion_svg(
            details["labels"], details["confusion_matrix"]
        )
    else:
        plot = "<h2>Residuals (holdout)</h2>" + residual_svg(details.get("points", []))
    lineage_rows = "".join(
        f"<tr><th>{_e(k)}</th><td><code>{_e(v)}</code></td></tr>"
        for k, v in [
            ("run", ctx.run_id),
            ("pipeline", ctx.pipeline),
            ("dataset", evaluation.dataset.uri),
            ("generation", evaluation.dataset.generation),
            ("dataset sha256", evaluation.dataset.sha256),
            ("config sha256", ctx.config_sha256),
            ("code", ctx.code_version),
            ("model", evaluation.model_uri),
            ("model sha256", evaluation.model_sha256),
            ("estimator", (lineage or {}).get("model", {}).get("estimator", "")),
            ("split", (lineage or {}).get("split", "")),
        ]
    )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>mlpipe run {_e(ctx.run_id)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{_e(evaluation.model_name)} · run {_e(ctx.run_id)}</h1>"
        f"<p class='verdict {'pass' if evaluation.passed else 'fail'}'>quality gates {verdict}"
        f"</p><p>holdout rows: {evaluation.holdout_rows}</p>"
        f"<h2>Gates</h2>{gate_table(list(evaluation.gates))}"
        f"<h2>Metrics</h2>{metrics_table(metrics, champion, evaluation.champion_version)}"
        f"{plot}<h2>Lineage</h2><table>{lineage_rows}</table></body></html>"
    )
