"""Simulated environments (robosuite 1.5 + MuJoCo, `robosuite_env`; Gymnasium, `gymnasium_env`), env_args of older robosuite versions
(`compat`), offscreen rendering and the MUJOCO_GL choice (`render`), and the scripted experts that generate
demonstrations (`experts`).

Every environment is built from the env_args a dataset (and so a checkpoint) records, by `make_env`, and offers
one interface to evaluation, collection and diagnostics:
  reset(seed) -> obs dict; step(action) -> (obs dict, reward); is_success() -> bool; `terminated` (the env ended
  the episode early, e.g. a fallen hopper; robosuite never does); `success_ends_episode` (True where reaching
  success stops the episode, robosuite's tasks; False where the episode runs to its time limit or termination
  and success is judged at the end); get_state(); push_object(velocity); render_frame(); close(); action_dim.
"""

from typing import Any

from dopr_robot.envs.gymnasium_env import GymnasiumEnv, is_gymnasium
from dopr_robot.envs.render import ImageSpec, RenderSpec
from dopr_robot.envs.robosuite_env import PUSHABLE, TASKS, RobosuiteEnv, default_env_args, import_robosuite
from dopr_robot.errors import UserError


def make_env(env_args: dict[str, Any], render: RenderSpec | tuple[str, int, int] | None = None,
             images: ImageSpec | None = None):
    """The environment that `env_args` (from a dataset or a checkpoint) describes: Gymnasium when its "type" is
    "gymnasium" (a Minari dataset's), robosuite otherwise. With `images`, its observations include those cameras'
    frames (robosuite only)."""
    if is_gymnasium(env_args):
        if images is not None:
            raise UserError(f"image observations are rendered for robosuite environments only, not "
                            f"{env_args.get('env_name')}")
        return GymnasiumEnv(env_args, render=render)
    return RobosuiteEnv(env_args, render=render, images=images)



def check_pushable(env_args: dict[str, Any]) -> None:
    """Refuse pushes (one UserError, before any episode) on a robosuite environment without a documented push
    target (Gymnasium envs decide in their own push_object)."""
    name = env_args.get("env_name")
    if not is_gymnasium(env_args) and name not in PUSHABLE:
        raise UserError(f"pushes are not supported for {name}: it has no documented push target "
                        f"(supported: {', '.join(sorted(PUSHABLE))}); set the push probability to 0")


__all__ = ["PUSHABLE", "TASKS", "GymnasiumEnv", "ImageSpec", "RobosuiteEnv", "check_pushable", "default_env_args",
           "import_robosuite", "is_gymnasium", "make_env"]
