"""policy.backbone: resmlp and policy.type: bc: shapes, io_layers, training on real scripted Lift demos, the
checkpoint round trip and a closed-loop episode."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from dopr_robot.checkpoint import load_policy, save_checkpoint
from dopr_robot.config import PolicyConfig, ResMLPConfig, load_config
from dopr_robot.errors import UserError
from dopr_robot.evaluation import evaluate
from dopr_robot.policies import BCPolicy, RangeNormalizer, build_policy
from dopr_robot.policies.resmlp import ResMLPBlock
from dopr_robot.training import train

TINY_RESMLP = ["policy.backbone=resmlp", "policy.resmlp.hidden_dim=32", "policy.resmlp.num_blocks=2",
               "policy.resmlp.expansion=2", "policy.resmlp.step_embed_dim=16", "train.batch_size=32",
               "train.warmup_steps=2", "train.threads=1"]


def _identity(d):
    return RangeNormalizer(-torch.ones(d), torch.ones(d), 1.0)


def _policy(kind):
    torch.manual_seed(0)
    cfg = PolicyConfig(type=kind, backbone="resmlp", resmlp=ResMLPConfig(hidden_dim=32, num_blocks=2, expansion=2,
                                                                         step_embed_dim=16))
    return build_policy(cfg, 5, 2, 2, 8, _identity(5), _identity(2))


@pytest.mark.parametrize("kind", ["diffusion", "flow", "bc"])
def test_resmlp_policies_map_an_observation_window_to_an_action_chunk(kind):
    policy = _policy(kind).eval()
    obs = torch.rand(7, 2, 5) * 2 - 1
    chunk = policy.predict_action(obs, torch.Generator().manual_seed(0))
    assert chunk.shape == (7, 8, 2) and torch.isfinite(chunk).all()
    loss = policy.compute_loss(obs, torch.rand(7, 8, 2) * 2 - 1, torch.Generator().manual_seed(1))
    assert loss.ndim == 0 and loss.item() > 0
    # two residual blocks with LayerNorm, each with an expansion-2 inner layer
    blocks = [m for m in policy.modules() if isinstance(m, ResMLPBlock)]
    assert len(blocks) == 2 and all(b.fc1.out_features == 64 and isinstance(b.norm, nn.LayerNorm) for b in blocks)
    # io_layers: the layers reading raw inputs and the final projection, never a hidden block layer
    io = policy.io_layers()
    hidden = {id(m) for b in blocks for m in (b.fc1, b.fc2)}
    assert all(isinstance(m, nn.Linear) for m in io) and not hidden & {id(m) for m in io}
    assert io[-1].out_features == 8 * 2
    assert len(io) == (2 if kind == "bc" else 3)  # + the time embedding's Linear for diffusion / flow


def test_bc_is_deterministic_and_its_loss_is_the_l2_on_the_normalized_chunk():
    policy = _policy("bc").eval()
    assert isinstance(policy, BCPolicy)
    obs, actions = torch.rand(4, 2, 5) * 2 - 1, torch.rand(4, 8, 2) * 2 - 1
    a = policy.predict_action(obs, torch.Generator().manual_seed(0))
    b = policy.predict_action(obs, torch.Generator().manual_seed(99))
    assert torch.equal(a, b)
    with torch.no_grad():
        loss = policy.compute_loss(obs, actions, torch.Generator().manual_seed(5))
    torch.testing.assert_close(loss, ((a - actions) ** 2).mean())  # identity normalizers: raw == normalized


def test_bc_needs_the_resmlp_backbone():
    with pytest.raises(UserError, match="bc needs policy.backbone resmlp"):
        load_config(None, ["policy.type=bc", "policy.backbone=unet"])


def test_bc_training_on_real_demos_lowers_the_loss_and_round_trips_through_the_checkpoint(tmp_path, lift_demos):
    cfg = load_config(None, [f"data.path={lift_demos}", "policy.type=bc", *TINY_RESMLP, "train.steps=60",
                             "train.log_every=10", "train.val_every=30"])
    run = train(cfg, tmp_path / "run", progress=False)
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < 0.5 * losses[0], losses

    policy, meta = load_policy(run / "checkpoints" / "final.json")
    assert isinstance(policy, BCPolicy) and meta["config"]["policy"]["type"] == "bc"
    save_checkpoint(tmp_path / "copy", "again", policy, {k: v for k, v in meta.items() if k != "normalizer"})
    again, _ = load_policy(tmp_path / "copy" / "again.json")
    obs = torch.randn(3, policy.n_obs_steps, meta["obs_dim"])
    torch.testing.assert_close(again.predict_action(obs), policy.predict_action(obs), rtol=0, atol=0)

    report = evaluate(run, episodes=1, seed_start=700, max_steps=16, workers=1, progress=False)
    assert report["per_episode"][0]["steps"] == 16 and np.isfinite(report["per_episode"][0]["return"])


def test_diffusion_over_resmlp_trains_with_dopr(tmp_path, lift_demos):
    cfg = load_config(None, [f"data.path={lift_demos}", *TINY_RESMLP, "optim.name=dopr", "train.steps=6",
                             "train.log_every=3", "train.val_every=6"])
    records = [json.loads(l) for l in (train(cfg, tmp_path / "run", progress=False) / "metrics.jsonl")
               .read_text().splitlines()]
    assert np.isfinite(records[-1]["loss"]) and np.isfinite(records[-1]["val_loss"])
    assert records[-1]["ap_fallbacks"] == 0
