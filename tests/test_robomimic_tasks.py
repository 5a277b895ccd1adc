"""The paper's robomimic tasks as users download them (issue 18): absolute actions in robosuite 1.4's world
frame, 6-D rotation actions, observation keys from the file, pushes on Tool-Hang / Transport, and the
tool_hang / transport configs, on tiny real files recorded here with robosuite."""

import json
import shutil

import h5py
import numpy as np
import pytest

from dopr_robot.config import load_config
from dopr_robot.datasets import open_demos
from dopr_robot.datasets.obs_keys import default_obs_keys, obs_specs, observation_kind, resolve_obs_keys
from dopr_robot.envs import check_pushable, make_env
from dopr_robot.envs.compat import policy_actions
from dopr_robot.envs.rotations import (axis_angle_to_matrix, axis_angle_to_rotation_6d, convert_actions,
                                       matrix_to_axis_angle, rotation_6d_to_axis_angle)
from dopr_robot.errors import UserError
from robomimic_tasks import ROBOTS, grip_poses, hold_action, record_abs_file, v141_env_args
from tiny_data import assert_user_error, run_cli

CONFIG_DIR = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def abs_files(tmp_path_factory):
    """Tool-Hang and Transport low_dim_abs.hdf5 files (3 demos x 16 steps each), shared by this module."""
    root = tmp_path_factory.mktemp("robomimic")
    return {name: record_abs_file(root / name / "low_dim_abs.hdf5", name) for name in ("ToolHang", "TwoArmTransport")}


# ------------------------------------------------------------------------------------------- rotations
def test_rotation_6d_round_trip_to_float_tolerance():
    rng = np.random.default_rng(0)
    axes = rng.normal(size=(500, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    angles = np.concatenate([rng.uniform(0, np.pi, 480), np.pi - np.logspace(-12, -3, 10), np.full(10, 1e-9)])
    rotvec = axes * angles[:, None]
    back = rotation_6d_to_axis_angle(axis_angle_to_rotation_6d(rotvec))
    near_pi = angles > np.pi - 1e-6  # there v and -v are the same rotation: compare rotations
    np.testing.assert_allclose(back[~near_pi], rotvec[~near_pi], atol=1e-9)
    np.testing.assert_allclose(axis_angle_to_matrix(back), axis_angle_to_matrix(rotvec), atol=1e-9)
    # diffusion_policy's layout: [pos 3, rot 6, gripper 1] per arm, arms concatenated (Transport 14-D <-> 20-D)
    actions = np.concatenate([rng.normal(size=(7, 3)), rotvec[:7], rng.uniform(-1, 1, (7, 1))] * 2, axis=1)
    six = convert_actions(actions, "axis_angle", "rotation_6d", n_arms=2)
    assert six.shape == (7, 20)
    np.testing.assert_array_equal(six[:, [0, 1, 2, 9, 10, 11, 12, 19]], actions[:, [0, 1, 2, 6, 7, 8, 9, 13]])
    np.testing.assert_allclose(six[:, 3:9], axis_angle_to_rotation_6d(rotvec[:7]), atol=1e-12)
    np.testing.assert_allclose(convert_actions(six, "rotation_6d", "axis_angle", n_arms=2), actions, atol=1e-9)
    # a policy's 6-D output is not exactly orthonormal: Gram-Schmidt still gives the intended rotation
    noisy = six[:, 3:9] * 1.3
    np.testing.assert_allclose(rotation_6d_to_axis_angle(noisy), rotvec[:7], atol=1e-9)


# ------------------------------------------------------------------------------------ absolute actions
@pytest.mark.parametrize("env_name", ["Lift", "ToolHang", "TwoArmTransport"])
def test_translated_absolute_controller_holds_a_world_pose(env_name):
    """Mutant (main before issue 18): the v141 translation kept robosuite 1.5's input_ref_frame="base", and
    commanding the arm's own world pose moved it ~1 m on ToolHang and on each Transport arm."""
    env = make_env(v141_env_args(env_name, delta=False))
    env.reset(3)
    start = grip_poses(env)
    action = hold_action(env)
    for _ in range(40):
        env.step(action)
    for (pos0, mat0), (pos, mat) in zip(start, grip_poses(env)):
        assert np.linalg.norm(pos - pos0) < 0.03
        assert np.linalg.norm(mat - mat0) < 0.05
    env.close()


def test_v141_deltas_are_world_frame_on_transports_turned_arms():
    """robosuite 1.4 added deltas in the world frame; Transport's robot1 faces robot0 (bases turned by -90 and
    +90 degrees), so a base-frame reading (main before issue 18) would move it along world -y instead of +x."""
    env = make_env(v141_env_args("TwoArmTransport", delta=True))
    env.reset(0)
    before = grip_poses(env)[1][0]
    for _ in range(10):
        env.step(np.array([0, 0, 0, 0, 0, 0, -1, 0.5, 0, 0, 0, 0, 0, -1.0]))
    assert grip_poses(env)[1][0][0] - before[0] > 0.05  # +x in the world
    env.close()


def test_absolute_demo_replays_to_the_states_of_its_delta_twin():
    """A delta demo on Transport, written as robosuite 1.4's absolute poses (each arm's world grip pose plus the
    scaled delta: 0.05 m and 0.5 rad per unit), replays to the same states as 14-D axis-angle and as 20-D 6-D
    rotation actions. Mutant: base-frame deltas or poses (main before issue 18) drift apart at once."""
    delta_env = make_env(v141_env_args("TwoArmTransport", delta=True))
    delta_env.reset(5)
    rng = np.random.default_rng(0)
    states, abs_actions = [delta_env.get_state()], []
    for _ in range(12):
        deltas = rng.uniform(-0.6, 0.6, (2, 6))
        abs_actions.append(np.concatenate([
            np.r_[pos + 0.05 * d[:3], matrix_to_axis_angle(axis_angle_to_matrix(0.5 * d[3:]) @ mat), -1.0]
            for (pos, mat), d in zip(grip_poses(delta_env), deltas)]))
        delta_env.step(np.concatenate([np.r_[d, -1.0] for d in deltas]))
        states.append(delta_env.get_state())
    delta_env.close()
    for rotation in ("axis_angle", "rotation_6d"):
        args = v141_env_args("TwoArmTransport", delta=False)
        actions = np.asarray(abs_actions)
        if rotation == "rotation_6d":
            args["action_rotation"] = "rotation_6d"
            actions = convert_actions(actions, "axis_angle", "rotation_6d", n_arms=2)
        env = make_env(args)
        assert env.action_dim == actions.shape[1]
        env.reset(5)
        np.testing.assert_allclose(env.get_state(), states[0], atol=1e-12)
        for action, state in zip(actions, states[1:]):
            env.step(action)
            np.testing.assert_allclose(env.get_state(), state, atol=1e-6)
        env.close()


def test_abs_file_layouts_are_read_as_absolute(abs_files):
    """diffusion_policy's *_abs files keep the delta file's env_args; 10/20-D actions are absolute whatever the
    env_args say; data.action_rotation converts absolute actions only."""
    demos = open_demos(abs_files["TwoArmTransport"])
    actions = demos.episodes(None)[0].actions
    env_args, source, target, note = policy_actions(demos.env_args, actions, abs_files["TwoArmTransport"],
                                                    "rotation_6d")
    assert (source, target) == ("axis_angle", "rotation_6d") and "_abs" in note
    assert env_args["action_rotation"] == "rotation_6d"
    assert env_args["env_kwargs"]["controller_configs"]["control_delta"] is False
    six = convert_actions(actions, "axis_angle", "rotation_6d", 2)
    _, source, target, note = policy_actions(demos.env_args, six, None, "file")
    assert (source, target) == ("rotation_6d", "rotation_6d") and "20-D" in note
    with pytest.raises(UserError, match="deltas"):
        policy_actions(v141_env_args("Lift", delta=True), np.zeros((2, 7)), None, "rotation_6d")
    with pytest.raises(UserError, match="13-D absolute"):
        policy_actions(v141_env_args("TwoArmTransport", delta=False), np.zeros((2, 13)), None, "file")


# ------------------------------------------------------------------------------------ observation keys
def test_default_obs_keys_follow_the_files_robots(abs_files, tmp_path):
    """Mutant (main before issue 18): the default keys were Lift's, so Transport trained without robot1_*."""
    transport = abs_files["TwoArmTransport"]
    keys, warning = resolve_obs_keys(transport, [])
    assert keys == ["object"] + [f"robot{i}_{k}" for i in (0, 1) for k in ("eef_pos", "eef_quat", "gripper_qpos")]
    assert warning is None
    specs = obs_specs(transport)
    assert sum(int(np.prod(specs[k][0])) for k in keys) == 59  # diffusion_policy's Transport obs dim
    assert sum(int(np.prod(s)) for k, (s, _) in obs_specs(abs_files["ToolHang"]).items()
               if k in default_obs_keys(obs_specs(abs_files["ToolHang"]))) == 53
    lift_like = ["object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"]
    _, warning = resolve_obs_keys(transport, lift_like)
    assert warning.count("\n") == 0 and "robot1_*" in warning
    out = run_cli("inspect", str(transport))
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith("train keys"))
    assert "robot1_gripper_qpos" in row and "59-D" in row
    assert "absolute actions (axis_angle)" in out.stdout and "note" in out.stdout
    run = run_cli("train", "--dataset", str(transport), "--out", str(tmp_path / "run"),
                  *sum((["--set", s] for s in [f"data.obs_keys=[{','.join(lift_like)}]", "train.steps=1",
                                                "policy.mlp.hidden_dim=16", "train.batch_size=4",
                                                "train.log_every=1", "train.warmup_steps=0"]), []))
    assert run.returncode == 0, run.stderr
    assert [line for line in run.stdout.splitlines() if line.startswith("warning: data.obs_keys")] != []
    assert sum(line.startswith("warning: data.obs_keys") for line in run.stdout.splitlines()) == 1


@pytest.fixture(scope="module")
def image_file(abs_files, tmp_path_factory):
    """The Tool-Hang file with a uint8 camera key, (T, 84, 84, 3) per demo, as robomimic's image files have."""
    path = tmp_path_factory.mktemp("images") / "image_abs.hdf5"
    shutil.copy(abs_files["ToolHang"], path)
    with h5py.File(path, "a") as f:
        for name in f["data"]:
            T = f[f"data/{name}/actions"].shape[0]
            frames = np.random.default_rng(0).integers(0, 256, (T, 84, 84, 3), dtype=np.uint8)
            f.create_dataset(f"data/{name}/obs/agentview_image", data=frames)
    return path


def test_image_keys_are_never_flattened(image_file, tmp_path):
    """Mutant (main before issue 18): an image key became a 21,168-D float vector of the MLP input, and
    convert wrote it flattened as float32. Image keys go to the image encoder (tests/test_images.py)."""
    assert observation_kind((84, 84, 3), np.uint8) == "image"
    assert observation_kind((10,), np.float64) == "low_dim" and observation_kind((84, 84, 3), np.float32) == "low_dim"
    keys, _ = resolve_obs_keys(image_file, [])
    assert "agentview_image" not in keys and "robot0_eef_pos" in keys  # defaults are low-dim
    requested = ["object", "robot0_eef_pos", "agentview_image"]
    assert resolve_obs_keys(image_file, requested)[0] == requested
    episode = open_demos(image_file, requested).episodes(None)[0]
    assert "agentview_image" not in episode.obs and "agentview_image" in episode.images  # not in the flat vector
    for suffix in (".zarr", ".hdf5"):
        out = tmp_path / f"converted{suffix}"
        assert run_cli("convert", str(image_file), str(out)).returncode == 0
        frames = np.asarray(open_demos(out).episodes(None)[0].images["agentview_image"])
        assert frames.dtype == np.uint8 and frames.shape == (16, 84, 84, 3)
        with h5py.File(image_file, "r") as f:
            np.testing.assert_array_equal(frames, f["data/demo_0/obs/agentview_image"][()])


# ---------------------------------------------------------------------------------------------- pushes
@pytest.mark.parametrize("env_name,body", [("ToolHang", "tool"), ("TwoArmTransport", "payload")])
def test_pushes_kick_the_documented_body(env_name, body):
    """Mutant (main before issue 18): ToolHang/Transport pushes raised in every episode."""
    env = make_env(v141_env_args(env_name, delta=True))
    env.reset(0)
    target = env.push_target()
    assert body in target.root_body
    body_id = env.env.sim.model.body_name2id(target.root_body)
    env.push_object(np.array([0.5, 0.0, 0.0]))
    env.env.sim.forward()
    assert env.env.sim.data.cvel[body_id][3:].tolist() != [0, 0, 0]
    start = env.env.sim.data.body_xpos[body_id].copy()
    env.step(np.zeros(env.action_dim))
    assert env.env.sim.data.body_xpos[body_id][0] - start[0] > 0.005  # it moved along the kick
    env.close()
    check_pushable(v141_env_args(env_name, delta=True))
    with pytest.raises(UserError, match="no documented push target"):
        check_pushable({"env_name": "Door", "type": 1, "env_kwargs": {}})


# ---------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("config,env_name", [("tool_hang", "ToolHang"), ("transport", "TwoArmTransport")])
def test_paper_task_config_trains_and_evaluates_700_step_episodes(config, env_name, abs_files, tmp_path):
    cfg = load_config(CONFIG_DIR / f"{config}.yaml")
    assert (cfg.policy.type, cfg.policy.backbone, cfg.data.action_rotation) == ("flow", "unet", "rotation_6d")
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.train.grad_clip, cfg.train.ema_max_decay) == \
        (1e-4, 1e-5, 10.0, 0.995)
    assert (cfg.data.n_obs_steps, cfg.data.horizon, cfg.data.n_action_steps, cfg.eval.max_steps) == (2, 10, 8, 700)
    assert cfg.train.eval_every > 0 and cfg.data.obs_keys == []
    run = tmp_path / "run"
    small = ["policy.unet.down_dims=[16,32]", "policy.unet.step_embed_dim=16", "policy.flow.num_inference_steps=2",
             "train.steps=2", "train.batch_size=8", "train.warmup_steps=0", "train.log_every=1", "train.val_every=2",
             "train.eval_every=0", "train.threads=1"]
    result = run_cli("train", "--config", str(CONFIG_DIR / f"{config}.yaml"), "--dataset", str(abs_files[env_name]),
                     "--out", str(run), *sum((["--set", s] for s in small), []))
    assert result.returncode == 0, result.stderr
    meta = json.loads((run / "checkpoints" / "final.json").read_text())
    arms = len(ROBOTS[env_name])
    assert meta["action_dim"] == 10 * arms and meta["env_args"]["action_rotation"] == "rotation_6d"
    assert meta["obs_dim"] == {"ToolHang": 53, "TwoArmTransport": 59}[env_name]
    result = run_cli("eval", str(run), "--episodes", "2", "--workers", "2", "--push", "1", "--save-trajectories")
    assert result.returncode == 0, result.stderr
    # the drift diagnostics compare the policy's 6-D rotation chunks with the demos' converted actions
    result = run_cli("diagnose", str(run))
    assert result.returncode == 0, result.stderr
    assert np.isfinite(json.loads((run / "drift.json").read_text())["open_loop_chunk_mse"])
    report = json.loads((run / "eval.json").read_text())
    assert [e["steps"] for e in report["per_episode"]] == [700, 700]
    assert not any("error" in e for e in report["per_episode"])
    assert all(e.get("push_step") for e in report["per_episode"])  # pushed, not refused
    # a task without a documented push target is refused before its first episode, not in every episode
    meta["env_args"]["env_name"] = "Door"
    (run / "checkpoints" / "final.json").write_text(json.dumps(meta))
    result = run_cli("eval", str(run), "--episodes", "2", "--workers", "1", "--push", "1", "--out",
                     str(tmp_path / "door.json"))
    assert_user_error(result, "pushes are not supported for Door")
    assert not (tmp_path / "door.json").exists() and not list(tmp_path.glob("door*"))
