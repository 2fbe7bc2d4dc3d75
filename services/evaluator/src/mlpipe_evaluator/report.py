"""A run's self-contained HTML report: gates, metrics (challenger and champion), the plots of
plots.json drawn by matplotlib as inline SVG, and the lineage. No external assets, fonts or
scripts."""

from __future__ import annotations

import html
import logging
import math
from typing import Any

from mlpipe.messaging import events
from mlpipe.v1 import events_pb2
from mlpipe_evaluator.metrics import NOT_APPLIED

log = logging.getLogger(__name__)

STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#1b1f24;max-width:64rem}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccd;padding:.25rem .6rem;
text-align:left;font-variant-numeric:tabular-nums}th{background:#f3f4f8}
.pass{color:#116329;font-weight:600}.fail{color:#b3261e;font-weight:600}.skip{color:#6b6f76}
.verdict{font-size:1.2rem;padding:.4rem .8rem;display:inline-block;border-radius:.3rem}
.verdict.pass{background:#dff5e3}.verdict.fail{background:#fde2e0}
code{font-size:.85rem}
figure.plot{margin:1rem 0}figure.plot figcaption{font-weight:600;margin-bottom:.3rem}
figure.plot svg{max-width:100%;height:auto}
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


TITLES = {
    "confusion_matrix": "Confusion matrix",
    "roc": "ROC curves",
    "precision_recall": "Precision-recall curves",
    "calibration": "Calibration",
    "predicted_vs_actual": "Predicted against actual",
    "residuals": "Residuals",
    "error_by_segment": "Error by segment",
    "permutation_importance": "Permutation feature importance",
}


def figure_section(plot: dict[str, Any]) -> str:
    """One plot as a <figure> with its inline SVG; a plot that cannot be drawn is named
    with the reason, and the rest of the report still drawn."""
    from mlpipe_evaluator import figures  # matplotlib: imported when a report is drawn

    kind = plot.get("kind", "")
    title = TITLES.get(kind, kind)
    if kind == "error_by_segment":
        title += f" ({plot.get('column', '')})"
    try:
        if "error" in plot:
            raise ValueError(plot["error"])
        body = figures.draw(plot)
    except Exception as exc:  # one broken figure must not cost the whole report
        log.warning("could not draw the %s plot: %s", kind, exc, exc_info=True)
        body = f"<p class='fail'>could not be drawn: {_e(exc)}</p>"
    return (
        f"<figure class='plot' data-kind='{_e(kind)}'><figcaption>{_e(title)} (holdout)"
        f"</figcaption>{body}</figure>"
    )


def cost_section(cost: dict[str, Any] | None) -> str:
    """The estimate of the steps so far (run_cost.cost_to_dict's JSON, or {"no_estimate":
    why}): the deployer's step is not in it, the run's recorded estimate (cost.json) is."""
    if cost is None:
        return ""
    head = "<h2>Cost so far (estimate)</h2>"
    if "estimate" not in cost:
        return head + f"<p id='cost-none'>No estimate: {_e(cost.get('no_estimate', ''))}.</p>"
    c = cost["estimate"]
    money = _e(c["currency"])
    rows = []
    for s in c["steps"]:
        if "machine_hours" in s:
            used = f"{s['machine_hours']:.4f} machine-hours"
            if s.get("accelerator_hours"):
                used += f", {s['accelerator_hours']:.4f} accelerator-hours"
        else:
            used = f"{s['vcpu_seconds']:.1f} vCPU-s, {s['gib_seconds']:.1f} GiB-s"
        rows.append(
            f"<tr><td>{_e(s['step'])}</td><td>{s['seconds']:.1f}</td><td>{_e(used)}</td>"
            f"<td>{_e(s['basis'])}</td><td>{s['cost']:.6f}</td></tr>"
        )
    rows.append(
        f"<tr><td>storage</td><td></td><td>{c['storage_objects']} objects, "
        f"{c['storage_bytes']} bytes, kept a month</td><td></td>"
        f"<td>{c['storage_cost']:.6f}</td></tr>"
        f"<tr><th>total so far</th><td></td><td></td><td></td>"
        f"<th id='cost-total'>{c['total']:.6f} {money}</th></tr>"
    )
    notes = "".join(f"<li>not estimated: {_e(m)}</li>" for m in c.get("missing", []))
    notes += "".join(f"<li>assumed price: {_e(a)}</li>" for a in c.get("assumed", []))
    return (
        f"{head}<p id='cost-scope'>At list prices of {_e(c['as_of'])} in {_e(c['region'])} "
        f"({money}), for the steps up to this evaluation. Deployment is not included: the "
        "run's full estimate is recorded when it ends (mlpipe status RUN_ID, the console's "
        "run page).</p><table><tr><th>step</th><th>seconds</th><th>used</th><th>priced as</th>"
        f"<th>cost</th></tr>{''.join(rows)}</table>" + (f"<ul>{notes}</ul>" if notes else "")
    )


def render(
    evaluation: events_pb2.EvaluationCompleted,
    details: dict[str, Any],
    lineage: dict[str, Any] | None,
    plots: dict[str, Any] | None = None,
    cost: dict[str, Any] | None = None,
) -> str:
    """The report page; `plots` is plots.json's content (its plots drawn in order); `cost`
    the estimate of the steps so far (cost_section)."""
    ctx = evaluation.context
    verdict = "passed" if evaluation.passed else "failed"
    metrics = dict(evaluation.metrics)
    champion = dict(evaluation.champion_metrics) or None
    entries = (plots or {}).get("plots", [])
    plot = "<h2>Plots</h2>" + "".join(figure_section(p) for p in entries) if entries else ""
    quantiles = details.get("residual_quantiles")
    if quantiles:
        plot += (
            "<p>residual quantiles: "
            + ", ".join(f"q{_e(q)} {_num(v)}" for q, v in sorted(quantiles.items()))
            + "</p>"
        )
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
        f"{plot}{cost_section(cost)}<h2>Lineage</h2><table>{lineage_rows}</table></body></html>"
    )
