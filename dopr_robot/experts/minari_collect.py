"""`dopr-robot collect --env`: roll out a Stable-Baselines3 expert on a Gymnasium MuJoCo task and write the
episodes as a Minari dataset with Minari's own `DataCollector` (so the file is what `minari` writes and reads).

Episode i is reset with seed `seed + i` (Minari stores it as the episode's `seed`); every episode is kept,
including those the env terminated early (a fallen hopper): this is an offline-RL style dataset, not a filtered
set of successes. The expert acts deterministically; with `noise` > 0 an `OperatorNoise` (seeded from the
episode's seed) perturbs it, and the dataset records the executed (noisy) actions, as D4RL's "medium" data do.

Reference scores, for normalized returns (D4RL convention): `ref_max_score` is the noise-free expert's mean
return and `ref_min_score` a uniform random policy's, both computed by Minari over `ref_episodes` episodes
(Minari seeds them with 123).

Output: OUT/data/{metadata.json, main_data.hdf5}, the layout of a dataset under Minari's datasets root, so
OUT loads with `minari.MinariDataset(OUT / "data")`, and a copy at `$MINARI_DATASETS_PATH/<dataset_id>` loads
with `minari.load_dataset(dataset_id)`. The dataset is built in a hidden directory beside OUT and renamed into
place at the end: an interrupted collect leaves no half-written dataset.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from dopr_robot.errors import UserError
from dopr_robot.experts.sb3 import load_expert, make_gym_env, run_episode
from dopr_robot.progress import progress_bar

MAX_NOISE = 3.0


class OperatorNoise:
    """Imperfect demonstrations from an expert at a noise `level` >= 0, the locomotion counterpart of the
    robosuite NoisyOperator (dopr_robot.envs.experts), all draws from `rng`:
    - temporally correlated action noise, AR(1) with coefficient 0.8 and stationary std 0.3 level (actions in
      the env's units; Gymnasium MuJoCo actions span [-1, 1] or [-0.4, 0.4]), on every action dimension;
    - hesitations: with probability 0.03 level per step, the operator repeats its last executed action for 3-12
      steps (a held action rather than a zero one: a zero torque is not "pausing" for a hopping robot).
    The executed action is clipped to the action space. Level 0 is the expert itself."""

    def __init__(self, level: float, low: np.ndarray, high: np.ndarray, rng: np.random.Generator):
        self.level, self.low, self.high, self.rng = level, low, high, rng
        self.noise = np.zeros_like(low, dtype=np.float64)
        self.hold = 0
        self.last: np.ndarray | None = None

    def __call__(self, action: np.ndarray) -> np.ndarray:
        if self.level == 0:
            return action
        if self.hold > 0 and self.last is not None:
            self.hold -= 1
            return self.last
        if self.rng.random() < 0.03 * self.level:
            self.hold = int(self.rng.integers(3, 13))
        self.noise = 0.8 * self.noise + 0.6 * 0.3 * self.level * self.rng.standard_normal(self.noise.shape)
        self.last = np.clip(action + self.noise, self.low, self.high).astype(action.dtype)
        return self.last


def default_dataset_id(env_id: str, noise: float) -> str:
    """dopr/<env name>/expert-v0, or dopr/<env name>/noisy<level>-v0 (a dot in the level written as 'p')."""
    name = env_id.split("-v")[0].lower()
    kind = "expert" if noise == 0 else f"noisy{noise:g}".replace(".", "p")
    return f"dopr/{name}/{kind}-v0"


@contextlib.contextmanager
def _minari_root(path: Path) -> Iterator[None]:
    """Point Minari's datasets root at `path` for the duration (Minari reads MINARI_DATASETS_PATH each time)."""
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


def check_output_dir(out: Path, overwrite: bool) -> None:
    """OUT may receive a dataset: absent, or (with overwrite) an earlier Minari dataset directory."""
    if out.exists():
        if not overwrite:
            raise UserError(f"{out} exists; pass --overwrite to replace it")
        if not (out / "data" / "metadata.json").is_file():
            raise UserError(f"{out} exists and is not a Minari dataset directory (no data/metadata.json); "
                            "refusing to replace it")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise UserError(f"directory of --out {parent} is not writable")


def collect_minari(env_id: str, expert_path: str | Path, episodes: int, seed: int, out: str | Path,
                   noise: float = 0.0, dataset_id: str | None = None, ref_episodes: int = 20,
                   overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    out = Path(out).absolute()  # Minari's DataCollector joins a relative data path onto itself
    if episodes < 1:
        raise UserError(f"--episodes must be >= 1; got {episodes}")
    if not (np.isfinite(noise) and 0 <= noise <= MAX_NOISE):
        raise UserError(f"--noise must be in [0, {MAX_NOISE:g}]; got {noise}")
    if ref_episodes < 1:
        raise UserError(f"--ref-episodes must be >= 1; got {ref_episodes}")
    dataset_id = dataset_id or default_dataset_id(env_id, noise)
    from minari.dataset.minari_dataset import parse_dataset_id

    try:
        parse_dataset_id(dataset_id)
    except ValueError:
        raise UserError(f"--dataset-id {dataset_id!r} is not a Minari id ((namespace/)name-v<version>)") from None
    check_output_dir(out, overwrite)
    env = make_gym_env(env_id)
    model = load_expert(expert_path, env_id)
    try:
        from minari import DataCollector
        import jax  # noqa: F401  (DataCollector's storage needs it; fail here, before the rollouts)
    except ImportError as e:
        raise UserError("collect --env needs Minari's creation extra (jax): pip install 'dopr-robot[create]'") \
            from e

    def expert_policy(obs):
        return model.predict(obs, deterministic=True)[0]

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    start = time.time()
    returns, lengths, terminated_early = [], [], 0
    try:
        with _minari_root(staging):
            collector = DataCollector(env)
            bar = progress_bar(total=episodes, desc=f"collect {env_id}", unit="episode", enabled=progress)
            for i in range(episodes):
                operator = OperatorNoise(noise, env.action_space.low, env.action_space.high,
                                         np.random.default_rng([seed + i, 1]))
                total, n, terminated = run_episode(collector, lambda obs: operator(expert_policy(obs)), seed + i)
                returns.append(total)
                lengths.append(n)
                terminated_early += terminated
                bar.update(1)
            bar.close()
            description = (f"{episodes} episodes of {env_id} from the Stable-Baselines3 expert "
                           f"{Path(expert_path).name} (deterministic), episode i reset with seed {seed} + i, "
                           + ("no operator noise." if noise == 0 else
                              f"operator noise level {noise:g} (AR(1) action noise of stationary std "
                              f"{0.3 * noise:g} and held actions; see dopr_robot.experts.minari_collect)."))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # author_email unset: a user's choice
                collector.create_dataset(
                    dataset_id=dataset_id, eval_env=env_id, algorithm_name=f"SB3-{_algo_name(model)}+dopr-collect",
                    author="dopr-robot collect --env", code_permalink=_code_version(), expert_policy=expert_policy,
                    num_episodes_average_score=ref_episodes, description=description)
            collector.close()
        built = staging / dataset_id
        if out.exists():  # checked above: an earlier Minari dataset, and overwrite was asked for
            shutil.rmtree(out)
        os.replace(built, out)
    finally:
        env.close()
        shutil.rmtree(staging, ignore_errors=True)
    import minari

    check = minari.MinariDataset(out / "data")
    return {
        "env": env_id, "dataset_id": dataset_id, "episodes": check.total_episodes, "steps": check.total_steps,
        "noise": noise, "seed": seed, "mean_return": float(np.mean(returns)), "std_return": float(np.std(returns)),
        "mean_length": float(np.mean(lengths)), "terminated_early": terminated_early,
        "ref_min_score": check.storage.metadata.get("ref_min_score"),
        "ref_max_score": check.storage.metadata.get("ref_max_score"), "seconds": time.time() - start,
        "out": str(out),
    }


def _algo_name(model) -> str:
    return type(model).__name__


def _code_version() -> str:
    """The code that wrote the dataset: this checkout's git commit (no public URL is claimed)."""
    from dopr_robot.provenance import git_state

    git = git_state()
    commit = git["commit"] or "unknown commit"
    return f"dopr-robot {commit}{' (modified)' if git['dirty'] else ''}: dopr_robot/experts/minari_collect.py"
