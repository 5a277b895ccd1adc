"""Gymnasium environments (MuJoCo locomotion and the like) rebuilt from the env spec a Minari dataset records.

env_args of a Gymnasium environment (what a dataset, and so a checkpoint, records):
    {"type": "gymnasium", "env_name": <spec id>, "env_spec": <EnvSpec JSON, what the env is built from>,
     "env_kwargs": <the spec's kwargs, for reading>, "max_episode_steps": <the spec's time limit>,
     "render_fps": <frames per second of one control step>, "env_version": <gymnasium version>}

Episodes end at the evaluation's `max_steps` or when the environment terminates (a fallen Hopper), never on
success: `success_ends_episode` is False and an episode succeeds when it was not terminated early (it reached
`max_steps` standing). The spec's own time limit (TimeLimit wrapper) is not applied: `eval.max_steps` is the one
limit, so it should equal `max_episode_steps` for returns comparable with the dataset's (the trainer warns).

Observations are one flat vector: a Box observation is the key "obs"; a Dict of Boxes (nested Dicts too) is one
key per Box, named by its path joined with "." (e.g. "observation", "desired_goal"); anything else is refused.
Actions are clipped to the action space's bounds before they reach the simulator, as robosuite clips to
[-1, 1], so action noise cannot drive a joint past its range or inflate a control cost.

Pushes (`push_object`) are an external force on the torso (`xfrc_applied`), see `PUSH_STEPS`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dopr_robot.envs.render import DEFAULT_CAMERA, RenderSpec, backend_import_error, choose_gl_backend
from dopr_robot.errors import UserError, error_summary

GYMNASIUM_TYPE = "gymnasium"
OBS_KEY = "obs"  # the key of a Box observation
# A push lasts this many control steps: a shove, not an instantaneous kick, and short enough to be one event
# (Hopper: 5 x 8 ms).
PUSH_STEPS = 5
# The body a push acts on: the torso where the model has one (Hopper, Walker2d, HalfCheetah, Ant, Humanoid,
# HumanoidStandup, Swimmer); otherwise the model's first body (InvertedPendulum's cart, Reacher's arm base).
PUSH_BODY = "torso"


def is_gymnasium(env_args: Any) -> bool:
    return isinstance(env_args, dict) and env_args.get("type") == GYMNASIUM_TYPE


def import_gymnasium():
    """gymnasium, with MUJOCO_GL settled first (MuJoCo reads it once, at import)."""
    choose_gl_backend()
    try:
        import gymnasium
        import gymnasium.envs.mujoco  # noqa: F401 - imports mujoco, which loads the MUJOCO_GL backend
    except (ImportError, AttributeError, RuntimeError) as e:
        import os

        if isinstance(e, ImportError) and "gymnasium" in str(e):
            raise UserError("Gymnasium environments need gymnasium: pip install 'gymnasium[mujoco]>=1.0'") from None
        if not os.environ.get("MUJOCO_GL"):
            raise
        raise backend_import_error(e) from None
    return gymnasium


def gymnasium_env_args(env) -> dict[str, Any]:
    """env_args for a made Gymnasium env (its `spec` must be JSON-serializable: no callables in its kwargs)."""
    gymnasium = import_gymnasium()
    spec = env.spec
    if spec is None:
        raise UserError("the Gymnasium environment has no spec (not made with gymnasium.make)")
    try:
        spec_json = spec.to_json()
    except (TypeError, ValueError) as e:
        raise UserError(f"the env spec of {spec.id} cannot be recorded as JSON ({e})") from None
    fps = env.metadata.get("render_fps")
    return {"type": GYMNASIUM_TYPE, "env_name": spec.id, "env_spec": spec_json, "env_kwargs": dict(spec.kwargs),
            "max_episode_steps": spec.max_episode_steps, "render_fps": float(fps) if fps else None,
            "env_version": gymnasium.__version__}


def observation_layout(space) -> dict[str, tuple[int, ...]]:
    """{flat observation key: shape} of a Gymnasium observation space (see the module docstring); ValueError
    for a space the policy's flat vector cannot hold."""
    from gymnasium import spaces

    if isinstance(space, spaces.Box):
        if space.dtype == np.uint8 and len(space.shape) >= 3:
            raise ValueError(f"image observations {space} are not supported for Gymnasium environments")
        return {OBS_KEY: tuple(space.shape)}
    if isinstance(space, spaces.Dict):
        layout: dict[str, tuple[int, ...]] = {}
        for name, part in space.spaces.items():
            if isinstance(part, spaces.Dict):
                layout.update({f"{name}.{k}": shape for k, shape in observation_layout(part).items()})
            elif isinstance(part, spaces.Box):
                layout[name] = observation_layout(part)[OBS_KEY]  # refuses image parts
            else:
                raise ValueError(f"observation part {name!r} is {part}, not a Box: it cannot be flattened into "
                                 f"the policy's vector")
        return layout
    raise ValueError(f"observations of {space} cannot be flattened into the policy's vector (need a Box or a "
                     f"Dict of Boxes)")


def observation_dict(obs: Any) -> dict[str, np.ndarray]:
    """One observation (Box array or nested dict of arrays) -> {key: array}, the keys of `observation_layout`.
    Works on single observations and on time-stacked ones (a Minari episode's arrays) alike."""
    if not isinstance(obs, dict):
        return {OBS_KEY: np.asarray(obs)}
    flat: dict[str, np.ndarray] = {}
    for name, part in obs.items():
        if isinstance(part, dict):
            flat.update({f"{name}.{k}": v for k, v in observation_dict(part).items()})
        else:
            flat[name] = np.asarray(part)
    return flat


class GymnasiumEnv:
    """A Gymnasium environment with the interface of `dopr_robot.envs` (see its docstring)."""

    success_ends_episode = False  # locomotion runs to max_steps or termination; success is judged at the end

    def __init__(self, env_args: dict[str, Any], render: RenderSpec | tuple[str, int, int] | None = None):
        gymnasium = import_gymnasium()
        from gymnasium.envs.registration import EnvSpec

        self.env_args = env_args
        name = env_args.get("env_name", "?")
        try:
            spec = EnvSpec.from_json(env_args["env_spec"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"env_args of {name} hold no valid Gymnasium env_spec ({type(e).__name__}: {e})") from None
        spec = dataclasses.replace(spec, max_episode_steps=None)  # our loop's max_steps is the one limit
        self.render_spec = RenderSpec(*render) if render is not None else None
        kwargs: dict[str, Any] = {}
        if self.render_spec is not None:
            kwargs = {"render_mode": "rgb_array", "width": self.render_spec.width,
                      "height": self.render_spec.height}
        try:
            self.env = gymnasium.make(spec, **kwargs)
        except Exception as e:  # noqa: BLE001 - unknown id, missing module, bad kwargs: one line either way
            raise UserError(f"cannot build the Gymnasium environment {name} ({error_summary(e)})") from None
        self.terminated = False
        self._push_force: np.ndarray | None = None
        self._push_steps_left = 0
        self._mujoco = hasattr(self.env.unwrapped, "data") and hasattr(self.env.unwrapped, "model")
        if self.render_spec is not None:
            self._choose_camera(self.render_spec.camera)

    def _choose_camera(self, camera: str) -> None:
        """Render `camera` of the model; robosuite's default camera name (the CLI's default) or "default" means
        the environment's own default view (a free camera tracking the torso)."""
        if not self._mujoco:
            if camera not in (DEFAULT_CAMERA, "default"):
                self.env.close()
                raise UserError(f"{self.env_args.get('env_name')} has no named cameras; use the default view")
            return
        import mujoco

        model = self.env.unwrapped.model
        cameras = [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_CAMERA, i) for i in range(model.ncam)]
        if camera in cameras:
            renderer = self.env.unwrapped.mujoco_renderer
            renderer.camera_id = cameras.index(camera)
        elif camera not in (DEFAULT_CAMERA, "default"):
            self.env.close()
            raise UserError(f"camera {camera!r} is not in {self.env_args.get('env_name')} (cameras: "
                            f"{', '.join(['default', *[c for c in cameras if c]])})")

    @property
    def action_dim(self) -> int:
        return int(np.prod(self.env.action_space.shape))

    def reset(self, seed: int) -> dict[str, np.ndarray]:
        """The initial state that `seed` determines (Gymnasium's reset(seed=...) re-seeds the env's generator)."""
        obs, _ = self.env.reset(seed=int(seed))
        self.terminated = False
        self._end_push()
        return observation_dict(obs)

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float]:
        space = self.env.action_space
        action = np.clip(np.asarray(action, dtype=np.float64).reshape(space.shape), space.low, space.high)
        obs, reward, terminated, _, _ = self.env.step(action.astype(space.dtype))
        self.terminated = bool(terminated)
        if self._push_steps_left:
            self._push_steps_left -= 1
            if not self._push_steps_left:
                self._end_push()
        return observation_dict(obs), float(reward)

    def is_success(self) -> bool:
        """Locomotion defines no goal: an episode succeeds when the environment did not terminate it early."""
        return not self.terminated

    def get_state(self) -> np.ndarray:
        """qpos and qvel, concatenated (MuJoCo envs; an empty vector for others)."""
        if not self._mujoco:
            return np.zeros(0)
        data = self.env.unwrapped.data
        return np.concatenate([data.qpos, data.qvel]).copy()

    def push_body(self) -> int:
        """The id of the body pushes act on (`PUSH_BODY`, else body 1)."""
        import mujoco

        model = self.env.unwrapped.model
        body = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, PUSH_BODY)
        return body if body >= 0 else 1

    def push_object(self, velocity: np.ndarray) -> None:
        """Push the torso: a constant world-frame force for the next `PUSH_STEPS` control steps, sized so that
        its impulse would change the whole robot's velocity (the torso's subtree mass) by `velocity` m/s, were
        nothing else acting. Planar robots (Hopper, Walker2d, HalfCheetah, Swimmer) feel only its x part."""
        if not self._mujoco:
            raise UserError(f"pushes are not supported for {self.env_args.get('env_name')} (not a MuJoCo env)")
        model = self.env.unwrapped.model
        body = self.push_body()
        impulse = float(model.body_subtreemass[body]) * np.asarray(velocity, dtype=np.float64)
        self._end_push()
        self._push_force = np.zeros(6)
        self._push_force[:3] = impulse / (PUSH_STEPS * float(self.env.unwrapped.dt))
        self.env.unwrapped.data.xfrc_applied[body] = self._push_force
        self._push_steps_left = PUSH_STEPS

    def _end_push(self) -> None:
        if self._mujoco:
            self.env.unwrapped.data.xfrc_applied[:] = 0.0
        self._push_force, self._push_steps_left = None, 0

    def render_frame(self) -> np.ndarray:
        """The current scene: (height, width, 3) uint8, top row first. Rendering changes no physics or RNG."""
        if self.render_spec is None:
            raise RuntimeError("this environment was built without render=RenderSpec(...)")
        return np.ascontiguousarray(self.env.render())

    def close(self) -> None:
        self.env.close()
