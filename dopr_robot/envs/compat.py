"""Datasets recorded with other robosuite versions: translate their env_args so robosuite 1.5 can rebuild them.

robomimic's widely downloaded "v141" files were recorded with robosuite 1.4.x, whose controller config is a
single part controller (`{"type": "OSC_POSE", "control_delta": true, "damping": 1, ...}`); robosuite 1.5 wants a
composite config (`{"type": "BASIC", "body_parts": {"right": {...}}}`). robosuite ships
`refactor_composite_controller_config` for the structure; the renamed keys (`damping` -> `damping_ratio`,
`control_delta` -> `input_type`) are translated here, so an absolute-action file stays absolute.
"""

from __future__ import annotations

import copy
from typing import Any

from dopr_robot.errors import UserError

_OLD_KEY_NAMES = {"damping": "damping_ratio", "damping_limits": "damping_ratio_limits"}


def _upgrade_part(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = {(_OLD_KEY_NAMES.get(k, k)): v for k, v in cfg.items()}
    if "control_delta" in cfg:
        cfg["input_type"] = "delta" if cfg.pop("control_delta") else "absolute"
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


def action_mode(env_args: dict[str, Any], action_dim: int | None = None) -> str:
    """"delta" or "absolute", from the arm controller's config (and the action width, when known)."""
    if action_dim == 10:
        raise UserError("10-D actions (absolute position + 6-D rotation, diffusion_policy's abs conversion) are not "
                        "supported yet: use the original 7-D robomimic file")
    return _upgrade_part(arm_controller_config(env_args)).get("input_type", "delta")


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
