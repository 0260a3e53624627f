"""One reading of a request, made once: every later decision comes from it.

``read_request`` turns what mitmproxy parsed into an immutable ``CanonicalRequest``:

- the method, exactly one of the methods an HTTP API serves;
- the path as an upstream resolves it: no fragment, nothing outside printable ASCII,
  percent-escapes of unreserved and sub-delimiter characters decoded, empty and dot
  segments resolved. An escape that would change the path's structure once decoded (``/``,
  ``?``, ``#``, ``%``, ``\\``, controls, non-ASCII) is refused: one server decodes it, the next
  does not, and they would serve different paths;
- the query as (name, value) pairs, percent-decoded, so that ``?%6Bey=K`` is the parameter
  ``key`` for the key check and for stripping alike;
- the client-facing host: lower case, no trailing dot, LDH labels (IDNA as punycode) or an
  IP literal, and its port. Several differing readings (two Host headers, ``:authority``
  and Host, an absolute-form target and Host) are refused;
- the protocol: no upgrade (``Upgrade``, ``Connection: upgrade``, ``HTTP2-Settings``), no
  announced trailers, one plain ``chunked`` framing at most;
- for a metered API: POST only, and none of the parameters that make an upstream leave the
  usage out of its answer (Gemini's field masks, ``alt`` other than json/sse, JSONP).

Anything ambiguous raises ``Ambiguous`` (a 400 in the API's error shape). ``forward``
rewrites what mitmproxy sends upstream from the record, so the upstream serves exactly
the request that was metered.
"""

from __future__ import annotations

import ipaddress
import re
import string
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote

from mitmproxy import http
from mitmproxy.net.http import url

from addons import errors
from addons.errors import Style
from addons.exceptions import Ambiguous
from addons.exceptions import UsageMasked
from burnmeter.usage import api_for

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_SUB_DELIMS = frozenset("!$&'()*+,=")  # RFC 3986 sub-delims without ";" (path parameters)
PATH_CHARS = _UNRESERVED | _SUB_DELIMS | frozenset(":@")
"""What a path segment may hold, raw or percent-encoded (then it is decoded)."""
QUERY_CHARS = PATH_CHARS | frozenset("/?")
"""What a raw query may hold besides ``&``, ``=`` and escapes (``;`` is no separator here)."""
_HEX = frozenset(string.hexdigits)
_QUERY_SAFE = "!$'()*,:@/?"
"""Left unescaped when the query is written back (``& = + ; # %`` and space are escaped)."""

FREE_READS = re.compile(r"/models(?:/[^/]+)?$")
"""Paths served uncharged to GET: model lists and model details (every API has them)."""
FREE_POSTS = re.compile(r"/v1/messages/count_tokens$|/models/[^/]+:countTokens$")
"""Paths served uncharged to POST: token counting (Anthropic, Gemini), which generates nothing."""
GEMINI_MODEL = re.compile(r"/(?:tunedModels|models)/([^/:]+):[A-Za-z]+$")
"""The model of a Gemini path: the one in the path's last segment, where its method is."""

KEY_PARAM = "key"
"""Gemini's query parameter for a key (compared decoded and case-folded)."""
USAGE_MASKS = frozenset({"fields", "$fields", "callback", "$callback"})
"""Query parameters that make Google's front end cut the answer down (usage included) or
wrap it in JavaScript."""
ALT_PARAMS = frozenset({"alt", "$alt"})
ALT_VALUES = frozenset({"json", "sse"})
"""``alt`` values whose answers carry the usage where burnmeter reads it."""
USAGE_MASK_HEADERS = ("x-goog-fieldmask", "range", "if-range")
"""Google's field mask; a byte range of the answer (the usage may lie outside it)."""
METHOD_OVERRIDES = ("x-http-method-override", "x-http-method", "x-method-override")
UPGRADE_HEADERS = ("upgrade", "http2-settings")
READ_HEADERS = frozenset(
    {
        "host", "connection", "trailer", "transfer-encoding", "accept",
        *USAGE_MASK_HEADERS, *METHOD_OVERRIDES, *UPGRADE_HEADERS,
    }
)  # fmt: skip
"""The headers the reading looks at (gathered in one pass over the request's headers)."""

Fields = dict[str, list[str]]


@dataclass(frozen=True, slots=True)
class CanonicalRequest:
    """A request as burnmeter and the upstream both read it; every text field is
    printable ASCII except query values (decoded UTF-8, no controls)."""

    method: str
    path: str
    """Resolved path, without query."""
    query: tuple[tuple[str, str | None], ...]
    """Decoded (name, value) pairs in order; value None for a name without ``=``."""
    host: str
    """Client-facing host: lower case, no trailing dot; "" if the client named none."""
    port: int | None
    api: str | None
    """The metered API, or None (a free path, or one that is refused)."""
    style: Style
    free: bool
    """Not metered but safe to pass through uncharged (model lists, token counting)."""

    @property
    def authority(self) -> str:
        """``host[:port]`` as the client named it (for logs)."""
        if self.port is None:
            return self.host
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def model_in_path(self) -> str | None:
        """The model a Gemini path names."""
        found = GEMINI_MODEL.search(self.path)
        return found.group(1) if found else None

    def target(self, drop: Iterable[str] = ()) -> str:
        """Path and query as forwarded; query names in ``drop`` (case-folded) left out."""
        dropped = frozenset(drop)
        parts = [
            quote(name, safe=_QUERY_SAFE)
            + ("" if value is None else "=" + quote(value, safe=_QUERY_SAFE))
            for name, value in self.query
            if name.casefold() not in dropped
        ]
        return self.path + ("?" + "&".join(parts) if parts else "")


def raw_style(raw_path: str) -> Style:
    """The error shape for a request that could not be read (by its path's prefix)."""
    return errors.style_for(None, raw_path.partition("?")[0])


def read_request(request: http.Request, *, reverse: bool) -> CanonicalRequest:
    """The one reading of ``request``; ``reverse``: the client-facing host is its Host
    (reverse mode), else the destination it names (a forward proxy's client)."""
    style = raw_style(request.path)
    fields = read_fields(request.headers)
    try:
        path, query = split_target(request.path)
        check_protocol(fields)
        host, port = client_authority(request, fields, reverse=reverse)
    except ValueError as e:
        raise Ambiguous(str(e), style) from None
    api = api_for(path)
    style = errors.style_for(api, path)
    # mitmproxy's ``method`` is upper-cased, what it forwards is not: read the bytes
    method = request.data.method.decode("ascii", "replace")
    if method not in METHODS:
        raise Ambiguous(f"Method {method!r} is not supported", style)
    try:
        if api is not None:
            check_metered(method, query, fields)
    except UsageMasked as e:
        raise Ambiguous(str(e), style, errors.USAGE_MASKED) from None
    except ValueError as e:
        raise Ambiguous(str(e), style) from None
    free = api is None and is_free(method, path)
    return CanonicalRequest(method, path, query, host, port, api, style, free)


def read_fields(headers: http.Headers) -> Fields:
    """The values of the headers in ``READ_HEADERS``, by lower-case name, every copy."""
    fields: Fields = {}
    for raw_name, raw_value in headers.fields:
        name = raw_name.decode("latin-1").lower()
        if name in READ_HEADERS:
            fields.setdefault(name, []).append(raw_value.decode("latin-1"))
    return fields


def is_free(method: str, path: str) -> bool:
    """A path that no metered API covers but that is safe to pass through uncharged."""
    if method in ("GET", "HEAD"):
        return FREE_READS.search(path) is not None
    return method == "POST" and FREE_POSTS.search(path) is not None


# -- the request target ---------------------------------------------------------------------
def split_target(target: str) -> tuple[str, tuple[tuple[str, str | None], ...]]:
    """(resolved path, decoded query) of an origin-form request target."""
    if "#" in target:
        raise ValueError("A request target must not contain a fragment ('#')")
    if not (target.isascii() and target.isprintable()) or " " in target:
        raise ValueError("A request target must be printable ASCII (escape other bytes)")
    path, _, query = target.partition("?")
    return canonical_path(path), parse_query(query)


def canonical_path(raw: str) -> str:
    """``raw`` as an upstream resolves it; ValueError for what upstreams resolve differently."""
    if not raw.startswith("/"):
        raise ValueError("A request path must start with '/'")
    segments: list[str] = []
    raw_segments = raw[1:].split("/")
    for raw_segment in raw_segments:
        segment = _decode(raw_segment, PATH_CHARS, "path")
        if segment == "..":
            if not segments:
                raise ValueError("A request path must not climb above '/' ('..')")
            segments.pop()
        elif segment not in ("", "."):
            segments.append(segment)
    trailing = "/" if segments and raw_segments[-1] == "" else ""
    return "/" + "/".join(segments) + trailing


def _decode(raw: str, allowed: frozenset[str], where: str) -> str:
    """Percent-decode ``raw``, whose characters, raw or encoded, must be in ``allowed``."""
    for c in raw:
        if c not in allowed and c != "%":
            raise ValueError(f"Character {c!r} is not allowed in a request {where}")
    decoded = _unescape(raw, where).decode("latin-1") if "%" in raw else raw
    for c in decoded:
        if c not in allowed:
            raise ValueError(f"An escape of {c!r} is ambiguous in a request {where}")
    return decoded


def _unescape(raw: str, where: str, plus: bool = False) -> bytes:
    """The bytes ``raw`` stands for (``%XX`` escapes; ``+`` a space if ``plus``)."""
    data = bytearray()
    i = 0
    while i < len(raw):
        c = raw[i]
        if c == "%":
            escape = raw[i + 1 : i + 3]
            if len(escape) != 2 or not _HEX.issuperset(escape):
                raise ValueError(f"Malformed percent-escape in the request {where}")
            data.append(int(escape, 16))
            i += 3
            continue
        data += b" " if plus and c == "+" else c.encode()
        i += 1
    return bytes(data)


def parse_query(raw: str) -> tuple[tuple[str, str | None], ...]:
    """Decoded (name, value) pairs; ``+`` is a space (as form decoding reads it)."""
    if not raw:
        return ()
    pairs: list[tuple[str, str | None]] = []
    for part in raw.split("&"):
        if not part:
            continue
        name, eq, value = part.partition("=")
        decoded_name = _query_text(name)
        if not decoded_name.isprintable() or not decoded_name.isascii():
            raise ValueError("A query parameter name must be printable ASCII")
        pairs.append((decoded_name, _query_text(value) if eq else None))
    return tuple(pairs)


def _query_text(raw: str) -> str:
    for c in raw:
        if c not in QUERY_CHARS and c not in "%=":
            raise ValueError(f"Character {c!r} is not allowed in a request query")
    data = _unescape(raw, "query", plus=True)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("A query parameter must be UTF-8 once decoded") from None
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text):
        raise ValueError("A query parameter must not hold control characters")
    return text


# -- the host ---------------------------------------------------------------------------------
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def canonical_host(authority: str) -> tuple[str, int | None]:
    """(host, port) of a Host value: lower case, no trailing dot; ValueError if invalid."""
    if authority.startswith("["):
        literal, bracket, rest = authority[1:].partition("]")
        try:
            host = str(ipaddress.IPv6Address(literal))
        except ValueError:
            raise ValueError(f"Invalid IPv6 literal in Host {authority!r}") from None
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"Invalid Host {authority!r}")
        return host, _port(rest[1:]) if rest else None
    name, colon, port_text = authority.partition(":")
    port = _port(port_text) if colon else None
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"Invalid host name {authority!r} (use its IDNA/punycode form)")
    for label in labels:
        if label.startswith("xn--"):
            try:
                label.encode("ascii").decode("idna")
            except UnicodeError:
                raise ValueError(f"Invalid IDNA label in host {authority!r}") from None
    if labels[-1].isdigit():  # a name never ends in a number: an IPv4 address, or nothing
        try:
            ipaddress.IPv4Address(name)
        except ValueError:
            raise ValueError(f"Invalid IPv4 address in Host {authority!r}") from None
    return name, port


def _port(text: str) -> int:
    if not (text.isdigit() and text.isascii() and 1 <= int(text) <= 65535):
        raise ValueError(f"Invalid port {text!r} in Host")
    return int(text)


def client_authority(
    request: http.Request, fields: Fields, *, reverse: bool
) -> tuple[str, int | None]:
    """The host and port the client addressed, read one way only."""
    if not reverse:
        # A forward proxy's client names the destination (absolute URL or CONNECT): that is
        # where mitmproxy connects, so that is what is billed.
        return canonical_host(url.hostport(request.scheme, request.host, request.port))
    named = list(fields.get("host", ()))
    if request.authority:
        named.append(request.authority)
    readings = {canonical_host(value) for value in named}
    if len(readings) > 1:
        raise ValueError("The request names several hosts (Host, :authority, target)")
    return readings.pop() if readings else ("", None)


# -- the protocol -----------------------------------------------------------------------------
def check_protocol(fields: Fields) -> None:
    """No protocol switch (an unmetered channel), no trailers, one plain chunked framing."""
    for name in UPGRADE_HEADERS:
        if name in fields:
            raise ValueError(f"Protocol upgrades are not supported ({name} header)")
    for value in fields.get("connection", ()):
        if any(token.strip().lower() == "upgrade" for token in value.split(",")):
            raise ValueError("Protocol upgrades are not supported (Connection: upgrade)")
    if "trailer" in fields:
        raise ValueError("Request trailers are not supported")
    framing = fields.get("transfer-encoding")
    if framing and [value.strip().lower() for value in framing] != ["chunked"]:
        raise ValueError("Transfer-Encoding other than one 'chunked' is not supported")
    for name in METHOD_OVERRIDES:
        if name in fields:
            raise ValueError(f"Method overrides are not supported ({name} header)")


def check_metered(method: str, query: Iterable[tuple[str, str | None]], fields: Fields) -> None:
    """A metered request: POST, asking for an answer that carries its usage."""
    if method != "POST":
        raise ValueError(f"{method} is not supported on this path (POST only)")
    for name, value in query:
        folded = name.casefold()
        if folded in USAGE_MASKS:
            raise UsageMasked(f"Query parameter {name!r} is not supported: it hides the usage")
        if folded in ALT_PARAMS and (value or "").lower() not in ALT_VALUES:
            raise UsageMasked(f"{name}={value} is not supported: use alt=json or alt=sse")
    for name in USAGE_MASK_HEADERS:
        if name in fields:
            raise UsageMasked(f"Header {name!r} is not supported: it hides the usage")
    for value in fields.get("accept", ()):
        if "proto" in value.lower():
            raise UsageMasked("Binary (protobuf) answers are not supported: accept JSON")


# -- what is forwarded -----------------------------------------------------------------------
def forward(request: http.Request, canonical: CanonicalRequest, *, reverse: bool) -> None:
    """Send upstream exactly what was read: the resolved path, the query without Gemini's
    ``key``, and (a forward proxy) the destination's own host; no ``TE`` (trailers)."""
    target = canonical.target(drop=(KEY_PARAM,))
    if request.path != target:
        request.path = target
    if not reverse:
        request.host = canonical.host
        request.host_header = url.hostport(request.scheme, canonical.host, request.port)
    request.headers.pop("te", None)
