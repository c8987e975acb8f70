"""The ``shipyard.docker`` object users call (imported when a pipeline uses it)."""

from __future__ import annotations

from typing import TYPE_CHECKING
from typing import Final
from typing import final

from ._run import DockerRunStep
from ._service import DockerServiceStep

if TYPE_CHECKING:
    pass


@final
class DockerSteps:
    """``shipyard.docker``: the Docker step types, ``docker.run`` and ``docker.service``."""

    run: Final = DockerRunStep
    service: Final = DockerServiceStep

    def __repr__(self) -> str:
        return "<shipyard.docker: run, service>"


docker: Final = DockerSteps()
