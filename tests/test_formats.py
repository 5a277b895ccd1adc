"""Real robomimic files (v141 and v1.5 layouts), ReplayBuffer zarr stores, inspect and convert."""

import json

import h5py
import numpy as np
import pytest

from conftest import run_cli
from dopr_robot.config import load_config
from dopr_robot.datasets import open_demos
from dopr_robot.envs import RobosuiteEnv
from dopr_robot.envs.compat import action_mode, upgrade_env_args, version_warning
from dopr_robot.errors import UserError
from dopr_robot.evaluation import evaluate
from dopr_robot.training import train

# env_args as robomimic's low_dim_v141.hdf5 files carry them (robosuite 1.4.1, single part controller)
V141_ENV_ARGS = {
    "env_name": "Lift", "env_version": "1.4.1", "type": 1,
    "env_kwargs": {
        "has_renderer": False, "has_offscreen_renderer": False, "ignore_done": True, "use_object_obs": True,
        "use_camera_obs": False, "control_freq": 20,
        "controller_configs": {
            "type": "OSC_POSE", "input_max": 1, "input_min": -1, "output_max": [0.05, 0.05, 0.05, 0.5, 0.5, 0.5],
            "output_min": [-0.05, -0.05, -0.05, -0.5, -0.5, -0.5], "kp": 150, "damping": 1,
            "impedance_mode": "fixed", "kp_limits": [0, 300], "damping_limits": [0, 10], "position_limits": None,
            "orientation_limits": None, "uncouple_pos_ori": True, "control_delta": True, "interpolation": None,
            "ramp_ratio": 0.2,
        },
        "robots": ["Panda"], "camera_depths": False, "camera_heights": 84, "camera_widths": 84,
        "reward_shaping": False,
    },
}


@pytest.fixture(scope="module")
def v141_file(lift_demos, tmp_path_factory):
    """Our demos re-labelled as a robosuite 1.4.1 recording, with robomimic's extra masks."""
    path = tmp_path_factory.mktemp("v141") / "low_dim_v141.hdf5"
    path.write_bytes(lift_demos.read_bytes())
    with h5py.File(path, "a") as f:
        f["data"].attrs["env_args"] = json.dumps(V141_ENV_ARGS)
        f.create_dataset("mask/20_percent", data=np.array([b"demo_0", b"demo_1"]))
    return path


def test_old_controller_config_is_translated():
    new = upgrade_env_args(V141_ENV_ARGS)["env_kwargs"]["controller_configs"]
    assert new["type"] == "BASIC"
    arm = new["body_parts"]["right"]
    assert arm["type"] == "OSC_POSE" and arm["input_type"] == "delta" and arm["damping_ratio"] == 1
    assert "control_delta" not in arm and arm["gripper"] == {"type": "GRIP"}
    assert action_mode(V141_ENV_ARGS) == "delta"
    absolute = json.loads(json.dumps(V141_ENV_ARGS))
    absolute["env_kwargs"]["controller_configs"]["control_delta"] = False
    assert action_mode(absolute) == "absolute"
    assert upgrade_env_args(absolute)["env_kwargs"]["controller_configs"]["body_parts"]["right"]["input_type"] == \
        "absolute"
    assert arm["input_ref_frame"] == "world"  # robosuite 1.4's OSC read every command in the world frame
    assert action_mode(V141_ENV_ARGS, action_dim=10) == "absolute"  # diffusion_policy's pos + 6-D rotation poses
    with pytest.raises(UserError, match="11-D absolute"):
        action_mode(absolute, action_dim=11)
    assert "1.4.1" in version_warning(V141_ENV_ARGS)


def test_v141_demo_replays_to_success_in_robosuite_15(v141_file):
    demos = open_demos(v141_file, ["object"])
    env = RobosuiteEnv(demos.env_args)
    episode = demos.episodes(None)[0]
    env.reset(episode.attrs["seed"])
    np.testing.assert_allclose(env.get_state(), episode.states[0], atol=1e-9)
    for action in episode.actions:
        env.step(action)
    assert env.is_success()
    env.close()


def tiny(dataset):
    return load_config(None, [f"data.path={dataset}", "policy.mlp.hidden_dim=64", "policy.mlp.num_layers=2",
                              "train.batch_size=32", "train.steps=6", "train.log_every=3", "train.val_every=3",
                              "train.warmup_steps=2"])


def test_hdf5_zarr_round_trip(lift_demos, tmp_path):
    z = tmp_path / "lift.zarr"
    assert run_cli("convert", str(lift_demos), str(z)).returncode == 0
    back = tmp_path / "back.hdf5"
    assert run_cli("convert", str(z), str(back)).returncode == 0
    a, b, c = open_demos(lift_demos), open_demos(z), open_demos(back)
    assert a.masks == b.masks == c.masks and a.env_args == b.env_args == c.env_args
    for ea, eb, ec in zip(a.episodes(None), b.episodes(None), c.episodes(None)):
        assert set(ea.obs) == set(eb.obs) == set(ec.obs)
        for key in ea.obs:
            np.testing.assert_array_equal(ea.obs[key], eb.obs[key])
            np.testing.assert_array_equal(ea.obs[key], ec.obs[key])
        np.testing.assert_array_equal(ea.actions, ec.actions)
        np.testing.assert_array_equal(ea.states, ec.states)
        assert ea.attrs["seed"] == eb.attrs["seed"] == ec.attrs["seed"]
    import zarr

    root = zarr.open_group(str(z), mode="r")
    ends = root["meta/episode_ends"][:]
    assert ends.dtype == np.int64 and ends[-1] == root["data/action"].shape[0]
    assert run_cli("convert", str(lift_demos), str(z)).returncode == 2  # exists: no silent overwrite


@pytest.mark.parametrize("layout", ["v141", "v15", "zarr"])
def test_train_and_evaluate_each_layout(layout, lift_demos, v141_file, tmp_path):
    if layout == "v141":
        path = v141_file
    elif layout == "v15":
        path = lift_demos
    else:
        path = tmp_path / "lift.zarr"
        open_demos(lift_demos).save(path)
    run = train(tiny(path), tmp_path / "run", progress=False)
    report = evaluate(run, episodes=2, workers=1, max_steps=10, progress=False)
    assert report["env_name"] == "Lift" and [e["steps"] for e in report["per_episode"]] == [10, 10]


def test_inspect(lift_demos, v141_file, tmp_path):
    out = run_cli("inspect", str(lift_demos))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "Lift" in text and "demos" in text and "6," in text and "train (5), valid (1)" in text
    assert "object (10)" in text and "7-D" in text and "delta actions" in text and "BASIC/OSC_POSE" in text
    old = run_cli("inspect", str(v141_file))
    assert "1.4.1" in old.stdout and "20_percent (2)" in old.stdout and "warning" in old.stdout
    bad = tmp_path / "bad.hdf5"
    with h5py.File(bad, "w") as f:
        f.create_dataset("data/demo_0/actions", data=np.full((3, 7), np.inf))
        f.create_dataset("data/demo_0/obs/x", data=np.zeros((3, 1)))
    result = run_cli("inspect", str(bad))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
