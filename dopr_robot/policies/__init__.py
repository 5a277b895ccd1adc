"""Action-chunking policies: diffusion and flow matching over MLP, residual-MLP or ConditionalUnet1D backbones, and
deterministic behaviour cloning (L2 on the chunk) over a residual MLP."""

from __future__ import annotations

from torch import nn

from dopr_robot.policies.base import ActionChunkPolicy
from dopr_robot.policies.bc import BCPolicy
from dopr_robot.policies.diffusion import DiffusionPolicy
from dopr_robot.policies.encoder import ObservationEncoder, build_encoder
from dopr_robot.policies.flow import FlowPolicy
from dopr_robot.policies.mlp import MLPDenoiser
from dopr_robot.policies.normalizer import RangeNormalizer
from dopr_robot.policies.resmlp import ResMLPDenoiser, ResMLPHead
from dopr_robot.policies.unet1d import ConditionalUnet1D

__all__ = ["ActionChunkPolicy", "BCPolicy", "DiffusionPolicy", "FlowPolicy", "ObservationEncoder", "RangeNormalizer",
           "build_policy"]


def build_policy(cfg, obs_dim: int, action_dim: int, n_obs_steps: int, horizon: int,
                 obs_normalizer: RangeNormalizer, action_normalizer: RangeNormalizer,
                 image_shapes: dict[str, tuple[int, int, int]] | None = None) -> ActionChunkPolicy:
    """`cfg` is a `dopr_robot.config.PolicyConfig` (any object with the same attributes). `obs_dim` is the
    low-dim observation width; with `image_shapes` ({image key: (H, W, 3)}) the policy gets an image encoder
    (`cfg.encoder`) whose features join the low-dim ones in the global condition."""
    encoder = build_encoder(cfg.encoder, image_shapes) if image_shapes else None
    cond_dim = (obs_dim + (encoder.output_dim if encoder is not None else 0)) * n_obs_steps
    common = dict(obs_normalizer=obs_normalizer, action_normalizer=action_normalizer, n_obs_steps=n_obs_steps,
                  horizon=horizon, action_dim=action_dim, obs_encoder=encoder)
    r = cfg.resmlp
    if cfg.type == "bc":  # config validation admits bc with the resmlp backbone only
        return BCPolicy(ResMLPHead(action_dim, horizon, cond_dim, r.hidden_dim, r.num_blocks, r.expansion), **common)
    if cfg.backbone == "resmlp":
        model: nn.Module = ResMLPDenoiser(action_dim, horizon, cond_dim, r.hidden_dim, r.num_blocks, r.expansion,
                                          r.step_embed_dim)
    elif cfg.backbone == "mlp":
        model = MLPDenoiser(action_dim, horizon, cond_dim, cfg.mlp.hidden_dim, cfg.mlp.num_layers,
                            cfg.mlp.step_embed_dim)
    else:
        model = ConditionalUnet1D(action_dim, cond_dim, list(cfg.unet.down_dims), cfg.unet.kernel_size,
                                  cfg.unet.n_groups, cfg.unet.step_embed_dim)
    if cfg.type == "diffusion":
        d = cfg.diffusion
        return DiffusionPolicy(model, num_train_timesteps=d.num_train_timesteps,
                               num_inference_steps=d.num_inference_steps, beta_schedule=d.beta_schedule,
                               prediction_type=d.prediction_type, clip_sample=d.clip_sample, **common)
    f = cfg.flow
    return FlowPolicy(model, num_inference_steps=f.num_inference_steps, integrator=f.integrator,
                      time_distribution=f.time_distribution, beta_a=f.beta_a, beta_b=f.beta_b, **common)
