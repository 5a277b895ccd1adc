"""Experiment configuration: typed dataclasses, loaded from YAML, overridden with `--set key=value`.

Every random choice and every knob of a run lives here; the resolved config is written into the run
directory, so a run can be repeated from its own `config.yaml`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dopr_robot.errors import UserError
from dopr_robot.optim.config import AP_OPTIMIZERS, OPTIMIZERS, OptimConfig


@dataclass
class DataConfig:
    path: str = "data/lift_scripted.hdf5"
    # If `path` does not exist, this many scripted-expert demos of `task` are collected into it first
    # ("none": a downloaded file, never collected).
    task: str = "lift"
    # A Stable-Baselines3 expert zip (`dopr-robot expert train`): `task` is then a Gymnasium id (e.g. Hopper-v5)
    # and a missing `path` is collected as a Minari dataset of its rollouts (`collect --env`), with
    # collect_noise as the locomotion operator noise level (0..3)
    expert: str = ""
    collect_episodes: int = 100
    collect_seed: int = 0
    collect_noise: float = 0.0  # NoisyOperator level of those demos (0 = the scripted expert)
    collect_image_size: int = 84  # frame side of those demos when obs_keys name image keys (<camera>_image)
    # Training frames: "disk" reads each batch's frames from the file (memory stays flat as the dataset grows);
    # "memory" reads them all once and holds them as uint8 (1 byte per pixel; faster batches).
    image_cache: str = "disk"
    # Low-dim observation keys; empty: the file's object key and every robot's eef pos/quat + gripper qpos
    # (datasets/obs_keys.py). Image keys (uint8 frames, robomimic's <camera>_image) go to the image encoder.
    obs_keys: list[str] = field(default_factory=list)
    # Rotation of absolute pose actions the policy predicts: file (as recorded), axis_angle (7-D per arm) or
    # rotation_6d (10-D per arm, diffusion_policy's abs layout); eval converts back for the controller.
    action_rotation: str = "file"
    n_obs_steps: int = 2
    horizon: int = 16
    n_action_steps: int = 8
    train_filter: str = "train"
    valid_filter: str = "valid"
    # Smallest per-dimension (max - min) used for [-1, 1] scaling; stops near-constant dims from blowing up.
    norm_range_floor: float = 0.1


@dataclass
class MLPConfig:
    hidden_dim: int = 512
    num_layers: int = 4
    step_embed_dim: int = 128


@dataclass
class ResMLPConfig:
    """policy.backbone: resmlp (policies/resmlp.py): pre-LayerNorm residual blocks of inner width expansion x
    hidden_dim; the backbone of policy.type: bc."""
    hidden_dim: int = 256
    num_blocks: int = 3
    expansion: int = 4
    step_embed_dim: int = 128  # diffusion / flow only: the time embedding's width


@dataclass
class UNetConfig:
    down_dims: list[int] = field(default_factory=lambda: [256, 512, 1024])
    kernel_size: int = 5
    n_groups: int = 8
    step_embed_dim: int = 256


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 100
    num_inference_steps: int = 10  # DDIM steps at sampling time
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"
    clip_sample: bool = True


@dataclass
class FlowConfig:
    num_inference_steps: int = 10
    integrator: str = "euler"  # euler | midpoint
    time_distribution: str = "uniform"  # uniform | beta
    beta_a: float = 1.5  # time ~ Beta(a, b) when time_distribution == "beta"
    beta_b: float = 1.0


@dataclass
class EncoderConfig:
    """The image encoder (policies/encoder.py); used only when data.obs_keys name image keys (<camera>_image)."""

    width: float = 1.0  # channel multiplier of the ResNet-18 (1.0: torchvision's 64..512 channels)
    crop: int = 76  # side of the square crop (random in training, center at eval); 0 = no crop
    pool: str = "spatial_softmax"  # spatial_softmax (robomimic, diffusion_policy) | avg (the DoPr authors')
    keypoints: int = 32  # spatial softmax keypoints
    feature_dim: int = 64  # features per camera and observation step (robomimic 64; the DoPr authors' 256)


@dataclass
class PolicyConfig:
    type: str = "diffusion"  # diffusion | flow | bc (deterministic, L2 on the action chunk; resmlp backbone)
    backbone: str = "mlp"  # mlp | resmlp | unet
    mlp: MLPConfig = field(default_factory=MLPConfig)
    resmlp: ResMLPConfig = field(default_factory=ResMLPConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)


@dataclass
class TrainConfig:
    steps: int = 5000
    batch_size: int = 256
    seed: int = 0
    warmup_steps: int = 500
    grad_clip: float = 10.0  # max global grad norm; 0 disables
    ema_power: float = 0.75  # EMA decay 1 - (1 + step)^-power, capped at ema_max_decay (diffusion_policy)
    ema_max_decay: float = 0.9999
    log_every: int = 100
    val_every: int = 1000
    checkpoint_every: int = 1000  # trainer state + step checkpoint every N steps (0: only at the end)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch CPU threads; 0 = torch's default
    # In-training rollouts of the EMA policy every eval_every steps (0 = off), on SELECTION seeds
    # eval_seed_start.., disjoint from the REPORT seeds eval.seed_start.. (a "best" checkpoint's reported success
    # is then not the number it was chosen on). eval.max_steps and eval.workers apply.
    eval_every: int = 0
    eval_episodes: int = 20
    eval_seed_start: int = 200000
    # What `best` maximizes over those rollouts: success rate, or mean return (the Gymnasium locomotion tasks,
    # where success is only "did not fall")
    select_metric: str = "success"
    logger: str = "none"  # none | tensorboard | wandb: where metrics.jsonl's records are mirrored (training/loggers.py)


@dataclass
class EvalConfig:
    episodes: int = 50
    seed_start: int = 100000
    max_steps: int = 400
    workers: int = 0  # 0 = one per CPU core
    # Episodes a worker runs together in lockstep, one batched policy call per re-plan (evaluation/lockstep.py);
    # results depend on it (floating-point batching), never on `workers`. 4: measured (README, Evaluation
    # against the simulator's floor): most of the batching gain, blocks small enough to share out evenly.
    batch_episodes: int = 4
    # Perturbation stress (dopr_robot.evaluation.perturb): 0 = off.
    action_noise: float = 0.0  # Gaussian std on executed actions, raw env action units
    obs_noise: float = 0.0  # Gaussian std on the policy's observations, normalized units
    push: float = 0.0  # probability per episode of one velocity kick on the task object
    push_magnitude: float = 0.5  # m/s


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


CHOICES = {
    "policy.type": ("diffusion", "flow", "bc"),
    "policy.backbone": ("mlp", "resmlp", "unet"),
    "policy.encoder.pool": ("spatial_softmax", "avg"),
    "data.image_cache": ("disk", "memory"),
    "policy.diffusion.prediction_type": ("epsilon", "sample"),
    "policy.flow.integrator": ("euler", "midpoint"),
    "policy.flow.time_distribution": ("uniform", "beta"),
    "optim.name": OPTIMIZERS,
    "optim.adjust_lr": ("match_rms_adamw", "original"),
    "optim.ap.damping_form": ("mean", "trace"),
    "optim.ap.conv_mode": ("channel", "full"),
    "optim.ap.stats_from": ("batch", "previous_batch"),
    "optim.ap.path": ("auto", "primal", "dual", "backward"),
    "optim.matrix_layers": ("hidden", "all"),
    "data.task": ("lift", "can", "square", "transport", "none"),
    "data.action_rotation": ("file", "axis_angle", "rotation_6d"),
    "train.logger": ("none", "tensorboard", "wandb"),
    "train.select_metric": ("success", "return"),
}
POSITIVE = (
    "data.collect_episodes", "data.collect_image_size", "data.n_obs_steps", "data.horizon", "data.n_action_steps", "policy.mlp.hidden_dim",
    "policy.mlp.num_layers", "policy.unet.kernel_size", "policy.unet.n_groups", "policy.diffusion.num_train_timesteps",
    "policy.diffusion.num_inference_steps", "policy.flow.num_inference_steps", "train.steps", "train.batch_size",
    "train.log_every", "train.val_every", "optim.lr", "optim.ap.refresh_every", "optim.ns_steps", "eval.episodes",
    "eval.batch_episodes",
    "eval.max_steps", "data.norm_range_floor", "policy.flow.beta_a", "policy.flow.beta_b",
    "policy.resmlp.hidden_dim", "policy.resmlp.num_blocks", "policy.resmlp.expansion", "policy.resmlp.step_embed_dim",
    "policy.encoder.width", "policy.encoder.keypoints", "policy.encoder.feature_dim",
)
NON_NEGATIVE = (
    "data.collect_noise", "optim.weight_decay", "optim.eps", "optim.ap.damping", "optim.ap.eps", "train.warmup_steps",
    "train.grad_clip", "train.checkpoint_every", "eval.workers", "eval.seed_start", "train.threads", "optim.momentum",
    "policy.encoder.crop",
)
UNIT_INTERVAL = ("optim.ap.ema_decay", "train.ema_max_decay")


# Keys an optimizer never reads: configs that differ only in these train the same run (a sweep runs such cells
# once). The `optim.ap` block only matters with AP; torch's AdamW has no Muon settings.
_MUON_KEYS = ("optim.momentum", "optim.nesterov", "optim.ns_steps", "optim.adjust_lr", "optim.matrix_layers")


def applies_to_optimizer(optim_name: str, key: str) -> bool:
    """Whether the dotted config `key` can change a run trained with optimizer `optim_name`."""
    if key.startswith("optim.ap."):
        return optim_name in AP_OPTIMIZERS
    return not (key in _MUON_KEYS and optim_name == "adam")


def effective_config(config: Config) -> dict[str, Any]:
    """The flattened config without the keys its optimizer never reads: equal for two configs that train alike."""
    return {k: v for k, v in _flatten(config.to_dict()).items() if applies_to_optimizer(config.optim.name, k)}


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- `key=value` overrides (values parsed as YAML), then validated."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise UserError(f"config file {path} must hold a mapping at the top level")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects key=value, got {item!r}")
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: {part!r} is not a section")
        node[parts[-1]] = parsed
    config = _build(Config, raw, "")
    validate(config)
    return config


def config_from_dict(raw: dict[str, Any]) -> Config:
    config = _build(Config, raw, "")
    validate(config)
    return config


def validate(config: Config) -> None:
    flat = _flatten(config.to_dict())
    for key, allowed in CHOICES.items():
        if key == "data.task" and flat["data.expert"]:
            continue  # a Gymnasium id, checked when the dataset is collected
        if flat[key] not in allowed:
            raise UserError(f"{key} must be one of {', '.join(allowed)}; got {flat[key]!r}")
    for key in POSITIVE:
        if not flat[key] > 0:
            raise UserError(f"{key} must be > 0; got {flat[key]!r}")
    for key in NON_NEGATIVE:
        if not flat[key] >= 0:
            raise UserError(f"{key} must be >= 0; got {flat[key]!r}")
    for key in UNIT_INTERVAL:
        if not 0 <= flat[key] < 1:
            raise UserError(f"{key} must be in [0, 1); got {flat[key]!r}")
    for key, value in flat.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{key} must be finite; got {value!r}")
    d = config.data
    if d.n_obs_steps + d.n_action_steps - 1 > d.horizon:
        raise UserError(
            f"data.horizon ({d.horizon}) must cover n_obs_steps + n_action_steps - 1 "
            f"({d.n_obs_steps + d.n_action_steps - 1}) actions"
        )
    if len(set(d.obs_keys)) != len(d.obs_keys):
        raise UserError(f"data.obs_keys names a key twice: {d.obs_keys}")
    if config.policy.type == "bc" and config.policy.backbone != "resmlp":
        raise UserError(f"policy.type bc needs policy.backbone resmlp (a deterministic head on the observations); "
                        f"got {config.policy.backbone!r}")
    if config.policy.backbone == "unet":
        if any(c % config.policy.unet.n_groups for c in config.policy.unet.down_dims):
            raise UserError("policy.unet.down_dims must be divisible by policy.unet.n_groups")
        if d.horizon % (2 ** (len(config.policy.unet.down_dims) - 1)):
            raise UserError("data.horizon must be divisible by 2^(len(policy.unet.down_dims) - 1) for the UNet")
    ap = config.optim.ap
    if ap.bias_augment and config.policy.backbone == "unet" and config.optim.name in AP_OPTIMIZERS \
            and (ap.conv_mode == "channel" or len(config.policy.unet.down_dims) > 1):
        raise UserError("optim.ap.bias_augment is defined for Linear layers and full-mode Conv1d only: channel "
                        "mode (always the case for the UNet's ConvTranspose1d upsampling) shares one S across "
                        "kernel taps, and a bias is not a tap; use it with policy.backbone: mlp")
    if not all(0 <= b < 1 for b in config.optim.betas):
        raise UserError(f"optim.betas must lie in [0, 1); got {config.optim.betas}")
    _validate_rollouts(config)


def _validate_rollouts(config: Config) -> None:
    """In-training rollout and perturbation keys (see TrainConfig / EvalConfig)."""
    t, e = config.train, config.eval
    for key, value in (("train.eval_every", t.eval_every), ("train.eval_seed_start", t.eval_seed_start),
                       ("eval.action_noise", e.action_noise), ("eval.obs_noise", e.obs_noise),
                       ("eval.push", e.push), ("eval.push_magnitude", e.push_magnitude)):
        if not value >= 0:
            raise UserError(f"{key} must be >= 0; got {value!r}")
    if not t.eval_episodes > 0:
        raise UserError(f"train.eval_episodes must be > 0; got {t.eval_episodes!r}")
    if e.push > 1:
        raise UserError(f"eval.push is a probability in [0, 1]; got {e.push!r}")
    if t.eval_every and t.eval_every % t.log_every:
        raise UserError(f"train.eval_every ({t.eval_every}) must be a multiple of train.log_every ({t.log_every}): "
                        "its success is logged in that step's metrics record")
    if t.eval_every and t.eval_seed_start < e.seed_start + e.episodes and e.seed_start < t.eval_seed_start + \
            t.eval_episodes:
        raise UserError(f"selection seeds train.eval_seed_start.. ({t.eval_seed_start}+{t.eval_episodes}) overlap the "
                        f"report seeds eval.seed_start.. ({e.seed_start}+{e.episodes}); they must be disjoint")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise UserError(f"unknown config key '{prefix}{unknown[0]}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key} must be a list; got {value!r}")
        args = typing.get_args(hint)
        if origin is tuple and len(value) != len(args):
            raise UserError(f"{key} must have {len(args)} entries; got {value!r}")
        items = [_coerce(args[i] if origin is tuple else args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-4" as a string
        except ValueError:
            pass
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise UserError(f"{key} must be {hint.__name__}; got {value!r}")
    return value


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
