"""Which cluster: the kubeconfig (or the pod's service account), its context, its namespace.

Everything here is blocking and runs in a worker thread; the client library is passed in
(``k8s``), so this module imports nothing heavy either.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from typing import Final

from shipyard.sdk import StepFailed

from ._options import short

_SA_TOKEN: Final = "/var/run/secrets/kubernetes.io/serviceaccount/token"
_SA_NAMESPACE: Final = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def kubeconfig() -> tuple[str | None, str]:
    """The kubeconfig file(s) to use, or None for the pod's service account; and how to say it.

    :raises StepFailed: when there is neither.
    """
    env = os.environ.get("KUBECONFIG", "").strip()
    if env:
        paths = [p for p in env.split(os.pathsep) if p]
        existing = [p for p in paths if Path(p).expanduser().is_file()]
        if not existing:
            raise StepFailed(
                f"KUBECONFIG is {env!r}, but there is no such file; point KUBECONFIG at your "
                "cluster's kubeconfig (`kubectl config view` shows the one kubectl uses)"
            )
        return os.pathsep.join(str(Path(p).expanduser()) for p in existing), "KUBECONFIG"
    default = Path("~/.kube/config").expanduser()
    if default.is_file():
        return str(default), str(default)
    if os.environ.get("KUBERNETES_SERVICE_HOST") and Path(_SA_TOKEN).is_file():
        return None, "the pod's service account"
    raise StepFailed(
        f"no kubeconfig: KUBECONFIG is not set, {default} does not exist, and this is not a "
        "pod in a cluster; set KUBECONFIG to your cluster's kubeconfig file"
    )


def load_config(
    k8s: Any, cfg: Any, config_file: str | None, source: str, context: str | None
) -> tuple[str, str]:
    """Fill the client configuration ``cfg`` for ``context`` (blocking).

    :param k8s: the ``kubernetes`` package.
    :param config_file: from :func:`kubeconfig`; None for the pod's service account.
    :returns: ``(where, namespace)``: how to name the configuration in messages, and the
        context's namespace (``default`` when it names none).
    :raises StepFailed: for a configuration that cannot be used.
    """
    if config_file is None:
        return _load_incluster_config(k8s, cfg, source)
    return _load_kubeconfig(k8s, cfg, config_file, source, context)


def _load_incluster_config(k8s: Any, cfg: Any, source: str) -> tuple[str, str]:
    try:
        k8s.config.load_incluster_config(client_configuration=cfg)
    except k8s.config.ConfigException as exc:
        raise StepFailed(
            f"cannot use {source}: {exc}; set KUBECONFIG to a kubeconfig file instead"
        ) from None
    try:
        namespace = Path(_SA_NAMESPACE).read_text().strip() or "default"
    except OSError:
        namespace = "default"
    return source, namespace


def _load_kubeconfig(
    k8s: Any, cfg: Any, config_file: str, source: str, context: str | None
) -> tuple[str, str]:
    config_errors = k8s.config.ConfigException
    shown = config_file if source == "KUBECONFIG" else source
    try:
        contexts, current = k8s.config.list_kube_config_contexts(config_file)
    except (config_errors, OSError, ValueError) as exc:
        raise StepFailed(
            f"the kubeconfig {shown} cannot be used: {exc}; fix it, or point "
            "KUBECONFIG at another one"
        ) from None
    except Exception as exc:  # YAML errors of a broken file
        raise StepFailed(
            f"the kubeconfig {shown} cannot be read: {type(exc).__name__}: "
            f"{short(str(exc), 200)}; fix it, or point KUBECONFIG at another one"
        ) from None
    names = [c.get("name") for c in contexts or []]
    chosen = next(
        (c for c in contexts or [] if c.get("name") == context),
        None if context else current,
    )
    if chosen is None:
        raise StepFailed(
            f"the kubeconfig {shown} has no context {context!r} (contexts: "
            f"{', '.join(map(str, names)) or 'none'}); fix the step's context= or "
            "the kubeconfig"
        )
    try:
        k8s.config.load_kube_config(
            config_file=config_file, context=chosen["name"],
            client_configuration=cfg, persist_config=False,
        )  # fmt: skip
    except (config_errors, OSError, ValueError) as exc:
        raise StepFailed(
            f"the kubeconfig {shown} cannot be used with context "
            f"{chosen['name']!r}: {exc}; fix it, or point KUBECONFIG at another one"
        ) from None
    where = f"context {chosen['name']!r} of {shown}"
    namespace = (chosen.get("context") or {}).get("namespace") or "default"
    return where, namespace


def discovery_cache(host: str) -> tuple[str, str | None]:
    """A private discovery cache file for ``host``, and a folder to remove afterwards (or None).

    Per user (``$XDG_CACHE_HOME/shipyard/kubernetes``, mode 0700), never the shared temporary
    folder the client would use by default, where anyone could plant a poisoned cache.
    """
    import hashlib

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = Path(base) / "shipyard" / "kubernetes"
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if folder.stat().st_mode & 0o077:
            folder.chmod(0o700)
        if not os.access(folder, os.W_OK):
            raise PermissionError(folder)
    except OSError:
        import tempfile

        tmp = tempfile.mkdtemp(prefix="shipyard-k8s-")  # 0700, removed after the step
        return os.path.join(tmp, "discovery.json"), tmp
    key = hashlib.sha256(host.encode()).hexdigest()[:20]
    return str(folder / f"discovery-{key}.json"), None


def remove_tree(path: str | None) -> None:
    """Remove the folder :func:`discovery_cache` made, if it made one."""
    if path:
        import shutil

        shutil.rmtree(path, ignore_errors=True)
