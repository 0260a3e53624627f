"""The metering addon's alerts (``addons/alerts.py``): options, and from settlement to POST."""

from __future__ import annotations

import json
import time
from decimal import Decimal as D
from pathlib import Path
from types import SimpleNamespace

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons
from prometheus_client import CollectorRegistry
from prometheus_client import Counter

from addons.alerts import Alerts
from addons.metering import Metering
from burnmeter.alerts import Rule
from burnmeter.store.base import Settlement


def test_the_proxy_refuses_to_start_without_the_webhook(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BM_TEST_HOOK", raising=False)
    monkeypatch.chdir(tmp_path)  # the addon's first configure opens the default ./burnmeter.db
    config_path = tmp_path / "burnmeter.toml"
    config_path.write_text(
        '[[alerts]]\nkind = "balance_below"\nthreshold = 1\nwebhook_env = "BM_TEST_HOOK"\n'
    )
    metering = Metering()
    db = f"sqlite:///{tmp_path / 'b.db'}"
    with taddons.context(metering) as tctx:
        with pytest.raises(
            exceptions.OptionsError,
            match=r"^metering_config: alerts.0.webhook_env: \$BM_TEST_HOOK is not set$",
        ):
            tctx.configure(metering, metering_config=str(config_path), metering_db=db)
        monkeypatch.setenv("BM_TEST_HOOK", "http://127.0.0.1:9/hook")
        tctx.configure(metering, metering_config=str(config_path), metering_db=db)
        assert metering.alerts is not None and metering.alerts.rules[0].threshold == 1
        metering.done()
    assert metering.alerts is None


def test_settled_queues_the_crossings_and_counts_their_delivery() -> None:
    registry = CollectorRegistry()
    counters = {
        what: Counter(f"alerts_{what}", what, ("webhook",), registry=registry)
        for what in ("sent", "failed", "dropped")
    }
    metrics = SimpleNamespace(alerts=counters)
    rule = Rule("balance_below", D(1), frozenset(), "http://127.0.0.1:9/x?k=secret")
    alerts = Alerts((rule,), lambda: metrics)  # type: ignore[arg-type,return-value]
    posted: list[bytes] = []
    alerts.sender.post = lambda url, body, timeout: posted.append(body)
    alerts.settled(Settlement("r1", "alice", "openhands", D("0.5"), 0, 0, 0, None, {}), D("0.75"))
    alerts.settled(Settlement("r2", "alice", "openhands", D("0.5"), 0, 0, 0, None, {}), D("0.25"))
    deadline = time.monotonic() + 10
    while registry.get_sample_value("alerts_sent_total", {"webhook": "http://127.0.0.1:9"}) != 1:
        assert time.monotonic() < deadline, "not delivered"
        time.sleep(0.005)
    alerts.stop()
    assert len(posted) == 1 and json.loads(posted[0])["threshold"] == 1.0  # r2 crossed nothing
