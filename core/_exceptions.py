"""The error tree of Shipyard.

Every error a user can meet derives from :class:`ShipyardError`, knows the exit code the CLI
uses for it and how to show itself::

    ShipyardError                       exit 2 unless stated
    ├── UsageError                      bad arguments, missing files
    ├── PipelineFileError               pipelines.py failed to import
    ├── PipelineDefinitionError         a pipeline, stage or step is malformed
    ├── HistoryError                    the history store cannot be used
    └── DeploymentError                 about running a deployment
        ├── PipelineNotFound
        ├── DeploymentNotFound
        ├── NoPreviousDeployment
        ├── RollbackRefused
        ├── PromotionRefused            a version that did not pass where it must first
        ├── EnvironmentLocked           exit 3
        ├── SecretMissing               exit 1
        └── StepFailed                  exit 1
            └── HealthCheckFailed

``ShipyardWarning`` is the base of every warning Shipyard emits.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any
from typing import NoReturn


class ExitCode(enum.IntEnum):
    """Exit codes of the ``shipyard`` command."""

    #: The command or deployment succeeded.
    OK = 0
    #: The deployment failed or was cancelled (also when an automatic rollback then succeeded).
    FAILED = 1
    #: Usage, pipelines-file or not-found error; a refused rollback.
    USAGE_ERROR = 2
    #: The environment is locked by another deployment.
    LOCKED = 3
    #: The deployment stopped at an approval gate and awaits a decision (``shipyard approve``).
    AWAITING_APPROVAL = 4
    #: Interrupted by Ctrl-C or SIGTERM.
    INTERRUPTED = 130


ExitCode.__module__ = "shipyard"


class ShipyardError(Exception):
    """Base class of every Shipyard error."""

    #: The exit code the CLI uses when this error ends a command.
    exit_code: int = ExitCode.USAGE_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def show(self) -> str:
        """The text the CLI prints for this error."""
        return f"Error: {self.message}"


class ShipyardWarning(UserWarning):
    """Base class of the warnings Shipyard emits."""


class UsageError(ShipyardError):
    """Bad command-line usage or configuration."""


class PipelineFileError(ShipyardError):
    """The pipelines file could not be loaded.

    :param path: the pipelines file.
    :param lineno: the line the error points at, when known.
    :param cause: the exception raised while loading.
    """

    def __init__(
        self,
        path: str,
        message: str,
        *,
        lineno: int | None = None,
        cause: BaseException | None = None,
    ) -> None:
        where = f"{path}:{lineno}" if lineno else str(path)
        super().__init__(f"{where}: {message}")
        self.path = path
        self.lineno = lineno
        self.cause = cause


class PipelineDefinitionError(ShipyardError):
    """A pipeline, a stage or a step is malformed.

    Raised while a pipeline function runs (``plan``, ``deploy``); the CLI adds the file and line.
    """

    def __init__(self, message: str, *, path: str | None = None, lineno: int | None = None) -> None:
        if path:
            message = f"{path}:{lineno}: {message}" if lineno else f"{path}: {message}"
        super().__init__(message)
        self.path = path
        self.lineno = lineno


class HistoryError(ShipyardError):
    """The history store cannot be opened, read or written."""


class LockLost(HistoryError):
    """A running deployment's lock was taken from it (its session ended, or another process
    took it over): the deployment stops and is recorded ``interrupted``. Raised by a store's
    writes for that deployment (a fencing check); the engine stops the run on it."""

    exit_code = ExitCode.FAILED


class DeploymentError(ShipyardError):
    """An error about running a deployment."""


class ApprovalRefused(DeploymentError):
    """An approval or rejection that may not be made: not waiting, already decided, expired,
    self-approval, not among the approvers, or refused by a policy hook."""


class PipelineChanged(DeploymentError):
    """The stages a waiting deployment already ran are no longer those of its pipeline."""


class PipelineNotFound(DeploymentError):
    """No pipeline has the requested name."""

    def __init__(self, name: str, known: Iterable[str], path: str = "pipelines.py") -> None:
        known = sorted(known)
        defined = ", ".join(repr(k) for k in known) or "none"
        msg = f"no pipeline {name!r} in {path} (defined: {defined})"
        import difflib

        close = difflib.get_close_matches(name, known, n=1)
        if close:
            msg += f"; did you mean {close[0]!r}?"
        super().__init__(msg)
        self.name = name


class DeploymentNotFound(DeploymentError):
    """No deployment has the requested id."""

    def __init__(self, ident: Any, hint: str = "") -> None:
        msg = f"no deployment {ident!r} in the history"
        super().__init__(msg + (f" ({hint})" if hint else "; `shipyard history` lists them"))
        self.ident = ident


class NoPreviousDeployment(DeploymentError):
    """A rollback found no earlier successful deployment to return to."""


class RollbackRefused(DeploymentError):
    """The pipeline does not allow rollback (``rollback=False``)."""


class PromotionRefused(DeploymentError):
    """A version may not deploy to an environment before it succeeded in those it
    ``requires``, or ``promote`` found nothing succeeded to take further."""


class EnvironmentLocked(DeploymentError):
    """Another deployment holds the lock of this pipeline and environment."""

    exit_code = ExitCode.LOCKED

    def __init__(self, message: str, holder: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.holder = holder or {}


class SecretMissing(DeploymentError):
    """A secret the pipeline uses is not set; no step has run."""

    exit_code = ExitCode.FAILED


class StepFailed(DeploymentError):
    """A step failed. Steps raise it to fail with a message of their own.

    :param message: what went wrong, shown to the user and recorded.
    :param exit_code: the process or container exit code, when there is one.
    :param output: the last lines of output worth showing with the error.
    """

    exit_code = ExitCode.FAILED

    def __init__(
        self,
        message: str,
        *,
        step_exit_code: int | None = None,
        output: Iterable[str] = (),
    ) -> None:
        super().__init__(message)
        self.step_exit_code = step_exit_code
        self.output = list(output)


class HealthCheckFailed(StepFailed):
    """A health check did not see a healthy answer before its deadline."""


class Skipped(Exception):
    """Raised by :func:`shipyard.skip`: the step ends ``skipped`` with the reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def skip(reason: str) -> NoReturn:
    """End the current step as ``skipped`` (from a python step or a step type's ``run``)."""
    raise Skipped(reason)


def fail(reason: str) -> NoReturn:
    """End the current step as ``failed`` with ``reason`` and no traceback."""
    raise StepFailed(reason)


class Cancelled(BaseException):
    """Raised inside the runner when a deployment is cancelled (signal or ``shipyard cancel``)."""


for _cls in list(globals().values()):
    if isinstance(_cls, type) and issubclass(_cls, (ShipyardError, ShipyardWarning)):
        _cls.__module__ = "shipyard"
