"""Loader for the recorded-exchange corpus: ``$BURNMETER_CORPUS``, else ``<repo>/../shared/corpus``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from burnmeter.records import UsageRecord
from burnmeter.usage import StreamUsage
from burnmeter.usage import usage_from_json

CORPUS_DIR = Path(
    os.environ.get("BURNMETER_CORPUS") or Path(__file__).resolve().parents[2] / "shared" / "corpus"
)
SKIP_REASON = f"usage corpus not found at {CORPUS_DIR} (set BURNMETER_CORPUS)"


def load_cases() -> dict[str, dict[str, Any]]:
    """Every case, keyed by ``<provider>/<case>``; empty if the corpus is absent, which
    is an error under CI (``CI`` set): there the corpus tests must run, not skip."""
    if not CORPUS_DIR.is_dir():
        if os.environ.get("CI"):
            raise RuntimeError(f"CI: {SKIP_REASON}")
        return {}
    return {
        path.relative_to(CORPUS_DIR).with_suffix("").as_posix(): json.loads(path.read_text())
        for path in sorted(CORPUS_DIR.glob("*/*.json"))
    }


def case_params() -> list[Any]:
    """``pytest.param(name, case)`` per case, or one skipped placeholder if there is no corpus."""
    cases = load_cases()
    if not cases:
        skip = pytest.mark.skip(reason=SKIP_REASON)
        return [pytest.param(None, None, marks=skip, id="no-corpus")]
    return [pytest.param(name, case, id=name) for name, case in cases.items()]


def is_stream(case: dict[str, Any]) -> bool:
    """Whether the proxy would read this response with StreamUsage rather than as JSON."""
    content_type = case["response"]["content_type"] or ""
    return content_type.startswith("text/event-stream") or (
        case["stream"] and case["api"] == "gemini.generate"
    )


def read_usage(case: dict[str, Any]) -> UsageRecord | None:
    """The case's usage as the proxy reads the response (a stream in one chunk)."""
    body = case["response"]["body"].encode()
    if not is_stream(case):
        return usage_from_json(case["api"], body)[0]
    stream = StreamUsage(case["api"])
    stream.feed(body)
    return stream.result()[0]
