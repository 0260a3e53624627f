"""HTTP/1 trailers (``addons/trailers.py``): mitmproxy's chunked reader, patched.

The reader is fed bytes directly; then mitmproxy's own HTTP/1 layers are driven with the
bytes a client or an upstream would send, as mitmproxy's layer tests do: a client's
trailers end up on its request (for the ``request`` hook to refuse), an upstream's are a
protocol error that closes the connection, and neither crashes the connection handler.
"""

from __future__ import annotations

import string
from collections.abc import Iterator

import h11
import pytest
from h11._readers import ChunkedReader
from h11._readers import ContentLengthReader
from h11._readers import Http10Reader
from h11._receivebuffer import ReceiveBuffer
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.proxy import commands
from mitmproxy.proxy import context
from mitmproxy.proxy import events
from mitmproxy.proxy.layers.http import _events
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.test import taddons
from mitmproxy.test import tflow
from mitmproxy.test import tutils

from addons.trailers import TRAILERS_REFUSED
from addons.trailers import BodyReaders
from addons.trailers import NoTrailersReader
from addons.trailers import refuse_http1_trailers

EXAMPLES = settings(max_examples=200, deadline=None)  # no timing asserted: a loaded machine
CHUNKED_HEAD = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\n\r\n"
)
TRAILED_BODY = b"3\r\nabc\r\n0\r\nX-Checksum: 1\r\n\r\n"


def chat_request() -> http.Request:
    return tutils.treq(method=b"POST", path=b"/v1/chat/completions", content=b"{}")


def read_chunked(reader: NoTrailersReader, body: bytes) -> list[object]:
    buf = ReceiveBuffer()
    buf += body
    events = []
    while (event := reader(buf)) is not None:
        events.append(event)
        if isinstance(event, h11.EndOfMessage):
            break
    return events


# -- the reader --------------------------------------------------------------------------------
field_names = st.text(string.ascii_letters + "-", min_size=1, max_size=12)


@EXAMPLES
@given(field_names, st.text(string.ascii_letters + string.digits, max_size=12))
def test_chunked_trailers_go_on_the_request_or_are_a_protocol_error(name: str, value: str) -> None:
    body = f"3\r\nabc\r\n0\r\n{name}: {value}\r\n\r\n".encode()
    request = chat_request()
    reader = NoTrailersReader()
    reader.request = request
    data, end = read_chunked(reader, body)
    assert isinstance(data, h11.Data) and bytes(data.data) == b"abc"
    assert end == h11.EndOfMessage()
    assert request.trailers is not None and request.trailers[name] == value
    with pytest.raises(h11.RemoteProtocolError):  # an upstream's answer: no request
        read_chunked(NoTrailersReader(), body)


def test_a_chunked_body_without_trailers_still_ends() -> None:
    request = chat_request()
    reader = NoTrailersReader()
    reader.request = request
    assert read_chunked(reader, b"3\r\nabc\r\n0\r\n\r\n")[-1] == h11.EndOfMessage()
    assert not request.trailers


def test_every_trailer_field_and_copy_is_kept_in_order() -> None:
    request = chat_request()
    reader = NoTrailersReader()
    reader.request = request
    read_chunked(reader, b"0\r\nX-A: 1\r\nx-b: 2\r\nX-A: 3\r\n\r\n")
    assert request.trailers is not None
    assert request.trailers.fields == ((b"x-a", b"1"), (b"x-b", b"2"), (b"x-a", b"3"))


@pytest.mark.parametrize("split", range(1, len(TRAILED_BODY)))
def test_trailers_split_across_reads_are_found(split: int) -> None:
    """The bytes arrive as the network cuts them: h11 waits for the rest."""
    request = chat_request()
    reader = NoTrailersReader()
    reader.request = request
    buf = ReceiveBuffer()
    seen = []
    for part in (TRAILED_BODY[:split], TRAILED_BODY[split:]):
        buf += part
        while (event := reader(buf)) is not None:
            seen.append(event)
    assert seen[-1] == h11.EndOfMessage()
    assert b"".join(bytes(e.data) for e in seen if isinstance(e, h11.Data)) == b"abc"
    assert request.trailers is not None and request.trailers["x-checksum"] == "1"


def test_the_protocol_error_says_why() -> None:
    with pytest.raises(h11.RemoteProtocolError, match=TRAILERS_REFUSED):
        read_chunked(NoTrailersReader(), TRAILED_BODY)


# -- the factory and its installation -------------------------------------------------------------
def test_only_chunked_bodies_get_the_patched_reader() -> None:
    asked: list[int | None] = []

    def original(size: int | None) -> _http1.TBodyReader:
        asked.append(size)
        return ContentLengthReader(size) if size and size > 0 else Http10Reader()

    readers = BodyReaders(original)
    first, second = readers(None), readers(None)
    assert isinstance(first, NoTrailersReader) and first is not second, "one per message"
    assert first.request is None, "no request until the server side links it"
    assert type(readers(7)) is ContentLengthReader
    assert type(readers(-1)) is Http10Reader
    assert asked == [7, -1], "every other size is mitmproxy's own reader's"


def unpatched(monkeypatch: pytest.MonkeyPatch) -> None:
    """mitmproxy's own reader, until the test ends (the addon may have installed ours)."""
    factory = _http1.make_body_reader
    monkeypatch.setattr(_http1, "make_body_reader", getattr(factory, "original", factory))
    monkeypatch.setattr(_http1.Http1Server, "read_body", _http1.Http1Connection.read_body)


def test_installing_twice_wraps_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The addon may be loaded again (a script reload)."""
    unpatched(monkeypatch)
    original = _http1.make_body_reader
    refuse_http1_trailers()
    installed = (_http1.make_body_reader, _http1.Http1Server.read_body)
    refuse_http1_trailers()
    assert (_http1.make_body_reader, _http1.Http1Server.read_body) == installed
    factory = _http1.make_body_reader
    assert isinstance(factory, BodyReaders) and factory.original is original
    assert _http1.Http1Client.read_body is _http1.Http1Connection.read_body, "server side only"


# -- mitmproxy's HTTP/1 layers, driven with bytes ------------------------------------------------
@pytest.fixture
def tctx() -> Iterator[taddons.context]:
    with taddons.context() as tctx:
        yield tctx


def received(layer_commands: list[commands.Command]) -> list[object]:
    """The HTTP events a layer hands its parent, and the connections it closes."""
    return [
        c.event if isinstance(c, ReceiveHttp) else c
        for c in layer_commands
        if isinstance(c, ReceiveHttp | commands.CloseConnection)
    ]


def client_sends(tctx: taddons.context, data: bytes) -> tuple[list[object], _http1.Http1Server]:
    server_side = _http1.Http1Server(context.Context(tflow.tclient_conn(), tctx.options))
    assert list(server_side.handle_event(events.Start())) == []
    out = list(server_side.handle_event(events.DataReceived(server_side.context.client, data)))
    return received(out), server_side


def test_a_clients_trailers_reach_the_request_hook_on_its_request(tctx: taddons.context) -> None:
    refuse_http1_trailers()
    got, _ = client_sends(tctx, CHUNKED_HEAD + TRAILED_BODY)
    headers, data, end = got
    assert isinstance(headers, _events.RequestHeaders) and not headers.end_stream
    assert data == _events.RequestData(headers.stream_id, b"abc")
    assert end == _events.RequestEndOfMessage(headers.stream_id)
    trailers = headers.request.trailers
    assert trailers is not None and trailers.fields == ((b"x-checksum", b"1"),)


def test_a_client_request_without_trailers_gets_none(tctx: taddons.context) -> None:
    refuse_http1_trailers()
    got, _ = client_sends(tctx, CHUNKED_HEAD + b"3\r\nabc\r\n0\r\n\r\n")
    assert isinstance(got[0], _events.RequestHeaders) and not got[0].request.trailers
    assert isinstance(got[-1], _events.RequestEndOfMessage)


def test_an_upstreams_trailers_close_its_connection_as_a_protocol_error(
    tctx: taddons.context,
) -> None:
    refuse_http1_trailers()
    ctx = context.Context(tflow.tclient_conn(), tctx.options)
    ctx.server = tflow.tserver_conn()
    client_side = _http1.Http1Client(ctx)
    list(client_side.handle_event(events.Start()))
    list(client_side.handle_event(_events.RequestHeaders(1, chat_request(), end_stream=True)))
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + TRAILED_BODY
    got = received(list(client_side.handle_event(events.DataReceived(ctx.server, answer))))
    assert isinstance(got[0], _events.ResponseHeaders)
    assert got[1] == _events.ResponseData(1, b"abc")
    closed = got[2]
    assert isinstance(closed, commands.CloseConnection) and closed.connection is ctx.server
    error = got[3]
    assert isinstance(error, _events.ResponseProtocolError)
    assert error.message == f"HTTP/1 protocol error: {TRAILERS_REFUSED}"


def test_without_the_patch_mitmproxy_raises_in_the_connection_handler(
    tctx: taddons.context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Why the module exists: if a mitmproxy upgrade makes this fail, it reads trailers
    itself and the patch can go."""
    unpatched(monkeypatch)
    assert type(_http1.make_body_reader(None)) is ChunkedReader
    with pytest.raises(NotImplementedError, match="trailers"):
        client_sends(tctx, CHUNKED_HEAD + TRAILED_BODY)
