"""Security properties that need no proxy: key handling, the key cache, config refusals,
and the stream tap's handling of compressed (and hostile) bodies."""

from __future__ import annotations

import gzip
import json
import logging
import os
import subprocess
import sys
import zlib
from collections.abc import Iterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import brotli
import mongomock
import pytest
from mitmproxy.test import tutils

from addons.keys import KeyCache
from addons.keys import client_key
from addons.keys import set_upstream_key
from addons.metering import spill
from addons.streamtap import DECOMPRESS_STEP
from addons.streamtap import StreamTap
from addons.streamtap import zstd
from burnmeter.config import load_config
from burnmeter.documents import hash_key
from burnmeter.documents import mask_key
from burnmeter.documents import new_key
from burnmeter.exceptions import ConfigError
from burnmeter.store.base import KeyOwner
from burnmeter.store.base import Settlement
from burnmeter.store.base import Store
from burnmeter.store.mongo import MongoStore
from burnmeter.store.sqlite import SqliteStore
from tests.stores import POOLS

ROOT = Path(__file__).resolve().parents[1]
USAGE = {"prompt_tokens": 11, "completion_tokens": 3}


# -- the key cache ----------------------------------------------------------------------------
class Tripwire(str):
    """A key that fails the test if anything compares or dict-hashes the raw string."""

    def __eq__(self, other: object) -> bool:
        raise AssertionError("the raw key was compared")

    def __hash__(self) -> int:
        raise AssertionError("the raw key was used as a dict key")


def owner(user_id: str = "alice") -> KeyOwner:
    return KeyOwner(user_id, "sha256:x", True, None, {"_id": user_id})


def test_key_cache_holds_digests_never_raw_keys() -> None:
    cache = KeyCache(ttl=60)
    keys = [new_key() for _ in range(3)]
    for i, key in enumerate(keys):
        cache.put(key, owner(f"user{i}"))
    assert all(k.startswith("sha256:") and len(k) == 71 for k in cache._entries)
    dump = repr(cache._entries).encode() + "".join(cache._entries).encode()
    for key in keys:
        assert key.encode() not in dump and key[-16:].encode() not in dump
    assert [cache.get(key)[1].user_id for key in keys] == ["user0", "user1", "user2"]  # type: ignore[union-attr]
    assert cache.get(keys[0][:-1] + "x") == (False, None)


def test_key_cache_never_compares_or_hashes_the_raw_key() -> None:
    cache = KeyCache(ttl=60)
    key = Tripwire(new_key())
    cache.put(key, owner())
    found, who = cache.get(key)
    assert found and who is not None and who.user_id == "alice"
    cache.put(key, None)  # an unknown key is cached too, still by digest
    assert cache.get(key) == (True, None)


def test_hash_key_is_sha256_and_total() -> None:
    """One hash for stored keys, the key cache and rate-limit budgets; a key that is not
    UTF-8 (read from headers as surrogate escapes) hashes too, never raising."""
    expected = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert hash_key("abc") == expected
    assert len(hash_key("\udcff broken surrogate")) == 71


# -- where keys travel -----------------------------------------------------------------------
def request(path: str, **headers: str):  # type: ignore[no-untyped-def]
    return tutils.treq(
        method=b"POST",
        path=path.encode(),
        headers=[(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()],
    )


@pytest.mark.parametrize(
    ("path", "headers", "style"),
    [
        ("/v1/chat/completions", {"authorization": "Bearer K"}, "openai"),
        ("/v1/messages", {"x_api_key": "K"}, "anthropic"),
        ("/v1beta/models/m:generateContent", {"x_goog_api_key": "K"}, "gemini"),
        ("/v1beta/models/m:generateContent?key=K&alt=sse", {}, "gemini"),
    ],
)
@pytest.mark.parametrize("upstream_key", [None, "UP"])
def test_client_key_is_read_then_never_forwarded(
    path: str, headers: dict[str, str], style: str, upstream_key: str | None
) -> None:
    req = request(path, **headers)
    assert client_key(req, style) == "K"  # type: ignore[arg-type]
    set_upstream_key(req, style, upstream_key)  # type: ignore[arg-type]
    sent = [v for _, v in req.headers.items(multi=True)] + [req.url]
    assert not any("K" == v or "Bearer K" == v or "key=K" in v for v in sent), sent
    if upstream_key is None:
        assert not {"authorization", "x-api-key", "x-goog-api-key"} & set(req.headers.keys())
    else:
        expected = {"openai": "Bearer UP", "anthropic": "UP", "gemini": "UP"}[style]
        name = {"openai": "authorization", "anthropic": "x-api-key", "gemini": "x-goog-api-key"}
        assert req.headers[name[style]] == expected
    if "alt=sse" in path:
        assert req.query.get("alt") == "sse"  # other parameters survive


def test_x_api_key_is_not_a_credential_on_openai_paths() -> None:
    assert client_key(request("/v1/chat/completions", x_api_key="K"), "openai") is None


def test_mask_never_reveals_more_than_prefix_and_last_four() -> None:
    key = new_key()
    masked = mask_key(key)
    assert masked.endswith(key[-4:]) and key[7:-4] not in masked
    for short in ["", "a", "abcd", "abcdefgh", "abcdefghijkl"]:
        assert short == "" or short not in mask_key(short) or len(short) <= 2


def test_a_spilled_settlement_never_carries_a_legacy_raw_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    raw = "legacy-" + new_key()
    settlement = Settlement("r1", "u", "ohmygpt", Decimal(1), 1, 1, 0, raw, {"userKeyId": "x"})
    with caplog.at_level(logging.ERROR):
        spill(settlement, "test")
    assert caplog.text and raw not in caplog.text


# -- keys in the store: hashed by burnmeter, legacy forms still accepted -------------------------
@pytest.fixture(params=["sqlite", "mongo"])
def key_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    store: Store
    if request.param == "sqlite":
        store = SqliteStore(str(tmp_path / "keys.db"), POOLS)
    else:
        store = MongoStore(mongomock.MongoClient(tz_aware=True)["fproxy"], POOLS)
    store.ensure_schema(0)
    yield store
    store.close()


def test_hashed_legacy_raw_and_api_key_all_authenticate(key_store: Store) -> None:
    hashed, legacy, api_key = new_key(), "sk-legacy-0123456789abcdef", "sk-apikey-fedcba9876543210"
    key_store.create_user("new", hash_key(hashed), {})
    key_store.create_user("old", legacy, {})  # an original user_keys document: _id = the key
    key_store.create_user("apikey", hash_key(new_key()), {})
    key_store.set_fields("apikey", {"apiKey": api_key})

    found = {k: key_store.find_key(k) for k in (hashed, legacy, api_key)}
    assert {k: o.user_id if o else None for k, o in found.items()} == {
        hashed: "new",
        legacy: "old",
        api_key: "apikey",
    }
    ids = {k: o.key_doc_id for k, o in found.items() if o is not None}
    assert ids == {hashed: hash_key(hashed), legacy: legacy, api_key: None}
    assert key_store.find_key(hashed[:-1]) is None


def test_the_addon_refuses_a_stored_hash_presented_as_a_key() -> None:
    stored = hash_key(new_key())
    for path, headers in [
        ("/v1/chat/completions", {"authorization": f"Bearer {stored}"}),
        ("/v1/messages", {"x_api_key": stored}),
    ]:
        style = "anthropic" if "messages" in path else "openai"
        assert client_key(request(path, **headers), style) is None  # type: ignore[arg-type]


def test_store_does_not_accept_a_stored_hash_as_a_key(key_store: Store) -> None:
    key = new_key()
    key_store.create_user("new", hash_key(key), {})
    assert key_store.find_key(hash_key(key)) is None


def test_burnmeter_created_keys_are_stored_hashed_only(tmp_path: Path) -> None:
    db = tmp_path / "cli.db"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "stats",
            "--db",
            f"sqlite:///{db}",
            "accounts",
            "create",
            "bob",
            "--pool",
            "openhands=5",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
        check=True,
    )
    key = json.loads(done.stdout)["key"]
    store = SqliteStore(str(db), POOLS)
    try:
        owner_found = store.find_key(key)
        assert owner_found is not None and owner_found.key_doc_id == hash_key(key)
    finally:
        store.close()
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("cli.db*"))
    assert key.encode() not in stored and key[8:].encode() not in stored
    assert hash_key(key).encode() in stored


# -- config: no secrets in it, and not writable by others ---------------------------------------
def config_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "burnmeter.toml"
    path.write_text(text)
    path.chmod(mode)
    return path


ROUTE = '[[routes]]\nhost = "a.test"\npool = "ohmygpt"\n'


def test_a_plain_text_upstream_key_in_the_config_is_refused(tmp_path: Path) -> None:
    path = config_file(tmp_path, ROUTE + 'upstream_key = "sk-live-abc"\n')
    with pytest.raises(ConfigError, match="upstream_key: unknown key") as e:
        load_config(path)
    assert "sk-live-abc" not in str(e.value)
    assert load_config(config_file(tmp_path, ROUTE + 'upstream_key_env = "UP_KEY"\n'))


@pytest.mark.parametrize("mode", [0o666, 0o602])
def test_cli_refuses_a_world_writable_config(tmp_path: Path, mode: int) -> None:
    path = config_file(tmp_path, ROUTE, mode)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "stats",
            "--config",
            str(path),
            "--db",
            f"sqlite:///{tmp_path / 'x.db'}",
            "summary",
            "--period",
            "all",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
        env={k: v for k, v in os.environ.items() if k != "BURNMETER_DB"},
    )
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "world-writable config file refused" in lines[0], done.stderr
    assert "Traceback" not in done.stderr


# -- the stream tap: compressed and hostile stream bodies ----------------------------------------
def chat_sse(chunks: int = 3) -> bytes:
    events: list[dict[str, object]] = [
        {"choices": [{"delta": {"content": f"tok{i} "}}]} for i in range(chunks)
    ]
    events.append({"choices": [], "usage": USAGE})
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + (
        b"data: [DONE]\n\n"
    )


def tap_through(tap: StreamTap, body: bytes, piece: int) -> bytes:
    out = b"".join(tap(body[i : i + piece]) for i in range(0, len(body), piece))
    return out + tap(b"")


COMPRESSORS = {
    "gzip": lambda b: gzip.compress(b),
    "zlib": lambda b: zlib.compress(b),
    "raw-deflate": lambda b: (lambda z: z.compress(b) + z.flush())(zlib.compressobj(wbits=-15)),
    "br": lambda b: brotli.compress(b),
    "zstd": lambda b: zstd.compress(b),
    "gzip-members": lambda b: gzip.compress(b[:100]) + gzip.compress(b[100:]),
    "zstd-frames": lambda b: zstd.compress(b[:100]) + zstd.compress(b[100:]),
}


@pytest.mark.parametrize("name", list(COMPRESSORS))
@pytest.mark.parametrize("header", [True, False])
@pytest.mark.parametrize("piece", [1, 7, 1 << 20])
def test_tap_meters_compressed_streams_and_forwards_them_untouched(
    name: str, header: bool, piece: int
) -> None:
    if not header and name in ("br", "raw-deflate"):
        pytest.skip("no magic bytes: recognised by Content-Encoding only")
    body = COMPRESSORS[name](chat_sse())
    encoding = name.partition("-")[0] if header else None
    encoding = {"zlib": "deflate", "raw": "deflate"}.get(encoding or "", encoding)
    tap = StreamTap("openai.chat", encoding)
    assert tap_through(tap, body, piece) == body
    usage, _ = tap.usage.result()
    assert usage is not None and (usage.input_tokens, usage.output_tokens) == (11, 3)
    assert tap.usage.done and tap.usage.text_chars == len("tok0 tok1 tok2 ")


def test_tap_survives_a_compression_bomb_and_garbage() -> None:
    bomb = gzip.compress(b"data: " + b"x" * (64 << 20))  # 64 MB event in ~64 KB
    tap = StreamTap("openai.chat")
    assert tap_through(tap, bomb, 4096) == bomb
    assert tap.usage.result()[0] is None and tap.usage.overflows >= 1
    assert tap.usage._sse is not None and tap.usage._sse.buffered <= DECOMPRESS_STEP + 16

    garbage = b"\x1f\x8b" + os.urandom(5000)  # gzip magic, then noise: decoding fails
    broken = StreamTap("openai.chat", "gzip")
    assert tap_through(broken, garbage, 100) == garbage
    assert broken.usage.result()[0] is None


def test_tap_without_compression_is_unchanged() -> None:
    body = chat_sse()
    tap = StreamTap("openai.chat")
    assert tap_through(tap, body, 3) == body
    assert tap.usage.result()[0] == replace(tap.usage.result()[0])  # type: ignore[type-var]
    assert tap.usage.result()[0] is not None
