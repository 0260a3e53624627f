import os
import tomllib
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from burnmeter import price_model
from burnmeter.config import default_config
from burnmeter.config import load_config
from burnmeter.config import parse_config
from burnmeter.exceptions import ConfigError
from burnmeter.pricing import list_price
from burnmeter.pricing import resolve_price

REPO = Path(__file__).resolve().parents[1]
POOLS = {"p": {"balance": ["credits"], "used": "creditsUsed"}}


def test_default_config_has_the_originals_two_pools():
    config = default_config()
    assert config.pools["openhands"].balance == ["creditsNew"]
    assert config.pools["ohmygpt"].balance == ["credits", "refCredits"]
    assert config.pools["ohmygpt"].name == "ohmygpt"
    default = config.default_route
    assert default is not None and (default.pool, default.multiplier) == ("ohmygpt", 1)
    assert config.route("any.example", None, None) is default  # a first request works
    assert config.timezone == "Asia/Ho_Chi_Minh"
    assert config.unknown_model == "reject"


def test_example_file_loads_with_exact_prices():
    config = load_config(REPO / "burnmeter.example.toml")
    model_id, model = config.model("claude-sonnet-4-5")
    assert model_id == "claude-sonnet-4-5-20250929"
    assert model.price == list_price(model_id)  # tiers and all, inherited
    assert config.route("chat.trollllm.xyz", 443, None).multiplier == Decimal("1.02")
    assert config.route("CHAT2.trollllm.xyz", None, None).pool == "ohmygpt"
    assert config.route("elsewhere.example", None, None) is None  # refused: 421


def test_readme_price_example_loads_with_what_it_says() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Money and usage", 1)[1]
    example = section.split("```toml\n", 1)[1].split("```", 1)[0]
    config = parse_config(tomllib.loads(example))
    _, own = config.model("acme-omni")
    assert own.price.rate("web_search") == Decimal("0.01")
    assert own.price.rate("output_image") == Decimal(40)
    assert own.price.rate("input", "priority") == Decimal("3.5")
    assert price_model.applicable_rate(own.price.rate("input"), 200_001) == Decimal(4)
    assert own.price.rate("cache_audio_read") == Decimal(16)  # its input_audio rate
    _, inherited = config.model("my-sonnet")
    assert inherited.price.rate("output") == Decimal(12)
    assert price_model.applicable_rate(inherited.price.rate("input"), 200_001) == Decimal(6)
    assert inherited.price.rate("web_search") == Decimal("0.01")  # $10 per 1,000


def test_route_by_port_and_host_with_port():
    config = parse_config(
        {
            "pools": POOLS,
            "routes": [{"listen_port": 8005, "pool": "p"}, {"host": "a.test:8443", "pool": "p"}],
        }
    )
    assert config.route("x", None, 8005) is config.routes[0]
    assert config.route("a.test", 8443, 1) is config.routes[1]
    assert config.route("a.test", 443, 1) is None


PRICED = {"input": 1, "output": 2}  # a model's required rates, for cases about the others


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"colour": "blue"}, "colour: unknown key"),
        ({"timezone": "Mars/Olympus"}, "timezone: unknown time zone 'Mars/Olympus'"),
        ({"timezone": "America"}, "timezone: unknown time zone 'America'"),  # a directory
        (
            {
                "routes": [
                    {"host": "A.example", "pool": "ohmygpt"},
                    {"host": "a.example", "pool": "openhands"},
                ]
            },
            "routes.1.host: routes.0 already matches 'a.example'",
        ),
        (
            {
                "routes": [
                    {"listen_port": 8005, "pool": "ohmygpt"},
                    {"listen_port": 8005, "pool": "ohmygpt"},
                ]
            },
            "routes.1.listen_port: routes.0 already matches 8005",
        ),
        ({"log_ttl_days": 1_000_000}, "log_ttl_days: Input should be less than or equal to"),
        (
            {"routes": [{"host": "chat.example:https", "pool": "ohmygpt"}]},
            "routes.0.host: not a host or host:port: 'chat.example:https'",
        ),
        (
            {"pools": {"p": {"balance": ["_id"], "used": "u"}}},
            "pools.p.balance: '_id' is a user field of its own",
        ),
        (
            {"pools": {"p": {"balance": ["c"], "used": "createdAt"}}},
            "pools.p.used: 'createdAt' is a user field of its own",
        ),
        (
            {"pools": {"p": {"balance": ["c"], "used": "c"}}},
            "pools.p.used: 'c' is also pools.p.balance",
        ),
        (
            {
                "pools": {
                    "a": {"balance": ["credits"], "used": "aUsed"},
                    "b": {"balance": ["credits"], "used": "bUsed"},
                },
            },
            "pools.b.balance: 'credits' is also pools.a.balance",
        ),
        ({"log_ttl_days": -1}, "log_ttl_days: Input should be greater than or equal to 0"),
        (
            {"unknown_model": "free"},
            "unknown_model: Input should be 'reject', 'default' or 'list-price'",
        ),
        ({"unknown_model": "default"}, "default_price: required when unknown_model = 'default'"),
        ({"default_pool": "ohmygpt"}, "default_pool: no longer supported: name a [default_route]"),
        ({"default_route": {"pool": "ohmygpt"}}, "default_route.multiplier: required"),
        (
            {"default_route": {"pool": "zz", "multiplier": 1}},
            "default_route.pool: no pool named 'zz'",
        ),
        (
            {"default_route": {"host": "a.test", "pool": "ohmygpt", "multiplier": 1}},
            "default_route.host: not allowed (it matches every host)",
        ),
        (
            {"models": {"m": {"input": 1, "output": 1, "pool": "openhands"}}},
            "models.m.route_multiplier: required (no route bills pool 'openhands')",
        ),
        (
            {"models": {"m": {"input": 1, "output": 1, "route_multiplier": 2}}},
            "models.m.route_multiplier: only with pool",
        ),
        (
            {"models": {"big": {"input": 1, "output": 1}, " Big": {"input": 2, "output": 2}}},
            "models. Big.aliases: ' Big' is also 'big'",
        ),
        (
            {"pools": {"p": {"balance": [], "used": "u"}}},
            "pools.p.balance: List should have at least 1 item",
        ),
        (
            {"pools": {"p": {"balance": ["credits"]}}},
            "pools.p.used: Field required",
        ),
        (
            {"pools": {"p": {"balance": ["bad field"], "used": "u"}}},
            "pools.p.balance.0: String should match pattern",
        ),
        (
            {"pools": {"p": {"balance": ["c"], "used": "u", "colour": 1}}},
            "pools.p.colour: unknown key",
        ),
        ({"routes": [{"host": "a", "pool": "zz"}]}, "routes.0.pool: no pool named 'zz'"),
        (
            {"routes": [{"pool": "ohmygpt"}]},
            "routes.0: a route needs exactly one of host or listen_port",
        ),
        (
            {"routes": [{"host": "a", "listen_port": 1, "pool": "ohmygpt"}]},
            "a route needs exactly one of host or listen_port",
        ),
        (
            {"routes": [{"host": "a", "pool": "ohmygpt", "multiplier": 0}]},
            "routes.0.multiplier: Input should be greater than 0",
        ),
        (
            {"routes": [{"listen_port": 70000, "pool": "ohmygpt"}]},
            "routes.0.listen_port: Input should be less than or equal to 65535",
        ),
        ({"models": {"m": {"input": 1}}}, "models.m: output: required without list_price"),
        (
            {"models": {"m": {"list_price": "no-such-model-xyz"}}},
            "models.m: list_price: genai-prices has no model 'no-such-model-xyz'",
        ),
        (
            {"models": {"m": {**PRICED, "tiers": [{"above": 10, "input": 2}, {"above": 5}]}}},
            "models.m: tiers.1.above: tiers must be in ascending order of 'above'",
        ),
        (
            {"models": {"m": {**PRICED, "tiers": [{"above": 10}]}}},
            "models.m: tiers.0: names no rate",
        ),
        (
            {"models": {"m": {**PRICED, "tiers": [{"above": 10, "output_audio": 9}]}}},
            "models.m: tiers.0.output_audio: no flat output_audio rate for it to replace",
        ),
        (
            # a longer prompt would cost less: padding a prompt would buy a discount
            {"models": {"m": {**PRICED, "tiers": [{"above": 10, "input": "0.5"}]}}},
            "models.m: tiers.0.input: lower than the rate below it",
        ),
        (
            {"models": {"m": {**PRICED, "tiers": [{"above": -1, "input": 2}]}}},
            "models.m.tiers.0.above: Input should be greater than or equal to 0",
        ),
        (
            {"models": {"m": {**PRICED, "service_tiers": {"flex": {"inptu": 1}}}}},
            "models.m.service_tiers.flex.inptu: unknown key",
        ),
        (
            {"models": {"m": {**PRICED, "web_search": -0.01}}},
            "models.m.web_search: Input should be greater than or equal to 0",
        ),
        (
            {"models": {"m": {"input": -1, "output": 1}}},
            "models.m.input: Input should be greater than or equal to 0",
        ),
        (
            {"models": {"m": {"input": "cheap", "output": 1}}},
            "models.m.input: Input should be a valid decimal",
        ),
        (
            {"models": {"m": {"input": 1, "output": 1, "pool": "zz"}}},
            "models.m.pool: no pool named 'zz'",
        ),
        (
            {
                "models": {
                    "a": {"input": 1, "output": 1},
                    "b": {"input": 1, "output": 1, "aliases": ["a"]},
                }
            },
            "models.b.aliases: 'a' is also 'a'",
        ),
        ({"default_max_output_tokens": 0}, "default_max_output_tokens: Input should be"),
        (
            {"models": {"m": {"input": 1, "output": 1, "max_output_tokens": 10**10}}},
            "models.m.max_output_tokens: Input should be",
        ),
        ({"cap_output_tokens": "maybe"}, "cap_output_tokens: Input should be"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(data, message):
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    text = str(e.value)
    assert "\n" not in text
    assert text.startswith(message) or message in text


def test_bad_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("pools = [")
    with pytest.raises(ConfigError, match="bad.toml: "):
        load_config(bad)
    with pytest.raises(ConfigError, match="missing.toml: No such file"):
        load_config(tmp_path / "missing.toml")


def test_world_writable_config_refused(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('timezone = "UTC"\n')
    os.chmod(path, 0o666)
    with pytest.raises(ConfigError, match="world-writable"):
        load_config(path)
    os.chmod(path, 0o644)
    assert load_config(path).timezone == "UTC"


# -- names as clients spell them -------------------------------------------------------------
MODELS = {
    "big-model": {"input": 30, "output": 60, "aliases": ["Big"]},
    "small": {"input": 1, "output": 2},
}


def respelt(name: str) -> st.SearchStrategy[str]:
    """``name`` in any case, characters percent-encoded or not, with spaces around."""
    chars = st.tuples(
        *(st.sampled_from([c.lower(), c.upper(), f"%{ord(c):02X}", f"%{ord(c):02x}"]) for c in name)
    ).map("".join)
    spaces = st.sampled_from(["", " ", "\t", "  "])
    return st.tuples(spaces, chars, spaces).map("".join)


NAMES = {"big-model": "big-model", "Big": "big-model", "small": "small"}


@settings(deadline=None)  # no timing asserted: a loaded machine is slow
@given(st.sampled_from(sorted(NAMES)).flatmap(lambda n: st.tuples(st.just(n), respelt(n))))
def test_a_respelt_model_name_is_priced_as_that_model(names: tuple[str, str]) -> None:
    name, spelt = names
    found = parse_config({"models": MODELS}).model(spelt)
    assert found is not None and found[0] == NAMES[name]


@settings(deadline=None)  # no timing asserted: a loaded machine is slow
@given(
    st.lists(st.sampled_from(["a.test", "b.test", "c.test"]), min_size=1, max_size=3, unique=True),
    st.sampled_from(["a.test", "b.test", "c.test", "d.test"]),
    st.booleans(),
    st.booleans(),
)
def test_a_route_matches_its_host_in_any_case_and_with_a_trailing_dot(
    hosts: list[str], called: str, upper: bool, dot: bool
) -> None:
    config = parse_config(
        {
            "routes": [
                {"host": (h.upper() if upper else h) + ("." if dot else ""), "pool": "ohmygpt"}
                for h in hosts
            ]
        }
    )
    route = config.route(called, None, None)
    if called in hosts:
        assert route is not None and route.host == called
    else:
        assert route is None


@settings(deadline=None)  # no timing asserted: a loaded machine is slow
@given(
    st.lists(st.decimals("1", "3", places=2), min_size=1, max_size=4),
    st.sampled_from(["openhands", "ohmygpt"]),
)
def test_a_pool_override_bills_at_the_dearest_multiplier_of_its_pool(
    multipliers: list[Decimal], pool: str
) -> None:
    routes = [
        {"host": f"h{i}.test", "pool": "ohmygpt" if i % 2 else "openhands", "multiplier": m}
        for i, m in enumerate(multipliers)
    ]
    billing = [Decimal(m) for i, m in enumerate(multipliers) if (i % 2 == 1) == (pool == "ohmygpt")]
    data = {"routes": routes, "models": {"m": {"input": 1, "output": 1, "pool": pool}}}
    if not billing:
        with pytest.raises(ConfigError, match="route_multiplier: required"):
            parse_config(data)
        return
    config = parse_config(data)
    for route in config.routes:  # whichever host is called
        quote = resolve_price(config, "m", route.multiplier)
        assert quote.multiplier == max(billing)


def test_output_limits_per_model_with_a_default():
    config = parse_config(
        {
            "default_max_output_tokens": 2000,
            "models": {
                "long": {
                    "aliases": ["long-latest"],
                    "input": 1,
                    "output": 1,
                    "max_output_tokens": 64000,
                },
                "short": {"input": 1, "output": 1},
            },
        }
    )
    assert config.cap_output_tokens is True
    assert config.max_output_tokens("long-latest") == 64000
    assert config.max_output_tokens("short") == 2000
    assert config.max_output_tokens("unpriced") == 2000
    assert config.max_output_tokens(None) == 2000
    assert default_config().default_max_output_tokens == 8192
