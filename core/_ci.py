"""CI-native output and report files (issue #19).

On GitHub Actions (``GITHUB_ACTIONS=true``) or GitLab CI (``GITLAB_CI=true``), or as chosen by
``--ci github|gitlab|none``, the console reporter folds each stage of a deployment and points at
what failed, in the CI's own syntax:

- GitHub: `workflow commands
  <https://docs.github.com/en/actions/reference/workflow-commands-for-github-actions>`_ —
  ``::add-mask::`` for each secret value before any output, a ``::group::``/``::endgroup::``
  block per stage, an ``::error`` (``::warning`` in a ``continue_on_failure`` stage) annotation
  per failed step with its error and last output lines, and a Markdown summary appended to
  ``$GITHUB_STEP_SUMMARY``.
- GitLab: `collapsible sections
  <https://docs.gitlab.com/ci/jobs/job_logs/#custom-collapsible-sections>`_ per stage, and a
  summary at the end of the log.

``deploy --junit PATH`` and ``--report-json PATH`` write, once the deployment has ended, a JUnit
XML report and the JSON document of ``deploy --json``. Summaries and reports are made from the
recorded history, not from the events, so they say what ``shipyard show`` says.

Every string written goes through :func:`~shipyard._secrets.mask`; only the ``::add-mask::``
lines carry secret values, for GitHub to hide them from the log.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections import deque
from collections.abc import Iterable
from collections.abc import Mapping
from typing import IO
from typing import TYPE_CHECKING
from typing import Any

from ._secrets import mask

if TYPE_CHECKING:
    from ._service import DeploymentService

#: The values of ``--ci``.
CHOICES = ("github", "gitlab", "none")
#: How many of a failed step's last output lines an annotation or a JUnit failure shows.
TAIL_LINES = 20


def detect(choice: str | None = None, environ: Mapping[str, str] | None = None) -> CiFormat | None:
    """The CI format to write: ``choice`` (``--ci``) if given, else the one the standard
    variables name (``GITHUB_ACTIONS=true``, ``GITLAB_CI=true``); None: plain output."""
    env = os.environ if environ is None else environ
    if choice is None:
        if env.get("GITHUB_ACTIONS") == "true":
            choice = "github"
        elif env.get("GITLAB_CI") == "true":
            choice = "gitlab"
    if choice == "github":
        return GitHub(summary_path=env.get("GITHUB_STEP_SUMMARY") or None)
    if choice == "gitlab":
        return GitLab()
    return None


def failure_message(error: str | None, tail: Iterable[str]) -> str:
    """A failed step's error followed by its last output lines (masked)."""
    lines = list(tail)
    text = error or "failed"
    if lines:
        text += f"\nlast {len(lines)} output line{'s' if len(lines) > 1 else ''}:\n"
        text += "\n".join(lines)
    return mask(text)


class CiFormat:
    """How one CI system wants stages folded and failures shown; used by
    :class:`~shipyard._console.ConsoleReporter`. This base class writes nothing of its own."""

    name = "none"

    def preamble(self) -> list[str]:
        """Lines to write before a deployment's output, unmasked (GitHub: ``::add-mask::``)."""
        return []

    def open_stage(self, deployment_id: int, index: int, name: str, title: str) -> str:
        """The line that starts the fold of stage ``name``; ``title`` is its ``[i/N] name``
        line."""
        raise NotImplementedError

    def close_stage(self) -> str:
        """The line that ends the fold opened last."""
        raise NotImplementedError

    def annotation(self, title: str, message: str, *, warning: bool = False) -> list[str]:
        """Lines that make the CI show a failure where it shows failures (none by default)."""
        return []

    def finish(self, docs: list[dict[str, Any]], write: Any) -> None:
        """Summarise the finished deployment ``docs[0]`` (and its automatic rollback ``docs[1]``);
        ``write`` prints a line to the log."""


# -- GitHub Actions --------------------------------------------------------------------------------


def escape_data(text: str) -> str:
    """``text`` as the message of a workflow command (``%``, CR, LF escaped)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """``text`` as a property value of a workflow command (also ``:`` and ``,``)."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


class GitHub(CiFormat):
    """Workflow commands for GitHub Actions, and the job summary."""

    name = "github"

    def __init__(self, summary_path: str | None = None) -> None:
        #: The file named by ``$GITHUB_STEP_SUMMARY`` (None: no summary).
        self.summary_path = summary_path
        self._masked: set[str] = set()

    def preamble(self) -> list[str]:
        from ._secrets import MIN_LENGTH
        from ._secrets import registered

        out = []
        for value in registered():
            # GitHub masks line by line: each line of a multi-line value on its own.
            for part in re.split(r"[\r\n]+", value):
                part = part.strip()
                if len(part) >= MIN_LENGTH and part not in self._masked:
                    self._masked.add(part)
                    out.append(f"::add-mask::{escape_data(part)}")
        return out

    def open_stage(self, deployment_id: int, index: int, name: str, title: str) -> str:
        return f"::group::{escape_data(mask(title))}"

    def close_stage(self) -> str:
        return "::endgroup::"

    def annotation(self, title: str, message: str, *, warning: bool = False) -> list[str]:
        kind = "warning" if warning else "error"
        return [f"::{kind} title={escape_property(mask(title))}::{escape_data(mask(message))}"]

    def finish(self, docs: list[dict[str, Any]], write: Any) -> None:
        if self.summary_path is None:
            return
        with open(self.summary_path, "a", encoding="utf-8") as f:
            f.write(markdown_summary(docs))


def _cell(text: Any) -> str:
    """``text`` in a Markdown table cell."""
    import html

    escaped = html.escape(mask(str(text)), quote=False)
    return escaped.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def _fenced(text: str) -> str:
    """``text`` in a fenced code block whose fence no run of backticks inside can close."""
    runs = re.findall(r"`+", text)
    fence = "`" * max(3, 1 + max((len(r) for r in runs), default=0))
    return f"{fence}text\n{mask(text)}\n{fence}\n"


_ICONS = {"succeeded": "✅", "failed": "❌", "cancelled": "⛔", "interrupted": "⛔",
          "skipped": "⏭️", "awaiting_approval": "⏸️", "waiting": "⏸️"}  # fmt: skip


def _step_status(step: Mapping[str, Any]) -> str:
    status = str(step["status"])
    label = "warning" if step.get("warning") else status
    icon = "⚠️" if step.get("warning") else _ICONS.get(status, "")
    text = f"{icon} {label}".strip()
    if step.get("exit_code") not in (None, 0):
        text += f" (exit {step['exit_code']})"
    if (step.get("attempts") or 0) > 1:
        text += f", {step['attempts']} attempts"
    return text


def markdown_summary(docs: list[dict[str, Any]]) -> str:
    """The job summary of a deployment (``docs[0]``) and of its automatic rollback, if any."""
    doc = docs[0]
    head = [_ICONS.get(doc["status"], ""), "Shipyard:", _cell(doc["pipeline"]),
            _cell(doc["version"]), "to", _cell(doc["environment"]), _cell(doc["status"])]  # fmt: skip
    out = ["## " + " ".join(p for p in head if p), ""]
    out += _markdown_deployment(doc)
    for rb in docs[1:]:
        head = ["### Rollback: deployment", f"#{rb['id']}", "to version", _cell(rb["version"]),
                _ICONS.get(rb["status"], ""), _cell(rb["status"])]  # fmt: skip
        out += [" ".join(p for p in head if p), ""]
        out += _markdown_deployment(rb)
    return "\n".join(out) + "\n"


def _markdown_deployment(doc: dict[str, Any]) -> list[str]:
    note = ""
    if doc.get("rollback_of"):
        note = f"rollback of #{doc['rollback_of']}"
    elif doc.get("retry_of"):
        note = f"retry of #{doc['retry_of']}"
    out = [
        "| Deployment | Pipeline | Version | Environment | Status | Duration | Note |",
        "|---|---|---|---|---|---|---|",
        f"| #{doc['id']} | {_cell(doc['pipeline'])} | {_cell(doc['version'])} | "
        f"{_cell(doc['environment'])} | {_cell(doc['status'])} | {_took(doc)} | {_cell(note)} |",
        "",
    ]
    if doc.get("stages"):
        out += ["| Stage | Step | Status | Duration |", "|---|---|---|---|"]
        for s in doc["stages"]:
            for st in s["steps"]:
                out.append(
                    f"| {_cell(s['name'])} | {_cell(st['name'])} | {_cell(_step_status(st))} | "
                    f"{_took(st)} |"
                )
        out.append("")
    if doc.get("error"):
        out += [_fenced(doc["error"])]
    return out


def _took(doc: Mapping[str, Any]) -> str:
    from ._console import fmt_duration
    from ._reports import parse_ts

    if not doc.get("started_at") or not doc.get("finished_at"):
        return "-"
    return fmt_duration(max(0.0, parse_ts(doc["finished_at"]) - parse_ts(doc["started_at"])))


# -- GitLab CI -------------------------------------------------------------------------------------


def section_name(text: str) -> str:
    """``text`` as a section name: only ``[a-z0-9_]``."""
    return re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_")[:60] or "x"


class GitLab(CiFormat):
    """Collapsible sections for GitLab CI, and a summary at the end of the log."""

    name = "gitlab"

    def __init__(self) -> None:
        self._open: list[str] = []

    @staticmethod
    def _start(name: str, header: str, *, collapsed: bool = True) -> str:
        from ._console import sanitize

        flag = "[collapsed=true]" if collapsed else ""
        return (
            f"\x1b[0Ksection_start:{int(time.time())}:{name}{flag}\r\x1b[0K{sanitize(mask(header))}"
        )

    @staticmethod
    def _end(name: str) -> str:
        return f"\x1b[0Ksection_end:{int(time.time())}:{name}\r\x1b[0K"

    def open_stage(self, deployment_id: int, index: int, name: str, title: str) -> str:
        # The deployment's id in the name: a rollback's stages have the same names.
        section = f"shipyard_{deployment_id}_{index + 1}_{section_name(mask(name))}"
        self._open.append(section)
        return self._start(section, title)

    def close_stage(self) -> str:
        return self._end(self._open.pop())

    def finish(self, docs: list[dict[str, Any]], write: Any) -> None:
        name = f"shipyard_{docs[0]['id']}_summary"
        write(self._start(name, f"summary of deployment #{docs[0]['id']}", collapsed=False))
        for line in text_summary(docs):
            write(line)
        write(self._end(name))


def text_summary(docs: list[dict[str, Any]]) -> list[str]:
    """A plain-text summary of a deployment and its automatic rollback, one table each."""
    from ._console import sanitize

    out: list[str] = []
    for i, doc in enumerate(docs):
        head = "rollback: " if i else ""
        out.append(
            f"{head}deployment #{doc['id']}: {doc['pipeline']} {doc['version']} -> "
            f"{doc['environment']}  {doc['status']}  {_took(doc)}"
        )
        rows = [
            [s["name"], st["name"], "warning" if st.get("warning") else str(st["status"]),
             _took(st), "" if st.get("exit_code") in (None, 0) else f"exit {st['exit_code']}"]
            for s in doc.get("stages", [])
            for st in s["steps"]
        ]  # fmt: skip
        headers = ["STAGE", "STEP", "STATUS", "TOOK", ""]
        widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
        for row in [headers, *rows] if rows else []:
            out.append(
                "  " + "  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip()
            )
        if doc.get("error"):
            out += [f"  error: {line}" for line in doc["error"].splitlines()]
    return [sanitize(mask(line)) for line in out]


# -- after the deployment: summaries and report files ---------------------------------------------


def finish(
    service: DeploymentService,
    dep_id: int,
    *,
    rollback_id: int | None = None,
    ci: CiFormat | None = None,
    write: Any = None,
    junit: str | None = None,
    report_json: str | None = None,
) -> None:
    """Once deployment ``dep_id`` has ended: its CI summary, ``--junit`` and ``--report-json``
    files, from the recorded history. A file that cannot be written is a warning: the
    deployment's outcome (and exit code) stays what it was."""
    if ci is None and junit is None and report_json is None:
        return
    docs = [service.document(dep_id)]
    if rollback_id is not None:
        docs.append(service.document(rollback_id))
    if ci is not None:
        _attempt(
            "the CI summary", getattr(ci, "summary_path", None), lambda: ci.finish(docs, write)
        )
    if junit is not None:
        _attempt("the JUnit report", junit, lambda: write_junit(junit, docs, _tails(service, docs)))
    if report_json is not None:
        _attempt("the JSON report", report_json, lambda: write_report_json(report_json, docs))


def _attempt(what: str, path: str | None, job: Any) -> None:
    try:
        job()
    except OSError as exc:
        where = f" to {path}" if path else ""
        print(mask(f"shipyard: warning: could not write {what}{where}: {exc}"), file=sys.stderr)


def write_report_json(path: str, docs: list[dict[str, Any]]) -> None:
    """The document ``deploy --json`` prints (``show ID --json``, with ``rollback`` when an
    automatic rollback ran), written to ``path``."""
    import json

    from ._secrets import mask_any

    doc = dict(docs[0])
    if len(docs) > 1:
        from ._service import STAGE_KEYS

        doc["rollback"] = {k: v for k, v in docs[1].items() if k not in STAGE_KEYS}
    write_atomically(path, (json.dumps(mask_any(doc), indent=2) + "\n").encode())


_Tails = dict[tuple[int, int, int], deque[str]]


def _tails(service: DeploymentService, docs: list[dict[str, Any]]) -> _Tails:
    """The last :data:`TAIL_LINES` output lines of each step, by (deployment, stage, step)."""
    tails: _Tails = {}
    for doc in docs:
        for r in service.logs(doc["id"]):
            if r["stage_idx"] is None or r["step_idx"] is None:
                continue
            key = (doc["id"], r["stage_idx"], r["step_idx"])
            tail = tails.get(key)
            if tail is None:
                tail = tails[key] = deque(maxlen=TAIL_LINES)
            tail.append(r["line"])
    return tails


#: Characters XML 1.0 cannot hold, even escaped; compiled when a report is first written (a class this wide
#: costs a deployment that writes none several milliseconds of start-up).
_NOT_XML = "[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"


def _xml(text: Any) -> str:
    from ._console import sanitize

    lines = str(text).split("\n")
    return re.sub(_NOT_XML, "\ufffd", "\n".join(sanitize(mask(line)) for line in lines))


def _seconds(doc: Mapping[str, Any]) -> float:
    from ._reports import parse_ts

    if not doc.get("started_at") or not doc.get("finished_at"):
        return 0.0
    return max(0.0, parse_ts(doc["finished_at"]) - parse_ts(doc["started_at"]))


def junit_xml(docs: list[dict[str, Any]], tails: _Tails) -> bytes:
    """A JUnit XML report: a ``testsuite`` per stage (the rollback's stages too, named
    ``rollback #ID: STAGE``), a ``testcase`` per step with its duration; a failed step has a
    ``failure`` with its error and last output lines, a cancelled or interrupted one an
    ``error``, one that did not run ``skipped``."""
    import xml.etree.ElementTree as ET

    main = docs[0]
    root = ET.Element("testsuites")
    root.set("name", _xml(f"shipyard {main['pipeline']} {main['version']} {main['environment']}"))
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for n, doc in enumerate(docs):
        for si, stage in enumerate(doc.get("stages", [])):
            name = stage["name"] if n == 0 else f"rollback #{doc['id']}: {stage['name']}"
            suite = ET.SubElement(root, "testsuite", name=_xml(name))
            counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
            props = ET.SubElement(suite, "properties")
            for key in ("id", "pipeline", "version", "environment", "status"):
                ET.SubElement(props, "property", name=f"deployment.{key}", value=_xml(doc[key]))
            for i, step in enumerate(stage["steps"]):
                counts["tests"] += 1
                case = ET.SubElement(
                    suite, "testcase", name=_xml(step["name"]),
                    classname=_xml(f"{doc['pipeline']}.{stage['name']}"),
                    time=f"{_seconds(step):.3f}",
                )  # fmt: skip
                status = str(step["status"])
                tail = tails.get((doc["id"], si, i), ())
                if status == "failed":
                    counts["failures"] += 1
                    error = step["error"] or "failed"
                    kind = "warning" if step.get("warning") else "failed"
                    # The message is one line; the element's text has the error as it is.
                    message = " ".join(error.split())
                    el = ET.SubElement(case, "failure", message=_xml(message), type=kind)
                    el.text = _xml(failure_message(error, tail))
                elif status in ("cancelled", "interrupted"):
                    counts["errors"] += 1
                    el = ET.SubElement(case, "error", message=_xml(step["error"] or status),
                                       type=status)  # fmt: skip
                    el.text = _xml(failure_message(step["error"] or status, tail))
                elif status != "succeeded":
                    counts["skipped"] += 1
                    reason = step["error"] or (
                        "not run: an earlier step failed or the deployment stopped"
                        if status == "skipped"
                        else f"not run ({status})"
                    )
                    ET.SubElement(case, "skipped", message=_xml(reason))
            for key, value in counts.items():
                suite.set(key, str(value))
                totals[key] += value
            suite.set("time", f"{_seconds(stage):.3f}")
            if stage.get("started_at"):
                suite.set("timestamp", stage["started_at"].removesuffix("Z"))
            suite.set("hostname", _xml(doc.get("host") or ""))
    for key, value in totals.items():
        root.set(key, str(value))
    root.set("time", f"{sum(_seconds(d) for d in docs):.3f}")
    ET.indent(root)
    data: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return data + b"\n"


def write_junit(path: str, docs: list[dict[str, Any]], tails: _Tails) -> None:
    write_atomically(path, junit_xml(docs, tails))


def write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``: a reader
    sees the old file or the new one, never a part (folders are created)."""
    import tempfile

    target = os.path.abspath(path)
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(target)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # a report is for CI tools to read (mkstemp makes it 0600)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def unmasked(stream: IO[str]) -> IO[str]:
    """The stream under the CLI's masking wrappers (:func:`~shipyard._secrets.masked_stdio`),
    what it held back written first, so that what is written to it keeps its place."""
    from ._capture import StepStreams
    from ._secrets import MaskedStream

    s: Any = stream
    while True:
        if isinstance(s, StepStreams):
            s = s.target
        elif isinstance(s, MaskedStream):
            s.drain()
            s = s.stream
        else:
            return s  # type: ignore[no-any-return]
