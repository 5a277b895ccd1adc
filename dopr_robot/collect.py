"""`dopr-robot collect`: roll out a scripted expert in robosuite and write a robomimic-layout HDF5 file; and
`prepare_dataset`, which collects a training config's dataset when it is missing.

Attempt i uses environment seed `seed + i`; only successful attempts are kept, each with its seed recorded,
until `episodes` demonstrations are written. 10% of the demos (at least one) form the `valid` mask.
With `cameras`, each observation also holds those cameras' frames (`<camera>_image`, rendered at `image_size`
by the same helper as `render-obs` and evaluation); the cameras and size are recorded in the file's attributes.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from dopr_robot.config import Config
from dopr_robot.datasets.images import camera_keys, camera_of, is_image_array, split_obs_keys
from dopr_robot.datasets.minari_source import is_minari
from dopr_robot.datasets.robomimic_hdf5 import Episode, write_robomimic
from dopr_robot.envs import ImageSpec, RobosuiteEnv, default_env_args, make_env
from dopr_robot.envs.render import check_image_size, image_attrs
from dopr_robot.envs.experts import EXPERTS, NoisyOperator
from dopr_robot.errors import UserError
from dopr_robot.progress import progress_bar

# Per-step observation keys we do not store: concatenations of keys that are stored anyway (robotN_proprio-state).
_REDUNDANT_OBS_SUFFIX = "_proprio-state"


def run_expert_episode(env: RobosuiteEnv, task: str, seed: int, max_steps: int, noise: float = 0.0) -> Episode:
    """One scripted episode from the initial state of `seed`, stopped at the first success. With `noise` > 0
    a NoisyOperator (seeded from `seed`) perturbs the expert."""
    obs = env.reset(seed)
    expert = EXPERTS[task](env)
    if noise > 0:
        expert = NoisyOperator(expert, noise, np.random.default_rng([seed, 1]), obs["robot0_eef_pos"])
    steps: list[dict[str, np.ndarray]] = []
    actions, rewards, states = [], [], []
    success = False
    for _ in range(max_steps):
        action = expert.act(obs)
        steps.append(obs)
        states.append(env.get_state())
        obs, reward = env.step(action)
        actions.append(action)
        rewards.append(reward)
        if env.is_success():
            success = True
            break
    kept_keys = [k for k in steps[0] if not k.endswith(_REDUNDANT_OBS_SUFFIX)]
    keys, image_keys = split_obs_keys(kept_keys, [k for k in kept_keys if is_image_array((1, *np.shape(steps[0][k])),
                                                                                         np.asarray(steps[0][k]).dtype)])
    stacked = {k: np.stack([s[k] for s in steps]) for k in keys}
    next_obs = {k: np.concatenate([stacked[k][1:], obs[k][None]]) for k in keys}
    return Episode(
        obs=stacked, next_obs=next_obs, actions=np.asarray(actions), rewards=np.asarray(rewards),
        states=np.asarray(states),
        attrs={"seed": seed, "success": success, "noise": noise, "model_file": env.model_xml()},
        images={k: np.stack([s[k] for s in steps]) for k in image_keys},
    )


def collect(task: str, episodes: int, seed: int, out: str | Path, max_steps: int = 400, noise: float = 0.0,
            valid_fraction: float = 0.1, progress: bool = True, cameras: tuple[str, ...] = (),
            image_size: int = 84) -> dict:
    if task not in EXPERTS:
        raise UserError(f"no scripted expert for task {task!r}; choose one of {', '.join(EXPERTS)}")
    if episodes < 1:
        raise UserError(f"--episodes must be >= 1; got {episodes}")
    if max_steps < 1:
        raise UserError(f"--max-steps must be >= 1; got {max_steps}")
    if not 0 <= noise <= 3 or not np.isfinite(noise):
        raise UserError(f"--noise must be in [0, 3]; got {noise}")
    if noise and task == "transport":
        raise UserError("--noise perturbs delta actions; the transport expert commands absolute poses (use --noise 0)")
    env_args = default_env_args(task)
    images = ImageSpec(tuple(cameras), check_image_size(image_size), image_size) if cameras else None
    env = make_env(env_args, images=images)  # an unknown camera fails here, before any rollout
    kept: list[Episode] = []
    attempts, start = 0, time.time()
    bar = progress_bar(total=episodes, desc=f"collect {task}", unit="demo", enabled=progress)
    while len(kept) < episodes and attempts < 3 * episodes + 10:
        episode = run_expert_episode(env, task, seed + attempts, max_steps, noise)
        attempts += 1
        if episode.attrs["success"]:
            kept.append(episode)
            bar.update(1)
        bar.set_postfix(success=f"{len(kept)}/{attempts}", refresh=False)
    bar.close()
    env.close()
    if len(kept) < episodes:
        raise UserError(f"the {task} expert succeeded in only {len(kept)} of {attempts} attempts; nothing written")
    n_valid = max(1, int(round(valid_fraction * episodes))) if episodes > 1 else 0
    order = np.random.default_rng(seed).permutation(episodes)
    valid = sorted(order[:n_valid].tolist())
    train = sorted(order[n_valid:].tolist())
    attrs = {"task": task, "expert": task, "collect_seed": seed, "noise": noise}
    if images is not None:
        attrs.update(image_attrs(images))
    write_robomimic(out, kept, env_args, masks={"train": train, "valid": valid}, attrs=attrs, compression="gzip")
    return {
        "task": task, "noise": noise, "demos": len(kept), "attempts": attempts,
        "expert_success_rate": len(kept) / attempts,
        "mean_length": float(np.mean([len(e) for e in kept])), "seconds": time.time() - start, "out": str(out),
    }


def prepare_dataset(cfg: Config, collect_if_missing: bool, progress: bool) -> None:
    """The dataset `cfg.data.path` exists afterwards: with `collect_if_missing`, a missing one is collected from
    the scripted expert of `cfg.data.task`, or with `cfg.data.expert` from that SB3 expert on the Gymnasium task
    (`train` without --dataset, `sweep`); otherwise it is an error."""
    path = Path(cfg.data.path)
    if path.exists() or is_minari(cfg.data.path):  # Minari datasets are downloaded, never collected here
        return
    if not collect_if_missing or cfg.data.task == "none":
        raise UserError(f"dataset not found: {path}" + (" (data.task is none: download it, see the README's "
                                                        "supported files)" if cfg.data.task == "none" else ""))
    d = cfg.data
    noise = f" (operator noise {d.collect_noise})" if d.collect_noise else ""
    if d.expert:  # a Gymnasium task: the SB3 expert's rollouts as a Minari dataset
        from dopr_robot.experts.minari_collect import collect_minari

        print(f"{path} not found: collecting {d.collect_episodes} {d.task} episodes of {d.expert}{noise} first")
        s = collect_minari(d.task, d.expert, d.collect_episodes, d.collect_seed, path, noise=d.collect_noise,
                           progress=progress)
        print(f"mean return {s['mean_return']:.1f} +- {s['std_return']:.1f}, {s['seconds']:.0f} s -> {path}")
        return
    cameras = tuple(camera_of(k) for k in camera_keys(d.obs_keys))  # an image config collects its cameras
    images = f" with {', '.join(cameras)} at {d.collect_image_size}px" if cameras else ""
    print(f"{path} not found: collecting {d.collect_episodes} scripted {d.task} demos{noise}{images} first")
    summary = collect(d.task, d.collect_episodes, d.collect_seed, path, noise=d.collect_noise, progress=progress,
                      cameras=cameras, image_size=d.collect_image_size)
    print(f"expert success {summary['expert_success_rate']:.0%} ({summary['demos']}/{summary['attempts']}), "
          f"{summary['seconds']:.0f} s -> {path}")
