"""The application layer: every rule about what may be deployed, rolled back, retried, cancelled
or unlocked, in one place, for the CLI and the Python API alike.

The CLI parses, calls :class:`DeploymentService` (or :func:`shipyard._deploy.execute` with a
request built here) and renders; :class:`~shipyard.DeploymentManager` does the same from
Python. Neither knows which store is behind it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from collections.abc import Mapping
from typing import TYPE_CHECKING
from typing import Any
from typing import NamedTuple

from ._exceptions import RollbackRefused
from ._exceptions import UsageError
from ._pipeline import Deployment
from ._reports import Status

if TYPE_CHECKING:
    from collections.abc import Callable
    from collections.abc import Sequence

    from ._deploy import DeployRequest
    from ._events import Event
    from ._pipeline import Pipeline
    from ._pipeline import Stage
    from ._session import Session
    from ._store import ArtifactRow
    from ._store import AuditRow
    from ._store import Decision
    from ._store import DeploymentRow
    from ._store import GateRow
    from ._store import HistoryStore
    from ._store import LockRow
    from ._store import LogRow
    from ._store import MeasurementRow

#: Deployments that are still going on.
ACTIVE: frozenset[str] = frozenset({Status.PENDING, Status.RUNNING})
#: Deployments that ``retry`` may run again.
RETRYABLE: frozenset[str] = frozenset({Status.FAILED, Status.CANCELLED, Status.INTERRUPTED})

#: The keys of a deployment in ``history --json`` (DESIGN §3).
HISTORY_KEYS = ("id", "pipeline", "version", "environment", "status", "started_at", "finished_at",
                "rollback_of", "retry_of", "error", "user", "host")  # fmt: skip
#: The keys of ``show --json`` that ``document(stages=False)`` leaves out (``history --json``,
#: a rollback nested in ``deploy --json``).
STAGE_KEYS = ("stages", "analysis", "hosts")

_STEP_KEYS = ("name", "kind", "status", "attempts", "exit_code", "error", "warning",
              "started_at", "finished_at")  # fmt: skip


def _loads(text: str | None) -> Any:
    import json

    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def analysis_document(
    artifacts: Sequence[ArtifactRow], measurements: Sequence[MeasurementRow]
) -> list[dict[str, Any]]:
    """``show --json``'s ``analysis``: per analysis step and metric, its settings and verdict
    (the step's ``analysis:<metric>`` artifact), the counts of its outcomes and every measurement
    (the measurements table). A metric whose step was stopped has no verdict."""
    out: dict[tuple[int, int, str], dict[str, Any]] = {}
    for a in artifacts:
        if a["name"].startswith("analysis:"):
            spec = _loads(a["content"])
            if isinstance(spec, dict):
                key = (a["stage_idx"], a["step_idx"], str(spec.get("metric")))
                out[key] = {"stage": a["stage"], "step": a["step"], **spec, "measurements": []}
    for m in measurements:
        key = (m["stage_idx"], m["step_idx"], m["metric"])
        entry = out.setdefault(key, {"stage": m["stage"], "step": m["step"], "metric": m["metric"],
                                     "verdict": None, "dry_run": m["dry_run"], "measurements": []})  # fmt: skip
        entry["measurements"].append({
            "n": m["n"], "ts": m["ts"], "value": _loads(m["value"]), "outcome": m["outcome"],
            "error": m["error"], "dry_run": m["dry_run"], "warnings": _loads(m["warnings"]) or [],
        })  # fmt: skip
    for entry in out.values():
        counts = dict.fromkeys(("successful", "failed", "inconclusive", "error"), 0)
        for m in entry["measurements"]:
            counts[m["outcome"]] = counts.get(m["outcome"], 0) + 1
        entry["counts"] = counts
    return [out[k] for k in sorted(out)]


def hosts_document(artifacts: Sequence[ArtifactRow]) -> list[dict[str, Any]]:
    """``show --json``'s ``hosts``: one entry per fleet step and host (the step's ``hosts``
    artifact), in step order: the host x step matrix."""
    out = []
    for a in artifacts:
        if a["name"] != "hosts":
            continue
        doc = _loads(a["content"])
        if not isinstance(doc, dict):
            continue
        hosts = doc["hosts"] if isinstance(doc.get("hosts"), dict) else doc  # or the first shape
        for host, run in hosts.items():
            if not isinstance(run, dict):
                continue
            tries = run.get("attempts") if isinstance(run.get("attempts"), list) else []
            last = tries[-1] if tries else run
            out.append({
                "stage": a["stage"], "step": a["step"], "host": host, "status": run.get("status"),
                "region": run.get("region"), "version": run.get("version"),
                "previous_version": run.get("previous_version"),
                "exit_code": last.get("exit_code"), "error": last.get("error"),
                "started_at": tries[0].get("started_at") if tries else run.get("started_at"),
                "finished_at": last.get("finished_at"), "attempts": tries,
            })  # fmt: skip
    return out


# -- the rules -------------------------------------------------------------------------------------


def check_environment(pipe: Pipeline[Any], environment: str) -> None:
    """Refuse an environment the pipeline does not deploy to."""
    if not pipe.allows(environment):
        allowed = ", ".join(repr(e) for e in pipe.environments or [])
        raise UsageError(f"pipeline {pipe.name!r} may deploy to {allowed}, not {environment!r}")


#: What a version may be: it becomes part of paths, image tags and container names.
VERSION_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}"
_VERSION = re.compile(VERSION_PATTERN)


def check_version(version: str) -> None:
    """Refuse a version that could not safely be a path, an image tag or a container name."""
    if _VERSION.fullmatch(version) and ".." not in version:
        return
    bad = next((c for c in version if not (c.isascii() and (c.isalnum() or c in "._+-"))), None)
    if not version:
        problem = "is empty"
    elif len(version) > 128:
        problem = f"is {len(version)} characters long"
    elif bad is not None:
        problem = f"contains {bad!r}"
    elif ".." in version:
        problem = "contains '..'"
    else:
        problem = f"starts with {version[0]!r}"
    shown = version if len(version) <= 40 else version[:40] + "..."
    raise UsageError(
        f"version {shown!r} {problem}: a version is 1 to 128 letters, digits, '.', '_', '-' "
        "and '+', starting with a letter or a digit (e.g. 1.4.2, 2026.12.03-rc1, 1.0+abc123)"
    )


def check_rollback_allowed(pipe: Pipeline[Any]) -> None:
    """Refuse a rollback of a pipeline declared ``rollback=False``."""
    if pipe.rollback is False:
        raise RollbackRefused(
            f"pipeline {pipe.name!r} refuses rollback (rollback=False); deploy a version instead"
        )


def check_request(session: Session, req: DeployRequest) -> Pipeline[Any]:
    """The pipeline of ``req``, once every rule allows the request."""
    if req.rollback_of is None and req.retry_of is None:  # recorded versions were checked then
        check_version(req.version)
    pipe = session.pipeline(req.pipeline)
    check_environment(pipe, req.environment)
    if req.rollback_of is not None:
        check_rollback_allowed(pipe)
    from ._environments import check_protected
    from ._environments import merged_vars
    from ._environments import resolve

    env = resolve(pipe, session.config, req.environment)
    if req.resume_of is None:
        what = "a rollback" if req.rollback_of is not None else (
            "a promotion" if req.promoted_from is not None else "a deploy")  # fmt: skip
        check_protected(env, req.yes, what)
    if req.rollback_of is None and req.retry_of is None and req.resume_of is None:
        req.vars = merged_vars(env, req.vars)
    return pipe


def rollback_request(
    of: DeployRequest | DeploymentRow, of_id: int, target: DeploymentRow, *,
    wait_lock: float = 0.0, notify: list[str] | None = None, args: list[str] | None = None,
    reason: str = "", yes: bool = False,
) -> DeployRequest:  # fmt: skip
    """The deployment that rolls back deployment ``of_id`` (of ``of``'s pipeline and
    environment) to ``target``'s version, with the variables ``target`` ran with."""
    from ._deploy import DeployRequest

    pipeline = of.pipeline if isinstance(of, DeployRequest) else of["pipeline"]
    environment = of.environment if isinstance(of, DeployRequest) else of["environment"]
    return DeployRequest(
        pipeline=pipeline, version=target["version"], environment=environment,
        vars=dict(target.get("vars") or {}), rollback_of=of_id, restores=target["id"],
        auto_rollback=False,
        wait_lock=wait_lock, notify=list(notify or []), args=args, reason=reason, yes=yes,
    )  # fmt: skip


def automatic_rollback(failed: DeployRequest, dep_id: int, target: DeploymentRow) -> DeployRequest:
    """The rollback that ``rollback="auto"`` runs after deployment ``dep_id`` failed: it waits a
    little for the lock, which the failed deployment has only just released."""
    return rollback_request(
        failed, dep_id, target, wait_lock=max(failed.wait_lock, 5.0), notify=failed.notify,
        args=failed.args, yes=True,
    )  # fmt: skip


def _approvals(gate: GateRow) -> dict[str, Any]:
    """``Deployment.approvals`` after ``gate``: the earlier gates' decisions (kept in its
    context) and this gate's, from its decision records."""
    from ._pipeline import GateDecision

    earlier = (gate["context"] or {}).get("approvals") or {}
    out = {k: GateDecision(tuple(v[0]), v[1], tuple(v[2])) for k, v in earlier.items()}
    ds = gate["decisions"]
    out[gate["stage"]] = GateDecision(
        tuple(dict.fromkeys(d["user"] for d in ds if d["decision"] == "approve")),
        next((d["choice"] for d in reversed(ds) if d["choice"]), None),
        tuple(d["comment"] for d in ds if d["comment"]),
    )
    return out


class Plan(NamedTuple):
    """What ``plan`` shows: the pipeline, the deployment it was built for, its stages."""

    pipeline: Pipeline[Any]
    deployment: Deployment
    stages: list[Stage]


class DeploymentService:
    """The use cases of the CLI and the Python API, over one :class:`~shipyard._session.Session`.

    Reads use one store, opened (and repaired) on first use; each deployment opens its own.
    """

    def __init__(self, session: Session) -> None:
        self.session = session
        self._store: HistoryStore | None = None

    def store(self, *, create: bool = False) -> HistoryStore:
        """The store of this session's reads; :class:`~shipyard.HistoryError` if there is none
        yet and ``create`` is false."""
        if self._store is None:
            self._store = self.session.open_store(create=create)
        return self._store

    def read_store(self) -> HistoryStore | None:
        """The store, or None when nothing was ever recorded (nothing to read, not an error)."""
        from ._store import StoreNotFound

        try:
            return self.store()
        except StoreNotFound:
            return None

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    # -- planning ---------------------------------------------------------------------------------

    def plan(
        self, pipeline: str, version: str, environment: str, vars: Mapping[str, str] | None = None
    ) -> Plan:
        """The stages ``deploy`` would run; changes nothing."""
        from ._environments import merged_vars
        from ._environments import resolve

        check_version(version)
        pipe = self.session.pipeline(pipeline)
        check_environment(pipe, environment)
        env = resolve(pipe, self.session.config, environment)
        d = Deployment(0, pipe.name, version, environment, merged_vars(env, vars or {}))
        return Plan(pipe, d, self.session.build(pipe, d))

    def environment(self, pipeline: str, environment: str) -> Any:
        """The settings of ``environment`` for ``pipeline`` (``shipyard.Environment``), or None."""
        from ._environments import resolve

        return resolve(self.session.pipeline(pipeline), self.session.config, environment)

    def promote(
        self, pipeline: str, source: str, target: str, *, vars: Mapping[str, str] | None = None,
        wait_lock: float = 0.0, args: list[str] | None = None, yes: bool = False,
        notify: list[str] | None = None,
    ) -> tuple[DeployRequest, DeploymentRow]:  # fmt: skip
        """The deployment to ``target`` of the version currently succeeded in ``source`` (the
        latest succeeded deployment there), and that deployment.

        :raises PromotionRefused: nothing succeeded in ``source``.
        """
        from ._deploy import DeployRequest
        from ._environments import succeeded
        from ._exceptions import PromotionRefused

        pipe = self.session.pipeline(pipeline)
        check_environment(pipe, source)
        check_environment(pipe, target)
        if source == target:
            raise UsageError(f"--from and --to are both {source!r}; promote to another environment")
        store = self.read_store()
        found = succeeded(store, pipe.name, source) if store is not None else None
        if found is None:
            raise PromotionRefused(
                f"nothing of {pipe.name!r} has succeeded in {source!r} yet, so there is nothing "
                f"to promote to {target!r}; deploy there first (`shipyard deploy {pipe.name} "
                f"VERSION -e {source}`)"
            )
        reason = f"promoted from deployment {found['id']} ({found['version']} in {source})"
        req = DeployRequest(
            pipeline=pipe.name, version=found["version"], environment=target,
            vars=dict(vars or {}), wait_lock=wait_lock, args=args, yes=yes,
            promoted_from=found["id"], reason=reason, notify=list(notify or []),
        )  # fmt: skip
        return req, found

    # -- requests ---------------------------------------------------------------------------------

    def rollback(
        self, target: int | str, environment: str | None = None, *, wait_lock: float = 0.0,
        reason: str = "", args: list[str] | None = None, to: str | None = None,
        yes: bool = False,
    ) -> tuple[DeployRequest, DeploymentRow, DeploymentRow]:  # fmt: skip
        """The rollback of deployment ``target`` (an id), or of the latest deployment of
        pipeline ``target`` in ``environment``: the request, the deployment rolled back and the
        one whose version comes back.

        :raises RollbackRefused: ``rollback=False``. :raises NoPreviousDeployment: nothing to
            return to. :raises DeploymentNotFound, UsageError: no such deployment.
        """
        store = self.store()
        if environment is not None:
            x = store.latest(str(target), environment)
        elif isinstance(target, int) or target.isdigit():
            x = store.get(int(target))
        else:
            raise UsageError(f"{target!r} is not a deployment id; to name a pipeline, add -e ENV")
        check_rollback_allowed(self.session.pipeline(x["pipeline"]))
        goal = store.rollback_target(x["id"]) if to is None else self._chosen_target(store, x, to)
        req = rollback_request(x, x["id"], goal, wait_lock=wait_lock, args=args, reason=reason,
                               yes=yes)  # fmt: skip
        return req, x, goal

    def _chosen_target(self, store: HistoryStore, x: DeploymentRow, to: str) -> DeploymentRow:
        """``rollback --to VERSION|ID``: a deployment that succeeded in ``x``'s pipeline and
        environment, of that version (the latest such) or with that id."""
        from ._exceptions import DeploymentNotFound
        from ._exceptions import NoPreviousDeployment

        done = store.deployments(pipeline=x["pipeline"], environment=x["environment"],
                                 statuses=("succeeded",), limit=10_000)  # fmt: skip
        if to.isdigit():
            chosen = next((d for d in done if d["id"] == int(to)), None)
            if chosen is None:
                try:
                    other = store.get(int(to))
                    why = (f"deployment {to} is {other['pipeline']} {other['version']} in "
                           f"{other['environment']!r}, {other['status']}")  # fmt: skip
                except DeploymentNotFound:
                    why = f"there is no deployment {to}"
        else:
            chosen = next((d for d in done if d["version"] == to), None)
            why = f"version {to} never succeeded in {x['environment']!r}"
        if chosen is not None:
            return chosen
        seen: list[str] = []
        for d in done:
            label = f"{d['version']} (#{d['id']})"
            if d["version"] not in {s.split(" ")[0] for s in seen}:
                seen.append(label)
        candidates = ", ".join(seen[:10]) or "none"
        raise NoPreviousDeployment(
            f"cannot roll {x['pipeline']!r} in {x['environment']!r} back to {to}: {why}; the "
            f"versions that succeeded there, newest first: {candidates}"
        )

    def retry(
        self, dep_id: int, *, wait_lock: float = 0.0, args: list[str] | None = None,
        from_start: bool = False,
    ) -> DeployRequest:  # fmt: skip
        """A new run of a failed, cancelled or interrupted deployment from its first unfinished
        stage, if the pipeline's stages up to there are still the same and nothing else was
        deployed there since; with ``from_start``, a new run of every stage."""
        from ._deploy import DeployRequest

        store = self.store()
        x = store.get(dep_id)
        if x["status"] not in RETRYABLE:
            raise UsageError(
                f"deployment {dep_id} is {x['status']}; only failed, cancelled or interrupted "
                "deployments can be retried"
            )
        stages = store.stages(dep_id)
        # A stage skipped with a note was done by the deployment this one retried.
        start = next(
            (s["idx"] for s in stages
             if s["status"] != Status.SUCCEEDED and not (s["status"] == Status.SKIPPED and s["note"])),
            0,
        )  # fmt: skip
        if from_start:
            start = 0
        elif start > 0:
            # What the stages before ``start`` did may have been undone since: resuming would
            # record this version as deployed while another one runs.
            since = store.latest(x["pipeline"], x["environment"])
            if since["id"] != dep_id:
                what = (
                    f"a rollback to {since['version']}" if since["rollback_of"]
                    else f"a deployment of {since['version']}"
                )  # fmt: skip
                raise UsageError(
                    f"deployment {since['id']} ({what}, {since['status']}) ran in "
                    f"{x['environment']} after deployment {dep_id}, so what {dep_id}'s first "
                    f"{start} stage(s) did may no longer be in place; run every stage again with "
                    f"`shipyard retry {dep_id} --from-start`, or deploy the version: "
                    f"`shipyard deploy {x['pipeline']} {x['version']} -e {x['environment']}`"
                )
        req = DeployRequest(
            pipeline=x["pipeline"], version=x["version"], environment=x["environment"],
            vars=dict(x["vars"]), retry_of=dep_id, start_stage=start, auto_rollback=True,
            wait_lock=wait_lock, args=args,
        )  # fmt: skip
        plan = self.plan(x["pipeline"], x["version"], x["environment"], req.vars)
        names = [s.name for s in plan.stages]
        old = [s["name"] for s in stages]
        if names[:start] != old[:start]:
            raise UsageError(
                f"the stages of {plan.pipeline.name!r} changed since deployment {dep_id} "
                f"({' -> '.join(old)} then, {' -> '.join(names)} now); deploy the version instead"
            )
        return req

    # -- control ----------------------------------------------------------------------------------

    def request_cancel(
        self, dep_id: int, *, user: str, reason: str = "", source: str = "cancel"
    ) -> DeploymentRow:
        """Ask a running deployment (of any process) to stop; audited. A deployment awaiting
        approval is cancelled at once (no process runs it) and its lock freed."""
        store = self.store()
        dep = store.get(dep_id)
        if dep["status"] == Status.AWAITING_APPROVAL:
            gate = store.gate(dep_id)
            d = store.decide(dep_id, "cancel", user=user, comment=reason, source=source)
            store.add_audit("cancel", dep_id, user=user, reason=reason)
            self._announce_decided(dep, gate, "cancel", user=user, comment=reason, decision=d,
                                   outcome="cancelled", source=source)  # fmt: skip
            return dep
        if dep["status"] not in ACTIVE:
            raise UsageError(f"deployment {dep_id} is not running (it is {dep['status']})")
        return store.request_cancel(dep_id, user=user, reason=reason)

    # -- approval gates ---------------------------------------------------------------------------

    def _waiting_gate(self, dep_id: int) -> tuple[DeploymentRow, GateRow]:
        """The deployment and its gate, if it awaits a decision; else why not."""
        from ._exceptions import ApprovalRefused
        from ._store import decided_message

        store = self.store()
        x = store.get(dep_id)
        gate = store.gate(dep_id)
        if x["status"] != Status.AWAITING_APPROVAL or gate is None or gate["status"] != "waiting":
            last = gate["decisions"][-1] if gate and gate["decisions"] else None
            raise ApprovalRefused(decided_message(
                dep_id, x["status"], (last["decision"], last["user"], last["ts"]) if last else None
            ))  # fmt: skip
        return x, gate

    def _check_decider(self, x: DeploymentRow, gate: GateRow, user: str, *, approving: bool,
                       choice: str | None) -> None:  # fmt: skip
        """The rules every decision is judged by (DESIGN §7): expiry, approvers, self-approval,
        choices, and the organisation's own policy (``shipyard_approval_check``)."""
        from ._exceptions import ApprovalRefused
        from ._reports import parse_ts

        spec, dep_id = gate["spec"], x["id"]
        if time.time() > parse_ts(gate["expires_at"]):
            raise ApprovalRefused(
                f"the approval of deployment {dep_id} expired at {gate['expires_at']} (default: "
                f"{spec['on_timeout']}); `shipyard expire` applies it"
            )
        approvers = spec.get("approvers")
        if approvers is not None and user not in approvers:
            raise ApprovalRefused(
                f"{user} may not decide deployment {dep_id}: the approvers of gate "
                f"{gate['stage']!r} are {', '.join(approvers)}"
            )
        if approving and not spec.get("allow_self_approval") and user == x["user"]:
            raise ApprovalRefused(
                f"{user} started deployment {dep_id} and may not approve it (self-approval is "
                "not allowed at this gate); ask another approver"
            )
        options = spec.get("options") or []
        if approving and options and choice not in options:
            raise ApprovalRefused(
                f"gate {gate['stage']!r} of deployment {dep_id} asks for a choice: "
                f"--choice {' | '.join(options)}"
            )
        if approving and not options and choice is not None:
            raise ApprovalRefused(f"gate {gate['stage']!r} offers no choices; drop --choice")
        verdict = self.session.pm.hook.shipyard_approval_check(
            deployment=x, gate=gate, user=user, decision="approve" if approving else "reject"
        )
        if verdict:
            raise ApprovalRefused(f"{user} may not decide deployment {dep_id}: {verdict}")

    def _resume_request(self, x: DeploymentRow, gate: GateRow) -> DeployRequest:
        """How deployment ``x`` goes on after its gate: the same pipeline called with the
        recorded context, if the stages it ran are still those of the pipeline."""
        from ._deploy import DeployRequest
        from ._exceptions import PipelineChanged
        from ._recorder import fingerprint

        ctx = gate["context"] or {}
        approvals = _approvals(gate)
        pipe = self.session.pipeline(x["pipeline"])
        d = Deployment(
            x["id"], pipe.name, x["version"], x["environment"], dict(ctx.get("vars") or {}),
            previous_version=ctx.get("previous_version"), rollback_of=ctx.get("rollback_of"),
            restores=ctx.get("restores"), approvals=approvals,
        )  # fmt: skip
        stages = self.session.build(pipe, d)
        si = gate["stage_idx"]
        now = fingerprint(stages[:si])
        # The gate is still there: an approval stage, or a last step that stops at a gate.
        gate_there = len(stages) > si and (
            [st.kind for st in stages[si].steps] == ["approval"]
            or getattr(stages[si].steps[-1], "gate", None) is not None
        )
        if now != gate["fingerprint"] or not gate_there:
            then = " -> ".join(f[0] for f in gate["fingerprint"]) or "(none)"
            shown = " -> ".join(s.name for s in stages)
            raise PipelineChanged(
                f"pipeline {pipe.name!r} changed since deployment {x['id']} stopped at gate "
                f"{gate['stage']!r}: it ran {then} before the gate, and the pipeline is now "
                f"{shown}; reject it (`shipyard reject {x['id']} --comment TEXT`) and deploy again"
            )
        return DeployRequest(
            pipeline=pipe.name, version=x["version"], environment=x["environment"],
            vars=dict(ctx.get("vars") or {}), rollback_of=ctx.get("rollback_of"),
            restores=ctx.get("restores"), start_stage=si + 1, resume_of=x["id"],
            previous_version=ctx.get("previous_version"), approvals=approvals,
            auto_rollback=True,
        )  # fmt: skip

    def approve(
        self, dep_id: int, *, user: str, comment: str = "", choice: str | None = None,
        source: str = "cli",
    ) -> tuple[Decision, DeployRequest | None]:  # fmt: skip
        """Approve the gate deployment ``dep_id`` waits at. With enough approvals, returns the
        request that resumes it (this process now holds its lock); else the count so far.

        :raises ApprovalRefused: not waiting, expired, not an approver, self-approval.
        :raises PipelineChanged: the stages it ran are no longer the pipeline's.
        """
        from ._liveness import dead_after
        from ._liveness import this_process

        x, gate = self._waiting_gate(dep_id)
        self._check_decider(x, gate, user, approving=True, choice=choice)
        self._refuse_stale(x, gate)
        req = self._resume_request(x, gate)  # a changed pipeline: refused, nothing recorded
        store = self.store()
        decision = store.decide(
            dep_id, "approve", user=user, comment=comment, choice=choice, source=source,
            owner=this_process(), is_dead=dead_after(self.session.config.lock_lease),
        )  # fmt: skip
        store.add_audit("approve", dep_id, user=user, reason=comment)
        self._announce_decided(x, gate, "approve", user=user, comment=comment, choice=choice,
                               decision=decision, source=source)  # fmt: skip
        if decision.outcome != "resume":
            return decision, None
        # The decisions now include this approval (and any made meanwhile).
        req.approvals = _approvals(store.gate(dep_id) or gate)
        return decision, req

    def _announce(self, x: DeploymentRow, make: Callable[[Deployment], Event]) -> None:
        from ._deploy import announce

        announce(self.session, x, make)

    def _announce_decided(
        self, x: DeploymentRow, gate: GateRow | None, what: str, *, user: str, comment: str,
        decision: Decision, choice: str | None = None, outcome: str | None = None,
        source: str | None = None,
    ) -> None:  # fmt: skip
        """Tell the sinks and plugins that ``user`` decided ``x``'s gate."""
        from ._events import ApprovalDecided

        self._announce(x, lambda d: ApprovalDecided(
            deployment=d, stage=gate["stage"] if gate else "?", decision=what, user=user,
            comment=comment, choice=choice, outcome=outcome or decision.outcome,
            approvals=decision.approvals, required=decision.required, source=source,
        ))  # fmt: skip

    def remind(
        self, *, pipeline: str | None = None, environment: str | None = None
    ) -> list[DeploymentRow]:
        """Send a reminder for every waiting gate with ``remind_every`` whose last reminder (or
        request) is at least that long ago and that has not expired; each is audited
        (``remind``), so the next ``shipyard expire`` counts from it. Returns those reminded."""
        from ._events import ApprovalReminder
        from ._reports import parse_ts

        store = self.read_store()
        if store is None:
            return []
        out: list[DeploymentRow] = []
        waiting = store.deployments(pipeline=pipeline, environment=environment,
                                    statuses=(Status.AWAITING_APPROVAL.value,), limit=10_000)  # fmt: skip
        now = time.time()
        for x in waiting:
            gate = store.gate(x["id"])
            every = (gate.get("spec") or {}).get("remind_every") if gate is not None else None
            if gate is None or gate["status"] != "waiting" or not every:
                continue
            if now > parse_ts(gate["expires_at"]):
                continue  # expiry applies the default outcome instead
            last = max(
                [parse_ts(gate["requested_at"])]
                + [parse_ts(a["ts"]) for a in store.audit_trail(deployment_id=x["id"], limit=1000)
                   if a["action"] == "remind" and a["ts"] >= gate["requested_at"]]
            )  # fmt: skip
            if now - last < float(every):
                continue
            approvals = len({a["user"] for a in gate["decisions"] if a["decision"] == "approve"})
            store.add_audit("remind", x["id"], user="shipyard",
                            reason=f"reminder: waiting since {gate['requested_at']}")  # fmt: skip

            def reminder(d: Deployment, gate: GateRow = gate, n: int = approvals) -> Event:
                return ApprovalReminder(
                    deployment=d, stage=gate["stage"], requested_at=gate["requested_at"],
                    expires_at=gate["expires_at"], approvals=n,
                    required=int(gate["spec"].get("required") or 1))  # fmt: skip

            self._announce(x, reminder)
            out.append(x)
        return out

    def _refuse_stale(self, x: DeploymentRow, gate: GateRow) -> None:
        """With ``lock="release"``, another deployment may have succeeded there while this one
        waited: what was approved is then no longer what it would build on (exit 3)."""
        from ._exceptions import EnvironmentLocked

        if gate["spec"].get("lock") != "release":
            return
        latest = self.store().deployments(
            pipeline=x["pipeline"], environment=x["environment"], statuses=("succeeded",), limit=1
        )
        if (
            latest
            and latest[0]["id"] != x["id"]
            and (latest[0]["started_at"] or "") > (gate["requested_at"] or "")
        ):
            y = latest[0]
            raise EnvironmentLocked(
                f"stale approval: deployment {y['id']} ({y['version']}) succeeded in "
                f"{x['environment']!r} after deployment {x['id']} stopped at gate "
                f"{gate['stage']!r} ({gate['requested_at']}); reject it (`shipyard reject "
                f"{x['id']} --comment TEXT`) and deploy again",
                {},
            )

    def supersede(self, pipeline: str, environment: str, *, user: str) -> DeploymentRow | None:
        """End the deployment awaiting approval that holds the lock of ``pipeline`` in
        ``environment`` as ``superseded`` (audited), so that a new one may start."""
        from ._environments import lock_key

        store = self.store(create=True)
        key = lock_key(self.session, pipeline, environment)
        for lock in store.locks():
            if (lock["pipeline"], lock["environment"]) != (key, environment):
                continue
            x = store.get(lock["deployment_id"])
            if x["status"] != Status.AWAITING_APPROVAL:
                return None
            gate = store.gate(x["id"])
            d = store.decide(x["id"], "supersede", user=user, comment="deploy --supersede",
                             source="supersede")  # fmt: skip
            store.add_audit("supersede", x["id"], user=user, reason="deploy --supersede")
            self._announce_decided(x, gate, "supersede", user=user, comment="deploy --supersede",
                                   decision=d, outcome="superseded", source="supersede")  # fmt: skip
            return store.get(x["id"])
        return None

    def expire(
        self, *, pipeline: str | None = None, environment: str | None = None
    ) -> list[tuple[DeploymentRow, str, DeployRequest | None]]:
        """Apply the default outcome of every gate whose time is up (of ``pipeline`` in
        ``environment`` when given): ``(deployment, outcome, request)``, where the request is
        the resume (default approve) or the rollback (default reject) to run now, if any."""
        from ._events import ApprovalExpired
        from ._exceptions import ApprovalRefused
        from ._exceptions import EnvironmentLocked
        from ._exceptions import NoPreviousDeployment
        from ._exceptions import PipelineChanged
        from ._liveness import dead_after
        from ._liveness import this_process
        from ._reports import parse_ts

        store = self.read_store()
        if store is None:
            return []
        out: list[tuple[DeploymentRow, str, DeployRequest | None]] = []
        waiting = store.deployments(pipeline=pipeline, environment=environment,
                                    statuses=(Status.AWAITING_APPROVAL.value,), limit=10_000)  # fmt: skip
        for x in waiting:
            gate = store.gate(x["id"])
            if gate is None or gate["status"] != "waiting":
                continue
            if time.time() <= parse_ts(gate["expires_at"]):
                continue
            approve = gate["spec"].get("on_timeout") == "approve"
            why = f"the approval expired at {gate['expires_at']} (default: {gate['spec'].get('on_timeout')})"
            try:
                req = self._resume_request(x, gate) if approve else None
                decision = store.decide(
                    x["id"], "expire", user="shipyard", comment=why, source="expire",
                    owner=this_process(), is_dead=dead_after(self.session.config.lock_lease),
                )  # fmt: skip
            except (ApprovalRefused, EnvironmentLocked, PipelineChanged) as exc:
                out.append((x, f"left waiting: {exc}", None))
                continue
            store.add_audit("expire", x["id"], user="shipyard", reason=why)

            def expired(d: Deployment, gate: GateRow = gate, approve: bool = approve) -> Event:
                return ApprovalExpired(
                    deployment=d, stage=gate["stage"], expires_at=gate["expires_at"],
                    outcome="approved" if approve else "rejected")  # fmt: skip

            self._announce(x, expired)
            if decision.outcome == "resume" and req is not None:
                req.approvals = _approvals(store.gate(x["id"]) or gate)
                out.append((x, "approved", req))
                continue
            store.finish(x["id"], Status.FAILED, f"rejected: {why}")
            rollback = None
            pipe = self.session.pipeline(x["pipeline"])
            if gate["spec"].get("on_reject") == "rollback" or (
                gate["spec"].get("on_reject") is None and pipe.rollback == "auto"
            ):
                try:
                    target = store.rollback_target(x["id"])
                    rollback = rollback_request(x, x["id"], target, wait_lock=5.0, yes=True,
                                                reason=f"deployment #{x['id']}: {why}")  # fmt: skip
                except NoPreviousDeployment:
                    pass
            out.append((store.get(x["id"]), "rejected", rollback))
        return out

    def reject(
        self, dep_id: int, *, user: str, comment: str, source: str = "cli"
    ) -> tuple[DeploymentRow, DeployRequest | None]:
        """Reject the gate: the deployment ends ``failed``; returns the rollback to run after,
        per the gate's ``on_reject`` (or the pipeline's policy), or None."""
        from ._liveness import this_process

        x, gate = self._waiting_gate(dep_id)
        self._check_decider(x, gate, user, approving=False, choice=None)
        store = self.store()
        d = store.decide(dep_id, "reject", user=user, comment=comment, source=source,
                         owner=this_process())  # fmt: skip
        error = f"rejected by {user} at gate {gate['stage']!r}" + (
            f": {comment}" if comment else ""
        )
        store.finish(dep_id, Status.FAILED, error)
        store.add_audit("reject", dep_id, user=user, reason=comment)
        self._announce_decided(x, gate, "reject", user=user, comment=comment, decision=d,
                               outcome="rejected", source=source)  # fmt: skip
        on_reject = gate["spec"].get("on_reject")
        pipe = self.session.pipeline(x["pipeline"])
        if on_reject == "fail" or (on_reject is None and pipe.rollback != "auto"):
            return store.get(dep_id), None
        from ._exceptions import NoPreviousDeployment

        try:
            target = store.rollback_target(dep_id)
        except NoPreviousDeployment:
            return store.get(dep_id), None
        return store.get(dep_id), rollback_request(
            x, dep_id, target, wait_lock=5.0, reason=f"deployment #{dep_id} was rejected", yes=True
        )

    def wait_finished(self, dep_id: int, timeout: float | None) -> str | None:
        """Wait until the deployment is no longer running; its status, or None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status(dep_id)
            if status not in ACTIVE:
                return status
            if deadline is not None and time.monotonic() > deadline:
                return None
            time.sleep(0.1)

    def unlock(self, pipeline: str, environment: str, *, user: str, reason: str) -> LockRow | None:
        """Break a lock by hand (its deployment becomes ``interrupted``); audited. With
        ``lock="environment"``, the environment's shared lock."""
        from ._environments import lock_key

        key = lock_key(self.session, pipeline, environment)
        return self.store(create=True).unlock(key, environment, user=user, reason=reason)

    # -- reading ----------------------------------------------------------------------------------

    def status(self, dep_id: int) -> str:
        """The deployment's status now (a dead holder found on the way is marked so first)."""
        from ._liveness import repair

        store = self.store()
        repair(store, self.session.config.lock_lease)
        return store.get(dep_id)["status"]

    def get(self, dep_id: int) -> DeploymentRow:
        return self.store().get(dep_id)

    def document(self, dep_id: int, *, stages: bool = True) -> dict[str, Any]:
        """The JSON document of ``show --json`` and ``deploy --json`` (DESIGN §3)."""
        store = self.store()
        doc: dict[str, Any] = dict(store.get(dep_id))
        gate = store.gate(dep_id)
        if gate is not None:
            from ._reports import parse_ts

            doc["gate"] = {
                "stage": gate["stage"], "stage_index": gate["stage_idx"],
                "status": gate["status"], "requested_at": gate["requested_at"],
                "expires_at": gate["expires_at"], "decided_at": gate["decided_at"],
                "expired": gate["status"] == "waiting"
                and time.time() > parse_ts(gate["expires_at"]),
                **{k: gate["spec"].get(k) for k in ("approvers", "required",
                   "allow_self_approval", "on_timeout", "lock", "options", "instructions")},
                "decisions": [{k: d[k] for k in ("decision", "user", "comment", "choice",
                               "source", "host", "ci_run", "ts")} for d in gate["decisions"]],
                "commands": {"approve": f"shipyard approve {dep_id}",
                             "reject": f"shipyard reject {dep_id} --comment TEXT"},
            }  # fmt: skip
        if stages:
            doc["stages"] = [
                {
                    "name": s["name"],
                    "status": s["status"],
                    "started_at": s["started_at"],
                    "finished_at": s["finished_at"],
                    "steps": [{k: st[k] for k in _STEP_KEYS} for st in s["steps"]],  # type: ignore[literal-required]
                }
                for s in store.stages(dep_id)
            ]
        doc["promoted_from"] = self.promoted_from(store, dep_id)
        if stages:
            artifacts = store.artifacts(dep_id)
            doc["analysis"] = analysis_document(artifacts, store.measurements(dep_id))
            doc["hosts"] = hosts_document(artifacts)
        return doc

    @staticmethod
    def promoted_from(store: HistoryStore, dep_id: int) -> int | None:
        """The deployment ``dep_id`` was promoted from (``shipyard promote``), if it was."""
        for a in store.audit_trail(deployment_id=dep_id, limit=100):
            m = re.match(r"promoted from deployment (\d+) ", a["reason"] or "")
            if a["action"] == "promote" and m:
                return int(m.group(1))
        return None

    def current_id(self, pipeline: str, environment: str) -> int | None:
        """The latest succeeded deployment of ``pipeline`` in ``environment``: what runs there."""
        from ._environments import succeeded

        store = self.read_store()
        found = succeeded(store, pipeline, environment) if store is not None else None
        return found["id"] if found else None

    def history(
        self, *, pipeline: str | None = None, environment: str | None = None, limit: int = 20,
        statuses: tuple[str, ...] = (),
    ) -> list[DeploymentRow]:  # fmt: skip
        """Deployments, newest first; none when nothing was ever recorded."""
        store = self.read_store()
        if store is None:
            return []
        return store.deployments(
            pipeline=pipeline, environment=environment, statuses=statuses, limit=limit
        )

    def current(self, recent: int = 10) -> list[DeploymentRow]:
        """What ``status`` lists: every running deployment, then the latest others."""
        store = self.read_store()
        if store is None:
            return []
        running = store.deployments(statuses=tuple(ACTIVE), limit=100)
        seen = {r["id"] for r in running}
        return running + [d for d in store.deployments(limit=recent) if d["id"] not in seen]

    def audit_trail(self, dep_id: int) -> list[AuditRow]:
        return self.store().audit_trail(deployment_id=dep_id)

    def logs(self, dep_id: int, *, follow: bool = False, poll: float = 0.2) -> Iterator[LogRow]:
        """The deployment's log lines; with ``follow``, until it has ended and all are read."""
        store = self.store()
        store.get(dep_id)
        last = 0
        while True:
            rows = store.logs(dep_id, after=last)
            yield from rows
            if rows:
                last = rows[-1]["id"]
                continue
            if not follow:
                return
            if self.status(dep_id) not in ACTIVE:
                if not store.logs(dep_id, after=last, limit=1):
                    return
                continue
            time.sleep(poll)
