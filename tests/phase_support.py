"""Phase records (``addons/phases.py``) built directly, as the hooks would have, for the
tests of what takes them (billing, inspection) without running admission."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from decimal import Decimal

from mitmproxy import http

from addons import admission
from addons import phases
from addons.canonical import read_request
from addons.phases import Admitted
from addons.phases import Authenticated
from addons.phases import Quoted
from addons.streamtap import StreamTap
from burnmeter.config import Config
from burnmeter.config import parse_config
from burnmeter.documents import utcnow
from burnmeter.estimate import estimate_request
from burnmeter.pricing import resolve_price
from burnmeter.store.base import Hold
from burnmeter.store.base import KeyOwner
from tests.addon_support import CONFIG
from tests.addon_support import KEY

TEST_CONFIG: Config = parse_config(tomllib.loads(CONFIG))

ALICE = KeyOwner(
    user_id="alice",
    key_doc_id="key-alice",
    key_active=True,
    key_expires_at=None,
    user={"_id": "alice", "creditsNew": Decimal(5), "credits": Decimal(3)},
)


def authenticated(f: http.HTTPFlow, *, key_cached: bool = False) -> Authenticated:
    request = f.request
    canonical = read_request(request, reverse=False)
    route = TEST_CONFIG.route(canonical.host, canonical.port, f.client_conn.sockname[1])
    assert route is not None
    return admission.authenticated(request, canonical, route, ALICE, KEY, key_cached=key_cached)


def quoted(f: http.HTTPFlow) -> Quoted:
    """``f`` priced from its body under ``TEST_CONFIG``."""
    phase = authenticated(f)
    assert phase.api is not None
    body = json.loads(f.request.content or b"")
    model = body["model"]
    estimate = estimate_request(phase.api, body, TEST_CONFIG, phase.path, model)
    quote = resolve_price(TEST_CONFIG, model, phase.route.multiplier)
    return phases.quoted(phase, phase.api, model, estimate, quote)


def admitted(
    f: http.HTTPFlow,
    *,
    held: Decimal | None = Decimal("1"),
    output_tokens_paid: int | None = None,
    tap: StreamTap | None = None,
) -> Admitted:
    """``f`` admitted with a hold of ``held`` (None: hold-less), answered through ``tap``."""
    phase = quoted(f)
    hold = None
    if held is not None:
        hold = Hold(f.id, phase.user_id, phase.pool, {"creditsNew": held}, utcnow())
    return dataclasses.replace(phases.admitted(phase, hold, output_tokens_paid), tap=tap)
