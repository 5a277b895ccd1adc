"""robosuite 1.5 environments rebuilt from a dataset's `env_args` (robomimic's format), seeded per episode.

A dataset is all a user must supply: its `env_args` JSON names the environment and every keyword it was made
with, so training and evaluation rebuild exactly that environment. Rendering is off (low-dim observations need
no renderer), which keeps evaluation headless; `render=RenderSpec(camera, height, width)` opts one environment
into an offscreen renderer for video frames (`render_frame`), with the observations still low-dim.

One key of ours may sit beside robomimic's in env_args: `"action_rotation": "rotation_6d"` (written by `train`
into a checkpoint whose policy predicts absolute poses with 6-D rotations, diffusion_policy's layout). The
environment then takes 10-D actions per arm and hands robosuite's controller their axis-angle form, so the
policy, the rollout loop and recorded rollouts all see the policy's own actions.

`images=ImageSpec(cameras, height, width)` adds image observations: every observation then also holds
`<camera>_image` frames, uint8 (H, W, 3), rendered by `render_camera` (rows top first, as robomimic stores them).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from dopr_robot.envs.render import ImageSpec, RenderSpec, backend_import_error, choose_gl_backend, render_camera
from dopr_robot.envs.rotations import ROTATIONS, action_width, convert_actions
from dopr_robot.errors import UserError

# Our task names -> robosuite environment names.
TASKS = {"lift": "Lift", "can": "PickPlaceCan", "square": "NutAssemblySquare", "transport": "TwoArmTransport"}
# Environments whose pushes have a documented target (`RobosuiteEnv.push_target`): ours and robomimic's.
PUSHABLE = {"Lift", "PickPlaceCan", "NutAssemblySquare", "ToolHang", "TwoArmTransport"}

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


def _local_asset_paths(model_xml: str) -> str:
    """A model file recorded on another machine names its meshes and textures under that machine's robosuite
    install; point them at this one's (what robomimic's postprocess_model_xml does)."""
    import xml.etree.ElementTree as ET

    here = os.path.dirname(import_robosuite().__file__)
    root = ET.fromstring(model_xml)
    for element in root.iter():
        path = element.get("file")
        if path and "/robosuite/" in path:
            element.set("file", os.path.join(here, path.rsplit("/robosuite/", 1)[1]))
    return ET.tostring(root, encoding="unicode")


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
    """env_args for one of our tasks: Panda, default composite controller (OSC delta pose), 20 Hz, low-dim.
    Transport: two Pandas facing each other, their OSC taking absolute world-frame poses (its scripted expert's
    actions, and the layout of diffusion_policy's abs files)."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    suite = import_robosuite()
    from robosuite.controllers import load_composite_controller_config

    controller = load_composite_controller_config(robot="Panda")
    robots: dict[str, Any] = {"robots": ["Panda"]}
    if task == "transport":
        controller["body_parts"]["right"].update(input_type="absolute", input_ref_frame="world")
        robots = {"robots": ["Panda", "Panda"], "env_configuration": "opposed"}
    return {
        "env_name": TASKS[task],
        "type": 1,  # robomimic's EnvType.ROBOSUITE_TYPE
        "env_version": suite.__version__,
        "env_kwargs": {
            **robots,
            "controller_configs": controller,
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

    def __init__(self, env_args: dict[str, Any], render: RenderSpec | tuple[str, int, int] | None = None,
                 images: ImageSpec | None = None):
        suite = import_robosuite()
        from dopr_robot.envs.compat import n_arms, upgrade_env_args

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
        if render is not None or images is not None:
            kwargs["has_offscreen_renderer"] = True  # we render through sim.render; robosuite's camera obs stay off
            # Measured here (OSMesa): a render context created before torch is first imported draws garbage once
            # torch is loaded. torch is loaded before any context exists, so every process renders alike.
            import torch  # noqa: F401
        self.env_args = env_args
        self.action_rotation = env_args.get("action_rotation", "axis_angle")
        if self.action_rotation not in ROTATIONS:
            raise UserError(f"env_args action_rotation must be one of {', '.join(ROTATIONS)}; "
                            f"got {self.action_rotation!r}")
        self.n_arms = n_arms(env_args)
        self.env = suite.make(env_args["env_name"], **kwargs)
        self.render_spec = RenderSpec(*render) if render is not None else None
        self.image_spec = images
        self._model_xml: str | None = None  # the model `restore` last loaded
        wanted = ([self.render_spec.camera] if self.render_spec is not None else []) + \
            (list(images.cameras) if images is not None else [])
        cameras = list(self.env.sim.model.camera_names)
        for camera in wanted:
            if camera not in cameras:
                self.env.close()
                raise UserError(f"camera {camera!r} is not in {env_args['env_name']} (cameras: {', '.join(cameras)})")

    @property
    def action_dim(self) -> int:
        """The width of the actions `step` takes (10 per arm when they carry 6-D rotations)."""
        if self.action_rotation == "rotation_6d":
            return action_width("rotation_6d", self.n_arms)
        return int(self.env.action_spec[0].shape[0])

    def reset(self, seed: int) -> dict[str, np.ndarray]:
        """Reset to the initial state that `seed` determines, the same in any process.

        robosuite's placement samplers and robot init noise hold references to `env.rng`, so the generator
        is re-seeded in place rather than replaced.
        """
        self.env.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
        return self._observation(self.env.reset())

    def restore(self, state: np.ndarray, model_xml: str | None = None) -> dict[str, np.ndarray]:
        """Set the flattened MuJoCo state (a dataset's `states[t]`) and return the observation there.

        `model_xml` is the demo's MJCF model (robomimic's `model_file` attribute, which `collect` writes too):
        what a reset draws besides the state, such as the size of Lift's cube, is only in it; it is loaded when
        it differs from the last one loaded. Indicator sites (gripper-to-target lines) are hidden as `reset`
        hides them, so frames rendered here are the ones an episode renders at the same state."""
        if model_xml is not None and model_xml != self._model_xml:
            self.env.reset_from_xml_string(_local_asset_paths(model_xml))
            self._model_xml = model_xml
        self.env.sim.set_state_from_flattened(np.asarray(state, dtype=np.float64))
        self.env.visualize(vis_settings={vis: False for vis in self.env._visualizations})
        self.env.sim.forward()
        return self._observation(self.env._get_observations(force_update=True))

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float]:
        action = np.asarray(action, dtype=np.float64)
        if self.action_rotation == "rotation_6d":
            action = convert_actions(action, "rotation_6d", "axis_angle", self.n_arms)
        obs, reward, _, _ = self.env.step(action)
        return self._observation(obs), float(reward)

    def is_success(self) -> bool:
        return bool(self.env._check_success())

    def get_state(self) -> np.ndarray:
        """The flattened MuJoCo state (robomimic's `states`): enough to replay or reset."""
        return np.asarray(self.env.sim.get_state().flatten())

    def push_target(self):
        """The object a push kicks, the one the success check is about: Lift's cube, PickPlace's active object,
        Square's active nut, Tool-Hang's tool (the wrench hung last), Transport's payload (the hammer handed
        across). A task without one is refused by `check_pushable` before any episode runs."""
        env = self.env
        if hasattr(env, "cube"):
            return env.cube
        if hasattr(env, "objects") and getattr(env, "object_id", None) is not None:
            return env.objects[env.object_id]
        if hasattr(env, "nuts") and getattr(env, "nut_id", None) is not None:
            return env.nuts[env.nut_id]
        if hasattr(env, "tool") and hasattr(env, "frame"):  # ToolHang
            return env.tool
        if hasattr(env, "transport"):  # TwoArmTransport
            return env.transport.payload
        return None

    def push_object(self, velocity: np.ndarray) -> None:
        """Add `velocity` (m/s, world frame) to the task object's linear velocity (`push_target`): a kick
        (perturbation tests). The object is a free body, so its joint's first three velocity entries are linear.
        """
        obj = self.push_target()
        if obj is None:
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
        return render_camera(self.env.sim, *self.render_spec)

    def model_xml(self) -> str:
        return self.env.sim.model.get_xml()

    def close(self) -> None:
        self.env.close()

    def _observation(self, obs: dict[str, Any]) -> dict[str, np.ndarray]:
        out = {_ROBOMIMIC_OBS_NAMES.get(k, k): np.asarray(v) for k, v in obs.items()}
        if self.image_spec is not None:
            out.update(self.image_spec.render(self.env.sim))
        return out
