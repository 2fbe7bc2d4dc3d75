"""The console in a real browser (Playwright driving Debian's chromium) on one stack with iris
v1 champion, v2 a 20% canary and kept failures: every page opened and screenshotted, promote
and rollback clicked through their confirmation with the traffic seen to change, a failure
replayed and seen to land."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlpipe.messaging import events
from tests.integration.console_stack import MODEL, ConsoleStack, console_stack

CHROMIUM = "/usr/bin/chromium"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.integration,
    pytest.mark.skipif(
        not shutil.which(CHROMIUM), reason=f"no {CHROMIUM} (apt-get install chromium)"
    ),
]

playwright_sync = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def stack(emulators: object) -> Iterator[ConsoleStack]:
    with console_stack() as built:
        yield built


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with playwright_sync.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser: object, tmp_path: Path) -> Iterator[object]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})  # type: ignore[attr-defined]
    opened = context.new_page()
    yield opened
    context.close()


def shot(page: object, out: Path, name: str) -> Path:
    path = out / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)  # type: ignore[attr-defined]
    assert path.stat().st_size > 5_000, f"{name}: an empty screenshot"
    return path


def test_every_page_opens_and_draws(stack: ConsoleStack, page: object, tmp_path: Path) -> None:
    p = page  # playwright.sync_api.Page
    base = stack.console_url
    requested: list[str] = []
    p.on("request", lambda r: requested.append(r.url))  # type: ignore[attr-defined]

    p.goto(f"{base}/runs")  # type: ignore[attr-defined]
    rows = p.locator("#runs tbody tr[data-run]")  # type: ignore[attr-defined]
    assert rows.count() == 4
    shot(p, tmp_path, "runs")

    p.select_option("select[name=state]", "failed")  # type: ignore[attr-defined]
    p.click("form.filters button")  # type: ignore[attr-defined]
    assert p.locator("#runs tbody tr[data-run]").count() == 1  # type: ignore[attr-defined]
    assert "state=failed" in p.url  # type: ignore[attr-defined]

    p.goto(f"{base}/runs/{stack.runs['v2']}")  # type: ignore[attr-defined]
    # The charts come from the console's own copy of vega: drawn, not fetched from a CDN.
    for chart in ("chart-timeline", "chart-gates", "chart-metrics"):
        p.wait_for_selector(f"#{chart}[data-drawn=yes] svg", timeout=10_000)  # type: ignore[attr-defined]
    p.wait_for_selector("#chart-confusion[data-drawn=yes] svg", timeout=10_000)  # type: ignore[attr-defined]
    shot(p, tmp_path, "run")
    # The regression example's run: its own plots, drawn.
    p.goto(f"{base}/runs/{stack.runs['regression']}")  # type: ignore[attr-defined]
    for chart in ("chart-predicted-vs-actual", "chart-residuals", "chart-segment"):
        p.wait_for_selector(f"#{chart}[data-drawn=yes] svg", timeout=10_000)  # type: ignore[attr-defined]
    shot(p, tmp_path, "run-regression")
    p.goto(f"{base}/runs/{stack.runs['v2']}")  # type: ignore[attr-defined]
    p.click("#report-link")  # type: ignore[attr-defined]
    assert p.url.endswith("/report.html")  # type: ignore[attr-defined]

    for name in ("models", "failures", "drift", "batches", "actions"):
        reply = p.goto(f"{base}/{name}")  # type: ignore[attr-defined]
        assert reply.status == 200, name
        if name == "drift":
            p.wait_for_selector("#chart-drift-1[data-drawn=yes] svg", timeout=10_000)  # type: ignore[attr-defined]
        shot(p, tmp_path, name)

    missing = p.goto(f"{base}/runs/0123456789abcdef")  # type: ignore[attr-defined]
    assert missing.status == 404
    assert p.inner_text("#error-title") == "Not found"  # type: ignore[attr-defined]
    shot(p, tmp_path, "not-found")
    # Everything the pages loaded came from the console itself: no CDN, no other origin.
    assert requested and all(url.startswith(base + "/") for url in requested), requested
    assert f"{base}/static/vega.min.js" in requested


def traffic(p: object) -> str:
    return p.inner_text(f"#traffic-{MODEL}")  # type: ignore[attr-defined]


def test_promote_and_rollback_move_the_traffic(
    stack: ConsoleStack, page: object, tmp_path: Path
) -> None:
    p = page
    p.goto(f"{stack.console_url}/models")  # type: ignore[attr-defined]
    assert "v1 80% champion" in traffic(p) and "v2 20% canary" in traffic(p)

    p.click(f"#promote-{MODEL}")  # type: ignore[attr-defined]
    shot(p, tmp_path, "confirm-promote")
    p.click("#confirm")  # type: ignore[attr-defined]
    assert "traffic now v2 100% champion" in p.inner_text("#outcome")  # type: ignore[attr-defined]
    p.goto(f"{stack.console_url}/models")  # type: ignore[attr-defined]
    assert traffic(p) == "Traffic: v2 100% champion"
    shot(p, tmp_path, "models-promoted")

    p.click(f"#rollback-{MODEL}")  # type: ignore[attr-defined]
    p.click("#confirm")  # type: ignore[attr-defined]
    assert "traffic now v1 100% champion" in p.inner_text("#outcome")  # type: ignore[attr-defined]
    p.goto(f"{stack.console_url}/models")  # type: ignore[attr-defined]
    assert traffic(p) == "Traffic: v1 100% champion"
    shot(p, tmp_path, "models-rolled-back")


def test_a_replayed_failure_lands_on_its_topic(
    stack: ConsoleStack, page: object, tmp_path: Path
) -> None:
    p = page
    stack.cloud.watch(events.TRAINING_COMPLETED)
    p.goto(f"{stack.console_url}/failures")  # type: ignore[attr-defined]
    row = p.locator(f'tr[data-failure="{stack.quarantined}"]')  # type: ignore[attr-defined]
    assert "gs://elsewhere/model.joblib" in row.inner_text()  # the kept message's preview

    row.locator("button").click()
    p.click("#confirm")  # type: ignore[attr-defined]
    assert p.inner_text("#outcome").startswith(f"→ {events.TRAINING_COMPLETED} message")  # type: ignore[attr-defined]

    landed = stack.cloud.pulled(events.TRAINING_COMPLETED)
    assert [e.model_uri for e in landed] == ["gs://elsewhere/model.joblib"]
    p.goto(f"{stack.console_url}/failures")  # type: ignore[attr-defined]
    replayed = p.locator(f'tr[data-failure="{stack.quarantined}"] .replayed')  # type: ignore[attr-defined]
    assert replayed.inner_text().startswith(f"replayed as {events.TRAINING_COMPLETED}/")
    shot(p, tmp_path, "failures-replayed")
