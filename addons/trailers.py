"""HTTP/1 trailers: handed to the ``request`` hook, not a crashed connection handler.

mitmproxy 12 reads an HTTP/1 chunked body with h11's ``ChunkedReader`` and, when the
message ends with trailer fields, raises ``NotImplementedError`` in
``Http1Connection.read_body`` (``proxy/layers/http/_http1.py``). That happens inside the
connection's event loop after ``requestheaders`` and before ``request``: no hook runs in
between, so no hook can refuse the request in time, and the exception leaves the client
waiting on a connection nobody serves ("mitmproxy has crashed!").

No hook can stop it, so ``refuse_http1_trailers`` swaps in a chunked reader (through
mitmproxy's own body reader factory) that does what mitmproxy's HTTP/2 layer does with
trailers: a client's trailers are put on the request being read (``request.trailers``),
and the message ends normally, so the ``request`` hook sees them and answers (the addon
refuses every request with trailers, in the API's error shape: mitmproxy could not send
them to an HTTP/1 upstream either). An upstream's chunked answer with trailers is an h11
protocol error instead: mitmproxy closes that connection and the flow's ``error`` hook
settles it.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Generator
from typing import Any

import h11
from h11._readers import ChunkedReader
from h11._receivebuffer import ReceiveBuffer
from mitmproxy import http
from mitmproxy.proxy import events
from mitmproxy.proxy.layers.http import _http1

TRAILERS_REFUSED = "trailers are not supported"


class NoTrailersReader(ChunkedReader):
    """h11's chunked reader that takes trailer fields off the message it reads.

    ``request``: the request being read (a client's), which gets them as its ``trailers``;
    without one, trailer fields are a protocol error."""

    def __init__(self) -> None:
        super().__init__()
        self.request: http.Request | None = None

    def __call__(self, buf: ReceiveBuffer) -> h11.Data | h11.EndOfMessage | None:
        event = super().__call__(buf)
        if isinstance(event, h11.EndOfMessage) and event.headers:
            if self.request is None:
                raise h11.RemoteProtocolError(TRAILERS_REFUSED)
            self.request.trailers = http.Headers(list(event.headers))
            return h11.EndOfMessage()
        return event


class BodyReaders:
    """mitmproxy's body reader factory, with ``NoTrailersReader`` for chunked bodies."""

    def __init__(self, original: Callable[[int | None], _http1.TBodyReader]) -> None:
        self.original = original

    def __call__(self, expected_size: int | None) -> _http1.TBodyReader:
        if expected_size is None:
            return NoTrailersReader()
        return self.original(expected_size)


def _server_read_body(original: Any) -> Any:
    """``Http1Server.read_body`` telling the reader which request it reads."""

    def read_body(self: _http1.Http1Server, event: events.Event) -> Generator[Any, Any, None]:
        if isinstance(self.body_reader, NoTrailersReader):
            self.body_reader.request = self.request
        yield from original(self, event)

    read_body.links_trailers = True  # type: ignore[attr-defined]
    return read_body


def refuse_http1_trailers() -> None:
    """Install the reader (once: the addon may be loaded again)."""
    if not isinstance(_http1.make_body_reader, BodyReaders):
        _http1.make_body_reader = BodyReaders(_http1.make_body_reader)
    if not getattr(_http1.Http1Server.read_body, "links_trailers", False):
        _http1.Http1Server.read_body = _server_read_body(_http1.Http1Connection.read_body)  # type: ignore[method-assign]
