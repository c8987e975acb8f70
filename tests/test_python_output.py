"""What a ``python`` step prints is its output: console gutter, history, masking (issue 12.4).

Through the real console script (``shipyarder.spawn``): the console's own stdout and stderr are
the ones replaced while a command runs, so only a real process shows what a user sees.
"""

from __future__ import annotations

PIPELINES = """
import asyncio
import logging
import sys
import threading

import shipyard as sy

log = logging.getLogger("release")


def sync_step(token):
    print("sync line one")
    print("sync partial", end="")
    print(" ... done")
    print("to stderr", file=sys.stderr)
    print(f"the token is {token}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    log.info("a log record")


def with_thread():
    t = threading.Thread(target=lambda: print("from a thread it started"))
    t.start()
    t.join()
    print("no newline at the end", end="")


async def async_step():
    await asyncio.sleep(0)
    print("async line")


def fails():
    print("the last words")
    raise RuntimeError("boom")


@sy.pipeline()
def app(d):
    return [
        sy.stage("one", sy.python(sync_step, sy.secret("TOKEN"), name="sync")),
        sy.stage("two", sy.python(with_thread, name="thread"), sy.python(async_step, name="async")),
        sy.stage("three", sy.python(fails, name="fails")),
    ]
"""


def _logs(history: str, dep_id: int) -> list[dict[str, object]]:
    from shipyard.sdk import open_store

    store = open_store(history, create=False)
    try:
        return [dict(row) for row in store.logs(dep_id)]
    finally:
        store.close()


def test_python_step_output_reaches_console_and_history_masked(shipyarder):
    shipyarder.makepipelines(PIPELINES)
    r = shipyarder.spawn("deploy", "app", "1.0", "-e", "prod", env={"TOKEN": "s3cr3t-t0ken"})
    assert r.exit_code == 1, r  # the third stage fails
    out = r.stdout
    assert "s3cr3t-t0ken" not in r.stdout + r.stderr
    # On the console with the step's gutter, before the step's own result line.
    for line in ("sync line one", "sync partial ... done", "to stderr", "the token is ***",
                 "INFO release: a log record", "from a thread it started",
                 "no newline at the end", "async line", "the last words"):  # fmt: skip
        assert f"│ {line}" in out, (line, out)
    assert out.index("│ sync line one") < out.index("ok        sync")
    assert out.index("│ the last words") < out.index("failed    fails")
    # Nothing went to the terminal around the reporter.
    assert "sync line one" not in r.stderr
    assert "to stderr" not in r.stderr
    logs = _logs(r.history_path, 1)
    by_text = {entry["line"]: entry for entry in logs}
    for text, step, stream in [
        ("sync line one", "sync", "stdout"),
        ("sync partial ... done", "sync", "stdout"),
        ("to stderr", "sync", "stderr"),
        ("the token is ***", "sync", "stdout"),
        ("INFO release: a log record", "sync", "stderr"),
        ("from a thread it started", "thread", "stdout"),
        ("no newline at the end", "thread", "stdout"),
        ("async line", "async", "stdout"),
        ("the last words", "fails", "stdout"),
    ]:
        assert text in by_text, (text, sorted(by_text))
        assert (by_text[text]["step"], by_text[text]["stream"]) == (step, stream), by_text[text]
    assert not any("s3cr3t" in str(e) for e in logs)
    # ``shipyard logs`` shows them too, under the step.
    shown = shipyarder.spawn("logs", "1")
    assert shown.exit_code == 0, shown
    assert "from a thread it started" in shown.stdout
    assert "s3cr3t" not in shown.stdout
