from __future__ import annotations

import json
import logging
import string

import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from mitmproxy import contentviews
from mitmproxy.test import tflow
from mitmproxy.test import tutils

from addons.admission import METERED_FIELDS
from addons.admission import check_spellings
from addons.admission import unique_keys
from addons.exceptions import DuplicateKey
from addons.inspection import LLMStreamContentview
from addons.streamtap import StreamTap
from tests.addon_support import chat_sse


# -- stream tap ------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 7, 64, 10_000])
def test_tap_passes_bytes_unchanged_and_finds_usage(size: int) -> None:
    body = chat_sse(["Hello", ", world"], {"prompt_tokens": 9, "completion_tokens": 2})
    tap = StreamTap("openai.chat")
    out = b"".join(tap(body[i : i + size]) for i in range(0, len(body), size)) + tap(b"")
    assert out == body
    usage, model = tap.usage.result()
    assert usage is not None and (usage.input_tokens, usage.output_tokens) == (9, 2)
    assert model == "gpt-4o" and tap.usage.done and tap.usage.text_chars == 12
    assert tap.first_byte_at is not None and tap.bytes == len(body)


def test_tap_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    tap = StreamTap("openai.chat")

    class Broken:
        def feed(self, chunk: bytes) -> None:
            raise RuntimeError("bug")

    tap.usage = Broken()  # type: ignore[assignment]
    with caplog.at_level(logging.ERROR):
        assert tap(b"data: x\n\n") == b"data: x\n\n"
        assert tap(b"more") == b"more"
    assert caplog.text.count("stream tap failed") == 1


# -- contentview -----------------------------------------------------------------------
def test_contentview_reassembles_text_and_usage() -> None:
    body = chat_sse(["Hello", ", world"], {"prompt_tokens": 9, "completion_tokens": 2})
    f = tflow.tflow(req=tutils.treq(path=b"/v1/chat/completions"))
    view = LLMStreamContentview()
    meta = contentviews.Metadata(flow=f, content_type="text/event-stream")
    assert view.render_priority(body, meta) > 1
    out = view.prettify(body, meta)
    assert out.startswith("Hello, world\n")
    assert "4 events · model gpt-4o · done=True" in out
    assert "usage: input 9 · output 2" in out
    assert view.name == "LLM Stream"


def test_contentview_anthropic_and_gemini_array() -> None:
    view = LLMStreamContentview()
    events = [
        {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hi"}},
        {"type": "message_delta", "usage": {"output_tokens": 1}},
    ]
    body = b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events)
    f = tflow.tflow(req=tutils.treq(path=b"/v1/messages"))
    assert view.prettify(body, contentviews.Metadata(flow=f)).startswith("Hi\n")
    gemini = [{"candidates": [{"content": {"parts": [{"text": "Yo"}]}, "finishReason": "STOP"}]}]
    g = tflow.tflow(req=tutils.treq(path=b"/v1beta/models/m:streamGenerateContent"))
    out = view.prettify(json.dumps(gemini).encode(), contentviews.Metadata(flow=g))
    assert out.startswith("Yo\n") and "usage: none reported" in out


def test_contentview_declines_other_bodies() -> None:
    view = LLMStreamContentview()
    f = tflow.tflow(req=tutils.treq(path=b"/index.html"))
    meta = contentviews.Metadata(flow=f, content_type="text/event-stream")
    assert view.render_priority(b"data: 1\n\n", meta) < 0
    json_meta = contentviews.Metadata(flow=tflow.tflow(), content_type="application/json")
    assert view.render_priority(b"{}", json_meta) < 0


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
