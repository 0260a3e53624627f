"""What counting costs per request, in process: ``python scripts/bench_metrics.py [--n N]``.

Times what ``metering_metrics`` adds to one request's hooks (five timed hooks, the request
counted at its end, one settlement's cost, tokens and time to first byte), on a real
``Metrics`` registry and a real mitmproxy flow, against the same hooks without metrics. The
figures are CPU time of the event-loop thread per request; the proxy benchmark
(``bench_proxy.py --metrics``) shows the same cost end to end, within its noise.
"""

from __future__ import annotations

import argparse
import sys
import time
import weakref
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mitmproxy.test import tflow  # noqa: E402

from addons.metrics import Metrics  # noqa: E402
from addons.metrics import observed  # noqa: E402
from burnmeter.documents import request_log  # noqa: E402
from burnmeter.records import UsageRecord  # noqa: E402
from burnmeter.store.base import Settlement  # noqa: E402

HOOKS = ("requestheaders", "request", "responseheaders", "response")


class Plain:
    """Four no-op hooks, as ``Metering``'s were before metrics."""

    metrics: Metrics | None = None

    def requestheaders(self, f: Any) -> None:
        pass

    def request(self, f: Any) -> None:
        pass

    def responseheaders(self, f: Any) -> None:
        pass

    def response(self, f: Any) -> None:
        pass


class Hooks(Plain):
    """The same hooks timed by ``observed``, as ``Metering``'s are."""

    def __init__(self, metrics: Metrics | None) -> None:
        self.metrics = metrics

    @observed
    def requestheaders(self, f: Any) -> None:
        pass

    @observed
    def request(self, f: Any) -> None:
        pass

    @observed
    def responseheaders(self, f: Any) -> None:
        pass

    @observed
    def response(self, f: Any) -> None:
        pass


def settlement() -> Settlement:
    usage = UsageRecord(input_tokens=1200, output_tokens=300, cache_read_tokens=64)
    log = request_log(
        request_id="r",
        user_id="alice",
        key_mask="sk-…",
        model="gpt-4o",
        usage=usage,
        cost=Decimal("0.0123"),
        billing_tokens=1500,
        pool="openhands",
        status_code=200,
        latency_ms=900,
        ttft_ms=250,
        host="h",
        upstream="u",
        path="/v1/chat/completions",
        stream=True,
        created_at=None,  # type: ignore[arg-type]
    )
    return Settlement("r", "alice", "openhands", Decimal("0.0123"), 1500, 1264, 300, None, log)


def per_request(hooks: Plain, n: int) -> float:
    """Seconds of CPU per request through the four hooks (and a settlement if metrics)."""
    s = settlement()
    flows = [tflow.tflow(resp=True) for _ in range(n)]
    record = {"outcome": "charged", "status": 200, "pool": "openhands", "api": "openai.chat"}
    for f in flows:
        f.metadata["metering"] = record
    start = time.process_time()
    for f in flows:
        hooks.requestheaders(f)
        hooks.request(f)
        hooks.responseheaders(f)
        if hooks.metrics is not None:
            hooks.metrics.settled(s)
        hooks.response(f)
    return (time.process_time() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    metering = SimpleNamespace(
        phases=weakref.WeakKeyDictionary(),
        journal=None,
        admission=None,
        unjournaled=0,
        alerts=None,
    )
    metrics = Metrics(metering, users=False)  # type: ignore[arg-type]

    def best(hooks: Plain) -> float:
        return min(per_request(hooks, args.n) for _ in range(args.repeats)) * 1e6

    plain, off, on = best(Plain()), best(Hooks(None)), best(Hooks(metrics))
    print(f"hooks, not timed:            {plain:.2f} µs/request")
    print(f"hooks timed, metrics off:    {off:.2f} µs/request (+{off - plain:.2f} µs)")
    print(f"hooks timed, metrics on:     {on:.2f} µs/request (+{on - plain:.2f} µs)")


if __name__ == "__main__":
    main()
