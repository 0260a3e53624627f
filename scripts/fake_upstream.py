"""A fake LLM upstream for tests: OpenAI- and Anthropic-compatible JSON and SSE on 127.0.0.1.

Run:    python scripts/fake_upstream.py --port 0      (prints "listening on 127.0.0.1:PORT")
Import: ``FakeUpstream`` (start/stop on a running loop) or ``serve_in_thread()``.

Endpoints: POST /v1/chat/completions, /v1/responses, /v1/embeddings, /v1/messages,
/v1beta/models/MODEL:generateContent (JSON only); GET /v1/models; GET /__stats (counts and
the credentials of recent requests), POST /__reset; GET /__received?since=SEQ (every
request exactly as it arrived: method, raw target, raw headers, body, and what was served).

``--realistic`` makes it read requests as lenient real servers do, for the attack suite:
the target is resolved (fragment dropped, percent-decoding, dot segments, repeated and
trailing slashes) before routing; ``stream`` is read as a lax boolean ("true", 1); model names are compared without case, surrounding
spaces or percent-encoding; the output limit the request names caps what is generated;
Gemini honours ``fields`` / ``X-Goog-FieldMask`` (usage left out when not asked for) and
``alt=proto`` (a binary answer), and serves ``:streamGenerateContent``. Every answer it
makes carries ``x-fake-upstream: 1``.

Usage is deterministic from the request, so tests can compute the expected cost:
- prompt tokens = ``prompt_tokens(x)`` = len(json.dumps(x)) // 4, where x is ``messages``
  (chat, Anthropic) or ``input`` (responses, embeddings);
- completion tokens = the number of content events (``x_chunks``), one token each, at
  most the request's output limit (``max_tokens``, ``max_completion_tokens``,
  ``max_output_tokens``, ``generationConfig.maxOutputTokens``), where a real API stops;
- OpenAI prompt counts include ``x_cache_read`` (as ``cached_tokens``); Anthropic reports
  ``input_tokens`` without the cache fields, as the real APIs do.

Knobs, in the JSON body (``x_chunks``) or as headers (``x-fake-chunks``); the body wins:
  x_chunks       content events / completion tokens (default 3)
  x_delay_ms     pause between events (default 0)
  x_ttft_ms      pause before the first event, or before a JSON answer (default 0)
  x_status       answer with this HTTP status and an API-shaped error body
  x_cache_read   cache-read tokens to report (default 0)
  x_cache_write  cache-write tokens to report (Anthropic only; default 0)
  x_split        write SSE output in pieces of this many bytes, each its own TCP write
  x_abort_after  close the connection after this many content events (no usage sent after)
  x_linger_ms    after the last event (usage, [DONE]), wait this long before ending the body
  x_usage_delay_ms  pause before the event that reports the final usage (SSE)

Misbehaviour knobs, on /v1/chat/completions and /v1/messages (x_usage and x_gzip also on
Gemini); x_raw and x_usage in the body only:
  x_raw          answer with a canned broken body instead (``RAW_BODIES``: truncated-json,
                 html-502, empty-json, text-200)
  x_usage        object merged over the usage reported (e.g. {"prompt_tokens": -5}), JSON
                 and SSE alike
  x_error_usage  with x_status: the error body also carries the usage (1 = yes)
  x_gzip         gzip the answer (JSON or SSE) whatever Accept-Encoding says (1 = yes)
  x_event_bytes  pad the first content event's JSON to this many bytes (SSE)
  x_no_final_blank  end the SSE body without the last event's blank line (1 = yes)

Billing knobs, in the body only:
  x_service_tier    OpenAI chat: the top-level ``service_tier`` the answer reports (JSON and
                    every SSE chunk), as OpenAI says which tier served the request
  x_search_queries  Gemini: the candidate's ``groundingMetadata.webSearchQueries`` (a list
                    of strings), as Google Search grounding reports them


  x_thoughts     hidden reasoning tokens generated on top of the content events (reported
                 as reasoning / thoughts; default 0)
  x_wire         body only, a string: write these bytes (latin-1) to the connection as the
                 whole answer and close it (1xx, 101, odd framing, cut streams);
                 ``x_wire_generated`` {"input": N, "output": M} says what that answer stands for

Each ``/__received`` record carries ``served`` (the API a handler served, else null),
``models`` (every top-level ``model`` the body named, normalised) and ``generated``
({"input", "output"} tokens an honest answer generated; null when a knob made the answer
lie, break or cut off).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re
import struct
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field
from typing import Any
from urllib.parse import unquote

from aiohttp import web

KNOBS = (
    "x_chunks",
    "x_delay_ms",
    "x_ttft_ms",
    "x_status",
    "x_cache_read",
    "x_cache_write",
    "x_split",
    "x_abort_after",
    "x_error_usage",
    "x_gzip",
    "x_event_bytes",
    "x_no_final_blank",
    "x_linger_ms",
    "x_usage_delay_ms",
    "x_thoughts",
)
DISHONEST_KNOBS = ("x_status", "x_abort_after", "x_no_final_blank", "x_raw", "x_usage")
"""Knobs whose answer does not report what was generated, whole and well-framed."""
LAX_TRUE = ("1", "true", "yes", "on", "t", "y")
"""What a lax boolean validator (pydantic's, in many OpenAI-compatible servers) reads as true."""
LIMIT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
RAW_BODIES: dict[str, tuple[int, str, bytes]] = {  # name: (status, content type, body)
    "truncated-json": (200, "application/json", b'{"id": "x", "usage": {"prompt_tokens": 1'),
    "html-502": (502, "text/html", b"<html><body><h1>502 Bad Gateway</h1></body></html>"),
    "empty-json": (200, "application/json", b""),
    "text-200": (200, "text/plain", b"all good, no JSON here"),
}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    529: "overloaded_error",
}
MODELS = ("fake-gpt", "fake-gpt-mini", "fake-claude", "fake-embed")
RECENT_LIMIT = 100
DEFAULT_CHUNKS = 3


def output_limit(body: dict[str, Any]) -> int | None:
    """The output limit the request names, as the real APIs read it."""
    generation = body.get("generationConfig")
    names = [body.get(k) for k in LIMIT_FIELDS]
    if isinstance(generation, dict):
        names.append(generation.get("maxOutputTokens"))
    limits = [n for n in names if isinstance(n, int) and not isinstance(n, bool) and n > 0]
    return min(limits) if limits else None


RECEIVED_LIMIT = 2000
BODY_RECORD_BYTES = 65536


def prompt_tokens(value: object) -> int:
    """The fake's tokenizer: one token per four characters of the JSON text."""
    return len(json.dumps(value)) // 4


@dataclass(slots=True)
class Knobs:
    chunks: int = DEFAULT_CHUNKS
    delay_ms: int = 0
    ttft_ms: int = 0
    status: int | None = None
    cache_read: int = 0
    cache_write: int = 0
    split: int = 0
    abort_after: int | None = None
    error_usage: int = 0
    gzip: int = 0
    event_bytes: int = 0
    no_final_blank: int = 0
    linger_ms: int = 0
    usage_delay_ms: int = 0
    thoughts: int = 0
    raw: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    service_tier: str | None = None
    search_queries: list[Any] | None = None

    @classmethod
    def read(cls, request: web.Request, body: dict[str, Any]) -> Knobs:
        values: dict[str, Any] = {}
        for name in KNOBS:
            raw = body.get(name, request.headers.get("x-fake-" + name[2:].replace("_", "-")))
            if raw is not None:
                values[name[2:]] = int(raw)
        if isinstance(body.get("x_raw"), str):
            values["raw"] = body["x_raw"]
        if isinstance(body.get("x_usage"), dict):
            values["usage"] = body["x_usage"]
        if isinstance(body.get("x_service_tier"), str):
            values["service_tier"] = body["x_service_tier"]
        if isinstance(body.get("x_search_queries"), list):
            values["search_queries"] = body["x_search_queries"]
        limit = output_limit(body)
        if limit is not None:  # no more than the limit, reasoning first
            values["thoughts"] = min(values.get("thoughts", 0), limit)
            values["chunks"] = min(values.get("chunks", DEFAULT_CHUNKS), limit - values["thoughts"])
        return cls(**values)

    def tier(self) -> dict[str, Any]:
        """The top-level fields an OpenAI answer adds for x_service_tier."""
        return {} if self.service_tier is None else {"service_tier": self.service_tier}

    def patch(self, usage: dict[str, Any]) -> dict[str, Any]:
        """The usage to report: the honest one with ``x_usage`` merged over it."""
        return {**usage, **self.usage}


@dataclass(slots=True)
class Stats:
    requests: Counter[str] = field(default_factory=Counter)
    connections: int = 0
    aborted: int = 0  # streams the client (the proxy) closed before the end
    cut: int = 0  # streams cut by x_abort_after
    recent: list[dict[str, Any]] = field(default_factory=list)  # newest last
    received: list[dict[str, Any]] = field(default_factory=list)  # every request, newest last
    seq: int = 0

    def receive(self, request: web.Request, raw_body: bytes) -> dict[str, Any]:
        """The request as it arrived, before any reading of it (``/__received``)."""
        self.seq += 1
        record: dict[str, Any] = {
            "seq": self.seq,
            "method": request.method,
            "target": request.raw_path,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
            "body": raw_body[:BODY_RECORD_BYTES].decode("latin-1"),
            "body_bytes": len(raw_body),
            "served": None,
            "models": [],
            "generated": None,
        }
        self.received.append(record)
        del self.received[:-RECEIVED_LIMIT]
        return record

    def record(self, request: web.Request, body: dict[str, Any]) -> None:
        self.requests[request.path] += 1
        self.recent.append(
            {
                "path": request.path,
                "host": request.headers.get("Host"),
                "authorization": request.headers.get("Authorization"),
                "x_api_key": request.headers.get("x-api-key"),
                "x_goog_api_key": request.headers.get("x-goog-api-key"),
                "query": request.query_string,
                "accept_encoding": request.headers.get("Accept-Encoding"),
                "model": body.get("model"),
                "stream": bool(body.get("stream")),
                "stream_options": body.get("stream_options"),
            }
        )
        del self.recent[:-RECENT_LIMIT]

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            "total": sum(self.requests.values()),
            "connections": self.connections,
            "aborted": self.aborted,
            "cut": self.cut,
            "recent": self.recent,
        }


class _Cut(Exception):
    """x_abort_after reached: the connection was closed on purpose."""


class SSEWriter:
    """Writes events to a prepared stream, honouring x_split and x_abort_after."""

    def __init__(self, request: web.Request, response: web.StreamResponse, knobs: Knobs) -> None:
        self.request = request
        self.response = response
        self.knobs = knobs
        self.content_events = 0
        self.zip = zlib.compressobj(wbits=31) if knobs.gzip else None  # 31: gzip framing
        self.held: bytes | None = None  # x_no_final_blank: the last frame, not yet written

    async def send(self, data: object, event: str | None = None) -> None:
        text = data if isinstance(data, str) else json.dumps(data)
        if self.knobs.event_bytes and self.content_events == 0 and isinstance(data, dict):
            text = text[:-1] + ', "x_pad": "' + "x" * (self.knobs.event_bytes - len(text)) + '"}'
        frame = (f"event: {event}\n" if event else "") + f"data: {text}\n\n"
        if self.knobs.no_final_blank:
            held, self.held = self.held, frame.encode()
            if held is not None:
                await self.write(held)
            return
        await self.write(frame.encode())

    async def finish(self) -> None:
        """End the body: the held last frame without its blank line, the gzip trailer."""
        if self.knobs.linger_ms:
            await asyncio.sleep(self.knobs.linger_ms / 1000)
        if self.held is not None:
            await self.write(self.held[:-1])
        if self.zip is not None:
            await self.response.write(self.zip.flush())
        await self.response.write_eof()

    async def write(self, raw: bytes) -> None:
        if self.zip is not None:
            raw = self.zip.compress(raw) + self.zip.flush(zlib.Z_SYNC_FLUSH)
        if self.knobs.split <= 0:
            await self.response.write(raw)
            return
        for start in range(0, len(raw), self.knobs.split):
            await self.response.write(raw[start : start + self.knobs.split])
            await asyncio.sleep(0)  # let the loop flush: one TCP write per piece

    async def content(self, data: object, event: str | None = None) -> None:
        """One content event (one completion token), paced by the delay knobs."""
        pause = self.knobs.ttft_ms if self.content_events == 0 else self.knobs.delay_ms
        if pause:
            await asyncio.sleep(pause / 1000)
        await self.send(data, event)
        self.content_events += 1
        if self.knobs.abort_after is not None and self.content_events >= self.knobs.abort_after:
            transport = self.request.transport
            if transport is not None:
                transport.abort()
            raise _Cut


def openai_error(status: int) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": f"fake upstream error {status}", "type": kind, "code": kind}}


def anthropic_error(status: int) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": f"fake upstream error {status}"}}


def _id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


def openai_chat_usage(body: dict[str, Any], knobs: Knobs, completion: int) -> dict[str, Any]:
    prompt = prompt_tokens(body.get("messages", [])) + knobs.cache_read
    completion += knobs.thoughts
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": knobs.cache_read, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": knobs.thoughts, "audio_tokens": 0},
    }


def responses_usage(body: dict[str, Any], knobs: Knobs, completion: int) -> dict[str, Any]:
    prompt = prompt_tokens(body.get("input", "")) + knobs.cache_read
    completion += knobs.thoughts
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": knobs.cache_read},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": knobs.thoughts},
        "total_tokens": prompt + completion,
    }


def anthropic_usage(body: dict[str, Any], knobs: Knobs, output: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt_tokens(body.get("messages", [])),
        "cache_creation_input_tokens": knobs.cache_write,
        "cache_read_input_tokens": knobs.cache_read,
        "output_tokens": output + knobs.thoughts,
    }


def gzip_bytes(data: bytes) -> bytes:
    z = zlib.compressobj(wbits=31)
    return z.compress(data) + z.flush()


def _text(chunks: int) -> str:
    return "".join(f"tok{i} " for i in range(chunks))


class _Wire(Exception):
    """x_wire: the answer is these bytes, written to the connection as they are."""

    def __init__(self, raw: bytes) -> None:
        super().__init__("wire answer")
        self.raw = raw


def resolve_target(target: str) -> str:
    """The path a lenient server routes: no fragment or query, percent-decoded once, dot
    segments removed, repeated and trailing slashes merged."""
    path = unquote(target.partition("#")[0].partition("?")[0], errors="surrogateescape")
    out: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if out:
                out.pop()
        elif segment not in ("", "."):
            out.append(segment)
    return "/" + "/".join(out)


def normalise_model(name: object) -> str | None:
    """A model name as a lenient upstream matches it: no case, spaces or percent-encoding."""
    if not isinstance(name, str):
        return None
    return unquote(name).strip().lower()


def _all_models(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: keep every value of a repeated top-level ``model`` key."""
    models = [v for k, v in pairs if k == "model"]
    obj = dict(pairs)
    if len(models) > 1:
        obj[" models"] = models
    return obj


RECORD = web.RequestKey("record", dict)
BODY = web.RequestKey("body", dict)
PATH = web.RequestKey("path", str)
GEMINI_PATH = re.compile(r"/(?:v1beta|v1)/(?:tunedModels|models)/([^/]+)$")


class FakeUpstream:
    """The server: ``await start(port)`` on a running loop returns the bound port."""

    def __init__(self, realistic: bool = False) -> None:
        self.stats = Stats()
        self.realistic = realistic
        self.app = web.Application(middlewares=[self._observe])
        self.app.router.add_get("/__stats", self.get_stats)
        self.app.router.add_get("/__received", self.get_received)
        self.app.router.add_post("/__reset", self.reset)
        if realistic:
            self.app.router.add_route("*", "/{tail:.*}", self.dispatch)
            self.app.on_response_prepare.append(self._mark)
        else:
            self.app.router.add_post("/v1/chat/completions", self.chat)
            self.app.router.add_post("/v1/responses", self.responses)
            self.app.router.add_post("/v1/embeddings", self.embeddings)
            self.app.router.add_post("/v1/messages", self.messages)
            self.app.router.add_post("/v1beta/models/{name}", self.gemini)
            self.app.router.add_get("/v1/models", self.models)
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None

    async def start(self, port: int = 0) -> int:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        handler = self._runner.server
        assert handler is not None

        def protocol() -> asyncio.BaseProtocol:
            self.stats.connections += 1
            return handler()

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(protocol, "127.0.0.1", port)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- observing and routing ------------------------------------------------------------
    @web.middleware
    async def _observe(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/__"):
            return await handler(request)
        request[RECORD] = self.stats.receive(request, await request.read())
        try:
            return await handler(request)
        except _Wire as wire:
            transport = request.transport
            if transport is not None:
                transport.write(wire.raw)
                transport.close()
            return web.Response()  # never sent: the connection is closed

    @staticmethod
    async def _mark(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["x-fake-upstream"] = "1"

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        """--realistic: route the resolved target, as a lenient server would."""
        path = resolve_target(request.raw_path)
        request[PATH] = path
        handlers = {
            ("POST", "/v1/chat/completions"): self.chat,
            ("POST", "/v1/responses"): self.responses,
            ("POST", "/v1/embeddings"): self.embeddings,
            ("POST", "/v1/messages"): self.messages,
            ("GET", "/v1/models"): self.models,
        }
        handler = handlers.get((request.method, path))
        if handler is None and request.method == "POST" and GEMINI_PATH.match(path):
            handler = self.gemini
        if handler is None:
            return web.json_response({"error": {"message": "not found"}}, status=404)
        return await handler(request)

    def _served(
        self, request: web.Request, api: str, model: object, knobs: Knobs, input_tokens: int
    ) -> None:
        """Note on the request's record what was served and what an honest answer generates."""
        record = request.get(RECORD)
        if record is None:
            return
        record["served"] = api
        body = request.get(BODY, {})
        named = body.get(" models", [model]) if api != "gemini" else [model]
        record["models"] = [normalise_model(m) for m in named if isinstance(m, str)]
        if "x_wire" in body:
            generated = body.get("x_wire_generated")
            record["generated"] = generated if isinstance(generated, dict) else None
        elif not any(name in body for name in DISHONEST_KNOBS):
            record["generated"] = {"input": input_tokens, "output": knobs.chunks + knobs.thoughts}
        wire = body.get("x_wire")
        if isinstance(wire, str):
            raise _Wire(wire.encode("latin-1", "replace"))

    # -- helpers -------------------------------------------------------------------------
    def _streams(self, body: dict[str, Any]) -> bool:
        """Whether to stream: --realistic reads ``stream`` as lax validators do ("true", 1)."""
        value = body.get("stream")
        if self.realistic and isinstance(value, str | int) and not isinstance(value, bool):
            return str(value).strip().lower() in LAX_TRUE
        return bool(value)

    async def _begin(self, request: web.Request) -> tuple[dict[str, Any], Knobs]:
        body: dict[str, Any] = {}
        raw = await request.read()  # already read by _observe: cached
        if raw:  # JSON whatever the Content-Type, as the real APIs read it
            if self.realistic:
                try:
                    parsed = json.loads(raw, object_pairs_hook=_all_models)
                except (ValueError, RecursionError):
                    raise web.HTTPBadRequest(text="invalid JSON") from None
            else:
                parsed = json.loads(raw)
            body = parsed if isinstance(parsed, dict) else {}
        self.stats.record(request, body)
        request[BODY] = body
        return body, Knobs.read(request, body)

    async def _stream(self, request: web.Request, knobs: Knobs) -> web.StreamResponse:
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        if knobs.gzip:
            headers["Content-Encoding"] = "gzip"
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        return response

    async def _run_stream(
        self, request: web.Request, knobs: Knobs, produce: Any
    ) -> web.StreamResponse:
        response = await self._stream(request, knobs)
        writer = SSEWriter(request, response, knobs)
        try:
            await produce(writer)
            await writer.finish()
        except _Cut:
            self.stats.cut += 1
        except ConnectionResetError:  # the client (the proxy) went away mid-stream
            self.stats.aborted += 1
        return response

    @staticmethod
    def _json(data: object, knobs: Knobs, status: int = 200) -> web.Response:
        if not knobs.gzip:
            return web.json_response(data, status=status)
        return web.Response(
            body=gzip_bytes(json.dumps(data).encode()),
            status=status,
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )

    def _misbehave(
        self, knobs: Knobs, error: dict[str, Any], usage: dict[str, Any]
    ) -> web.Response | None:
        """The answer x_raw or x_status ask for, if any."""
        if knobs.raw is not None:
            status, content_type, raw = RAW_BODIES[knobs.raw]
            return web.Response(body=raw, status=status, headers={"Content-Type": content_type})
        if knobs.status:
            if knobs.error_usage:
                error = {**error, "usage": knobs.patch(usage)}
            return self._json(error, knobs, knobs.status)
        return None

    # -- OpenAI ------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        body, knobs = await self._begin(request)
        usage = openai_chat_usage(body, knobs, knobs.chunks)
        prompt = prompt_tokens(body.get("messages", []))
        self._served(request, "openai.chat", body.get("model"), knobs, prompt)
        if answer := self._misbehave(knobs, openai_error(knobs.status or 500), usage):
            return answer
        model = body.get("model", "fake-gpt")
        created = int(time.time())
        completion_id = _id("chatcmpl-")
        if not self._streams(body):
            await asyncio.sleep(knobs.ttft_ms / 1000)
            return self._json(
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": _text(knobs.chunks)},
                            "finish_reason": "stop",
                            "logprobs": None,
                        }
                    ],
                    "usage": knobs.patch(usage),
                    **knobs.tier(),
                },
                knobs,
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            data: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [
                    {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
                ],
                **knobs.tier(),
            }
            if include_usage:
                data["usage"] = None
            return data

        async def produce(out: SSEWriter) -> None:
            await out.send(chunk({"role": "assistant", "content": ""}))
            for i in range(knobs.chunks):
                await out.content(chunk({"content": f"tok{i} "}))
            await out.send(chunk({}, "stop"))
            await asyncio.sleep(knobs.usage_delay_ms / 1000)
            if include_usage:
                await out.send(
                    {
                        "id": completion_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": knobs.patch(usage),
                        **knobs.tier(),
                    }
                )
            await out.send("[DONE]")

        return await self._run_stream(request, knobs, produce)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body, knobs = await self._begin(request)
        prompt = prompt_tokens(body.get("input", ""))
        self._served(request, "openai.responses", body.get("model"), knobs, prompt)
        if knobs.status:
            return web.json_response(openai_error(knobs.status), status=knobs.status)
        model = body.get("model", "fake-gpt")
        response_id = _id("resp_")
        message_id = _id("msg_")

        def resource(status: str, text: str, usage: dict[str, Any] | None) -> dict[str, Any]:
            output = []
            if status == "completed":
                output = [
                    {
                        "type": "message",
                        "id": message_id,
                        "status": "completed",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": text, "annotations": []}],
                    }
                ]
            return {
                "id": response_id,
                "object": "response",
                "created_at": int(time.time()),
                "status": status,
                "model": model,
                "output": output,
                "parallel_tool_calls": True,
                "tool_choice": "auto",
                "tools": [],
                "usage": usage,
            }

        if not self._streams(body):
            await asyncio.sleep(knobs.ttft_ms / 1000)
            usage = responses_usage(body, knobs, knobs.chunks)
            return web.json_response(resource("completed", _text(knobs.chunks), usage))

        async def produce(out: SSEWriter) -> None:
            seq = 0

            async def emit(kind: str, payload: dict[str, Any], content: bool = False) -> None:
                nonlocal seq
                data = {"type": kind, "sequence_number": seq, **payload}
                seq += 1
                await (out.content(data, kind) if content else out.send(data, kind))

            await emit("response.created", {"response": resource("in_progress", "", None)})
            for i in range(knobs.chunks):
                delta = {"item_id": message_id, "output_index": 0, "content_index": 0}
                await emit("response.output_text.delta", {**delta, "delta": f"tok{i} "}, True)
            usage = responses_usage(body, knobs, knobs.chunks)
            completed = resource("completed", _text(knobs.chunks), usage)
            await emit("response.completed", {"response": completed})

        return await self._run_stream(request, knobs, produce)

    async def embeddings(self, request: web.Request) -> web.Response:
        body, knobs = await self._begin(request)
        knobs.chunks = knobs.thoughts = 0  # embeddings generate nothing
        inputs = body.get("input", "")
        self._served(request, "openai.embeddings", body.get("model"), knobs, prompt_tokens(inputs))
        if knobs.status:
            return web.json_response(openai_error(knobs.status), status=knobs.status)
        items = inputs if isinstance(inputs, list) else [inputs]
        vector = [0.5, -0.25, 0.125]
        encoded: object = vector
        if body.get("encoding_format") == "base64":
            encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        prompt = prompt_tokens(inputs)
        return web.json_response(
            {
                "object": "list",
                "model": body.get("model", "fake-embed"),
                "data": [
                    {"object": "embedding", "index": i, "embedding": encoded}
                    for i in range(len(items))
                ],
                "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
            }
        )

    async def models(self, request: web.Request) -> web.Response:
        await self._begin(request)
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in MODELS]
        return web.json_response({"object": "list", "data": data})

    # -- Anthropic -----------------------------------------------------------------------
    async def messages(self, request: web.Request) -> web.StreamResponse:
        body, knobs = await self._begin(request)
        usage = anthropic_usage(body, knobs, knobs.chunks)
        prompt = prompt_tokens(body.get("messages", []))
        self._served(request, "anthropic.messages", body.get("model"), knobs, prompt)
        if answer := self._misbehave(knobs, anthropic_error(knobs.status or 500), usage):
            return answer
        model = body.get("model", "fake-claude")
        message_id = _id("msg_")

        def message(content: list[dict[str, Any]], usage: dict[str, Any]) -> dict[str, Any]:
            stop = "end_turn" if content else None
            return {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": content,
                "stop_reason": stop,
                "stop_sequence": None,
                "usage": usage,
            }

        if not self._streams(body):
            await asyncio.sleep(knobs.ttft_ms / 1000)
            return self._json(
                message([{"type": "text", "text": _text(knobs.chunks)}], knobs.patch(usage)), knobs
            )

        async def produce(out: SSEWriter) -> None:
            start = message([], anthropic_usage(body, knobs, 1))
            await out.send({"type": "message_start", "message": start}, "message_start")
            block = {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            }
            await out.send(block, "content_block_start")
            for i in range(knobs.chunks):
                delta = {"type": "text_delta", "text": f"tok{i} "}
                await out.content(
                    {"type": "content_block_delta", "index": 0, "delta": delta},
                    "content_block_delta",
                )
            await out.send({"type": "content_block_stop", "index": 0}, "content_block_stop")
            await asyncio.sleep(knobs.usage_delay_ms / 1000)
            final = {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": knobs.patch({"output_tokens": knobs.chunks + knobs.thoughts}),
            }
            await out.send(final, "message_delta")
            await out.send({"type": "message_stop"}, "message_stop")

        return await self._run_stream(request, knobs, produce)

    # -- Gemini (JSON generateContent only) ------------------------------------------------
    async def gemini(self, request: web.Request) -> web.StreamResponse:
        body, knobs = await self._begin(request)
        name = request.get(PATH, request.path).rsplit("/", 1)[1]
        model, _, action = name.partition(":")
        if action not in ("generateContent", "streamGenerateContent"):
            return web.json_response({"error": {"code": 404, "status": "NOT_FOUND"}}, status=404)
        if self.realistic:
            model = normalise_model(model) or model
        prompt = prompt_tokens(body.get("contents", []))
        self._served(request, "gemini", model, knobs, prompt)
        usage = {
            "promptTokenCount": prompt,
            "candidatesTokenCount": knobs.chunks,
            "totalTokenCount": prompt + knobs.chunks + knobs.thoughts,
        }
        if knobs.thoughts:
            usage["thoughtsTokenCount"] = knobs.thoughts
        part = {"text": _text(knobs.chunks)}
        candidate: dict[str, Any] = {
            "content": {"role": "model", "parts": [part]},
            "finishReason": "STOP",
        }
        if knobs.search_queries is not None:
            candidate["groundingMetadata"] = {"webSearchQueries": knobs.search_queries}
        answer = {"candidates": [candidate], "usageMetadata": knobs.patch(usage)}
        answer |= {"modelVersion": model}
        if self.realistic:
            return await self._gemini_realistic(request, knobs, action, answer)
        return self._json(answer, knobs)

    async def _gemini_realistic(
        self, request: web.Request, knobs: Knobs, action: str, answer: dict[str, Any]
    ) -> web.StreamResponse:
        """What the real API does with a field mask, ``alt`` and streaming."""
        mask = request.query.get("fields") or request.headers.get("x-goog-fieldmask")
        if mask:
            keep = {path.strip().split(".")[0] for path in mask.split(",")}
            answer = {k: v for k, v in answer.items() if k in keep}
        alt = request.query.get("alt", "json")
        if alt == "proto":
            raw = json.dumps(answer).encode()
            return web.Response(
                body=b"\x0a" + bytes([len(raw) % 128]) + raw[::-1],
                headers={"Content-Type": "application/x-protobuf"},
            )
        if action == "generateContent":
            return self._json(answer, knobs)
        usage = answer.pop("usageMetadata", None)
        chunks = [
            dict(
                answer, candidates=[{"content": {"role": "model", "parts": [{"text": f"tok{i} "}]}}]
            )
            for i in range(knobs.chunks)
        ] or [dict(answer)]
        if usage is not None:
            chunks[-1]["usageMetadata"] = usage
        if alt == "sse":

            async def produce(out: SSEWriter) -> None:
                for chunk in chunks:
                    await out.content(chunk)

            return await self._run_stream(request, knobs, produce)
        return self._json(chunks, knobs)

    # -- test control ----------------------------------------------------------------------
    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.as_json())

    async def get_received(self, request: web.Request) -> web.Response:
        since = int(request.query.get("since", "0"))
        records = [r for r in self.stats.received if r["seq"] > since]
        return web.json_response({"seq": self.stats.seq, "received": records})

    async def reset(self, request: web.Request) -> web.Response:
        self.stats = Stats()
        return web.json_response({"ok": True})


@contextmanager
def serve_in_thread(port: int = 0, realistic: bool = False) -> Iterator[int]:
    """Run a FakeUpstream on its own loop in a daemon thread; yields the port."""
    loop = asyncio.new_event_loop()
    upstream = FakeUpstream(realistic)
    thread = threading.Thread(target=loop.run_forever, name="fake-upstream", daemon=True)
    thread.start()
    bound = asyncio.run_coroutine_threadsafe(upstream.start(port), loop).result(timeout=10)
    try:
        yield bound
    finally:
        asyncio.run_coroutine_threadsafe(upstream.stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


async def _main(port: int, realistic: bool) -> None:
    upstream = FakeUpstream(realistic)
    bound = await upstream.start(port)
    print(f"listening on 127.0.0.1:{bound}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await upstream.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--realistic", action="store_true", help="read requests as lenient real servers do"
    )
    args = parser.parse_args()
    try:
        asyncio.run(_main(args.port, args.realistic))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
