"""Minari datasets in, Gymnasium environments out: real datasets written by Minari's DataCollector on
InvertedPendulum-v5 (tests/tiny_data.make_minari_dataset), real MuJoCo Gymnasium envs, real training and eval."""

import json
import shutil

import gymnasium as gym
import numpy as np
import pytest

from dopr_robot.checkpoint import load_policy
from dopr_robot.datasets import open_demos
from dopr_robot.envs import GymnasiumEnv, make_env
from dopr_robot.envs.gymnasium_env import PUSH_STEPS, gymnasium_env_args, observation_dict, observation_layout
from dopr_robot.errors import UserError
from dopr_robot.evaluation.perturb import Perturbation
from dopr_robot.evaluation.rollout import run_episode
from tiny_data import assert_user_error, make_minari_dataset, pendulum_action, run_cli, train_args

EVAL_STEPS = 30  # below the dataset's 40-step time limit: the trainer must warn


@pytest.fixture(scope="module")
def pendulum_run(minari_pendulum, tmp_path_factory):
    """A policy trained for a few steps through the CLI on `minari:<id>` (in this process)."""
    root, dataset_id, _ = minari_pendulum
    run = tmp_path_factory.mktemp("gym") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(root))
        result = run_cli(*train_args(f"minari:{dataset_id}", run, f"eval.max_steps={EVAL_STEPS}",
                                     "data.horizon=8", "data.n_action_steps=4"))
    assert result.returncode == 0, result.stderr
    return run, result


def test_minari_dataset_trains_and_evaluates_from_the_checkpoint_alone(pendulum_run, tmp_path, monkeypatch):
    """The env is rebuilt from the checkpoint's env_args with no dataset reachable; locomotion success is 'not
    terminated early' (mutant: success_ends_episode = True ends every episode at its first step)."""
    run, trained = pendulum_run
    assert f"eval.max_steps ({EVAL_STEPS}) is not InvertedPendulum-v5's time limit (40)" in trained.stdout
    meta = json.loads((run / "checkpoints" / "final.json").read_text())
    assert meta["env_args"]["type"] == "gymnasium" and meta["env_args"]["env_name"] == "InvertedPendulum-v5"
    assert meta["obs_keys"] == ["obs"] and meta["config"]["data"]["obs_keys"] == ["obs"]
    assert (meta["obs_dim"], meta["action_dim"]) == (4, 1) and meta["train_demos"] == 6
    assert meta["reference_scores"] == {"min": 0.0, "max": 40.0}
    assert meta["dataset_attrs"]["dataset_id"] == "dopr-test/pendulum/pd-v0"
    provenance = json.loads((run / "provenance.json").read_text())
    assert provenance["dataset"]["sha256"]  # the dataset directory's files, hashed

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "no-datasets-here"))
    result = run_cli("eval", str(run), "--episodes", "3", "--workers", "1")
    assert result.returncode == 0, result.stderr
    report = json.loads((run / "eval.json").read_text())
    assert report["env_name"] == "InvertedPendulum-v5" and report["reference_scores"] == meta["reference_scores"]
    assert report["max_steps"] == EVAL_STEPS and len(report["per_episode"]) == 3
    for episode in report["per_episode"]:
        # InvertedPendulum-v5 pays 1 per step while the pole is up, 0 on the step that terminates the episode
        assert episode["success"] == (episode["steps"] == EVAL_STEPS)
        assert episode["return"] == episode["steps"] - (0 if episode["success"] else 1)
    assert report["mean_return"] == pytest.approx(np.mean([e["return"] for e in report["per_episode"]]))


def test_minari_episodes_are_read_as_collected(minari_pendulum, monkeypatch, tmp_path):
    """obs[t] is what the agent saw before actions[t] (mutant: Minari's T+1 observations sliced [1:])."""
    root, dataset_id, executed = minari_pendulum
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    demos = open_demos(f"minari:{dataset_id}")
    for alias in (root / dataset_id, root / dataset_id / "data"):  # a dataset directory, or its data/
        again = open_demos(alias)
        assert again.names == demos.names and again.env_args == demos.env_args
    assert demos.names == [f"demo_{i}" for i in range(6)] and demos.masks == {}
    assert len(demos.episodes("train")) == 6 and demos.episodes("valid", missing_ok=True) == []
    assert demos.obs_keys == ["obs"] and demos.reference_scores == {"min": 0.0, "max": 40.0}
    env = gym.make("InvertedPendulum-v5")
    for episode, done in zip(demos.episodes(None), executed):
        np.testing.assert_array_equal(episode.actions, done["actions"])
        np.testing.assert_array_equal(episode.rewards, done["rewards"])
        np.testing.assert_array_equal(episode.obs["obs"][1:], episode.next_obs["obs"][:-1])
        first, _ = env.reset(seed=done["seed"])
        np.testing.assert_allclose(episode.obs["obs"][0], first, rtol=1e-6)
        assert episode.attrs["terminated"] == done["terminated"] and episode.attrs["seed"] == done["seed"]
    assert [d["terminated"] for d in executed] == [False] * 5 + [True]
    # convert keeps the env and the reference scores
    demos.save(tmp_path / "pendulum.hdf5")
    converted = open_demos(tmp_path / "pendulum.hdf5")
    assert converted.env_args == demos.env_args and converted.reference_scores == demos.reference_scores
    np.testing.assert_array_equal(converted.episodes(None)[2].obs["obs"], demos.episodes(None)[2].obs["obs"])


class _WithPhase(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """Dict observations with a Discrete part, which no flat policy vector can hold."""

    def __init__(self, env):
        gym.utils.RecordConstructorArgs.__init__(self)
        gym.ObservationWrapper.__init__(self, env)
        self.observation_space = gym.spaces.Dict({"state": env.observation_space, "phase": gym.spaces.Discrete(2)})

    def observation(self, observation):
        return {"state": observation, "phase": 0}


def test_bad_minari_datasets_are_one_error_line_naming_the_dataset(minari_pendulum, tmp_path, monkeypatch):
    root, dataset_id, _ = minari_pendulum
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    result = run_cli(*train_args("minari:nobody/nothing-v0", tmp_path / "a"))
    assert_user_error(result, "Minari dataset nobody/nothing-v0 not found")
    assert "minari download nobody/nothing-v0" in result.stderr and dataset_id in result.stderr  # lists local ones

    # made with an env package this machine lacks (as D4RL/pointmaze needs gymnasium_robotics)
    gone = tmp_path / "gone"
    shutil.copytree(root / dataset_id, gone)
    metadata_path = gone / "data" / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["env_spec"] = metadata["env_spec"].replace("gymnasium.envs.mujoco.inverted_pendulum_v5",
                                                        "missing_robotics_package.envs")
    metadata_path.write_text(json.dumps(metadata))
    result = run_cli(*train_args(gone, tmp_path / "b"))
    assert_user_error(result, f"Minari dataset {gone}: its environment cannot be recovered")

    make_minari_dataset(tmp_path / "dict", "dopr-test/pendulum/phase-v0", episodes=1, limit=5,
                        env_wrapper=_WithPhase)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "dict"))
    result = run_cli(*train_args("minari:dopr-test/pendulum/phase-v0", tmp_path / "c"))
    assert_user_error(result, "Minari dataset minari:dopr-test/pendulum/phase-v0: observation part 'phase'")
    assert not any((tmp_path / name).exists() for name in "abc")  # refused before any run directory is made


def test_observation_layout_flattens_dicts_of_boxes():
    box = gym.spaces.Box(-1, 1, (3,))
    space = gym.spaces.Dict({"observation": box, "goal": gym.spaces.Dict({"xy": gym.spaces.Box(-1, 1, (2,))})})
    assert observation_layout(space) == {"observation": (3,), "goal.xy": (2,)}
    sample = space.sample()
    assert set(observation_dict(sample)) == {"observation", "goal.xy"}
    np.testing.assert_array_equal(observation_dict(sample)["goal.xy"], sample["goal"]["xy"])
    with pytest.raises(ValueError, match="image"):
        observation_layout(gym.spaces.Box(0, 255, (8, 8, 3), dtype=np.uint8))


def test_success_is_not_terminating_early_and_reset_is_seeded():
    env = GymnasiumEnv(gymnasium_env_args(gym.make("InvertedPendulum-v5")))
    assert not env.success_ends_episode and env.action_dim == 1
    np.testing.assert_array_equal(env.reset(5)["obs"], env.reset(5)["obs"])
    assert not np.array_equal(env.reset(5)["obs"], env.reset(6)["obs"])
    for _ in range(40):  # full force one way: the pole falls
        env.step(np.array([3.0]))
        if env.terminated:
            break
    assert env.terminated and not env.is_success()
    obs, rng = env.reset(5), np.random.default_rng(0)
    assert not env.terminated
    for _ in range(40):
        obs, _ = env.step(pendulum_action(obs["obs"], rng))
    assert not env.terminated and env.is_success()
    env.close()


def test_push_is_a_force_on_the_torso_for_a_few_steps():
    """A 1 m/s push along x changes the airborne Hopper's centre-of-mass velocity by 1 m/s (the impulse is sized by
    the torso's subtree mass); a y push does nothing to this planar robot; the force is gone after PUSH_STEPS
    steps; the same push gives the same trajectory."""
    import mujoco

    env = GymnasiumEnv(gymnasium_env_args(gym.make("Hopper-v5")))
    model, data = env.env.unwrapped.model, env.env.unwrapped.data

    def states(push):
        env.reset(3)
        out = []
        for t in range(2 + PUSH_STEPS):
            if push is not None and t == 2:
                env.push_object(np.array(push))
            env.step(np.zeros(3))
            out.append(env.get_state())
        assert not data.xfrc_applied.any() and data.ncon == 0  # the force is off; still in the air
        mujoco.mj_subtreeVel(model, data)
        return np.array(out), data.subtree_linvel[env.push_body()].copy()

    (still, still_v), (pushed, pushed_v) = states(None), states([1.0, 0.0, 0.0])
    np.testing.assert_allclose(pushed_v - still_v, [1.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_array_equal(pushed, states([1.0, 0.0, 0.0])[0])
    np.testing.assert_array_equal(still, states([0.0, 1.0, 0.0])[0])
    env.close()


def test_perturbed_episodes_are_the_same_for_the_same_seed(pendulum_run):
    run, _ = pendulum_run
    policy, meta = load_policy(run / "checkpoints" / "final.json")
    env = make_env(meta["env_args"])
    perturbation = Perturbation(action_noise=0.5, obs_noise=0.3, push=1.0, push_magnitude=1.0)

    def episode(seed, p):
        result, trajectory = run_episode(policy, env, seed, EVAL_STEPS, 4, meta["obs_keys"], record=True,
                                         perturbation=p)
        return result, trajectory

    first, again, calm = episode(11, perturbation), episode(11, perturbation), episode(11, None)
    assert first[0]["push_step"] is not None or first[0]["steps"] < EVAL_STEPS // 4
    assert (first[0]["return"], first[0]["steps"]) == (again[0]["return"], again[0]["steps"])
    np.testing.assert_array_equal(first[1].states, again[1].states)
    np.testing.assert_array_equal(first[1].actions, again[1].actions)
    n = min(len(first[1].actions), len(calm[1].actions))
    assert not np.array_equal(first[1].actions[:n], calm[1].actions[:n])
    env.close()


def test_videos_of_gymnasium_envs_use_the_model_cameras():
    from dopr_robot.envs.render import RenderSpec, check_rendering

    args = gymnasium_env_args(gym.make("Hopper-v5"))
    try:
        check_rendering(args, RenderSpec("agentview", 48, 64))  # robosuite's default name: the env's own view
    except UserError as e:
        pytest.skip(f"offscreen rendering unavailable here: {e}")
    env = make_env(args, render=("track", 48, 64))
    env.reset(0)
    frame = env.render_frame()
    assert frame.shape == (48, 64, 3) and frame.dtype == np.uint8 and frame.max() > frame.min()
    env.close()
    with pytest.raises(UserError, match="camera 'nope' is not in Hopper-v5 .cameras: default, track"):
        make_env(args, render=("nope", 48, 64))
