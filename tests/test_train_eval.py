"""Short real training runs and seeded closed-loop evaluation (small sizes, real robosuite and diffusers)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from dopr_robot.config import load_config
from dopr_robot.datasets.robomimic_hdf5 import RobomimicFile
from dopr_robot.evaluation import evaluate
from dopr_robot.training import train

TINY = ["policy.mlp.hidden_dim=64", "policy.mlp.num_layers=2", "train.batch_size=32", "train.log_every=5",
        "train.val_every=10", "train.warmup_steps=5", "train.steps=20"]
TINY_UNET = ["policy.backbone=unet", "policy.unet.down_dims=[16,32]", "policy.unet.step_embed_dim=16",
             "policy.unet.n_groups=4"]


def tiny_config(dataset, *extra):
    return load_config(None, [f"data.path={dataset}", *TINY, *extra])


def test_train_cli_writes_a_complete_run(tmp_path, lift_demos):
    run = tmp_path / "run"
    args = ["train", "--dataset", str(lift_demos), "--out", str(run), "--optim", "dopr"]
    for item in TINY:
        args += ["--set", item]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    assert all(np.isfinite(r["loss"]) and r["step_time_s"] > 0 for r in records)
    assert all("val_loss" in r for r in records if r["step"] in (10, 20))
    # DoPr health: ap_cond/... exists only for primal-path layers, which DoPr's flop-count choice skips here
    assert records[-1]["ap_fallbacks"] == 0 and any(k.startswith("ap_layers_") for k in records[-1])
    meta = json.loads((run / "checkpoints" / "final.json").read_text())
    assert meta["obs_dim"] == 19 and meta["action_dim"] == 7 and meta["env_args"]["env_name"] == "Lift"
    assert meta["config"]["optim"]["name"] == "dopr" and meta["step"] == 20
    weights = load_file(str(run / "checkpoints" / "final.safetensors"))
    assert torch.allclose(weights["obs_normalizer.scale"], torch.tensor(meta["normalizer"]["obs"]["scale"]))
    # refuses to clobber the run without --resume / --overwrite
    again = run_cli(*args)
    assert again.returncode == 2 and "exists" in again.stderr


@pytest.mark.parametrize("extra", [
    ["optim.name=muon"],
    ["optim.name=dopr-muon", *TINY_UNET],
    ["optim.name=dopr", "optim.ap.conv_mode=full", *TINY_UNET],
    ["optim.name=dopr", "optim.ap.bias_augment=true", "optim.ap.stats_from=previous_batch"],
    ["policy.type=flow", "policy.flow.time_distribution=beta", "policy.flow.integrator=midpoint"],
])
def test_policies_and_optimizers_train(tmp_path, lift_demos, extra):
    cfg = tiny_config(lift_demos, "train.steps=10", *extra)
    run = train(cfg, tmp_path / "run", progress=False)
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(records[-1]["loss"]) and np.isfinite(records[-1]["val_loss"])


def test_same_seed_same_training_on_cpu(tmp_path, lift_demos):
    cfg = tiny_config(lift_demos, "optim.name=dopr")
    a = load_file(str(train(cfg, tmp_path / "a", progress=False) / "checkpoints" / "final.safetensors"))
    b = load_file(str(train(cfg, tmp_path / "b", progress=False) / "checkpoints" / "final.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_is_bit_exact(tmp_path, lift_demos):
    full = train(tiny_config(lift_demos, "optim.name=dopr", "optim.ap.ema_decay=0.9"), tmp_path / "full",
                 progress=False)
    part = tmp_path / "part"
    train(tiny_config(lift_demos, "optim.name=dopr", "optim.ap.ema_decay=0.9"), part, progress=False, until=10)
    assert not (part / "checkpoints" / "final.json").exists()
    train(tiny_config(lift_demos, "optim.name=dopr", "optim.ap.ema_decay=0.9"), part, progress=False, resume=True)
    a = load_file(str(full / "checkpoints" / "final.safetensors"))
    b = load_file(str(part / "checkpoints" / "final.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_is_seeded_parallel_and_reproducible(tmp_path, lift_demos):
    run = train(tiny_config(lift_demos), tmp_path / "run", progress=False)
    kw = dict(episodes=3, seed_start=500, max_steps=24, progress=False)
    first = evaluate(run, workers=2, save_trajectories=tmp_path / "a.hdf5", **kw)
    second = evaluate(run, workers=1, save_trajectories=tmp_path / "b.hdf5", **kw)
    assert [e["seed"] for e in first["per_episode"]] == [500, 501, 502]
    for key in ("success", "steps", "return"):
        assert [e[key] for e in first["per_episode"]] == [e[key] for e in second["per_episode"]]
    lo, hi = first["success_ci95"]
    assert 0 <= lo <= first["success_rate"] <= hi <= 1
    with RobomimicFile(tmp_path / "a.hdf5") as fa, RobomimicFile(tmp_path / "b.hdf5") as fb:
        assert len(fa.demos) == 3
        for name, ep in zip(fa.demos, first["per_episode"]):
            a = fa.read(name, ["robot0_eef_pos"])
            b = fb.read(name, ["robot0_eef_pos"])
            assert len(a) == ep["steps"] and a.attrs["seed"] == ep["seed"]
            np.testing.assert_array_equal(a.actions, b.actions)
            np.testing.assert_array_equal(a.states, b.states)
        # different seeds really are different starts
        assert not np.allclose(fa.read(fa.demos[0], ["object"]).obs["object"][0],
                               fa.read(fa.demos[1], ["object"]).obs["object"][0])


def test_eval_cli_prints_a_table_and_writes_the_report(tmp_path, lift_demos):
    run = train(tiny_config(lift_demos), tmp_path / "run", progress=False)
    result = run_cli("eval", str(run), "--episodes", "2", "--workers", "1", "--max-steps", "16")
    assert result.returncode == 0, result.stderr
    assert "success" in result.stdout and "Wilson 95%" in result.stdout
    report = json.loads((run / "eval.json").read_text())
    assert report["episodes"] == 2 and len(report["per_episode"]) == 2
    assert {"seed", "success", "steps", "return", "wall_s"} <= set(report["per_episode"][0])


def test_cli_until_then_resume_finishes_the_run_with_its_own_config(tmp_path, lift_demos):
    run = tmp_path / "run"
    args = ["train", "--dataset", str(lift_demos), "--out", str(run)]
    for item in TINY:
        args += ["--set", item]
    first = run_cli(*args, "--until", "10")
    assert first.returncode == 0, first.stderr
    assert (run / "checkpoints" / "step_0000010.json").exists() and not (run / "checkpoints" / "final.json").exists()
    second = run_cli("train", "--out", str(run), "--resume")  # no flags: the run's config.yaml is used
    assert second.returncode == 0, second.stderr
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20]
    assert json.loads((run / "checkpoints" / "final.json").read_text())["step"] == 20
