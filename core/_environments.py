"""Environments as a promotion path: per-environment settings and the rules they impose.

An environment is declared with :func:`environment` in ``@pipeline(environments=[...])`` or as
``[tool.shipyard.environments.NAME]`` in pyproject.toml (the pipeline's own declaration wins).
It gives variables (under ``--var``), secrets a deploy there must have, environments a version
must have succeeded in first (``requires``), and ``protected`` (deploy, rollback and promote
there need ``--yes``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from typing import TYPE_CHECKING
from typing import Any

from ._exceptions import PipelineDefinitionError
from ._exceptions import PromotionRefused
from ._exceptions import UsageError

if TYPE_CHECKING:
    from ._config import Config
    from ._pipeline import Pipeline
    from ._store import DeploymentRow
    from ._store import HistoryStore

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Environment:
    """One environment's settings (see :func:`environment`)."""

    name: str
    vars: Mapping[str, str] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    lock: str = "pipeline"
    protected: bool = False
    #: Where it was declared, for ``plan`` and messages.
    source: str = "pipelines.py"
    #: A ``shipyard.approval(...)`` gate every deployment there stops at before its first
    #: stage (rollbacks excepted), or None.
    approval: Any = None

    def __str__(self) -> str:
        return self.name


Environment.__module__ = "shipyard"


def environment(
    name: str, *, vars: Mapping[str, Any] | None = None, secrets: Iterable[str] = (),
    requires: Iterable[str] = (), lock: str = "pipeline", protected: bool = False,
    approval: Any = None,
) -> Environment:  # fmt: skip
    """Declare an environment for ``@pipeline(environments=[...])``.

    :param vars: variables a deploy there gets in ``d.vars``; ``--var`` overrides them.
    :param secrets: names of secrets a deploy there must find (environment or secret files),
        checked before any step runs and masked as every secret is.
    :param requires: environments the exact version must have succeeded in (for that pipeline)
        before it may deploy here; ``shipyard promote`` deploys what succeeded there.
    :param lock: ``"pipeline"`` (one lock per pipeline here, the default) or
        ``"environment"``: one lock shared by every pipeline deploying here with this setting
        (declare it in ``[tool.shipyard.environments]`` to give it to every pipeline), so that a
        migration and an app deploy never interleave.
    :param protected: ``deploy``, ``rollback`` and ``promote`` here need ``--yes`` (or
        ``SHIPYARD_YES=1``).
    :param approval: ``shipyard.approval(...)``: every deployment here (but a rollback) stops
        at this gate, a stage of its own named ``approval for NAME``, before its first stage.
    """
    return _make(name, vars, secrets, requires, lock, protected, "pipelines.py", approval)


def _make(
    name: Any, vars: Any, secrets: Any, requires: Any, lock: Any, protected: Any, source: str,
    approval: Any = None,
) -> Environment:  # fmt: skip
    where = f"environment {name!r} ({source})"
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise PipelineDefinitionError(
            f"{where}: the name must be 1-64 letters, digits, '.', '_' or '-'"
        )
    if vars is None:
        vars = {}
    if not isinstance(vars, Mapping):
        raise PipelineDefinitionError(f"{where}: vars must be a mapping of names to values")
    out_vars: dict[str, str] = {}
    for k, v in vars.items():
        if not isinstance(k, str) or not _VAR.fullmatch(k):
            raise PipelineDefinitionError(f"{where}: {k!r} is not a variable name")
        if not isinstance(v, (str, int, float, bool)):
            raise PipelineDefinitionError(
                f"{where}: variable {k!r} must be a string or a number, not {type(v).__name__}"
            )
        out_vars[k] = str(v).lower() if isinstance(v, bool) else str(v)
    names = []
    for label, values in (("secrets", secrets), ("requires", requires)):
        if isinstance(values, str) or not isinstance(values, Iterable):
            raise PipelineDefinitionError(f"{where}: {label} must be a list of names")
        items = list(values)
        for item in items:
            if not isinstance(item, str) or not item:
                raise PipelineDefinitionError(f"{where}: {label} has {item!r}, not a name")
        names.append(tuple(items))
    if name in names[1]:
        raise PipelineDefinitionError(f"{where}: it cannot require itself")
    if lock not in ("pipeline", "environment"):
        raise PipelineDefinitionError(
            f"{where}: lock must be 'pipeline' or 'environment', got {lock!r}"
        )
    if not isinstance(protected, bool):
        raise PipelineDefinitionError(f"{where}: protected must be True or False")
    if approval is not None and getattr(approval, "kind", None) != "approval":
        raise PipelineDefinitionError(
            f"{where}: approval must be shipyard.approval(...), got {approval!r}"
        )
    return Environment(name, out_vars, names[0], names[1], lock, protected, source, approval)


def from_settings(table: Any) -> dict[str, Environment]:
    """The environments of ``[tool.shipyard.environments]``."""
    if table is None:
        return {}
    where = "pyproject.toml [tool.shipyard.environments]"
    if not isinstance(table, Mapping):
        raise UsageError(f"{where} must be a table of environments")
    out = {}
    known = {"vars", "secrets", "requires", "lock", "protected", "approval"}
    for name, spec in table.items():
        source = f"pyproject.toml [tool.shipyard.environments.{name}]"
        if not isinstance(spec, Mapping):
            raise UsageError(f"{source} must be a table")
        unknown = sorted(set(spec) - known)
        if unknown:
            raise UsageError(
                f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        try:
            gate = None
            if spec.get("approval") is not None:
                if not isinstance(spec["approval"], Mapping):
                    raise PipelineDefinitionError(
                        f"{source}: approval must be a table of shipyard.approval's arguments, "
                        'e.g. approval = { timeout = "4h", approvers = ["alice"] }'
                    )
                import shipyard

                try:
                    gate = shipyard.approval(**spec["approval"])
                except (TypeError, shipyard.ShipyardError) as exc:
                    raise PipelineDefinitionError(f"{source}: approval: {exc}") from None
            out[name] = _make(
                name, spec.get("vars"), spec.get("secrets", ()), spec.get("requires", ()),
                spec.get("lock", "pipeline"), spec.get("protected", False), source, gate,
            )  # fmt: skip
        except PipelineDefinitionError as exc:
            raise UsageError(str(exc)) from None
    return out


def resolve(pipe: Pipeline[Any], config: Config, name: str) -> Environment | None:
    """The settings of environment ``name`` for ``pipe``: its own declaration, else the
    project's, else None (a plain name)."""
    own: Environment | None = getattr(pipe, "environment_specs", {}).get(name)
    if own is not None:
        return own
    project: Environment | None = from_settings(config.settings.get("environments")).get(name)
    return project


def gated(stages: list[Any], env: Environment | None, rollback: bool) -> list[Any]:
    """``stages`` behind the environment's approval gate, if it has one (not for a rollback)."""
    if env is not None and env.lock == "environment":
        for st in stages:
            for step in st.steps:
                if step.kind == "approval" and getattr(step, "lock", None) == "release":
                    raise PipelineDefinitionError(
                        f"stage {st.name!r}: an approval gate with lock='release' cannot run in "
                        f"environment {env.name!r}, whose lock is shared by every pipeline "
                        f"(lock='environment', {env.source}); give the gate lock='hold'"
                    )
    if env is None or env.approval is None or rollback:
        return stages
    from ._pipeline import stage

    name = f"approval for {env.name}"
    if any(s.name == name for s in stages):
        raise PipelineDefinitionError(
            f"environment {env.name!r} ({env.source}) adds a stage {name!r} for its approval, "
            "and the pipeline has a stage of that name already; rename that stage"
        )
    return [stage(name, env.approval), *stages]


def merged_vars(env: Environment | None, given: Mapping[str, str]) -> dict[str, str]:
    """The environment's variables under ``given`` (``--var`` wins)."""
    return {**(env.vars if env else {}), **given}


def provenance(env: Environment | None, given: Mapping[str, str]) -> dict[str, str]:
    """Where each variable of :func:`merged_vars` comes from."""
    out = {k: env.source for k in env.vars} if env else {}
    out.update({k: "--var" for k in given})
    return out


def check_protected(env: Environment | None, yes: bool, what: str) -> None:
    if env is not None and env.protected and not yes:
        raise UsageError(
            f"environment {env.name!r} is protected ({env.source}): {what} there needs --yes "
            "(or SHIPYARD_YES=1) to say it is meant"
        )


def check_requires(
    store: HistoryStore, pipeline: str, env: Environment | None, version: str,
    commit: str | None,
) -> dict[str, DeploymentRow]:  # fmt: skip
    """Refuse ``version`` unless it succeeded in every environment ``env`` requires (from the
    same git commit where both are recorded); returns the deployment that passed in each."""
    if env is None or not env.requires:
        return {}
    passed: dict[str, DeploymentRow] = {}
    missing = []
    for req in env.requires:
        found = succeeded(store, pipeline, req, version)
        if found is None:
            missing.append(req)
            continue
        then = found.get("git_commit")
        if commit and then and then != commit:
            raise PromotionRefused(
                f"{pipeline} {version} may not deploy to {env.name!r}: it succeeded in {req!r} "
                f"(deployment {found['id']}) from git commit {then}, and this checkout is at "
                f"{commit}; deploy this commit to {req!r} first, or check out {then}"
            )
        passed[req] = found
    if missing:
        raise PromotionRefused(
            f"{pipeline} {version} may not deploy to {env.name!r}: it requires that version to "
            f"have succeeded in {', '.join(repr(m) for m in missing)} first ({env.source}), and "
            f"it has not; deploy it there first (`shipyard deploy {pipeline} {version} -e "
            f"{missing[0]}`), or promote what passed (`shipyard promote {pipeline} --from "
            f"{missing[0]} --to {env.name}`)"
        )
    return passed


def succeeded(
    store: HistoryStore, pipeline: str, environment: str, version: str | None = None
) -> DeploymentRow | None:
    """The latest succeeded deployment of ``pipeline`` in ``environment`` (of ``version``)."""
    limit = 1 if version is None else 10_000
    for x in store.deployments(
        pipeline=pipeline, environment=environment, statuses=("succeeded",), limit=limit
    ):
        if version is None or x["version"] == version:
            return x
    return None


def lock_key(session: Any, pipeline: str, environment: str) -> str:
    """The name a deployment of ``pipeline`` to ``environment`` takes its lock under: the
    pipeline, or :data:`~shipyard._store.ENVIRONMENT_LOCK` with ``lock="environment"``. A
    pipelines file that cannot be loaded (``unlock`` of a broken project) gives the pipeline."""
    from ._exceptions import ShipyardError
    from ._store import ENVIRONMENT_LOCK

    try:
        env = resolve(session.pipeline(pipeline), session.config, environment)
    except ShipyardError:
        return pipeline
    return ENVIRONMENT_LOCK if env is not None and env.lock == "environment" else pipeline
