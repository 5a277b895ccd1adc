"""Tiny robomimic HDF5 / ReplayBuffer zarr files built by hand (no robosuite): random but well-formed demos."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np

from dopr_robot.cli import main
from dopr_robot.datasets import Episode, write_robomimic

ENV_ARGS = {"env_name": "Lift", "env_version": "1.5.2", "type": 1,
            "env_kwargs": {"robots": ["Panda"], "control_freq": 20}}
OBS_WIDTHS = {"object": 10, "robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2}
# train settings small enough for a few-second run on one core
TINY_TRAIN = ["policy.mlp.hidden_dim=32", "policy.mlp.num_layers=2", "train.batch_size=16", "train.log_every=1",
              "train.val_every=2", "train.warmup_steps=1", "train.steps=6", "train.threads=1"]


def tiny_episodes(n: int = 6, length: int = 30, action_dim: int = 7, seed: int = 0) -> list[Episode]:
    rng = np.random.default_rng(seed)
    return [Episode(obs={k: rng.normal(size=(length, w)) for k, w in OBS_WIDTHS.items()},
                    actions=rng.uniform(-1, 1, size=(length, action_dim)), rewards=rng.uniform(size=length),
                    states=rng.normal(size=(length, 5)), attrs={"seed": i}) for i in range(n)]


# a tiny image policy: 32x32 frames cropped to 28, a 1/16-width ResNet-18, 8 features per camera
TINY_IMAGE = ["policy.encoder.width=0.0625", "policy.encoder.crop=28", "policy.encoder.feature_dim=8",
              "policy.encoder.keypoints=4"]


def tiny_image_episodes(n: int = 4, length: int = 20, size: int = 32, cameras=("agentview",), seed: int = 0):
    """tiny_episodes with uint8 <camera>_image frames (random, well-formed) beside the low-dim keys."""
    episodes = tiny_episodes(n, length, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for e in episodes:
        e.images = {f"{c}_image": rng.integers(0, 256, (length, size, size, 3), dtype=np.uint8) for c in cameras}
    return episodes


def write_tiny_hdf5(path: Path, episodes: list[Episode] | None = None, masks: dict | None = None) -> Path:
    episodes = episodes if episodes is not None else tiny_episodes()
    n = len(episodes)
    masks = masks if masks is not None else {"train": range(n - 1), "valid": [n - 1]}
    write_robomimic(path, episodes, ENV_ARGS, masks=masks, compression="gzip")
    return path


def train_args(dataset: Path, out: Path, *extra_sets: str) -> list[str]:
    args = ["train", "--dataset", str(dataset), "--out", str(out)]
    for item in (*TINY_TRAIN, *extra_sets):
        args += ["--set", item]
    return args


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`dopr-robot ARGS` through the real entry point (cli.main: parsing, one-line errors, exit codes), in this
    process: a fresh interpreter per case costs seconds of imports on a loaded machine. An unexpected exception
    propagates (a traceback fails the test)."""
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["dopr-robot", *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def assert_user_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr


def pendulum_action(obs: np.ndarray, rng: np.random.Generator, noise: float = 0.3) -> np.ndarray:
    """A noisy PD controller that balances InvertedPendulum-v5 (cart position, pole angle, their velocities)."""
    gains = np.array([1.0, 10.0, 1.0, 2.0])
    return np.clip([gains @ obs + noise * rng.standard_normal()], -3, 3).astype(np.float32)


def make_minari_dataset(root: Path, dataset_id: str, episodes: int = 5, limit: int = 40, seed: int = 0,
                        env_wrapper=None) -> list[dict[str, np.ndarray]]:
    """A real Minari dataset written by Minari's DataCollector under `root` (as MINARI_DATASETS_PATH): `episodes`
    PD-controlled InvertedPendulum-v5 episodes (`limit`-step time limit) and one more that pushes the cart
    until the pole falls (terminated early). Reference scores 0 and `limit` (the return is the step count).
    Returns what each episode executed: {"actions", "rewards", "seed", "terminated"}."""
    import os
    import warnings

    import gymnasium as gym
    import minari

    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    executed = []
    try:
        env = gym.make("InvertedPendulum-v5", max_episode_steps=limit)
        env = minari.DataCollector(env_wrapper(env) if env_wrapper else env)
        for i in range(episodes + 1):
            rng = np.random.default_rng([seed, i])
            obs, _ = env.reset(seed=seed + i)
            actions, rewards, done, terminated = [], [], False, False
            while not done:
                action = pendulum_action(np.asarray(obs.get("state", obs) if isinstance(obs, dict) else obs), rng) \
                    if i < episodes else np.array([3.0], dtype=np.float32)
                obs, reward, terminated, truncated, _ = env.step(action)
                actions.append(action)
                rewards.append(reward)
                done = terminated or truncated
            executed.append({"actions": np.asarray(actions), "rewards": np.asarray(rewards), "seed": seed + i,
                             "terminated": bool(terminated)})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Minari's advice to name an eval env and a code permalink
            env.create_dataset(dataset_id, algorithm_name="noisy PD controller", author="dopr-robot tests",
                               author_email="tests@example.invalid", code_permalink="tests/tiny_data.py",
                               description="test fixture", ref_min_score=0.0, ref_max_score=float(limit))
        env.close()
    finally:
        if previous is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous
    return executed
