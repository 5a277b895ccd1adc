"""Scripted experts on the harder tasks, and imperfect (noisy-operator) demonstrations."""

import h5py
import numpy as np
import pytest

from dopr_robot.collect import collect, run_expert_episode
from dopr_robot.envs import RobosuiteEnv, default_env_args
from dopr_robot.errors import UserError


@pytest.mark.parametrize("task", ["can", "square"])
def test_expert_succeeds_on_seeded_episodes(task):
    env = RobosuiteEnv(default_env_args(task))
    results = [run_expert_episode(env, task, seed, 400).attrs["success"] for seed in (1000, 1001, 1002)]
    env.close()
    assert all(results)


def test_transport_expert_hands_the_hammer_across(tmp_path):
    """Both arms, absolute world-frame poses: the file is what configs/transport.yaml trains on (14-D absolute
    axis-angle actions, converted to 20-D). 27 of 34 held-out seeds (100-119, 200-213) succeed; 100 is one."""
    from dopr_robot.datasets import open_demos
    from dopr_robot.envs.compat import action_layout

    out = tmp_path / "transport.hdf5"
    summary = collect("transport", 1, seed=100, out=out, max_steps=400, progress=False)
    assert summary["attempts"] == 1 and summary["mean_length"] < 400
    demos = open_demos(out)
    episode = demos.episodes(None)[0]
    assert episode.actions.shape[1] == 14 and "robot1_eef_pos" in episode.obs
    assert action_layout(demos.env_args, episode.actions)[1:3] == ("absolute", "axis_angle")
    with pytest.raises(UserError, match="absolute poses"):
        collect("transport", 1, seed=100, out=tmp_path / "noisy.hdf5", noise=0.5, progress=False)


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
