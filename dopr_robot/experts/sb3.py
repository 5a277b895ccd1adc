"""Train, load and evaluate Stable-Baselines3 experts on Gymnasium MuJoCo tasks (SAC, TD3 or PPO).

Hyper-parameters follow the RL Baselines3 Zoo's MuJoCo settings (SAC and TD3: Adam 3e-4, batch 256, gamma 0.99,
one gradient step per env step; TD3 with Gaussian exploration noise of std 0.1; PPO: the zoo's Hopper setting),
with `learning_starts` shortened from the zoo's 10k to 5k random steps because a run here is a few hundred
thousand steps, not a million. Training is seeded (SB3 seeds torch, numpy and the env from `seed`), and an
EvalCallback keeps the best model so far (deterministic policy, `eval_episodes` episodes from fixed seeds) in
`<out>.best.zip`, so a run stopped early still leaves its best model; periodic checkpoints go to `<out>.ckpt/`.
At the end the better of (best, last) by the same evaluation is written to OUT, and `<out>.json` records the
command, steps, seed, hyper-parameters and that evaluation.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dopr_robot.errors import UserError
from dopr_robot.fileio import atomic_path, write_json

ALGOS = ("sac", "td3", "ppo")

# Per-algorithm keyword arguments of the SB3 constructor (the zoo's MuJoCo settings; see the module docstring).
ZOO_HYPERPARAMS: dict[str, dict[str, Any]] = {
    "sac": dict(learning_rate=3e-4, buffer_size=1_000_000, learning_starts=5_000, batch_size=256, tau=0.005,
                gamma=0.99, train_freq=1, gradient_steps=1),
    "td3": dict(learning_rate=3e-4, buffer_size=1_000_000, learning_starts=5_000, batch_size=256, tau=0.005,
                gamma=0.99, train_freq=1, gradient_steps=1, policy_kwargs=dict(net_arch=[256, 256])),
    "ppo": dict(learning_rate=9.8e-5, n_steps=512, batch_size=32, n_epochs=5, gamma=0.999, gae_lambda=0.99,
                clip_range=0.2, ent_coef=0.0023, vf_coef=0.835, max_grad_norm=0.7,
                policy_kwargs=dict(log_std_init=-2, ortho_init=False, net_arch=dict(pi=[256, 256], vf=[256, 256]))),
}
TD3_NOISE_STD = 0.1  # Gaussian exploration noise, as a fraction of the action range's half-width (actions in [-1, 1])


@dataclass
class ExpertTrainConfig:
    env: str
    algo: str = "td3"
    steps: int = 300_000
    seed: int = 0
    eval_every: int = 20_000      # env steps between evaluations of the current policy (best model kept)
    eval_episodes: int = 5        # episodes per periodic evaluation (seeds 10_000 + i)
    checkpoint_every: int = 50_000
    max_minutes: float | None = None  # stop learning (cleanly, then evaluate and save) after this wall time
    hyperparams: dict[str, Any] = field(default_factory=dict)


def algo_class(algo: str):
    if algo not in ALGOS:
        raise UserError(f"unknown --algo {algo!r}; choose one of {', '.join(ALGOS)}")
    try:
        import stable_baselines3 as sb3
    except ImportError as e:
        raise UserError("expert training needs Stable-Baselines3: pip install 'dopr-robot[create]'") from e
    return {"sac": sb3.SAC, "td3": sb3.TD3, "ppo": sb3.PPO}[algo]


def make_gym_env(env_id: str, **kwargs):
    """gymnasium.make(env_id) with one `error:` line for an id Gymnasium does not know."""
    import gymnasium as gym

    try:
        return gym.make(env_id, **kwargs)
    except gym.error.Error as e:
        raise UserError(f"unknown Gymnasium environment {env_id!r} ({type(e).__name__}: {e})") from e


def _check_train_args(cfg: ExpertTrainConfig, out: Path) -> None:
    algo_class(cfg.algo)
    if cfg.steps < 1:
        raise UserError(f"--steps must be >= 1; got {cfg.steps}")
    if cfg.max_minutes is not None and not cfg.max_minutes > 0:
        raise UserError(f"--max-minutes must be > 0; got {cfg.max_minutes}")
    if out.suffix != ".zip":
        raise UserError(f"--out must end in .zip (Stable-Baselines3's file); got {out}")
    if out.exists() and out.is_dir():
        raise UserError(f"--out {out} is a directory")
    env = make_gym_env(cfg.env)
    import gymnasium as gym

    box = isinstance(env.action_space, gym.spaces.Box) and isinstance(env.observation_space, gym.spaces.Box)
    env.close()
    if not box:
        raise UserError(f"{cfg.env} has non-Box observations or actions; experts here need continuous Box spaces")


def run_episode(env, act, seed: int) -> tuple[float, int, bool]:
    """One episode of `env` reset with `seed`, acting `act(obs)` until it terminates or is truncated:
    (return, length, terminated early)."""
    obs, _ = env.reset(seed=seed)
    total, n = 0.0, 0
    while True:
        obs, reward, terminated, truncated, _ = env.step(act(obs))
        total += float(reward)
        n += 1
        if terminated or truncated:
            return total, n, bool(terminated)


def evaluate_expert(model, env_id: str, episodes: int, seed_start: int) -> dict[str, Any]:
    """Deterministic returns of `model` over `episodes` episodes, episode i reset with seed `seed_start + i`."""
    env = make_gym_env(env_id)
    runs = [run_episode(env, lambda obs: model.predict(obs, deterministic=True)[0], seed_start + i)
            for i in range(episodes)]
    env.close()
    returns = [r[0] for r in runs]
    return {"episodes": episodes, "seed_start": seed_start, "mean_return": float(np.mean(returns)),
            "std_return": float(np.std(returns)), "min_return": float(np.min(returns)),
            "mean_length": float(np.mean([r[1] for r in runs])), "returns": returns}


def _WallClockLimit(max_minutes: float | None):
    """An SB3 callback that ends `learn` cleanly once `max_minutes` of wall time have passed (None: never)."""
    from stable_baselines3.common.callbacks import BaseCallback

    class WallClockLimit(BaseCallback):
        def _on_training_start(self) -> None:
            self.deadline = None if max_minutes is None else time.time() + 60 * max_minutes

        def _on_step(self) -> bool:
            return self.deadline is None or time.time() < self.deadline

    return WallClockLimit()


def _fresh_checkpoint_dir(out: Path, overwrite: bool) -> Path:
    """OUT.ckpt/, new or (with `overwrite`) emptied of an earlier run's files: a stale best_model.zip must never
    compete with this run's models, and an earlier (perhaps stopped) run's best model is never lost silently. A
    directory holding anything else is refused."""
    work = out.with_name(out.stem + ".ckpt")
    if work.exists():
        if not overwrite:
            raise UserError(f"{work} exists (an earlier run's checkpoints, its best model in best_model.zip); pass "
                            "--overwrite to replace it")
        ours = re.compile(r"(best_model|last_model|(sac|td3|ppo)_\d+_steps)\.zip|evaluations\.npz")
        strangers = [p.name for p in work.iterdir() if not ours.fullmatch(p.name)] if work.is_dir() else [work.name]
        if strangers:
            raise UserError(f"{work} holds files that are not expert checkpoints ({', '.join(strangers[:3])}); "
                            "refusing to clear it")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work


def train_expert(cfg: ExpertTrainConfig, out: str | Path, overwrite: bool = False, final_eval_episodes: int = 20,
                 final_eval_seed_start: int = 1_000_000, verbose: int = 0) -> dict[str, Any]:
    """Train an expert, write the better of (best-so-far, last) to `out` and its record to `out`.json."""
    from stable_baselines3.common.callbacks import CallbackList, CheckpointCallback, EvalCallback
    from stable_baselines3.common.monitor import Monitor

    out = Path(out)
    _check_train_args(cfg, out)
    work = _fresh_checkpoint_dir(out, overwrite)
    cls = algo_class(cfg.algo)
    hp = {**ZOO_HYPERPARAMS[cfg.algo], **cfg.hyperparams}
    env = Monitor(make_gym_env(cfg.env))
    if cfg.algo == "td3" and "action_noise" not in hp:
        from stable_baselines3.common.noise import NormalActionNoise

        dim = env.action_space.shape[0]
        hp["action_noise"] = NormalActionNoise(np.zeros(dim), TD3_NOISE_STD * np.ones(dim))
    model = cls("MlpPolicy", env, seed=cfg.seed, verbose=verbose, device="cpu", **hp)
    eval_env = Monitor(make_gym_env(cfg.env))
    eval_env.reset(seed=10_000)  # the evaluation env's episode seeds follow from this one
    callbacks = CallbackList([
        _WallClockLimit(cfg.max_minutes),
        EvalCallback(eval_env, n_eval_episodes=cfg.eval_episodes, eval_freq=max(1, cfg.eval_every),
                     best_model_save_path=str(work), log_path=str(work), deterministic=True, verbose=verbose),
        CheckpointCallback(save_freq=max(1, cfg.checkpoint_every), save_path=str(work), name_prefix=cfg.algo),
    ])
    start = time.time()
    model.learn(total_timesteps=cfg.steps, callback=callbacks, progress_bar=False)
    seconds = time.time() - start
    model.save(work / "last_model.zip")
    # The final choice between the periodic best and the last model is made on seeds neither was selected on.
    candidates = {"last": work / "last_model.zip"}
    if (work / "best_model.zip").exists():
        candidates["best"] = work / "best_model.zip"
    scores = {name: evaluate_expert(cls.load(path, device="cpu"), cfg.env, final_eval_episodes,
                                    final_eval_seed_start) for name, path in candidates.items()}
    chosen = max(scores, key=lambda name: scores[name]["mean_return"])
    with atomic_path(out, suffix=".zip") as tmp:
        shutil.copyfile(candidates[chosen], tmp)
    record = {
        "env": cfg.env, "algo": cfg.algo, "steps": cfg.steps, "steps_done": int(model.num_timesteps),
        "stopped_by_time_limit": int(model.num_timesteps) < cfg.steps, "seed": cfg.seed,
        "command": " ".join(["dopr-robot", "expert", "train"] + sys.argv[3:]) if sys.argv[1:3] == ["expert", "train"]
        else None,
        "config": asdict(cfg), "hyperparams": {k: v for k, v in hp.items() if k != "action_noise"},
        "td3_noise_std": TD3_NOISE_STD if cfg.algo == "td3" else None,
        "train_seconds": seconds, "chosen": chosen, "evaluation": scores[chosen],
        "evaluation_other": {k: {kk: vv for kk, vv in v.items() if kk != "returns"}
                             for k, v in scores.items() if k != chosen},
        "versions": _versions(),
    }
    write_json(out.with_suffix(".json"), record)
    return record


def _versions() -> dict[str, str]:
    import gymnasium
    import mujoco
    import stable_baselines3
    import torch

    return {"stable_baselines3": stable_baselines3.__version__, "gymnasium": gymnasium.__version__,
            "mujoco": mujoco.__version__, "torch": torch.__version__}


def load_expert(path: str | Path, env_id: str | None = None):
    """Load an SB3 expert zip (its algorithm read from the file); check it fits `env_id`'s spaces."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"expert file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise UserError(f"expert {path} is not a Stable-Baselines3 zip file")
    algo = _algo_of_zip(path)
    cls = algo_class(algo)
    try:
        model = cls.load(path, device="cpu")
    except Exception as e:  # SB3 raises assorted errors on a damaged zip
        raise UserError(f"cannot load expert {path} ({type(e).__name__}: {e})") from e
    if env_id is not None:
        env = make_gym_env(env_id)
        obs_ok = model.observation_space.shape == env.observation_space.shape
        act_ok = model.action_space.shape == env.action_space.shape
        env.close()
        if not (obs_ok and act_ok):
            raise UserError(f"expert {path} does not fit {env_id}: it takes observations "
                            f"{model.observation_space.shape} and acts in {model.action_space.shape}, the env "
                            f"has {env.observation_space.shape} and {env.action_space.shape}")
    return model


def _algo_of_zip(path: Path) -> str:
    """The algorithm that wrote an SB3 zip, from the policy class's module named in its `data` entry
    (stable_baselines3.sac.policies, stable_baselines3.td3.policies; PPO's ActorCriticPolicy lives in
    stable_baselines3.common.policies)."""
    try:
        with zipfile.ZipFile(path) as z:
            data = json.loads(z.read("data"))
        module = str(data["policy_class"]["__module__"])
    except (KeyError, TypeError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"expert {path} is not a Stable-Baselines3 model zip (no readable policy class)") from e
    for algo in ("sac", "td3"):
        if module.startswith(f"stable_baselines3.{algo}."):
            return algo
    if module == "stable_baselines3.common.policies":  # ActorCriticPolicy: what PPO writes
        return "ppo"
    raise UserError(f"expert {path} was written by {module}, not by SAC, TD3 or PPO")
