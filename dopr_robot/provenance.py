"""Where a result came from: code version, package versions, platform and the exact dataset bytes.

`provenance(dataset_path)` is written by training to RUN/provenance.json and embedded by eval / compare reports.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "mujoco", "robosuite", "diffusers", "numpy", "h5py", "zarr")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(directory: str | Path | None = None) -> dict[str, Any]:
    """{"commit": sha or None, "dirty": bool or None} of the checkout holding this package (None outside one)."""
    directory = Path(directory) if directory else Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip())}


def dataset_sha256(path: str | Path) -> str:
    """sha256 of a dataset file; for a directory store (zarr), of every file's relative path and bytes in
    sorted order, so the same store gives the same hash wherever it lies."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def provenance(dataset_path: str | Path | None = None) -> dict[str, Any]:
    """Git commit (+ dirty flag), package versions, python, platform and the dataset's path and sha256."""
    record: dict[str, Any] = {
        "git": git_state(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    if dataset_path is not None:
        path = Path(dataset_path)
        record["dataset"] = {"path": str(path.resolve()),
                             "sha256": dataset_sha256(path) if path.exists() else None}
    return record
