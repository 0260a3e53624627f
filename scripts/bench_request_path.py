"""Where the metering addon's time goes per request and per event, part by part, in-process.

    python scripts/bench_request_path.py [--requests N] [--format table|json]

For each benchmark workload (``scripts/bench_proxy.py``'s ``WORKLOADS``), two views:

- the hooks: the real ``Metering`` addon (mitmproxy's test context, a real SQLite store,
  journal and writer thread) is handed ``--requests`` flows one after the other:
  ``requestheaders``, ``request`` (admission, with the hold made by the hold thread),
  ``responseheaders``, the stream tap fed the upstream's answer one event per call (the
  last call settles: price, log document, journal) or ``response`` for JSON. Medians of
  wall time per hook; the writer thread applies settlements meanwhile, as in the proxy.
  The same requests also give each part's time in situ: the functions the hooks call
  (decode, estimate, price, hold, settlement, journal, ...) are wrapped with a timer while
  they run (µs per request, median; a part nested in another is counted in both).
- the parts, each timed alone on the workload's request (median of repeats): JSON decode
  (stdlib, with the duplicate-key hook, orjson, ``decode_body``), the spelling scan, the
  estimate, the price quote, the hold amounts and the output limit paid for (with how many
  genai-prices ``calc_price`` calls each makes), a hold through the hold thread against
  one made on the calling thread, the settlement (cost, log document), its journal line
  and append, and the store's settle of one record (the writer's work, wall and CPU).

Timing only; nothing is asserted. Run it on an idle machine or state the load average
(printed).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
from genai_prices.types import ModelPrice  # noqa: E402
from mitmproxy import connection  # noqa: E402
from mitmproxy import http  # noqa: E402
from mitmproxy.proxy.mode_specs import ProxyMode  # noqa: E402
from mitmproxy.test import taddons  # noqa: E402
from mitmproxy.test import tflow  # noqa: E402
from mitmproxy.test import tutils  # noqa: E402

from addons import admission as admission_module  # noqa: E402
from addons import billing  # noqa: E402
from addons import body as body_module  # noqa: E402
from addons import metering as metering_module  # noqa: E402
from addons.admission import Admission  # noqa: E402
from addons.body import check_spellings  # noqa: E402
from addons.body import encode_body  # noqa: E402
from addons.body import unique_keys  # noqa: E402
from addons.holding import HoldQueue  # noqa: E402
from addons.metering import Metering  # noqa: E402
from addons.phases import Admitted  # noqa: E402
from burnmeter.config import load_config  # noqa: E402
from burnmeter.documents import hash_key  # noqa: E402
from burnmeter.estimate import estimate_input_tokens  # noqa: E402
from burnmeter.estimate import estimate_request  # noqa: E402
from burnmeter.estimate import hold_amounts  # noqa: E402
from burnmeter.estimate import output_tokens_paid  # noqa: E402
from burnmeter.journal import Journal  # noqa: E402
from burnmeter.journal import to_json  # noqa: E402
from burnmeter.pricing import resolve_price  # noqa: E402
from burnmeter.records import UsageRecord  # noqa: E402
from burnmeter.store import open_store  # noqa: E402
from burnmeter.store.base import HoldRequest  # noqa: E402
from scripts.bench_proxy import CONFIG  # noqa: E402
from scripts.bench_proxy import HOST  # noqa: E402
from scripts.bench_proxy import POOL_FIELD  # noqa: E402
from scripts.bench_proxy import WORKLOADS  # noqa: E402
from scripts.bench_proxy import Workload  # noqa: E402
from scripts.bench_proxy import start_upstream  # noqa: E402
from scripts.bench_proxy import upstream_stream  # noqa: E402
from scripts.processes import stop_process  # noqa: E402

KEY = "sk-burn-bench-0123456789abcdef"
REPEATS = 41


def us(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e6, 1)


def timed(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return us(samples)


def calc_price_calls(fn: Callable[[], object]) -> int:
    """How many times ``fn()`` calls genai-prices' ``ModelPrice.calc_price``."""
    original = ModelPrice.calc_price
    calls = Counter[str]()

    def counting(self: ModelPrice, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return original(self, *args, **kwargs)

    ModelPrice.calc_price = counting  # type: ignore[method-assign]
    try:
        fn()
    finally:
        ModelPrice.calc_price = original  # type: ignore[method-assign]
    return calls["n"]


def make_flow(w: Workload) -> http.HTTPFlow:
    headers = [(k.lower(), v) for k, v in w.headers(KEY).items()]
    headers.append(("content-length", str(len(w.body))))
    request = tutils.treq(
        method=b"POST",
        host=HOST,
        port=80,
        path=w.path.encode(),
        headers=http.Headers([(k.encode(), v.encode()) for k, v in headers]),
        content=w.body,
        timestamp_start=time.time(),
    )
    client = tflow.tclient_conn()
    client.proxy_mode = ProxyMode.parse("regular")
    return tflow.tflow(req=request, client_conn=client, server_conn=connection.Server(address=None))


IN_SITU: list[tuple[str, Any, str]] = [
    # (label, owner, attribute): what the hooks call, where they look it up
    ("identify (key, owner)", Admission, "identify"),
    ("read_request (canonical)", metering_module, "read_request"),
    ("decode_body (decode + duplicate keys + spellings)", admission_module, "decode_body"),
    ("  orjson_object (orjson's reading, checked)", body_module, "orjson_object"),
    ("  stdlib_object (the stdlib's reading)", body_module, "stdlib_object"),
    ("  check_spellings", body_module, "check_spellings"),
    ("estimate_request", admission_module, "estimate_request"),
    ("resolve_price", admission_module, "resolve_price"),
    ("hold_amounts", admission_module, "hold_amounts"),
    ("HoldQueue.hold (thread hop, SQLite hold)", HoldQueue, "hold"),
    ("output_tokens_paid", admission_module, "output_tokens_paid"),
    ("cap_output", admission_module, "cap_output"),
    ("prepare_stream", admission_module, "prepare_stream"),
    ("journal.probe", Journal, "probe"),
    ("billing.response_usage", billing, "response_usage"),
    ("  billing.input_estimate (no usage reported)", billing, "input_estimate"),
    ("billing.settlement (cost, billing tokens, log)", billing, "settlement"),
    ("  pricing.cost", billing.pricing, "cost"),
    ("  request_log", billing, "request_log"),
    ("Metering._record (journal append, writer kick)", Metering, "_record"),
    ("  Journal.append", Journal, "append"),
    ("describe + annotate", metering_module, "annotate"),
    ("genai-prices calc_price (all callers)", ModelPrice, "calc_price"),
]


@contextmanager
def timers(samples: dict[str, list[float]]) -> Iterator[None]:
    """Each ``IN_SITU`` function timed into ``samples[label]`` (seconds per call)."""
    saved = []
    for label, owner, name in IN_SITU:
        raw = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        fn = raw.__func__ if isinstance(raw, staticmethod) else raw
        bucket = samples.setdefault(label, [])

        def wrap(fn: Any = fn, bucket: list[float] = bucket) -> Any:
            if inspect.iscoroutinefunction(fn):

                async def timed_async(*args: Any, **kwargs: Any) -> Any:
                    start = time.perf_counter()
                    try:
                        return await fn(*args, **kwargs)
                    finally:
                        bucket.append(time.perf_counter() - start)

                return timed_async

            def timed_sync(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    bucket.append(time.perf_counter() - start)

            return timed_sync

        wrapped = wrap()
        setattr(owner, name, staticmethod(wrapped) if isinstance(raw, staticmethod) else wrapped)
        saved.append((owner, name, raw))
    try:
        yield
    finally:
        for owner, name, raw in reversed(saved):
            setattr(owner, name, raw)


def per_request(samples: dict[str, list[float]], n: int) -> dict[str, Any]:
    """µs per request of each part: its total time over the ``n`` requests / ``n``, and its
    calls per request."""
    return {
        label: {"us": round(sum(values) / n * 1e6, 1), "calls": round(len(values) / n, 2)}
        for label, values in samples.items()
    }


async def hooks(
    m: Metering, w: Workload, answer: bytes, n: int
) -> tuple[dict[str, Any], tuple[http.HTTPFlow, Admitted]]:
    """Median µs per hook over ``n`` sequential requests through the addon's hooks, and the
    last request's flow and its admitted phase."""
    times: dict[str, list[float]] = {
        k: [] for k in ("requestheaders", "request", "responseheaders", "end")
    }
    events = [part + b"\n\n" for part in answer.split(b"\n\n") if part]
    per_event: list[float] = []
    for _ in range(n):
        f = make_flow(w)
        t0 = time.perf_counter()
        await m.requestheaders(f)
        t1 = time.perf_counter()
        await m.request(f)
        t2 = time.perf_counter()
        assert f.response is None, f.response and f.response.content
        admitted = m.phases[f]
        assert isinstance(admitted, Admitted)
        if w.events:
            f.response = http.Response.make(200, b"", {"content-type": "text/event-stream"})
            f.response.content = None
            m.responseheaders(f)
            t3 = time.perf_counter()
            tap = f.response.stream
            assert callable(tap)
            for event in events[:-3]:  # the end marker and what follows it settle
                tap(event)
            t4 = time.perf_counter()
            for event in events[-3:]:
                tap(event)
            tap(b"")
            m.response(f)
            t5 = time.perf_counter()
            per_event.append((t4 - t3) / (len(events) - 3))
        else:
            f.response = http.Response.make(200, answer, {"content-type": "application/json"})
            t3 = time.perf_counter()
            m.responseheaders(f)
            m.response(f)
            t4 = t5 = time.perf_counter()
        times["requestheaders"].append(t1 - t0)
        times["request"].append(t2 - t1)
        times["responseheaders"].append(t3 - t2)
        times["end"].append(t5 - t4)
        await asyncio.sleep(0)
    out = {name: us(samples) for name, samples in times.items()}
    out["tap_per_event"] = us(per_event) if per_event else None
    out["events"] = len(events) if w.events else 0
    return out, (f, admitted)


def parts(
    w: Workload,
    admitted: tuple[http.HTTPFlow, Admitted],
    config_path: Path,
    db_url: str,
    tmp: Path,
) -> dict[str, Any]:
    config = load_config(config_path)
    body = json.loads(w.body)
    model = body["model"]
    out: dict[str, Any] = {"bytes": len(w.body)}
    out["json.loads"] = timed(lambda: json.loads(w.body))
    out["json.loads+unique_keys"] = timed(lambda: json.loads(w.body, object_pairs_hook=unique_keys))
    out["orjson.loads"] = timed(lambda: orjson.loads(w.body))
    as_sent = make_flow(w).request  # the admitted request's body may have been rewritten
    out["decode_body"] = timed(lambda: body_module.decode_body(as_sent))
    out["check_spellings"] = timed(lambda: check_spellings(body))
    estimate = estimate_request(w.api, body, config, w.path, model)
    out["estimate_request"] = timed(lambda: estimate_request(w.api, body, config, w.path, model))
    route = config.route(HOST, 80, 8080)
    assert route is not None
    url = f"http://{HOST}{w.path}"
    quote = resolve_price(config, model, route.multiplier, upstream_url=url)
    out["resolve_price"] = timed(lambda: resolve_price(config, model, route.multiplier))
    maximum, minimum = hold_amounts(estimate, quote)
    out["hold_amounts"] = timed(lambda: hold_amounts(estimate, quote))
    out["hold_amounts_calc_price_calls"] = calc_price_calls(lambda: hold_amounts(estimate, quote))
    out["output_tokens_paid"] = timed(lambda: output_tokens_paid(estimate, quote, maximum, maximum))
    out["output_tokens_paid_calc_price_calls"] = calc_price_calls(
        lambda: output_tokens_paid(estimate, quote, maximum, maximum)
    )
    out["json.dumps(body)"] = timed(lambda: json.dumps(body).encode())
    decoded = body_module.decode_body(as_sent)
    out["encode_body(body)"] = timed(lambda: encode_body(decoded))
    out["held_input_tokens"] = estimate.held_input_tokens
    out["estimate_input_tokens"] = timed(lambda: estimate_input_tokens(w.api, body))
    out["estimated_input_tokens"] = estimate_input_tokens(w.api, body)

    store = open_store(db_url, config.pools)
    pool = config.pools[route.pool]
    counter = iter(range(10**9))

    def request() -> HoldRequest:
        return HoldRequest(f"hold-{w.name}-{next(counter)}", "bench", pool, maximum, minimum)

    out["hold on this thread (SQLite)"] = timed(lambda: store.hold_many([request()]))
    queue = HoldQueue(store, lambda hold: None)

    async def through_queue() -> float:
        samples = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            await queue.hold(request())
            samples.append(time.perf_counter() - start)
        return us(samples)

    out["hold through the hold thread"] = asyncio.run(through_queue())
    queue.stop(5)
    return out | settle_parts(*admitted, store, tmp)


def settle_parts(f: http.HTTPFlow, admitted: Admitted, store: Any, tmp: Path) -> dict[str, Any]:
    """A settlement as the addon makes it (of a request the hooks admitted), its journal
    line, and the store applying it (the writer thread's work)."""
    input_tokens = estimate_input_tokens(admitted.api, json.loads(f.request.content or b""))
    usage = UsageRecord(input_tokens=input_tokens, output_tokens=300)
    out: dict[str, Any] = {}
    out["settlement (cost, log document)"] = timed(
        lambda: billing.settlement(f, admitted, usage, 200)
    )
    out["settlement_calc_price_calls"] = calc_price_calls(
        lambda: billing.settlement(f, admitted, usage, 200)
    )
    settlement = billing.settlement(f, admitted, usage, 200)
    out["journal to_json"] = timed(lambda: to_json(settlement))
    journal = Journal(str(tmp / f"parts-{f.id}.journal"), 1 << 30)
    out["journal append"] = timed(lambda: journal.append(settlement))
    journal.close()
    ids = iter(range(10**9))

    def settle_one() -> tuple[float, float]:
        s = billing.settlement(f, admitted, usage, 200)
        object.__setattr__(s, "request_id", f"settle-{f.id}-{next(ids)}")
        object.__setattr__(s, "log", s.log | {"_id": s.request_id})
        wall, cpu = time.perf_counter(), time.thread_time()
        store.settle([s])
        return time.perf_counter() - wall, time.thread_time() - cpu

    samples = [settle_one() for _ in range(REPEATS)]
    out["store.settle 1 record, wall"] = us([s[0] for s in samples])
    out["store.settle 1 record, CPU"] = us([s[1] for s in samples])
    store.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per workload")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    args = parser.parse_args()
    upstream, upstream_port = start_upstream()
    try:
        answers = {w.name: asyncio.run(upstream_stream(upstream_port, w)) for w in WORKLOADS}
    finally:
        stop_process(upstream)
    results: dict[str, Any] = {"load_average": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="bench-path-") as tmpdir:
        tmp = Path(tmpdir)
        config_path = tmp / "bench.toml"
        config_path.write_text(CONFIG)
        db_url = f"sqlite:///{tmp / 'bench.db'}"
        store = open_store(db_url, load_config(config_path).pools)
        store.ensure_schema(0)
        store.create_user("bench", hash_key(KEY), {POOL_FIELD: Decimal(10**9)})
        store.close()
        m = Metering()
        with taddons.context(m) as tctx:
            tctx.configure(m, metering_config=str(config_path), metering_db=db_url)
            admitted = {}
            for w in WORKLOADS:
                timings, admitted[w.name] = asyncio.run(hooks(m, w, answers[w.name], args.requests))
                samples: dict[str, list[float]] = {}
                with timers(samples):
                    asyncio.run(hooks(m, w, answers[w.name], args.requests))
                results[w.name] = {
                    "hooks": timings,
                    "in situ": per_request(samples, args.requests),
                }
            m.done()
        for w in WORKLOADS:
            results[w.name]["parts"] = parts(w, admitted[w.name], config_path, db_url, tmp)
    results["load_average_after"] = os.getloadavg()
    if args.format == "json":
        print(json.dumps(results, indent=2))
        return 0
    print(f"load average {results['load_average']} .. {results['load_average_after']}")
    for w in WORKLOADS:
        print(f"\n{w.name} ({len(w.body)} bytes), µs (median)")
        for section in ("hooks", "in situ", "parts"):
            for name, value in results[w.name][section].items():
                print(f"  {section:5} {name:40} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
