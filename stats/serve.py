"""``burnmeter serve``: the read-only admin API and dashboard over the store, on waitress.

The store is opened read-only (SQLite ``mode=ro``: no schema change, no purge, a file the
server may not write works) and stays readable while proxies write to it (WAL).
"""

from __future__ import annotations

import secrets
import signal
import sys
from typing import TYPE_CHECKING
from typing import NoReturn

import click

from stats.admin.app import create_app
from stats.admin.app import log_to_stderr

if TYPE_CHECKING:
    from stats.context import Context

TOKEN_ENV = "BURNMETER_ADMIN_TOKEN"
THREADS = 8


def _stop(signum: int, frame: object) -> NoReturn:
    raise SystemExit(0)  # waitress ends its loop on SystemExit


@click.command()
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; anything but loopback exposes the dashboard to the network.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8899,
    show_default=True,
    help="Port to listen on (0: any free port, printed at start).",
)
@click.option(
    "--token",
    envvar=TOKEN_ENV,
    metavar="T",
    help=f"Admin token every request must carry [env {TOKEN_ENV}]; random if omitted.",
)
@click.pass_obj
def serve(state: Context, host: str, port: int, token: str | None) -> None:
    """Serve the admin API (/admin/user-stats, metrics, model-stats, users, series) and the
    dashboard (/admin), read-only.

    Prints the dashboard's address with the token once at start; open it in a browser (the
    session then remembers the token) or send `Authorization: Bearer T` to the API.
    """
    from waitress import create_server

    if token is not None and not token.strip():
        raise click.BadParameter("the token must not be empty", param_hint="'--token'")
    token = token or secrets.token_urlsafe(24)
    store = state.read_only_store
    app = create_app(store, state.config.zone, token)
    log_to_stderr()
    try:
        store.logs(1)  # a missing or foreign store fails here, not on the first request
        server = create_server(app, host=host, port=port, threads=THREADS, ident="burnmeter")
        bound_host, bound_port = server.effective_host, server.effective_port  # type: ignore[union-attr]
        shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
        if host not in ("127.0.0.1", "localhost", "::1"):
            click.echo(f"burnmeter serve: warning: listening on {host}, not loopback", err=True)
        click.echo(f"burnmeter serve: http://{shown}:{bound_port}/admin?token={token}")
        sys.stdout.flush()
        signal.signal(signal.SIGTERM, _stop)
        server.run()
    finally:
        # reports under way use the store's connections, which the context closes next
        app.extensions["burnmeter_workers"].shutdown(wait=True, cancel_futures=True)
