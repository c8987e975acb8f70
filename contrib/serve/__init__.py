"""``shipyard serve``: a deployment dashboard with live logs, read-only unless told otherwise.

Installed with the extra ``shipyard[serve]`` (Starlette and uvicorn). This module is loaded at
every start-up, so it only defines the click command: Starlette and uvicorn are imported when
``serve`` runs. It registers like any third-party plugin would::

    [project.entry-points.shipyard]
    serve = "shipyard.contrib.serve"

    @sdk.hookimpl
    def shipyard_addcommands(cli):
        cli.add_command(serve)

The pages and the JSON API read the history through the store port and never write it; each
action (``--allow-actions``) runs the ``shipyard`` command line on the serving host, so it goes
through the same checks and the same audit trail as a command typed in a terminal. See
docs/guides/dashboard.md.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path
from typing import Any

import click
from shipyard.sdk import hookimpl

#: Host names that are the loopback interface without a DNS lookup.
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server reachable from this machine only."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token_file(path: str) -> dict[str, str]:
    """The tokens of ``--token-file``: ``name token`` lines (``#`` comments), token -> user.

    :raises shipyard.UsageError: unreadable, readable by others than its owner, or malformed.
    """
    from shipyard import UsageError

    p = Path(path)
    try:
        mode = p.stat().st_mode
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--token-file {path}: cannot read it ({exc.strerror})") from None
    if stat.S_IMODE(mode) & 0o077:
        raise UsageError(
            f"--token-file {path}: its mode is {stat.S_IMODE(mode):04o}, so others may read the "
            f"tokens; make it private with `chmod 600 {path}`"
        )
    tokens: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[1]) < 16:
            raise UsageError(
                f"--token-file {path}, line {n}: expected `NAME TOKEN` with a token of at least "
                "16 characters (e.g. from `python -c 'import secrets; print(secrets.token_urlsafe())'`)"
            )
        name, token = parts
        if token in tokens:
            raise UsageError(f"--token-file {path}, line {n}: this token is given twice")
        tokens[token] = name
    if not tokens:
        raise UsageError(f"--token-file {path}: no `NAME TOKEN` line in it")
    return tokens


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
    help="Port to listen on; 0 picks a free one (the URL printed says which).",
)  # fmt: skip
@click.option(
    "--allow-actions", is_flag=True,
    help="Offer approve, reject, cancel, rollback and retry (each needs a token).",
)  # fmt: skip
@click.option(
    "--token-file", metavar="FILE",
    help="`NAME TOKEN` lines (mode 0600); without it --allow-actions prints one random token.",
)  # fmt: skip
@click.option(
    "--allow-remote", is_flag=True, help="Allow a --host other than the loopback interface."
)
@click.pass_context
def serve(
    ctx: click.Context, host: str, port: int, allow_actions: bool, token_file: str | None,
    allow_remote: bool,
) -> None:  # fmt: skip
    """Serve a dashboard of the history: overview, history, deployments with live logs.

    Read-only unless --allow-actions. Listens on 127.0.0.1 unless --host and --allow-remote say
    otherwise. Stop it with Ctrl-C or SIGTERM.
    """
    from shipyard import UsageError

    if not is_loopback(host) and not allow_remote:
        raise UsageError(
            f"--host {host} is not the loopback interface: anyone who can reach it would see "
            "the deployment history; add --allow-remote if that is meant (and put TLS in front)"
        )
    if token_file and not allow_actions:
        raise UsageError("--token-file is only used with --allow-actions; add it, or drop the file")
    tokens: dict[str, str] = {}
    if allow_actions:
        tokens = read_token_file(token_file) if token_file else {}
    try:
        from . import _app
    except ImportError as exc:
        raise UsageError(
            f"`shipyard serve` needs the extra shipyard[serve] ({exc}); install it with "
            "`pip install 'shipyard[serve]'`"
        ) from None
    root = ctx.find_root().params
    _app.run(
        host=host, port=port, allow_actions=allow_actions, tokens=tokens,
        options=_app.Options(file=root.get("file"), history=root.get("history"),
                             plugins=list(root.get("plugins") or ())),
        environ=dict(os.environ),
    )  # fmt: skip


@hookimpl
def shipyard_addcommands(cli: Any) -> None:
    cli.add_command(serve)
