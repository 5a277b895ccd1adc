"""Checkpoints a user can read: `<name>.safetensors` (the EMA policy's weights, normalizer statistics
included) beside `<name>.json` (config, shapes, observation keys, normalization, the dataset's env_args, the
weights file's sha256, checked at every load). An image policy's JSON also records `image_shapes` ({image key:
[H, W, 3]}); with the config's `policy.encoder` (width, crop, pooling) that rebuilds its encoder and evaluation
crop.

Evaluation needs nothing else: `load_policy` rebuilds the policy from the JSON and loads the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from dopr_robot.config import config_from_dict
from dopr_robot.errors import UserError
from dopr_robot.fileio import atomic_path, write_json
from dopr_robot.policies import ActionChunkPolicy, RangeNormalizer, build_policy
from dopr_robot.provenance import file_sha256
from dopr_robot.rundir import resolve_checkpoint

FORMAT_VERSION = 1


def save_checkpoint(directory: Path, name: str, policy: ActionChunkPolicy, meta: dict[str, Any]) -> Path:
    """Write <name>.safetensors and <name>.json, the JSON recording the weights file's sha256. Both are renamed
    into place only once both are written, so a failure (a full disk) leaves the earlier pair as it was."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
    with atomic_path(directory / f"{name}.safetensors") as tmp:
        tmp.write_bytes(save_tensors(tensors))  # a Python write: a full disk is an OSError, not a Rust panic text
        meta = {"format": FORMAT_VERSION, **meta, "weights_sha256": file_sha256(tmp), "normalizer": {
            "obs": {"center": policy.obs_normalizer.center.tolist(), "scale": policy.obs_normalizer.scale.tolist()},
            "action": {"center": policy.action_normalizer.center.tolist(),
                       "scale": policy.action_normalizer.scale.tolist()},
        }}
        write_json(directory / f"{name}.json", meta)
    return directory / f"{name}.json"


def load_policy(path: str | Path, device: str | torch.device = "cpu") -> tuple[ActionChunkPolicy, dict[str, Any]]:
    meta_path = resolve_checkpoint(path)
    try:
        meta = json.loads(meta_path.read_text())
        config = config_from_dict(meta["config"])
        obs_dim, action_dim = int(meta["obs_dim"]), int(meta["action_dim"])
        image_shapes = {str(k): tuple(int(s) for s in v) for k, v in meta.get("image_shapes", {}).items()}
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"checkpoint metadata {meta_path} is malformed ({type(e).__name__}: {e})") from None
    d = config.data
    policy = build_policy(
        config.policy, obs_dim, action_dim, d.n_obs_steps, d.horizon,
        RangeNormalizer(torch.zeros(obs_dim), torch.ones(obs_dim), 1.0),
        RangeNormalizer(torch.zeros(action_dim), torch.ones(action_dim), 1.0), image_shapes=image_shapes,
    )
    weights = meta_path.with_suffix(".safetensors")
    if not weights.is_file():
        raise UserError(f"checkpoint weights not found: {weights}")
    recorded = meta.get("weights_sha256")  # absent in checkpoints written before it was recorded
    if recorded is not None and file_sha256(weights) != recorded:
        raise UserError(f"checkpoint weights {weights} are not the ones saved with {meta_path.name} (their sha256 "
                        f"differs from the recorded one): changed or damaged since training")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise UserError(f"checkpoint weights {weights} are unreadable ({e})") from None
    try:
        policy.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"checkpoint weights {weights} do not match its config ({str(e).splitlines()[0]})") from None
    recorded = meta.get("normalizer") or {}  # evaluation reads the observation scale from the JSON (`PolicySpec`)
    for part, normalizer in (("obs", policy.obs_normalizer), ("action", policy.action_normalizer)):
        saved = {k: getattr(normalizer, k).tolist() for k in ("center", "scale")}
        if part in recorded and any(recorded[part].get(k) != v for k, v in saved.items()):
            raise UserError(f"checkpoint metadata {meta_path} disagrees with its weights on the {part} normalizer "
                            f"(the JSON was edited)")
    return policy.to(device).eval(), meta
