"""Starting and stopping the processes that tests and benchmarks put under load (127.0.0.1 only)."""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable

START_TIMEOUT = 20.0
STARTUP_GRACE = 0.3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], describe: Callable[[], str]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n{describe()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.05)
    else:
        raise RuntimeError(f"port {port} not accepting after {START_TIMEOUT}s:\n{describe()}")
    # mitmdump binds before it checks for script errors, then exits: give it that moment
    time.sleep(STARTUP_GRACE)
    if proc.poll() is not None:
        raise RuntimeError(f"exited with {proc.returncode}:\n{describe()}")


def wait_for_line(proc: subprocess.Popen[bytes], output: Callable[[], str], marker: str) -> None:
    """Until the process's ``output`` has a line containing ``marker`` (the process says it
    is ready); an exit or ``START_TIMEOUT`` first is an error showing the output."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        text = output()
        if any(marker in line for line in text.splitlines()):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before {marker!r}:\n{text}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {marker!r} after {START_TIMEOUT}s:\n{text}")
        time.sleep(0.05)


def stop_process(
    proc: subprocess.Popen[bytes], timeout: float = 15.0, *, group: bool = False
) -> int:
    """SIGTERM (mitmdump then runs its addons' ``done()``), SIGKILL after ``timeout``;
    ``group``: to the process's whole group (one started with ``start_new_session``).

    One SIGTERM only: mitmproxy's handler goes with its event loop, so a second one, sent
    while the interpreter winds down after a clean shutdown, would kill it (status -15)."""
    if proc.poll() is None:
        send = functools.partial(os.killpg, proc.pid) if group else proc.send_signal
        send(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            send(signal.SIGKILL)
            proc.wait(5)
    return int(proc.returncode)


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM), in MiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0
