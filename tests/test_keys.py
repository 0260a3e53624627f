"""Client keys (``addons/keys.py``): where they are read, conflicts, stripping, the cache.

The properties are attacked with generated requests: key headers in any case and any number
of copies, the Gemini ``key`` parameter in any spelling, keys of any placement and style.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.test import tutils

from addons.errors import Style
from addons.exceptions import ConflictingKeys
from addons.keys import MIN_SEARCHED_KEY
from addons.keys import KeyCache
from addons.keys import client_key
from addons.keys import drop_client_key
from addons.keys import holds_key
from addons.keys import presented_keys
from addons.keys import searchable
from addons.keys import set_upstream_key
from burnmeter.documents import hash_key
from burnmeter.documents import new_key

EXAMPLES = settings(max_examples=200, deadline=None)  # no timing asserted: a loaded machine
KEY = "sk-burn-keys-0123456789abcdef"
OTHER = "sk-burn-keys-fedcba9876543210"
GEMINI = "/v1beta/models/gemini-2.5-flash:generateContent"
PATHS: dict[Style, str] = {
    "openai": "/v1/chat/completions",
    "anthropic": "/v1/messages",
    "gemini": GEMINI,
}
READ_BY: dict[Style, set[str]] = {
    "openai": {"authorization"},
    "anthropic": {"authorization", "x-api-key"},
    "gemini": {"authorization", "x-goog-api-key", "key"},
}
"""Where each API's own clients put a key (SPEC, admission 1; Gemini's documentation)."""
UPSTREAM_HEADER: dict[Style, tuple[str, str]] = {
    "openai": ("authorization", "Bearer {}"),
    "anthropic": ("x-api-key", "{}"),
    "gemini": ("x-goog-api-key", "{}"),
}


def request(target: str, headers: list[tuple[str, str]] | None = None) -> http.Request:
    fields = [(k.encode(), v.encode()) for k, v in headers or []]
    return tutils.treq(method=b"POST", path=target.encode(), headers=http.Headers(fields))


def any_case(word: str) -> st.SearchStrategy[str]:
    return st.tuples(*(st.sampled_from([c.lower(), c.upper()]) for c in word)).map("".join)


def query_name() -> st.SearchStrategy[str]:
    """``key`` in any case, each letter raw or percent-encoded."""
    return st.tuples(
        *(st.sampled_from([c, c.upper(), f"%{ord(c):02X}", f"%{ord(c):02x}"]) for c in "key")
    ).map("".join)


@st.composite
def keyed_requests(draw: st.DrawFn) -> tuple[Style, http.Request, list[tuple[str, str]]]:
    """A request of some style carrying KEY or OTHER in 1-5 places: (style, request,
    [(place, key)])."""
    style: Style = draw(st.sampled_from(list(PATHS)))
    headers: list[tuple[str, str]] = []
    params: list[str] = []
    placed = []
    for place in draw(
        st.lists(
            st.sampled_from(["authorization", "x-api-key", "x-goog-api-key", "key"]),
            min_size=1,
            max_size=5,
        )
    ):
        key = draw(st.sampled_from([KEY, OTHER]))
        placed.append((place, key))
        if place == "key":
            params.append(f"{draw(query_name())}={key}")
        elif place == "authorization":
            scheme = draw(any_case("bearer"))
            headers.append(
                (draw(any_case(place)), f"{draw(st.sampled_from(['', ' ']))}{scheme} {key} ")
            )
        else:
            headers.append((draw(any_case(place)), draw(st.sampled_from([key, f" {key}"]))))
    target = PATHS[style] + "?" + "&".join(["alt=sse", *params])
    return style, request(target, headers), placed


# -- reading the key ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "headers, path, style, key",
    [
        ([("authorization", "Bearer sk-1")], "/v1/chat/completions", "openai", "sk-1"),
        ([("authorization", "bearer  sk-1 ")], "/v1/chat/completions", "openai", "sk-1"),
        ([("x-api-key", "sk-2")], "/v1/chat/completions", "openai", None),
        ([("x-api-key", "sk-2")], "/v1/messages", "anthropic", "sk-2"),
        ([("authorization", "Basic abc")], "/v1/messages", "anthropic", None),
        ([("x-goog-api-key", "g-1")], "/v1beta/models/m:generateContent", "gemini", "g-1"),
        ([], "/v1beta/models/m:generateContent?key=g-2", "gemini", "g-2"),
        ([], "/v1/chat/completions?key=g-2", "openai", None),
    ],
)
def test_client_key(headers, path: str, style, key: str | None) -> None:
    request = tutils.treq(
        path=path.encode(), headers=http.Headers([(k.encode(), v.encode()) for k, v in headers])
    )
    assert client_key(request, style) == key


@EXAMPLES
@given(keyed_requests())
def test_one_key_anywhere_is_read_where_the_api_reads_it_and_two_conflict(
    case: tuple[Style, http.Request, list[tuple[str, str]]],
) -> None:
    style, req, placed = case
    assert sorted(presented_keys(req)) == sorted(placed), "every copy is seen, in any case"
    keys = {key for _, key in placed}
    if len(keys) > 1:
        with pytest.raises(ConflictingKeys):  # even where this API reads no key
            client_key(req, style)
        return
    read_here = any(place in READ_BY[style] for place, _ in placed)
    assert client_key(req, style) == (keys.pop() if read_here else None)


@EXAMPLES
@given(keyed_requests())
def test_no_client_key_is_ever_forwarded(
    case: tuple[Style, http.Request, list[tuple[str, str]]],
) -> None:
    style, req, _ = case
    set_upstream_key(req, style, "sk-upstream")
    assert presented_keys(req) == [(UPSTREAM_HEADER[style][0], "sk-upstream")], (
        "the upstream's key, once, in the API's own header"
    )
    assert KEY not in str(req.headers) + req.path and OTHER not in str(req.headers) + req.path
    assert req.query.get("alt") == "sse", "other parameters survive"


@pytest.mark.parametrize(
    "value",
    ["Basic a2V5", "Bearer", "Bearer    ", "Token sk-1", "Bearersk-1", ""],
)
def test_authorization_other_than_a_bearer_token_holds_no_key(value: str) -> None:
    assert presented_keys(request(PATHS["openai"], [("authorization", value)])) == []


def test_empty_places_hold_no_key_and_do_not_conflict() -> None:
    req = request(
        f"{GEMINI}?key=&KEY=",
        [("x-api-key", "  "), ("x-goog-api-key", ""), ("authorization", f"Bearer {KEY}")],
    )
    assert client_key(req, "gemini") == KEY


@pytest.mark.parametrize(
    "headers, target",
    [
        ([("authorization", f"Bearer {KEY}"), ("x-api-key", OTHER)], PATHS["openai"]),
        ([("authorization", f"Bearer {KEY}"), ("Authorization", f"Bearer {OTHER}")], GEMINI),
        ([("x-goog-api-key", KEY)], f"{GEMINI}?key={OTHER}"),
        ([], f"{GEMINI}?key={KEY}&Key={OTHER}"),
        ([("x-api-key", KEY), ("X-API-KEY", OTHER)], PATHS["anthropic"]),
    ],
)
def test_two_different_keys_are_refused_whichever_places(
    headers: list[tuple[str, str]], target: str
) -> None:
    for style in PATHS:
        with pytest.raises(ConflictingKeys):
            client_key(request(target, headers), style)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "headers, target",
    [([], f"{GEMINI}?key={{}}"), ([("x-goog-api-key", "{}")], GEMINI)],
)
def test_a_stored_hash_is_never_a_key_on_gemini_either(
    headers: list[tuple[str, str]], target: str
) -> None:
    stored = hash_key(new_key())
    req = request(target.format(stored), [(k, v.format(stored)) for k, v in headers])
    assert client_key(req, "gemini") is None


@pytest.mark.parametrize(
    "query",
    [[("key", KEY)], [("KeY", KEY)]],
)
def test_the_decoded_query_given_is_the_one_read(query: list[tuple[str, str]]) -> None:
    """``query``: the canonical reading's pairs, read instead of the request's own."""
    req = request(f"{GEMINI}?unrelated=1")
    assert client_key(req, "gemini", query) == KEY
    assert client_key(req, "gemini", []) is None
    assert client_key(request(f"{GEMINI}?key={KEY}"), "gemini", []) is None


# -- what is looked for inside other values ----------------------------------------------------
def test_searchable_from_the_minimum_length() -> None:
    assert not searchable(None) and not searchable("")
    assert not searchable("k" * (MIN_SEARCHED_KEY - 1))
    assert searchable("k" * MIN_SEARCHED_KEY)


@pytest.mark.parametrize(
    "value, key, held",
    [
        (f"x={KEY}", KEY, True),
        (f"x={KEY.upper()}", KEY, True),  # any case
        ("x=" + "".join(f"%{b:02x}" for b in KEY.encode()), KEY, True),  # percent-encoded
        (f"session={new_key()}", None, True),  # shaped like a burnmeter key: anyone's
        (f"session={new_key().upper()}", "sk-other-0123456789", True),
        ("SK-BURN%2Dfoo", None, True),
        ("x=sk-legacy-0123456789abcdef", "sk-legacy-0123456789abcdef", True),
        ("x=sk-legacy-0123456789abcdef", None, False),
        ("user-agent abc1", "abc1", False),  # too short to look for
        ("nothing here", KEY, False),
    ],
)
def test_holds_key(value: str, key: str | None, held: bool) -> None:
    assert holds_key(value, key) is held


# -- stripping -----------------------------------------------------------------------------------
@EXAMPLES
@given(
    st.lists(
        st.sampled_from(["authorization", "x-api-key", "x-goog-api-key"]).flatmap(any_case),
        min_size=1,
        max_size=4,
    ),
    query_name(),
)
def test_every_key_header_copy_and_key_parameter_is_dropped(names: list[str], param: str) -> None:
    req = request(
        f"{GEMINI}?alt=sse&{param}=x&note=1",
        [(name, "Bearer x") for name in names] + [("user-agent", "sdk/1.0")],
    )
    drop_client_key(req)
    assert presented_keys(req) == []
    assert req.headers.fields == ((b"user-agent", b"sdk/1.0"),)
    assert req.query.items(multi=True) == (("alt", "sse"), ("note", "1"))


def test_the_key_found_elsewhere_goes_with_its_header_or_parameter() -> None:
    req = request(
        f"{GEMINI}?note=k%3D{KEY}&keep=1",
        [("x-note", f"see {KEY}"), ("x-NOTE", "other copy"), ("accept", "application/json")],
    )
    drop_client_key(req, KEY)
    assert "x-note" not in req.headers, "every copy of a header that held it"
    assert req.headers["accept"] == "application/json"
    assert req.query.items(multi=True) == (("keep", "1"),)


@pytest.mark.parametrize("target", [f"{GEMINI}?b=a%20b%2F&c=d+e", GEMINI, f"{GEMINI}?"])
def test_a_path_without_a_key_is_forwarded_byte_for_byte(target: str) -> None:
    """Re-encoding a query would change what the upstream reads (``%20`` became ``+``)."""
    req = request(target, [("authorization", f"Bearer {KEY}")])
    drop_client_key(req, KEY)
    assert req.path == target


@pytest.mark.parametrize("style", list(PATHS))
def test_set_upstream_key_puts_the_routes_key_where_the_api_reads_it(style: Style) -> None:
    req = request(
        PATHS[style],
        [("authorization", f"Bearer {KEY}"), ("x-api-key", KEY), ("x-goog-api-key", KEY)],
    )
    set_upstream_key(req, style, "sk-upstream", KEY)
    name, shape = UPSTREAM_HEADER[style]
    assert req.headers.fields == ((name.encode(), shape.format("sk-upstream").encode()),)


@pytest.mark.parametrize("style", list(PATHS))
def test_without_an_upstream_key_no_credential_is_sent(style: Style) -> None:
    req = request(PATHS[style], [("authorization", f"Bearer {KEY}"), ("x-debug", KEY)])
    set_upstream_key(req, style, None, KEY)
    assert req.headers.fields == ()


# -- the key cache ---------------------------------------------------------------------------
def test_key_cache_expires_and_is_bounded() -> None:
    now = [0.0]
    cache = KeyCache(ttl=10, max_entries=2, clock=lambda: now[0])
    assert cache.get("a") == (False, None)
    cache.put("a", None)  # unknown keys are cached too
    assert cache.get("a") == (True, None)
    now[0] = 10
    assert cache.get("a") == (False, None)
    for key in "bcd":
        cache.put(key, None)
    assert cache.get("b") == (False, None), "the oldest entry made room"
    assert cache.get("d") == (True, None)


def test_key_cache_ttl_zero_caches_nothing() -> None:
    cache = KeyCache(ttl=0)
    cache.put("a", None)
    assert cache.get("a") == (False, None)


def test_key_cache_put_again_renews_the_entry_and_evicts_nothing() -> None:
    """A key looked up again replaces its own entry (the bound drops no other one) and its
    ``ttl`` runs from the new look-up."""
    now = [0.0]
    cache = KeyCache(ttl=10, max_entries=2, clock=lambda: now[0])
    cache.put("a", None)
    cache.put("b", None)
    now[0] = 5
    cache.put("b", None)
    assert [cache.get(k)[0] for k in "ab"] == [True, True]
    now[0] = 14
    assert [cache.get(k)[0] for k in "ab"] == [False, True], "b renewed at 5: valid until 15"
    cache.put("c", None)
    cache.put("d", None)
    assert [cache.get(k)[0] for k in "bcd"] == [False, True, True], "b is then the oldest"


def test_key_cache_drops_an_expired_entry_when_asked() -> None:
    now = [0.0]
    cache = KeyCache(ttl=1, clock=lambda: now[0])
    cache.put("a", None)
    now[0] = 1
    assert cache.get("a") == (False, None)
    assert cache._entries == {}, "an expired entry does not linger"
