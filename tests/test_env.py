"""Environments rebuilt from env_args; seeded resets are reproducible in any process; experts succeed."""

import json
import subprocess
import sys

import numpy as np
import pytest

from dopr_robot.collect import run_expert_episode
from dopr_robot.envs import RobosuiteEnv, default_env_args
from dopr_robot.errors import UserError

PRINT_INITIAL_STATES = """
import json, sys
from dopr_robot.envs import RobosuiteEnv, default_env_args
env = RobosuiteEnv(default_env_args("lift"))
print(json.dumps({s: env.reset(s)["object"].tolist() + env.get_state().tolist() for s in (3, 7)}))
"""


@pytest.fixture(scope="module")
def lift_env():
    env = RobosuiteEnv(default_env_args("lift"))
    yield env
    env.close()


def initial(env, seed):
    return np.concatenate([env.reset(seed)["object"], env.get_state()])


def test_same_seed_same_initial_state_in_this_process(lift_env):
    a = initial(lift_env, 3)
    lift_env.step(np.ones(7))  # disturb the episode in between
    initial(lift_env, 11)
    b = initial(lift_env, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(initial(lift_env, 3), initial(lift_env, 7))


def test_same_seed_same_initial_state_in_another_process(lift_env):
    out = subprocess.run([sys.executable, "-c", PRINT_INITIAL_STATES], capture_output=True, text=True, check=True)
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    for seed in (3, 7):
        np.testing.assert_array_equal(initial(lift_env, seed), np.asarray(theirs[str(seed)]))


def test_env_args_round_trip_through_json():
    args = json.loads(json.dumps(default_env_args("lift")))
    env = RobosuiteEnv(args)
    assert env.action_dim == 7
    env.close()


def test_bad_env_args_are_user_errors():
    with pytest.raises(UserError):
        RobosuiteEnv({"type": 1})
    with pytest.raises(UserError):
        default_env_args("stack")


def test_lift_expert_succeeds_on_seeded_episodes(lift_env):
    results = [run_expert_episode(lift_env, "lift", seed, 400).attrs["success"] for seed in range(100, 105)]
    assert all(results)
