from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from burnmeter.text import MAX_TEXT
from burnmeter.text import bounded
from burnmeter.text import encodable
from burnmeter.text import encodable_tree

# every code point, lone surrogates included (what surrogateescape and "\ud800" produce)
ANY_CHAR = st.one_of(
    st.characters(codec=None, exclude_categories=()), st.characters(categories=["Cs"])
)
ANY_TEXT = st.text(ANY_CHAR)


@given(ANY_TEXT)
def test_encodable_is_always_utf8_and_keeps_what_was_encodable(value: str) -> None:
    safe = encodable(value)
    safe.encode("utf-8")
    assert len(safe) == len(value)
    for before, after in zip(value, safe, strict=True):
        assert after == before or (after == "\ufffd" and "\ud800" <= before <= "\udfff")


@given(ANY_TEXT, st.integers(2, 3 * MAX_TEXT))
def test_bounded_is_encodable_and_short(value: str, limit: int) -> None:
    safe = bounded(value, limit)
    safe.encode("utf-8")
    assert len(safe) <= limit
    assert safe == encodable(value) or safe.endswith("…")


@given(
    st.recursive(
        ANY_TEXT | st.integers(), lambda inner: st.lists(inner) | st.dictionaries(ANY_TEXT, inner)
    )
)
def test_encodable_tree_reaches_every_string(value: object) -> None:
    def check(node: object) -> None:
        if isinstance(node, str):
            node.encode("utf-8")
        elif isinstance(node, dict):
            for k, v in node.items():
                check(k)
                check(v)
        elif isinstance(node, list):
            for v in node:
                check(v)

    check(encodable_tree(value))


def test_a_surrogate_escaped_host_becomes_a_replacement_character() -> None:
    host = b"openhands.test\xff".decode("utf-8", "surrogateescape")
    assert encodable(host) == "openhands.test\ufffd"
