"""Durable mode through the real mitmdump: ``--set metering_durable=true`` serves and charges
plain and streamed answers (mitmproxy awaits what the ``response`` hook returns: the fsync).
The ordering of the fsync before the end of the response is shown in
``tests/test_addon_durable.py``."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from burnmeter.config import Config
from burnmeter.store.base import Store
from tests.e2e.harness import Accounts
from tests.e2e.harness import Proxy
from tests.e2e.harness import Upstream
from tests.e2e.harness import proxy_store
from tests.e2e.harness import wait_logs
from tests.e2e.test_proxy_e2e import MESSAGES
from tests.e2e.test_proxy_e2e import oa


@pytest.fixture(scope="module")
def durable_proxy(
    upstream: Upstream, config_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    workdir = tmp_path_factory.mktemp("durable")
    durable = {"metering_durable": "true"}
    with Proxy(upstream, config_path, workdir / "burnmeter.db", workdir, options=durable) as handle:
        yield handle


@pytest.fixture(scope="module")
def durable_store(durable_proxy: Proxy, config: Config) -> Iterator[Store]:
    with proxy_store(durable_proxy, config) as opened:
        yield opened


def test_durable_mode_charges_plain_and_streamed_answers(
    durable_proxy: Proxy, durable_store: Store
) -> None:
    account = Accounts(durable_store).new(creditsNew="5")
    client = oa(durable_proxy, account.key)
    answer = client.chat.completions.create(
        model="fake-gpt", messages=MESSAGES, extra_body={"x_chunks": 3}
    )
    assert answer.usage is not None and answer.usage.completion_tokens == 3
    chunks = list(
        client.chat.completions.create(
            model="fake-gpt", messages=MESSAGES, stream=True, extra_body={"x_chunks": 4}
        )
    )
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 4
    logs = wait_logs(durable_store, account.user_id, 2)
    assert sorted(log["outputTokens"] for log in logs) == [3, 4]
    assert all(log["creditsCost"] > 0 and log["usageSource"] == "reported" for log in logs)
    spent = sum((log["creditsCost"] for log in logs), Decimal(0))
    assert durable_store.balance(account.user_id, durable_store.pools["openhands"]) == 5 - spent
    assert "fsync slower" not in durable_proxy.output()
