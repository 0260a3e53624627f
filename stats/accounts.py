"""``burnmeter accounts``: create users and their keys, top up pools, list, show, disable,
enable, rotate a key."""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from datetime import timedelta
from decimal import Decimal
from decimal import InvalidOperation
from typing import Any

import click

from burnmeter.config import Pool
from burnmeter.documents import hash_key
from burnmeter.documents import new_key
from burnmeter.documents import utcnow
from burnmeter.exceptions import UserExists
from burnmeter.money import PRECISION
from burnmeter.store.base import Document
from stats.context import Context
from stats.exceptions import UserError
from stats.output import emit_record
from stats.output import emit_rows
from stats.output import format_option

MAX_AMOUNT = Decimal(1_000_000_000)  # keeps nano-USD within a 64-bit integer


class Amount(click.ParamType):
    """USD: a positive decimal with at most 9 decimal places (nano-USD)."""

    name = "USD"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> Decimal:
        if isinstance(value, Decimal):
            return value
        try:
            amount = Decimal(str(value).strip())
        except InvalidOperation:
            self.fail(f"{value!r} is not a decimal number of USD", param, ctx)
        if not amount.is_finite() or amount <= 0:
            self.fail(f"{value!r} is not a positive amount", param, ctx)
        if amount > MAX_AMOUNT:
            self.fail(f"{value!r} is more than {MAX_AMOUNT} USD", param, ctx)
        if amount != amount.quantize(PRECISION):
            self.fail(f"{value!r} has more than 9 decimal places", param, ctx)
        return amount


class PoolAmount(click.ParamType):
    """``NAME=AMOUNT``: a pool name and USD."""

    name = "NAME=AMOUNT"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, Decimal]:
        if isinstance(value, tuple):
            return value
        name, sep, amount = str(value).partition("=")
        if not sep or not name:
            self.fail(f"{value!r} is not NAME=AMOUNT (e.g. openhands=5)", param, ctx)
        return name, Amount().convert(amount, param, ctx)


expires_option = click.option(
    "--expires-days",
    type=click.IntRange(min=1, max=36500),
    metavar="N",
    help="Credits of the named pool(s) expire N days from now (sets the pool's `expires` "
    "field; a pool configured without one never expires). Without it, no expiry is set "
    "or changed.",
)


def pool_named(state: Context, name: str, option: str) -> Pool:
    pools = state.config.pools
    if name not in pools:
        raise click.BadParameter(
            f"unknown pool {name!r} (pools: {', '.join(pools)})", param_hint=f"'{option}'"
        )
    return pools[name]


def expiry(pools: Iterable[Pool], days: int | None) -> dict[str, datetime]:
    """The expiry fields to set: ``days`` from now on every pool that has one."""
    if days is None:
        return {}
    at = utcnow() + timedelta(days=days)
    fields = {pool.expires: at for pool in pools if pool.expires}
    if not fields:
        raise click.BadParameter(
            "needs a --pool configured with an `expires` field", param_hint="'--expires-days'"
        )
    return fields


@contextmanager
def known(user: str) -> Iterator[None]:
    """The store's ``KeyError`` for an unknown user, as a one-line error."""
    try:
        yield
    except KeyError:
        raise unknown(user) from None


def unknown(user: str) -> UserError:
    return UserError(f"no user {user!r}")


def usd(amount: Decimal) -> str:
    """Exact USD, without trailing zeros."""
    return f"{amount.normalize():f}"


@click.group()
def accounts() -> None:
    """Create users and their API keys, top up credit pools, list, show, disable and
    enable users, rotate a user's key."""


@accounts.command()
@click.argument("user")
@click.option(
    "--pool",
    "grants",
    type=PoolAmount(),
    multiple=True,
    help="Credit AMOUNT USD to pool NAME (its first balance field); repeatable.",
)
@expires_option
@format_option
@click.pass_obj
def create(
    state: Context,
    user: str,
    grants: tuple[tuple[str, Decimal], ...],
    expires_days: int | None,
    fmt: str,
) -> None:
    """Create USER, active, with a new API key, and print the key.

    The key is printed this once: the store keeps only its SHA-256 hash. Pools not named
    start at 0. An existing USER is an error.
    """
    if not user or user != user.strip():
        raise click.BadParameter(f"{user!r} is not a user name", param_hint="'USER'")
    pools = [pool_named(state, name, "--pool") for name, _ in grants]
    balances: dict[str, Decimal] = {}
    for pool, (name, amount) in zip(pools, grants, strict=True):
        if pool.balance[0] in balances:
            raise click.BadParameter(f"pool {name!r} named twice", param_hint="'--pool'")
        balances[pool.balance[0]] = amount
    expires = expiry(pools, expires_days)
    key = new_key()
    store = state.new_store
    try:
        store.create_user(user, hash_key(key), balances)
    except UserExists as e:
        raise UserError(str(e)) from None
    if expires:
        store.set_fields(user, expires)
    if fmt == "table":
        click.echo(f"API key for {user} (shown once, keep it now): {key}")
    else:
        emit_record({"user": user, "key": key}, fmt)


@accounts.command()
@click.argument("user")
@click.option(
    "--pool",
    "pool_name",
    required=True,
    metavar="NAME",
    help="Pool to credit: a [pools.NAME] of the config.",
)
@click.option(
    "--amount",
    required=True,
    type=Amount(),
    help="USD to add: positive, at most 9 decimal places.",
)
@expires_option
@click.pass_obj
def topup(
    state: Context, user: str, pool_name: str, amount: Decimal, expires_days: int | None
) -> None:
    """Add AMOUNT USD to USER's pool NAME; print the pool's balance.

    The amount goes to the pool's first balance field (credits, not refCredits).
    """
    pool = pool_named(state, pool_name, "--pool")
    expires = expiry([pool], expires_days)
    store = state.store
    with known(user):
        store.topup(user, pool.balance[0], amount)
        if expires:
            store.set_fields(user, expires)
    click.echo(f"{user}: {pool.name} balance {usd(store.balance(user, pool))} USD")


@accounts.command()
@click.argument("user")
@format_option
@click.pass_obj
def show(state: Context, user: str, fmt: str) -> None:
    """Show USER: status, each pool's fields and balance.

    The user's status and role, each pool's fields (balances, spend, tokens, expiry),
    token totals, and under "balances" each pool's balance summed over its fields.
    JSON uses the document's field names (creditsNew, expiresAtNew, ...); a field the
    document lacks is null.
    """
    doc = state.read_only_store.user(user)
    if doc is None:
        raise unknown(user)
    record = account_record(doc, state.config.pools.values())
    record["balances"] = {
        pool.name: state.read_only_store.balance(user, pool) for pool in state.config.pools.values()
    }
    if fmt != "json":
        record |= {f"balances.{name}": value for name, value in record.pop("balances").items()}
    emit_record(record, fmt)


def account_record(doc: Document, pools: Iterable[Pool]) -> dict[str, Any]:
    """The fields ``accounts show`` prints, in a stable order (keys, passwords left out)."""
    names = ["_id", "isActive", "role", "createdAt"]
    for pool in pools:
        names += [*pool.balance, pool.used, pool.tokens or "", pool.expires or ""]
    names += ["totalInputTokens", "totalOutputTokens"]
    return {name: doc.get(name) for name in dict.fromkeys(names) if name}


@accounts.command("list")
@format_option
@click.pass_obj
def list_command(state: Context, fmt: str) -> None:
    """Every user: active or not, role, each pool's balance, when it was created."""
    pools = list(state.config.pools.values())
    rows = [
        {
            "user": doc["_id"],
            "active": doc.get("isActive", True) is not False,
            "role": doc.get("role"),
            **{pool.name: pool_balance(doc, pool) for pool in pools},
            "createdAt": doc.get("createdAt"),
        }
        for doc in state.read_only_store.users()
    ]
    emit_rows(rows, ["user", "active", "role", *(p.name for p in pools), "createdAt"], fmt)


def pool_balance(doc: Document, pool: Pool) -> Decimal:
    """Σ of the pool's balance fields in a user document (what ``Store.balance`` sums)."""
    values = (doc.get(name) for name in pool.balance)
    return sum((v for v in values if isinstance(v, Decimal)), Decimal(0))


@accounts.command()
@click.argument("user")
@click.pass_obj
def disable(state: Context, user: str) -> None:
    """Disable USER: the proxy refuses its keys.

    The proxy answers USER's keys with 401 once its key cache expires
    (`key_cache_seconds` in the config, 30 s by default)."""
    with known(user):
        state.store.set_fields(user, {"isActive": False})
    seconds = state.config.key_cache_seconds
    click.echo(f"{user}: disabled; the proxy refuses its keys within {seconds} s")


@accounts.command()
@click.argument("user")
@click.pass_obj
def enable(state: Context, user: str) -> None:
    """Enable USER again (after `disable`): the proxy accepts its active keys.

    Takes effect once the proxy's key cache expires (`key_cache_seconds`)."""
    with known(user):
        state.store.set_fields(user, {"isActive": True})
    seconds = state.config.key_cache_seconds
    click.echo(f"{user}: enabled; the proxy accepts its keys within {seconds} s")


@accounts.command("rotate-key")
@click.argument("user")
@format_option
@click.pass_obj
def rotate_key(state: Context, user: str, fmt: str) -> None:
    """Give USER a new API key and print it once; every key USER had stops working.

    The old keys are deactivated (kept with their counters) and the original's
    usersNew.apiKey (docs/documents.md) is removed. The proxy refuses them once its key cache expires
    (`key_cache_seconds`)."""
    key = new_key()
    with known(user):
        stopped = state.store.rotate_key(user, hash_key(key))
    seconds = state.config.key_cache_seconds
    if fmt == "table":
        click.echo(f"New API key for {user} (shown once, keep it now): {key}")
        click.echo(f"{user}: {stopped} old key(s) stop working within {seconds} s", err=True)
    else:
        emit_record({"user": user, "key": key, "keys_stopped": stopped}, fmt)
