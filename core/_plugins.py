"""The plugin manager: built-ins, entry points, ``-p``, and hooks written in pipelines.py."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from typing import Any
from typing import Final

import pluggy

from . import hookspecs
from ._exceptions import UsageError

if TYPE_CHECKING:
    from collections.abc import Awaitable

    import click

    from ._config import Config
    from ._pipeline import Pipeline
    from ._pipeline import Step
    from ._reports import StepResult
    from ._runner import StepContext
    from ._store import HistoryStore

hookimpl: Final[pluggy.HookimplMarker] = pluggy.HookimplMarker("shipyard")

#: The entry-point group third-party plugins (and our own built-ins) register under.
ENTRY_POINT_GROUP: Final = "shipyard"

#: Built-in plugins by short name; the same table as ``[project.entry-points.shipyard]`` in
#: pyproject.toml (a test pins them together). Used when Shipyard runs from a source tree that is
#: not installed, where no entry points exist.
DEFAULT_PLUGINS: Final[dict[str, str]] = {
    "command": "shipyard.plugins.command",
    "python": "shipyard.plugins.python",
    "wait": "shipyard.plugins.wait",
    "approval": "shipyard.plugins.approval",
    "notify": "shipyard.plugins.notify",
    "docker": "shipyard.plugins.docker",
    "nginx": "shipyard.plugins.nginx",
    "healthcheck": "shipyard.plugins.healthcheck",
    "kubernetes": "shipyard.plugins.kubernetes",
    "analysis": "shipyard.plugins.analysis",
    "canary": "shipyard.plugins.canary",
    "ssh": "shipyard.plugins.ssh",
    "otel": "shipyard.plugins.otel",
    "serve": "shipyard.contrib.serve",
}

#: Plugins that cannot be disabled with ``-p no:NAME``.
ESSENTIAL_PLUGINS: Final = ("core",)


class _CorePlugin:
    """The default executor: run the step itself. ``trylast`` so any plugin can take over."""

    @hookimpl(trylast=True)
    def shipyard_step_call(self, step: Step, context: StepContext) -> Awaitable[StepResult]:
        return step.run(context)


@dataclass
class PluginInfo:
    """What ``shipyard plugins`` shows about one plugin."""

    name: str
    source: str
    version: str = ""


class StepTypeRegistry:
    """Step types by ``kind``; a second plugin registering a kind is refused, naming both."""

    def __init__(self) -> None:
        #: The class of each kind, or where it is (``"module:Class"``) until it is imported.
        self.types: dict[str, type[Step] | str] = {}
        self.owners: dict[str, str] = {}
        self._plugin = "?"

    def add(self, step_type: type[Step] | str, *, kind: str | None = None) -> None:
        """Register ``step_type``: a :class:`Step` subclass, or ``"module:Class"`` with its
        ``kind``, so that loading the plugin does not import the step's module (the step is
        imported when a pipeline builds one, through the plugin's own public names)."""
        if isinstance(step_type, str):
            if kind is None:
                raise TypeError(f"registry.add({step_type!r}): a step given by name needs kind=")
        else:
            kind = step_type.kind
        if kind in self.types and self.types[kind] != step_type:
            raise UsageError(
                f"step type {kind!r} is registered by plugin {self.owners[kind]!r} and again by "
                f"{self._plugin!r}; disable one with -p no:NAME"
            )
        self.types[kind] = step_type
        self.owners[kind] = self._plugin


class _Factories:
    """Factories by name, each owned by the plugin that registered it; a second plugin
    registering a name is refused, naming both."""

    #: What the names are, in the refusal.
    what = "factory"

    def __init__(self) -> None:
        self.factories: dict[str, Callable[..., Any]] = {}
        self.owners: dict[str, str] = {}
        self._plugin = "?"

    def add(self, name: str, factory: Callable[..., Any]) -> None:
        if name in self.factories and self.factories[name] is not factory:
            raise UsageError(
                f"{self.what} {name!r} is registered by plugin {self.owners[name]!r} and again "
                f"by {self._plugin!r}; disable one with -p no:NAME"
            )
        self.factories[name] = factory
        self.owners[name] = self._plugin


class ProviderRegistry(_Factories):
    """Metric provider types by name (``registry.add("datadog", datadog_query)``): listed by
    ``shipyard plugins``; a pipeline builds providers by calling the factories itself."""

    what = "metric provider"


class NotifierRegistry(_Factories):
    """Notifier factories by name, used by ``deploy --notify NAME:VALUE`` and ``--notify URL``."""

    what = "notifier"

    def create(self, spec: str) -> Any:
        """Build a notifier from ``NAME:VALUE``, or a webhook from a bare URL."""
        if spec.startswith(("http://", "https://")):
            name, value = "webhook", spec
        else:
            name, _, value = spec.partition(":")
        factory = self.factories.get(name)
        if factory is None:
            known = ", ".join(sorted(self.factories)) or "none"
            raise UsageError(
                f"--notify {spec!r}: no notifier named {name!r} (known: {known}); "
                "give a URL for a webhook or NAME:VALUE"
            )
        return factory(value)


class ShipyardPluginManager(pluggy.PluginManager):
    """pluggy's manager with Shipyard's plugin sources and typed hook calls."""

    def __init__(self) -> None:
        super().__init__("shipyard")
        self.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self.blocked: set[str] = set()
        self.step_types = StepTypeRegistry()
        self.notifiers = NotifierRegistry()
        self.providers = ProviderRegistry()
        self._registries_built = False
        self.register(_CorePlugin(), "core")
        self.infos["core"] = PluginInfo("core", "builtin")

    # -- discovery of plugins ---------------------------------------------------------------------

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
        # Like pytest: only `shipyard_*` attributes are hooks; unmarked ones are accepted too,
        # so a pipelines.py can define `def shipyard_step_finished(event): ...` plainly.
        if not name.startswith("shipyard_"):
            return None
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None:
            method = getattr(plugin, name, None)
            if callable(method) and not isinstance(method, type):
                return {}
        return opts

    def register(self, plugin: Any, name: str | None = None) -> str | None:
        if name in self.blocked:
            return None
        ret = super().register(plugin, name)
        if ret is not None and self._registries_built:
            self._call_registries([ret])
        return ret

    def block(self, name: str) -> None:
        if name in ESSENTIAL_PLUGINS:
            raise UsageError(f"plugin {name!r} is essential and cannot be disabled")
        self.blocked.add(name)
        self.set_blocked(name)

    def load(
        self,
        specs: Iterable[tuple[str, str]] = (),
        *,
        autoload: bool = True,
    ) -> None:
        """Load built-ins, installed entry points (if ``autoload``) and explicit plugins.

        :param specs: ``(value, source)`` pairs: ``-p`` values (module names, or ``no:NAME``).
        """
        specs = list(specs)
        for value, _source in specs:
            if value.startswith("no:"):
                self.block(value[3:])
        builtins_seen = False
        for ep in find_entry_points(ENTRY_POINT_GROUP):
            is_builtin = ep.dist_name.lower() == "shipyard" and ep.value.startswith("shipyard.")
            builtins_seen |= is_builtin
            if ep.name in self.blocked or self.has_plugin(ep.name):
                continue
            if not is_builtin and not autoload:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                raise UsageError(
                    f"plugin {ep.name!r} from {ep.dist_name or 'an installed package'} failed to "
                    f"load: {type(exc).__name__}: {exc}; uninstall it or disable it with "
                    f"-p no:{ep.name}"
                ) from exc
            self.register(plugin, ep.name)
            if is_builtin:
                self.infos[ep.name] = PluginInfo(ep.name, "builtin")
            else:
                self.infos[ep.name] = PluginInfo(
                    ep.name, f"entry point of {ep.dist_name}", ep.dist_version
                )
        if not builtins_seen:
            for name, modname in DEFAULT_PLUGINS.items():
                if name not in self.blocked and not self.has_plugin(name):
                    self.register(importlib.import_module(modname), name)
                    self.infos[name] = PluginInfo(name, "builtin")
        for value, source in specs:
            if not value.startswith("no:"):
                self.import_plugin(value, source)

    def import_plugin(self, modname: str, source: str = "-p") -> None:
        """Import ``modname`` and register it under that name (``-p``/``SHIPYARD_PLUGINS``)."""
        modname = modname.strip()
        if not modname or modname in self.blocked or self.has_plugin(modname):
            return
        try:
            module = importlib.import_module(modname)
        except ImportError as exc:
            raise UsageError(
                f"plugin {modname!r} (from {source}) could not be imported: {exc}; check the "
                "module name and that its package is installed"
            ) from exc
        if self.is_registered(module):  # already loaded, e.g. through its entry point
            return
        self.register(module, modname)
        self.infos[modname] = PluginInfo(modname, source, getattr(module, "__version__", ""))

    def register_pipelines_module(self, module: Any, path: str) -> None:
        """Register hook implementations written in pipelines.py itself (like conftest.py)."""
        name = "pipelines.py"
        if self.has_plugin(name):
            self.unregister(name=name)
        self.register(module, name)
        self.infos[name] = PluginInfo(name, path)

    def finish_loading(self) -> None:
        """Validate hook implementations and run the registration hooks."""
        try:
            self.check_pending()
        except pluggy.PluginValidationError as exc:
            raise UsageError(
                f"plugin {exc.plugin!r} implements a hook that does not exist: {exc}; "
                "check the spelling against `shipyard plugins` and docs/reference/hooks.md"
            ) from exc
        self._call_registries([n for n, _ in self.list_name_plugin()])
        self._registries_built = True
        self.hook.shipyard_addhooks.call_historic(kwargs={"pluginmanager": self})

    def _call_registries(self, names: list[str]) -> None:
        wanted = set(names)
        for hookname, registry in (
            ("shipyard_register_step_types", self.step_types),
            ("shipyard_register_notifiers", self.notifiers),
            ("shipyard_register_metric_providers", self.providers),
        ):
            hook = getattr(self.hook, hookname)
            for impl in hook.get_hookimpls():
                if impl.plugin_name in wanted:
                    registry._plugin = impl.plugin_name
                    impl.function(registry)

    # -- typed hook calls -------------------------------------------------------------------------

    def configure(self, config: Config) -> None:
        self.hook.shipyard_configure.call_historic(kwargs={"config": config})

    def unconfigure(self, config: Config) -> None:
        self.hook.shipyard_unconfigure(config=config)

    def call_each(self, hook_name: str, **kwargs: Any) -> list[tuple[str, Exception]]:
        """Call every implementation of ``hook_name``, each on its own: one that raises does
        not keep the others from running. The failures, by plugin name."""
        failures = []
        for impl in getattr(self.hook, hook_name).get_hookimpls():
            try:
                impl.function(**{name: kwargs[name] for name in impl.argnames})
            except Exception as exc:
                failures.append((impl.plugin_name, exc))
        return failures

    def has_impls(self, hook_name: str) -> bool:
        return bool(getattr(self.hook, hook_name).get_hookimpls())

    def add_commands(self, cli: click.Group) -> list[str]:
        """Let each plugin add its commands to ``cli``; what went wrong, by plugin (a plugin
        that fails does not keep the others' commands away)."""
        return [
            f"plugin {name!r} failed to add its commands: {type(exc).__name__}: {exc}"
            for name, exc in self.call_each("shipyard_addcommands", cli=cli)
        ]

    def modify_collection(self, pipelines: list[Pipeline[Any]], config: Config) -> None:
        self.hook.shipyard_collection_modifyitems(pipelines=pipelines, config=config)

    def resolve_secret(self, name: str, config: Config) -> str | None:
        result: str | None = self.hook.shipyard_resolve_secret(name=name, config=config)
        return result

    def step_call(self, step: Step, context: StepContext) -> Awaitable[StepResult]:
        result: Awaitable[StepResult] = self.hook.shipyard_step_call(step=step, context=context)
        return result

    def router_switch(
        self, router: Any, service: str, port: int, context: StepContext
    ) -> Awaitable[bool] | bool | None:
        """Ask the router plugins to send ``service``'s traffic to ``port``; None: no taker."""
        result: Awaitable[bool] | bool | None = self.hook.shipyard_router_switch(
            router=router, service=service, port=port, context=context
        )
        return result

    def router_weights(
        self, router: Any, service: str, weights: Mapping[int, int], context: StepContext
    ) -> Awaitable[bool] | bool | None:
        """Ask the router plugins to split ``service``'s traffic by ``weights`` (port ->
        percent); None: no taker."""
        result: Awaitable[bool] | bool | None = self.hook.shipyard_router_weights(
            router=router, service=service, weights=weights, context=context
        )
        return result

    def analysis_measure(self, metric: Any, context: Any) -> Awaitable[Any]:
        """Ask the measurement plugins for one measurement of ``metric`` (an awaitable)."""
        result: Awaitable[Any] = self.hook.shipyard_analysis_measure(metric=metric, context=context)
        return result

    def open_store(self, url: str, *, create: bool) -> HistoryStore | None:
        """Ask the store plugins to open ``url``; None: no plugin provides its scheme."""
        result: HistoryStore | None = self.hook.shipyard_store_open(url=url, create=create)
        return result

    def store_schemes(self) -> list[str]:
        """The URL schemes the store plugins open."""
        return sorted({s for schemes in self.hook.shipyard_store_schemes() for s in schemes or ()})

    def plugin_rows(self) -> list[dict[str, Any]]:
        """One row per plugin for ``shipyard plugins``: name, source, version, types, hooks."""
        rows = []
        for name, plugin in self.list_name_plugin():
            if plugin is None:
                continue
            info = self.infos.get(name, PluginInfo(name, "registered by a plugin"))
            hooks = sorted(
                {impl_name for impl_name in dir(plugin) if impl_name.startswith("shipyard_")}
                & set(self.hook.__dict__)
            )
            rows.append(
                {
                    "name": name,
                    "source": info.source,
                    "version": info.version,
                    "step_types": sorted(k for k, o in self.step_types.owners.items() if o == name),
                    "notifiers": sorted(k for k, o in self.notifiers.owners.items() if o == name),
                    "metric_providers": sorted(
                        k for k, o in self.providers.owners.items() if o == name
                    ),
                    "hooks": hooks,
                }
            )
        for name in sorted(self.blocked):
            rows.append(
                {
                    "name": name,
                    "source": "disabled (-p no:)",
                    "version": "",
                    "step_types": [],
                    "notifiers": [],
                    "metric_providers": [],
                    "hooks": [],
                }
            )
        return rows


@dataclass
class EntryPoint:
    """One entry point of an installed distribution."""

    name: str
    value: str
    dist_name: str
    dist_version: str

    def load(self) -> Any:
        modname, _, attr = self.value.partition(":")
        obj = importlib.import_module(modname.strip())
        for part in attr.strip().split(".") if attr.strip() else ():
            obj = getattr(obj, part)
        return obj


def find_entry_points(group: str, path: Iterable[str] | None = None) -> list[EntryPoint]:
    """The entry points of ``group`` of the distributions on ``path`` (``sys.path``).

    Reads ``*.dist-info/entry_points.txt`` directly: importing ``importlib.metadata`` (and the
    email parser it needs) would cost more than the rest of ``shipyard list`` together. The
    first distribution of a name on the path wins, as with the import system.
    """
    import sys

    found: list[EntryPoint] = []
    seen: set[str] = set()
    header = f"[{group}]"
    for entry in sys.path if path is None else path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for dirname in names:
            if not dirname.endswith((".dist-info", ".egg-info")):
                continue
            stem = dirname.rsplit(".", 1)[0]
            dist_name, _, version = stem.partition("-")
            key = dist_name.lower().replace("-", "_")
            if key in seen:
                continue
            seen.add(key)
            try:
                with open(
                    os.path.join(entry or ".", dirname, "entry_points.txt"), encoding="utf-8"
                ) as f:
                    text = f.read()
            except OSError:
                continue
            if header not in text:
                continue
            section = False
            for raw in text.splitlines():
                line = raw.strip()
                if line.startswith("["):
                    section = line == header
                elif section and "=" in line and not line.startswith(("#", ";")):
                    name, _, value = line.partition("=")
                    found.append(EntryPoint(name.strip(), value.strip(), dist_name, version))
    return found
