"""Denoising diffusion over action chunks (Chi et al., Diffusion Policy): trained with diffusers' DDPMScheduler
(noise a clean chunk to a random step, regress the noise), sampled with DDIMScheduler in fewer steps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dopr_robot.policies.base import ActionChunkPolicy, draw


class DiffusionPolicy(ActionChunkPolicy):
    def __init__(self, *args, num_train_timesteps: int = 100, num_inference_steps: int = 10,
                 beta_schedule: str = "squaredcos_cap_v2", prediction_type: str = "epsilon",
                 clip_sample: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        from diffusers import DDIMScheduler, DDPMScheduler  # here, so flow policies never pay diffusers' import

        # One noise schedule for both. Not `DDIMScheduler.from_config(ddpm.config)`, which gives the same scheduler
        # but first imports every scheduler diffusers lists as compatible (scipy.stats among them): ~0.5 s of
        # every evaluation worker's start-up.
        schedule = dict(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, clip_sample=clip_sample,
                        prediction_type=prediction_type)
        self.train_scheduler = DDPMScheduler(**schedule)
        self.sample_scheduler = DDIMScheduler(**schedule)
        self.num_inference_steps = num_inference_steps

    def _loss(self, actions, cond, generator, rows=None):
        B = actions.shape[0]
        noise = draw(torch.randn, actions.shape, generator=generator, device=actions.device)
        steps = draw(torch.randint, 0, self.train_scheduler.config.num_train_timesteps, (B,), generator=generator,
                     device=actions.device)
        if rows is not None:
            actions, cond, noise, steps = actions[rows], cond[rows], noise[rows], steps[rows]
        noisy = self.train_scheduler.add_noise(actions, noise, steps)
        pred = self.model(noisy, steps, cond)
        target = noise if self.train_scheduler.config.prediction_type == "epsilon" else actions
        return F.mse_loss(pred, target)

    def _sample(self, shape, cond, generator):
        scheduler = self.sample_scheduler
        scheduler.set_timesteps(self.num_inference_steps)
        x = draw(torch.randn, shape, generator=generator, device=cond.device)
        for t in scheduler.timesteps:
            step = torch.full((shape[0],), int(t), device=cond.device, dtype=torch.long)
            x = scheduler.step(self.model(x, step, cond), t, x).prev_sample
        return x
