"""Request-side token estimates: what admission holds before the upstream reports usage.

No tokenizer: text is ``ceil(chars / 4)`` tokens, plus a small overhead per message, and
media count at flat rates (see docs/estimator.md for how far off this is on real traffic);
only a settlement without reported usage needs it (``estimate_input_tokens``).
That central estimate undercounts some text many times over (CJK, emoji, random
characters), so holds use an upper bound instead (``held_input_tokens``): a UTF-8 byte is
the least a token can be in every byte-level tokenizer, plus allowances for what an
upstream adds to the prompt itself (a system prompt, server-side tool results).
``ValueError`` means a malformed request; its message is meant for the client (400).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace
from decimal import Decimal
from typing import Any
from typing import Literal

from burnmeter.config import Config
from burnmeter.pricing import PriceQuote
from burnmeter.pricing import cost
from burnmeter.pricing import cost_and_input_cost
from burnmeter.records import UsageRecord
from burnmeter.usage import per_query_grounding

CacheTtl = Literal["5m", "1h"]

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 4
"""Role and separators around each message (the figure the original system used, ``docs/estimator.md``)."""

IMAGE_TOKENS = {"openai": 765, "anthropic": 1_600, "gemini": 258}
"""Per image: OpenAI's high-detail 1024x1024 (4 tiles x 170 + 85), Anthropic's ~1.15
megapixel maximum (width x height / 750), Gemini's fixed 258."""
OPENAI_LOW_DETAIL_IMAGE_TOKENS = 85
AUDIO_TOKENS = 1_000
"""Per audio clip: about 30 seconds at Gemini's 32 tokens per second."""
FILE_TOKENS = 3_000
"""Per PDF, video or other file: about two PDF pages at Anthropic's 1,500 per page."""
ANTHROPIC_TOOL_PROMPT_TOKENS = 346
"""The system prompt Anthropic adds when a request has tools (its figure for Claude 4)."""
DEFAULT_SERVER_TOOL_USES = 10
"""Uses held for a server tool the request enables without a limit (Anthropic's ``max_uses``)."""
SERVER_TOOLS: dict[str, dict[str, str]] = {
    # api: {tool type or key prefix: the UsageRecord count its uses are billed by}
    "anthropic.messages": {"web_search_": "web_search_requests"},
    "openai.responses": {
        "web_search": "web_search_requests",
        "code_interpreter": "code_executions",
    },
    "gemini.generate": {
        "google_search": "web_search_requests",
        "googleSearch": "web_search_requests",
    },
}
"""Server tools billed per use, as requests name them (Gemini: ``google_search`` and
``googleSearchRetrieval``)."""
UPSTREAM_PROMPT_TOKENS = 1_024
"""Upper bound of what an upstream adds to every prompt on its own (a router's or a
model's system prompt, a thinking preamble: up to 687 seen)."""
SERVER_TOOL_TOKENS = 20_000
"""Upper bound per server-side tool that reads content into the prompt (web search, web
fetch, file search: 10,423 seen for one web search)."""
SERVER_TOOL_TYPES = ("web_search", "web_fetch", "file_search", "code_execution", "mcp")
"""Tool ``type`` prefixes of server-side tools (Anthropic's dated types, OpenAI's)."""

EMBEDDING_APIS = ("openai.embeddings", "gemini.embed")
MAX_NESTING = 900
"""Deepest nesting of a prompt's JSON a request may have (none comes near it); deeper is
refused, as Python's recursion limit refused it when the estimate was a recursion."""


@dataclass(frozen=True, slots=True)
class RequestEstimate:
    """What admission needs of a request: what to hold, and how to forward it."""

    held_input_tokens: int
    """The upper bound of the input tokens, which holds pay for (the central estimate a
    settlement without usage charges is ``estimate_input_tokens``, never more)."""
    max_output_tokens: int
    """The output limit of all choices together (``choices`` times the per-choice limit)."""
    stream: bool
    cache_ttl: CacheTtl | None = None
    """The request marks prompt parts for caching (``cache_control``): its input may be
    billed as cache writes, dearer than input."""
    input_audio_tokens: int = 0
    input_image_tokens: int = 0
    """The parts of the input that are audio clips and images (flat counts)."""
    output_modalities: frozenset[str] | None = frozenset({"text"})
    """What the response may hold ("text", "audio", "image"); None: whatever the model makes."""
    server_tool_uses: Mapping[str, int] = field(default_factory=dict)
    """The most uses of each billed server tool the request allows, by UsageRecord count."""
    service_tier: str | None = None
    """The service tier the request asks for."""
    choices: int = 1
    """Completions asked for (``n``, ``candidateCount``)."""

    @property
    def output_tokens_per_choice(self) -> int:
        return self.max_output_tokens // self.choices


def estimate_request(
    api: str, body: object, config: Config, path: str = "", model: str | None = None
) -> RequestEstimate:
    """Estimate a request of ``api`` (a corpus api name, e.g. "openai.chat") to ``path``
    for its admission; without an output limit of its own, a request may generate
    ``model``'s maximum."""
    body = _request_object(body)
    tally = _tally(api, body)
    limit, choices = _output_limit(api, body, config.max_output_tokens(model))
    return RequestEstimate(
        held_input_tokens=tally.max_tokens(),
        max_output_tokens=limit * choices,
        stream=_stream(api, body, path),
        cache_ttl=tally.cache_ttl,
        input_audio_tokens=tally.audio_tokens,
        input_image_tokens=tally.image_tokens,
        output_modalities=_output_modalities(api, body),
        server_tool_uses=_server_tool_uses(api, body, path),
        service_tier=_requested_tier(api, body),
        choices=choices,
    )


def estimate_input_tokens(api: str, body: object) -> int:
    """The central estimate of a request's input tokens, charged when a response reports
    no usage (only a settlement needs it: admission holds ``held_input_tokens``)."""
    return _tally(api, _request_object(body)).tokens()


def _request_object(body: object) -> dict[str, object]:
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    return body


def _tally(api: str, body: dict[str, object]) -> _Tally:
    """Everything in the prompt of a request of ``api``; ``ValueError`` if malformed."""
    tally = _Tally(api.partition(".")[0])
    match api:
        case "openai.chat":
            tally.messages(_array(body, "messages"))
            tally.tools(body.get("tools"), body.get("functions"))
        case "anthropic.messages":
            tally.add(_text_or_array(body, "system"))
            tally.cache_marker(body.get("cache_control"))
            tally.messages(_array(body, "messages"))
            tally.tools(body.get("tools"))
            if body.get("tools"):
                tally.flat_tokens += ANTHROPIC_TOOL_PROMPT_TOKENS
        case "openai.responses":
            tally.add(body.get("instructions"))
            items = _text_or_array(body, "input")
            tally.messages([items] if isinstance(items, str) else items)
            tally.tools(body.get("tools"))
        case "openai.embeddings":
            tally.embedding_input(_text_or_array(body, "input"))
        case "gemini.generate":
            tally.add(_object(body, "systemInstruction", "system_instruction"))
            tally.messages(_array(body, "contents"))
            tally.tools(body.get("tools"))
        case "gemini.embed":
            tally.add(_object(body, "content"))
            for request in _array(body, "requests"):
                tally.add(_object(request, "content"))
        case _:
            raise ValueError(f"unknown api {api!r}")
    return tally


def estimate_output_tokens(text_chars: int) -> int:
    """Output tokens for a response whose usage never came (a stream cut short)."""
    return math.ceil(text_chars / CHARS_PER_TOKEN)


def hold_amounts(estimate: RequestEstimate, quote: PriceQuote) -> tuple[Decimal, Decimal]:
    """(maximum, minimum) to hold: what ``held_usage`` costs, and the input classes alone
    (both from one calculation per way to bill it)."""
    priced = [cost_and_input_cost(usage, quote) for usage in _held_usages(estimate, quote)]
    return max(total for total, _ in priced), max(prompt_part for _, prompt_part in priced)


def held_usage(estimate: RequestEstimate, quote: PriceQuote) -> UsageRecord:
    """The usage a hold pays for: the input's upper bound, the output limit and every
    server-tool use allowed.

    Priced as settlement prices (the tier of the estimated prompt, the service tier asked
    for), each at whichever is dearer where the bill could go two ways: a request that asks
    for caching may be billed for its whole prompt as cache writes; output may come in any
    modality the request allows.
    """
    return max(_held_usages(estimate, quote), key=lambda usage: cost(usage, quote))


def output_tokens_paid(
    estimate: RequestEstimate, quote: PriceQuote, held: Decimal, maximum: Decimal
) -> int:
    """Output tokens per choice that a hold of ``held`` pays for, beyond the input (at least
    one, at most the request's limit): a hold smaller than ``maximum`` (``hold_amounts``'
    price of the whole limit; the balance covered only part of it) pays for fewer. Found
    by bisection: a cost never falls as a count grows, whatever tiers, modalities or fees
    the price has."""
    per_choice = estimate.output_tokens_per_choice
    if per_choice == 0 or held >= maximum:  # the whole limit, priced already: not again
        return per_choice

    def affordable(tokens: int) -> bool:
        usages = _held_usages(estimate, quote, tokens * estimate.choices)
        return max(cost(usage, quote) for usage in usages) <= held

    low, high = 1, per_choice - 1  # low: the floor paid in any case; high: the most it may pay
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if affordable(middle) else (low, middle - 1)
    return low


def _held_usages(
    estimate: RequestEstimate, quote: PriceQuote, output_tokens: int | None = None
) -> list[UsageRecord]:
    """Every way the held usage may be billed: the input as input or as cache writes, the
    output (``output_tokens``, else the request's limit) in each modality it may come in."""
    limit = estimate.max_output_tokens if output_tokens is None else output_tokens
    outputs: list[dict[str, Any]] = [{"output_tokens": limit}]
    for modality in ("audio", "image"):
        allowed = estimate.output_modalities is None or modality in estimate.output_modalities
        if allowed and quote.price.rate(f"output_{modality}", estimate.service_tier) is not None:
            outputs.append({"output_tokens": limit, f"output_{modality}_tokens": limit})
    tools: dict[str, Any] = dict(estimate.server_tool_uses)
    return [
        replace(prompt, **output, **tools) for prompt in _prompts(estimate) for output in outputs
    ]


def _prompts(estimate: RequestEstimate) -> list[UsageRecord]:
    """The ways the estimated input may be billed: as input, or as cache writes."""
    tokens = estimate.held_input_tokens
    prompt = UsageRecord(
        input_tokens=tokens,
        input_audio_tokens=estimate.input_audio_tokens,
        input_image_tokens=estimate.input_image_tokens,
        service_tier=estimate.service_tier,
        source="estimated",
    )
    prompts = [prompt]
    if estimate.cache_ttl is not None:
        one_hour = tokens if estimate.cache_ttl == "1h" else 0
        prompts.append(
            replace(
                prompt,
                input_tokens=0,
                input_audio_tokens=0,
                input_image_tokens=0,
                cache_write_tokens=tokens,
                cache_write_1h_tokens=one_hour,
            )
        )
    return prompts


class _Tally:
    """Characters, flat-rate media tokens and messages seen in a request."""

    def __init__(self, family: str) -> None:
        self.family = family
        self.strings: list[str] = []
        """The text seen, measured once at the end (``measured``)."""
        self.decoded_bytes = 0
        """Bytes of base64 text the upper bound counts beyond its flat tokens."""
        self.flat_tokens = 0
        self.message_count = 0
        self.server_tools = 0
        self.cache_ttl: CacheTtl | None = None
        self.audio_tokens = 0
        self.image_tokens = 0

    def tokens(self) -> int:
        text = math.ceil(len("".join(self.strings)) / CHARS_PER_TOKEN)
        return text + self.flat_tokens + self.message_count * MESSAGE_OVERHEAD_TOKENS

    def max_tokens(self) -> int:
        """UTF-8 bytes of the text (no byte-level tokenizer makes more tokens of it) and the
        flat counts, plus what an upstream may add. Never below ``tokens``: a string has at
        least as many bytes as characters, and ``decoded_bytes`` is never negative."""
        text = "".join(self.strings)
        utf8_bytes = len(text) if text.isascii() else _utf8_bytes(text)
        added = UPSTREAM_PROMPT_TOKENS + self.server_tools * SERVER_TOOL_TOKENS
        counted = self.flat_tokens + self.message_count * MESSAGE_OVERHEAD_TOKENS
        return utf8_bytes + self.decoded_bytes + counted + added

    def text(self, value: str) -> None:
        self.strings.append(value)

    def messages(self, items: Sequence[object]) -> None:
        self.message_count += len(items)
        self.add(items)

    def tools(self, *tool_lists: object) -> None:
        for tools in tool_lists:
            if tools is None:
                continue
            if not isinstance(tools, list):
                raise ValueError("'tools' must be an array")
            self.server_tools += sum(1 for tool in tools if _is_server_tool(tool))
            dumped = json.dumps(tools, separators=(",", ":"))  # ASCII: \u escapes
            if '"cache_control"' in dumped:  # else no marker to look for
                self.add_cache_markers(tools)
            self.text(dumped)

    def embedding_input(self, value: str | list[object]) -> None:
        # Token-id arrays are already tokens.
        if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            self.flat_tokens += len(value)
        elif isinstance(value, list):
            for item in value:
                self.embedding_input(item if isinstance(item, list) else str(item))
        else:
            self.text(value)

    def add(self, value: object) -> None:
        # A loop, level by level, not a recursion, on exact types first: the request path
        # walks every part of every request. Strings are measured at the end, all at once.
        level = [value]
        strings = self.strings
        for _ in range(MAX_NESTING):
            below: list[object] = []
            for item in level:
                if type(item) is str:
                    strings.append(item)
                elif type(item) is dict:
                    if "cache_control" in item or _may_be_media(item):
                        self._add_object(item, below)
                    else:  # most parts: text, tool calls, tool results
                        below.extend(item.values())
                elif type(item) is list:
                    below.extend(item)
                elif type(item) is int or type(item) is float:
                    strings.append(str(item))
                elif type(item) is not bool and item is not None:
                    self._add_other(item, below)
            if not below:
                return
            level = below
        raise ValueError(f"request JSON is nested deeper than {MAX_NESTING} levels")

    def _add_object(self, part: dict[str, object], below: list[object]) -> None:
        if _may_be_media(part) and (flat := self._media_tokens(part)) is not None:
            self.flat_tokens += flat
            if (modality := _media_modality(part)) == "audio":
                self.audio_tokens += flat
            elif modality == "image":
                self.image_tokens += flat
        elif "cache_control" in part:
            for key, item in part.items():
                if key == "cache_control":
                    self.cache_marker(item)
                else:
                    below.append(item)
        else:
            below.extend(part.values())

    def _add_other(self, item: object, below: list[object]) -> None:
        """What the loop's exact types miss: their subclasses (a body not from ``json``)."""
        if isinstance(item, str):
            self.strings.append(item)
        elif isinstance(item, list):
            below.extend(item)
        elif isinstance(item, dict):
            self._add_object(item, below)
        elif isinstance(item, int | float) and not isinstance(item, bool):
            self.strings.append(str(item))

    def add_cache_markers(self, value: object) -> None:
        if isinstance(value, list):
            for item in value:
                self.add_cache_markers(item)
        elif isinstance(value, dict):
            for key, item in value.items():
                if key == "cache_control":
                    self.cache_marker(item)
                else:
                    self.add_cache_markers(item)

    def cache_marker(self, marker: object) -> None:
        if not isinstance(marker, dict):
            return
        if marker.get("ttl") == "1h":
            self.cache_ttl = "1h"
        elif self.cache_ttl is None:
            self.cache_ttl = "5m"

    def _media_tokens(self, part: dict[str, object]) -> int | None:
        """Flat tokens for an image, audio or file part; None if ``part`` is not one."""
        kind = part.get("type")
        if kind in ("image_url", "input_image"):
            image = part.get("image_url")
            detail = image.get("detail") if isinstance(image, dict) else part.get("detail")
            return OPENAI_LOW_DETAIL_IMAGE_TOKENS if detail == "low" else IMAGE_TOKENS[self.family]
        if kind == "image":
            return IMAGE_TOKENS[self.family]
        if kind == "input_audio":
            return AUDIO_TOKENS
        if kind in ("file", "input_file"):
            return FILE_TOKENS
        if kind == "document":
            source = part.get("source")
            if isinstance(source, dict) and source.get("type") in ("text", "content"):
                return None  # plain text, counted as such
            return FILE_TOKENS
        for key in _BLOB_KEYS:
            blob = part.get(key)
            if isinstance(blob, dict):
                return self._blob_tokens(blob)
        return None

    def _blob_tokens(self, blob: dict[str, object]) -> int:
        mime = str(blob.get("mimeType") or blob.get("mime_type") or "")
        if mime.startswith("image/"):
            return IMAGE_TOKENS[self.family]
        if mime.startswith("audio/"):
            return AUDIO_TOKENS
        data = blob.get("data")
        if mime.startswith("text/") and isinstance(data, str):
            # Base64 of text: 3 bytes per 4 characters, then chars/4 as for any text; the
            # upper bound counts the decoded bytes.
            decoded = math.ceil(len(data) * 3 / 4)
            self.decoded_bytes += decoded - math.ceil(decoded / CHARS_PER_TOKEN)
            return math.ceil(decoded / CHARS_PER_TOKEN)
        return FILE_TOKENS


_MEDIA_TYPES = frozenset(
    ("image_url", "input_image", "image", "input_audio", "file", "input_file", "document")
)
"""The part ``type`` values ``_Tally._media_tokens`` may count at a flat rate."""
_BLOB_KEYS = ("inlineData", "inline_data", "fileData", "file_data")
"""Gemini's media parts, either spelling."""


def _may_be_media(part: dict[str, object]) -> bool:
    """Whether ``_Tally._media_tokens`` may count ``part`` (a cheap test that most text
    parts fail: the request path asks it of every object in a request)."""
    kind = part.get("type")
    return (isinstance(kind, str) and kind in _MEDIA_TYPES) or not part.keys().isdisjoint(
        _BLOB_KEYS
    )


def _media_modality(part: dict[str, object]) -> str | None:
    """Which modality a media part ``_Tally`` counts at a flat rate is: audio, image or None."""
    kind = part.get("type")
    if kind in ("image_url", "input_image", "image"):
        return "image"
    if kind == "input_audio":
        return "audio"
    for key in _BLOB_KEYS:
        blob = part.get(key)
        if isinstance(blob, dict):
            mime = str(blob.get("mimeType") or blob.get("mime_type") or "")
            return mime.partition("/")[0] if mime.startswith(("image/", "audio/")) else None
    return None


def _output_modalities(api: str, body: dict[str, object]) -> frozenset[str] | None:
    if api == "openai.chat":
        asked = body.get("modalities")
    elif api == "gemini.generate":
        generation = _object(body, "generationConfig", "generation_config")
        asked = generation.get("responseModalities", generation.get("response_modalities"))
        if asked is None:
            return None  # an image or audio model answers in its own modality unasked
    else:
        return frozenset({"text"})
    if not isinstance(asked, list):
        return frozenset({"text"})
    return frozenset({"text"}) | {m.lower() for m in asked if isinstance(m, str)}


def _server_tool_uses(api: str, body: dict[str, object], path: str) -> dict[str, int]:
    """The uses of billed server tools the request allows: a tool's ``max_uses`` (Anthropic),
    else ``DEFAULT_SERVER_TOOL_USES``; Gemini before 3 bills one grounded prompt at most."""
    kinds = SERVER_TOOLS.get(api, {})
    tools = body.get("tools")
    uses: dict[str, int] = {}
    for tool in tools if isinstance(tools, list) else []:
        if not isinstance(tool, dict):
            continue
        names = [tool["type"]] if isinstance(tool.get("type"), str) else list(tool)
        for prefix, count in kinds.items():
            if not any(str(name).startswith(prefix) for name in names):
                continue
            allowed = tool.get("max_uses")
            if not isinstance(allowed, int) or isinstance(allowed, bool) or allowed < 0:
                allowed = DEFAULT_SERVER_TOOL_USES
            if api == "gemini.generate" and not per_query_grounding(path):
                allowed = 1
            uses[count] = uses.get(count, 0) + min(allowed, MAX_COUNT)
    return uses


def _requested_tier(api: str, body: dict[str, object]) -> str | None:
    tier = body.get("service_tier") if api.startswith(("openai.", "anthropic.")) else None
    return tier if isinstance(tier, str) and tier != "auto" else None


def _utf8_bytes(value: str) -> int:
    return len(value.encode("utf-8", "surrogatepass"))  # a JSON "\ud800" is a str too


def _is_server_tool(tool: object) -> bool:
    kind = tool.get("type") if isinstance(tool, dict) else None
    return isinstance(kind, str) and kind.startswith(SERVER_TOOL_TYPES)


def _array(body: dict[str, object], name: str) -> list[dict[str, object]]:
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"{name!r} must be an array")
    if not all(isinstance(item, dict) for item in value):
        raise ValueError(f"each of {name!r} must be an object")
    return value


def _text_or_array(body: dict[str, object], name: str) -> str | list[object]:
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, str | list):
        raise ValueError(f"{name!r} must be a string or an array")
    return value


def _object(body: dict[str, object], *names: str) -> dict[str, object]:
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ValueError(f"{name!r} must be an object")
        return value
    return {}


MAX_COUNT = 10**9
"""Largest output limit or choice count a request may name (no model comes near it; far
larger numbers would overflow the pricing's precision)."""


def _positive_int(body: dict[str, object], *names: str) -> int | None:
    """The first of ``names`` that is set; JSON null counts as unset."""
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_COUNT:
            raise ValueError(
                f"{name!r} must be a positive integer up to {MAX_COUNT}, not {json.dumps(value)}"
            )
        return value
    return None


def _output_limit(api: str, body: dict[str, object], default: int) -> tuple[int, int]:
    """(output limit per choice, choices): the request's limit, else ``default``."""
    if api in EMBEDDING_APIS:
        return 0, 1
    choices = None
    match api:
        case "openai.chat":
            limit = _positive_int(body, "max_completion_tokens", "max_tokens")
            choices = _positive_int(body, "n")
        case "openai.responses":
            limit = _positive_int(body, "max_output_tokens")
        case "anthropic.messages":
            limit = _positive_int(body, "max_tokens")
        case _:
            generation = _object(body, "generationConfig", "generation_config")
            limit = _positive_int(generation, "maxOutputTokens", "max_output_tokens")
            choices = _positive_int(generation, "candidateCount", "candidate_count")
    return limit or default, choices or 1


def _stream(api: str, body: dict[str, object], path: str) -> bool:
    if api.startswith("gemini."):
        return ":streamGenerateContent" in path
    value = body.get("stream")
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ValueError(f"'stream' must be true or false, not {json.dumps(value)}")
    return value
