"""Policies draw their noise on the generator's device, so a CPU generator gives one validation set and one
rollout noise stream whichever device the policy runs on."""

import pytest
import torch

from dopr_robot.config import DiffusionConfig, FlowConfig, PolicyConfig
from dopr_robot.policies import RangeNormalizer, build_policy


def _policy(kind: str):
    ident = lambda d: RangeNormalizer(-torch.ones(d), torch.ones(d), 1.0)
    torch.manual_seed(0)
    return build_policy(PolicyConfig(type=kind, flow=FlowConfig(time_distribution="beta")), 5, 2, 2, 8,
                        ident(5), ident(2)).eval()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_a_cpu_generator_gives_the_same_loss_and_samples_on_cuda(kind):
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = _policy(kind)
    gpu = _policy(kind).cuda()
    obs, actions = torch.rand(64, 2, 5) * 2 - 1, torch.rand(64, 8, 2) * 2 - 1
    with torch.no_grad():
        loss_cpu = cpu.compute_loss(obs, actions, torch.Generator().manual_seed(3)).item()
        loss_gpu = gpu.compute_loss(obs.cuda(), actions.cuda(), torch.Generator().manual_seed(3)).item()
    assert loss_gpu == pytest.approx(loss_cpu, rel=1e-4)
    sample_cpu = cpu.predict_action(obs, torch.Generator().manual_seed(4))
    sample_gpu = gpu.predict_action(obs.cuda(), torch.Generator().manual_seed(4)).cpu()
    torch.testing.assert_close(sample_gpu, sample_cpu, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_the_same_generator_seed_gives_the_same_loss_and_samples(kind):
    policy = _policy(kind)
    obs, actions = torch.rand(16, 2, 5) * 2 - 1, torch.rand(16, 8, 2) * 2 - 1
    with torch.no_grad():
        losses = [policy.compute_loss(obs, actions, torch.Generator().manual_seed(s)).item() for s in (3, 3, 5)]
    assert losses[0] == losses[1] != losses[2]
    a, b = (policy.predict_action(obs, torch.Generator().manual_seed(4)) for _ in range(2))
    assert torch.equal(a, b) and a.shape == (16, 8, 2)


def test_diffusion_samples_with_the_ddim_scheduler_of_its_training_schedule():
    """The sampler is built directly (not with `from_config`, which imports every compatible scheduler); it must
    be the scheduler `DDIMScheduler.from_config(train_scheduler.config)` gives, down to every config entry."""
    from diffusers import DDIMScheduler

    for beta_schedule, prediction_type in [("squaredcos_cap_v2", "epsilon"), ("linear", "sample")]:
        policy = build_policy(PolicyConfig(type="diffusion", diffusion=DiffusionConfig(beta_schedule=beta_schedule,
                                                                                 prediction_type=prediction_type)),
                              5, 2, 2, 8, RangeNormalizer(-torch.ones(5), torch.ones(5), 1.0),
                              RangeNormalizer(-torch.ones(2), torch.ones(2), 1.0))
        expected = DDIMScheduler.from_config(policy.train_scheduler.config)
        assert dict(policy.sample_scheduler.config) == dict(expected.config)
        assert policy.sample_scheduler.config.prediction_type == prediction_type
        assert torch.equal(policy.sample_scheduler.alphas_cumprod, expected.alphas_cumprod)
