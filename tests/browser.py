"""A real Chromium for the dashboard's tests (Debian's ``/usr/bin/chromium``, driven by Python
playwright through ``executable_path``; never ``playwright install``), one per test run, and a
TCP relay whose connections a test can cut.

Screenshots go to ``$SHIPYARD_SCREENSHOTS`` when set, else to the test's temporary folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("SHIPYARD_CHROMIUM", "/usr/bin/chromium")
#: Read at import: the ``shipyarder`` fixture clears every SHIPYARD_* variable for its test.
SCREENSHOTS = os.environ.get("SHIPYARD_SCREENSHOTS")


@pytest.fixture(name="browser")
def browser_fixture() -> Iterator[Any]:
    """A Chromium; a test that cannot start it fails.

    Per test, not per session: while playwright's sync API is open it keeps an asyncio loop
    running in this thread, and every later in-process ``shipyard deploy`` of the same worker
    (``asyncio.run``) would then fail with "Cannot run the event loop while another loop is
    running"."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(name="page")
def page_fixture(browser: Any) -> Iterator[Any]:
    context = browser.new_context()
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.errors = errors
    try:
        yield pg
    finally:
        context.close()


@pytest.fixture(name="screenshot")
def screenshot_fixture(tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    """``screenshot(page, name)`` writes a PNG of the page as a test artifact; returns it."""
    root = Path(SCREENSHOTS or tmp_path / "screenshots")
    root.mkdir(parents=True, exist_ok=True)

    def take(pg: Any, name: str) -> Path:
        path = root / f"{request.node.name}-{name}.png"
        pg.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 0
        return path

    return take
