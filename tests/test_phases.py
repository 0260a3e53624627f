"""addons/phases.py: each phase extends the one before it, unchanged, and holds no key."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

import pytest

from addons import phases
from addons.phases import Admitted
from addons.phases import Authenticated
from addons.phases import Quoted
from addons.streamtap import StreamTap
from burnmeter.documents import utcnow
from burnmeter.store.base import Hold
from tests.addon_support import KEY
from tests.addon_support import OPENHANDS_HOST
from tests.addon_support import make_flow
from tests.phase_support import authenticated
from tests.phase_support import quoted


def fields_of(record: object, phase: type) -> dict[str, object]:
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(phase)}


def test_a_quote_extends_the_authenticated_phase_and_its_pool_may_pay() -> None:
    f = make_flow()
    before = authenticated(f)
    priced = quoted(f)
    assert before.pool == "openhands" and priced.pool == "openhands", "the route's pool"
    assert fields_of(priced, Authenticated) == fields_of(before, Authenticated)
    assert priced.model == "gpt-4o" and priced.quote.model == "gpt-4o"
    # "special" names a pool of its own: it pays, whichever route was called
    special = make_flow(body={"model": "special", "messages": []})
    own = quoted(special)
    assert own.quote.pool == "ohmygpt" and own.pool == "ohmygpt"
    assert authenticated(special).pool == "openhands"


def test_admission_extends_the_quote() -> None:
    f = make_flow(body={"model": "gpt-4o", "messages": [], "stream": True})
    priced = quoted(f)
    hold = Hold(f.id, "alice", priced.pool, {"creditsNew": Decimal("0.5")}, utcnow())
    admitted = phases.admitted(priced, hold, 321)
    assert isinstance(admitted, Quoted) and isinstance(admitted, Authenticated)
    assert fields_of(admitted, Quoted) == fields_of(priced, Quoted)
    assert (admitted.hold, admitted.output_tokens_paid, admitted.tap) == (hold, 321, None)
    assert admitted.stream and not quoted(make_flow()).stream
    tap = StreamTap("openai.chat")
    answered = phases.answered(admitted, tap)
    assert answered.tap is tap and admitted.tap is None, "a new record"
    assert fields_of(answered, Admitted) == fields_of(admitted, Admitted) | {"tap": tap}


def test_phases_are_immutable() -> None:
    priced = quoted(make_flow())
    admitted = phases.admitted(priced, None, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        priced.pool = "ohmygpt"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        admitted.hold = None  # type: ignore[misc]
    assert not hasattr(admitted, "__dict__"), "slots: nothing kept on the side"


def test_no_phase_holds_the_client_key() -> None:
    f = make_flow()
    admitted = phases.admitted(quoted(f), None, None)
    assert admitted.host == OPENHANDS_HOST and admitted.key_mask
    values = [repr(getattr(admitted, field.name)) for field in dataclasses.fields(Admitted)]
    assert values and not any(KEY in value for value in values)
    assert KEY not in repr(admitted)
