"""A human-readable summary of a demonstration file (`dopr-robot inspect`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dopr_robot.datasets.minari_source import is_minari
from dopr_robot.datasets.source import open_demos
from dopr_robot.datasets.zarr_store import is_zarr


def describe(path: str | Path) -> list[tuple[str, str]]:
    """(label, text) rows; raises UserError (one line) on anything malformed."""
    from dopr_robot.datasets.obs_keys import default_obs_keys, obs_specs
    from dopr_robot.envs.compat import action_layout, arm_controller_config, version_warning
    from dopr_robot.envs.gymnasium_env import is_gymnasium

    demos = open_demos(path)  # validates every demo
    episodes = demos.episodes(None)
    lengths = np.array([len(e) for e in episodes])
    actions = np.concatenate([e.actions for e in episodes])
    env_args = demos.env_args
    env_kwargs = env_args.get("env_kwargs", {})
    gymnasium = is_gymnasium(env_args)
    note = None
    if gymnasium:
        env_text = (f"{env_args.get('env_name')} (recorded with gymnasium {env_args.get('env_version', '?')}), "
                    f"time limit {env_args.get('max_episode_steps')} steps, {env_args.get('render_fps') or '?'} Hz")
    else:
        controller = env_kwargs.get("controller_configs") or {}
        composite = controller.get("type") if "body_parts" in controller else None
        controller_text = "/".join(t for t in (composite, arm_controller_config(env_args).get("type")) if t) \
            or "unknown"
        _, mode, rotation, note = action_layout(env_args, actions, path)
        env_text = (f"{env_args.get('env_name')} (recorded with robosuite {env_args.get('env_version', '?')}), "
                    f"robots {env_kwargs.get('robots')}, controller {controller_text}, "
                    f"{mode} actions{f' ({rotation})' if rotation else ''}, {env_kwargs.get('control_freq', '?')} Hz")
    kind = "Minari" if is_minari(path) else "ReplayBuffer zarr" if is_zarr(path) else "robomimic HDF5"
    first = episodes[0]
    if is_minari(path):
        train_keys = list(first.obs)  # a Minari dataset trains on all its keys
        train_dim = sum(int(np.prod(v.shape[1:])) for v in first.obs.values())
    else:
        specs = obs_specs(path)
        train_keys = default_obs_keys(specs)
        train_dim = sum(int(np.prod(specs[k][0])) for k in train_keys)
    rows = [
        ("file", f"{path} ({kind})"),
        ("env", env_text),
        ("demos", f"{len(episodes)}, lengths min/mean/max {lengths.min()}/{lengths.mean():.1f}/{lengths.max()}, "
                  f"{lengths.sum()} steps"),
        ("masks", ", ".join(f"{k} ({len(v)})" for k, v in demos.masks.items()) or "none (every demo trains)"),
        ("obs", ", ".join(f"{k} ({_shape_text(v)})" for k, v in first.obs.items())),
        ("train keys", f"{', '.join(train_keys)} ({train_dim}-D; the default data.obs_keys)"),
        ("images", ", ".join(f"{k} ({v.shape[1]}x{v.shape[2]} uint8)" for k, v in first.images.items()) or "none"),
        ("actions", f"{actions.shape[1]}-D, min {np.round(actions.min(0), 3).tolist()}, "
                    f"max {np.round(actions.max(0), 3).tolist()}"),
        ("states", f"{first.states.shape[1]}-D MuJoCo states" if first.states is not None else "none"),
        ("noise", str(demos.attrs.get("noise", "not recorded"))),
    ]
    scores = demos.reference_scores
    if scores:
        rows.append(("reference", f"returns {scores['min']:g} (random) .. {scores['max']:g} (expert), for "
                                  f"normalized returns"))
    if note:
        rows.append(("note", note))
    warning = None if gymnasium else version_warning(env_args)
    if warning:
        rows.append(("warning", warning))
    return rows


def _shape_text(value: np.ndarray) -> str:
    """"10" for a low-dim key, "84x84x3 uint8 image" for an image key."""
    if value.ndim == 2:
        return str(value.shape[1])
    return f"{'x'.join(map(str, value.shape[1:]))} {value.dtype} image"
