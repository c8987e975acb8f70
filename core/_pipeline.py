"""The pipeline API: ``@pipeline``, ``stage()``, the ``Step`` base class and ``Deployment``.

Nothing here imports asyncio, sqlite or an HTTP client: pipelines files import this module, and
``shipyard list`` and ``shipyard plan`` must stay fast.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from typing import TYPE_CHECKING
from typing import Any
from typing import ClassVar
from typing import Generic
from typing import Literal
from typing import NamedTuple
from typing import TypeVar
from typing import overload

from ._exceptions import PipelineDefinitionError
from ._secrets import hide_placeholders

if TYPE_CHECKING:
    from pathlib import Path

    from typing_extensions import ParamSpec

    from ._environments import Environment
    from ._reports import StepResult
    from ._runner import StepContext

    P = ParamSpec("P")
else:
    P = TypeVar("P")

R = TypeVar("R")

_RollbackMode = Literal["auto", "manual", False]


@dataclass(frozen=True)
class Deployment:
    """What a pipeline function knows about the deployment it describes."""

    #: The deployment's id in the history (0 while planning).
    id: int
    #: The pipeline's name.
    pipeline: str
    #: The version being deployed.
    version: str
    #: The environment deployed to.
    environment: str
    #: Values of ``--var K=V``.
    vars: Mapping[str, str] = field(default_factory=dict)
    #: The version of the last successful deployment of this pipeline here, or None.
    previous_version: str | None = None
    #: The id of the deployment this one rolls back, or None.
    rollback_of: int | None = None
    #: In a rollback, the id of the deployment whose version comes back (what it applied can
    #: be applied again exactly: :meth:`shipyard.StepContext.restored_artifact`); else None.
    restores: int | None = None
    #: The decisions of the approval gates passed so far, by gate stage name: later stages may
    #: branch on ``d.approvals["approve"].choice``. Empty until a gate was approved.
    approvals: Mapping[str, GateDecision] = field(default_factory=dict)


Deployment.__module__ = "shipyard"


class GateDecision(NamedTuple):
    """How an approval gate was decided (``Deployment.approvals``)."""

    #: The users who approved.
    approvers: tuple[str, ...]
    #: The option chosen (``--choice``), or None.
    choice: str | None
    #: The comments given, in order.
    comments: tuple[str, ...]


class Step:
    """Base class of every step type.

    A step type sets :attr:`kind`, takes its options in ``__init__`` (passing ``name``,
    ``timeout`` and ``retries`` to :meth:`Step.__init__`) and implements :meth:`run`.
    """

    #: The step type's unique name, as listed by ``shipyard plugins``.
    kind: ClassVar[str] = "step"

    def __init__(
        self, *, name: str | None = None, timeout: float | None = None, retries: int = 0
    ) -> None:
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise PipelineDefinitionError(
                f"{self.kind} step: timeout must be a positive number of seconds, got {timeout!r}"
            )
        if not isinstance(retries, int) or retries < 0:
            raise PipelineDefinitionError(
                f"{self.kind} step: retries must be a whole number >= 0, got {retries!r}"
            )
        # A secret in the name (``command("login", secret("T"))``) shows as ***, like elsewhere.
        self.name: str = hide_placeholders(name if name else self.default_name())
        self.timeout = timeout
        self.retries = retries
        #: Where the step was written: (file, line) of the call that built it.
        self.location: tuple[str, int] = _find_user_frame(self)

    def default_name(self) -> str:
        return self.kind

    def describe(self) -> str:
        """One line for ``plan`` (secrets appear as placeholders, masked by the caller)."""
        return self.name

    def targets(self) -> list[str]:
        """Where the step acts besides this machine, as ``list`` shows it under its pipeline
        (a fleet step: its host groups, ``web (region eu): 10.0.0.1, 10.0.0.2``); none by
        default. Like :meth:`plan_details`, it must talk to no server."""
        return []

    def plan_details(self, deployment: Deployment, rootdir: Path) -> list[str]:
        """Extra lines ``plan`` shows under the step (e.g. rendered objects); none by default.

        Called only by ``plan``: it must talk to no server and change nothing. Secrets appear
        as placeholders and are masked by the caller.

        :param deployment: the planned deployment (id 0).
        :param rootdir: the pipelines file's folder, which relative paths are relative to.
        """
        return []

    async def run(self, context: StepContext) -> StepResult:
        """Run the step once; return a result or raise :class:`shipyard.StepFailed`."""
        raise NotImplementedError(f"{type(self).__name__}.run")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


Step.__module__ = "shipyard"


def _find_user_frame(step: Step) -> tuple[str, int]:
    """The first frame outside Shipyard and the step's own ``__init__``: where the user built it."""
    frame: types.FrameType | None = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.split(".")[0] != "shipyard" and frame.f_locals.get("self") is not step:
            return frame.f_code.co_filename, frame.f_lineno
        frame = frame.f_back
    return "<unknown>", 0


def reject_unknown_options(step: Step, unknown: Mapping[str, Any]) -> None:
    """Refuse keyword options a step type does not know, listing the ones it does.

    Step types end their ``__init__`` signature with ``**unknown`` and call this first, so a typo
    is reported as a pipeline definition error (with file and line) rather than a TypeError.
    """
    if not unknown:
        return
    import difflib

    params = inspect.signature(type(step).__init__).parameters.values()
    known = sorted(
        p.name for p in params if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD
    )
    known = [k for k in known if k != "self"]
    bad = sorted(unknown)[0]
    close = difflib.get_close_matches(bad, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise PipelineDefinitionError(
        f"{step.kind} step: unknown option {bad!r}{hint} (options: {', '.join(known)})"
    )


@dataclass
class Stage:
    """A named group of steps, run one after another or in parallel."""

    name: str
    steps: list[Step]
    parallel: bool = False
    continue_on_failure: bool = False
    description: str = ""


Stage.__module__ = "shipyard"


def stage(
    name: str,
    *steps: Step,
    parallel: bool = False,
    continue_on_failure: bool = False,
    description: str = "",
) -> Stage:
    """Build a stage.

    :param name: shown in progress and history.
    :param steps: the steps, in order.
    :param parallel: run the steps at the same time.
    :param continue_on_failure: a failing step stops neither this stage nor later ones; it is
        recorded as a warning.
    """
    if not isinstance(name, str) or not name:
        raise PipelineDefinitionError(f"stage name must be a non-empty string, got {name!r}")
    for i, s in enumerate(steps, 1):
        if isinstance(s, (list, tuple)):
            raise PipelineDefinitionError(
                f"stage {name!r}: step {i} is a {type(s).__name__}; pass steps as separate "
                f"arguments: stage({name!r}, *steps)"
            )
        if not isinstance(s, Step):
            raise PipelineDefinitionError(
                f"stage {name!r}: step {i} is {s!r}, not a step; build steps with "
                "shipyard.command(), shipyard.python(), shipyard.wait(), ..."
            )
    if len(steps) > 1 and any(s.kind == "approval" for s in steps):
        raise PipelineDefinitionError(
            f"stage {name!r}: an approval step must be alone in its stage (the deployment stops "
            "there); put it in a stage of its own, e.g. sy.stage('approve', sy.approval(...))"
        )
    for i, s in enumerate(steps):
        if getattr(s, "gate", None) is not None and (parallel or i != len(steps) - 1):
            raise PipelineDefinitionError(
                f"stage {name!r}: step {s.name!r} may stop the deployment for an approval "
                f"({s.name} with on_inconclusive=sy.approval(...)), so it must be the last step "
                "of a sequential stage; move the steps after it to the next stage"
            )
    return Stage(name, list(steps), parallel, continue_on_failure, description)


class Pipeline(Generic[P]):
    """A deployment pipeline: the decorated function and its options."""

    def __init__(
        self,
        func: Callable[..., Any],
        *,
        name: str | None = None,
        environments: Sequence[str | Environment] | None = None,
        rollback: _RollbackMode = "manual",
        notify: Sequence[Any] = (),
    ) -> None:
        if rollback not in ("auto", "manual", False):
            raise PipelineDefinitionError(
                f"pipeline {name or func.__name__!r}: rollback must be 'auto', 'manual' or False, "
                f"got {rollback!r}"
            )
        if isinstance(environments, str):
            environments = [environments]
        self.func = func
        self.name: str = name or func.__name__
        #: Environments declared with ``shipyard.environment(...)``, by name.
        self.environment_specs: dict[str, Any] = {}
        names: list[str] | None = None
        if environments is not None:
            names = []
            for e in environments:
                if not isinstance(e, str):
                    from ._environments import Environment

                    if not isinstance(e, Environment):
                        raise PipelineDefinitionError(
                            f"pipeline {self.name!r}: environments holds {e!r}; give names or "
                            "shipyard.environment(...) objects"
                        )
                    self.environment_specs[e.name] = e
                    e = e.name
                names.append(e)
        self.environments: list[str] | None = names
        self.rollback: _RollbackMode = rollback
        self.notify = list(notify)
        self.description: str = inspect.cleandoc(func.__doc__ or "")
        code = getattr(func, "__code__", None)
        self.location: tuple[str, int] = (
            (code.co_filename, code.co_firstlineno) if code else ("<unknown>", 0)
        )
        functools.update_wrapper(self, func)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Pipeline {self.name!r}>"

    def allows(self, environment: str) -> bool:
        return self.environments is None or environment in self.environments

    def build(self, deployment: Deployment) -> list[Stage]:
        """Call the pipeline function and check what it returned.

        :raises PipelineDefinitionError: naming the file and line of the culprit.
        """
        path, line = self.location
        try:
            stages = self.func(deployment)
        except PipelineDefinitionError as exc:
            raise _located(exc, self, exc.__traceback__) from None
        except Exception as exc:
            err = _located(
                PipelineDefinitionError(f"{type(exc).__name__}: {exc}"), self, exc.__traceback__
            )
            raise err from exc
        if isinstance(stages, Stage):
            stages = [stages]
        if not isinstance(stages, (list, tuple)):
            raise PipelineDefinitionError(
                f"pipeline {self.name!r} returned {type(stages).__name__}, not a list of stages; "
                "return [shipyard.stage(...), ...]",
                path=path,
                lineno=line,
            )
        seen: set[str] = set()
        for i, s in enumerate(stages, 1):
            if not isinstance(s, Stage):
                raise PipelineDefinitionError(
                    f"pipeline {self.name!r}: item {i} of the returned list is {s!r}, not a stage; "
                    "wrap steps in shipyard.stage(name, *steps)",
                    path=path,
                    lineno=line,
                )
            if s.name in seen:
                raise PipelineDefinitionError(
                    f"pipeline {self.name!r}: two stages are named {s.name!r}; stage names must "
                    "be unique",
                    path=path,
                    lineno=line,
                )
            seen.add(s.name)
        if not stages:
            raise PipelineDefinitionError(
                f"pipeline {self.name!r} returned no stages", path=path, lineno=line
            )
        return list(stages)


Pipeline.__module__ = "shipyard"


def _located(exc: PipelineDefinitionError, pipe: Pipeline[Any], tb: Any) -> PipelineDefinitionError:
    """Attach the innermost line of the pipelines file in ``tb`` to ``exc``."""
    path, line = pipe.location
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == path:
            line = tb.tb_lineno
        tb = tb.tb_next
    msg = exc.message
    if f"pipeline {pipe.name!r}" not in msg:
        msg = f"in pipeline {pipe.name!r}: {msg}"
    return PipelineDefinitionError(msg, path=path, lineno=line)


@overload
def pipeline(func: Callable[P, R], /) -> Pipeline[P]: ...


@overload
def pipeline(
    *,
    name: str | None = None,
    environments: Sequence[str | Environment] | None = None,
    rollback: _RollbackMode = "manual",
    notify: Sequence[Any] = (),
) -> Callable[[Callable[P, R]], Pipeline[P]]: ...


def pipeline(
    func: Callable[P, R] | None = None,
    /,
    *,
    name: str | None = None,
    environments: Sequence[str | Environment] | None = None,
    rollback: _RollbackMode = "manual",
    notify: Sequence[Any] = (),
) -> Pipeline[P] | Callable[[Callable[P, R]], Pipeline[P]]:
    """Mark a function as a deployment pipeline.

    Works bare (``@pipeline``) and with options (``@pipeline(environments=[...])``).

    :param name: the pipeline's name; the function's name by default.
    :param environments: where it may deploy; anywhere when None.
    :param rollback: ``"auto"`` redeploys the previous successful version when a deployment fails,
        ``"manual"`` only on ``shipyard rollback``, ``False`` refuses rollback.
    :param notify: notification sinks, e.g. ``[shipyard.webhook(url)]``.
    """
    if func is None:
        return functools.partial(  # type: ignore[return-value]
            pipeline, name=name, environments=environments, rollback=rollback, notify=notify
        )
    if not callable(func):
        raise PipelineDefinitionError(f"@pipeline decorates a function, got {func!r}")
    return Pipeline(func, name=name, environments=environments, rollback=rollback, notify=notify)
