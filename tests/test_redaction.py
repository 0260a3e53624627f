"""mitmproxy's own log lines lose every client key before they are written."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from addons.redaction import SERVER_LOGGER
from addons.redaction import LogRedaction
from addons.redaction import redact
from burnmeter.documents import new_key

KEY = new_key()
LEGACY = "legacy-key-0123456789"


def spelt(word: str) -> st.SearchStrategy[str]:
    """``word`` with any letter in either case or percent-encoded."""
    return st.tuples(
        *(st.sampled_from([c.lower(), c.upper(), f"%{ord(c):02X}", f"%{ord(c):02x}"]) for c in word)
    ).map("".join)


@given(
    header=st.sampled_from(
        [
            f"Authorization: Bearer {LEGACY}",
            f"x-api-key: {LEGACY}",
            f"X-Goog-Api-Key:{LEGACY}",
            f"Proxy-Authorization: Basic {LEGACY}",
            f"Cookie: session={LEGACY}; theme=dark",
            f"api-key: {LEGACY}",
            f"x-note: see {KEY}",
        ]
    ),
    name=spelt("key"),
    separator=st.sampled_from(["?", "&"]),
)
def test_a_raw_request_head_in_a_log_line_loses_its_keys(
    header: str, name: str, separator: str
) -> None:
    head = (
        f"POST /v1beta/models/m:generateContent?alt=sse{separator}{name}={LEGACY}&x=1 HTTP/1.1"
        f"\r\nHost: api.test\r\n{header}\r\nContent-Length: 5\r\n"
    ).encode()
    line = f"Client closed connection before completing request headers: {head!r}"
    cleaned = redact(line)
    assert LEGACY not in cleaned and KEY not in cleaned
    assert "Host: api.test" in cleaned and "Content-Length: 5" in cleaned and "x=1" in cleaned


def test_the_filter_rewrites_records_of_the_proxy_server_logger(
    caplog: pytest.LogCaptureFixture,
) -> None:
    redaction = LogRedaction()
    redaction.load(None)
    try:
        with caplog.at_level(logging.INFO, logger=SERVER_LOGGER):
            logging.getLogger(SERVER_LOGGER).info("head %r", f"Authorization: Bearer {KEY}")
    finally:
        redaction.done()
    assert KEY not in caplog.text and "Authorization: [redacted]" in caplog.text
    assert not logging.getLogger(SERVER_LOGGER).filters
