"""Reading token usage out of LLM API responses, whole or streamed, into a ``UsageRecord``.

Each provider reports usage under its own convention; ``normalise`` maps them all onto
``UsageRecord``'s (input excludes cached tokens, output includes reasoning):

================================  ==========================================================
api                               normalisation
================================  ==========================================================
openai.chat (also Groq,           input = prompt_tokens − cached_tokens − cache_write_tokens
OpenRouter, DeepSeek, Mistral)    (DeepSeek: prompt_cache_hit_tokens when cached_tokens is
                                  absent); output = completion_tokens (includes reasoning)
openai.responses                  the same with input_tokens / output_tokens and their
                                  ``*_details``
openai.embeddings                 input = prompt_tokens, output = 0
anthropic.messages                input = input_tokens (already excludes the cache); cache
                                  write = cache_creation_input_tokens, of which
                                  cache_creation.ephemeral_1h_input_tokens had a 1-hour TTL
gemini.generate / gemini.embed    input = promptTokenCount − cachedContentTokenCount
                                  + toolUsePromptTokenCount; output = candidatesTokenCount
                                  + thoughtsTokenCount; reasoning = thoughtsTokenCount
================================  ==========================================================

Parts of these kept for pricing: audio and image tokens in (OpenAI ``*_tokens_details``
``audio_tokens`` / ``image_tokens``, less their cached part in ``cached_tokens_details``;
Gemini ``promptTokensDetails`` less ``cacheTokensDetails``, by modality) and out (OpenAI
``completion_tokens_details``, Gemini ``candidatesTokensDetails``); server-tool uses
(Anthropic ``server_tool_use.web_search_requests``, OpenAI Responses ``web_search_call`` and
``code_interpreter_call`` output items, Gemini grounding: one per grounded response, one per
search query from Gemini 3 on, as Google bills them); the service tier granted (OpenAI's
top-level ``service_tier``, Anthropic's ``usage.service_tier``).

``toolUsePromptTokenCount`` (e.g. pages fetched by Gemini's URL-context or search tools) is
counted as input: it is prompt the model read, and ``totalTokenCount`` includes it although
``promptTokenCount`` does not (corpus case ``gemini/stream-sse-tool-use-prompt``).

Token counts must be non-negative integers (integral floats are accepted) no larger than
``MAX_TOKENS``; a usage object with any other value is treated as absent, so that the
caller falls back to its estimate instead of billing garbage.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Iterable
from collections.abc import Iterator
from typing import Any
from typing import NamedTuple

import orjson

from burnmeter.records import UsageRecord
from burnmeter.sse import MAX_EVENT_BYTES
from burnmeter.sse import JSONArrayParser
from burnmeter.sse import SSEParser

logger = logging.getLogger(__name__)

MAX_TOKENS = 10**9

Usage = dict[str, Any]

_ROUTES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"/chat/completions$"), "openai.chat"),
    (re.compile(r"/responses$"), "openai.responses"),
    (re.compile(r"/embeddings$"), "openai.embeddings"),
    (re.compile(r"/v1/messages$"), "anthropic.messages"),
    (re.compile(r"/(?:tunedM|m)odels/[^/]+:(?:stream)?[gG]enerateContent$"), "gemini.generate"),
    (re.compile(r"/(?:tunedM|m)odels/[^/]+:(?:embedContent|batchEmbedContents)$"), "gemini.embed"),
]


def api_for(path: str) -> str | None:
    """The metered API a request path belongs to, or None if it is not metered."""
    path = path.partition("?")[0].rstrip("/")
    for pattern, api in _ROUTES:
        if pattern.search(path):
            return api
    return None


class _InvalidCount(ValueError):
    pass


def _count(usage: Any, key: str) -> int | None:
    """A token count from a usage object: None if absent, _InvalidCount if not a count."""
    if not isinstance(usage, dict):
        return None
    value = usage.get(key)
    if value is None:
        return None
    if type(value) is float and value.is_integer():
        value = int(value)
    if type(value) is not int or not 0 <= value <= MAX_TOKENS:
        raise _InvalidCount(f"{key}={value!r}")
    return value


def _modalities(details: Any) -> dict[str, int]:
    """Gemini's ``[{"modality": "AUDIO", "tokenCount": 12}, ...]`` as counts by modality."""
    counts: dict[str, int] = {}
    for item in details if isinstance(details, list) else []:
        modality = item.get("modality") if isinstance(item, dict) else None
        if isinstance(modality, str):
            counts[modality] = counts.get(modality, 0) + (_count(item, "tokenCount") or 0)
    return counts


_SERVICE_TIER = re.compile(r"[a-z][a-z0-9_-]{0,31}")


def _service_tier(value: Any) -> str | None:
    """A provider's service tier name; anything else (it is written to the log) is ignored."""
    return value if isinstance(value, str) and _SERVICE_TIER.fullmatch(value) else None


def _dig(obj: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


# (prompt, completion, prompt details, completion details) field names
_OPENAI_FIELDS = {
    "openai.chat": (
        "prompt_tokens",
        "completion_tokens",
        "prompt_tokens_details",
        "completion_tokens_details",
    ),
    "openai.responses": (
        "input_tokens",
        "output_tokens",
        "input_tokens_details",
        "output_tokens_details",
    ),
}


def _from_openai(api: str, usage: Usage) -> UsageRecord | None:
    prompt_key, completion_key, prompt_details_key, completion_details_key = _OPENAI_FIELDS[api]
    prompt = _count(usage, prompt_key)
    completion = _count(usage, completion_key)
    if prompt is None and completion is None:
        return None
    prompt_details = usage.get(prompt_details_key)
    cache_read = _count(prompt_details, "cached_tokens")
    if cache_read is None:
        cache_read = _count(usage, "prompt_cache_hit_tokens")  # DeepSeek
    cache_read = cache_read or 0
    cache_write = _count(prompt_details, "cache_write_tokens") or 0
    cached_details = _dig(prompt_details, "cached_tokens_details")
    cached_audio = _count(cached_details, "audio_tokens") or 0
    cached_image = _count(cached_details, "image_tokens") or 0
    completion_details = usage.get(completion_details_key)
    return UsageRecord(
        input_tokens=max((prompt or 0) - cache_read - cache_write, 0),
        output_tokens=completion or 0,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        reasoning_tokens=_count(completion_details, "reasoning_tokens") or 0,
        input_audio_tokens=max((_count(prompt_details, "audio_tokens") or 0) - cached_audio, 0),
        input_image_tokens=max((_count(prompt_details, "image_tokens") or 0) - cached_image, 0),
        cache_audio_read_tokens=cached_audio,
        cache_image_read_tokens=cached_image,
        output_audio_tokens=_count(completion_details, "audio_tokens") or 0,
        output_image_tokens=_count(completion_details, "image_tokens") or 0,
    )


def _from_openai_embeddings(api: str, usage: Usage) -> UsageRecord | None:
    prompt = _count(usage, "prompt_tokens")
    return None if prompt is None else UsageRecord(input_tokens=prompt)


def _from_anthropic(api: str, usage: Usage) -> UsageRecord | None:
    input_tokens = _count(usage, "input_tokens")
    output_tokens = _count(usage, "output_tokens")
    if input_tokens is None and output_tokens is None:
        return None
    creation = usage.get("cache_creation")
    write_1h = _count(creation, "ephemeral_1h_input_tokens") or 0
    cache_write = _count(usage, "cache_creation_input_tokens")
    if cache_write is None:
        cache_write = (_count(creation, "ephemeral_5m_input_tokens") or 0) + write_1h
    return UsageRecord(
        input_tokens=input_tokens or 0,
        output_tokens=output_tokens or 0,
        cache_read_tokens=_count(usage, "cache_read_input_tokens") or 0,
        cache_write_tokens=cache_write,
        cache_write_1h_tokens=min(write_1h, cache_write),
        web_search_requests=_count(usage.get("server_tool_use"), "web_search_requests") or 0,
        service_tier=_service_tier(usage.get("service_tier")),
    )


def _from_gemini(api: str, usage: Usage) -> UsageRecord | None:
    prompt = _count(usage, "promptTokenCount")
    candidates = _count(usage, "candidatesTokenCount")
    if prompt is None and candidates is None:
        return None
    cached = _count(usage, "cachedContentTokenCount") or 0
    thoughts = _count(usage, "thoughtsTokenCount") or 0
    tool_use = _count(usage, "toolUsePromptTokenCount") or 0
    prompt_parts = _modalities(usage.get("promptTokensDetails"))
    cached_parts = _modalities(usage.get("cacheTokensDetails"))
    output_parts = _modalities(usage.get("candidatesTokensDetails"))
    return UsageRecord(
        input_tokens=max((prompt or 0) - cached, 0) + tool_use,
        output_tokens=(candidates or 0) + thoughts,
        cache_read_tokens=cached,
        reasoning_tokens=thoughts,
        input_audio_tokens=max(prompt_parts.get("AUDIO", 0) - cached_parts.get("AUDIO", 0), 0),
        input_image_tokens=max(prompt_parts.get("IMAGE", 0) - cached_parts.get("IMAGE", 0), 0),
        cache_audio_read_tokens=cached_parts.get("AUDIO", 0),
        cache_image_read_tokens=cached_parts.get("IMAGE", 0),
        output_audio_tokens=output_parts.get("AUDIO", 0),
        output_image_tokens=output_parts.get("IMAGE", 0),
    )


_PER_QUERY_GROUNDING = re.compile(r"gemini-(?:[3-9]|\d{2,})")


def per_query_grounding(model: str) -> bool:
    """Whether Google bills the model's Search grounding per query (Gemini 3 on), not per
    grounded prompt (one per response)."""
    return _PER_QUERY_GROUNDING.search(model) is not None


def billed_extras(api: str, obj: dict[str, Any]) -> dict[str, Any]:
    """What a body or stream chunk reports outside its usage object that is billed: the
    service tier granted and server-tool uses (``UsageRecord`` field names)."""
    found: dict[str, Any] = {}
    if api in ("openai.chat", "openai.responses"):
        response = obj.get("response")
        holder = response if api == "openai.responses" and isinstance(response, dict) else obj
        if tier := _service_tier(holder.get("service_tier")):
            found["service_tier"] = tier
        if api == "openai.responses" and isinstance(holder.get("output"), list):
            kinds = [item.get("type") for item in _dicts(holder["output"])]
            found["web_search_requests"] = kinds.count("web_search_call")
            found["code_executions"] = kinds.count("code_interpreter_call")
    elif api == "gemini.generate":
        grounding = [
            meta
            for candidate in _dicts(obj.get("candidates"))
            if isinstance(meta := candidate.get("groundingMetadata"), dict)
        ]
        queries = {
            query
            for meta in grounding
            if isinstance(searched := meta.get("webSearchQueries"), list)
            for query in searched
            if isinstance(query, str)
        }
        if queries:  # Google Search ran (URL context also leaves groundingChunks: not billed)
            per_query = per_query_grounding(_model_of(obj) or "")
            found["web_search_requests"] = len(queries) if per_query else 1
    return found


def _with_extras(record: UsageRecord | None, extras: dict[str, Any]) -> UsageRecord | None:
    if record is None:
        return None
    return dataclasses.replace(record, **extras).clamped() if extras else record


_NORMALISERS = {
    "openai.chat": _from_openai,
    "openai.responses": _from_openai,
    "openai.embeddings": _from_openai_embeddings,
    "anthropic.messages": _from_anthropic,
    "gemini.generate": _from_gemini,
    "gemini.embed": _from_gemini,
}


def normalise(api: str, usage: Any, raw: Any = None) -> UsageRecord | None:
    """``usage`` (the provider's usage object) as a UsageRecord carrying ``raw``.

    ``raw`` defaults to ``usage``. Returns None if there is no usage or it is invalid.
    """
    if not isinstance(usage, dict):
        return None
    try:
        record = _NORMALISERS[api](api, usage)
    except _InvalidCount as e:
        logger.warning("ignoring %s usage with an invalid token count: %s", api, e)
        return None
    if record is None:
        return None
    return dataclasses.replace(record, raw=usage if raw is None else raw).clamped()


def _usage_of(api: str, obj: dict[str, Any]) -> Usage | None:
    """The usage object at the top level of a response body or stream chunk."""
    if api.startswith("gemini."):
        usage = obj.get("usageMetadata")
    else:
        usage = obj.get("usage")
        if not isinstance(usage, dict):
            usage = _dig(obj, "x_groq", "usage")  # older Groq streams
    return usage if isinstance(usage, dict) else None


def _model_of(obj: dict[str, Any]) -> str | None:
    """The upstream-reported model of a body or chunk (Anthropic message_start and Responses
    lifecycle events nest it one level down)."""
    for holder in (obj, obj.get("message"), obj.get("response")):
        if isinstance(holder, dict):
            for key in ("model", "modelVersion"):
                model = holder.get(key)
                if isinstance(model, str) and model:
                    return model
    return None


def _loads(data: bytes) -> Any:
    try:
        return orjson.loads(data)  # about 6x json.loads on a stream event
    except orjson.JSONDecodeError:
        pass
    try:
        # What orjson refuses and json takes (NaN, integers past 64 bits, lone surrogates);
        # decoding first skips json.loads's encoding detection.
        return json.loads(data.decode())
    except (ValueError, RecursionError):
        return None


def usage_from_json(api: str, body: bytes) -> tuple[UsageRecord | None, str | None]:
    """Usage and upstream model from a complete JSON response body; never raises.

    A JSON array (Gemini ``:streamGenerateContent`` without ``alt=sse``) yields the last
    element's usage and the first element's model.
    """
    obj = _loads(body)
    chunks = obj if isinstance(obj, list) else [obj]
    usage = None
    model = None
    extras: dict[str, Any] = {}
    for chunk in chunks:
        if isinstance(chunk, dict):
            usage = _usage_of(api, chunk) or usage
            model = model or _model_of(chunk)
            extras.update(billed_extras(api, chunk))
    return _with_extras(normalise(api, usage), extras), model


_RESPONSES_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
_RESPONSES_TEXT_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
        "response.function_call_arguments.delta",
    }
)


# When text is not collected, stream events that cannot change the usage, model, error or
# end-of-stream state are not JSON-decoded. Named events are judged by their name, the others
# by a bytes pattern per api.
_STATEFUL_EVENTS = _RESPONSES_TERMINAL | {"error", "message_start", "message_delta", "message_stop"}
_STATELESS_EVENTS = _RESPONSES_TEXT_DELTAS | {
    "ping",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
}
_ERROR_OBJECT = rb'"error"\s*:\s*\{'
# A usage key followed by an object, not by null: with include_usage OpenAI sends
# "usage":null on every chunk.
_CHAT_STATEFUL = re.compile(rb'"(?:usage"\s*:\s*\{|error")')
_GEMINI_STATEFUL = re.compile(rb'"(?:usageMetadata|error|finishReason|groundingMetadata)"')
# The text a stream generates, counted without decoding the event: the JSON strings of the
# fields the decoders below read, where no other field of that name holds a string.
# Possessive: a long string is taken in runs, not a character at a time (200x faster at 1 MB).
# No newline inside: an event's data has none (its lines are joined with "\n" only between
# data fields), so a string left open in one event cannot run on into the next when the
# pattern is searched over several events' blocks at once.
_STRING = rb'"((?:[^"\\\n]++|\\.)*+)"'
_CHAT_TEXT = re.compile(rb'"(?:content|reasoning_content|reasoning|arguments)"\s*:\s*' + _STRING)
_TEXT_STRINGS: dict[str, tuple[frozenset[str | None], re.Pattern[bytes]]] = {
    # api: (the events it applies to, the pattern)
    "openai.chat": (frozenset({None}), _CHAT_TEXT),
    "openai.responses": (_RESPONSES_TEXT_DELTAS, re.compile(rb'"delta"\s*:\s*' + _STRING)),
    "anthropic.messages": (
        frozenset({"content_block_delta"}),
        re.compile(rb'"(?:text|thinking|partial_json)"\s*:\s*' + _STRING),
    ),
}
_STATEFUL_DATA = {
    "openai.chat": _CHAT_STATEFUL,
    "openai.embeddings": _CHAT_STATEFUL,
    "openai.responses": re.compile(
        rb'"type"\s*:\s*"(?:response\.(?:completed|incomplete|failed)|error)"|' + _ERROR_OBJECT
    ),
    "anthropic.messages": re.compile(
        rb'"type"\s*:\s*"(?:message_(?:start|delta|stop)|error)"|' + _ERROR_OBJECT
    ),
    "gemini.generate": _GEMINI_STATEFUL,
    "gemini.embed": _GEMINI_STATEFUL,
}


def _text_blocks(events: Iterable[str | None]) -> re.Pattern[bytes]:
    """Blocks from ``SSEParser.take`` that are all single-line text events of these types."""
    names = sorted(
        (rb"event: " + re.escape(name.encode()) + rb"\n") if name else b"" for name in events
    )
    # [DONE] is the end marker, whatever the event name.
    return re.compile(rb"(?:(?:" + b"|".join(names) + rb")data: (?!\[DONE\]\n)[^\n]*+\n\n)++")


class _TextChunks(NamedTuple):
    """Text counted a chunk at a time: when, once the model is known, all the event blocks a
    chunk completed are single-line text events (``blocks`` matches them all) that cannot
    matter otherwise (named events by their name, unnamed ones when ``stateful`` finds nothing
    in them), their ``strings`` are counted with one findall over them all, which is what
    counting them event by event gives."""

    blocks: re.Pattern[bytes]
    stateful: re.Pattern[bytes] | None
    strings: re.Pattern[bytes]
    newlines: int
    """Per event: "data: ...\\n\\n", after an "event: ...\\n" line if they are named."""


_TEXT_CHUNKS = {
    api: _TextChunks(
        _text_blocks(events),
        _STATEFUL_DATA[api] if None in events else None,
        strings,
        2 if None in events else 3,
    )
    for api, (events, strings) in _TEXT_STRINGS.items()
}

# The escapes of a JSON string, a surrogate pair first (it decodes to one character).
_ESCAPE = re.compile(
    rb'\\(?:u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|["\\/bfnrt])'
)
_CONTROL = re.compile(rb"[\x00-\x1f]")


def _text_chars(literals: list[bytes]) -> int:
    """Characters of JSON string literals' bodies (as ``_STRING`` captures them), as
    ``json.loads`` decodes them; one that does not decode counts its bytes, as an estimate."""
    if not literals:
        return 0
    # '"' is never unescaped inside a literal, so no escape spans two of them joined by it.
    joined = b'"'.join(literals)
    if 92 in joined:  # a backslash (an int: a memchr)
        joined = _ESCAPE.sub(b"-", joined)
        if 92 in joined:  # a broken escape
            return sum(_decoded_chars(literal) for literal in literals)
    elif joined.isascii():
        return len(joined) - len(literals) + 1
    if _CONTROL.search(joined) is not None:  # which the JSON decoder refuses
        return sum(_decoded_chars(literal) for literal in literals)
    try:
        return len(joined.decode("utf-8", "surrogatepass")) - len(literals) + 1
    except UnicodeDecodeError:
        return sum(_decoded_chars(literal) for literal in literals)


def _decoded_chars(literal: bytes) -> int:
    if literal.isascii() and 92 not in literal:
        return len(literal)
    try:
        return len(json.loads((b'"' + literal + b'"').decode("utf-8", "surrogatepass")))
    except ValueError:
        return len(literal)


def _strings(obj: Any, *keys: str) -> Iterator[str]:
    """The string values among ``obj[key]``."""
    if isinstance(obj, dict):
        for key in keys:
            value = obj.get(key)
            if isinstance(value, str):
                yield value


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _kind(event: str | None, obj: dict[str, Any]) -> str | None:
    """An event's type: the data's ``type`` field, else the SSE ``event:`` name."""
    kind = obj.get("type")
    return kind if isinstance(kind, str) else event


def _chat_text(chunk: dict[str, Any]) -> Iterator[str]:
    for choice in _dicts(chunk.get("choices")):
        delta = choice.get("delta")
        yield from _strings(delta, "content", "reasoning_content", "reasoning")
        for call in _dicts(_dig(delta, "tool_calls")):
            yield from _strings(call.get("function"), "arguments")


class StreamUsage:
    """Usage, model, in-band error and completion of one streamed response.

    Fed the raw body chunks (SSE, or a JSON array/object if the body starts with ``[`` or
    ``{``); ``feed`` never raises and keeps at most one event in memory. With
    ``collect_text`` the characters of generated text, reasoning and tool-call arguments
    are counted in ``text_chars`` (to estimate output when no usage arrives), and with
    ``keep_text`` also kept in ``text`` (for display); without ``collect_text``,
    events are only JSON-decoded when a bytes pre-filter says they can matter.
    """

    def __init__(
        self,
        api: str,
        *,
        collect_text: bool = True,
        keep_text: bool = False,
        max_event_bytes: int = MAX_EVENT_BYTES,
    ) -> None:
        handlers = {
            "openai.chat": self._on_chat,
            "openai.embeddings": self._on_chat,
            "openai.responses": self._on_responses,
            "anthropic.messages": self._on_anthropic,
            "gemini.generate": self._on_gemini,
            "gemini.embed": self._on_gemini,
        }
        if api not in handlers:
            raise ValueError(f"unknown api: {api!r}")
        self.api = api
        self.collect_text = collect_text or keep_text
        self.max_event_bytes = max_event_bytes
        self.text_chars = 0
        self.text: list[str] | None = [] if keep_text else None
        self.events = 0
        self.error: dict[str, Any] | None = None
        self.done = False
        """The stream's own end marker was seen (``[DONE]``, ``message_stop``, a terminal
        Responses event, a Gemini ``finishReason``, or the end of the JSON value)."""
        self._on_event = handlers[api]
        self._stateful_data = _STATEFUL_DATA[api]
        # counting text without decoding, where the text is only counted, not kept
        self._text_strings = None if keep_text else _TEXT_STRINGS.get(api)
        self._text_chunks = None if keep_text else _TEXT_CHUNKS.get(api)
        self._sse: SSEParser | None = None
        self._json: JSONArrayParser | None = None
        self._model: str | None = None
        self._usage: Usage | None = None
        self._delta: Usage | None = None  # Anthropic message_delta usage, merged
        self._extras: dict[str, Any] = {}  # billed facts outside the usage object

    @property
    def overflows(self) -> int:
        """Events dropped for exceeding ``max_event_bytes``."""
        parser = self._sse or self._json
        return parser.overflows if parser else 0

    def feed(self, chunk: bytes) -> None:
        try:
            sse = self._sse or self._start(chunk)
            if sse is None:
                return
            blocks = sse.take(chunk)
            if not blocks:
                return
            text = self._text_chunks
            if (
                text is not None
                and self._model is not None
                and text.blocks.fullmatch(blocks) is not None
                and (text.stateful is None or text.stateful.search(blocks) is None)
            ):
                self.events += blocks.count(10) // text.newlines  # 10: "\n", counted by memchr
                if self.collect_text:
                    self.text_chars += _text_chars(text.strings.findall(blocks))
                return
            for event in SSEParser.events(blocks):
                self._on_data(event.event, event.data)
        except Exception:
            # Runs inside mitmproxy's stream callable: raising would hang the client.
            logger.exception("failed to read a %s stream chunk", self.api)

    def result(self) -> tuple[UsageRecord | None, str | None]:
        """Usage (None if the stream reported none) and upstream model, at end of stream."""
        if self._sse is not None:
            for event in self._sse.close():
                self._on_data(event.event, event.data)
        if self.api != "anthropic.messages":
            return _with_extras(normalise(self.api, self._usage), self._extras), self._model
        start, delta = self._usage, self._delta
        if delta is None:
            return normalise(self.api, start, {"message_start": start}), self._model
        merged = {**(start or {}), **delta}
        raw = (
            {"message_start": start, "message_delta": delta} if start else {"message_delta": delta}
        )
        return normalise(self.api, merged, raw), self._model

    def _start(self, chunk: bytes) -> SSEParser | None:
        """Until the body's format is known, and for a JSON body: the SSE parser once the body
        is known to be an event stream, else None (a JSON body is read here)."""
        if self._json is None:
            head = chunk.lstrip()[:1]
            if not head:
                return None
            if head not in b"[{":
                self._sse = SSEParser(self.max_event_bytes)
                return self._sse
            self._json = JSONArrayParser(self.max_event_bytes)
        for element in self._json.feed(chunk):
            self._on_data(None, element)
        self.done = self.done or self._json.closed
        return None

    def _on_data(self, event: str | None, data: bytes) -> None:
        self.events += 1
        if data == b"[DONE]":
            self.done = True
            return
        stateful = (
            self._model is None
            or event in _STATEFUL_EVENTS
            or (event not in _STATELESS_EVENTS and self._stateful_data.search(data) is not None)
        )
        if not stateful:
            if not self.collect_text:
                return
            if self._text_strings is not None:
                if event in self._text_strings[0]:
                    self.text_chars += _text_chars(self._text_strings[1].findall(data))
                    return
                if event in _STATELESS_EVENTS:  # and carries no text the decoders count
                    return
        obj = _loads(data)
        if not isinstance(obj, dict):
            return
        if self._model is None:
            self._model = _model_of(obj)
        error = obj.get("error")
        if isinstance(error, dict):
            self.error = error
        elif event == "error" or obj.get("type") == "error":
            self.error = obj
        self._extras.update(billed_extras(self.api, obj))
        self._on_event(event, obj)

    def _take_text(self, parts: Iterable[str]) -> None:
        for part in parts:
            self.text_chars += len(part)
            if self.text is not None:
                self.text.append(part)

    def _on_chat(self, event: str | None, chunk: dict[str, Any]) -> None:
        self._usage = _usage_of(self.api, chunk) or self._usage
        if self.collect_text:
            self._take_text(_chat_text(chunk))

    def _on_responses(self, event: str | None, obj: dict[str, Any]) -> None:
        kind = _kind(event, obj)
        if kind in _RESPONSES_TERMINAL:
            self.done = True
            usage = _dig(obj, "response", "usage")
            if isinstance(usage, dict):
                self._usage = usage
            error = _dig(obj, "response", "error")
            if isinstance(error, dict):
                self.error = error
        elif self.collect_text and kind in _RESPONSES_TEXT_DELTAS:
            self._take_text(_strings(obj, "delta"))

    def _on_anthropic(self, event: str | None, obj: dict[str, Any]) -> None:
        kind = _kind(event, obj)
        if kind == "message_start":
            usage = _dig(obj, "message", "usage")
            if isinstance(usage, dict):
                self._usage = usage
        elif kind == "message_delta":
            usage = obj.get("usage")
            if isinstance(usage, dict):
                # Later non-null values win (server tools raise input_tokens mid-stream).
                reported = {key: value for key, value in usage.items() if value is not None}
                self._delta = {**(self._delta or {}), **reported}
        elif kind == "message_stop":
            self.done = True
        elif kind == "content_block_delta" and self.collect_text:
            self._take_text(_strings(obj.get("delta"), "text", "thinking", "partial_json"))

    def _on_gemini(self, event: str | None, chunk: dict[str, Any]) -> None:
        self._usage = _usage_of(self.api, chunk) or self._usage
        for candidate in _dicts(chunk.get("candidates")):
            if candidate.get("finishReason"):
                self.done = True
            if self.collect_text:
                for part in _dicts(_dig(candidate, "content", "parts")):
                    self._take_text(_strings(part, "text"))
