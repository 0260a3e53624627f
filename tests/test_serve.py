"""``burnmeter serve``: the admin endpoints against the CLI on both stores (Flask's test client
over the same store the CLI reads), the token, bad queries, and the real server process over a
read-only store while another process writes."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import threading
from collections import defaultdict
from collections.abc import Callable
from collections.abc import Iterator
from datetime import UTC
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from cli_backends import Backend
from cli_backends import backend_fixture  # noqa: F401
from flask.testing import FlaskClient
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from burnmeter.config import default_config
from burnmeter.config import load_config
from burnmeter.store.sqlite import SqliteStore
from stats.admin.app import create_app
from tests.admin_seed import CONFIG
from tests.admin_seed import LOGS
from tests.admin_seed import NOW
from tests.admin_seed import NOW_PARAM
from tests.admin_seed import in_window
from tests.admin_server import BURNMETER
from tests.admin_server import TOKEN
from tests.admin_server import Server
from tests.admin_server import seed
from tests.admin_server import seeded_sqlite
from tests.admin_server import start_server

PERIODS = ["1h", "2h", "3h", "4h", "8h", "24h", "3d", "7d", "30d", "all"]
ENDPOINTS = ["user-stats", "metrics", "model-stats", "users", "series"]
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def seeded(backend: Backend, tmp_path: Path) -> Backend:
    """The seed in the backend's store; the CLI reads it with the seed's config, without a
    retention (the CLI's reports would purge the 2025 logs as older than 30 days)."""
    config = tmp_path / "seed.toml"
    config.write_text(CONFIG.replace("log_ttl_days = 1", "log_ttl_days = 0"))
    backend.options = [*backend.options, "--config", str(config)]
    store = backend.store()
    store.ensure_schema(0)
    seed(store)
    return backend


def client_for(backend: Backend, token: str = TOKEN) -> FlaskClient:
    app = create_app(backend.store(), default_config().zone, token)
    return app.test_client()


def cli_json(backend: Backend, *args: str) -> Any:
    result = backend.run(*args, "--format", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# -- the endpoints are the CLI's numbers, on both stores -----------------------------------
@pytest.mark.parametrize("period", PERIODS)
def test_endpoints_answer_what_the_cli_prints(seeded: Backend, period: str) -> None:
    client = client_for(seeded)
    query = f"period={period}&now={NOW_PARAM}"
    window = ["--period", period, "--now", NOW_PARAM]

    def get(endpoint: str, extra: str = "") -> Any:
        response = client.get(f"/admin/{endpoint}?{query}{extra}", headers=BEARER)
        assert response.status_code == 200, response.get_data(as_text=True)
        return response.get_json()

    summary = cli_json(seeded, "summary", *window)
    assert get("user-stats") == summary

    metrics = get("metrics")
    logs = [log for log in LOGS if in_window(period, log)]
    assert metrics == {
        "total_requests": summary["requests"],
        "tokens_used": sum(sum(log.tokens) for log in logs),
        "avg_latency_ms": summary["avg_latency_ms"],
        "success_rate": summary["success_rate"],
        "timestamp": "2025-03-10T10:00:00+07:00",
    }

    models = get("model-stats")["models"]
    by_cli = {
        m["model"]: {
            "model": m["model"],
            "requestCount": m["requests"],
            "inputTokens": m["input_tokens"],
            "outputTokens": m["output_tokens"],
            "cacheWriteTokens": m["cache_write_tokens"],
            "cacheHitTokens": m["cache_read_tokens"],
            "totalTokens": m["input_tokens"]
            + m["output_tokens"]
            + m["cache_write_tokens"]
            + m["cache_read_tokens"],
            "creditsBurned": m["cost"],
        }
        for m in cli_json(seeded, "models", *window)
    }
    assert {m["model"]: m for m in models} == by_cli
    totals = [m["totalTokens"] for m in models]
    assert totals == sorted(totals, reverse=True)

    spend: dict[str, dict[str, Any]] = defaultdict(dict)
    requests: dict[str, int] = defaultdict(int)
    for row in cli_json(seeded, "users", *window):
        spend[row["user"]][row["pool"]] = row["cost"]
        requests[row["user"]] += row["requests"]
    users = get("users")["users"]
    spenders = [u for u in users if u["requestCount"]]
    assert [u["userId"] for u in spenders] == list(spend)  # the CLI's order
    for u in spenders:
        assert u["burned_by_pool"] == spend[u["userId"]]
        assert u["requestCount"] == requests[u["userId"]]
    assert {u["userId"] for u in users} == {"alice", "bob", "carol", "dave", "eve"}
    alice = next(u for u in users if u["userId"] == "alice")
    assert alice["balances"] == {"openhands": 5, "ohmygpt": 12.5}

    for bucket in ("hour", "day"):
        rows = get("series", f"&bucket={bucket}")
        assert rows["bucket"] == bucket
        assert rows["series"] == cli_json(seeded, "series", *window, "--bucket", bucket)


def test_series_refuses_more_buckets_than_it_can_list(client: FlaskClient) -> None:
    response = client.get("/admin/series?period=all&now=2100-01-01&bucket=hour", headers=BEARER)
    assert response.status_code == 400
    assert "more than 10,000 hours" in response.get_json()["error"]
    page = client.get("/admin?period=all&now=9999-12-31", headers=BEARER).get_data(as_text=True)
    assert "more than 10,000 days" in page and 'data-metric="total_burned"' in page


@pytest.mark.parametrize("limit", ["0", "-1", "x", "1e3", "9" * 5000])
def test_limit_is_a_small_positive_integer(client: FlaskClient, limit: str) -> None:
    response = client.get(f"/admin/users?limit={limit}", headers=BEARER)
    assert response.status_code == 400 and "limit" in response.get_json()["error"]


def test_users_default_to_all_time_with_the_newest_log(seeded: Backend) -> None:
    client = client_for(seeded)
    response = client.get(f"/admin/users?now={NOW_PARAM}", headers=BEARER)
    body = response.get_json()
    assert body["period"] == "all"
    carol = next(u for u in body["users"] if u["userId"] == "carol")
    assert carol["creditsBurned"] == 102.75  # 100 (legacy, 2024) + 2 + 0.75
    assert carol["lastActivity"] == "2025-03-10T07:45:00+07:00"
    eve = next(u for u in body["users"] if u["userId"] == "eve")
    assert eve["lastActivity"] is None and eve["creditsBurned"] == 0
    top = client.get(f"/admin/users?now={NOW_PARAM}&limit=2", headers=BEARER).get_json()
    assert [u["userId"] for u in top["users"]] == [u["userId"] for u in body["users"][:2]]


def test_series_draws_hours_up_to_three_days_and_days_beyond(seeded: Backend) -> None:
    client = client_for(seeded)
    for period, bucket in (("3d", "hour"), ("7d", "day"), ("all", "day")):
        got = client.get(f"/admin/series?period={period}&now={NOW_PARAM}", headers=BEARER)
        assert got.get_json()["bucket"] == bucket


def test_custom_range_and_zone(seeded: Backend) -> None:
    client = client_for(seeded)
    query = "since=2025-03-09T12:00&until=2025-03-10T00:00&tz=Asia/Ho_Chi_Minh"
    body = client.get(f"/admin/user-stats?{query}", headers=BEARER).get_json()
    assert body["period"] == "custom"
    assert body["total_creditsNewUsed"] == 4.5 and body["total_credits_used"] == 0.75
    cli = cli_json(seeded, "summary", "--since", "2025-03-09T12:00", "--until", "2025-03-10T00:00")
    assert body == cli


def test_dashboard_cards_are_the_endpoint_numbers_on_mongo_too(seeded: Backend) -> None:
    client = client_for(seeded)
    page = client.get(f"/admin?period=24h&now={NOW_PARAM}", headers=BEARER)
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert 'data-metric="total_credits_used">$4.6820<' in html
    assert 'data-metric="total_creditsNewUsed">$2.5000<' in html
    assert 'data-period="24h"\n            aria-pressed="true"' in html


# -- the token --------------------------------------------------------------------------
@pytest.fixture
def client(tmp_path: Path) -> Iterator[FlaskClient]:
    _, db = seeded_sqlite(tmp_path)
    store = SqliteStore(db, default_config().pools, read_only=True)
    yield create_app(store, default_config().zone, TOKEN).test_client()
    store.close()


@pytest.mark.parametrize("path", [f"/admin/{e}" for e in ENDPOINTS] + ["/admin/static/admin.js"])
def test_no_token_no_answer(client: FlaskClient, path: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        response = client.get(path, headers=headers)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert client.get(path, headers=BEARER).status_code == 200


def test_dashboard_without_token_says_how_to_open_it(client: FlaskClient) -> None:
    response = client.get("/admin")
    assert response.status_code == 401
    assert "?token=" in response.get_data(as_text=True)


@given(st.text(max_size=40))
@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_wrong_token_is_401_never_500(client: FlaskClient, guess: str) -> None:
    if guess.strip() == TOKEN:
        return
    header = {"Authorization": f"Bearer {guess}"}
    try:
        response = client.get("/admin/metrics", headers=header)
    except ValueError:  # werkzeug refuses to send a header with a line break: no request
        return
    assert response.status_code == 401
    assert client.get("/admin/metrics", query_string={"token": guess}).status_code == 401


def test_token_in_url_becomes_a_session_and_leaves_the_url(client: FlaskClient) -> None:
    response = client.get(f"/admin?token={TOKEN}&period=1h&now={NOW_PARAM}")
    assert response.status_code == 303
    assert TOKEN not in response.headers["Location"]
    assert response.headers["Location"] == "/admin?period=1h&now=2025-03-10T10%3A00"
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    page = client.get("/admin?period=1h&now=" + NOW_PARAM)  # the cookie, no token
    assert page.status_code == 200
    assert TOKEN not in page.get_data(as_text=True)
    assert client.get("/admin/user-stats").status_code == 200
    assert page.headers["Content-Security-Policy"].startswith("default-src 'none'")


def test_a_session_of_another_token_is_refused(tmp_path: Path) -> None:
    _, db = seeded_sqlite(tmp_path)
    store = SqliteStore(db, default_config().pools, read_only=True)
    old = create_app(store, default_config().zone, "old-token").test_client()
    old.get("/admin?token=old-token")
    cookie = old.get_cookie("burnmeter_admin", path="/admin")
    assert cookie is not None
    new = create_app(store, default_config().zone, TOKEN).test_client()
    new.set_cookie("burnmeter_admin", cookie.value, path="/admin")
    assert new.get("/admin/user-stats").status_code == 401
    store.close()


# -- bad queries ------------------------------------------------------------------------
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_unknown_period_lists_the_valid_ones(client: FlaskClient, endpoint: str) -> None:
    response = client.get(f"/admin/{endpoint}?period=5h", headers=BEARER)
    assert response.status_code == 400
    assert response.get_json() == {"error": "Invalid period", "valid_periods": PERIODS}


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("tz=Mars/Olympus", "tz"),
        ("now=yesterday", "now"),
        ("since=2025-13-01", "since"),
        ("period=1h&since=2025-03-01", None),
        ("since=2025-03-02&until=2025-03-01", None),
        ("period=24h&now=0001-01-01T00:00Z", "now"),  # the local day began before year 1
    ],
)
def test_bad_window_is_400_naming_the_parameter(
    client: FlaskClient, query: str, parameter: str | None
) -> None:
    response = client.get(f"/admin/user-stats?{query}", headers=BEARER)
    assert response.status_code == 400
    body = response.get_json()
    assert body["error"] and body.get("parameter") == parameter
    page = client.get(f"/admin?{query}", headers=BEARER)
    assert page.status_code == 400
    assert 'role="alert"' in page.get_data(as_text=True)


QUERY_KEYS = st.sampled_from(["period", "tz", "now", "since", "until", "bucket", "limit"])
QUERY_VALUES = st.one_of(
    st.sampled_from([*PERIODS, "UTC", "Asia/Ho_Chi_Minh", "Pacific/Kiritimati", "hour", "day"]),
    st.sampled_from(["2025-03-10T10:00", "0001-01-01", "0001-01-01T00:00+14:00", "9999-12-31"]),
    st.sampled_from(["9999-12-31T23:59:59-14:00", "3", "0", "-1", "9" * 5000, "1e3", "２"]),
    st.text(max_size=30),
)


@given(
    query=st.dictionaries(QUERY_KEYS, QUERY_VALUES, max_size=4),
    endpoint=st.sampled_from(ENDPOINTS + [""]),
)
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_any_query_is_answered_200_or_400(
    client: FlaskClient, query: dict[str, str], endpoint: str
) -> None:
    path = f"/admin/{endpoint}" if endpoint else "/admin"
    response = client.get(path, query_string=query, headers=BEARER)
    assert response.status_code in (200, 400), response.get_data(as_text=True)
    if endpoint and response.status_code == 400:
        assert response.get_json()["error"]


# -- the real server ----------------------------------------------------------------------
@pytest.fixture
def serving() -> Iterator[Callable[..., Server]]:
    """``start_server``, with every server it started stopped at the end, failed or not."""
    started: list[Server] = []

    def start(*args: Any, **kwargs: Any) -> Server:
        started.append(start_server(*args, **kwargs))
        return started[-1]

    yield start
    for server in started:
        server.stop()


@pytest.mark.slow
def test_server_reads_without_writing_while_a_proxy_writes(
    tmp_path: Path, serving: Callable[..., Server]
) -> None:
    config, db = seeded_sqlite(tmp_path)  # log_ttl_days = 1: every seed log is older
    server = serving(config, db)
    seed_logs = sum(1 for log in LOGS if log.at < NOW)
    status, body = server.get(f"/admin/metrics?period=all&now={NOW_PARAM}")
    assert status == 200 and body["total_requests"] == seed_logs  # nothing purged
    writer = SqliteStore(db, load_config(config).pools)
    written = 200

    def write() -> None:
        for n in range(written):
            at = datetime(2025, 3, 10, 2, 0, tzinfo=UTC)
            writer.import_log({"_id": f"live-{n}", "userId": "eve", "createdAt": at})

    thread = threading.Thread(target=write)
    thread.start()
    seen = []
    while thread.is_alive() or len(seen) < 2:
        status, body = server.get(f"/admin/metrics?period=all&now={NOW_PARAM}")
        assert status == 200, body
        seen.append(body["total_requests"])
    thread.join()
    writer.close()
    assert seen == sorted(seen)
    _, body = server.get(f"/admin/metrics?period=all&now={NOW_PARAM}")
    assert body["total_requests"] == seed_logs + written
    code, stderr = server.stop()
    assert code == 0 and TOKEN not in stderr


@pytest.mark.slow
def test_server_leaves_the_store_file_alone(tmp_path: Path, serving: Callable[..., Server]) -> None:
    config, db = seeded_sqlite(tmp_path)
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    db.chmod(0o444)
    server = serving(config, db)
    for endpoint in ENDPOINTS:
        assert server.get(f"/admin/{endpoint}?period=all")[0] == 200
    server.stop()
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


@pytest.mark.slow
def test_token_from_the_environment_or_random(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serving: Callable[..., Server]
) -> None:
    config, db = seeded_sqlite(tmp_path)
    monkeypatch.setenv("BURNMETER_ADMIN_TOKEN", "from-env-7d1e")
    server = serving(config, db, token=None)
    assert server.start_line.endswith("/admin?token=from-env-7d1e")
    assert server.get("/admin/metrics", token="from-env-7d1e")[0] == 200
    server.stop()
    monkeypatch.delenv("BURNMETER_ADMIN_TOKEN")
    server = serving(config, db, token=None)
    printed = server.start_line.rsplit("token=", 1)[1]
    assert len(printed) >= 32
    assert server.start_line.startswith("burnmeter serve: http://127.0.0.1:")
    assert server.get("/admin/metrics", token=None)[0] == 401
    assert server.get("/admin/metrics", token=printed)[0] == 200
    server.stop()


def test_missing_store_is_one_line_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "nope.db"
    result = subprocess.run(
        [str(BURNMETER), "--db", f"sqlite:///{missing}", "serve", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    errors = [
        line for line in result.stderr.splitlines() if not line.startswith("burnmeter: config")
    ]
    assert len(errors) == 1 and errors[0].startswith("burnmeter: error:"), result.stderr
    assert not missing.exists()
    assert result.stdout == ""


def test_empty_token_is_refused(tmp_path: Path) -> None:
    _, db = seeded_sqlite(tmp_path)
    result = subprocess.run(
        [str(BURNMETER), "--db", f"sqlite:///{db}", "serve", "--token", " "],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "token" in result.stderr


def test_money_is_exact_in_json(seeded: Backend) -> None:
    body = client_for(seeded).get(f"/admin/user-stats?period=all&now={NOW_PARAM}", headers=BEARER)
    burned = body.get_json()["total_credits_used"]
    legacy_and_ohmygpt = sum(
        (log.cost for log in LOGS if log.pool_charged == "ohmygpt" and log.at < NOW), Decimal(0)
    )
    assert Decimal(str(burned)) == legacy_and_ohmygpt


def test_a_store_that_fails_is_503_and_a_note_on_the_page(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.db"
    sqlite3.connect(foreign).execute("CREATE TABLE other(x)").connection.close()
    store = SqliteStore(foreign, default_config().pools, read_only=True)
    client = create_app(store, default_config().zone, TOKEN).test_client()
    response = client.get("/admin/user-stats", headers=BEARER)
    assert response.status_code == 503
    assert "not a burnmeter store" in response.get_json()["error"]
    page = client.get("/admin", headers=BEARER).get_data(as_text=True)
    assert "The reports failed" in page and page.rstrip().endswith("</html>")
    store.close()


def test_no_report_outlives_a_dashboard_page_that_failed(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page whose chart's report fails still waits for the reports it started beside it:
    they read the store, which may be closed once the page is done."""
    from stats.admin import payloads

    finished: list[str] = []
    started = threading.Event()

    def failing_series(*_: Any) -> dict[str, Any]:
        started.wait(5)  # the users' report is under way when this one fails
        raise RuntimeError("series failed")

    def slow_users(*_: Any) -> dict[str, Any]:
        started.set()
        threading.Event().wait(0.3)  # still running when the series fails
        finished.append("users")
        return {"users": []}

    monkeypatch.setattr(payloads, "series", failing_series)
    monkeypatch.setattr(payloads, "users", slow_users)
    page = client.get("/admin?period=all", headers=BEARER).get_data(as_text=True)
    assert "The reports failed" in page
    assert finished == ["users"]  # done before the page ended, not after
