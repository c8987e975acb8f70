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


#: The variables by which common CI systems name who started the job.
CI_ACTOR_VARIABLES = ("GITHUB_ACTOR", "GITLAB_USER_LOGIN", "BUILDKITE_BUILD_CREATOR",
                      "CIRCLE_USERNAME")  # fmt: skip


def ci_actor() -> str | None:
    """The CI identity from the standard variables of common CI systems."""
    for var in CI_ACTOR_VARIABLES:
        if os.environ.get(var):
            return f"{var}={os.environ[var]}"
    return None


def actor() -> str:
    """Who does something by hand, for the audit trail: the user, and the CI identity if any."""
    ci = ci_actor()
    return f"{current_user()} ({ci})" if ci else current_user()


def runner_identity() -> str | None:
    """Which CI job runs this process, as a link where the CI system gives one: recorded with
    a lock on a shared store, so that a refused runner can name the job holding it."""
    env = os.environ
    if env.get("GITHUB_RUN_ID") and env.get("GITHUB_REPOSITORY"):
        server = env.get("GITHUB_SERVER_URL", "https://github.com")
        return f"{server}/{env['GITHUB_REPOSITORY']}/actions/runs/{env['GITHUB_RUN_ID']}"
    for var in ("CI_JOB_URL", "BUILDKITE_BUILD_URL", "CIRCLE_BUILD_URL", "BUILD_URL"):
        if env.get(var):
            return env[var]
    return env.get("SHIPYARD_RUNNER") or None


def decider() -> str:
    """Who approves or rejects a gate: ``SHIPYARD_USER``, then the CI identity (the login of
    the CI actor, as GitHub and GitLab give it), then the OS user."""
    if os.environ.get("SHIPYARD_USER"):
        return os.environ["SHIPYARD_USER"]
    for var in CI_ACTOR_VARIABLES:
        if os.environ.get(var):
            return os.environ[var]
    return current_user()
