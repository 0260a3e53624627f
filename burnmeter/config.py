"""The TOML config file (README "The config file", ``docs/routing.md``), validated once into typed state.

``load_config(path)`` returns a ``Config``; any unknown key or bad value raises
``ConfigError`` whose message is one line naming the key.
"""

from __future__ import annotations

import functools
import os
import stat
import tomllib
from dataclasses import dataclass
from datetime import UTC
from datetime import datetime
from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import Annotated
from typing import Literal
from urllib.parse import unquote
from zoneinfo import ZoneInfo
from zoneinfo import ZoneInfoNotFoundError

from pydantic import BaseModel
from pydantic import ConfigDict
from pydantic import Field
from pydantic import PrivateAttr
from pydantic import ValidationError
from pydantic import field_validator
from pydantic import model_validator

from burnmeter import price_model
from burnmeter.exceptions import ConfigError
from burnmeter.price_model import RATE_KEYS

DEFAULT_DB_PATH = "burnmeter.db"
DEFAULT_DB_URL = f"sqlite:///{DEFAULT_DB_PATH}"
ENV_CONFIG = "BURNMETER_CONFIG"
LOCAL_CONFIG = "burnmeter.toml"

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
    """Which pool a client-facing host (or listen port) bills, and at what multiplier.

    The config's ``default_route`` is a Route with neither ``host`` nor ``listen_port``: it
    bills every host no route names (without one, such hosts are refused)."""

    host: str | None = None
    listen_port: int | None = Field(default=None, ge=1, le=65535)
    pool: str
    multiplier: PositiveDecimal = Decimal(1)
    upstream_key_env: str | None = None
    rate_limit_rpm: int | None = Field(default=None, ge=1)

    @field_validator("host")
    @classmethod
    def _host_and_port(cls, value: str | None) -> str | None:
        """Stored as clients' hosts are read: lower case, no trailing dot."""
        if value is not None:
            name, colon, port = value.partition(":")
            if not name or (colon and not (port.isdigit() and 1 <= int(port) <= 65535)):
                raise ValueError(f"not a host or host:port: {value!r}")
            name = name.lower().removesuffix(".")
            if not name:
                raise ValueError(f"not a host or host:port: {value!r}")
            value = name + colon + port
        return value

    def matches(self, host: str, port: int | None, listen_port: int | None) -> bool:
        """``host`` as ``addons.canonical`` reads it (lower case, no trailing dot)."""
        if self.listen_port is not None:
            return self.listen_port == listen_port
        if self.host is None:
            return False
        want_host, _, want_port = self.host.partition(":")
        if want_host != host.lower():
            return False
        return not want_port or (port is not None and int(want_port) == port)


class Rates(_Strict):
    """USD per million tokens for each token class; server-tool fees in USD per use.

    Audio and image rates price those parts of the input or output; a rate left out is the
    rate of the class it refines (input, output or cache read).
    """

    input: Price | None = None
    output: Price | None = None
    cache_write: Price | None = None
    cache_write_1h: Price | None = None
    cache_read: Price | None = None
    input_audio: Price | None = None
    cache_audio_read: Price | None = None
    output_audio: Price | None = None
    input_image: Price | None = None
    cache_image_read: Price | None = None
    output_image: Price | None = None
    web_search: Price | None = None
    """Per web search (Anthropic, OpenAI) or grounded prompt (Gemini's Google Search)."""
    code_execution: Price | None = None

    def named(self) -> dict[str, Decimal]:
        return {key: getattr(self, key) for key in RATE_KEYS if getattr(self, key) is not None}


class PriceTier(Rates):
    """Rates that replace the flat ones when the whole prompt is longer than ``above`` tokens."""

    above: int = Field(ge=0)


class TieredRates(Rates):
    tiers: list[PriceTier] = []

    @model_validator(mode="after")
    def _tiers_rise(self) -> TieredRates:
        flat = self.named()
        below = dict(flat)
        last = -1
        for i, tier in enumerate(self.tiers):
            if tier.above <= last:
                raise ValueError(f"tiers.{i}.above: tiers must be in ascending order of 'above'")
            last = tier.above
            if not tier.named():
                raise ValueError(f"tiers.{i}: names no rate")
            for key, rate in tier.named().items():
                if key not in flat:
                    raise ValueError(f"tiers.{i}.{key}: no flat {key} rate for it to replace")
                if rate < below[key]:
                    # a longer prompt would cost less: a client could pad its way to a discount
                    raise ValueError(f"tiers.{i}.{key}: lower than the rate below it")
                below[key] = rate
        return self

    def rates(self) -> price_model.Rates:
        return price_model.Rates(
            self.named(), tuple((tier.above, tier.named()) for tier in self.tiers)
        )


class PricedRates(TieredRates):
    """Rates with replacements per service tier the provider reports (``priority``, ``flex``)."""

    service_tiers: dict[str, TieredRates] = {}
    _price: price_model.Price | None = PrivateAttr(default=None)

    def build(self, inherited: price_model.Price | None = None) -> price_model.Price:
        tiers = {name: rates.rates() for name, rates in self.service_tiers.items()}
        try:
            return price_model.build(self.rates(), tiers, inherited)
        except price_model.PriceError as e:
            raise ValueError(str(e)) from None

    @property
    def price(self) -> price_model.Price:
        """The built price (validated when the config loaded)."""
        assert self._price is not None
        return self._price


class DefaultPrice(PricedRates):
    input: Price
    output: Price

    @model_validator(mode="after")
    def _built(self) -> DefaultPrice:
        self._price = self.build()
        return self


class ModelPrice(PricedRates):
    """USD per million tokens for one model, optionally over a list price's structure."""

    aliases: list[str] = []
    list_price: str | None = None
    """A model genai-prices knows (``claude-sonnet-4-5``, ``google/gemini-2.5-pro``): its
    rates, tiers, fees and service tiers as of the config's loading, under the ones named here."""
    pool: str | None = None
    route_multiplier: PositiveDecimal | None = None
    """With ``pool``: the route multiplier this model is billed at, in place of the called
    route's; unset, the dearest multiplier among the routes that bill ``pool``."""
    multiplier: PositiveDecimal = Decimal(1)
    max_output_tokens: OutputLimit | None = None
    """The most the model generates in one completion: what a request without an output
    limit of its own is held for (and, with ``cap_output_tokens``, limited to)."""

    @model_validator(mode="after")
    def _built(self) -> ModelPrice:
        inherited = None
        if self.list_price is not None:
            listed = price_model.find_list_model(self.list_price)
            if listed is None:
                raise ValueError(f"list_price: genai-prices has no model {self.list_price!r}")
            inherited = price_model.list_price(listed, datetime.now(UTC))
        elif self.input is None or self.output is None:
            missing = "input" if self.input is None else "output"
            raise ValueError(f"{missing}: required without list_price")
        self._price = self.build(inherited)
        return self


def model_key(name: str) -> str:
    """What model names are compared by: percent-decoded, without surrounding spaces, case
    folded (``"Big "``, ``"big"`` and ``"%42ig"`` are one model to an upstream that
    normalises names, so they are one price here)."""
    return unquote(name, errors="strict").strip().casefold()


class Alert(_Strict):
    """A webhook called when a settlement takes a user's pool below ``threshold`` (and
    when it takes it to 0); ``pools`` empty: every pool."""

    kind: Literal["balance_below"]
    threshold: Annotated[Decimal, Field(ge=0)]
    pools: list[str] = []
    webhook_env: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """The environment variable holding the webhook URL (URLs often carry a secret)."""


class Config(_Strict):
    db: str = DEFAULT_DB_URL
    timezone: str = "Asia/Ho_Chi_Minh"
    log_ttl_days: int = Field(default=30, ge=0, le=36500)
    default_route: Route | None = None
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
    alerts: list[Alert] = []

    @model_validator(mode="before")
    @classmethod
    def _default_pools(cls, data: object) -> object:
        if isinstance(data, dict) and "default_pool" in data:
            raise ValueError(
                "default_pool: no longer supported: name a [default_route] with pool and"
                " multiplier (hosts no route names are refused otherwise)"
            )
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
            if (route.host is None) == (route.listen_port is None):
                raise ValueError(f"routes.{i}: a route needs exactly one of host or listen_port")
            if route.pool not in self.pools:
                raise ValueError(f"routes.{i}.pool: no pool named {route.pool!r}")
            key, matcher = (
                ("host", route.host) if route.host else ("listen_port", route.listen_port)
            )
            if (key, matcher) in matchers:
                first = matchers[key, matcher]
                raise ValueError(f"routes.{i}.{key}: routes.{first} already matches {matcher!r}")
            matchers[key, matcher] = i
        if (default := self.default_route) is not None:
            for key in ("host", "listen_port"):
                if getattr(default, key) is not None:
                    raise ValueError(f"default_route.{key}: not allowed (it matches every host)")
            if "multiplier" not in default.model_fields_set:
                raise ValueError("default_route.multiplier: required")
            if default.pool not in self.pools:
                raise ValueError(f"default_route.pool: no pool named {default.pool!r}")
        seen: dict[str, str] = {}
        for model_id, model in self.models.items():
            if model.pool is not None and model.pool not in self.pools:
                raise ValueError(f"models.{model_id}.pool: no pool named {model.pool!r}")
            if model.route_multiplier is not None and model.pool is None:
                raise ValueError(f"models.{model_id}.route_multiplier: only with pool")
            if model.pool is not None and model.route_multiplier is None:
                if not any(r.pool == model.pool for r in self._all_routes()):
                    raise ValueError(
                        f"models.{model_id}.route_multiplier: required (no route bills"
                        f" pool {model.pool!r})"
                    )
            for name in [model_id, *model.aliases]:
                try:
                    key = model_key(name)
                except UnicodeDecodeError:
                    raise ValueError(f"models.{model_id}: {name!r} is no model name") from None
                if key in seen and seen[key] != model_id:
                    raise ValueError(f"models.{model_id}.aliases: {name!r} is also {seen[key]!r}")
                seen[key] = model_id
        for i, alert in enumerate(self.alerts):
            for pool_name in alert.pools:
                if pool_name not in self.pools:
                    raise ValueError(f"alerts.{i}.pools: no pool named {pool_name!r}")
        if self.unknown_model == "default" and self.default_price is None:
            raise ValueError("default_price: required when unknown_model = 'default'")
        return self

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @cached_property
    def _model_names(self) -> dict[str, str]:
        return {
            model_key(name): model_id
            for model_id, model in self.models.items()
            for name in [model_id, *model.aliases]
        }

    def model(self, name: str) -> tuple[str, ModelPrice] | None:
        """The configured model for an id or alias, compared by ``model_key``:
        (canonical id, prices)."""
        if name in self.models:
            return name, self.models[name]
        try:
            model_id = self._model_names.get(model_key(name))
        except UnicodeDecodeError:  # a percent-escape that is no UTF-8: no model's name
            return None
        return (model_id, self.models[model_id]) if model_id is not None else None

    def max_output_tokens(self, model: str | None) -> int:
        """The output limit of a request that names none: the model's, else the default."""
        found = self.model(model) if model is not None else None
        if found is not None and found[1].max_output_tokens is not None:
            return found[1].max_output_tokens
        return self.default_max_output_tokens

    def route(self, host: str, port: int | None, listen_port: int | None) -> Route | None:
        """The route a request bills (``host`` read as ``addons.canonical`` does), else the
        default route; None: the host is refused."""
        for route in self.routes:
            if route.matches(host, port, listen_port):
                return route
        return self.default_route

    def _all_routes(self) -> list[Route]:
        return [*self.routes, *([self.default_route] if self.default_route else [])]

    def pool_multiplier(self, pool: str) -> Decimal:
        """A pool's own route multiplier: the dearest among the routes that bill it."""
        return max(r.multiplier for r in self._all_routes() if r.pool == pool)


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


DEFAULT_ROUTE = {"pool": "ohmygpt", "multiplier": 1}
"""The built-in config's default route: any host bills "ohmygpt" at x1."""


@functools.cache
def default_config() -> Config:
    """The built-in config: the original's two pools (``docs/routing.md``), a default route, and list prices for
    the models people call (``burnmeter.builtin``)."""
    from burnmeter.builtin import builtin_models  # it prices with burnmeter.pricing

    return Config.model_validate(
        {"pools": DEFAULT_POOLS, "default_route": DEFAULT_ROUTE, "models": builtin_models()}
    )


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


@dataclass(frozen=True, slots=True)
class ConfigSource:
    """Which config is in force and why: ``path`` None is the built-in config."""

    path: str | None
    origin: Literal["--config", "$BURNMETER_CONFIG", "working directory", "built-in"]

    @property
    def implicit(self) -> bool:
        return self.origin != "--config"

    def describe(self) -> str:
        if self.path is None:
            return f"built-in (no --config, ${ENV_CONFIG} or ./{LOCAL_CONFIG})"
        if self.origin == "--config":
            return self.path
        return f"{self.path} ({self.origin})"


def find_config(explicit: str | os.PathLike[str] | None) -> ConfigSource:
    """The config the CLI and the proxy use alike: the one named (``--config``,
    ``metering_config``), else $BURNMETER_CONFIG, else ./burnmeter.toml if there is one,
    else the built-in config."""
    if explicit:
        return ConfigSource(os.fspath(explicit), "--config")
    if env := os.environ.get(ENV_CONFIG):
        return ConfigSource(env, "$BURNMETER_CONFIG")
    if Path(LOCAL_CONFIG).is_file():
        return ConfigSource(LOCAL_CONFIG, "working directory")
    return ConfigSource(None, "built-in")


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
