"""Client keys out of mitmproxy's own log lines.

mitmproxy's connection layers log raw client bytes at INFO in places no hook reaches: a
client that closes before the end of its request head gets
``Client closed connection before completing request headers: b'...'`` with every header it
sent, an unparsable request line is logged with its query. The addon strips keys from every
flow it sees, but these requests never become flows, so the proxy server's logger gets a
filter that blanks key header values, Gemini's ``key`` parameter however it is spelt, and
anything shaped like a burnmeter key before the line is written anywhere.
"""

from __future__ import annotations

import logging
import re

from burnmeter.documents import KEY_PREFIX

SERVER_LOGGER = "mitmproxy.proxy.server"
"""The logger mitmproxy's layers log through (their ``Log`` commands)."""
REDACTED = "[redacted]"
_END = r"\\\r\n'\""
"""Where a value ends in a line or in the ``repr`` of raw bytes (``\\r\\n``, a quote)."""
KEY_HEADER = re.compile(
    r"(?i)((?:proxy-)?authorization|x-api-key|x-goog-api-key|api-key|x-auth-token"
    rf"|openai-api-key|cookie)(\s*:\s*)[^{_END}]*"
)
KEY_PARAM = re.compile(rf"(?i)([?&;](?:k|%6b)(?:e|%65)(?:y|%79)(?:=|%3d))[^&#\s{_END}]*")
KEY_SHAPED = re.compile(rf"(?i){re.escape(KEY_PREFIX)}[^\s&;,{_END}]*")


def redact(text: str) -> str:
    """``text`` without client keys (header values, ``key=`` parameters, burnmeter keys)."""
    text = KEY_HEADER.sub(rf"\1\2{REDACTED}", text)
    text = KEY_PARAM.sub(rf"\1{REDACTED}", text)
    return KEY_SHAPED.sub(REDACTED, text)


class KeyRedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class LogRedaction:
    """Installs the filter on mitmproxy's proxy server logger while the addon is loaded."""

    def __init__(self) -> None:
        self.filter = KeyRedactingFilter()

    def load(self, loader: object) -> None:
        logging.getLogger(SERVER_LOGGER).addFilter(self.filter)

    def done(self) -> None:
        logging.getLogger(SERVER_LOGGER).removeFilter(self.filter)
