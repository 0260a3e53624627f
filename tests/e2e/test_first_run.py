"""A new user's first run on real processes: ``make run`` and the OpenAI SDK on the
built-in config, start-up errors as one line, mitmweb beside mitmdump on one store."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from burnmeter.config import default_config
from burnmeter.store.sqlite import SqliteStore
from scripts.processes import START_TIMEOUT
from scripts.processes import free_port
from scripts.processes import stop_process
from scripts.processes import wait_for_line
from tests.e2e.harness import MITMDUMP
from tests.e2e.harness import READY
from tests.e2e.harness import ROOT
from tests.e2e.harness import Proxy
from tests.e2e.harness import Upstream

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

SCRIPT = str(ROOT / "addons" / "metering.py")
MITMWEB = MITMDUMP.with_name("mitmweb")
BURNMETER = MITMDUMP.with_name("burnmeter")


class Process:
    """One process under test, its output in a file; stopped by its own process group."""

    def __init__(self, args: list[str], workdir: Path, name: str, **env: str) -> None:
        self.out = workdir / f"{name}.out"
        with self.out.open("wb") as out:
            self.proc = subprocess.Popen(
                args,
                cwd=workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                start_new_session=True,  # make's child goes with it
            )

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def ready_line(self) -> str:
        wait_for_line(self.proc, self.output, READY)
        return next(line for line in self.output().splitlines() if READY in line)

    def stop(self) -> int:
        return stop_process(self.proc, group=True)


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for p in started:
        p.stop()


def burnmeter(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [str(BURNMETER), *args]
    env = {key: value for key, value in os.environ.items() if key != "BURNMETER_CONFIG"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def created_key(db: Path, user: str, *pools: str) -> str:
    """``burnmeter accounts create`` (the store is created), the key it printed once."""
    grants = [arg for pool in pools for arg in ("--pool", pool)]
    result = burnmeter(
        "--db", f"sqlite:///{db}", "accounts", "create", user, *grants, "--format", "json",
        cwd=db.parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return str(json.loads(result.stdout)["key"])


# -- make run + the official SDK ---------------------------------------------------------
def test_make_run_serves_the_openai_sdk_on_the_built_in_config(
    upstream: Upstream, tmp_path: Path, processes: list[Process]
) -> None:
    if (ROOT / "burnmeter.toml").exists():
        pytest.skip("./burnmeter.toml in the checkout would be the config, not the built-in one")
    db = tmp_path / "first.db"
    key = created_key(db, "newcomer", "ohmygpt=5", "openhands=5")
    port = free_port()
    venv = Path(sys.executable).parent.parent
    args = [
        f"--mode reverse:{upstream.base_url}@{port}",
        f"--set metering_db=sqlite:///{db}",
    ]
    make = Process(
        # -o: never reinstall from inside a test (pyproject.toml may be newer than the venv)
        ["make", "-C", str(ROOT), "-o", f"{venv}/.installed", "run", f"VENV={venv}",
         f"ARGS={' '.join(args)}"],
        tmp_path,
        "make",
        BURNMETER_CONFIG="",
    )  # fmt: skip
    processes.append(make)
    ready = make.ready_line()
    assert "config built-in" in ready and f"listening on 127.0.0.1:{port}" in ready

    client = openai.OpenAI(api_key=key, base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)
    answer = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}]
    )
    assert answer.choices[0].message.content
    assert answer.usage is not None

    logs = burnmeter("--db", f"sqlite:///{db}", "logs", "--format", "json", cwd=tmp_path)
    assert logs.returncode == 0, logs.stderr
    (log,) = json.loads(logs.stdout)
    assert (log["userId"], log["model"], log["statusCode"]) == ("newcomer", "gpt-4o-mini", 200)
    price = default_config().models["gpt-4o-mini"]
    assert log["creditsCost"] > 0 and price.price.rate("input")  # list price, never free


def test_an_unpriced_model_is_refused_naming_the_config_key(proxy: Proxy, tmp_path: Path) -> None:
    key = created_key(proxy.db_path, "unpriced-caller", "openhands=1")
    client = openai.OpenAI(
        api_key=key,
        base_url=proxy.base_url + "/v1",
        max_retries=0,
        default_headers={"Host": "openhands.test"},
    )
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gpt-7-turbo", messages=[])
    assert "'gpt-7-turbo'" in str(e.value) and '[models."gpt-7-turbo"]' in str(e.value)


# -- start-up errors -----------------------------------------------------------------------
def start_up_output(tmp_path: Path, *sets: str, **env: str) -> tuple[int, list[str]]:
    """mitmdump's exit status and its lines, for a start that must fail."""
    args = [str(MITMDUMP), "--listen-host", "127.0.0.1", "-p", str(free_port()), "-s", SCRIPT]
    for option in sets:
        args += ["--set", option]
    done = subprocess.run(
        args,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        env={**os.environ, **env},
    )
    lines = (done.stdout + done.stderr).splitlines()
    return done.returncode, [line for line in lines if "Loading script" not in line]


@pytest.mark.parametrize(
    "case, sets, expected",
    [
        (
            "bad config",
            ["metering_config=bad.toml"],
            r"mitmdump: metering_config: bad\.toml: default_route\.pool: no pool named 'nope'",
        ),
        (
            "not a database",
            ["metering_db=sqlite:///notes.txt"],
            r"mitmdump: metering_db: notes\.txt: file is not a database",
        ),
        (
            "store not writable",
            ["metering_db=sqlite:////proc/burnmeter.db"],
            r"mitmdump: metering_db: /proc/burnmeter\.db: unable to open database file",
        ),
        (
            "misspelt option",
            ["metering_jornal=x.journal"],
            r"mitmdump: metering_jornal: no such option \(did you mean metering_journal\?\)",
        ),
        (
            "journal not writable",
            ["metering_journal=/proc/burnmeter.journal"],
            r"mitmdump: metering_journal: /proc/burnmeter\.journal: .+",
        ),
    ],
)
def test_a_start_up_error_is_one_line_and_a_non_zero_exit(
    tmp_path: Path, case: str, sets: list[str], expected: str
) -> None:
    (tmp_path / "bad.toml").write_text('[default_route]\npool = "nope"\nmultiplier = 1\n')
    (tmp_path / "notes.txt").write_text("not a database\n")
    code, lines = start_up_output(tmp_path, *sets)
    assert code != 0, case
    assert len(lines) == 1, lines
    assert re.fullmatch(expected, lines[0]), lines


def test_a_journal_in_use_is_one_line(proxy: Proxy, tmp_path: Path) -> None:
    code, lines = start_up_output(
        tmp_path, f"metering_db={proxy.db_url}", f"metering_journal={proxy.journal_path}"
    )
    assert code != 0
    assert lines == [
        f"mitmdump: metering_journal: {proxy.journal_path} is in use by another burnmeter"
        " process (give each process its own journal)"
    ]


# -- mitmweb beside mitmdump -----------------------------------------------------------------
def journal_of(ready: str) -> str:
    found = re.search(r", journal (.+?), listening on ", ready)
    assert found, ready
    return found.group(1)


def test_mitmweb_beside_mitmdump_on_one_store_each_with_its_own_journal(
    upstream: Upstream, tmp_path: Path, processes: list[Process]
) -> None:
    db = tmp_path / "shared.db"
    key = created_key(db, "watcher", "ohmygpt=5")
    dump_port, web_proxy_port, web_port = free_port(), free_port(), free_port()
    common = ["--listen-host", "127.0.0.1", "-s", SCRIPT, "--set", f"metering_db=sqlite:///{db}"]
    dump_args = [str(MITMDUMP), *common, "--mode", f"reverse:{upstream.base_url}@{dump_port}"]
    web_args = [str(MITMWEB), *common, "--mode", f"reverse:{upstream.base_url}@{web_proxy_port}"]
    web_args += ["--set", f"web_port={web_port}", "--set", "web_open_browser=false"]
    web_args += ["--set", "web_password=watch"]
    dump = Process(dump_args, tmp_path, "mitmdump")
    processes.append(dump)
    dump_journal = journal_of(dump.ready_line())
    web = Process(web_args, tmp_path, "mitmweb")
    processes.append(web)
    web_journal = journal_of(web.ready_line())
    assert dump_journal != web_journal
    assert (tmp_path / dump_journal).exists() and (tmp_path / web_journal).exists()

    for port in (dump_port, web_proxy_port):
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            timeout=10,
        )
        assert r.status_code == 200, r.text

    # mitmdump prints the flow's line at its default verbosity
    wait_for_line(dump.proc, dump.output, "metering: watcher · gpt-4o-mini · ")
    line = next(x for x in dump.output().splitlines() if "metering: watcher" in x)
    assert re.search(r" · \$0\.0*[1-9]\d\d · ohmygpt$", line), line  # 3 significant digits

    # mitmweb shows the Comment column, and the flow's comment
    web_api = httpx.Client(
        base_url=f"http://127.0.0.1:{web_port}", headers={"Authorization": "Bearer watch"}
    )
    options = web_api.get("/options.json").json()
    assert "comment" in options["web_columns"]["value"]
    (flow,) = web_api.get("/flows").json()
    assert flow["comment"].startswith("watcher · gpt-4o-mini · ")

    # a restart finds its own journal again
    assert web.stop() == 0
    again = Process(web_args, tmp_path, "mitmweb-again")
    processes.append(again)
    assert journal_of(again.ready_line()) == web_journal

    store = SqliteStore(db, default_config().pools)
    try:
        assert len(store.logs(10, "watcher")) == 2
    finally:
        store.close()
