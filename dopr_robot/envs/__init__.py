"""Simulated environments (robosuite 1.5 + MuJoCo) and scripted experts that generate demonstrations."""

from dopr_robot.envs.robosuite_env import TASKS, RobosuiteEnv, default_env_args, import_robosuite

__all__ = ["TASKS", "RobosuiteEnv", "default_env_args", "import_robosuite"]
