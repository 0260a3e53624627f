"""HTTP/1 trailers: a protocol error, not a crashed connection handler.

mitmproxy 12 reads an HTTP/1 chunked body with h11's ``ChunkedReader`` and, when the
message ends with trailer fields, raises ``NotImplementedError`` in
``Http1Connection.read_body`` (``proxy/layers/http/_http1.py``). That happens inside the
connection's event loop after ``requestheaders`` and before ``request``: no hook runs in
between, so no hook can refuse the request in time, and the exception leaves the client
waiting on a connection nobody serves ("mitmproxy has crashed!").

No hook can stop it, so ``refuse_http1_trailers`` swaps in a reader (mitmproxy's own body
reader factory, wrapped) that reports trailers as an h11 protocol error instead: mitmproxy
then answers 400 and closes the connection, as for any malformed HTTP/1 message, and the
flow's ``error`` hook runs. It applies to both directions (an upstream's chunked answer
with trailers crashed the handler the same way). HTTP/2 and 3 carry trailers as their own
frames; the addon refuses those in its ``request`` hook, in the API's error shape.
"""

from __future__ import annotations

from collections.abc import Callable

import h11
from h11._readers import ChunkedReader
from h11._receivebuffer import ReceiveBuffer
from mitmproxy.proxy.layers.http import _http1

TRAILERS_REFUSED = "trailers are not supported"


class NoTrailersReader(ChunkedReader):
    """h11's chunked reader, for which trailer fields are a protocol error."""

    def __call__(self, buf: ReceiveBuffer) -> h11.Data | h11.EndOfMessage | None:
        event = super().__call__(buf)
        if isinstance(event, h11.EndOfMessage) and event.headers:
            raise h11.RemoteProtocolError(TRAILERS_REFUSED)
        return event


class BodyReaders:
    """mitmproxy's body reader factory, with ``NoTrailersReader`` for chunked bodies."""

    def __init__(self, original: Callable[[int | None], _http1.TBodyReader]) -> None:
        self.original = original

    def __call__(self, expected_size: int | None) -> _http1.TBodyReader:
        if expected_size is None:
            return NoTrailersReader()
        return self.original(expected_size)


def refuse_http1_trailers() -> None:
    """Install the reader (once: the addon may be loaded again)."""
    if not isinstance(_http1.make_body_reader, BodyReaders):
        _http1.make_body_reader = BodyReaders(_http1.make_body_reader)
