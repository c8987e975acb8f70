"""The Python API: DeploymentManager and the error tree (DESIGN §6)."""

from __future__ import annotations

import pytest
import shipyard as sy
from shipyard import DeploymentManager
from shipyard import Status

WAITING = """
import shipyard as sy

# Waits (at most ~60 s) for a file that the test creates once deploy() has returned.
GATE = 'i=0; while [ ! -e go ]; do i=$((i+1)); [ $i -gt 6000 ] && exit 9; sleep 0.01; done'

@sy.pipeline(environments=["staging", "production"])
def web(d):
    return [
        sy.stage("build", sy.command("sh", "-c", f"echo {d.version} > built", name="build")),
        sy.stage("gate", sy.command("sh", "-c", GATE, name="gate")),
        sy.stage("verify", sy.wait(0, name="verify")),
    ]

@sy.pipeline(rollback=False)
def docs(d):
    return [sy.stage("publish", sy.command("sh", "-c", "exit ${FAIL:-0}", name="publish"))]
"""


def test_deploy_returns_the_id_while_the_deployment_runs(shipyarder):
    shipyarder.makepipelines(WAITING)
    manager = shipyarder.manager()
    dep = manager.deploy("web", "1.0", "staging", vars={"k": "v"})
    assert isinstance(dep, int)
    # It cannot have finished: its gate waits for a file that does not exist yet.
    assert manager.status(dep) is Status.RUNNING
    with pytest.raises(TimeoutError, match=f"deployment {dep} still running after 0.05s"):
        manager.wait(dep, timeout=0.05)
    (shipyarder.path / "go").touch()
    doc = manager.wait(dep)
    assert doc["status"] == "succeeded"
    assert manager.status(dep) is Status.SUCCEEDED
    assert doc == manager.show(dep)
    assert doc["vars"] == {"k": "v"}
    assert [s["status"] for s in doc["stages"]] == ["succeeded"] * 3
    assert (shipyarder.path / "built").read_text().strip() == "1.0"


def test_a_second_manager_waits_by_polling_the_history(shipyarder):
    shipyarder.makepipelines(WAITING)
    (shipyarder.path / "go").touch()
    dep = shipyarder.manager().deploy("web", "1.0", "staging")
    other = shipyarder.manager()  # knows nothing of the run: reads the history
    assert other.wait(dep, timeout=120)["status"] == "succeeded"


def test_history_plan_and_show(shipyarder):
    shipyarder.makepipelines(WAITING)
    (shipyarder.path / "go").touch()
    manager = shipyarder.manager()
    assert manager.history() == []
    ids = [
        manager.deploy("web", "1.0", "staging"),
        manager.deploy("docs", "1", "x"),
        manager.deploy("web", "1.1", "production"),
    ]
    for dep in ids:
        manager.wait(dep)
    assert [d["id"] for d in manager.history()] == ids[::-1]
    assert [d["id"] for d in manager.history(pipeline="web")] == [ids[2], ids[0]]
    assert [d["id"] for d in manager.history(environment="staging")] == [ids[0]]
    assert [d["id"] for d in manager.history(limit=1)] == [ids[2]]
    assert all("stages" not in d for d in manager.history())
    stages = manager.plan("web", "9.9", "staging")
    assert [s.name for s in stages] == ["build", "gate", "verify"]
    assert len(manager.history()) == 3  # plan records nothing


def test_rollback_through_the_api(shipyarder):
    shipyarder.makepipelines(WAITING)
    (shipyarder.path / "go").touch()
    manager = shipyarder.manager()
    first = manager.wait(manager.deploy("web", "1.0", "staging"))
    second = manager.wait(manager.deploy("web", "2.0", "staging"))
    back = manager.rollback(second["id"])
    doc = manager.wait(back)
    assert (doc["version"], doc["rollback_of"], doc["status"]) == ("1.0", second["id"], "succeeded")
    with pytest.raises(sy.NoPreviousDeployment, match="nothing to roll back to"):
        manager.rollback(first["id"])


def test_errors_raised_before_anything_runs(shipyarder):
    shipyarder.makepipelines(WAITING)
    manager = shipyarder.manager()
    with pytest.raises(sy.PipelineNotFound, match=r"no pipeline 'wbe'.*did you mean 'web'") as info:
        manager.deploy("wbe", "1", "staging")
    assert info.value.exit_code == 2
    with pytest.raises(sy.UsageError, match="may deploy to 'staging', 'production', not 'qa'"):
        manager.deploy("web", "1", "qa")
    assert manager.history() == []
    with pytest.raises(sy.HistoryError, match=r"no history at .*; nothing has been deployed from"):
        manager.show(1)
    (shipyarder.path / "go").touch()
    manager.wait(manager.deploy("docs", "1", "x"))
    with pytest.raises(sy.DeploymentNotFound, match=r"no deployment 41 in the history \(ids go"):
        manager.show(41)


def test_a_bad_pipelines_file_raises_pipeline_file_error(shipyarder):
    path = shipyarder.makepipelines("import shipyard as sy\n\nraise SystemError('nope')\n")
    manager = DeploymentManager(pipelines=path)
    with pytest.raises(sy.PipelineFileError) as info:
        manager.plan("web", "1", "x")
    assert (info.value.path, info.value.lineno) == (str(path), 3)


def test_defaults_are_the_current_directory(shipyarder):
    shipyarder.makepipelines(WAITING)
    (shipyarder.path / "go").touch()
    manager = DeploymentManager()
    try:
        doc = manager.wait(manager.deploy("docs", "1", "x"))
    finally:
        manager.close()
    assert doc["pipelines_file"] == str(shipyarder.path / "pipelines.py")
    assert shipyarder.history[0]["id"] == doc["id"]  # SHIPYARD_HISTORY, set by the fixture


def test_a_failed_deployment_is_a_document_not_an_exception(shipyarder):
    shipyarder.makepipelines(WAITING)
    result = shipyarder.deploy("docs", "1", "x", plugins=())
    assert result.status == "succeeded"
    shipyarder.monkeypatch.setenv("FAIL", "4")
    failed = shipyarder.deploy("docs", "2", "x")
    assert failed.status == "failed"
    failed.assert_outcomes(failed=1)
    assert failed.document["stages"][0]["steps"][0]["exit_code"] == 4


# -- the error tree --------------------------------------------------------------------------------

TREE = [
    ("UsageError", "ShipyardError", 2),
    ("PipelineFileError", "ShipyardError", 2),
    ("PipelineDefinitionError", "ShipyardError", 2),
    ("HistoryError", "ShipyardError", 2),
    ("DeploymentError", "ShipyardError", 2),
    ("PipelineNotFound", "DeploymentError", 2),
    ("DeploymentNotFound", "DeploymentError", 2),
    ("NoPreviousDeployment", "DeploymentError", 2),
    ("RollbackRefused", "DeploymentError", 2),
    ("PromotionRefused", "DeploymentError", 2),
    ("ApprovalRefused", "DeploymentError", 2),
    ("PipelineChanged", "DeploymentError", 2),
    ("EnvironmentLocked", "DeploymentError", 3),
    ("SecretMissing", "DeploymentError", 1),
    ("StepFailed", "DeploymentError", 1),
    ("HealthCheckFailed", "StepFailed", 1),
]


@pytest.mark.parametrize(("name", "parent", "exit_code"), TREE, ids=[t[0] for t in TREE])
def test_error_tree(name, parent, exit_code):
    cls = getattr(sy, name)
    assert cls.__bases__ == (getattr(sy, parent),)
    assert issubclass(cls, sy.ShipyardError)
    assert cls.exit_code == exit_code
    assert cls.__module__ == "shipyard"


def test_every_exported_error_is_in_the_tree():
    exported = {
        name
        for name in sy.__all__
        if isinstance(getattr(sy, name), type)
        and issubclass(getattr(sy, name), Exception)
        and not issubclass(getattr(sy, name), Warning)
    }
    assert exported == {t[0] for t in TREE} | {"ShipyardError"}
    assert sy.ShipyardError.exit_code == 2
    assert issubclass(sy.ShipyardWarning, UserWarning)


def test_errors_carry_what_they_are_about():
    err = sy.PipelineFileError("p.py", "SyntaxError: bad", lineno=3, cause=SyntaxError("bad"))
    assert (str(err), err.path, err.lineno) == ("p.py:3: SyntaxError: bad", "p.py", 3)
    assert err.show() == "Error: p.py:3: SyntaxError: bad"
    locked = sy.EnvironmentLocked("locked by #3", {"deployment_id": 3})
    assert locked.holder == {"deployment_id": 3}
    failed = sy.StepFailed("boom", step_exit_code=7, output=["a", "b"])
    assert (failed.step_exit_code, failed.output) == (7, ["a", "b"])
    assert sy.DeploymentNotFound(9).ident == 9
    assert sy.PipelineNotFound("wbe", ["web", "api"]).message == (
        "no pipeline 'wbe' in pipelines.py (defined: 'api', 'web'); did you mean 'web'?"
    )
