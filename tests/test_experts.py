"""Scripted experts on the harder tasks, and imperfect (noisy-operator) demonstrations."""

import h5py
import numpy as np
import pytest

from dopr_robot.collect import collect, run_expert_episode
from dopr_robot.envs import RobosuiteEnv, default_env_args


@pytest.mark.parametrize("task", ["can", "square"])
def test_expert_succeeds_on_seeded_episodes(task):
    env = RobosuiteEnv(default_env_args(task))
    results = [run_expert_episode(env, task, seed, 400).attrs["success"] for seed in (1000, 1001, 1002)]
    env.close()
    assert all(results)


def test_noisy_demos_are_seeded_recorded_and_different(tmp_path):
    env = RobosuiteEnv(default_env_args("lift"))
    clean = run_expert_episode(env, "lift", 7, 400)
    noisy = run_expert_episode(env, "lift", 7, 400, noise=1.0)
    again = run_expert_episode(env, "lift", 7, 400, noise=1.0)
    env.close()
    np.testing.assert_array_equal(noisy.actions, again.actions)  # same seed, same operator
    assert len(noisy) != len(clean) or not np.allclose(noisy.actions, clean.actions)
    assert noisy.attrs["noise"] == 1.0
    out = tmp_path / "noisy.hdf5"
    summary = collect("lift", 2, seed=0, out=out, noise=1.0, progress=False)
    assert summary["noise"] == 1.0
    with h5py.File(out, "r") as f:
        assert f["data"].attrs["noise"] == 1.0 and f["data/demo_0"].attrs["noise"] == 1.0
