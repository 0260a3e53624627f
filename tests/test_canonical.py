"""The one reading of a request (addons/canonical.py), attacked with generated inputs.

Each property states what an upstream would read and checks that burnmeter read the same
(or refused): the path it meters is the path it forwards, a key hides nowhere, the host
that picks the route is one host, no protocol switch, no usage-hiding parameter.
"""

from __future__ import annotations

import posixpath
from urllib.parse import quote
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.test import tutils

from addons import errors
from addons.canonical import FREE_POSTS
from addons.canonical import canonical_host
from addons.canonical import canonical_path
from addons.canonical import forward
from addons.canonical import read_request
from addons.exceptions import Ambiguous
from addons.exceptions import ConflictingKeys
from addons.keys import client_key
from addons.keys import drop_client_key
from burnmeter.documents import new_key
from burnmeter.usage import api_for

EXAMPLES = settings(max_examples=200, deadline=None)
"""Each property tries 200 generated requests (reading one takes microseconds)."""

KEY = "sk-burn-canonical-0123456789"
GEMINI = "/v1beta/models/gemini-2.5-flash:generateContent"


def req(
    target: str,
    headers: list[tuple[str, str]] | None = None,
    method: str = "POST",
    authority: str = "",
    host: str = "api.test",
) -> http.Request:
    fields = [("host", "api.test")] if headers is None else headers
    return tutils.treq(
        method=method.encode(),
        host=host,
        port=80,
        authority=authority.encode(),
        path=target.encode("utf-8", "surrogateescape"),
        headers=http.Headers([(k.encode(), v.encode()) for k, v in fields]),
        content=b"{}",
    )


def read(target: str, **kwargs: object):  # type: ignore[no-untyped-def]
    return read_request(req(target, **kwargs), reverse=True)  # type: ignore[arg-type]


def upstream_path(target: str) -> str:
    """How an upstream resolves a forwarded path: percent-decoded, dot segments resolved."""
    path = unquote(target.partition("?")[0])
    resolved = posixpath.normpath(path)
    return resolved + ("/" if path.endswith("/") and resolved != "/" else "")


# -- class 1: the path metered is the path served ---------------------------------------------
PIECES = [
    "/v1/chat/completions",
    "/v1/messages/count_tokens",
    "/v1/messages",
    "/v1beta/models/m:countTokens",
    GEMINI,
    "/",
    "/..",
    "/.",
    "#",
    "%23",
    "%2e",
    "%2E%2e",
    "%2F",
    "%3F",
    "?",
    "%00",
    ";",
    "\\",
    "%5C",
    "%63",
    "%25",
    " ",
    "\t",
    "é",
    "//",
    "x",
    "&",
    "=",
]
targets = st.lists(st.sampled_from(PIECES), min_size=1, max_size=8).map("".join)


@EXAMPLES
@given(targets)
def test_a_path_is_metered_as_the_upstream_serves_it(target: str) -> None:
    try:
        canonical = read(target)
    except Ambiguous as e:
        assert e.problem == errors.AMBIGUOUS
        return
    forwarded = canonical.target()
    assert "#" not in forwarded and all("!" <= c <= "~" for c in forwarded)
    # what the upstream resolves is what was classified (free, metered, refused)
    assert upstream_path(forwarded) == canonical.path
    assert api_for(upstream_path(forwarded)) == canonical.api
    if canonical.free:
        assert FREE_POSTS.search(upstream_path(forwarded)) is not None
    # and reading the forwarded request again reads the same request
    assert read(forwarded) == canonical


@pytest.mark.parametrize(
    "target",
    [
        "/v1/chat/completions#/v1/messages/count_tokens",
        "/v1/chat/completions%23/v1/messages/count_tokens",
        "/v1/chat/completions;/v1/messages/count_tokens",
        "/v1/chat/completions%2F..%2F..%2Fv1/messages/count_tokens",
        "/../v1/messages/count_tokens",
        "/v1/chat/completions\\..\\..\\v1\\messages\\count_tokens",
        "/v1/messages/count_tokens%00",
        "/v1/messages/count_tok%zzens",
    ],
)
def test_confusable_free_paths_are_refused(target: str) -> None:
    with pytest.raises(Ambiguous):
        read(target)


def test_dot_segments_and_escapes_resolve_as_an_upstream_would() -> None:
    canonical = read("/v1beta/models/cheap:countTokens/../../models/big%3AgenerateContent")
    assert canonical.path == "/v1beta/models/big:generateContent"
    assert canonical.api == "gemini.generate" and not canonical.free
    assert canonical.model_in_path == "big"
    assert read("/v1/%63hat//completions/./").path == "/v1/chat/completions/"
    assert canonical_path("/a/b/%2E%2E/c") == "/a/c"


def test_the_gemini_model_is_the_one_the_method_applies_to() -> None:
    canonical = read("/v1beta/models/cheap:x/models/big:generateContent")
    assert canonical.model_in_path == "big"


# -- class 4: a key is found and stripped by one reading ---------------------------------------
def spellings(word: str) -> st.SearchStrategy[str]:
    """``word`` in any case, each character raw or percent-encoded (either hex case)."""

    def one(c: str) -> st.SearchStrategy[str]:
        escapes = [f"%{ord(c):02X}", f"%{ord(c):02x}"]
        return st.sampled_from([c.lower(), c.upper(), *escapes, *(e.lower() for e in escapes)])

    return st.tuples(*(one(c) for c in word)).map("".join)


@EXAMPLES
@given(spellings("key"), st.sampled_from(["", "alt=sse&", "a=1&"]), st.booleans())
def test_a_query_key_is_found_and_stripped_however_it_is_spelt(
    name: str, before: str, after: bool
) -> None:
    target = f"{GEMINI}?{before}{name}={KEY}" + ("&b=2" if after else "")
    request = req(target)
    canonical = read_request(request, reverse=True)
    assert client_key(request, "gemini", canonical.query) == KEY
    forward(request, canonical, reverse=True)
    drop_client_key(request, KEY)
    assert KEY not in request.path and KEY not in str(request.headers)


headers_with_keys = st.lists(
    st.tuples(
        st.sampled_from(["authorization", "x-api-key", "x-goog-api-key"]).flatmap(
            lambda n: st.tuples(*(st.sampled_from([c.lower(), c.upper()]) for c in n)).map("".join)
        ),
        st.sampled_from([KEY, KEY + "-other"]),
    ),
    min_size=1,
    max_size=4,
)


@EXAMPLES
@given(headers_with_keys, st.sampled_from(["openai", "anthropic", "gemini"]))
def test_keys_in_every_header_and_copy_are_seen_and_never_forwarded(
    fields: list[tuple[str, str]], style: str
) -> None:
    headers = [("host", "api.test")] + [
        (name, f"Bearer {value}" if name.lower() == "authorization" else value)
        for name, value in fields
    ]
    request = req(GEMINI, headers)
    values = {value for _, value in fields}
    try:
        key = client_key(request, style)  # type: ignore[arg-type]
    except ConflictingKeys:
        assert len(values) > 1
    else:
        assert len(values) == 1 and key in (None, *values)
    drop_client_key(request)
    assert KEY not in str(request.headers)


def test_a_key_elsewhere_in_the_request_is_not_forwarded() -> None:
    request = req(f"{GEMINI}?note={KEY}", [("host", "api.test"), ("x-note", f"k={KEY}")])
    drop_client_key(request, KEY)
    assert KEY not in request.path and KEY not in str(request.headers)


@EXAMPLES
@given(
    st.sampled_from(["proxy-authorization", "api-key", "x-auth-token", "cookie", "openai-api-key"]),
    st.sampled_from(["{}", "Bearer {}", "session={}; theme=dark", "{}%20"]),
    st.booleans(),
)
def test_a_burnmeter_key_in_any_header_or_parameter_is_never_forwarded(
    name: str, shape: str, encoded: bool
) -> None:
    """Also one the request did not authenticate with (another user's, in a header no API
    reads keys from): anything shaped like a key burnmeter makes is its secret."""
    other = new_key()
    value = shape.format("".join(f"%{b:02X}" for b in other.encode()) if encoded else other)
    request = req(f"{GEMINI}?note={quote(value)}", [("host", "api.test"), (name, value)])
    drop_client_key(request, KEY)
    assert name not in request.headers and "note" not in request.query
    kept = req(GEMINI, [("host", "api.test"), ("cookie", "session=sk-other-0123456789")])
    drop_client_key(kept, KEY)
    assert kept.headers["cookie"] == "session=sk-other-0123456789"


def test_a_short_legacy_key_is_not_looked_for_inside_other_values() -> None:
    request = req(f"{GEMINI}?q=abc1", [("host", "api.test"), ("user-agent", "abc1-client")])
    drop_client_key(request, "abc1")
    assert request.headers["user-agent"] == "abc1-client" and "q=abc1" in request.path


# -- the host: one reading, lower case, no trailing dot ----------------------------------------
labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
names = st.lists(labels, min_size=1, max_size=4).map(".".join).filter(lambda n: not n[-1].isdigit())


@EXAMPLES
@given(names, st.booleans(), st.booleans(), st.one_of(st.none(), st.integers(1, 65535)))
def test_host_variants_read_as_one_host(
    name: str, upper: bool, dot: bool, port: int | None
) -> None:
    written = (name.upper() if upper else name) + ("." if dot else "")
    authority = written if port is None else f"{written}:{port}"
    assert canonical_host(authority) == (name, port)


@pytest.mark.parametrize(
    "authority",
    ["a..b", "a_b.test", "-a.test", "a.test:", "a.test:0", "a.test:99999", "a.test:+1",
     "127.1", "0x7f.0.0.1", "bücher.test", "xn--zz.test", "[::1", "a.test:80:80", " a.test"],
)  # fmt: skip
def test_ambiguous_hosts_are_refused(authority: str) -> None:
    with pytest.raises(ValueError):
        canonical_host(authority)


def test_several_host_readings_are_refused() -> None:
    with pytest.raises(Ambiguous):
        read("/v1/models", headers=[("host", "a.test"), ("host", "b.test")], method="GET")
    with pytest.raises(Ambiguous):
        read("/v1/models", headers=[("host", "a.test")], method="GET", authority="b.test")
    same = read("/v1/models", headers=[("host", "A.test.")], method="GET", authority="a.test")
    assert (same.host, same.port) == ("a.test", None)


def test_a_forward_proxy_request_goes_to_the_canonical_destination() -> None:
    request = req("/v1/chat/completions", [("host", "elsewhere.test")], host="API.test.")
    canonical = read_request(request, reverse=False)
    assert canonical.host == "api.test"
    forward(request, canonical, reverse=False)
    assert request.host == "api.test" and request.headers["host"] == "api.test"


# -- class 3: no protocol switch ---------------------------------------------------------------
upgrade_headers = st.one_of(
    st.tuples(
        spellings("upgrade").filter(lambda s: "%" not in s),
        st.sampled_from(["websocket", "h2c", "x"]),
    ),
    st.tuples(
        st.just("connection"),
        st.lists(st.sampled_from(["keep-alive", "Upgrade", "UPGRADE", " upgrade "]), min_size=1)
        .filter(lambda t: any(v.strip().lower() == "upgrade" for v in t))
        .map(",".join),
    ),
    st.tuples(st.just("http2-settings"), st.just("AAMAAABkAAQAAP__")),
)


@EXAMPLES
@given(upgrade_headers, st.sampled_from(["/v1/chat/completions", "/v1/models", GEMINI]))
def test_protocol_upgrades_are_refused_on_every_path(header: tuple[str, str], path: str) -> None:
    with pytest.raises(Ambiguous):
        read(path, headers=[("host", "api.test"), header])


@pytest.mark.parametrize(
    "header",
    [("trailer", "x-checksum"), ("transfer-encoding", "gzip, chunked"),
     ("x-http-method-override", "GET")],
)  # fmt: skip
def test_trailers_odd_framings_and_method_overrides_are_refused(header: tuple[str, str]) -> None:
    with pytest.raises(Ambiguous):
        read("/v1/chat/completions", headers=[("host", "api.test"), header])


@pytest.mark.parametrize("method", ["CONNECT", "TRACE", "post", "PRI"])
def test_only_plain_methods_are_read(method: str) -> None:
    with pytest.raises(Ambiguous):
        read("/v1/models", method=method)


def test_a_metered_path_takes_post_only() -> None:
    with pytest.raises(Ambiguous, match="POST only"):
        read("/v1/chat/completions", method="GET")


def test_te_is_not_forwarded() -> None:
    request = req("/v1/chat/completions", [("host", "api.test"), ("te", "trailers")])
    forward(request, read_request(request, reverse=True), reverse=True)
    assert "te" not in request.headers


# -- class 14: the answer keeps its usage -------------------------------------------------------
masks = st.one_of(
    st.tuples(
        st.sampled_from(["fields", "$fields", "callback", "$callback"]).flatmap(spellings),
        st.just("x"),
    ),
    st.tuples(
        st.sampled_from(["alt", "$alt"]).flatmap(spellings),
        st.sampled_from(["proto", "media", "PROTO", "json2", "", "ssex"]),
    ),
)


@EXAMPLES
@given(masks, st.sampled_from([GEMINI, "/v1/chat/completions", "/v1/messages"]))
def test_usage_hiding_parameters_are_refused(param: tuple[str, str], path: str) -> None:
    name, value = param
    with pytest.raises(Ambiguous) as refused:
        read(f"{path}?{name}={value}")
    assert refused.value.problem == errors.USAGE_MASKED


@pytest.mark.parametrize(
    "header",
    [("x-goog-fieldmask", "candidates"), ("X-Goog-FieldMask", "*"),
     ("accept", "application/x-protobuf"), ("Range", "bytes=0-100")],
)  # fmt: skip
def test_usage_hiding_headers_are_refused(header: tuple[str, str]) -> None:
    with pytest.raises(Ambiguous):
        read(GEMINI, headers=[("host", "api.test"), header])


@pytest.mark.parametrize("alt", ["json", "sse", "SSE"])
def test_alt_json_and_sse_are_served(alt: str) -> None:
    assert read(f"{GEMINI}?alt={alt}").api == "gemini.generate"
