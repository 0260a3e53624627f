"""The dashboard over a store the real proxy filled: SDK clients -> mitmdump -> fake upstream,
then ``burnmeter serve`` over that SQLite file (the proxy still running) in Chromium. For
every period the cards read what ``burnmeter summary --format json`` prints and what
``/admin/user-stats`` answers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from click.testing import CliRunner

from burnmeter.config import Config
from burnmeter.store import open_store
from stats.cli import cli
from tests.admin_server import PERIODS
from tests.admin_server import TIMEOUT_MS
from tests.admin_server import TOKEN
from tests.admin_server import cards
from tests.admin_server import choose
from tests.admin_server import chromium
from tests.admin_server import json_field
from tests.admin_server import require_browser
from tests.admin_server import shown
from tests.admin_server import start_server
from tests.e2e.harness import OHMYGPT_HOST
from tests.e2e.harness import OPENHANDS_HOST
from tests.e2e.harness import Accounts
from tests.e2e.harness import Proxy
from tests.e2e.harness import Upstream
from tests.e2e.harness import wait_logs

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.timeout(180)]

require_browser()

MESSAGES: list[Any] = [{"role": "user", "content": "Count from one to twenty, slowly."}]


@pytest.fixture
def own_proxy(upstream: Upstream, config_path: Path, tmp_path: Path) -> Iterator[Proxy]:
    """A proxy of its own: its store holds exactly this test's traffic."""
    with Proxy(upstream, config_path, tmp_path / "burnmeter.db", tmp_path) as handle:
        yield handle


def test_dashboard_shows_what_the_cli_prints_for_proxy_traffic(
    own_proxy: Proxy, config: Config, config_path: Path
) -> None:
    store = open_store(own_proxy.db_url, config.pools)
    store.ensure_schema(config.log_ttl_days)  # the proxy may still be creating it
    accounts = Accounts(store)
    alice = accounts.new(creditsNew="5", credits="3", refCredits="1")
    bob = accounts.new(creditsNew="2", credits="4", refCredits="0")
    for account, host in ((alice, OPENHANDS_HOST), (bob, OHMYGPT_HOST), (alice, OHMYGPT_HOST)):
        client = openai.OpenAI(
            base_url=own_proxy.base_url + "/v1",
            api_key=account.key,
            default_headers={"Host": host},
            max_retries=0,
            timeout=20,
        )
        client.chat.completions.create(model="fake-gpt", messages=MESSAGES)
        with client.chat.completions.create(
            model="fake-gpt",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        ) as stream:
            for _ in stream:
                pass
    anthropic.Anthropic(
        base_url=own_proxy.base_url,
        api_key=bob.key,
        default_headers={"Host": OPENHANDS_HOST},
        max_retries=0,
        timeout=20,
    ).messages.create(model="fake-claude", max_tokens=64, messages=MESSAGES)
    wait_logs(store, alice.user_id, 4)
    wait_logs(store, bob.user_id, 3)
    store.close()
    # every log is older than this "now", so all three readers see the same windows
    now = (datetime.now(UTC) + timedelta(seconds=1)).replace(microsecond=0)
    now_param = now.isoformat().replace("+00:00", "Z")

    server = start_server(config_path, own_proxy.db_path)  # the proxy keeps running
    try:
        with chromium() as browser:
            page = browser.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(f"{server.base}/admin?token={TOKEN}&now={now_param}")
            page.wait_for_selector("main[aria-busy=false] .cards")
            for period in PERIODS:
                choose(page, period)
                summary = CliRunner().invoke(
                    cli,
                    ["--db", own_proxy.db_url, "--config", str(config_path), "summary",
                     "--period", period, "--now", now_param, "--format", "json"],
                )  # fmt: skip
                assert summary.exit_code == 0, summary.output
                printed = json.loads(summary.stdout)
                status, answered = server.get(f"/admin/user-stats?period={period}&now={now_param}")
                assert status == 200 and answered == printed
                assert printed["requests"] == 7 and printed["total_creditsNewUsed"] > 0
                assert printed["total_credits_used"] > 0
                for metric, text in cards(page).items():
                    assert text == shown(metric, json_field(printed, metric)), (period, metric)
    finally:
        server.stop()
