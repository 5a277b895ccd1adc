"""Time per training step (forward + backward + clip + optimizer step) of each optimizer as a ratio to AdamW.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/optim_step.py [--threads 1] [--repeats 3] [--steps 7]
                                                                 [--device cpu|cuda] [--only MODEL] [--full]
                                                                 [--image-batch N]
                                                                 [--profile VARIANT] [--variants a,b]
Interleaved A/B: in every repeat each optimizer's steps alternate with AdamW's (same policy, same batch), its ratio
to AdamW is taken within that repeat, and the table shows the median ratio over repeats (and median ms/step).
Policies: the default Lift policy (diffusion, MLP denoiser, batch 256) and the full-size ConditionalUnet1D
(down_dims 256/512/1024, kernel 5, batch 64). The step is the trainer's: gradients clipped by
`dopr_robot.optim.clip_grad_norm_` (which measures DoPr's in-backward layers by their true gradient).
Image policies (`--only lift_image|can_image`, not in the default run): the policy of that config built by
`build_policy` with its ResNet-18 encoder per camera (two 84x84 cameras, uint8 frames, random crops) and a
ConditionalUnet1D denoiser (lift_image.yaml's own denoiser is the MLP; here the default full-size UNet).
"""

from __future__ import annotations

import argparse
import gc
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from dopr_robot.config import PolicyConfig, UNetConfig, load_config
from dopr_robot.datasets.images import IMAGE_SUFFIX
from dopr_robot.optim import DoPr, OptimConfig, build_optimizer, clip_grad_norm_
from dopr_robot.optim.config import APConfig
from dopr_robot.policies import RangeNormalizer, build_policy

OBS_DIM, ACTION_DIM, N_OBS, HORIZON = 19, 7, 2, 16
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# image policies: (config file, overrides); their low-dim keys are the robot's proprioception (eef_pos 3 +
# eef_quat 4 + gripper_qpos 2), their images (collect_image_size)^2 x 3 per camera
IMAGE_MODELS = {"lift_image": ("lift_image.yaml", ["policy.backbone=unet"]), "can_image": ("can_image.yaml", [])}
PROPRIO_DIM = 9
REFRESH10 = dict(refresh_every=10, ema_decay=0.9)

# (name, optimizer config, extra DoPr keyword arguments); the first row is the baseline
VARIANTS = [
    ("adamw", OptimConfig(name="adam"), {}),
    ("adamw (not fused)", OptimConfig(name="adam"), {"fused": False}),
    ("muon", OptimConfig(name="muon"), {}),
    ("dopr-adam", OptimConfig(name="dopr"), {}),
    ("dopr-adam primal only", OptimConfig(name="dopr"), {"path": "primal"}),
    ("dopr-adam refresh10", OptimConfig(name="dopr", ap=APConfig(**REFRESH10)), {}),
    ("dopr-muon", OptimConfig(name="dopr-muon"), {}),
    ("signum", OptimConfig(name="signum"), {}),
    ("dopr-signum", OptimConfig(name="dopr-signum"), {}),
]
FULL_VARIANTS = [
    ("dopr-adam full", OptimConfig(name="dopr", ap=APConfig(conv_mode="full")), {}),
    ("dopr-adam full refresh10", OptimConfig(name="dopr", ap=APConfig(conv_mode="full", **REFRESH10)), {}),
]


def model_shapes(model: str):
    """(policy config, low-dim obs width, n_obs_steps, horizon, {image key: (H, W, 3)}) of a benchmarked model."""
    if model not in IMAGE_MODELS:
        cfg = PolicyConfig(backbone=model, unet=UNetConfig(down_dims=[256, 512, 1024], kernel_size=5))
        return cfg, OBS_DIM, N_OBS, HORIZON, {}
    name, overrides = IMAGE_MODELS[model]
    config = load_config(CONFIGS / name, overrides)
    d = config.data
    size = d.collect_image_size
    images = {k: (size, size, 3) for k in d.obs_keys if k.endswith(IMAGE_SUFFIX)}
    return config.policy, PROPRIO_DIM, d.n_obs_steps, d.horizon, images


def make_policy(model: str, device: torch.device):
    cfg, obs_dim, n_obs, horizon, images = model_shapes(model)
    ident = lambda d: RangeNormalizer(-torch.ones(d), torch.ones(d), 1.0)
    return build_policy(cfg, obs_dim, ACTION_DIM, n_obs, horizon, ident(obs_dim), ident(ACTION_DIM),
                        image_shapes=images or None).to(device)


def make_optimizer(policy, cfg: OptimConfig, extra: dict):
    if cfg.name == "adam" and extra.get("fused") is False:
        return torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, foreach=True)
    optimizer = build_optimizer(policy, cfg, io_layers=policy.io_layers())
    if isinstance(optimizer, DoPr) and "path" in extra:
        optimizer.path = extra["path"]
    return optimizer


class Bench:
    """One policy + optimizer + fixed batch; `run(k)` times k training steps."""

    def __init__(self, backbone: str, cfg: OptimConfig, extra: dict, batch: int, device: torch.device):
        torch.manual_seed(0)
        self.device = device
        self.policy = make_policy(backbone, device)
        self.optimizer = make_optimizer(self.policy, cfg, extra)
        self.generator = torch.Generator(device=device).manual_seed(0)
        _, obs_dim, n_obs, horizon, images = model_shapes(backbone)
        self.obs = torch.randn(batch, n_obs, obs_dim, device=device, generator=self.generator)
        if images:  # the trainer's dict batch: low-dim floats and uint8 frames per camera
            self.obs = {"low_dim": self.obs} | {
                k: torch.randint(0, 256, (batch, n_obs, *shape), dtype=torch.uint8, device=device,
                                 generator=self.generator) for k, shape in images.items()}
        self.actions = torch.randn(batch, horizon, ACTION_DIM, device=device, generator=self.generator).clamp(-1, 1)

    def step(self) -> None:
        loss = self.policy.compute_loss(self.obs, self.actions, self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm_(self.optimizer, self.policy.parameters(), 10.0)
        self.optimizer.step()

    def run(self, steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            self.step()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return times


def benchmark(backbone: str, batch: int, variants, args, device) -> None:
    """A/B interleaved: per repeat, one AdamW run and, in turn, each other optimizer; their steps alternate
    (AdamW, X, AdamW, X, ...) so both see the same machine load, and the repeat's ratio is median(X) /
    median(AdamW) over those alternating steps."""
    params = sum(p.numel() for p in make_policy(backbone, device).parameters())
    print(f"\n{backbone} policy ({params / 1e6:.1f}M parameters), batch {batch}, {args.repeats} repeats x "
          f"{args.steps} alternating steps per optimizer pair (after {args.warmup} warm-up)", flush=True)
    base_name, base_cfg, base_extra = variants[0]
    ms = {name: [] for name, _, _ in variants}
    ratios = {name: [] for name, _, _ in variants}
    paths = {}
    for repeat in range(args.repeats):
        base = Bench(backbone, base_cfg, base_extra, batch, device)
        base.run(args.warmup)
        for name, cfg, extra in variants[1:]:
            bench = Bench(backbone, cfg, extra, batch, device)
            bench.run(args.warmup)
            a, b = [], []
            for _ in range(args.steps):
                a += base.run(1)
                b += bench.run(1)
            ms[base_name].append(statistics.median(a) * 1000)
            ms[name].append(statistics.median(b) * 1000)
            ratios[name].append(statistics.median(b) / statistics.median(a))
            print(f"    repeat {repeat + 1}: {name} {ratios[name][-1]:.2f}x", file=sys.stderr, flush=True)
            if isinstance(bench.optimizer, DoPr) and bench.optimizer.ap:
                h = bench.optimizer.health()
                paths[name] = ", ".join(f"{h[f'ap_layers_{p}']} {p}" for p in ("primal", "dual", "backward"))
                if repeat == 0:
                    print_conv_paths(name, bench.optimizer)
            del bench
            gc.collect()  # the hooks make optimizer <-> module cycles: free the model before the next one
        del base
        gc.collect()
    ratios[base_name] = [1.0]
    print(f"  {'optimizer':<26} {'ms/step':>9} {'/ AdamW':>8}   per repeat        AP paths (layers)")
    for name, _, _ in variants:
        each = " ".join(f"{r:.2f}" for r in ratios[name]) if name != base_name else ""
        print(f"  {name:<26} {statistics.median(ms[name]):9.1f} {statistics.median(ratios[name]):7.2f}x   "
              f"{each:<17} {paths.get(name, '')}", flush=True)


def print_conv_paths(name: str, optimizer: DoPr) -> None:
    """The image encoder's Conv2d AP layers by the path they took last step (names below the camera, so both
    cameras' layers of one name count together)."""
    convs = [(re.sub(r"^obs_encoder\.cameras\.[^.]+\.(trunk\.)?", "", layer.name),
              optimizer.last_paths.get(layer.name, "none"))
             for layer in optimizer.layers if isinstance(layer.module, torch.nn.Conv2d)]
    if convs:
        by_path = {p: sorted({n for n, q in convs if q == p}) for p in sorted({q for _, q in convs})}
        print(f"    {name}: {len(convs)} Conv2d AP layers; " + "; ".join(
            f"{sum(q == p for _, q in convs)} {p}: {' '.join(ns)}" for p, ns in by_path.items()), flush=True)


def profile(backbone: str, batch: int, name: str, variants, args, device) -> None:
    cfg, extra = next((c, e) for n, c, e in variants if n == name)
    bench = Bench(backbone, cfg, extra, batch, device)
    bench.run(args.warmup)
    with torch.profiler.profile() as prof:
        bench.run(args.steps)
    print(f"\nprofile of {name} on {backbone}, {args.steps} steps")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=7, help="alternating timed steps per pair and repeat")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--mlp-batch", type=int, default=256)
    parser.add_argument("--unet-batch", type=int, default=64, help="full-size UNet batch (256 on a GPU)")
    parser.add_argument("--image-batch", type=int, default=0, help="image policies' batch (0: the config's)")
    parser.add_argument("--only", choices=["mlp", "unet", *IMAGE_MODELS], default=None,
                        help="one policy; the image policies run only when named here")
    parser.add_argument("--full", action="store_true", help="also conv_mode full on the UNet (slow)")
    parser.add_argument("--profile", metavar="VARIANT", default=None, help="profile one optimizer instead")
    parser.add_argument("--variants", default=None, help="comma-separated optimizer names (AdamW always runs)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    models = [("mlp", args.mlp_batch), ("unet", args.unet_batch)]
    if args.only in IMAGE_MODELS:
        name, overrides = IMAGE_MODELS[args.only]
        models = [(args.only, args.image_batch or load_config(CONFIGS / name, overrides).train.batch_size)]
    for backbone, batch in models:
        if args.only and backbone != args.only:
            continue
        variants = VARIANTS + (FULL_VARIANTS if backbone == "unet" and args.full else [])
        if args.variants:
            keep = set(args.variants.split(","))
            variants = [v for i, v in enumerate(variants) if i == 0 or v[0] in keep]
        if args.profile:
            profile(backbone, batch, args.profile, variants, args, device)
        else:
            benchmark(backbone, batch, variants, args, device)


if __name__ == "__main__":
    main()
