"""Datasets recorded with other robosuite versions: translate their env_args so robosuite 1.5 can rebuild them,
and read what their actions mean (delta or absolute poses, with which rotation representation).

robomimic's widely downloaded "v141" files were recorded with robosuite 1.4.x, whose controller config is a
single part controller (`{"type": "OSC_POSE", "control_delta": true, "damping": 1, ...}`); robosuite 1.5 wants a
composite config (`{"type": "BASIC", "body_parts": {"right": {...}}}`). robosuite ships
`refactor_composite_controller_config` for the structure; the renamed keys (`damping` -> `damping_ratio`,
`control_delta` -> `input_type`) are translated here, so an absolute-action file stays absolute.

robosuite 1.4's OSC read every command in the world frame: a delta was added to the end effector's world pose
and an absolute command was a world pose (its goals were compared with `site_xpos` / `site_xmat`). robosuite
1.5's OSC reads commands in the robot base's frame by default (`input_ref_frame: "base"`), which is the world
frame only for a robot whose base is neither moved nor turned: an absolute pose then lands ~1 m off, and
Transport's arms (their bases turned by +90 and -90 degrees to face each other) would move their deltas along
the wrong axes. The translation therefore sets
`input_ref_frame: "world"`, what 1.4 meant. Both versions read an absolute orientation as an axis-angle world
rotation, take positions unscaled and clip nothing (`input_max` / `output_max` scale deltas only).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

from dopr_robot.envs.rotations import action_width, convert_actions, rotation_of_width
from dopr_robot.errors import UserError

_OLD_KEY_NAMES = {"damping": "damping_ratio", "damping_limits": "damping_ratio_limits"}


def _upgrade_part(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = {(_OLD_KEY_NAMES.get(k, k)): v for k, v in cfg.items()}
    if "control_delta" in cfg:
        cfg["input_type"] = "delta" if cfg.pop("control_delta") else "absolute"
        cfg["input_ref_frame"] = "world"  # robosuite 1.4's frame for deltas and absolute poses alike
    return cfg


def upgrade_env_args(env_args: dict[str, Any]) -> dict[str, Any]:
    """env_args that robosuite 1.5 accepts; files already in the 1.5 format come back unchanged."""
    from dopr_robot.envs.robosuite_env import import_robosuite

    import_robosuite()
    from robosuite.controllers.composite.composite_controller_factory import (
        is_part_controller_config,
        refactor_composite_controller_config,
    )

    args = copy.deepcopy(env_args)
    kwargs = args.get("env_kwargs", {})
    robots = kwargs.get("robots", ["Panda"])
    robots = [robots] if isinstance(robots, str) else list(robots)
    kwargs["robots"] = robots
    cfg = kwargs.get("controller_configs")
    if isinstance(cfg, dict) and is_part_controller_config(cfg):
        kwargs["controller_configs"] = refactor_composite_controller_config(_upgrade_part(cfg), robots[0], ["right"])
    return args


def arm_controller_config(env_args: dict[str, Any]) -> dict[str, Any]:
    """The arm's part controller config, from an old (part) or a new (composite) controller config."""
    cfg = env_args.get("env_kwargs", {}).get("controller_configs") or {}
    if not isinstance(cfg, dict):
        return {}
    return cfg["body_parts"].get("right", {}) if "body_parts" in cfg else cfg


def n_arms(env_args: dict[str, Any]) -> int:
    """Arms that the actions drive: one per robot (robomimic's tasks use single-arm robots; Transport has two)."""
    robots = env_args.get("env_kwargs", {}).get("robots", ["Panda"])
    return 1 if isinstance(robots, str) else max(1, len(robots))


def _recorded_mode(env_args: dict[str, Any]) -> str:
    return _upgrade_part(arm_controller_config(env_args)).get("input_type", "delta")


def with_absolute_controller(env_args: dict[str, Any]) -> dict[str, Any]:
    """A copy of env_args whose arm controller takes absolute poses (the frame as robosuite 1.4 read them)."""
    args = copy.deepcopy(env_args)
    cfg = args.setdefault("env_kwargs", {}).get("controller_configs")
    if not isinstance(cfg, dict):
        raise UserError("the dataset's env_args have no controller config to switch to absolute actions")
    part = cfg["body_parts"].setdefault("right", {}) if "body_parts" in cfg else cfg
    if "body_parts" not in cfg:  # robosuite 1.4 layout: upgrade_env_args translates it
        part["control_delta"] = False
    else:
        part["input_type"] = "absolute"
        part["input_ref_frame"] = "world"
    return args


def action_layout(env_args: dict[str, Any], actions: np.ndarray, path: str | Path | None = None
                  ) -> tuple[dict[str, Any], str, str | None, str | None]:
    """What a file's actions are: (env_args that execute them, "delta" | "absolute", the rotation
    representation of absolute actions ("axis_angle" | "rotation_6d", None for deltas), a note for the user).

    diffusion_policy's `*_abs.hdf5` files hold absolute poses but keep the env_args of the delta file they were
    converted from (its runner switches the controller to absolute on its own), and 10-D (20-D two-arm) poses
    exist only as absolute actions: both are read as absolute, with a note, and the returned env_args say so."""
    arms, width = n_arms(env_args), int(actions.shape[-1])
    recorded = _recorded_mode(env_args)
    note = None
    if recorded == "delta":
        if width == action_width("rotation_6d", arms):
            reason = f"{width}-D actions are absolute poses with a 6-D rotation"
        elif path is not None and Path(path).stem.endswith("_abs") and width == action_width("axis_angle", arms):
            reason = "diffusion_policy's *_abs files hold absolute poses"
        else:
            reason = None
        if reason is None:
            if np.abs(actions).max(initial=0.0) > 1 + 1e-6:
                note = (f"the controller takes delta actions in [-1, 1], but the actions reach "
                        f"{np.abs(actions).max():.3g}: if they are absolute poses, name the file *_abs.hdf5")
            return env_args, "delta", None, note
        env_args = with_absolute_controller(env_args)
        note = f"{reason}, but env_args records a delta controller: driving an absolute controller instead"
    rotation = rotation_of_width(width, arms)
    if rotation is None:
        raise UserError(f"{width}-D absolute actions fit neither pose layout for {arms} arm(s): "
                        f"{action_width('axis_angle', arms)}-D (axis-angle) or {action_width('rotation_6d', arms)}-D "
                        f"(6-D rotation) per [position, rotation, gripper] block")
    return env_args, "absolute", rotation, note


def action_mode(env_args: dict[str, Any], action_dim: int | None = None) -> str:
    """"delta" or "absolute", from the arm controller's config (and the action width, when known)."""
    if action_dim is None:
        return _recorded_mode(env_args)
    return action_layout(env_args, np.zeros((1, action_dim)))[1]


def version_warning(env_args: dict[str, Any]) -> str | None:
    """robomimic's check_env_version, as a message: None when the file's robosuite version matches ours."""
    from dopr_robot.envs.robosuite_env import import_robosuite

    ours = import_robosuite().__version__
    theirs = env_args.get("env_version")
    if theirs is None:
        return f"dataset records no env_version; it may not have been made with robosuite {ours}"
    if theirs.split(".")[:2] != ours.split(".")[:2]:
        return (f"dataset was recorded with robosuite {theirs}, this is {ours}: controller config translated; "
                f"dynamics may differ slightly")
    return None


def policy_actions(env_args: dict[str, Any], actions: np.ndarray, path: str | Path | None,
                   requested: str) -> tuple[dict[str, Any], str | None, str | None, str | None]:
    """How a policy trained on a file's actions acts: (the env_args its checkpoint records, the file's rotation
    representation, the policy's, a note for the user). Rotations are None for delta actions.

    `requested` is `data.action_rotation`: "file" keeps the file's representation; "axis_angle" or "rotation_6d"
    converts absolute actions (refused for deltas). A policy on 6-D rotations gets `"action_rotation":
    "rotation_6d"` in its env_args, so the environment built for its evaluation converts its actions back."""
    env_args, mode, rotation, note = action_layout(env_args, actions, path)
    if mode == "delta":
        if requested != "file":
            raise UserError(f"data.action_rotation={requested} applies to absolute pose actions; this file's actions "
                            f"are deltas (leave data.action_rotation at file)")
        return env_args, None, None, note
    target = rotation if requested == "file" else requested
    env_args = {k: v for k, v in env_args.items() if k != "action_rotation"}
    if target == "rotation_6d":
        env_args["action_rotation"] = "rotation_6d"
    return env_args, rotation, target, note


def to_policy_actions(episodes, env_args: dict[str, Any]) -> None:
    """Convert the episodes' absolute pose actions, in place, to the rotation representation that a policy
    whose checkpoint records `env_args` (from `policy_actions`) acts in: training and the diagnostics that
    compare a policy with its demos read the demos through this one function."""
    if _recorded_mode(env_args) != "absolute":
        return
    arms, target = n_arms(env_args), env_args.get("action_rotation", "axis_angle")
    for episode in episodes:
        source = rotation_of_width(episode.actions.shape[1], arms)
        if source is not None and source != target:
            episode.actions = convert_actions(episode.actions, source, target, arms).astype(np.float32)
