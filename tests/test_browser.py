"""The delivery log page in a real headless Chromium: deliveries over HTTP,
the list, a filter, a failed event's traceback, and the Re-run button; a
merchant's staff's list, with the badges of Celery's rows; the console: a
search, the chart, a bulk re-run, an export, and the phone layout.

Chromium is Debian's (``apt-get install chromium``), driven by Playwright
for Python through ``executable_path``; Playwright's own browser downloads
are never used. Without Chromium the test skips, or fails when
``PLOINTS_REQUIRE_SERVICES=1``. With ``PLOINTS_SCREENSHOT=1`` it saves the
screenshots the docs show in ``docs/_static/``.
"""

from __future__ import annotations

import json
import os
import threading
import time
import typing as t
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from flask import Flask
from flask import request
from werkzeug.serving import WSGIRequestHandler
from werkzeug.serving import make_server

from flask_ploints import Event
from flask_ploints import PlointsWebhooks
from flask_ploints._events import parse_event
from flask_ploints._samples import SAMPLE_DATA
from flask_ploints._samples import build_event
from flask_ploints._signature import SIGNATURE_HEADER
from flask_ploints._signature import sign
from flask_ploints.delivery_log import DeliveryLog

from .support import SECRET
from .support import missing

if t.TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM = os.environ.get("PLOINTS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
STATIC = Path(__file__).parent.parent / "docs" / "_static"
# Generous for a page served on localhost; a hung page fails in seconds.
TIMEOUT_MS = 10_000


def _require_chromium() -> None:
    """Skip without Chromium or Playwright, or fail instead when
    ``PLOINTS_REQUIRE_SERVICES=1``, like ``support.require_service``.
    """
    problem = None
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        problem = f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "Playwright for Python is not installed (pip install playwright)"
    if problem is not None:
        missing(problem)


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class Server:
    """The app served over HTTP on a random local port, in a thread."""

    def __init__(self, app: Flask) -> None:
        self._server = make_server(
            "127.0.0.1", 0, app, threaded=True, request_handler=_QuietHandler
        )
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Server:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def deliver(self, body: dict[str, t.Any] | bytes, *, forged: bool = False) -> int:
        """POST a body to the webhook endpoint as Ploints does; return the
        status.
        """
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        signature = "0" * 64 if forged else sign(raw, SECRET)
        sent = urllib.request.Request(
            f"{self.url}/webhooks/ploints",
            data=raw,
            method="POST",
            headers={"Content-Type": "application/json", SIGNATURE_HEADER: signature},
        )
        try:
            with urllib.request.urlopen(sent, timeout=5) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as error:
            with error:
                return error.code


@pytest.fixture
def log(tmp_path: Path, unique: str) -> t.Iterator[DeliveryLog]:
    log = DeliveryLog.from_url(f"sqlite:///{tmp_path / 'log.db'}", table_name=unique)
    yield log
    log.engine.dispose()


def _shop(log: DeliveryLog, broken: set[str]) -> Flask:
    app = Flask("ploints_browser")
    app.testing = True
    app.config.update(
        SECRET_KEY="browser-test",
        PLOINTS_WEBHOOK_SECRET=SECRET,
        PLOINTS_DELIVERY_LOG=log,
        # As an app would check its staff login; here: local requests only.
        PLOINTS_DELIVERY_LOG_ACCESS=lambda: request.remote_addr == "127.0.0.1",
    )
    webhooks = PlointsWebhooks(app)

    @webhooks.on_any
    def handle(event: Event) -> None:
        time.sleep(0.003)  # a real handler's write to a database
        if event.type in broken:
            raise LookupError(f"no reward named {event.data.get('reward')!r} in the catalogue")

    return app


def _deliveries(server: Server) -> None:
    """A morning's traffic: processed events, a retry, a forged request, a
    signed body that is not an event, and one whose handler fails.
    """
    for number, event_type in enumerate(
        ["customer.created", "points.earned", "customer.tier_changed", "badge.issued"], 1
    ):
        body = build_event(event_type, SAMPLE_DATA[event_type], id=f"evt_7f3a{number:02d}")
        assert server.deliver(body) == 200
    assert server.deliver(build_event("points.earned", id="evt_7f3a02")) == 200  # a retry
    assert server.deliver(build_event("points.redeemed", id="evt_9c0d11"), forged=True) == 401
    failing = build_event("reward.redeemed", SAMPLE_DATA["reward.redeemed"], id="evt_b41e07")
    assert server.deliver(failing) == 500
    assert server.deliver(b'{"id": "evt_x", "type": "points.earned"}') == 400
    assert server.deliver(build_event("campaign.conversion", id="evt_c2d905")) == 200
    assert server.deliver(build_event("points.redeemed", id="evt_e81f30")) == 200


def _rows(page: Page) -> list[str]:
    return [row.inner_text() for row in page.locator("tbody tr").all()]


def _screenshot(page: Page, name: str, *, full_page: bool = True) -> None:
    if os.environ.get("PLOINTS_SCREENSHOT") == "1":
        STATIC.mkdir(exist_ok=True)
        page.screenshot(path=str(STATIC / name), full_page=full_page)


def test_rerun_a_failed_delivery_in_chromium(log: DeliveryLog) -> None:
    _require_chromium()
    from playwright.sync_api import sync_playwright

    broken = {"reward.redeemed"}
    app = _shop(log, broken)
    with Server(app) as server, sync_playwright() as playwright:
        _deliveries(server)
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            page.set_default_timeout(TIMEOUT_MS)

            page.goto(f"{server.url}/ploints/deliveries")
            assert page.title() == "Deliveries · Ploints delivery log"
            rows = _rows(page)
            assert len(rows) == 8
            outcomes = page.locator("tbody .badge").all_inner_texts()
            assert sorted(set(outcomes)) == ["duplicate", "failed", "processed"]
            notice = page.locator(".notice").inner_text()
            assert notice.startswith("2 rejected requests in the last 24 hours are not listed")
            _screenshot(page, "delivery-log.png")

            page.get_by_role("link", name="show rejected requests").click()
            page.wait_for_url("**/ploints/deliveries?outcome=rejected")
            assert len(_rows(page)) == 2
            assert "invalid signature" in page.locator("tbody").inner_text()
            page.goto(f"{server.url}/ploints/deliveries")

            page.select_option("select[name=outcome]", "failed")
            page.get_by_role("button", name="Filter").click()
            page.wait_for_url("**/ploints/deliveries?q=&since=&until=&type=&outcome=failed")
            (row,) = _rows(page)
            assert "evt_b41e07" in row and "reward.redeemed" in row
            assert "LookupError: no reward named 'Free coffee'" in row

            page.get_by_role("link", name="evt_b41e07").click()
            page.wait_for_url("**/ploints/deliveries/*")
            traceback = page.locator("pre.traceback").inner_text()
            assert traceback.startswith("Traceback (most recent call last):")
            assert "in handle" in traceback
            assert '"reward": "Free coffee"' in page.locator("pre.payload").inner_text()
            _screenshot(page, "delivery-log-failed.png")

            broken.clear()  # the fix is deployed
            page.get_by_role("button", name="Re-run").click()
            page.wait_for_load_state()
            assert page.locator(".flash").inner_text() == "Re-run of evt_b41e07: processed."
            history = page.locator("tbody .badge").all_inner_texts()
            assert history == ["processed", "failed"]
        finally:
            browser.close()
    assert [row.outcome for row in log.recent(event_id="evt_b41e07")] == ["processed", "failed"]


def test_a_merchants_staff_sees_its_rows_and_the_celery_badges_in_chromium(
    log: DeliveryLog,
) -> None:
    _require_chromium()
    from playwright.sync_api import sync_playwright

    app = Flask("ploints_browser")
    app.testing = True
    app.config.update(
        SECRET_KEY="browser-test",
        PLOINTS_WEBHOOK_URL="/webhooks/ploints/<account>",
        PLOINTS_WEBHOOK_SECRET={"m1": SECRET, "m2": SECRET}.get,
        PLOINTS_DELIVERY_LOG=log,
        # The staff of merchant m1 only.
        PLOINTS_DELIVERY_LOG_ACCESS=lambda account: account == "m1",
    )
    PlointsWebhooks(app)
    ids = {}
    for outcome, account, event_id in [
        ("queued", "m1", "evt_q1"),
        ("retrying", "m1", "evt_q1"),
        ("processed", "m2", "evt_m2"),
    ]:
        raw = json.dumps(build_event("points.earned", id=event_id)).encode()
        reason = (
            "attempt 1 of 4; next at 09:00:00 UTC: OSError: down" if outcome == "retrying" else None
        )
        ids[event_id] = log.record(
            outcome, name="ploints", event=parse_event(raw, account), reason=reason
        )
    with Server(app) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(f"{server.url}/ploints/deliveries")
            assert page.locator("tbody .badge").all_inner_texts() == ["retrying", "queued"]
            assert "evt_m2" not in page.locator("body").inner_text()
            for name in ("queued", "retrying"):
                style = page.locator(f"tbody .badge.{name}").evaluate(
                    "badge => getComputedStyle(badge).backgroundColor"
                )
                assert style not in ("rgba(0, 0, 0, 0)", "transparent"), (name, style)
            answer = page.goto(f"{server.url}/ploints/deliveries/{ids['evt_m2']}")
            assert answer is not None
            assert answer.status == 404
        finally:
            browser.close()


def _morning(log: DeliveryLog, now: float) -> None:
    """Rows over the last day, for the chart: a steady flow of processed
    events and duplicates, a burst of failures after a deploy, some forged
    requests.
    """
    for hour in range(24, 0, -1):
        at = now - hour * 3600
        for number in range(3 + hour % 5):
            data = {"customerEmail": f"c{hour}{number}@example.org", "amount": 10}
            body = build_event("points.earned", data, id=f"evt_h{hour:02d}{number}")
            raw = json.dumps(body).encode()
            outcome = "duplicate" if number == 4 else "processed"
            if hour in (7, 6) and number < 3:
                outcome = "failed"
            log.record(outcome, name="ploints", event=parse_event(raw), received_at=at + number)
        if hour % 6 == 0:
            log.record(
                "rejected",
                name="ploints",
                reason="invalid signature",
                status=401,
                client="198.51.100.23",
                received_at=at + 30,
            )


def test_the_console_in_chromium(log: DeliveryLog, tmp_path: Path) -> None:
    """A search, the chart, a bulk re-run, an export and the phone layout,
    with no CSP violation on any page.
    """
    _require_chromium()
    from playwright.sync_api import sync_playwright

    broken = {"reward.redeemed"}
    app = _shop(log, broken)
    _morning(log, time.time() - 600)
    with Server(app) as server, sync_playwright() as playwright:
        _deliveries(server)
        failing = build_event("reward.redeemed", SAMPLE_DATA["reward.redeemed"], id="evt_d07a55")
        assert server.deliver(failing) == 500
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        violations: list[str] = []
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
            page.set_default_timeout(TIMEOUT_MS)
            page.on(
                "console",
                lambda message: (
                    violations.append(message.text)
                    if "Content Security Policy" in message.text
                    else None
                ),
            )
            page.goto(f"{server.url}/ploints/deliveries")
            # The chart: bars drawn, with their colours from the style sheet.
            bars = page.locator("svg.bars rect.bar")
            assert bars.count() > 24
            fill = page.locator("svg.bars rect.bar.failed").first.evaluate(
                "bar => getComputedStyle(bar).fill"
            )
            assert fill == "rgb(217, 45, 32)"
            box = page.locator("svg.bars").bounding_box()
            assert box is not None and box["width"] > 1000 and box["height"] == 126
            totals = page.locator("ul.totals").inner_text()
            assert "failed 8" in totals and "rejected 5" in totals
            _screenshot(page, "delivery-log-chart.png", full_page=False)

            # Find: a customer's email, anywhere in the payloads.
            page.fill("input[name=q]", "JANE@example.com")
            page.get_by_role("button", name="Filter").click()
            page.wait_for_url("**/ploints/deliveries?q=JANE%40example.com&**")
            found = page.locator("td.id").all_inner_texts()
            assert found == [
                "evt_d07a55",
                "evt_e81f30",
                "evt_b41e07",
                "evt_7f3a02",
                "evt_7f3a04",
                "evt_7f3a03",
                "evt_7f3a02",
            ]
            assert "failed 2" in page.locator("ul.totals").inner_text()
            _screenshot(page, "delivery-log-search.png")

            # Act: re-run both failures of the search, after the fix.
            broken.clear()
            for box_ in page.locator("input[name=id]").all():
                box_.check()
            page.get_by_role("button", name="Re-run selected").click()
            page.wait_for_load_state()
            assert page.locator(".flash").inner_text() == "Re-ran 2 events: 2 processed."
            assert page.url.endswith("/ploints/deliveries?q=JANE@example.com")
            _screenshot(page, "delivery-log-bulk.png")

            # Export the view.
            with page.expect_download() as download:
                page.get_by_role("link", name="CSV").click()
            saved = tmp_path / "export.csv"
            download.value.save_as(saved)
            lines = saved.read_text().splitlines()
            assert lines[0] == (
                "id,received_at,endpoint,account,event_id,event_type,outcome,status,client,"
                "reason,duration"
            )
            # The re-runs' rows first, then the search's seven.
            assert [line.split(",")[4:7:2] for line in lines[1:4]] == [
                ["evt_b41e07", "processed"],
                ["evt_d07a55", "processed"],
                ["evt_d07a55", "failed"],
            ]
            assert len(lines) == 1 + 2 + 7

            # Phone width: every column on screen, the outcome included.
            phone = browser.new_page(viewport={"width": 390, "height": 844})
            phone.set_default_timeout(TIMEOUT_MS)
            phone.goto(f"{server.url}/ploints/deliveries")
            width = phone.evaluate("document.documentElement.scrollWidth")
            assert width <= 390
            for badge in phone.locator("tbody .badge").all()[:10]:
                edge = badge.bounding_box()
                assert edge is not None and edge["x"] + edge["width"] <= 390
            phone.evaluate("document.querySelector('.toolbar').scrollIntoView()")
            _screenshot(phone, "delivery-log-phone.png", full_page=False)
            phone.goto(f"{server.url}/ploints/deliveries?outcome=rejected")
            assert phone.evaluate("document.documentElement.scrollWidth") <= 390
        finally:
            browser.close()
    assert violations == []
