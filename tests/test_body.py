"""addons/body.py: the request body read once, each key once; orjson's reading taken only
where it is the stdlib's, and bodies written back as the upstream reads them."""

from __future__ import annotations

import json
import math
import string

import orjson
import pytest
from hypothesis import event
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from mitmproxy.test import tutils

from addons import errors
from addons.body import METERED_FIELDS
from addons.body import OrjsonBody
from addons.body import check_spellings
from addons.body import decode_body
from addons.body import encode_body
from addons.body import orjson_object
from addons.body import stdlib_object
from addons.body import unique_keys
from addons.exceptions import DuplicateKey
from addons.exceptions import Rejection

# -- the body: one reading of each key ----------------------------------------------------
json_keys = st.text(string.ascii_letters + "_", min_size=1, max_size=8)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(json_keys, inner, max_size=3),
    max_leaves=10,
)


def objects_in(value: object) -> list[dict[str, object]]:
    found: list[dict[str, object]] = []
    if isinstance(value, dict):
        found.append(value)
        for item in value.values():
            found += objects_in(item)
    elif isinstance(value, list):
        for item in value:
            found += objects_in(item)
    return found


@settings(deadline=None)  # no timing asserted: a loaded machine is slow
@given(st.dictionaries(json_keys, json_values, min_size=1, max_size=4), st.data())
def test_a_key_given_twice_at_any_depth_is_refused(body: dict[str, object], data) -> None:
    target = data.draw(st.sampled_from(objects_in(body)))
    if not target:
        target["k"] = 1
    key = data.draw(st.sampled_from(sorted(target)))
    marker = '"__dup0__": 0'
    target["__dup0__"] = 0
    text = json.dumps(body).replace(marker, f"{json.dumps(key)}: {json.dumps('again')}", 1)
    with pytest.raises(DuplicateKey):
        json.loads(text, object_pairs_hook=unique_keys)


@settings(deadline=None)  # no timing asserted: a loaded machine is slow
@given(st.sampled_from(sorted(METERED_FIELDS)), st.data())
def test_a_metered_field_spelt_otherwise_is_refused(name: str, data) -> None:
    respelt = data.draw(
        st.tuples(*(st.sampled_from([c.lower(), c.upper()]) for c in name)).map("".join)
    )
    if respelt in METERED_FIELDS:  # the same spelling, or the API's other one
        check_spellings({respelt: 1})
        return
    with pytest.raises(DuplicateKey):
        check_spellings({respelt: 1})
    with pytest.raises(DuplicateKey):
        check_spellings({"outer": {name: 1, respelt: 2}})


# -- orjson's reading against the stdlib's -------------------------------------------------
# JSON texts as any encoder (or attacker) may write them: whitespace anywhere it may be,
# escapes for any character, numbers spelt otherwise, NaN, integers past 64 bits, lone
# surrogates (escaped, or as the bytes the stdlib reads with surrogatepass), keys given twice
# (spelt alike or not), a byte order mark, and some texts broken by one byte.
text_chars = st.characters(codec=None) | st.sampled_from('"\\/:\x00\x1f\x7f\u2028\ud800\udfff😀')
key_texts = st.text(st.sampled_from('aAb_:é😀"\\\n\ud800'), max_size=3)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(text_chars, max_size=6)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(key_texts, inner, max_size=4),
    max_leaves=12,
)
SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "/": "\\/", "\b": "\\b", "\f": "\\f", "\n": "\\n",
                 "\r": "\\r", "\t": "\\t"}  # fmt: skip


def u_escape(char: str, upper: bool) -> str:
    units = char.encode("utf-16-le", "surrogatepass")
    out = "".join(
        f"\\u{int.from_bytes(units[i : i + 2], 'little'):04x}" for i in (0, 2)[: len(units) // 2]
    )
    return out.upper().replace("\\U", "\\u") if upper else out


def string_text(text: str, draw) -> str:
    out = []
    for char in text:
        how = draw(st.sampled_from(["raw"] * 9 + ["short", "u", "U"]))
        if how == "short" and char in SHORT_ESCAPES:
            out.append(SHORT_ESCAPES[char])
        elif how in ("u", "U") or char in '"\\' or ord(char) < 0x20:
            out.append(u_escape(char, how == "U"))
        else:
            out.append(char)  # lone surrogates too: encoded with surrogatepass below
    return '"' + "".join(out) + '"'


def number_text(value: int | float, draw) -> str:
    if isinstance(value, int):
        return draw(st.sampled_from(["-0", "0"])) if value == 0 else str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    spellings = [
        repr(value),
        repr(value).replace("e", "E"),
        f"{value:.17e}",
        orjson.dumps(value).decode(),
    ]
    return draw(st.sampled_from(spellings))  # each reads back as this very float


def document_text(value: object, draw, duplicates: bool, twice: object = None) -> str:
    """A JSON text of ``value``; with ``duplicates``, some objects name a key twice, and
    the object ``twice`` always does."""

    def ws() -> str:
        return draw(st.sampled_from(["", "", " ", "\n  ", "\t", "\r\n"]))

    def text(item: object) -> str:
        return document_text(item, draw, duplicates, twice)

    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int | float):
        return number_text(value, draw)
    if isinstance(value, str):
        return string_text(value, draw)
    if isinstance(value, list):
        return "[" + ",".join(ws() + text(item) + ws() for item in value) + ws() + "]"
    assert isinstance(value, dict)
    pairs = list(value.items())
    if pairs and (value is twice or (duplicates and draw(st.integers(0, 3)) == 0)):
        key, _ = draw(st.sampled_from(pairs))
        pairs.insert(draw(st.integers(0, len(pairs))), (key, draw(values)))
    texts = [
        ws() + string_text(key, draw) + ws() + ":" + ws() + text(item) + ws() for key, item in pairs
    ]
    return "{" + ",".join(texts) + ws() + "}"


@st.composite
def documents(draw, top=values, duplicates: bool = True, broken: bool = True) -> bytes:
    value = draw(st.dictionaries(key_texts, values, max_size=5) | top)
    raw = document_text(value, draw, duplicates).encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 19)) == 0:
        raw = b"\xef\xbb\xbf" + raw
    if broken and raw and draw(st.integers(0, 9)) == 0:
        at = draw(st.integers(0, len(raw) - 1))
        edit = draw(st.sampled_from(["drop", "insert", "cut"]))
        byte = bytes([draw(st.integers(0, 255))])
        raw = {
            "drop": raw[:at] + raw[at + 1 :],
            "insert": raw[:at] + byte + raw[at:],
            "cut": raw[:at],
        }[edit]
    return raw


def reading(read, raw: bytes) -> tuple[object, ...]:
    """What a reader answers, comparable: the value's repr (it tells -0.0 from 0, 1 from 1.0
    and True, and orders keys) or the refusal."""
    try:
        return ("object", repr(dict(read(raw))))
    except Rejection as e:
        return ("refused", e.problem, e.message)


@settings(deadline=None, max_examples=600)  # no timing asserted: a loaded machine is slow
@given(documents())
def test_orjson_answers_only_where_it_reads_what_the_stdlib_reads(raw: bytes) -> None:
    fast = orjson_object(raw)
    event("orjson's reading" if fast is not None else "the stdlib's reading")
    if fast is not None:
        assert reading(stdlib_object, raw) == ("object", repr(dict(fast)))
    request = tutils.treq(content=raw)
    try:
        expected = reading(stdlib_object, raw)
        check_spellings(stdlib_object(raw))
    except DuplicateKey as e:
        expected = ("refused", errors.AMBIGUOUS, str(e))
    except Rejection:
        pass
    assert reading(lambda _: decode_body(request), raw) == expected


@settings(deadline=None)  # no timing asserted: a loaded machine is slow
@given(st.dictionaries(key_texts, values, min_size=1, max_size=4), st.data())
def test_a_key_given_twice_is_refused_as_the_stdlib_names_it(body: dict, data) -> None:
    target = data.draw(st.sampled_from(objects_in(body)))
    target.setdefault("k", 1)
    raw = document_text(body, data.draw, duplicates=data.draw(st.booleans()), twice=target)
    raw_bytes = raw.encode("utf-8", "surrogatepass")
    assert orjson_object(raw_bytes) is None
    with pytest.raises(Rejection) as stdlib_answer:
        stdlib_object(raw_bytes)
    with pytest.raises(Rejection) as answer:
        decode_body(tutils.treq(content=raw_bytes))
    assert answer.value.problem is stdlib_answer.value.problem
    assert answer.value.message == stdlib_answer.value.message
    assert stdlib_answer.value.problem is errors.AMBIGUOUS


def test_a_key_given_twice_is_named() -> None:
    for raw in (b'{"a": {"k": 1, "k": 1}}', b'{"k":1,"\\u006b":2}', b'[{"x": [{"k":1,"k":1}]}]'):
        with pytest.raises(Rejection) as answer:
            decode_body(tutils.treq(content=raw))
        assert answer.value.problem is errors.AMBIGUOUS
        assert answer.value.message == "Request body names 'k' twice"


# values the fast path must take: what encoders write, in each shape a client sends
canonical_floats = st.floats(allow_nan=False, allow_infinity=False).filter(
    lambda x: orjson.dumps(x) == json.dumps(x).encode()
)
canonical_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | canonical_floats | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(deadline=None)  # no timing asserted: a loaded machine is slow
@given(st.dictionaries(st.text(max_size=6), canonical_values, max_size=5))
def test_orjson_reads_what_json_encoders_write(body: dict) -> None:
    written = [
        orjson.dumps(body),  # JSON.stringify writes the same
        json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode(),  # httpx
        json.dumps(body, ensure_ascii=False).encode(),
        json.dumps(body, ensure_ascii=False, indent=2).encode(),
    ]
    for raw in written:
        fast = orjson_object(raw)
        assert fast is not None
        assert repr(dict(fast)) == repr(body)


@pytest.mark.parametrize("depth", [1, 254, 255, 1024, 1025, 1400, 3000])
@pytest.mark.parametrize("opening", ["[", '{"a":'])
def test_depth_is_answered_as_the_stdlib_answers_it(depth: int, opening: str) -> None:
    closing = "]" if opening == "[" else "}"
    raw = ('{"a":' + opening * depth + "1" + closing * depth + "}").encode()
    fast = orjson_object(raw)
    assert fast is None or depth < 254  # orjson writes back 254 levels at most
    request = tutils.treq(content=raw)
    assert reading(lambda _: decode_body(request), raw) == reading(stdlib_object, raw)
    if depth >= 3000:
        assert reading(stdlib_object, raw)[:2] == ("refused", errors.BAD_REQUEST)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"n": NaN}', b'{"n": -Infinity}', b'{"n": 18446744073709551616}',
        b'{"n": -9223372036854775809}', b'{"n": 1e400}', b'{"s": "\\ud800"}',
        b'{"s": "\xed\xa0\x80"}', b'\xef\xbb\xbf{"a": 1}', '{"a": 1}'.encode("utf-16"),
    ],
)  # fmt: skip
def test_what_orjson_refuses_or_reads_otherwise_is_the_stdlibs_to_read(raw: bytes) -> None:
    assert orjson_object(raw) is None
    assert isinstance(decode_body(tutils.treq(content=raw)), dict)


# -- writing back --------------------------------------------------------------------------
@settings(deadline=None, max_examples=300)  # no timing asserted: a loaded machine is slow
@given(documents(broken=False, duplicates=False), st.integers(1, 10**9))
def test_a_body_written_back_reads_as_the_body(raw: bytes, max_tokens: int) -> None:
    try:
        body = decode_body(tutils.treq(content=raw))
    except Rejection:
        return
    body["max_tokens"] = max_tokens  # as admission changes a body
    body["stream_options"] = {"include_usage": True}
    written = encode_body(body)
    assert repr(json.loads(written)) == repr(dict(body))
    if isinstance(body, OrjsonBody):
        assert written == orjson.dumps(dict(body))
    else:
        assert written == json.dumps(body).encode()  # NaN, big integers, lone surrogates


def test_what_only_the_stdlib_reads_is_written_by_the_stdlib() -> None:
    body = decode_body(
        tutils.treq(content=b'{"a": NaN, "b": 18446744073709551616, "c": "\\ud800"}')
    )
    assert not isinstance(body, OrjsonBody)
    assert encode_body(body) == b'{"a": NaN, "b": 18446744073709551616, "c": "\\ud800"}'
    fast = decode_body(tutils.treq(content=b'{"a": 1.5, "b": "\xc3\xa9"}'))
    assert isinstance(fast, OrjsonBody)
    assert encode_body(fast) == b'{"a":1.5,"b":"\xc3\xa9"}'
