"""Who does something: the user and the CI identity recorded with deployments and audits."""

from __future__ import annotations

import os


def current_user() -> str:
    """``SHIPYARD_USER``, else the OS user."""
    for var in ("SHIPYARD_USER", "USER", "LOGNAME", "USERNAME"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return "unknown"


def ci_actor() -> str | None:
    """The CI identity from the standard variables of common CI systems."""
    for var in ("GITHUB_ACTOR", "GITLAB_USER_LOGIN", "BUILDKITE_BUILD_CREATOR", "CIRCLE_USERNAME"):
        if os.environ.get(var):
            return f"{var}={os.environ[var]}"
    return None


def actor() -> str:
    """Who does something by hand, for the audit trail: the user, and the CI identity if any."""
    ci = ci_actor()
    return f"{current_user()} ({ci})" if ci else current_user()
