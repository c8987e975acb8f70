"""Manifests: finding the files, rendering their ``${VAR}`` references, parsing the documents.

Only PyYAML is needed, no server: ``plan`` renders the manifests too. PyYAML is imported when the
first manifest is parsed, never when a pipelines file is loaded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from typing import Any
from typing import Final

if TYPE_CHECKING:
    from pathlib import Path

    from shipyard.sdk import Deployment

#: A Kubernetes object as the API speaks it: JSON, here as a dict.
Obj = dict[str, Any]

#: Kinds applied before the others, so that what they define exists.
_FIRST_KINDS: Final = ("Namespace", "CustomResourceDefinition")
_MANIFEST_SUFFIXES: Final = (".yaml", ".yml", ".json")

_VARIABLE = re.compile(r"\$(\$?)\{([^}\n]*)\}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class ManifestError(Exception):
    """A manifest cannot be read, rendered or parsed; the message names the file and line."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass
class Document:
    """One object of a manifest, rendered, with where it was written."""

    #: The file as shown to the user (relative to the pipelines file when inside it).
    source: str
    #: The 1-based line where the document starts.
    line: int
    body: Obj

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    @property
    def api_version(self) -> str:
        return str(self.body["apiVersion"])

    @property
    def kind(self) -> str:
        return str(self.body["kind"])

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])

    @property
    def namespace(self) -> str | None:
        ns = self.body["metadata"].get("namespace")
        return str(ns) if ns else None

    @property
    def ref(self) -> str:
        """``deployment.apps/web``, as kubectl names objects."""
        return object_ref(self.api_version, self.kind, self.name)


def object_ref(api_version: str, kind: str, name: str) -> str:
    """``kind.group/name`` (``kind/name`` in the core group), as kubectl names objects."""
    group = api_version.rpartition("/")[0]
    return f"{kind.lower()}.{group}/{name}" if group else f"{kind.lower()}/{name}"


def variables_for(deployment: Deployment) -> dict[str, str]:
    """What ``${NAME}`` may refer to: ``--var`` values, then the ``DEPLOYMENT_*`` ones."""
    values = {str(k): str(v) for k, v in deployment.vars.items()}
    values.update(
        {
            "DEPLOYMENT_ID": str(deployment.id) if deployment.id else "<id>",
            "DEPLOYMENT_VERSION": deployment.version,
            "DEPLOYMENT_ENVIRONMENT": deployment.environment,
            "DEPLOYMENT_PIPELINE": deployment.pipeline,
        }
    )
    return values


def render(text: str, variables: Mapping[str, str], source: str) -> str:
    """``text`` with ``${NAME}`` replaced; ``$${NAME}`` stays ``${NAME}``; a bare ``$X`` stays.

    :raises ManifestError: for an unknown variable or a value with a line break, naming the line.
    """

    def replace(match: re.Match[str]) -> str:
        escaped, name = match.group(1), match.group(2)
        if escaped:
            return "${" + name + "}"
        line = text.count("\n", 0, match.start()) + 1
        if not _NAME.match(name):
            raise ManifestError(
                f"{source}:{line}: ${{{name}}} is not a variable reference (names are letters, "
                "digits and _); write $${...} for a literal ${...}"
            )
        if name not in variables:
            known = ", ".join(sorted(variables))
            raise ManifestError(
                f"{source}:{line}: unknown variable ${{{name}}} (known: {known}); pass it with "
                f"--var {name}=VALUE, or write $${{{name}}} for a literal ${{{name}}}"
            )
        value = variables[name]
        if "\n" in value or "\r" in value:
            raise ManifestError(
                f"{source}:{line}: the value of ${{{name}}} has a line break, which cannot be "
                "put into YAML text; pass a single-line value"
            )
        return value

    return _VARIABLE.sub(replace, text)


def _yaml() -> Any:
    # Any: PyYAML is optional (the kubernetes extra) and imported lazily.
    try:
        import yaml
    except ImportError:
        raise ManifestError(
            "rendering Kubernetes manifests needs PyYAML, which is not installed; install it "
            "with: pip install 'shipyard[kubernetes]'"
        ) from None
    return yaml


_LOADERS: dict[str, Any] = {}


def _loader_class() -> Any:
    """A safe loader that keeps timestamps as text (JSON, and so the API server, has no dates)."""
    cls: Any = _LOADERS.get("safe")
    if cls is None:
        yaml = _yaml()
        base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        cls = type("_ManifestLoader", (base,), {})
        cls.add_constructor(
            "tag:yaml.org,2002:timestamp", lambda loader, node: loader.construct_scalar(node)
        )
        _LOADERS["safe"] = cls
    return cls


def parse(text: str, source: str) -> list[Document]:
    """The documents of a rendered YAML (or JSON) text; empty documents are skipped.

    ``kind: List`` documents are expanded into their items.

    :raises ManifestError: for invalid YAML or a document that is not a Kubernetes object.
    """
    yaml = _yaml()
    loader = _loader_class()(text)
    docs: list[Document] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            line = node.start_mark.line + 1
            body = loader.construct_document(node)
            if body is None:
                continue
            items = body.get("items") if isinstance(body, dict) else None
            if (
                isinstance(body, dict)
                and str(body.get("kind", "")).endswith("List")
                and isinstance(items, list)
            ):
                for item in items:
                    docs.append(_checked(Document(source, line, item)))
            else:
                docs.append(_checked(Document(source, line, body)))
    except yaml.YAMLError as exc:
        raise _invalid_yaml(exc, source) from None
    finally:
        loader.dispose()
    return docs


def _invalid_yaml(exc: Any, source: str) -> ManifestError:
    """What PyYAML found wrong, and on which line of ``source``."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{source}:{mark.line + 1}" if mark is not None else source
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    what = f"{context}, {problem}" if context else problem
    return ManifestError(f"{where}: invalid YAML: {what}; fix the manifest")


def _checked(doc: Document) -> Document:
    body = doc.body
    if not isinstance(body, dict):
        raise ManifestError(
            f"{doc.where}: a document must be a Kubernetes object (a mapping with apiVersion, "
            f"kind and metadata), got a {type(body).__name__}"
        )
    missing = [k for k in ("apiVersion", "kind") if not isinstance(body.get(k), str) or not body[k]]
    meta = body.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        missing.append("metadata.name")
    if missing:
        raise ManifestError(
            f"{doc.where}: the document has no {', '.join(missing)}; server-side apply needs "
            "apiVersion, kind and metadata.name in every document"
        )
    return doc


def manifest_files(manifests: Iterable[str], rootdir: Path) -> list[tuple[Path, str]]:
    """The files to read, as ``(path, shown name)``: folders give their YAML/JSON files, sorted.

    :raises ManifestError: for a path that does not exist or a folder without manifests.
    """
    found: list[tuple[Path, str]] = []
    for item in manifests:
        path = (rootdir / item).expanduser()
        shown = item
        if path.is_dir():
            files = sorted(
                p for p in path.iterdir() if p.suffix in _MANIFEST_SUFFIXES and p.is_file()
            )
            if not files:
                raise ManifestError(
                    f"manifest folder {item!r} ({path}) has no .yaml, .yml or .json files; "
                    "check the path"
                )
            found += [(p, _shown(p, rootdir)) for p in files]
        elif path.is_file():
            found.append((path, shown))
        else:
            raise ManifestError(
                f"manifest {item!r} not found (looked for {path}, relative to the pipelines "
                "file's folder); check the path"
            )
    return found


def _shown(path: Path, rootdir: Path) -> str:
    try:
        return path.relative_to(rootdir).as_posix()
    except ValueError:
        return str(path)


def load_documents(
    manifests: Iterable[str], rootdir: Path, variables: Mapping[str, str]
) -> list[Document]:
    """Read, render and parse every manifest; Namespaces and CRDs first, the rest in order."""
    docs: list[Document] = []
    for path, shown in manifest_files(manifests, rootdir):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ManifestError(f"manifest {shown} is not UTF-8 text") from None
        except OSError as exc:
            raise ManifestError(f"cannot read manifest {shown}: {exc.strerror}") from None
        docs += parse(render(text, variables, shown), shown)
    if not docs:
        raise ManifestError(
            f"the manifests ({', '.join(manifests)}) contain no documents; nothing to apply"
        )
    first = [d for d in docs if d.kind in _FIRST_KINDS]
    return first + [d for d in docs if d.kind not in _FIRST_KINDS]


def images_of(body: Any) -> list[str]:
    """Container images anywhere in an object (pod templates, CronJob templates, pods)."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    found.extend(
                        str(c["image"]) for c in value if isinstance(c, dict) and c.get("image")
                    )
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(body.get("spec") if isinstance(body, dict) else None)
    return list(dict.fromkeys(found))


# Reprs, tracebacks and pickles name the package, as before it was split into modules.
Document.__module__ = "shipyard.plugins.kubernetes"

# Reprs, tracebacks and pickles name the package, as before it was split into modules.
ManifestError.__module__ = "shipyard.plugins.kubernetes"
