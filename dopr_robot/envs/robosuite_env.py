"""robosuite 1.5 environments rebuilt from a dataset's `env_args` (robomimic's format), seeded per episode.

A dataset is all a user must supply: its `env_args` JSON names the environment and every keyword it was made
with, so training and evaluation rebuild exactly that environment. Rendering is off (low-dim observations need
no renderer), which keeps evaluation headless; `render=RenderSpec(camera, height, width)` opts one environment
into an offscreen renderer for video frames (`render_frame`), with the observations still low-dim.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from dopr_robot.envs.render import RenderSpec, backend_import_error, choose_gl_backend
from dopr_robot.errors import UserError

# Our task names -> robosuite environment names.
TASKS = {"lift": "Lift", "can": "PickPlaceCan", "square": "NutAssemblySquare"}

# robosuite calls the object observation "object-state"; robomimic (and every dataset) calls it "object".
_ROBOMIMIC_OBS_NAMES = {"object-state": "object"}

# Keyword arguments that must not come from a file: we render only on request (`render=`), and our loop decides
# when an episode ends.
_HEADLESS_KWARGS = {
    "has_renderer": False,
    "has_offscreen_renderer": False,
    "use_camera_obs": False,
    "ignore_done": True,
}
# Keys of robomimic's image-era env_kwargs that robosuite 1.5 does not accept or that only matter for cameras.
_DROPPED_KWARGS = ("camera_depths", "camera_heights", "camera_widths", "camera_names", "render_gpu_device_id",
                   "lite_physics")


def import_robosuite():
    """Import robosuite without its import-time console chatter (missing private macro file, optional robots)."""
    logging.getLogger("robosuite_logs").addFilter(lambda record: record.levelno >= logging.ERROR)
    choose_gl_backend()  # MuJoCo and robosuite read MUJOCO_GL once, at import
    try:
        import robosuite
    except (ImportError, AttributeError, RuntimeError) as e:  # MuJoCo loads the MUJOCO_GL backend at import
        if not os.environ.get("MUJOCO_GL"):
            raise
        raise backend_import_error(e) from None

    return robosuite


def default_env_args(task: str) -> dict[str, Any]:
    """env_args for one of our tasks: Panda, default composite controller (OSC delta pose), 20 Hz, low-dim."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    suite = import_robosuite()
    from robosuite.controllers import load_composite_controller_config

    return {
        "env_name": TASKS[task],
        "type": 1,  # robomimic's EnvType.ROBOSUITE_TYPE
        "env_version": suite.__version__,
        "env_kwargs": {
            "robots": ["Panda"],
            "controller_configs": load_composite_controller_config(robot="Panda"),
            "control_freq": 20,
            "reward_shaping": False,
            "use_object_obs": True,
            **_HEADLESS_KWARGS,
        },
    }


class RobosuiteEnv:
    """A robosuite environment with robomimic observation names and per-episode seeding."""

    success_ends_episode = True  # robomimic's convention: an episode stops at the first successful step
    terminated = False  # robosuite tasks have no early termination: an episode ends on success or time

    def __init__(self, env_args: dict[str, Any], render: RenderSpec | tuple[str, int, int] | None = None):
        suite = import_robosuite()
        from dopr_robot.envs.compat import upgrade_env_args

        if not isinstance(env_args, dict):
            raise UserError("env_args is not a JSON object: not a robomimic/robosuite dataset")
        for key in ("env_name", "env_kwargs"):
            if key not in env_args:
                raise UserError(f"env_args has no '{key}' entry: not a robomimic/robosuite dataset")
        if env_args.get("type", 1) != 1:
            raise UserError(f"env_args type {env_args.get('type')} is not robosuite (1)")
        kwargs = upgrade_env_args(env_args)["env_kwargs"]  # a translated deep copy
        for key in _DROPPED_KWARGS:
            kwargs.pop(key, None)
        kwargs.update(_HEADLESS_KWARGS)
        if render is not None:
            kwargs["has_offscreen_renderer"] = True  # frames for videos only: observations stay low-dim
        self.env_args = env_args
        self.env = suite.make(env_args["env_name"], **kwargs)
        self.render_spec = RenderSpec(*render) if render is not None else None
        if self.render_spec is not None:
            cameras = list(self.env.sim.model.camera_names)
            if self.render_spec.camera not in cameras:
                self.env.close()
                raise UserError(f"camera {self.render_spec.camera!r} is not in {env_args['env_name']} "
                                f"(cameras: {', '.join(cameras)})")

    @property
    def action_dim(self) -> int:
        return int(self.env.action_spec[0].shape[0])

    def reset(self, seed: int) -> dict[str, np.ndarray]:
        """Reset to the initial state that `seed` determines, the same in any process.

        robosuite's placement samplers and robot init noise hold references to `env.rng`, so the generator
        is re-seeded in place rather than replaced.
        """
        self.env.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
        return self._observation(self.env.reset())

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float]:
        obs, reward, _, _ = self.env.step(np.asarray(action, dtype=np.float64))
        return self._observation(obs), float(reward)

    def is_success(self) -> bool:
        return bool(self.env._check_success())

    def get_state(self) -> np.ndarray:
        """The flattened MuJoCo state (robomimic's `states`): enough to replay or reset."""
        return np.asarray(self.env.sim.get_state().flatten())

    def push_object(self, velocity: np.ndarray) -> None:
        """Add `velocity` (m/s, world frame) to the task object's linear velocity: a kick (perturbation tests).

        The task object is the one the success check is about: Lift's cube, PickPlace's active object, Square's
        active nut. The object is a free body, so its joint's first three velocity entries are linear.
        """
        env = self.env
        if hasattr(env, "cube"):
            obj = env.cube
        elif hasattr(env, "objects") and getattr(env, "object_id", None) is not None:
            obj = env.objects[env.object_id]
        elif hasattr(env, "nuts") and getattr(env, "nut_id", None) is not None:
            obj = env.nuts[env.nut_id]
        else:
            raise UserError(f"pushes are not supported for {self.env_args['env_name']} (no single task object)")
        start = self.env.sim.model.get_joint_qvel_addr(obj.joints[0])[0]
        self.env.sim.data.qvel[start:start + 3] += np.asarray(velocity, dtype=np.float64)

    def render_frame(self) -> np.ndarray:
        """The current scene seen by the render camera: (height, width, 3) uint8, top row first.

        Rendering reads the simulation state and writes only the renderer's own scene buffers, so it changes
        neither the physics nor any random generator: a recorded episode is the episode without recording.
        """
        if self.render_spec is None:
            raise RuntimeError("this environment was built without render=RenderSpec(...)")
        camera, height, width = self.render_spec
        frame = self.env.sim.render(camera_name=camera, height=height, width=width)
        return np.ascontiguousarray(frame[::-1])  # OpenGL's rows run bottom-up

    def model_xml(self) -> str:
        return self.env.sim.model.get_xml()

    def close(self) -> None:
        self.env.close()

    @staticmethod
    def _observation(obs: dict[str, Any]) -> dict[str, np.ndarray]:
        return {_ROBOMIMIC_OBS_NAMES.get(k, k): np.asarray(v) for k, v in obs.items()}
