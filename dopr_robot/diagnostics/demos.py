"""The demonstrations a checkpoint was trained on, as the diagnostics read them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dopr_robot.datasets import flatten_obs, open_demos
from dopr_robot.datasets.minari_source import is_minari
from dopr_robot.datasets.robomimic_hdf5 import Episode
from dopr_robot.envs.compat import to_policy_actions
from dopr_robot.errors import UserError


def training_demos(meta: dict[str, Any], ckpt: Path, dataset: str | Path | None
                   ) -> tuple[Path, list[Episode], list[Episode]]:
    """(dataset path, train episodes, valid episodes) of the checkpoint's dataset (or `dataset`), split by the
    run's own filter keys, with the checkpoint's observation keys; one `error:` line if they do not fit."""
    if meta.get("image_shapes"):
        raise UserError(f"{ckpt} is an image policy: diagnose and spectrum measure low-dim observation spaces only")
    data_cfg = meta["config"]["data"]
    obs_keys, obs_dim = list(meta["obs_keys"]), int(meta["obs_dim"])
    dataset = Path(dataset) if dataset is not None else Path(meta["dataset"])
    if not dataset.exists() and not is_minari(dataset):  # a Minari id says itself where it was looked for
        raise UserError(f"training dataset {dataset} (recorded in {ckpt}) not found; pass --dataset PATH")
    demos = open_demos(dataset, obs_keys)
    train_eps = demos.episodes(data_cfg["train_filter"])
    valid_eps = demos.episodes(data_cfg["valid_filter"], missing_ok=True)
    if not train_eps:
        raise UserError(f"dataset {dataset}: mask/{data_cfg['train_filter']} names no demos to compare with")
    to_policy_actions(demos.episodes(None), meta["env_args"])  # the actions as the policy predicts them
    dim = flatten_obs(train_eps[0].obs, obs_keys).shape[1]
    if dim != obs_dim:
        raise UserError(f"dataset {dataset} observations have {dim} dims, checkpoint expects "
                        f"{obs_dim} (obs_keys {obs_keys})")
    return dataset, train_eps, valid_eps
