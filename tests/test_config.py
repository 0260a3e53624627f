import os
from decimal import Decimal
from pathlib import Path

import pytest

from burnmeter.config import ConfigError
from burnmeter.config import default_config
from burnmeter.config import load_config
from burnmeter.config import parse_config

REPO = Path(__file__).resolve().parents[1]
POOLS = {"p": {"balance": ["credits"], "used": "creditsUsed"}}


def test_default_config_has_the_originals_two_pools():
    config = default_config()
    assert config.pools["openhands"].balance == ["creditsNew"]
    assert config.pools["ohmygpt"].balance == ["credits", "refCredits"]
    assert config.pools["ohmygpt"].name == "ohmygpt"
    assert config.default_pool == "ohmygpt"
    assert config.timezone == "Asia/Ho_Chi_Minh"
    assert config.unknown_model == "reject"


def test_example_file_loads_with_exact_prices():
    config = load_config(REPO / "burnmeter.example.toml")
    model_id, model = config.model("claude-sonnet-4-5")
    assert model_id == "claude-sonnet-4-5-20250929"
    assert model.cache_read == Decimal("0.3")
    assert config.route("chat.trollllm.xyz", 443, None).multiplier == Decimal("1.02")
    assert config.route("CHAT2.trollllm.xyz", None, None).pool == "ohmygpt"
    assert config.route("elsewhere.example", None, None) is None


def test_route_by_port_and_host_with_port():
    config = parse_config(
        {
            "pools": POOLS,
            "default_pool": "p",
            "routes": [{"listen_port": 8005, "pool": "p"}, {"host": "a.test:8443", "pool": "p"}],
        }
    )
    assert config.route("x", None, 8005) is config.routes[0]
    assert config.route("a.test", 8443, 1) is config.routes[1]
    assert config.route("a.test", 443, 1) is None


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
            {"pools": {"p": {"balance": ["_id"], "used": "u"}}, "default_pool": "p"},
            "pools.p.balance: '_id' is a user field of its own",
        ),
        (
            {"pools": {"p": {"balance": ["c"], "used": "createdAt"}}, "default_pool": "p"},
            "pools.p.used: 'createdAt' is a user field of its own",
        ),
        (
            {"pools": {"p": {"balance": ["c"], "used": "c"}}, "default_pool": "p"},
            "pools.p.used: 'c' is also pools.p.balance",
        ),
        (
            {
                "pools": {
                    "a": {"balance": ["credits"], "used": "aUsed"},
                    "b": {"balance": ["credits"], "used": "bUsed"},
                },
                "default_pool": "a",
            },
            "pools.b.balance: 'credits' is also pools.a.balance",
        ),
        ({"log_ttl_days": -1}, "log_ttl_days: Input should be greater than or equal to 0"),
        (
            {"unknown_model": "free"},
            "unknown_model: Input should be 'reject', 'default' or 'list-price'",
        ),
        ({"unknown_model": "default"}, "default_price: required when unknown_model = 'default'"),
        ({"default_pool": "nope"}, "default_pool: no pool named 'nope'"),
        (
            {"pools": {"p": {"balance": [], "used": "u"}}, "default_pool": "p"},
            "pools.p.balance: List should have at least 1 item",
        ),
        (
            {"pools": {"p": {"balance": ["credits"]}}, "default_pool": "p"},
            "pools.p.used: Field required",
        ),
        (
            {"pools": {"p": {"balance": ["bad field"], "used": "u"}}, "default_pool": "p"},
            "pools.p.balance.0: String should match pattern",
        ),
        (
            {"pools": {"p": {"balance": ["c"], "used": "u", "colour": 1}}, "default_pool": "p"},
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
        ({"models": {"m": {"input": 1}}}, "models.m.output: Field required"),
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
