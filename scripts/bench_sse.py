"""Micro-benchmark of stream metering: SSEParser, StreamUsage with and without text
collection, and a naive reader that JSON-decodes every event.

Synthesizes an OpenAI chat stream with include_usage ("usage":null on every chunk, usage
on the last) and an Anthropic Messages stream, cuts them into fixed-size chunks like TCP
reads, and reports the median over interleaved repeats.

Then the proxy's stream tap (``addons.streamtap.StreamTap``, as set on every metered stream)
on each recorded stream of the usage corpus (``tests/corpus.py`` finds it) and on the streams
the fake upstream answers bench_proxy.py's streamed workloads with (small SSE and the
coding-agent-shaped requests): µs per event per stream and per API (total time / total
events), fed two ways. "read" is the body cut into ``--chunk``-byte reads, as a TCP socket
delivers a stream that arrives faster than it is read (the corpus keeps no read boundaries);
"event" is one event per call, as paced generation arrives and as bench_proxy.py times the
tap (``tap_us_per_event``), where the per-call overhead is paid on every event.

    python scripts/bench_sse.py [--events 5000] [--chunk 4096] [--repeats 9] [--format json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from addons.streamtap import StreamTap  # noqa: E402
from burnmeter.sse import SSEParser  # noqa: E402
from burnmeter.usage import StreamUsage  # noqa: E402
from tests.corpus import load_cases  # noqa: E402


def openai_stream(events: int) -> bytes:
    head = (
        '{"id":"chatcmpl-BxQ9zv1rQ2","object":"chat.completion.chunk","created":1750000000,'
        '"model":"gpt-4o-mini-2024-07-18","service_tier":"default",'
        '"system_fingerprint":"fp_34a54ae93c",'
    )
    content = (
        'data: {head}"choices":[{{"index":0,"delta":{{"content":" token{i}"}},'
        '"logprobs":null,"finish_reason":null}}],"usage":null}}\n\n'
    )
    usage = {
        "prompt_tokens": 1200,
        "completion_tokens": events,
        "total_tokens": events + 1200,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }
    parts = [content.format(head=head, i=i) for i in range(events)]
    parts.append(
        f'data: {head}"choices":[],"usage":{json.dumps(usage, separators=(",", ":"))}}}\n\n'
    )
    parts.append("data: [DONE]\n\n")
    return "".join(parts).encode()


def anthropic_stream(events: int) -> bytes:
    def event(name: str, data: str) -> str:
        return f"event: {name}\ndata: {data}\n\n"

    parts = [
        event(
            "message_start",
            '{"type":"message_start","message":{"model":"claude-sonnet-4-5-20250929",'
            '"id":"msg_017A4s3HAsrqf5d2WvBmrpLr","type":"message","role":"assistant",'
            '"content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":17,'
            '"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"cache_creation":'
            '{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0},"output_tokens":1,'
            '"service_tier":"standard"}}}',
        ),
        event(
            "content_block_start",
            '{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}',
        ),
        event("ping", '{"type": "ping"}'),
    ]
    parts += [
        event(
            "content_block_delta",
            '{"type":"content_block_delta","index":0,'
            f'"delta":{{"type":"text_delta","text":" token{i}"}}}}',
        )
        for i in range(events)
    ]
    parts += [
        event("content_block_stop", '{"type":"content_block_stop","index":0}'),
        event(
            "message_delta",
            '{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
            f'"usage":{{"output_tokens":{events}}}}}',
        ),
        event("message_stop", '{"type":"message_stop"}'),
    ]
    return "".join(parts).encode()


def run_parser(api: str, chunks: list[bytes]) -> int:
    parser = SSEParser()
    events = sum(len(parser.feed(chunk)) for chunk in chunks)
    return events + len(parser.close())


def run_usage(collect_text: bool) -> Callable[[str, list[bytes]], int]:
    def run(api: str, chunks: list[bytes]) -> int:
        stream = StreamUsage(api, collect_text=collect_text)
        for chunk in chunks:
            stream.feed(chunk)
        usage, _ = stream.result()
        assert usage is not None and stream.done
        return usage.output_tokens

    return run


def run_naive(api: str, chunks: list[bytes]) -> int:
    """What one writes first: split on blank lines, json.loads every data line."""
    buf = b""
    usage = None
    for chunk in chunks:
        buf += chunk
        while b"\n\n" in buf:
            block, buf = buf.split(b"\n\n", 1)
            for line in block.split(b"\n"):
                if line.startswith(b"data: ") and line != b"data: [DONE]":
                    obj = json.loads(line[6:])
                    usage = obj.get("usage") or usage
    assert usage is not None
    return usage.get("completion_tokens", usage.get("output_tokens"))


CANDIDATES: dict[str, Callable[[str, list[bytes]], int]] = {
    "SSEParser only": run_parser,
    "StreamUsage collect_text=False": run_usage(False),
    "StreamUsage collect_text=True": run_usage(True),
    "naive json.loads every event": run_naive,
}


def bench(events: int, chunk_size: int, repeats: int) -> list[dict[str, Any]]:
    streams = {
        "openai.chat": openai_stream(events),
        "anthropic.messages": anthropic_stream(events),
    }
    rows = []
    for api, body in streams.items():
        chunks = [body[i : i + chunk_size] for i in range(0, len(body), chunk_size)]
        event_count = run_parser(api, chunks)
        timings: dict[str, list[float]] = {name: [] for name in CANDIDATES}
        for _ in range(repeats):
            for name, run in CANDIDATES.items():
                started = time.perf_counter()
                run(api, chunks)
                timings[name].append(time.perf_counter() - started)
        naive = statistics.median(timings["naive json.loads every event"])
        for name, samples in timings.items():
            seconds = statistics.median(samples)
            rows.append(
                {
                    "stream": api,
                    "candidate": name,
                    "bytes": len(body),
                    "events": event_count,
                    "median_s": seconds,
                    "mb_per_s": len(body) / seconds / 1e6,
                    "events_per_s": event_count / seconds,
                    "us_per_event": seconds / event_count * 1e6,
                    "speedup_vs_naive": naive / seconds,
                }
            )
    return rows


def by_event(body: bytes) -> list[bytes]:
    """The stream one event (with its blank line) per piece."""
    pieces = [part + b"\n\n" for part in body.replace(b"\r\n", b"\n").split(b"\n\n")]
    return [p for p in pieces if p.strip()]


def by_read(body: bytes, chunk_size: int) -> list[bytes]:
    return [body[i : i + chunk_size] for i in range(0, len(body), chunk_size)]


def time_tap(api: str, pieces: list[bytes], repeats: int) -> float:
    """Median seconds for a fresh tap to meter the pieces, end of stream included."""
    samples = []
    for _ in range(repeats):
        tap = StreamTap(api)
        started = time.perf_counter()
        for piece in pieces:
            tap(piece)
        tap(b"")
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def tap_rows(
    streams: dict[str, tuple[str, bytes]], chunk: int, repeats: int
) -> list[dict[str, Any]]:
    """µs per event of the stream tap on each (api, body), fed by read and by event."""
    rows = []
    for name, (api, body) in streams.items():
        events = len(by_event(body))
        row: dict[str, Any] = {"stream": name, "api": api, "bytes": len(body), "events": events}
        for feed, pieces in (("read", by_read(body, chunk)), ("event", by_event(body))):
            seconds = time_tap(api, pieces, repeats)
            row[f"{feed}_s"] = seconds
            row[f"{feed}_us_per_event"] = seconds / events * 1e6
        rows.append(row)
    return rows


def corpus_streams() -> dict[str, tuple[str, bytes]]:
    return {
        name: (case["api"], case["response"]["body"].encode())
        for name, case in load_cases().items()
        if (case["response"]["content_type"] or "").startswith("text/event-stream")
    }


def workload_streams() -> dict[str, tuple[str, bytes]]:
    """bench_proxy.py's streamed workloads as the fake upstream answers them (in process,
    on 127.0.0.1)."""
    import aiohttp

    from scripts.bench_proxy import WORKLOADS
    from scripts.fake_upstream import FakeUpstream

    async def fetch() -> dict[str, tuple[str, bytes]]:
        upstream = FakeUpstream()
        port = await upstream.start()
        try:
            async with aiohttp.ClientSession() as session:
                streams = {}
                for w in WORKLOADS:
                    if not w.events:
                        continue
                    url = f"http://127.0.0.1:{port}{w.path}"
                    headers = {"Content-Type": "application/json"}
                    async with session.post(url, data=w.body, headers=headers) as r:
                        streams[w.name] = (w.api, await r.read())
                return streams
        finally:
            await upstream.stop()

    return asyncio.run(fetch())


def per_api(rows: list[dict[str, Any]], feed: str) -> dict[str, float]:
    """Total time / total events, per API and over all streams."""
    groups: dict[str, list[dict[str, Any]]] = {"all": rows}
    for row in rows:
        groups.setdefault(row["api"], []).append(row)
    return {
        api: sum(r[f"{feed}_s"] for r in group) / sum(r["events"] for r in group) * 1e6
        for api, group in groups.items()
    }


def print_taps(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}: µs per event, fed by {{read, event}}")
    print(f"{'stream':<52} {'events':>6} {'read':>7} {'event':>7}")
    for row in rows:
        print(
            f"{row['stream']:<52} {row['events']:>6} "
            f"{row['read_us_per_event']:>7.2f} {row['event_us_per_event']:>7.2f}"
        )
    reads, events = per_api(rows, "read"), per_api(rows, "event")
    for api in reads:
        print(f"{'per API: ' + api:<52} {'':>6} {reads[api]:>7.2f} {events[api]:>7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=5000, help="content events per stream")
    parser.add_argument("--chunk", type=int, default=4096, help="bytes per fed chunk")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--format", choices=["table", "json"], default="table")
    args = parser.parse_args()
    rows = bench(args.events, args.chunk, args.repeats)
    corpus = tap_rows(corpus_streams(), args.chunk, args.repeats)
    workloads = tap_rows(workload_streams(), args.chunk, args.repeats)
    if args.format == "json":
        out = {
            "synthetic": rows,
            "corpus_tap": corpus,
            "corpus_tap_us_per_event": {f: per_api(corpus, f) for f in ("read", "event")},
            "workload_tap": workloads,
        }
        json.dump(out, sys.stdout, indent=2)
        print()
        return
    print(
        f"Python {sys.version.split()[0]}, {args.events} content events, "
        f"{args.chunk}-byte chunks, median of {args.repeats}"
    )
    print(
        f"{'stream':<20} {'candidate':<32} {'MB/s':>8} {'kevents/s':>10} {'µs/event':>9} {'×naive':>7}"
    )
    for row in rows:
        print(
            f"{row['stream']:<20} {row['candidate']:<32} {row['mb_per_s']:>8.1f} "
            f"{row['events_per_s'] / 1e3:>10.1f} {row['us_per_event']:>9.2f} "
            f"{row['speedup_vs_naive']:>7.2f}"
        )
    print_taps("the stream tap on bench_proxy.py's streamed workloads", workloads)
    if not corpus:
        print("\nno usage corpus found (set BURNMETER_CORPUS): no corpus figures")
        return
    print_taps(f"the stream tap on {len(corpus)} corpus streams", corpus)


if __name__ == "__main__":
    main()
