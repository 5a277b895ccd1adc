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
