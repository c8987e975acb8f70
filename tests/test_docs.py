"""Every code sample in docs/ and README.md runs here, so the documentation cannot drift.

How a page's fenced blocks are treated (in page order, in one temporary "project" per page):

- ```` ```python ```` without a title is compiled, then executed with ``python`` in the current
  directory of the page (with the files written so far); it must exit 0.
- A block with ``title="PATH"`` (any language) is written to PATH in the current directory, the
  way a reader would save it. Python files are compiled, TOML and YAML files parsed. A file named
  ``*pipelines*.py`` is also checked on its own, in a fresh directory with the page's earlier
  files: ``shipyard list`` and ``shipyard plan`` of each of its pipelines (version ``1.0.0``, the
  first allowed environment) must succeed; with the directive ``deploy`` each pipeline is
  deployed too and must succeed. A file named ``test_*.py`` is run with pytest and must pass.
- ```` ```console ```` blocks are shell sessions: each ``$ command`` runs with bash in the page's
  current directory (``cd`` carries over to later commands and blocks); its output (stdout and
  stderr together) must match the lines that follow it, after normalisation (times, durations,
  pids, the temporary directory shown as ``/home/alice``, the host as ``laptop``, runs of
  spaces). A line ``...`` stands for any number of lines and ``...`` inside a line for any text.
  A command must exit 0 unless it is followed by ``$ echo $?``, whose output is its exit code.
  ``export`` carries over too.
- Directives are HTML comments on the lines right above a fence (invisible on the site):
  ``<!-- test: skip REASON -->`` (not run; the reason is mandatory, keep these rare),
  ``<!-- test: deploy -->`` (see above), ``<!-- test: vars K=V ... -->`` (the --var options
  of that plan and deploy), ``<!-- test: invalid -->`` (a pipelines file that shows
  an error: written, but not checked on its own; the console block after it shows the error),
  ``<!-- test: env NAME=VALUE -->`` (set a variable for the page's later commands),
  ``<!-- test: signature -->`` (a call such as ``sy.wait(seconds, name=None)``: its parameters
  and defaults must be those of the code).
- ``--8<-- "path"`` lines (pymdownx.snippets) are replaced by the file, as on the site.

``SHIPYARD_DOCS_UPDATE=1 pytest tests/test_docs.py`` rewrites the output of console commands that
no longer match (unless their expected output uses ``...``), for reviewing with ``git diff``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import Callable
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

import pytest
from shipyard._store import CI_VARIABLES

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BIN = Path(sys.executable).parent
UPDATE = os.environ.get("SHIPYARD_DOCS_UPDATE") == "1"
#: Pages generated from the code (docs/gen_reference.py): their samples are compiled only.
GENERATED = {"reference/cli.md", "reference/hooks.md"}
#: What the temporary directory is shown as, and the host.
HOME_SHOWN = "/home/alice"
HOST_SHOWN = "laptop"

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*)$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*test:\s*(?P<text>.*?)\s*-->\s*$")
_SNIPPET = re.compile(r"""^(?P<indent>\s*)--8<--\s+["'](?P<path>[^"']+)["']\s*$""")


def _pages() -> list[Path]:
    return [*sorted(DOCS.rglob("*.md")), ROOT / "README.md"]


def _page_id(page: Path) -> str:
    return page.relative_to(DOCS).as_posix() if page.is_relative_to(DOCS) else page.name


@dataclass
class Block:
    """One fenced code block of a page."""

    page: Path
    #: 1-based line numbers of the opening and closing fences.
    start: int
    end: int
    lang: str
    title: str | None
    text: str
    indent: str
    directives: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{_page_id(self.page)}:{self.start}"

    def directive(self, name: str) -> str | None:
        for d in self.directives:
            word, _, rest = d.partition(" ")
            if word == name:
                return rest.strip()
        return None


def _parse_info(info: str) -> tuple[str, dict[str, str]]:
    """The language and ``key="value"`` options of an info string (plain or ``{.lang ...}``)."""
    info = info.strip()
    if info.startswith("{") and info.endswith("}"):
        info = info[1:-1]
    tokens = shlex.split(info) if info else []
    lang = ""
    opts: dict[str, str] = {}
    for tok in tokens:
        if "=" in tok:
            key, _, value = tok.partition("=")
            opts[key] = value
        elif tok.startswith("."):
            lang = lang or tok[1:]
        elif not lang:
            lang = tok
    return lang, opts


def _expand_snippets(text: str) -> str:
    out = []
    for line in text.splitlines():
        m = _SNIPPET.match(line)
        if m:
            content = (ROOT / m.group("path")).read_text(encoding="utf-8").rstrip("\n")
            out += [m.group("indent") + ln if ln else ln for ln in content.splitlines()]
        else:
            out.append(line)
    return "\n".join(out)


def parse_blocks(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m.group("indent"), m.group("fence"), m.group("info")
        j = i + 1
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        while j < len(lines) and not closing.match(lines[j]):
            j += 1
        body = [
            ln[len(indent) :] if ln.startswith(indent) else ln.lstrip() for ln in lines[i + 1 : j]
        ]
        directives = []
        k = i - 1
        while k >= 0 and (d := _DIRECTIVE.match(lines[k])):
            directives.insert(0, d.group("text"))
            k -= 1
        lang, opts = _parse_info(info)
        text = _expand_snippets("\n".join(body))
        blocks.append(
            Block(page, i + 1, j + 1, lang, opts.get("title"), text + "\n", indent, directives)
        )
        i = j + 1
    return blocks


# -- normalising output -------------------------------------------------------------------------

_NORMALISE = [
    (re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(\.\d+)?Z?"), "<ts>"),
    (re.compile(r"\b\d\d:\d\d:\d\d\.\d{3}\b"), "<ts>"),
    (re.compile(r"\b\d+m\d\ds\b"), "<t>"),
    (re.compile(r"\b\d+(\.\d+)?(ms|s)\b"), "<t>"),
    (re.compile(r"\bpid \d+"), "pid <n>"),
    (re.compile(r'"pid": \d+'), '"pid": <n>'),
    (re.compile(r"^(\s*shipyard\s+)\d+\.\d+\S*$", re.M), r"\1<version>"),
    (re.compile(r'("shipyard_version": )"[^"]*"'), r'\1"<version>"'),
    (re.compile(r"sha256 [0-9a-f]{12}"), "sha256 <hash>"),
    (re.compile(r'("file_hash": )"[0-9a-f]+"'), r'\1"<hash>"'),
]


def normalise(text: str) -> list[str]:
    for pattern, repl in _NORMALISE:
        text = pattern.sub(repl, text)
    lines = [re.sub(r"\s+", " ", ln).strip() for ln in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def matches(expected: list[str], actual: list[str]) -> bool:
    """Whether ``actual`` fits ``expected``, where ``...`` elides lines or text within a line."""
    parts = []
    for line in expected:
        if line == "...":
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            parts.append(".*?".join(re.escape(p) for p in line.split("...")) + r"\n")
    return re.fullmatch("".join(parts), "".join(ln + "\n" for ln in actual)) is not None


# -- running a page -----------------------------------------------------------------------------


@dataclass
class Command:
    line: int
    cmd: str
    expected: list[str]


def _commands(block: Block) -> list[Command]:
    cmds: list[Command] = []
    for n, line in enumerate(block.text.splitlines(), block.start + 1):
        if line.startswith("$ "):
            cmds.append(Command(n, line[2:], []))
        elif cmds:
            cmds[-1].expected.append(line)
        elif line.strip():
            raise AssertionError(f"{block.where}: console output before the first '$ ' line")
    return cmds


class PageRunner:
    """Runs the samples of one page in its own temporary project."""

    def __init__(self, page: Path, tmp: Path) -> None:
        self.page = page
        self.home = tmp / "home"
        self.home.mkdir()
        self.cwd = self.home
        self.tmp = tmp
        self.written: dict[str, str] = {}
        self.failures: list[str] = []
        self.updates: list[tuple[Block, str]] = []
        # The samples show a developer's terminal, not a CI job's: no CI variable reaches them
        # (a CI run of this suite would otherwise add the ephemeral-history warning).
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("SHIPYARD_") and k not in CI_VARIABLES
        }
        self.env.update(
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", HOME=str(self.home),
            SHIPYARD_USER="alice", NO_COLOR="1", TERM="dumb", PYTHONDONTWRITEBYTECODE="1",
        )  # fmt: skip
        self.env.pop("FORCE_COLOR", None)
        self.env.pop("PYTHONPATH", None)
        self._n = 0

    def fail(self, block: Block, message: str) -> None:
        self.failures.append(f"{block.where}: {message}")

    def shown(self, text: str) -> str:
        """Output as the docs show it: the temporary home as /home/alice, the host as laptop."""
        for path in {str(self.home), str(self.home.resolve())}:
            text = text.replace(path, HOME_SHOWN)
        host = re.escape(socket.gethostname())
        text = re.sub(rf"(?<=\bon ){host}\b", HOST_SHOWN, text)
        return re.sub(rf'("host": ){json.dumps(socket.gethostname())}', rf'\1"{HOST_SHOWN}"', text)

    def run(self, args: list[str], cwd: Path, timeout: float = 60) -> tuple[int, str]:
        """Run ``args``; return the exit code and stdout and stderr together.

        In a session of its own, so that a command that hangs is killed with everything it
        started (bash, shipyard, its steps) instead of being left behind.
        """
        proc = subprocess.Popen(
            args, cwd=cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            text = out.decode("utf-8", "replace")
            return -1, f"{text}\n[test_docs: {shlex.join(args)!r} killed after {timeout:g}s]"
        return proc.returncode, out.decode("utf-8", "replace")

    # -- block kinds ------------------------------------------------------------------------------

    def handle(self, block: Block) -> None:
        for d in block.directives:
            word, _, rest = d.partition(" ")
            if word == "env":  # NAME=VALUE, then an optional explanation
                key, _, value = rest.partition("=")
                self.env[key.strip()] = value.split()[0] if value.split() else ""
            elif word == "skip":
                assert rest.strip(), f"{block.where}: 'test: skip' needs a reason"
                return
            elif word == "signature":
                self.check_signature(block)
                return
            elif word not in ("deploy", "invalid", "vars"):
                raise AssertionError(f"{block.where}: unknown directive {d!r}")
        generated = _page_id(self.page) in GENERATED
        if block.lang in ("python", "py", "python3"):
            try:
                compile(block.text, block.where, "exec")
            except SyntaxError as exc:
                self.fail(block, f"does not compile: {exc}")
                return
            if generated:
                return
        if block.title:
            self.write_file(block)
        elif block.lang in ("python", "py", "python3"):
            if _defines_pipeline(block.text):
                self.check_pipelines(block, block.text)
            self.run_script(block)
        elif block.lang == "console":
            self.run_console(block)
        elif block.lang == "toml":
            tomllib.loads(block.text)

    def check_signature(self, block: Block) -> None:
        """A call like ``sy.wait(seconds, name=None)`` must match the real signature."""
        import ast
        import inspect

        import shipyard

        call = ast.parse(block.text.strip(), mode="eval").body
        assert isinstance(call, ast.Call), f"{block.where}: a signature is one call"
        obj: object = shipyard
        for part in ast.unparse(call.func).split(".")[1:]:
            obj = getattr(obj, part)
        documented: list[tuple[str, str, object]] = []
        for a in call.args:
            if isinstance(a, ast.Starred):
                documented.append(("*", ast.unparse(a.value), None))
            else:
                documented.append(("", ast.unparse(a), None))
        for kw in call.keywords:
            if kw.arg is None:
                documented.append(("**", ast.unparse(kw.value), None))
            else:
                documented.append(("=", kw.arg, ast.literal_eval(kw.value)))
        target = obj.__init__ if isinstance(obj, type) else obj  # type: ignore[misc]
        real: list[tuple[str, str, object]] = []
        for p in inspect.signature(target).parameters.values():
            if p.name == "self" or (p.kind is p.VAR_KEYWORD and p.name == "unknown"):
                continue  # step types refuse unknown options themselves
            if p.kind is p.VAR_POSITIONAL:
                real.append(("*", p.name, None))
            elif p.kind is p.VAR_KEYWORD:
                real.append(("**", p.name, None))
            elif p.default is p.empty:
                real.append(("", p.name, None))
            else:
                real.append(("=", p.name, p.default))
        if documented != real:
            self.fail(block, f"documented signature {documented} differs from the code's {real}")

    def write_file(self, block: Block) -> None:
        assert block.title is not None
        path = self.cwd / block.title
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block.text, encoding="utf-8")
        if block.title.endswith((".sh", "/run")):
            path.chmod(0o755)
        self.written[block.title] = block.text
        name = Path(block.title).name
        if name.endswith(".toml"):
            try:
                tomllib.loads(block.text)
            except tomllib.TOMLDecodeError as exc:
                self.fail(block, f"not valid TOML: {exc}")
        elif name.endswith((".yml", ".yaml")):
            try:
                import yaml  # PyYAML comes with the kubernetes extra the tests install
            except ImportError:
                return
            try:
                yaml.safe_load(block.text)
            except yaml.YAMLError as exc:
                self.fail(block, f"not valid YAML: {exc}")
        elif re.fullmatch(r"test_\w+\.py", name):
            code, out = self.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", block.title],
                self.cwd,
            )
            if code != 0:
                self.fail(block, f"pytest {block.title} exited {code}:\n{out}")
        elif re.fullmatch(r"\w*pipelines\w*\.py", name) and block.directive("invalid") is None:
            self.check_pipelines(block, block.text)

    def run_script(self, block: Block) -> None:
        self._n += 1
        script = self.tmp / f"sample_{self._n}.py"
        script.write_text(block.text, encoding="utf-8")
        code, out = self.run([sys.executable, str(script)], self.cwd)
        if code != 0:
            self.fail(block, f"python sample exited {code}:\n{out}")

    def check_pipelines(self, block: Block, text: str) -> None:
        """``list`` and ``plan`` (and with ``deploy``, a deployment) of every pipeline."""
        self._n += 1
        project = self.tmp / f"isolated_{self._n}"
        project.mkdir()
        for title, content in self.written.items():
            dest = project / title
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(content, encoding="utf-8")
        (project / "pipelines.py").write_text(text, encoding="utf-8")
        deploy = "1" if block.directive("deploy") is not None else ""
        # ``<!-- test: vars K=V ... -->``: the --var options plan and deploy are given.
        variables = (block.directive("vars") or "").split()
        code, out = self.run([sys.executable, "-c", _CHECK_PIPELINES, deploy, *variables], project)
        if code != 0:
            self.fail(block, f"the pipelines check failed:\n{out}")

    def run_console(self, block: Block) -> None:
        commands = _commands(block)
        if not commands:
            self.fail(block, "a console block without any '$ ' line")
            return
        last_code = 0
        new_text: list[str] = []
        changed = False
        cwd_file = self.tmp / "cwd"
        env_file = self.tmp / "env"
        for i, c in enumerate(commands):
            follows_echo = i + 1 < len(commands) and commands[i + 1].cmd.strip() == "echo $?"
            if c.cmd.strip() == "echo $?":
                out = f"{last_code}\n"
                code = 0
            else:
                # cd and export carry over to the next commands, as in one terminal.
                state = f"pwd > {shlex.quote(str(cwd_file))}; env -0 > {shlex.quote(str(env_file))}"
                script = f"{c.cmd}\n__rc=$?\n{state}\nexit $__rc\n"
                code, out = self.run(["bash", "-c", script], self.cwd)
                if cwd_file.exists():
                    self.cwd = Path(cwd_file.read_text().strip())
                    cwd_file.unlink()
                if env_file.exists():
                    pairs = env_file.read_bytes().decode().split("\0")
                    env = dict(p.split("=", 1) for p in pairs if "=" in p)
                    for name in ("_", "SHLVL", "PWD", "OLDPWD", "__rc"):
                        env.pop(name, None)
                    self.env = env
                    env_file.unlink()
                last_code = code
            shown = self.shown(out)
            where = f"{_page_id(self.page)}:{c.line}"
            if code != 0 and not follows_echo:
                self.failures.append(f"{where}: `{c.cmd}` exited {code}:\n{shown}")
            ok = matches(normalise("\n".join(c.expected)), normalise(shown))
            if not ok:
                if UPDATE and "..." not in [e.strip() for e in c.expected]:
                    changed = True
                else:
                    self.failures.append(
                        f"{where}: the output of `{c.cmd}` differs from the docs.\n"
                        f"--- docs\n" + "\n".join(c.expected) + f"\n--- actual\n{shown}"
                    )
            new_text.append(f"$ {c.cmd}")
            new_text += shown.rstrip("\n").splitlines() if (UPDATE and not ok) else c.expected
        if changed:
            self.updates.append((block, "\n".join(new_text)))

    def apply_updates(self) -> None:
        if not self.updates:
            return
        lines = self.page.read_text(encoding="utf-8").splitlines()
        for block, text in sorted(self.updates, key=lambda u: -u[0].start):
            body = [block.indent + ln if ln else ln for ln in text.splitlines()]
            lines[block.start : block.end - 1] = body
        self.page.write_text("\n".join(lines) + "\n", encoding="utf-8")


#: Run in a fresh interpreter in the project: ``shipyard list``, then ``plan`` (and ``deploy``
#: when argv[1] is set) of every pipeline, in one process to keep the suite fast.
_CHECK_PIPELINES = """
import json, sys
from click.testing import CliRunner
from shipyard._cli import cli

def run(*args):
    result = CliRunner().invoke(cli, list(args), prog_name="shipyard")
    if result.exit_code != 0:
        sys.exit(f"shipyard {' '.join(args)} exited {result.exit_code}:\\n{result.output}")
    return result.output

variables = [x for kv in sys.argv[2:] for x in ("--var", kv)]
for p in json.loads(run("list", "--json")) or sys.exit("shipyard list found no pipeline"):
    args = (p["name"], "1.0.0", "-e", (p["environments"] or ["staging"])[0], *variables)
    run("plan", *args)
    if sys.argv[1]:
        run("deploy", *args)
"""


def _defines_pipeline(text: str) -> bool:
    return re.search(r"^@(sy|shipyard)\.pipeline\b", text, re.M) is not None


def run_page(page: Path, tmp: Path) -> list[str]:
    """Run every sample of ``page`` in ``tmp``; return the failures."""
    runner = PageRunner(page, tmp)
    try:
        for block in parse_blocks(page):
            runner.handle(block)
    except Exception as exc:  # a broken sample must not hide the others' results
        runner.failures.append(f"{_page_id(page)}: {type(exc).__name__}: {exc}")
    runner.apply_updates()
    return runner.failures


@pytest.fixture(scope="session")
def page_results(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[Path], list[str]]]:
    """``result(page)``: the failures of a page's samples.

    Pages are independent projects and almost all their time goes into ``shipyard``
    subprocesses, so the selected pages run concurrently in threads. Under pytest-xdist, whose
    workers share the pages out already (and each of which sees every collected test), a page
    runs when its test asks for it.
    """
    futures: dict[Path, Future[list[str]]] = {}

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:

        def submit(page: Path) -> Future[list[str]]:
            if page not in futures:
                tmp = tmp_path_factory.mktemp(re.sub(r"\W", "_", _page_id(page)))
                futures[page] = pool.submit(run_page, page, tmp)
            return futures[page]

        if not os.environ.get("PYTEST_XDIST_WORKER"):
            for item in request.session.items:
                if getattr(item, "originalname", "") == "test_samples":
                    submit(item.callspec.params["page"])  # type: ignore[attr-defined]
        yield lambda page: submit(page).result()


@pytest.mark.parametrize("page", _pages(), ids=_page_id)
def test_samples(page: Path, page_results: Callable[[Path], list[str]]) -> None:
    """Run every sample of the page (see the module docstring)."""
    failures = page_results(page)
    assert not failures, "\n\n".join(failures)


def test_generated_reference_is_up_to_date() -> None:
    """docs/reference/cli.md and hooks.md are what docs/gen_reference.py makes of the code."""
    sys.path.insert(0, str(DOCS))
    try:
        import gen_reference
    finally:
        sys.path.remove(str(DOCS))
    stale = gen_reference.write(check=not UPDATE)
    assert UPDATE or not stale, (
        f"{', '.join(str(p.relative_to(ROOT)) for p in stale)} out of date: run "
        "`python docs/gen_reference.py` (or `mkdocs build`) and commit the result"
    )


def test_every_step_type_is_documented() -> None:
    """Each built-in step type has a section in docs/steps/index.md."""
    from shipyard._plugins import ShipyardPluginManager

    pm = ShipyardPluginManager()
    pm.load(autoload=False)
    pm.finish_loading()
    overview = (DOCS / "steps" / "index.md").read_text(encoding="utf-8")
    missing = [k for k in pm.step_types.types if f"`{k}`" not in overview]
    assert not missing, f"step types missing from docs/steps/index.md: {missing}"


def test_configuration_reference_is_complete() -> None:
    """Every [tool.shipyard] key and every SHIPYARD_* variable the code reads is documented."""
    from shipyard import _config

    page = (DOCS / "reference" / "configuration.md").read_text(encoding="utf-8")
    missing = [f"`{key}`" for key in sorted(_config._KNOWN_SETTINGS) if f"| `{key}` |" not in page]
    code = "".join(p.read_text() for d in ("core", "plugins") for p in (ROOT / d).glob("*.py"))
    for var in sorted(set(re.findall(r"SHIPYARD_[A-Z_]+", code))):
        if f"| `{var}` |" not in page:
            missing.append(var)
    assert not missing, f"not in docs/reference/configuration.md: {missing}"


def test_exit_codes_reference() -> None:
    """The exit code table and the error tree of docs/reference/exit-codes.md match the code."""
    import shipyard

    page = (DOCS / "reference" / "exit-codes.md").read_text(encoding="utf-8")
    table = dict(re.findall(r"^\| (\d+) \| `(\w+)` \|", page, re.M))
    assert table == {str(int(m)): m.name for m in shipyard.ExitCode}
    tree = re.search(r"```text\n(.*?)```", page, re.S)
    assert tree is not None
    rows = re.findall(r"(\w+) +(\d)\b", tree.group(1))
    errors = {n for n in shipyard.__all__
              if isinstance(getattr(shipyard, n), type) and issubclass(getattr(shipyard, n), Exception)
              and not issubclass(getattr(shipyard, n), Warning)}  # fmt: skip
    assert {name for name, _ in rows} == errors  # every error of the tree, and no other
    for name, code in rows:
        assert getattr(shipyard, name).exit_code == int(code), name


def test_matching_rules() -> None:
    """The output comparison itself: ellipses and normalisation."""
    assert matches(["a", "...", "d"], ["a", "b", "c", "d"])
    assert matches(["a ... c"], ["a b c"])
    assert not matches(["a", "c"], ["a", "b", "c"])
    assert normalise("took 12ms  at 2025-01-01 10:00:00") == ["took <t> at <ts>"]
    assert normalise("ok  x  (1.25s)\n\n") == ["ok x (<t>)"]
