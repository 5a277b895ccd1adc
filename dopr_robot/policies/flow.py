"""Conditional flow matching over action chunks (rectified-flow / pi0 style).

x_t = (1 - t) * noise + t * actions, t in [0, 1]; the network regresses the velocity (actions - noise).
Sampling integrates dx/dt = v(x_t, t) from noise at t = 0 to t = 1 with Euler or midpoint steps.
Training times are drawn from U(0, 1) or Beta(a, b) (Beta(1.5, 1) leans toward the data end, t -> 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dopr_robot.policies.base import ActionChunkPolicy, draw, draw_device

TIME_SCALE = 100.0  # the backbones embed diffusion-step-sized numbers; flow time in [0, 1] is scaled to [0, 100]


class FlowPolicy(ActionChunkPolicy):
    def __init__(self, *args, num_inference_steps: int = 10, integrator: str = "euler",
                 time_distribution: str = "uniform", beta_a: float = 1.5, beta_b: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_inference_steps = num_inference_steps
        self.integrator = integrator
        self.time_distribution = time_distribution
        self.beta_a, self.beta_b = beta_a, beta_b

    def _velocity(self, x, t, cond):
        return self.model(x, t * TIME_SCALE, cond)

    def _draw_time(self, n: int, device, generator) -> torch.Tensor:
        u = draw(torch.rand, n, generator=generator, device=device)  # drawn for Beta too: one generator stream
        if self.time_distribution == "uniform":
            return u
        # Beta(a, b) by inverse transform would need its quantile; draw it from two Gammas instead, driven by
        # normal draws from the same generator (torch's _standard_gamma takes no generator).
        at = draw_device(generator, device)
        g1 = _gamma(self.beta_a, n, at, generator)
        g2 = _gamma(self.beta_b, n, at, generator)
        return (g1 / (g1 + g2)).to(device)

    def _loss(self, actions, cond, generator, rows=None):
        noise = draw(torch.randn, actions.shape, generator=generator, device=actions.device)
        t = self._draw_time(actions.shape[0], actions.device, generator)
        if rows is not None:
            actions, cond, noise, t = actions[rows], cond[rows], noise[rows], t[rows]
        x_t = (1 - t)[:, None, None] * noise + t[:, None, None] * actions
        return F.mse_loss(self._velocity(x_t, t, cond), actions - noise)

    def _sample(self, shape, cond, generator):
        x = draw(torch.randn, shape, generator=generator, device=cond.device)
        dt = 1.0 / self.num_inference_steps
        for i in range(self.num_inference_steps):
            t = torch.full((shape[0],), i * dt, device=cond.device)
            v = self._velocity(x, t, cond)
            if self.integrator == "midpoint":
                v = self._velocity(x + 0.5 * dt * v, t + 0.5 * dt, cond)
            x = x + dt * v
        return x


def _gamma(shape_k: float, n: int, device, generator) -> torch.Tensor:
    """Gamma(k, 1) samples via Marsaglia-Tsang with a fixed number of rejection rounds, from `generator`."""
    boost = shape_k < 1
    k = shape_k + 1 if boost else shape_k
    d = k - 1.0 / 3.0
    c = 1.0 / (9.0 * d) ** 0.5
    out = torch.full((n,), float("nan"), device=device)
    for _ in range(16):  # acceptance rate > 95% per round: 16 rounds leave nothing in practice
        z = torch.randn(n, generator=generator, device=device)
        u = torch.rand(n, generator=generator, device=device)
        v = (1 + c * z) ** 3
        ok = (v > 0) & (torch.log(u.clamp_min(1e-30)) < 0.5 * z * z + d - d * v + d * torch.log(v.clamp_min(1e-30)))
        out = torch.where(torch.isnan(out) & ok, d * v, out)
    out = torch.nan_to_num(out, nan=d)  # never in practice; keeps the batch finite
    if boost:
        out = out * torch.rand(n, generator=generator, device=device) ** (1.0 / shape_k)
    return out
