"""Tests of the example plugin, written with Shipyard's ``shipyarder`` fixture.

The fixture turns plugin autoloading off, so each command loads the plugin explicitly with
``plugins=["shipyard_example"]`` (``-p shipyard_example``): the tests see exactly this plugin and
Shipyard's built-ins, whatever else is installed.
"""

from __future__ import annotations

import shipyard as sy

PLUGIN = ["shipyard_example"]

PIPELINES = """
    import shipyard as sy
    from shipyard_example import template

    @sy.pipeline(environments=["staging"], rollback="auto")
    def web(d):
        return [
            sy.stage("release", sy.command("./release.sh", d.version)),
            sy.stage("config", template("app.conf.in", "app.conf", port=8080)),
        ]
"""


def test_plugin_is_listed(shipyarder):
    result = shipyarder.run("plugins", plugins=PLUGIN)
    assert result.exit_code == 0
    result.fnmatch_lines(
        ["shipyard_example 1.0.0  (-p)", "    step types: template", "    notifiers:  journal"]
    )


def test_plan_describes_the_step(shipyarder):
    shipyarder.makepipelines(PIPELINES)
    result = shipyarder.run("plan", "web", "1.0.0", "-e", "staging", plugins=PLUGIN)
    assert result.exit_code == 0
    result.fnmatch_lines(["[[]2/2] config", "  - template: app.conf.in -> app.conf (port=8080)"])


def test_renders_the_file(shipyarder):
    shipyarder.makepipelines(PIPELINES)
    shipyarder.makefile("app.conf.in", "listen ${port};\nversion ${DEPLOYMENT_VERSION};\n")
    # release.sh does not exist here: a fake executor stands in for every command step.
    release = shipyarder.fake_executor("command")

    result = shipyarder.run("deploy", "web", "1.4.2", "-e", "staging", plugins=PLUGIN)

    assert result.exit_code == 0, result
    assert (shipyarder.path / "app.conf").read_text() == "listen 8080;\nversion 1.4.2;\n"
    result.assert_outcomes(succeeded=2)
    result.fnmatch_lines(["*rendered app.conf.in -> app.conf (2 lines)", "*ok*render app.conf*"])
    assert [step.name for step in release.calls] == ["./release.sh 1.4.2"]
    finished = result.hooks.events("shipyard_step_finished")
    assert [(e.step.kind, str(e.result.status)) for e in finished] == [
        ("command", "succeeded"),
        ("template", "succeeded"),
    ]


def test_a_missing_value_fails_the_step(shipyarder):
    shipyarder.makepipelines(PIPELINES)
    shipyarder.makefile("app.conf.in", "listen ${port}; workers ${workers};\n")
    shipyarder.fake_executor("command")

    result = shipyarder.run("deploy", "web", "1.4.2", "-e", "staging", plugins=PLUGIN)

    assert result.exit_code == 1
    result.assert_outcomes(succeeded=1, failed=1)
    result.fnmatch_lines(["*app.conf.in uses ${workers}, which has no value*"])
    assert not (shipyarder.path / "app.conf").exists()


def test_secrets_reach_the_file_and_nothing_else(shipyarder):
    shipyarder.makepipelines(
        """
        import shipyard as sy
        from shipyard_example import template

        @sy.pipeline
        def api(d):
            return [sy.stage("config", template("env.in", ".env", token=sy.secret("API_TOKEN")))]
        """
    )
    shipyarder.makefile("env.in", "TOKEN=${token}\n")

    result = shipyarder.run(
        "deploy", "api", "1.0.0", "-e", "prod", plugins=PLUGIN, env={"API_TOKEN": "t0ps3cr3t"}
    )

    assert result.exit_code == 0, result
    assert (shipyarder.path / ".env").read_text() == "TOKEN=t0ps3cr3t\n"
    plan = shipyarder.run("plan", "api", "1.0.0", "-e", "prod", plugins=PLUGIN)
    plan.fnmatch_lines(["  - template: env.in -> .env (token=***)"])
    assert "t0ps3cr3t" not in result.output + plan.output + str(result.history)


def test_journal_records_failures_and_rollbacks(shipyarder):
    shipyarder.makepipelines(PIPELINES)
    shipyarder.makefile("app.conf.in", "listen ${port};\n")

    def release(step, context):
        if context.deployment.version == "2.0.0":
            raise sy.StepFailed("release.sh exited with 1")

    shipyarder.fake_executor("command", release)
    notify = ("--notify", "journal:deploys.log")

    ok = shipyarder.run("deploy", "web", "1.0.0", "-e", "staging", *notify, plugins=PLUGIN)
    bad = shipyarder.run("deploy", "web", "2.0.0", "-e", "staging", *notify, plugins=PLUGIN)

    assert (ok.exit_code, bad.exit_code) == (0, 1)
    bad.assert_outcomes(failed=1, skipped=1)
    assert [(d["version"], d["status"]) for d in bad.history] == [
        ("1.0.0", "succeeded"),  # the automatic rollback, #3
        ("2.0.0", "failed"),
        ("1.0.0", "succeeded"),
    ]
    lines = (shipyarder.path / "deploys.log").read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [
        "#1 web 1.0.0 -> staging: succeeded",
        "#2 web 2.0.0 -> staging: failed (step './release.sh 2.0.0' of stage 'release' failed: "
        "release.sh exited with 1)",
        "#2 web 2.0.0 -> staging: rolling back to 1.0.0",
        "#3 web 1.0.0 -> staging: succeeded",
    ]


def test_journal_through_the_python_api(shipyarder):
    shipyarder.makepipelines(
        """
        import shipyard as sy
        from shipyard_example import journal

        @sy.pipeline(notify=[journal("deploys.log")])
        def site(d):
            return [sy.stage("publish", sy.command("echo", "published", d.version))]
        """
    )

    deployment = shipyarder.deploy("site", "3.1.0", "production", plugins=PLUGIN)

    assert deployment.status == "succeeded"
    deployment.assert_outcomes(succeeded=1)
    text = (shipyarder.path / "deploys.log").read_text()
    assert text.endswith(" #1 site 3.1.0 -> production: succeeded\n")
