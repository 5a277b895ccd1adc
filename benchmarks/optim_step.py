"""Time per training step (forward + backward + optimizer step) for AdamW, Muon, DoPr-Adam and DoPr-Muon.

Run:  .venv/bin/python benchmarks/optim_step.py [--device cpu|cuda] [--steps 20] [--unet-batch 64]
Each optimizer is timed in the same process on the same policy and batch, and reported as a ratio to AdamW
(median step time over --steps timed steps after 3 warm-up steps). Policies: the default Lift policy (diffusion,
MLP denoiser) and the full-size ConditionalUnet1D (down_dims 256/512/1024, kernel 5).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dopr_robot.config import PolicyConfig, UNetConfig
from dopr_robot.optim import OptimConfig, build_optimizer
from dopr_robot.optim.config import APConfig
from dopr_robot.policies import RangeNormalizer, build_policy

OBS_DIM, ACTION_DIM, N_OBS, HORIZON = 19, 7, 2, 16

VARIANTS = [
    ("adamw", OptimConfig(name="adam")),
    ("muon", OptimConfig(name="muon")),
    ("dopr-adam channel", OptimConfig(name="dopr")),
    ("dopr-adam channel refresh10", OptimConfig(name="dopr", ap=APConfig(refresh_every=10, ema_decay=0.9))),
    ("dopr-adam full", OptimConfig(name="dopr", ap=APConfig(conv_mode="full"))),
    ("dopr-adam full refresh10", OptimConfig(name="dopr", ap=APConfig(conv_mode="full", refresh_every=10,
                                                                      ema_decay=0.9))),
    ("dopr-muon channel", OptimConfig(name="dopr-muon")),
    ("dopr-muon channel refresh10", OptimConfig(name="dopr-muon", ap=APConfig(refresh_every=10, ema_decay=0.9))),
]


def make_policy(backbone: str, device: torch.device):
    cfg = PolicyConfig(backbone=backbone, unet=UNetConfig(down_dims=[256, 512, 1024], kernel_size=5))
    ident = lambda d: RangeNormalizer(-torch.ones(d), torch.ones(d), 1.0)
    return build_policy(cfg, OBS_DIM, ACTION_DIM, N_OBS, HORIZON, ident(OBS_DIM), ident(ACTION_DIM)).to(device)


def time_steps(backbone: str, optim_cfg: OptimConfig, batch: int, steps: int, device: torch.device) -> float:
    torch.manual_seed(0)
    policy = make_policy(backbone, device)
    optimizer = build_optimizer(policy, optim_cfg)
    g = torch.Generator(device=device).manual_seed(0)
    obs = torch.randn(batch, N_OBS, OBS_DIM, device=device, generator=g)
    actions = torch.randn(batch, HORIZON, ACTION_DIM, device=device, generator=g).clamp(-1, 1)
    times = []
    for i in range(steps + 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = policy.compute_loss(obs, actions, g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--mlp-batch", type=int, default=256)
    parser.add_argument("--unet-batch", type=int, default=64, help="full-size UNet batch (256 on a GPU)")
    parser.add_argument("--only", choices=["mlp", "unet"], default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    for backbone, batch in (("mlp", args.mlp_batch), ("unet", args.unet_batch)):
        if args.only and backbone != args.only:
            continue
        params = sum(p.numel() for p in make_policy(backbone, device).parameters())
        print(f"\n{backbone} denoiser ({params / 1e6:.1f}M parameters), batch {batch}")
        base = None
        for name, cfg in VARIANTS:
            if backbone == "mlp" and "full" in name:
                continue  # no convolutions in the MLP: identical to channel mode
            seconds = time_steps(backbone, cfg, batch, args.steps, device)
            base = base or seconds
            print(f"  {name:<30} {seconds * 1000:9.1f} ms/step   {seconds / base:5.2f}x AdamW")


if __name__ == "__main__":
    main()
