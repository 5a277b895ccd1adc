"""Minari datasets (Farama's successor to D4RL), read with the `minari` library into this tool's Episodes.

A dataset is named `minari:<dataset_id>` (e.g. `minari:mujoco/hopper/expert-v0`, looked up where the `minari`
library looks: $MINARI_DATASETS_PATH, else ~/.minari/datasets; `minari download <dataset_id>` puts it there), or
by the path of a dataset directory (the one holding `data/metadata.json`, or that `data/` directory itself).

What is read: every episode's observations, actions, rewards, terminations, truncations and reset seed. Minari
stores T+1 observations for T actions (the last one is what the final action led to), so `obs[t]` is
observations[t] and `next_obs[t]` observations[t+1]. Observations become flat keys (`envs.gymnasium_env.observation_layout`: a Box is
"obs"). Minari has no train/valid split: every episode trains (no validation loss).

The environment is recovered from the dataset's own env spec (`recover_environment`, the evaluation env when the
dataset names one) and recorded as env_args, so a checkpoint alone rebuilds it. The dataset's reference scores
(`ref_min_score` / `ref_max_score`, random and expert returns, where it has them) are kept in the attrs, for
normalized returns.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from dopr_robot.datasets.robomimic_hdf5 import Episode
from dopr_robot.errors import UserError, error_summary

MINARI_PREFIX = "minari:"
_METADATA = "metadata.json"
# Minari metadata kept in the attrs (and so in checkpoints and converted files): plain values only.
_KEPT_METADATA = ("dataset_id", "minari_version", "algorithm_name", "ref_min_score", "ref_max_score",
                  "num_episodes_average_score", "description", "code_permalink")


def is_minari(path: str | Path) -> bool:
    """`minari:<id>`, or a directory holding a Minari dataset (its root, or its data/ directory)."""
    if str(path).startswith(MINARI_PREFIX):
        return True
    path = Path(path)
    return (path / "data" / _METADATA).is_file() or (path.is_dir() and (path / _METADATA).is_file())


def reference_scores(attrs: dict[str, Any]) -> dict[str, float] | None:
    """{"min": ref_min_score, "max": ref_max_score} when a dataset records both, else None."""
    low, high = attrs.get("ref_min_score"), attrs.get("ref_max_score")
    if low is None or high is None:
        return None
    return {"min": float(low), "max": float(high)}


def _import_minari():
    try:
        import minari
    except ImportError:
        raise UserError("Minari datasets need the minari package: pip install minari==0.5.3") from None
    return minari


def _data_directory(source: str | Path) -> Path:
    """The dataset's data/ directory (metadata.json and the episodes), or a UserError naming the dataset."""
    text = str(source)
    if text.startswith(MINARI_PREFIX):
        dataset_id = text[len(MINARI_PREFIX):].strip()
        if not dataset_id:
            raise UserError("dataset 'minari:' names no Minari dataset id (e.g. minari:mujoco/hopper/expert-v0)")
        _import_minari()
        from minari.storage.datasets_root_dir import get_dataset_path

        data = get_dataset_path(dataset_id) / "data"
        if not (data / _METADATA).is_file():
            root = get_dataset_path()
            raise UserError(f"Minari dataset {dataset_id} not found in {root} (MINARI_DATASETS_PATH, else "
                            f"~/.minari/datasets; local: {_local_ids(root)}); download it with "
                            f"`minari download {dataset_id}`")
        return data
    path = Path(source)
    return path / "data" if (path / "data" / _METADATA).is_file() else path


def _local_ids(root: Path) -> str:
    ids = sorted(p.parent.parent.relative_to(root).as_posix() for p in root.glob(f"**/data/{_METADATA}"))
    return ", ".join(ids[:8]) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "") if ids else "none"


def read_minari(source: str | Path, obs_keys: list[str] | None = None):
    """(data directory, {name: Episode}, env_args, attrs) of a Minari dataset; `obs_keys=None` reads every
    observation key. Every problem is one UserError naming the dataset."""
    from dopr_robot.envs.gymnasium_env import observation_dict, observation_layout

    name = str(source)
    minari = _import_minari()
    data = _data_directory(source)
    try:
        dataset = minari.MinariDataset(data)
    except Exception as e:  # noqa: BLE001 - ValueError (version, format), KeyError, OSError, ImportError (pyarrow)
        raise UserError(f"Minari dataset {name} is unreadable ({error_summary(e)})") from None
    try:
        layout = observation_layout(dataset.observation_space)
    except ValueError as e:
        raise UserError(f"Minari dataset {name}: {e}") from None
    keys = list(layout) if obs_keys is None else list(obs_keys)
    for key in keys:
        if key not in layout:
            raise UserError(f"Minari dataset {name}: no observation key {key!r} (has: {', '.join(layout)})")
    env_args = _recover_env_args(dataset, name, layout)
    episodes: dict[str, Episode] = {}
    try:
        seeds = {m["id"]: m.get("seed") for m in dataset.storage.get_episode_metadata(dataset.episode_indices)}
        for ep in dataset.iterate_episodes():
            episode = episodes[f"demo_{ep.id}"] = _episode(ep, keys, observation_dict, name)
            if seeds.get(ep.id) is not None:
                episode.attrs["seed"] = int(seeds[ep.id])  # the reset seed DataCollector recorded
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged episode, whatever h5py/pyarrow raise
        raise UserError(f"Minari dataset {name} is corrupt or unreadable ({error_summary(e)})") from None
    if not episodes:
        raise UserError(f"Minari dataset {name} holds no episodes")
    metadata = dataset.storage.metadata
    attrs = {"source": "minari", **{k: metadata[k] for k in _KEPT_METADATA if metadata.get(k) is not None}}
    return data, episodes, env_args, attrs


def _episode(ep, keys: list[str], observation_dict, name: str) -> Episode:
    steps = len(ep)
    where = f"Minari dataset {name}, episode {ep.id}"
    actions = np.asarray(ep.actions, dtype=np.float32).reshape(steps, -1)
    observations = observation_dict(ep.observations)
    obs, next_obs = {}, {}
    for key in keys:
        values = np.asarray(observations[key], dtype=np.float32)
        if values.shape[0] != steps + 1:
            raise UserError(f"{where}: {values.shape[0]} observations for {steps} actions (need {steps + 1})")
        values = values.reshape(steps + 1, -1)
        obs[key], next_obs[key] = values[:-1], values[1:]  # views of one array: no copy
    for label, value in [("actions", actions), *obs.items(), *next_obs.items()]:
        if not np.all(np.isfinite(value)):
            raise UserError(f"{where}: {label} contains NaN or inf")
    rewards = np.asarray(ep.rewards, dtype=np.float64)
    return Episode(obs=obs, actions=actions, rewards=rewards, next_obs=next_obs,
                   attrs={"terminated": bool(ep.terminations[-1]), "truncated": bool(ep.truncations[-1]),
                          "return": float(rewards.sum())})


def _recover_env_args(dataset, name: str, layout: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Rebuild the dataset's environment once (the evaluation env where the dataset names one), check that its
    observations and actions are the dataset's, and describe it as env_args."""
    from dopr_robot.envs.gymnasium_env import gymnasium_env_args, import_gymnasium, observation_layout

    gymnasium = import_gymnasium()
    with warnings.catch_warnings(record=True) as caught:  # Minari's requirement checks: shown as warning lines
        warnings.simplefilter("always")
        try:
            env = dataset.recover_environment(eval_env=True)
        except Exception as e:  # noqa: BLE001 - no spec, unknown id, a missing package: one line either way
            raise UserError(f"Minari dataset {name}: its environment cannot be recovered "
                            f"({error_summary(e)})") from None
    for warning in caught:
        if "requirement" in str(warning.message) or "not installed" in str(warning.message):
            print(f"warning: Minari dataset {name}: {str(warning.message).splitlines()[0]}")
    try:
        try:
            env_layout = observation_layout(env.observation_space)
        except ValueError:
            env_layout = None
        if env_layout != layout:
            raise UserError(f"Minari dataset {name}: its observations ({dataset.observation_space}) are not those "
                            f"of its environment {env.spec.id} ({env.observation_space}); a policy trained on "
                            f"them could not be evaluated there")
        if not isinstance(env.action_space, gymnasium.spaces.Box) or \
                env.action_space.shape != dataset.action_space.shape:
            raise UserError(f"Minari dataset {name}: actions {dataset.action_space} of environment "
                            f"{env.spec.id} ({env.action_space}) are not continuous (a Box) of the same shape")
        return gymnasium_env_args(env)
    finally:
        env.close()
