"""Where a result came from: code version, package versions, platform and the exact bytes of its inputs.

One record shape for every file this tool writes: `provenance()` gives {git, packages, python, platform} plus,
when asked, the command (argv, cwd, UTC time), the dataset's path and sha256, other input files' sha256 and the
run's own RUN/provenance.json. Training writes it to RUN/provenance.json (`run_provenance`: a resumed start is
appended to the original record's "resumes", never written over it); eval, diagnose and compare embed it
in their reports. `file_sha256` is the one file hash (checkpoint weights in the eval journal, sweep configs).
"""

from __future__ import annotations

import datetime
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("dopr-robot", "torch", "mujoco", "robosuite", "diffusers", "numpy", "h5py", "zarr", "matplotlib")


def _module_version(package: str) -> str | None:
    """`module.__version__`, for a package importable without dist-info (e.g. a source checkout on PYTHONPATH).
    Imported only in that case; robosuite through `import_robosuite` (it must choose MUJOCO_GL first)."""
    module_name = package.replace("-", "_")
    try:
        if importlib.util.find_spec(module_name) is None:
            return None
        if module_name == "robosuite" and module_name not in sys.modules:
            from dopr_robot.envs.robosuite_env import import_robosuite

            module = import_robosuite()
        else:
            module = importlib.import_module(module_name)
    except Exception:  # a package that cannot import has no version to record; provenance must not fail
        return None
    version = getattr(module, "__version__", None)
    return str(version) if version is not None else None


def package_versions() -> dict[str, str | None]:
    """{package: version or None}: the installed distribution's version, else the module's `__version__`."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = _module_version(name)
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


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of one file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_sha256(path: str | Path) -> str:
    """sha256 of a dataset file (= `file_sha256`); for a directory store (zarr), of every file's relative path
    and bytes in sorted order, so the same store gives the same hash wherever it lies."""
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def provenance(dataset_path: str | Path | None = None, *, command: Sequence[str] | None = None,
               files: Mapping[str, str | Path] | None = None, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Git commit (+ dirty flag), package versions, python and platform; with the optional arguments also
    `dataset` {path, sha256 (None when missing)}, `command` {argv, cwd, time_utc}, `files` {name: {path,
    sha256}} for other inputs, and `run`: RUN/provenance.json as training wrote it (None when unreadable)."""
    record: dict[str, Any] = {
        "git": git_state(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    if command is not None:
        record["command"] = {"argv": list(command), "cwd": os.getcwd(),
                             "time_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    if dataset_path is not None:
        path = Path(dataset_path)
        record["dataset"] = {"path": str(path.resolve()),
                             "sha256": dataset_sha256(path) if path.exists() else None}
    if files:
        record["files"] = {name: {"path": str(Path(p).resolve()),
                                  "sha256": file_sha256(p) if Path(p).is_file() else None}
                           for name, p in files.items()}
    if run_dir is not None:
        try:
            record["run"] = json.loads((Path(run_dir) / "provenance.json").read_text())
        except (OSError, ValueError):
            record["run"] = None
    return record


def run_provenance(run_dir: str | Path, dataset_path: str | Path, command: Sequence[str],
                   resume_step: int | None = None) -> dict[str, Any]:
    """The RUN/provenance.json a training start writes. A fresh run: `provenance(dataset, command=...)`. A resume
    (`resume_step`: the step it continues from): the run's original record, unchanged, with this start's record
    plus {"step": resume_step} appended to its "resumes" list (oldest first), so the commit, packages, dataset
    hash and command the run was started with are never lost. An original that is missing or unreadable is
    recorded as {"original": None, "resumes": [...]} rather than guessed."""
    record = provenance(dataset_path, command=command)
    if resume_step is None:
        return record
    try:
        original = json.loads((Path(run_dir) / "provenance.json").read_text())
    except (OSError, ValueError):
        original = None
    if not isinstance(original, dict):
        original = {"original": None}
    resumes = original.get("resumes")
    resumes = list(resumes) if isinstance(resumes, list) else []
    return {**original, "resumes": [*resumes, {**record, "step": int(resume_step)}]}
