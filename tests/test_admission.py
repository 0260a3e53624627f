"""addons/admission.py called directly: authenticate, price, admit and their checks, on a real
SQLite store (alice has credit, bob none) and an outage object of their own."""

from __future__ import annotations

import dataclasses
import gzip
import json
import tomllib
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from mitmproxy import http

from addons import errors
from addons.admission import Admission
from addons.admission import holdless
from addons.admission import prepare_stream
from addons.canonical import read_request
from addons.exceptions import Rejection
from addons.keys import KeyCache
from addons.outage import RECORD_RESERVE
from addons.outage import Outage
from addons.phases import Authenticated
from burnmeter.config import Config
from burnmeter.config import parse_config
from burnmeter.documents import hash_key
from burnmeter.documents import mask_key
from burnmeter.documents import utcnow
from burnmeter.estimate import estimate_request
from burnmeter.estimate import hold_amounts
from burnmeter.estimate import output_tokens_paid
from burnmeter.exceptions import StoreError
from burnmeter.journal import Journal
from burnmeter.pricing import resolve_price
from burnmeter.store import open_store
from burnmeter.store.base import InsufficientBalance
from burnmeter.store.base import Store
from burnmeter.writer import SettlementWriter
from tests.addon_support import BOB_KEY
from tests.addon_support import CONFIG
from tests.addon_support import KEY
from tests.addon_support import OHMYGPT_HOST
from tests.addon_support import alice_store
from tests.addon_support import make_flow
from tests.phase_support import ALICE

STREAM_BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True}


@dataclass
class Setup:
    admission: Admission
    store: Store
    outage: Outage
    journal: Journal


def admission_for(config: Config, store: Store, outage: Outage) -> Admission:
    return Admission(config, store, KeyCache(30), outage, ThreadPoolExecutor(2))


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    _, db_url, store = alice_store(tmp_path, creditsNew=Decimal(5), credits=Decimal(3))
    store.create_user("bob", hash_key(BOB_KEY), {"creditsNew": Decimal(0)})
    config = parse_config(tomllib.loads(CONFIG))
    journal = Journal(str(tmp_path / "burnmeter.journal"), 64 * RECORD_RESERVE)
    writer = SettlementWriter(lambda: open_store(db_url, config.pools), journal)  # not started
    outage = Outage(writer, weakref.WeakSet())
    admission = admission_for(config, store, outage)
    yield Setup(admission, store, outage, journal)
    admission.close(2)
    admission.executor.shutdown()
    journal.close()
    store.close()


def balance(setup: Setup, user: str = "alice", pool: str = "openhands") -> Decimal:
    return setup.store.balance(user, setup.store.pools[pool])


async def authenticated(setup: Setup, f: http.HTTPFlow) -> tuple[Authenticated, str]:
    return await setup.admission.authenticate(f, read_request(f.request, reverse=False))


async def refused(setup: Setup, f: http.HTTPFlow) -> Rejection:
    """The rejection of ``f`` by authentication, pricing or admission (whichever refuses)."""
    with pytest.raises(Rejection) as refusal:
        phase, key = await authenticated(setup, f)
        await setup.admission.admit(f, setup.admission.price(f, phase, key))
    return refusal.value


# -- authenticate ------------------------------------------------------------------------
async def test_authenticate_knows_the_caller_and_the_route_but_keeps_no_key(setup: Setup) -> None:
    f = make_flow()
    phase, key = await authenticated(setup, f)
    assert key == KEY
    assert phase.user_id == "alice" and phase.key_mask == mask_key(KEY)
    assert phase.pool == phase.route.pool == "openhands" and phase.api == "openai.chat"
    assert not phase.key_cached, "looked up in the store"
    assert all(KEY not in repr(getattr(phase, field.name)) for field in dataclasses.fields(phase))
    again, _ = await authenticated(setup, make_flow())
    assert again.key_cached
    other, _ = await authenticated(setup, make_flow(host=OHMYGPT_HOST))
    assert other.pool == "ohmygpt"


@pytest.mark.parametrize(
    "flow, problem",
    [
        (lambda: make_flow(key=None), errors.MISSING_KEY),
        (lambda: make_flow(key="sk-nobody-0000000000000"), errors.INVALID_KEY),
        (lambda: make_flow(f"/v1/chat/completions/{KEY}"), errors.AMBIGUOUS),
        (lambda: make_flow("/v1/unheard/of"), errors.UNSUPPORTED),
    ],
)
async def test_authenticate_refuses(setup: Setup, flow, problem: errors.Problem) -> None:
    with pytest.raises(Rejection) as refusal:
        await authenticated(setup, flow())
    assert refusal.value.problem is problem


async def test_a_store_that_cannot_look_up_a_key_is_503_and_marked_down(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(key: str) -> None:
        raise StoreError("connection refused")

    monkeypatch.setattr(setup.store, "find_key", down)
    with pytest.raises(Rejection) as refusal:
        await authenticated(setup, make_flow())
    assert refusal.value.problem is errors.UNAVAILABLE and setup.outage.store_down


# -- check_rate, check_size --------------------------------------------------------------
def test_check_rate_limits_each_key_per_minute(setup: Setup) -> None:
    config = parse_config(tomllib.loads("rate_limit_rpm = 2\n" + CONFIG))
    admission = admission_for(config, setup.store, setup.outage)
    try:
        route = config.route(OHMYGPT_HOST, 80, 8080)
        for _ in range(2):
            admission.check_rate(KEY, route)
        with pytest.raises(Rejection) as refusal:
            admission.check_rate(KEY, route)
        assert refusal.value.problem is errors.RATE_LIMITED
        assert refusal.value.headers == {"Retry-After": "30"}  # 2 a minute: one back each 30 s
        admission.check_rate(BOB_KEY, route)  # a budget per key
    finally:
        admission.close(2)
        admission.executor.shutdown()


def test_check_size(setup: Setup) -> None:
    limit = setup.admission.config.max_request_bytes
    setup.admission.check_size(limit)
    with pytest.raises(Rejection) as refusal:
        setup.admission.check_size(limit + 1)
    assert refusal.value.problem is errors.TOO_LARGE and str(limit + 1) in refusal.value.message


# -- price -------------------------------------------------------------------------------
async def test_price_reads_the_body_into_the_quoted_phase(setup: Setup) -> None:
    f = make_flow(body={"model": "special", "messages": [], "max_tokens": 100})
    phase, key = await authenticated(setup, f)
    quoted = setup.admission.price(f, phase, key).quoted
    config = setup.admission.config
    body = json.loads(f.request.content or b"")
    assert quoted.model == "special"
    assert quoted.estimate == estimate_request("openai.chat", body, config, phase.path, "special")
    assert quoted.quote == resolve_price(config, "special", phase.route.multiplier)
    assert quoted.pool == "ohmygpt" != phase.pool, "the model bills a pool of its own"
    assert not quoted.stream and quoted.user_id == "alice"


@pytest.mark.parametrize(
    "flow, problem",
    [
        (lambda: make_flow(body={"model": "gpt-4o", "messages": [], "x": KEY}), errors.AMBIGUOUS),
        (lambda: make_flow(body=b"[1, 2]"), errors.BAD_REQUEST),
        (lambda: make_flow(body={"model": "gpt-9", "messages": []}), errors.UNKNOWN_MODEL),
        (lambda: make_flow(body={"messages": []}), errors.BAD_REQUEST),
        (
            lambda: make_flow("/v1/responses", {"model": "gpt-4o", "background": True}),
            errors.BAD_REQUEST,
        ),
    ],
)
async def test_price_refuses(setup: Setup, flow, problem: errors.Problem) -> None:
    f = flow()
    phase, key = await authenticated(setup, f)
    with pytest.raises(Rejection) as refusal:
        setup.admission.price(f, phase, key)
    assert refusal.value.problem is problem


async def test_a_compressed_body_is_refused_before_it_is_read(setup: Setup) -> None:
    f = make_flow(extra_headers=(("content-encoding", "gzip"),))
    f.request.raw_content = gzip.compress(f.request.raw_content or b"")
    phase, key = await authenticated(setup, f)
    with pytest.raises(Rejection) as refusal:
        setup.admission.price(f, phase, key)
    assert refusal.value.problem is errors.COMPRESSED_BODY


# -- admit -------------------------------------------------------------------------------
async def test_admit_holds_the_estimated_maximum_and_caps_the_output(setup: Setup) -> None:
    f = make_flow(body=STREAM_BODY)
    del f.request.headers["content-length"]  # an HTTP/2 client's
    phase, key = await authenticated(setup, f)
    admitting = setup.admission.price(f, phase, key)
    admitted = await setup.admission.admit(f, admitting)
    quoted = admitting.quoted
    maximum, _ = hold_amounts(quoted.estimate, quoted.quote)
    assert admitted.hold is not None and admitted.hold.amount == maximum
    assert balance(setup) == 5 - maximum
    paid = output_tokens_paid(quoted.estimate, quoted.quote, maximum, maximum)
    assert admitted.output_tokens_paid == paid and admitted.tap is None
    forwarded = json.loads(f.request.content or b"")
    assert forwarded["stream_options"] == {"include_usage": True}
    assert forwarded["max_completion_tokens"] == paid
    assert f.request.headers["content-length"] == str(len(f.request.raw_content or b""))
    assert f.request.headers["accept-encoding"] == "identity"


async def test_admit_refuses_a_balance_that_cannot_cover_the_hold(setup: Setup) -> None:
    refusal = await refused(setup, make_flow(key=BOB_KEY))
    assert refusal.problem is errors.INSUFFICIENT_CREDITS and refusal.extra == {"balance": 0.0}


async def test_admit_refuses_an_expired_pool(setup: Setup) -> None:
    setup.store.set_fields("alice", {"expiresAtNew": utcnow() - timedelta(days=1)})
    refusal = await refused(setup, make_flow())
    assert refusal.problem is errors.CREDITS_EXPIRED
    assert balance(setup) == 5, "nothing held"


async def test_admit_asks_the_outage_whether_the_journal_has_room(setup: Setup) -> None:
    room = setup.journal.max_bytes // RECORD_RESERVE
    held = [make_flow() for _ in range(room)]
    setup.outage.in_flight.update(held)
    refusal = await refused(setup, make_flow())
    assert refusal.problem is errors.UNAVAILABLE and "journal full" in refusal.message
    setup.outage.in_flight.discard(held.pop())  # settled: its room is free again
    f = make_flow()
    phase, key = await authenticated(setup, f)
    assert (await setup.admission.admit(f, setup.admission.price(f, phase, key))).hold


async def test_a_cached_key_is_admitted_without_a_hold_while_the_store_is_down(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    await authenticated(setup, make_flow())  # alice's key is now cached
    cached, key = await authenticated(setup, make_flow())
    assert cached.key_cached
    unknown, bob_key = await authenticated(setup, make_flow(key=BOB_KEY))
    unknown = dataclasses.replace(unknown, key_cached=False)  # as if looked up in the outage

    def down(*args: object) -> None:
        raise StoreError("connection refused")

    monkeypatch.setattr(setup.store, "hold_many", down)
    monkeypatch.setattr(setup.store, "try_hold", down)
    f = make_flow()
    admitted = await setup.admission.admit(f, setup.admission.price(f, cached, key))
    assert admitted.hold is None and setup.outage.store_down
    assert admitted.output_tokens_paid is not None
    g = make_flow(key=BOB_KEY)
    with pytest.raises(Rejection) as refusal:
        await setup.admission.admit(g, setup.admission.price(g, unknown, bob_key))
    assert refusal.value.problem is errors.UNAVAILABLE


# -- holdless, prepare_stream ------------------------------------------------------------
def test_holdless_needs_the_cached_balance_to_cover_the_hold(setup: Setup) -> None:
    pool = setup.store.pools["ohmygpt"]  # alice's credits: 3, no refCredits
    assert holdless(ALICE, pool, Decimal(5), Decimal(3)) is None, "the input part is covered"
    short = holdless(ALICE, pool, Decimal(5), Decimal("3.01"))
    assert isinstance(short, InsufficientBalance) and short.balance == 3


def test_prepare_stream_asks_for_the_usage_once() -> None:
    request = make_flow(body=STREAM_BODY).request
    body = dict(STREAM_BODY)
    assert prepare_stream(request, "openai.chat", body)
    assert body["stream_options"] == {"include_usage": True}
    assert not prepare_stream(request, "openai.chat", body), "already asked"
    assert not prepare_stream(request, "anthropic.messages", {"stream": True})
    assert request.headers["accept-encoding"] == "identity"
    with pytest.raises(Rejection) as refusal:
        prepare_stream(request, "openai.chat", {"stream_options": "yes"})
    assert refusal.value.problem is errors.BAD_REQUEST
