"""Coding-agent-shaped request bodies for the benchmarks, generated deterministically.

What a coding agent sends on every step of its loop: a long system prompt, ~20 tool
definitions, and the whole tool-use history so far (each turn: the assistant calls a tool,
the client sends back the tool's output, mostly file contents and command output). The
same arguments give the same bytes on every run and machine (a seeded PRNG, no clock).

    anthropic_messages(model, target_bytes=200_000, turns=60, tools=20)  # /v1/messages
    openai_chat(model, target_bytes=100_000, turns=60, tools=20)         # /v1/chat/completions

Each returns the JSON body (``bytes``) of a streaming request; ``target_bytes`` is met to
within one percent by sizing the tool outputs. ``x_chunks`` (the fake upstream's knob)
asks for ``events`` content events.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

SEED = 14
WORDS = (
    "def return self import from class async await None True False if else for in with "
    "try except raise yield lambda config store request response stream event usage "
    "token price hold settle journal writer pool balance model route upstream client "
    "key header body json decode encode parse buffer chunk bytes str int dict list "
    "assert test fixture path file line error value result status cost estimate"
).split()
TOOL_NAMES = (
    "read_file", "write_file", "edit_file", "list_directory", "search_files", "grep",
    "run_command", "run_tests", "git_status", "git_diff", "git_log", "git_commit",
    "web_fetch", "python_eval", "create_directory", "move_file", "delete_file",
    "find_definition", "find_references", "ask_user",
)  # fmt: skip
EVENTS = 300
"""Content events the agent-shaped requests ask the fake upstream for (``x_chunks``)."""
SIZE_TOLERANCE = 0.01
"""How far the body's size may be from ``target_bytes`` (a fraction of it)."""


def _text(rng: random.Random, chars: int) -> str:
    """Code-like text of exactly ``chars`` characters, newlines every ~80."""
    out: list[str] = []
    size = 0
    while size < chars:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))
        out.append(line)
        size += len(line) + 1
    return "\n".join(out)[:chars]


def _schema(rng: random.Random) -> dict[str, Any]:
    names = rng.sample(WORDS, 4)
    return {
        "type": "object",
        "properties": {
            name: {
                "type": rng.choice(("string", "integer", "boolean")),
                "description": _text(rng, 60),
            }
            for name in names
        },
        "required": names[:2],
    }


def _sized(build: Callable[[int], bytes], target_bytes: int, turns: int) -> bytes:
    """``build(tool_output_chars)`` with the output size that brings the body to
    ``target_bytes`` (the body grows by ``turns`` characters or more per added character)."""
    base = build(0)
    per_turn = max(0, (target_bytes - len(base)) // turns)
    body = build(per_turn)
    while len(body) > target_bytes * (1 + SIZE_TOLERANCE) and per_turn > 0:
        per_turn = int(per_turn * target_bytes / len(body))
        body = build(per_turn)
    return body


def anthropic_messages(
    model: str,
    *,
    target_bytes: int = 200_000,
    turns: int = 60,
    tools: int = 20,
    events: int = EVENTS,
    max_tokens: int = 8192,
) -> bytes:
    """A streaming Messages request: system prompt (cached), tools, ``turns`` tool uses."""

    def build(output_chars: int) -> bytes:
        rng = random.Random(SEED)
        system = [
            {"type": "text", "text": _text(rng, 6000)},
            {"type": "text", "text": _text(rng, 2000), "cache_control": {"type": "ephemeral"}},
        ]
        tool_defs = [
            {"name": TOOL_NAMES[i], "description": _text(rng, 300), "input_schema": _schema(rng)}
            for i in range(tools)
        ]
        messages: list[dict[str, Any]] = [{"role": "user", "content": _text(rng, 800)}]
        for turn in range(turns):
            tool_id = f"toolu_{SEED:02d}{turn:04d}"
            messages.append(
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": _text(rng, 120)},
                        {
                            "type": "tool_use",
                            "id": tool_id,
                            "name": TOOL_NAMES[turn % tools],
                            "input": {"path": f"src/module_{turn}.py", "limit": 400},
                        },
                    ],
                }
            )
            messages.append(
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": tool_id,
                            "content": _text(rng, output_chars),
                        }
                    ],
                }
            )
        messages[-1]["content"].append(  # the agent's cache breakpoint, as Claude Code sets it
            {"type": "text", "text": "continue", "cache_control": {"type": "ephemeral"}}
        )
        body = {
            "model": model,
            "max_tokens": max_tokens,
            "system": system,
            "tools": tool_defs,
            "messages": messages,
            "stream": True,
            "x_chunks": events,
        }
        return json.dumps(body).encode()

    return _sized(build, target_bytes, turns)


def openai_chat(
    model: str,
    *,
    target_bytes: int = 100_000,
    turns: int = 60,
    tools: int = 20,
    events: int = EVENTS,
    max_tokens: int = 8192,
) -> bytes:
    """A streaming chat completion with usage: system message, tools, ``turns`` tool calls."""

    def build(output_chars: int) -> bytes:
        rng = random.Random(SEED)
        tool_defs = [
            {
                "type": "function",
                "function": {
                    "name": TOOL_NAMES[i],
                    "description": _text(rng, 300),
                    "parameters": _schema(rng),
                },
            }
            for i in range(tools)
        ]
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": _text(rng, 6000)},
            {"role": "user", "content": _text(rng, 800)},
        ]
        for turn in range(turns):
            call_id = f"call_{SEED:02d}{turn:04d}"
            arguments = json.dumps({"path": f"src/module_{turn}.py", "limit": 400})
            messages.append(
                {
                    "role": "assistant",
                    "content": _text(rng, 120),
                    "tool_calls": [
                        {
                            "id": call_id,
                            "type": "function",
                            "function": {"name": TOOL_NAMES[turn % tools], "arguments": arguments},
                        }
                    ],
                }
            )
            messages.append(
                {"role": "tool", "tool_call_id": call_id, "content": _text(rng, output_chars)}
            )
        body = {
            "model": model,
            "max_completion_tokens": max_tokens,
            "tools": tool_defs,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "x_chunks": events,
        }
        return json.dumps(body).encode()

    return _sized(build, target_bytes, turns)
