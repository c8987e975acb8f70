"""Settings: flags override ``SHIPYARD_*`` variables, which override ``[tool.shipyard]``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

from ._exceptions import UsageError

if TYPE_CHECKING:
    from ._plugins import ShipyardPluginManager

DEFAULT_FILE = "pipelines.py"
DEFAULT_HISTORY = ".shipyard/history.db"
_KNOWN_SETTINGS = {"history", "store", "plugins", "notify", "file", "secret_files", "lock_lease"}
#: Read by the tracing plugin (``shipyard.plugins.otel``, issue #19).
_KNOWN_SETTINGS.add("otel")
#: ``[tool.shipyard.environments.NAME]``: read by ``shipyard._environments``.
_KNOWN_SETTINGS.add("environments")


@dataclass
class Config:
    """Where things are and which plugins to load, resolved once per command."""

    #: The pipelines file (absolute).
    pipelines_file: Path
    #: Its directory: commands run here, relative paths start here.
    rootdir: Path
    #: The history store: a file path, or a URL such as ``sqlite:///path``.
    history: str
    #: Whether the store was chosen (option, variable or setting) rather than the default.
    store_chosen: bool = False
    #: ``(value, source)`` for each ``-p`` / ``SHIPYARD_PLUGINS`` / pyproject plugin.
    plugin_specs: list[tuple[str, str]] = field(default_factory=list)
    #: Notifier specs from ``--notify`` and pyproject.
    notify: list[str] = field(default_factory=list)
    #: dotenv files of secrets (``--secret-file``).
    secret_files: list[Path] = field(default_factory=list)
    #: ``[tool.shipyard]`` of the pyproject.toml beside the pipelines file.
    settings: dict[str, Any] = field(default_factory=dict)
    #: Load third-party entry points (off with ``SHIPYARD_DISABLE_PLUGIN_AUTOLOAD``).
    autoload: bool = True
    verbose: int = 0
    #: Seconds after which a lock whose heartbeat stopped is considered dead (other hosts).
    lock_lease: float = 60.0
    pluginmanager: ShipyardPluginManager | None = None

    @classmethod
    def resolve(
        cls,
        *,
        file: str | os.PathLike[str] | None = None,
        history: str | None = None,
        plugins: Sequence[str] = (),
        notify: Sequence[str] = (),
        secret_files: Sequence[str] = (),
        verbose: int = 0,
        environ: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Config:
        env = os.environ if environ is None else environ
        cwd = cwd or Path.cwd()
        raw_file = file or env.get("SHIPYARD_FILE") or DEFAULT_FILE
        pipelines_file = (cwd / raw_file).absolute()
        rootdir = pipelines_file.parent
        settings = _read_pyproject(rootdir / "pyproject.toml")
        if not file and not env.get("SHIPYARD_FILE") and settings.get("file"):
            pipelines_file = (rootdir / str(settings["file"])).absolute()
            rootdir = pipelines_file.parent

        # --history/--store, then SHIPYARD_STORE or SHIPYARD_HISTORY, then [tool.shipyard].
        from_env = env.get("SHIPYARD_STORE") or env.get("SHIPYARD_HISTORY")
        hist = str(
            history or from_env or settings.get("store") or settings.get("history")
            or DEFAULT_HISTORY
        )  # fmt: skip
        if "://" not in hist:
            base = cwd if (history or from_env) else rootdir
            hist = str((base / os.path.expanduser(hist)).absolute())
        register_store_url(hist, env)

        specs: list[tuple[str, str]] = [
            (str(p), "pyproject.toml") for p in _as_list(settings.get("plugins"), "plugins")
        ]
        specs += [
            (p.strip(), "SHIPYARD_PLUGINS")
            for p in env.get("SHIPYARD_PLUGINS", "").split(",")
            if p.strip()
        ]
        specs += [(p, "-p") for p in plugins]
        autoload = env.get("SHIPYARD_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0", "false", "no")
        notify_all = [str(n) for n in _as_list(settings.get("notify"), "notify")] + list(notify)
        files = [rootdir / str(p) for p in _as_list(settings.get("secret_files"), "secret_files")]
        files += [cwd / p for p in secret_files]
        lease = float(env.get("SHIPYARD_LOCK_LEASE") or settings.get("lock_lease") or 60.0)
        return cls(
            pipelines_file=pipelines_file,
            rootdir=rootdir,
            history=hist,
            store_chosen=bool(
                history or from_env or settings.get("store") or settings.get("history")
            ),
            plugin_specs=specs,
            notify=notify_all,
            secret_files=files,
            settings=settings,
            autoload=autoload,
            verbose=verbose,
            lock_lease=lease,
        )


def register_store_url(url: str, env: Mapping[str, str] | None = None) -> None:
    """Mask a store's password everywhere Shipyard writes (console, history, audit, errors):
    the one in the URL, and ``PGPASSWORD`` for a PostgreSQL store."""
    if "://" not in url:
        return
    from urllib.parse import unquote
    from urllib.parse import urlsplit

    values: list[str] = []
    try:
        parts = urlsplit(url)
        if parts.password:
            values += [parts.password, unquote(parts.password)]
        for item in parts.query.split("&"):
            key, _, value = item.partition("=")
            if key == "password" and value:
                values += [value, unquote(value)]
    except ValueError:
        pass
    env = os.environ if env is None else env
    if url.startswith(("postgresql:", "postgres:")) and env.get("PGPASSWORD"):
        values.append(env["PGPASSWORD"])
    if values:
        from ._secrets import register

        register(v for v in values if len(v) >= 3)


def _as_list(value: Any, key: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return value
    raise UsageError(f"pyproject.toml [tool.shipyard] {key} must be a string or a list")


def _read_pyproject(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except OSError:
        return {}
    if b"tool.shipyard" not in data:
        return {}
    import tomllib

    try:
        parsed = tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from exc
    settings = parsed.get("tool", {}).get("shipyard", {})
    unknown = sorted(set(settings) - _KNOWN_SETTINGS)
    if unknown:
        raise UsageError(
            f"{path}: unknown setting {unknown[0]!r} in [tool.shipyard] "
            f"(known: {', '.join(sorted(_KNOWN_SETTINGS))})"
        )
    return dict(settings)
