"""Simulated environments (robosuite 1.5 + MuJoCo, `robosuite_env`), env_args of older robosuite versions
(`compat`), offscreen rendering and the MUJOCO_GL choice (`render`), and the scripted experts that generate
demonstrations (`experts`)."""

from dopr_robot.envs.robosuite_env import TASKS, RobosuiteEnv, default_env_args, import_robosuite

__all__ = ["TASKS", "RobosuiteEnv", "default_env_args", "import_robosuite"]
