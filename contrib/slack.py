"""Slack notifications through an incoming webhook.

::

    from shipyard.contrib.slack import slack

    @sy.pipeline(notify=[slack(sy.secret("SLACK_WEBHOOK_URL"))])
    def webapp(d): ...

or ``shipyard -p shipyard.contrib.slack deploy ... --notify slack:https://hooks.slack.com/...``.

One message when a deployment starts, one when it ends (status and duration, the error when it
failed) and one when a rollback starts; stage and step events are not sent. Messages carry the
pipeline, version, environment and deployment id, and no links (``unfurl_*`` off, ``<``, ``>``
and ``&`` escaped, so nothing in an error message becomes a link or a mention). A Slack webhook
URL is itself a credential: the sink's name shows only the host, and errors never show the URL.
Delivery, retries and timeouts are those of :func:`shipyard.webhook`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from typing import Any

from shipyard import webhook as WebhookNotifier
from shipyard.sdk import hookimpl

if TYPE_CHECKING:
    from shipyard.sdk import NotifierRegistry

#: The longest error text put in a message.
MAX_ERROR = 500

_ICONS = {
    "started": ":rocket:",
    "succeeded": ":white_check_mark:",
    "failed": ":x:",
    "cancelled": ":no_entry_sign:",
    "interrupted": ":warning:",
    "rollback": ":rewind:",
}


def escape(text: str) -> str:
    """``text`` safe for Slack's mrkdwn: ``&``, ``<`` and ``>`` escaped (no links, no mentions)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def duration(started_at: str | None, finished_at: str | None) -> str | None:
    """``"2m05s"`` between two ISO timestamps of the payload, or None if one is missing."""
    if not started_at or not finished_at:
        return None
    from shipyard.sdk import parse_ts

    try:
        seconds = max(0.0, parse_ts(finished_at) - parse_ts(started_at))
    except ValueError:
        return None
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def message(payload: dict[str, Any]) -> str | None:
    """The message text for one event payload, or None for events Slack does not get."""
    d = payload["deployment"]
    what = f"*{escape(str(d['pipeline']))}* {escape(str(d['version']))} to {escape(str(d['environment']))}"
    ident = f"deployment #{d['id']}"
    rollback = f", rollback of #{d['rollback_of']}" if d.get("rollback_of") else ""
    event = payload.get("event")
    if event == "deployment_started":
        verb = "Rollback started" if d.get("rollback_of") else "Deploying"
        if payload.get("resumed"):
            verb = "Resumed after approval"
        return f"{_ICONS['started']} {verb}: {what} ({ident}{rollback})"
    if event == "deployment_finished":
        status = str(payload.get("status") or "finished")
        took = duration(payload.get("started_at"), payload.get("finished_at"))
        text = f"{_ICONS.get(status, ':information_source:')} {what}: *{escape(status)}*"
        if took:
            text += f" in {took}"
        text += f" ({ident}{rollback})"
        error = payload.get("error")
        if error:
            error = str(error)
            if len(error) > MAX_ERROR:
                error = error[:MAX_ERROR] + "..."
            text += "\n> " + escape(error).replace("\n", "\n> ")
        return text
    if event == "deployment_suspended":
        cmds = payload.get("commands") or {}
        expires = escape(str(payload.get("expires_at") or "?"))
        return (
            f":raised_hand: Awaiting approval: {what} ({ident}) at stage "
            f"*{escape(str(payload.get('stage')))}*, until {expires}\n"
            f"> approve: `{escape(str(cmds.get('approve')))}`\n"
            f"> reject: `{escape(str(cmds.get('reject')))}`"
        )
    if event == "approval_reminder":
        cmds = payload.get("commands") or {}
        return (
            f":alarm_clock: Still awaiting approval: {what} ({ident}) at stage "
            f"*{escape(str(payload.get('stage')))}*, since "
            f"{escape(str(payload.get('requested_at')))}, until "
            f"{escape(str(payload.get('expires_at')))} ({payload.get('approvals', 0)} of "
            f"{payload.get('required', 1)} approvals)\n"
            f"> approve: `{escape(str(cmds.get('approve')))}`\n"
            f"> reject: `{escape(str(cmds.get('reject')))}`"
        )
    if event == "approval_decided":
        verb = {"approve": "Approved", "reject": "Rejected", "cancel": "Cancelled",
                "supersede": "Superseded"}.get(str(payload.get("decision")), "Decided")  # fmt: skip
        text = (
            f":white_check_mark: {verb} by {escape(str(payload.get('user')))}: {what} "
            f"({ident}) at stage *{escape(str(payload.get('stage')))}*"
        )
        if payload.get("decision") != "approve":
            text = ":no_entry: " + text.split(" ", 1)[1]
        if payload.get("outcome") == "recorded":
            text += f" ({payload.get('approvals')} of {payload.get('required')} approvals)"
        if payload.get("comment"):
            text += "\n> " + escape(str(payload["comment"])).replace("\n", "\n> ")
        return text
    if event == "approval_expired":
        return (
            f":hourglass: Approval expired: {what} ({ident}) at stage "
            f"*{escape(str(payload.get('stage')))}*; default outcome: "
            f"*{escape(str(payload.get('outcome')))}*"
        )
    if event == "analysis_started":
        metrics = ", ".join(escape(str(m.get("metric"))) for m in payload.get("metrics") or [])
        return (
            f":mag: Analysis started: {what} ({ident}) at step "
            f"*{escape(str(payload.get('step')))}*: {metrics}"
        )
    if event == "analysis_finished":
        verdict = str(payload.get("verdict") or "stopped")
        icon = {"successful": ":white_check_mark:", "inconclusive": ":grey_question:"}.get(
            verdict, ":x:"
        )
        return (
            f"{icon} Analysis *{escape(verdict)}* ({escape(str(payload.get('outcome')))}): "
            f"{what} ({ident}) at step *{escape(str(payload.get('step')))}*\n"
            f"> {escape(str(payload.get('summary')))}"
        )
    if event == "canary_step_reached":
        return (
            f":bird: Canary at *{payload.get('percent')}%*: {what} ({ident}), "
            f"{escape(str(payload.get('service')))} on {escape(str(payload.get('new')))}"
        )
    if event == "rollback_started":
        target = escape(str(payload.get("target_version") or "?"))
        reason = payload.get("reason")
        text = (
            f"{_ICONS['rollback']} Rolling back *{escape(str(d['pipeline']))}* in "
            f"{escape(str(d['environment']))} to {target} (after {ident}, version "
            f"{escape(str(d['version']))})"
        )
        if reason:
            text += f": {escape(str(reason))}"
        return text
    return None


class SlackNotifier(WebhookNotifier):
    """Posts deployment started/finished and rollback events to a Slack incoming webhook."""

    kind = "slack"
    default_events = frozenset({"deployment_started", "deployment_finished", "rollback_started"})

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 10.0,
        request_timeout: float = 5.0,
        retries: int = 3,
        name: str | None = None,
    ) -> None:
        super().__init__(
            url, timeout=timeout, request_timeout=request_timeout, retries=retries, name=name
        )

    def shown_url(self) -> str:
        # The whole path of a Slack webhook URL is the credential.
        from urllib.parse import urlsplit

        from shipyard.sdk import mask

        try:
            host = urlsplit(mask(self.url)).hostname
        except ValueError:
            host = None
        return host or "***"

    def render(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        text = message(payload)
        if text is None:
            return None
        return {"text": text, "unfurl_links": False, "unfurl_media": False}


def slack(
    url: str,
    *,
    timeout: float = 10.0,
    request_timeout: float = 5.0,
    retries: int = 3,
    name: str | None = None,
) -> SlackNotifier:
    """A sink posting to the Slack incoming webhook ``url`` (best given as ``sy.secret(...)``).

    :param timeout: the most the deployment waits for Slack at its end (seconds).
    :param request_timeout: the timeout of one request.
    :param retries: extra attempts after a connection error, a timeout, 429 or 5xx.
    """
    return SlackNotifier(
        url, timeout=timeout, request_timeout=request_timeout, retries=retries, name=name
    )


@hookimpl
def shipyard_register_notifiers(registry: NotifierRegistry) -> None:
    registry.add("slack", slack)
