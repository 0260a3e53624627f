"""The TOML config file (SPEC "Interfaces"), validated once into typed state.

``load_config(path)`` returns a ``Config``; any unknown key or bad value raises
``ConfigError`` whose message is one line naming the key.
"""

from __future__ import annotations

import os
import stat
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Annotated
from typing import Literal
from zoneinfo import ZoneInfo
from zoneinfo import ZoneInfoNotFoundError

from pydantic import BaseModel
from pydantic import ConfigDict
from pydantic import Field
from pydantic import ValidationError
from pydantic import field_validator
from pydantic import model_validator

DEFAULT_DB_PATH = "burnmeter.db"
DEFAULT_DB_URL = f"sqlite:///{DEFAULT_DB_PATH}"

FieldName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
PositiveDecimal = Annotated[Decimal, Field(gt=0)]
OutputLimit = Annotated[int, Field(ge=1, le=10**9)]  # estimate.MAX_COUNT: pricing's precision
DEFAULT_MAX_OUTPUT_TOKENS = 8192
"""Output tokens held for (and allowed to) a request without a limit, whose model sets none."""
Price = Annotated[Decimal, Field(ge=0)]


def iana_zone(name: str) -> ZoneInfo | None:
    """The IANA time zone ``name``, or None if there is none by that name."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # "America" is a directory
        return None


class ConfigError(ValueError):
    """A config problem, as one line naming the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Pool(_Strict):
    """A named balance in the user document: spent in ``balance`` order."""

    name: str = ""
    balance: list[FieldName] = Field(min_length=1)
    used: FieldName
    tokens: FieldName | None = None
    expires: FieldName | None = None


class Route(_Strict):
    """Which pool a client-facing host (or listen port) bills, and at what multiplier."""

    host: str | None = None
    listen_port: int | None = Field(default=None, ge=1, le=65535)
    pool: str
    multiplier: PositiveDecimal = Decimal(1)
    upstream_key_env: str | None = None
    rate_limit_rpm: int | None = Field(default=None, ge=1)

    @field_validator("host")
    @classmethod
    def _host_and_port(cls, value: str | None) -> str | None:
        if value is not None:
            name, colon, port = value.partition(":")
            if not name or (colon and not (port.isdigit() and 1 <= int(port) <= 65535)):
                raise ValueError(f"not a host or host:port: {value!r}")
        return value

    @model_validator(mode="after")
    def _one_matcher(self) -> Route:
        if (self.host is None) == (self.listen_port is None):
            raise ValueError("a route needs exactly one of host or listen_port")
        return self

    def matches(self, host: str, port: int | None, listen_port: int | None) -> bool:
        if self.listen_port is not None:
            return self.listen_port == listen_port
        assert self.host is not None
        want_host, _, want_port = self.host.lower().partition(":")
        if want_host != host.lower():
            return False
        return not want_port or (port is not None and int(want_port) == port)


class DefaultPrice(_Strict):
    input: Price
    output: Price
    cache_write: Price | None = None
    cache_write_1h: Price | None = None
    cache_read: Price | None = None


class ModelPrice(_Strict):
    """USD per million tokens for one model."""

    aliases: list[str] = []
    input: Price
    output: Price
    cache_write: Price | None = None
    cache_write_1h: Price | None = None
    cache_read: Price | None = None
    pool: str | None = None
    multiplier: PositiveDecimal = Decimal(1)
    max_output_tokens: OutputLimit | None = None
    """The most the model generates in one completion: what a request without an output
    limit of its own is held for (and, with ``cap_output_tokens``, limited to)."""


class Config(_Strict):
    db: str = DEFAULT_DB_URL
    timezone: str = "Asia/Ho_Chi_Minh"
    log_ttl_days: int = Field(default=30, ge=0, le=36500)
    default_pool: str = "ohmygpt"
    unknown_model: Literal["reject", "default", "list-price"] = "reject"
    default_price: DefaultPrice | None = None
    key_cache_seconds: int = Field(default=30, ge=0)
    hold_sweep_minutes: int = Field(default=60, ge=1, le=525600)
    default_max_output_tokens: OutputLimit = DEFAULT_MAX_OUTPUT_TOKENS
    cap_output_tokens: bool = True
    """Cap the forwarded request's output limit at what its hold pays for."""
    max_request_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    rate_limit_rpm: int | None = Field(default=None, ge=1)
    pools: dict[str, Pool] = Field(default_factory=dict, min_length=1, validate_default=True)
    routes: list[Route] = []
    models: dict[str, ModelPrice] = {}

    @model_validator(mode="before")
    @classmethod
    def _default_pools(cls, data: object) -> object:
        if isinstance(data, dict) and "pools" not in data:
            return {**data, "pools": DEFAULT_POOLS}
        return data

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        if iana_zone(value) is None:
            raise ValueError(f"unknown time zone {value!r}")
        return value

    @field_validator("pools")
    @classmethod
    def _name_pools(cls, pools: dict[str, Pool]) -> dict[str, Pool]:
        return {name: pool.model_copy(update={"name": name}) for name, pool in pools.items()}

    @model_validator(mode="after")
    def _references(self) -> Config:
        if self.default_pool not in self.pools:
            raise ValueError(f"default_pool: no pool named {self.default_pool!r}")
        claimed: dict[str, str] = {}
        for name, pool in self.pools.items():
            for key, field in _pool_fields(pool):
                if field in RESERVED_USER_FIELDS:
                    raise ValueError(f"pools.{name}.{key}: {field!r} is a user field of its own")
                if field in claimed:
                    raise ValueError(f"pools.{name}.{key}: {field!r} is also {claimed[field]}")
                claimed[field] = f"pools.{name}.{key}"
        matchers: dict[tuple[str, object], int] = {}  # a second route for one match is dead
        for i, route in enumerate(self.routes):
            if route.pool not in self.pools:
                raise ValueError(f"routes.{i}.pool: no pool named {route.pool!r}")
            key, matcher = (
                ("host", route.host.lower()) if route.host else ("listen_port", route.listen_port)
            )
            if (key, matcher) in matchers:
                first = matchers[key, matcher]
                raise ValueError(f"routes.{i}.{key}: routes.{first} already matches {matcher!r}")
            matchers[key, matcher] = i
        seen: dict[str, str] = {}
        for model_id, model in self.models.items():
            if model.pool is not None and model.pool not in self.pools:
                raise ValueError(f"models.{model_id}.pool: no pool named {model.pool!r}")
            for name in [model_id, *model.aliases]:
                if name in seen and seen[name] != model_id:
                    raise ValueError(f"models.{model_id}.aliases: {name!r} is also {seen[name]!r}")
                seen[name] = model_id
        if self.unknown_model == "default" and self.default_price is None:
            raise ValueError("default_price: required when unknown_model = 'default'")
        return self

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def model(self, name: str) -> tuple[str, ModelPrice] | None:
        """The configured model for an id or alias: (canonical id, prices)."""
        if name in self.models:
            return name, self.models[name]
        for model_id, model in self.models.items():
            if name in model.aliases:
                return model_id, model
        return None

    def max_output_tokens(self, model: str | None) -> int:
        """The output limit of a request that names none: the model's, else the default."""
        found = self.model(model) if model is not None else None
        if found is not None and found[1].max_output_tokens is not None:
            return found[1].max_output_tokens
        return self.default_max_output_tokens

    def route(self, host: str, port: int | None, listen_port: int | None) -> Route | None:
        for route in self.routes:
            if route.matches(host, port, listen_port):
                return route
        return None


RESERVED_USER_FIELDS = frozenset(
    {"_id", "isActive", "role", "apiKey", "createdAt", "totalInputTokens", "totalOutputTokens"}
)
"""usersNew fields with a meaning of their own: no pool may name them."""


def _pool_fields(pool: Pool) -> list[tuple[str, str]]:
    """(key, field) for every user field the pool names."""
    named = [("balance", field) for field in pool.balance] + [("used", pool.used)]
    named += [(key, field) for key in ("tokens", "expires") if (field := getattr(pool, key))]
    return named


DEFAULT_POOLS = {
    "openhands": {
        "balance": ["creditsNew"],
        "used": "creditsNewUsed",
        "tokens": "tokensUserNew",
        "expires": "expiresAtNew",
    },
    "ohmygpt": {
        "balance": ["credits", "refCredits"],
        "used": "creditsUsed",
        "expires": "expiresAt",
    },
}


def default_config() -> Config:
    """The built-in config: the original's two pools, no routes, no prices."""
    return Config.model_validate({"pools": DEFAULT_POOLS})


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    message = first["msg"].removeprefix("Value error, ")
    return f"{key}: {message}" if key else message


def parse_config(data: dict[str, object]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from None


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read and validate a TOML config; None gives the built-in default."""
    if path is None:
        return default_config()
    file = Path(path)
    try:
        mode = file.stat().st_mode
        text = file.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{file}: {e.strerror}") from None
    if mode & stat.S_IWOTH:
        raise ConfigError(f"{file}: world-writable config file refused (chmod o-w)")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{file}: {e}") from None
    try:
        return parse_config(data)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None
