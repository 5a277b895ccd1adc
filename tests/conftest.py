import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def lift_demos(tmp_path_factory) -> Path:
    """A small real dataset: 6 scripted-expert Lift demos collected in robosuite (session-wide, ~10 s)."""
    from dopr_robot.collect import collect

    path = tmp_path_factory.mktemp("data") / "lift6.hdf5"
    collect("lift", 6, seed=0, out=path, progress=False)
    return path


@pytest.fixture(scope="session")
def lift_image_demos(tmp_path_factory) -> Path:
    """1 scripted Lift demo collected with two cameras rendered at 32x32 (`collect --cameras`), session-wide.
    Skips (with the reason) where offscreen rendering does not work."""
    from dopr_robot.collect import collect
    from dopr_robot.envs import default_env_args
    from dopr_robot.envs.render import RenderSpec, check_rendering
    from dopr_robot.errors import UserError

    try:
        check_rendering(default_env_args("lift"), RenderSpec("agentview", 32, 32))
    except UserError as e:
        pytest.skip(f"offscreen rendering unavailable here: {e}")
    path = tmp_path_factory.mktemp("data") / "lift1_images.hdf5"
    collect("lift", 1, seed=0, out=path, progress=False, cameras=("agentview", "robot0_eye_in_hand"), image_size=32)
    return path


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `dopr-robot ARGS` in a fresh interpreter, as a user would."""
    return subprocess.run([sys.executable, "-m", "dopr_robot.cli", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="session")
def minari_pendulum(tmp_path_factory):
    """A small real Minari dataset (DataCollector, InvertedPendulum-v5, 6 episodes of <= 40 steps; ~1 s).
    Returns (datasets root for MINARI_DATASETS_PATH, dataset id, what each episode executed)."""
    from tiny_data import make_minari_dataset

    root = tmp_path_factory.mktemp("minari")
    dataset_id = "dopr-test/pendulum/pd-v0"
    return root, dataset_id, make_minari_dataset(root, dataset_id)
