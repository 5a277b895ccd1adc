"""Cost of recording an episode: environment steps per second without rendering, with a rendered frame per step,
and with that frame encoded into an MP4 (what `eval --videos` does).

Run:  MUJOCO_GL=osmesa .venv/bin/python benchmarks/render_speed.py [--task lift] [--steps 200] [--size 256]
(MUJOCO_GL unset: chosen as in dopr_robot/envs/render.py). Actions are seeded uniform noise in [-1, 1]; the
timings cover env.step (+ rendering, + encoding) only, not the policy.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from dopr_robot.envs import RobosuiteEnv, default_env_args
from dopr_robot.envs.render import RenderSpec, parse_size
from dopr_robot.evaluation.video import VideoRecorder


def steps_per_second(env: RobosuiteEnv, steps: int, capture=None) -> float:
    rng = np.random.default_rng(0)
    env.reset(0)
    start = time.perf_counter()
    for _ in range(steps):
        env.step(rng.uniform(-1, 1, env.action_dim))
        if capture is not None:
            capture(env)
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="lift")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--size", default="256", help="N or WIDTHxHEIGHT")
    parser.add_argument("--camera", default="agentview")
    args = parser.parse_args()
    env_args = default_env_args(args.task)
    spec = RenderSpec(args.camera, *parse_size(args.size))
    plain = steps_per_second(RobosuiteEnv(env_args), args.steps)
    rendering_env = RobosuiteEnv(env_args, render=spec)
    rendered = steps_per_second(rendering_env, args.steps, capture=lambda env: env.render_frame())
    with tempfile.TemporaryDirectory() as tmp, VideoRecorder(rendering_env, tmp, 0, 20) as recorder:
        encoded = steps_per_second(rendering_env, args.steps, capture=recorder.capture)
        recorder.finish(False)
    print(f"MUJOCO_GL={os.environ.get('MUJOCO_GL')}, {args.task}, {spec.width}x{spec.height} {spec.camera}, "
          f"{args.steps} steps")
    print(f"no rendering        {plain:7.1f} steps/s")
    print(f"+ frame per step    {rendered:7.1f} steps/s  ({1000 / rendered - 1000 / plain:.1f} ms per frame)")
    print(f"+ MP4 encoding      {encoded:7.1f} steps/s  ({1000 / encoded - 1000 / rendered:.1f} ms per frame)")


if __name__ == "__main__":
    main()
