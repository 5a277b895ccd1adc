"""The evaluation engine: one reusable worker pool, results identical to the pre-pool code, perturbations,
fault isolation (a killed worker, an episode that raises, a timeout, an environment that cannot be built)."""

import json
import os
import shutil
import signal
import time

import numpy as np
import pytest

from conftest import run_cli
from dopr_robot.config import load_config
from dopr_robot.errors import UserError
from dopr_robot.evaluation import EpisodeSettings, EvalPool, Perturbation
from dopr_robot.training import train

TINY = ["policy.mlp.hidden_dim=64", "policy.mlp.num_layers=2", "train.batch_size=32", "train.log_every=5",
        "train.val_every=10", "train.warmup_steps=5", "train.steps=20"]

# Recorded once with the code before the pool (main at 01fc1d6: `evaluate(run, episodes=3, seed_start=500,
# max_steps=24, workers=1)` on these tiny runs): seed -> (success, steps, return, sum of executed actions).
BEFORE = {
    "diffusion": {500: (False, 24, 0.0, 9.343191160820425), 501: (False, 24, 0.0, 9.064861587728956),
                  502: (False, 24, 0.0, 9.051571598742157)},
    "flow": {500: (False, 24, 0.0, -12.660431301454082), 501: (False, 24, 0.0, -6.001783437561244),
             502: (False, 24, 0.0, -0.9669857262633741)},
}
SEEDS = [500, 501, 502]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, lift_demos):
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for name, extra in (("diffusion", []), ("flow", ["policy.type=flow"])):
        cfg = load_config(None, [f"data.path={lift_demos}", *TINY, *extra])
        runs[name] = train(cfg, root / name, progress=False)
    return runs


def _ckpt(run):
    return run / "checkpoints" / "final.json"


def _key(outcomes):
    return {s: (o.record["success"], o.record["steps"], o.record["return"], float(np.sum(o.trajectory.actions,
                                                                                       dtype=np.float64)))
            for s, o in outcomes.items()}


def _object_path(outcome):
    return outcome.trajectory.obs["object"][:, :3]


def test_one_pool_matches_the_pre_pool_results_and_perturbs_deterministically(tiny_runs, tmp_path):
    plain = EpisodeSettings(max_steps=24, n_action_steps=8, record=True)
    last = tmp_path / "last.json"  # re-saved in place, like training's checkpoints/last

    def save_as_last(run):
        shutil.copyfile(_ckpt(run).with_suffix(".safetensors"), last.with_suffix(".safetensors"))
        shutil.copyfile(_ckpt(run), last)

    save_as_last(tiny_runs["diffusion"])
    with EvalPool(2, preload=last) as pool:
        base = pool.evaluate(last, SEEDS, plain)
        for seed, (success, steps, ret, action_sum) in BEFORE["diffusion"].items():
            got = _key(base)[seed]
            assert got[:3] == (success, steps, ret)
            assert got[3] == pytest.approx(action_sum, rel=1e-6, abs=1e-6)  # bit-equal here; CPUs may round
        # the same pool after the checkpoint file was replaced: the workers reload it
        save_as_last(tiny_runs["flow"])
        flow = pool.evaluate(last, SEEDS, plain)
        for seed, (success, steps, ret, action_sum) in BEFORE["flow"].items():
            assert _key(flow)[seed][:3] == (success, steps, ret)
            assert _key(flow)[seed][3] == pytest.approx(action_sum, rel=1e-6, abs=1e-6)

        def run(**levels):
            settings = EpisodeSettings(max_steps=24, n_action_steps=8, record=True,
                                       perturbation=Perturbation(**levels))
            return pool.evaluate(_ckpt(tiny_runs["diffusion"]), SEEDS[:2], settings)

        zero = run(push_magnitude=2.0)  # push probability 0: zero perturbation == the unperturbed episode
        for s in SEEDS[:2]:
            np.testing.assert_array_equal(zero[s].trajectory.actions, base[s].trajectory.actions)
            np.testing.assert_array_equal(zero[s].trajectory.states, base[s].trajectory.states)
        both = [run(action_noise=0.2, obs_noise=0.5, push=1.0, push_magnitude=0.5) for _ in range(2)]
        for s in SEEDS[:2]:  # same seed, same perturbed rollout
            np.testing.assert_array_equal(both[0][s].trajectory.states, both[1][s].trajectory.states)
            assert 1 <= both[0][s].record["push_step"] <= 6
        action = run(action_noise=0.2)
        obs = run(obs_noise=0.5)
        push = run(push=1.0, push_magnitude=0.5)
        for s in SEEDS[:2]:
            assert not np.allclose(action[s].trajectory.actions, base[s].trajectory.actions)
            assert not np.allclose(obs[s].trajectory.actions, base[s].trajectory.actions)
            step = push[s].record["push_step"]
            # before the push the object is where it was; after it, it moved differently
            np.testing.assert_array_equal(_object_path(push[s])[:step], _object_path(base[s])[:step])
            assert np.abs(_object_path(push[s])[-1] - _object_path(base[s])[-1]).max() > 1e-3


def test_a_killed_worker_costs_no_episode_and_the_run_finishes(tiny_runs):
    seeds = [500, 501, 502, 503]
    killed = []

    with EvalPool(2) as pool:
        def kill_one(seed, outcome):
            if not killed:
                pid = next(iter(pool._executor._processes))
                os.kill(pid, signal.SIGKILL)  # what the out-of-memory killer does
                killed.append(pid)

        outcomes = pool.evaluate(_ckpt(tiny_runs["diffusion"]), seeds,
                                 EpisodeSettings(max_steps=24, n_action_steps=8, record=True), kill_one)
    assert killed and sorted(outcomes) == seeds
    assert not any("error" in o.record for o in outcomes.values())
    for seed, (success, steps, ret, action_sum) in BEFORE["diffusion"].items():
        assert _key(outcomes)[seed][:3] == (success, steps, ret)
        assert _key(outcomes)[seed][3] == pytest.approx(action_sum, rel=1e-6, abs=1e-6)


def test_episode_errors_timeouts_and_unbuildable_environments(tiny_runs, tmp_path):
    def variant(name, **changes):
        meta = json.loads(_ckpt(tiny_runs["diffusion"]).read_text())
        for key, value in changes.items():
            meta[key] = value
        (tmp_path / f"{name}.json").write_text(json.dumps(meta))
        shutil.copyfile(_ckpt(tiny_runs["diffusion"]).with_suffix(".safetensors"), tmp_path / f"{name}.safetensors")
        return tmp_path / f"{name}.json"

    raises = variant("raises", obs_keys=["object", "no_such_observation"])  # fails inside every episode
    meta = json.loads(_ckpt(tiny_runs["diffusion"]).read_text())
    unbuildable = variant("unbuildable", env_args={**meta["env_args"], "env_name": "NoSuchEnv"})
    settings = EpisodeSettings(max_steps=24, n_action_steps=8)
    with EvalPool(1) as pool:
        outcomes = pool.evaluate(raises, [500, 501], settings)
        assert [o.record["success"] for o in outcomes.values()] == [None, None]  # missing, not failed
        assert all("KeyError" in o.record["error"] for o in outcomes.values())
        with pytest.raises(UserError, match="NoSuchEnv"):
            pool.evaluate(unbuildable, [500], settings)
        # an episode that runs past its timeout is stopped and recorded, and the pool carries on
        pool.episode_timeout_s = 0.5
        start = time.monotonic()
        slow = pool.evaluate(_ckpt(tiny_runs["diffusion"]), [500, 501], EpisodeSettings(400, 8))
        assert all("timed out" in o.record["error"] for o in slow.values())
        assert time.monotonic() - start < 120
    result = run_cli("eval", str(unbuildable), "--episodes", "2", "--workers", "1")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "NoSuchEnv" in errors[0]
    assert result.stderr.rstrip().endswith(errors[0]) and "Traceback" not in result.stderr
