"""Micro-benchmark of stream metering: SSEParser, StreamUsage with and without text
collection, and a naive reader that JSON-decodes every event.

Synthesizes an OpenAI chat stream with include_usage ("usage":null on every chunk, usage
on the last) and an Anthropic Messages stream, cuts them into fixed-size chunks like TCP
reads, and reports the median over interleaved repeats.

Then the proxy's stream tap (``addons.streamtap.StreamTap``, as set on every metered stream)
on each recorded stream of the usage corpus (``tests/corpus.py`` finds it), fed one event per
call as paced generation arrives: µs per event per stream, and per API (total time / total
events).

    python scripts/bench_sse.py [--events 5000] [--chunk 4096] [--repeats 9] [--format json]
"""

from __future__ import annotations

import argparse
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


def corpus_taps(repeats: int) -> list[dict[str, Any]]:
    """µs per event of the stream tap on each corpus SSE stream, one event per call."""
    rows = []
    for name, case in load_cases().items():
        if not (case["response"]["content_type"] or "").startswith("text/event-stream"):
            continue
        body = case["response"]["body"].encode()
        pieces = [part + b"\n\n" for part in body.replace(b"\r\n", b"\n").split(b"\n\n")]
        pieces = [p for p in pieces if p.strip()]
        samples = []
        for _ in range(repeats):
            tap = StreamTap(case["api"])
            started = time.perf_counter()
            for piece in pieces:
                tap(piece)
            tap(b"")
            samples.append(time.perf_counter() - started)
        seconds = statistics.median(samples)
        rows.append(
            {
                "stream": name,
                "api": case["api"],
                "bytes": len(body),
                "events": len(pieces),
                "median_s": seconds,
                "us_per_event": seconds / len(pieces) * 1e6,
            }
        )
    return rows


def per_api(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Total time / total events, per API and over all streams."""
    groups: dict[str, list[dict[str, Any]]] = {"all": rows}
    for row in rows:
        groups.setdefault(row["api"], []).append(row)
    return {
        api: sum(r["median_s"] for r in group) / sum(r["events"] for r in group) * 1e6
        for api, group in groups.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=5000, help="content events per stream")
    parser.add_argument("--chunk", type=int, default=4096, help="bytes per fed chunk")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--format", choices=["table", "json"], default="table")
    args = parser.parse_args()
    rows = bench(args.events, args.chunk, args.repeats)
    taps = corpus_taps(args.repeats)
    if args.format == "json":
        out = {"synthetic": rows, "corpus_tap": taps, "corpus_tap_us_per_event": per_api(taps)}
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
    if not taps:
        print("\nno usage corpus found (set BURNMETER_CORPUS): no corpus figures")
        return
    print(f"\nthe stream tap on {len(taps)} corpus streams, one event per call")
    print(f"{'stream':<52} {'events':>6} {'µs/event':>9}")
    for row in taps:
        print(f"{row['stream']:<52} {row['events']:>6} {row['us_per_event']:>9.2f}")
    for api, value in per_api(taps).items():
        print(f"{'per API: ' + api:<52} {'':>6} {value:>9.2f}")


if __name__ == "__main__":
    main()
