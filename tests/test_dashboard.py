"""The dashboard in headless Chromium, over a real ``burnmeter serve`` and a seeded store.

Every period button is clicked; each card must show the JSON endpoint's number and the
number worked out from the seed by hand (tests/admin_seed.py). Skipped without a browser,
except under CI, where a missing browser is an error.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from burnmeter.config import load_config
from burnmeter.store.sqlite import SqliteStore
from tests.admin_seed import NOW_PARAM
from tests.admin_seed import expected_summary
from tests.admin_seed import window_start_iso
from tests.admin_server import PERIODS
from tests.admin_server import TIMEOUT_MS
from tests.admin_server import TOKEN
from tests.admin_server import Server
from tests.admin_server import cards
from tests.admin_server import choose
from tests.admin_server import chromium
from tests.admin_server import json_field
from tests.admin_server import require_browser
from tests.admin_server import seeded_sqlite
from tests.admin_server import shown
from tests.admin_server import start_server

pytestmark = [pytest.mark.browser, pytest.mark.slow]

require_browser()
sync_api = pytest.importorskip("playwright.sync_api")


# -- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config, db = seeded_sqlite(tmp_path_factory.mktemp("dashboard"))
    running = start_server(config, db)
    yield running
    running.stop()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    opened.set_default_timeout(TIMEOUT_MS)
    yield opened
    context.close()


def open_dashboard(page: Any, server: Server, query: str = "") -> None:
    """Opens the printed ``?token=`` address once, as an operator does."""
    page.goto(f"{server.base}/admin?token={TOKEN}&now={NOW_PARAM}{query}")
    page.wait_for_selector("main[aria-busy=false] .cards")


# -- tests -------------------------------------------------------------------------------
def test_every_period_button_shows_the_endpoint_and_the_seed(page: Any, server: Server) -> None:
    open_dashboard(page, server)
    assert TOKEN not in page.url and TOKEN not in page.content()
    assert page.get_attribute("button[aria-pressed=true]", "data-period") == "8h"
    assert [
        b.get_attribute("data-period") for b in page.query_selector_all("button[data-period]")
    ] == PERIODS
    for period in PERIODS:
        choose(page, period)
        assert f"period={period}" in page.url
        pressed = page.query_selector_all("button[aria-pressed=true]")
        assert [b.get_attribute("data-period") for b in pressed] == [period]
        status, record = server.get(
            f"/admin/user-stats?period={period}&now={NOW_PARAM}&tz=Asia/Ho_Chi_Minh"
        )
        assert status == 200
        on_page = cards(page)
        expected = expected_summary(period)
        assert set(on_page) == set(expected)
        for metric, text in on_page.items():
            assert text == shown(metric, json_field(record, metric)), (period, metric)
            assert text == shown(metric, expected[metric]), (period, metric)
        window = page.query_selector("p.window")
        assert window.get_attribute("data-window-start") == window_start_iso(period)


def test_24h_starts_at_local_midnight_and_legacy_logs_are_burned(page: Any, server: Server) -> None:
    open_dashboard(page, server, "&period=24h")
    assert page.get_attribute("p.window", "data-window-start") == "2025-03-10T00:00:00+07:00"
    on_page = cards(page)
    # ohmygpt 1.2345 + 0.01 + 3, legacy 0.25 + 0.125 (null) + 0.0625 (at 00:00:00 local);
    # bob's 4.5 at 23:59:59 the evening before is outside although a rolling day holds it
    assert on_page["total_credits_used"] == "$4.6820"
    assert on_page["total_creditsNewUsed"] == "$2.5000"  # openhands 0.5 + 2, no legacy log
    page.click("button[data-period='3d']")
    page.wait_for_selector("main[aria-busy=false] button[data-period='3d'][aria-pressed=true]")
    assert cards(page)["total_creditsNewUsed"] == "$7.0000"  # + 4.5 from the evening before


def test_zone_is_shown_and_changeable(page: Any, server: Server) -> None:
    open_dashboard(page, server, "&period=24h")
    assert page.input_value("form.zone input[name=tz]") == "Asia/Ho_Chi_Minh"
    page.fill("form.zone input[name=tz]", "UTC")
    page.click("form.zone button[type=submit]")
    page.wait_for_url(re.compile(r"tz=UTC"))
    page.wait_for_selector("main[aria-busy=false] .cards")
    # now is still 10:00 local to the zone the URL names: 10:00Z, the day from 00:00Z (07:00+07)
    assert page.get_attribute("p.window", "data-window-start") == "2025-03-10T00:00:00+00:00"
    assert page.get_attribute("button[aria-pressed=true]", "data-period") == "24h"
    status, record = server.get(f"/admin/user-stats?period=24h&now={NOW_PARAM}&tz=UTC")
    assert status == 200
    assert cards(page)["total_credits_used"] == shown(
        "total_credits_used", record["total_credits_used"]
    )
    page.click("button[data-period='1h']")
    page.wait_for_selector("main[aria-busy=false] button[data-period='1h'][aria-pressed=true]")
    assert "tz=UTC" in page.url  # the zone stays when the period changes


def test_back_reload_and_links_keep_the_view(page: Any, server: Server) -> None:
    open_dashboard(page, server)
    choose(page, "1h")
    choose(page, "3d")
    page.go_back()  # the browser's history holds each period the buttons chose
    page.wait_for_selector("main[aria-busy=false] button[data-period='1h'][aria-pressed=true]")
    assert "period=1h" in page.url
    assert cards(page)["total_credits_used"] == shown(
        "total_credits_used", expected_summary("1h")["total_credits_used"]
    )
    page.reload()
    assert page.get_attribute("button[aria-pressed=true]", "data-period") == "1h"
    linked = page.context.new_page()  # a link opened later: the session, no token
    linked.goto(f"{server.base}/admin?period=7d&now={NOW_PARAM}")
    assert linked.get_attribute("button[aria-pressed=true]", "data-period") == "7d"
    assert cards(linked)["total_creditsNewUsed"] == shown(
        "total_creditsNewUsed", expected_summary("7d")["total_creditsNewUsed"]
    )


def test_buttons_work_without_javascript(browser: Any, server: Server) -> None:
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        open_dashboard(page, server, "&tz=Asia/Ho_Chi_Minh")
        page.click("button[data-period='30d']")  # submits the form: a plain navigation
        page.wait_for_url(re.compile(r"period=30d"))
        assert "tz=Asia" in page.url and "now=2025-03-10" in page.url
        assert page.get_attribute("button[aria-pressed=true]", "data-period") == "30d"
        assert cards(page)["total_burned"] == shown(
            "total_burned", expected_summary("30d")["total_burned"]
        )
    finally:
        context.close()


def test_tables_and_chart_match_the_endpoints(page: Any, server: Server) -> None:
    open_dashboard(page, server, "&period=30d")
    _, users = server.get(f"/admin/users?period=30d&now={NOW_PARAM}&limit=10")
    rows = page.query_selector_all("table.users tbody tr")
    assert [r.get_attribute("data-user") for r in rows] == [u["userId"] for u in users["users"]]
    first = users["users"][0]
    assert first["userId"] == "bob"  # 20 + 4.5 + 3 + 0.5 in 30 days
    cell = page.inner_text("tr[data-user=bob] td[data-field=creditsBurned]")
    assert cell == shown("total_burned", first["creditsBurned"]) == "$28.0000"
    _, models = server.get(f"/admin/model-stats?period=30d&now={NOW_PARAM}")
    names = [
        r.get_attribute("data-model") for r in page.query_selector_all("table.models tbody tr")
    ]
    assert names == [m["model"] for m in models["models"]]
    _, series = server.get(f"/admin/series?period=30d&now={NOW_PARAM}")
    assert series["bucket"] == "day"
    bars = page.query_selector_all("svg.chart rect")
    spent = [(r, pool) for r in series["series"] for pool, v in r["burned"].items() if v > 0]
    assert len(bars) == len(spent) > 0


def test_refreshes_every_30_seconds(browser: Any, tmp_path: Path) -> None:
    config, db = seeded_sqlite(tmp_path)
    server = start_server(config, db)
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.clock.install()
        open_dashboard(page, server, "&period=1h")
        before = cards(page)["total_credits_used"]
        assert before == "$1.2445"
        writer = SqliteStore(db, load_config(config).pools)  # a proxy writing meanwhile
        writer.import_log(
            {"_id": "late", "userId": "eve", "creditType": "ohmygpt", "creditsCost": Decimal("2"),
             "createdAt": datetime(2025, 3, 10, 2, 59, tzinfo=UTC)}
        )  # fmt: skip
        writer.close()
        page.clock.run_for(29_000)
        assert cards(page)["total_credits_used"] == before  # not yet
        page.clock.run_for(1_000)
        sync_api.expect(page.locator("[data-metric=total_credits_used]")).to_have_text("$3.2445")
    finally:
        context.close()
        server.stop()
