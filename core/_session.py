"""One command's session: configuration, plugins, pipelines and store, each loaded on first use.

Nothing here imports asyncio: ``list`` and ``plan`` use a session without running anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from typing import Any

from ._config import Config
from ._discovery import collect
from ._discovery import load_module
from ._exceptions import PipelineDefinitionError
from ._exceptions import PipelineNotFound
from ._pipeline import Deployment
from ._pipeline import Pipeline
from ._pipeline import Stage
from ._plugins import ShipyardPluginManager

if TYPE_CHECKING:
    from ._store import HistoryStore


class Session:
    """What one command needs, loaded lazily: ``--help`` touches none of it."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._pm: ShipyardPluginManager | None = None
        self._pipelines: dict[str, Pipeline[Any]] | None = None
        self._module: Any = None

    @property
    def pm(self) -> ShipyardPluginManager:
        if self._pm is None:
            import sys

            # `-p module` may name a module beside pipelines.py, as with conftest.py.
            rootdir = str(self.config.rootdir)
            if rootdir not in sys.path:
                sys.path.insert(0, rootdir)
            pm = ShipyardPluginManager()
            pm.load(self.config.plugin_specs, autoload=self.config.autoload)
            self.config.pluginmanager = pm
            self._pm = pm
        return self._pm

    def load(self, *, require_file: bool = True) -> dict[str, Pipeline[Any]]:
        """Load plugins and the pipelines file (registering its hooks), once."""
        if self._pipelines is not None:
            return self._pipelines
        pm = self.pm
        path = self.config.pipelines_file
        pipelines: list[Pipeline[Any]] = []
        if require_file or path.is_file():
            self._module = load_module(path)
            pipelines = collect(self._module, path)
            pm.register_pipelines_module(self._module, str(path))
        pm.finish_loading()
        pm.configure(self.config)
        pm.modify_collection(pipelines, self.config)
        self._pipelines = {p.name: p for p in pipelines}
        return self._pipelines

    def pipeline(self, name: str) -> Pipeline[Any]:
        pipelines = self.load()
        try:
            return pipelines[name]
        except KeyError:
            raise PipelineNotFound(name, pipelines, self.config.pipelines_file.name) from None

    def open_store(self, *, create: bool = True, repair: bool = True) -> HistoryStore:
        """The configured store, its dead deployments marked ``interrupted`` (``repair``).

        The built-in schemes open without loading plugins (``history`` stays cheap); any other
        is asked of the plugins.
        """
        from ._store import is_builtin
        from ._store import open_store

        url = self.config.history
        pm = None if is_builtin(url) else self.pm
        store = open_store(url, create=create, pluginmanager=pm)
        if repair:
            from ._liveness import repair as repair_store

            dead = repair_store(store, self.config.lock_lease)
            if dead:  # rare: only now are the plugins loaded, to clean up what it left
                self.clean_up(store, dead)
        return store

    def clean_up(self, store: HistoryStore, dead: list[int]) -> None:
        """Have the plugins remove what the deployments ``dead`` left (containers, Jobs)."""
        from ._exceptions import ShipyardError
        from ._liveness import clean_up

        try:
            pm = self.pm
        except ShipyardError:  # the pipelines file is broken: nothing can be cleaned now
            return
        clean_up(store, dead, pm)

    def build(self, pipeline: Pipeline[Any], deployment: Deployment) -> list[Stage]:
        """The stages of ``pipeline`` for ``deployment``; every step kind must be available."""
        from ._environments import gated
        from ._environments import resolve

        stages = pipeline.build(deployment)
        env = resolve(pipeline, self.config, deployment.environment)
        stages = gated(stages, env, rollback=deployment.rollback_of is not None)
        registry = self.pm.step_types
        for st in stages:
            for step in st.steps:
                known = registry.types.get(step.kind)
                if known is None:
                    path, line = step.location
                    blocked = (
                        f"; plugin {step.kind!r} is disabled"
                        if step.kind in self.pm.blocked
                        else ""
                    )
                    raise PipelineDefinitionError(
                        f"pipeline {pipeline.name!r}, stage {st.name!r}, step {step.name!r}: step "
                        f"type {step.kind!r} is not provided by any loaded plugin{blocked}; "
                        "`shipyard plugins` lists what is loaded",
                        path=path,
                        lineno=line,
                    )
        return stages

    def close(self) -> None:
        if self._pm is not None:
            self._pm.unconfigure(self.config)

    def identify(self, purpose: str) -> str:
        """Who runs this command, for ``purpose`` (``deploy``, ``decide``, ``act``): Shipyard's
        answer (see :mod:`shipyard._identity`), unless a ``shipyard_identify`` hook renames it.
        For ``act`` (cancel, unlock, supersede) the answer carries the CI identity, as the
        audit trail shows it, and hooks in pipelines.py are asked only when it is loaded: a
        broken pipelines file must not stop a cancel."""
        from ._exceptions import UsageError
        from ._identity import ci_actor
        from ._identity import current_user
        from ._identity import decider

        if purpose in ("deploy", "decide"):
            self.load()
        user = decider() if purpose == "decide" else current_user()
        named = self.pm.hook.shipyard_identify(user=user, purpose=purpose)
        if named is not None:
            if not isinstance(named, str) or not named.strip():
                raise UsageError(
                    f"a shipyard_identify hook returned {named!r} for {purpose!r}; it must "
                    "return a non-empty name (str) or None"
                )
            user = named.strip()
        if purpose == "act":
            ci = ci_actor()
            return f"{user} ({ci})" if ci else user
        return user
