"""Tiny real robomimic files of the paper's tasks (Tool-Hang, Transport) recorded in robosuite 1.5, in the
layout users download: robosuite 1.4 ("v141") env_args, absolute pose actions as diffusion_policy's
`*_abs.hdf5` files hold them (7-D per arm, world frame, axis-angle; the env_args still say delta)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from dopr_robot.datasets import Episode, write_robomimic
from dopr_robot.envs import make_env
from dopr_robot.envs.rotations import matrix_to_axis_angle
from test_formats import V141_ENV_ARGS

ROBOTS = {"Lift": ["Panda"], "ToolHang": ["Panda"], "TwoArmTransport": ["Panda", "Panda"]}


def v141_env_args(env_name: str, delta: bool) -> dict:
    """robomimic's v141 env_args for a task (Transport: two Pandas facing each other, 1.4's configuration name)."""
    args = copy.deepcopy(V141_ENV_ARGS)
    args["env_name"] = env_name
    args["env_kwargs"]["robots"] = ROBOTS[env_name]
    args["env_kwargs"]["controller_configs"]["control_delta"] = delta
    if len(ROBOTS[env_name]) == 2:
        args["env_kwargs"]["env_configuration"] = "single-arm-opposed"
    return args


def grip_poses(env) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every arm's grip site (the point and frame OSC controls), world position and rotation matrix, as the
    controller sees them (after mj_forward: a step leaves site poses one physics substep behind qpos)."""
    env.env.sim.forward()
    data = env.env.sim.data
    return [(data.site_xpos[s].copy(), data.site_xmat[s].reshape(3, 3).copy())
            for s in (robot.eef_site_id["right"] for robot in env.env.robots)]


def hold_action(env, gripper: float = -1.0) -> np.ndarray:
    """The absolute action (7-D per arm, axis-angle) that commands every arm to stay where it is."""
    return np.concatenate([np.concatenate([pos, matrix_to_axis_angle(mat), [gripper]])
                           for pos, mat in grip_poses(env)])


def record_abs_file(path: Path, env_name: str, n_demos: int = 3, steps: int = 16) -> Path:
    """Demos that wander slowly around the start pose under absolute actions, named like diffusion_policy's
    abs files, with robomimic's train/valid masks."""
    env = make_env(v141_env_args(env_name, delta=False))
    episodes = []
    for seed in range(n_demos):
        rng = np.random.default_rng(seed)
        obs = env.reset(seed)
        target = hold_action(env).reshape(len(ROBOTS[env_name]), 7)
        record = {"obs": [], "actions": [], "states": [], "rewards": []}
        for _ in range(steps):
            target[:, :3] += rng.normal(scale=0.004, size=(len(target), 3))
            record["obs"].append(obs)
            record["states"].append(env.get_state())
            record["actions"].append(target.reshape(-1).copy())
            obs, reward = env.step(target.reshape(-1))
            record["rewards"].append(reward)
        keys = [k for k in record["obs"][0] if k == "object" or k.startswith("robot")]
        episodes.append(Episode(obs={k: np.stack([o[k] for o in record["obs"]]) for k in keys},
                                actions=np.asarray(record["actions"]), rewards=np.asarray(record["rewards"]),
                                states=np.asarray(record["states"]), attrs={"seed": seed}))
    env.close()
    write_robomimic(path, episodes, v141_env_args(env_name, delta=True),
                    masks={"train": range(n_demos - 1), "valid": [n_demos - 1]})
    return path
