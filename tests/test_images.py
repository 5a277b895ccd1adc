"""Image observations end to end: the encoder, image data read on demand, render-obs / collect --cameras, an image
policy trained and evaluated, and bad image input as one error line. Small: 32x32 frames, a 1/16-width ResNet."""

import hashlib
import json
import shutil

import h5py
import numpy as np
import pytest
import torch

from dopr_robot.checkpoint import load_policy
from dopr_robot.datasets import WindowDataset, open_demos
from dopr_robot.datasets.obs_keys import observation_kind
from dopr_robot.evaluation.lockstep import PolicySpec
from dopr_robot.policies.encoder import ObservationEncoder, ResNet18Trunk, load_torchvision_resnet18
from dopr_robot.provenance import file_sha256
from tiny_data import (TINY_IMAGE, assert_user_error, run_cli, tiny_episodes, tiny_image_episodes, train_args,
                       write_tiny_hdf5)

CAMERAS = ("agentview", "robot0_eye_in_hand")
IMAGE_KEYS = [f"{c}_image" for c in CAMERAS]
LOW_DIM = ["robot0_eef_pos", "robot0_gripper_qpos"]


# ------------------------------------------------------------------------------------------------- encoder
def test_resnet18_trunk_has_torchvision_keys_and_shapes():
    """torchvision's resnet18 without fc: 11,176,512 parameters (11,689,512 - 513,000), named as here."""
    trunk = ResNet18Trunk(1.0)
    state = trunk.state_dict()
    assert sum(v.numel() for v in state.values()) == 11_176_512
    expected = {"conv1.weight": (64, 3, 7, 7), "bn1.weight": (64,), "layer1.0.conv1.weight": (64, 64, 3, 3),
                "layer2.0.downsample.0.weight": (128, 64, 1, 1), "layer2.0.downsample.1.bias": (128,),
                "layer3.1.bn2.weight": (256,), "layer4.1.conv2.weight": (512, 512, 3, 3)}
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert "layer1.0.downsample.0.weight" not in state  # torchvision's first stage has no downsample


def test_torchvision_weights_load_and_batchnorm_statistics_are_left_out():
    trunk = ResNet18Trunk(1.0)
    torchvision_like = {k: torch.randn_like(v) for k, v in trunk.state_dict().items()}
    for name in {k.rsplit(".", 1)[0] for k, v in torchvision_like.items() if v.ndim == 1}:  # the norms
        torchvision_like.update({f"{name}.running_mean": torch.zeros(1), f"{name}.running_var": torch.ones(1),
                                 f"{name}.num_batches_tracked": torch.tensor(0)})
    torchvision_like.update({"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)})
    left_out = load_torchvision_resnet18(trunk, torchvision_like)
    assert "fc.weight" in left_out and "bn1.running_mean" in left_out
    assert not any(k in trunk.state_dict() for k in left_out)
    assert torch.equal(trunk.layer3[0].conv1.weight, torchvision_like["layer3.0.conv1.weight"])
    with pytest.raises(ValueError, match="width must be 1"):
        load_torchvision_resnet18(ResNet18Trunk(0.5), torchvision_like)


def test_random_crop_is_seeded_per_image_and_eval_crop_is_the_center():
    encoder = ObservationEncoder({"agentview_image": (32, 32, 3)}, width=0.0625, crop=28, keypoints=4,
                                 feature_dim=8)
    frames = torch.arange(6 * 32 * 32 * 3, dtype=torch.int64).remainder(251).to(torch.uint8).reshape(6, 32, 32, 3)
    crop_a = encoder._crop(frames, torch.Generator().manual_seed(0))
    crop_b = encoder._crop(frames, torch.Generator().manual_seed(0))
    crop_c = encoder._crop(frames, torch.Generator().manual_seed(1))
    assert crop_a.shape == (6, 28, 28, 3) and torch.equal(crop_a, crop_b) and not torch.equal(crop_a, crop_c)
    offsets = {next((dy, dx) for dy in range(5) for dx in range(5)
                    if torch.equal(crop_a[i], frames[i, dy:dy + 28, dx:dx + 28])) for i in range(6)}
    assert len(offsets) > 1  # one window per image, not one per batch
    encoder.eval()
    assert torch.equal(encoder._crop(frames, None), frames[:, 2:30, 2:30])


# ------------------------------------------------------------------------------------------------ image data
def test_image_keys_are_read_on_demand_as_uint8_from_hdf5_and_zarr(tmp_path):
    episodes = tiny_image_episodes(cameras=CAMERAS)
    path = write_tiny_hdf5(tmp_path / "img.hdf5", episodes)
    with h5py.File(path) as f:
        assert f["data/demo_0/obs/agentview_image"].chunks == (1, 32, 32, 3)  # random frames read one chunk each
    zarr_path = tmp_path / "img.zarr"
    open_demos(path).save(zarr_path)
    for source in (path, zarr_path):
        demos = open_demos(source, ["robot0_eef_pos", *IMAGE_KEYS])
        eps = demos.episodes(None)
        assert set(eps[1].images) == set(IMAGE_KEYS) and set(eps[1].obs) == {"robot0_eef_pos"}
        assert not isinstance(eps[1].images["agentview_image"], np.ndarray)  # a reference, not loaded frames
        windows = WindowDataset(eps, ["robot0_eef_pos", *IMAGE_KEYS], 2, 8, 4)
        obs, _ = windows.batch(torch.tensor([0, 25, 40]))
        assert obs["low_dim"].shape == (3, 2, 3) and obs["agentview_image"].dtype == torch.uint8
        steps = windows.index[torch.tensor([0, 25, 40])][:, :2].numpy()
        all_frames = np.concatenate([e.images["robot0_eye_in_hand_image"] for e in episodes])
        assert np.array_equal(obs["robot0_eye_in_hand_image"].numpy(), all_frames[steps])
        cached = WindowDataset(eps, ["robot0_eef_pos", *IMAGE_KEYS], 2, 8, 4, image_cache="memory")
        assert torch.equal(cached.batch(torch.tensor([0, 25, 40]))[0]["robot0_eye_in_hand_image"],
                           obs["robot0_eye_in_hand_image"])
    assert observation_kind((32, 32, 3), np.uint8) == "image" and observation_kind((10,), np.float64) == "low_dim"


def test_mixed_image_sizes_and_missing_image_keys_are_one_error_line(tmp_path):
    small, large = tiny_image_episodes(n=2, size=32), tiny_image_episodes(n=2, size=40)
    mixed = write_tiny_hdf5(tmp_path / "mixed.hdf5", small + large)
    assert_user_error(run_cli(*train_args(mixed, tmp_path / "r1", "data.obs_keys=[object,agentview_image]",
                                          *TINY_IMAGE)), "mixes image sizes")
    low_dim_only = write_tiny_hdf5(tmp_path / "low.hdf5", tiny_episodes(n=3))
    assert_user_error(run_cli(*train_args(low_dim_only, tmp_path / "r2", "data.obs_keys=[object,agentview_image]",
                                          *TINY_IMAGE)), "no observation key 'agentview_image'")
    images = write_tiny_hdf5(tmp_path / "img.hdf5", tiny_image_episodes(n=3))
    assert_user_error(run_cli(*train_args(images, tmp_path / "r3", "data.obs_keys=[agentview_image]", *TINY_IMAGE,
                                          "policy.encoder.crop=40")), "larger than the 32x32 images")
    assert not any((tmp_path / r).exists() for r in ("r1", "r2", "r3"))


def test_image_checkpoint_rebuilds_encoder_and_eval_crop_from_its_json_alone(tmp_path):
    data = write_tiny_hdf5(tmp_path / "img.hdf5", tiny_image_episodes(cameras=CAMERAS))
    result = run_cli(*train_args(data, tmp_path / "run", f"data.obs_keys=[object,{','.join(IMAGE_KEYS)}]",
                                 *TINY_IMAGE, "policy.encoder.pool=avg", "policy.type=flow"))
    assert result.returncode == 0, result.stderr
    alone = tmp_path / "alone"
    alone.mkdir()
    for suffix in (".json", ".safetensors"):
        shutil.copy(tmp_path / "run" / "checkpoints" / f"final{suffix}", alone / f"final{suffix}")
    policy, meta = load_policy(alone / "final.json")
    assert meta["image_shapes"] == {k: [32, 32, 3] for k in IMAGE_KEYS} and meta["obs_dim"] == 10
    encoder = policy.obs_encoder
    assert encoder.keys == IMAGE_KEYS and encoder.crop == 28 and not encoder.training
    assert isinstance(encoder.cameras["agentview_image"].pool, torch.nn.Sequential)  # avg pooling, from the JSON
    assert encoder.cameras["agentview_image"].trunk.conv1.out_channels == 4  # width 1/16 of 64
    obs = {"low_dim": torch.zeros(2, 2, 10),
           **{k: torch.randint(0, 256, (2, 2, 32, 32, 3), dtype=torch.uint8) for k in IMAGE_KEYS}}
    first = policy.predict_action(obs, torch.Generator().manual_seed(0))
    again = load_policy(tmp_path / "run")[0].predict_action(obs, torch.Generator().manual_seed(0))
    assert first.shape == (2, 16, 7) and torch.equal(first, again)
    # what a device-mode worker is told of this policy, read from the JSON alone, is what the policy says
    spec, from_json = PolicySpec.of(policy), PolicySpec.of_checkpoint(meta)
    assert from_json.image_keys == spec.image_keys == tuple(IMAGE_KEYS)
    assert (from_json.n_obs_steps, from_json.action_dim) == (spec.n_obs_steps, spec.action_dim)
    np.testing.assert_array_equal(from_json.obs_scale, spec.obs_scale)


# ----------------------------------------------------------------------------- rendering (real robosuite)
def test_render_obs_frames_equal_collect_cameras_frames_and_leave_in_untouched(tmp_path, lift_image_demos):
    """render-obs on the low-dim part of collected demos gives, frame for frame, what collect --cameras rendered
    at the same states (fails if frames are drawn from one-substep-stale poses or with indicator sites shown)."""
    low_dim = tmp_path / "low.hdf5"
    shutil.copy(lift_image_demos, low_dim)
    with h5py.File(low_dim, "r+") as f:
        for demo in f["data"]:
            for key in IMAGE_KEYS:
                del f["data"][demo]["obs"][key]
    digest = hashlib.sha256(low_dim.read_bytes()).hexdigest()
    out = tmp_path / "rendered.hdf5"
    result = run_cli("render-obs", low_dim, out, "--cameras", ",".join(CAMERAS), "--size", "32")
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(low_dim.read_bytes()).hexdigest() == digest
    with h5py.File(lift_image_demos) as collected, h5py.File(out) as rendered:
        assert json.loads(rendered["data"].attrs["image_cameras"]) == list(CAMERAS)
        assert rendered["data"].attrs["image_height"] == 32
        for demo in collected["data"]:
            for key in IMAGE_KEYS:
                a, b = collected["data"][demo]["obs"][key][()], rendered["data"][demo]["obs"][key][()]
                assert a.shape == b.shape and a.std() > 5  # real frames, not a blank context
                assert np.array_equal(a, b), f"{demo} {key}: {(a != b).any(-1).sum()} pixels differ"
    assert_user_error(run_cli("render-obs", low_dim, tmp_path / "x.hdf5", "--cameras", "agentview,nosuchcam"),
                      "camera 'nosuchcam' is not in Lift")
    assert_user_error(run_cli("render-obs", out, tmp_path / "y.hdf5", "--cameras", "agentview", "--size", "32"),
                      "already has obs/agentview_image")
    assert not (tmp_path / "x.hdf5").exists() and not (tmp_path / "y.hdf5").exists()


def test_image_policy_trains_evaluates_two_episodes_and_eval_env_renders_the_dataset_frames(tmp_path,
                                                                                            lift_image_demos):
    run = tmp_path / "run"
    result = run_cli(*train_args(lift_image_demos, run, f"data.obs_keys=[{','.join(LOW_DIM + IMAGE_KEYS)}]",
                                 *TINY_IMAGE, "train.steps=3", "train.batch_size=8"))
    assert result.returncode == 0, result.stderr
    result = run_cli("eval", run, "--episodes", "2", "--workers", "1", "--max-steps", "8")
    assert result.returncode == 0, result.stderr
    report = json.loads((run / "eval.json").read_text())
    assert [e["seed"] for e in report["per_episode"]] == [100000, 100001]
    assert not any("error" in e for e in report["per_episode"]) and all(e["steps"] == 8 for e in report["per_episode"])
    # the eval environment, built from the checkpoint as the workers build it, renders the dataset's frame
    from dopr_robot.envs import ImageSpec, make_env

    meta = json.loads((run / "checkpoints" / "final.json").read_text())
    env = make_env(meta["env_args"], images=ImageSpec.from_image_shapes(meta["image_shapes"]))
    try:
        with h5py.File(lift_image_demos) as f:
            demo = f["data/demo_0"]
            env.reset(int(demo.attrs["seed"]))  # the demo's model: Lift's cube size is drawn at reset
            for t in (0, 17):
                obs = env.restore(demo["states"][t])
                for key in IMAGE_KEYS:
                    assert np.array_equal(obs[key], demo["obs"][key][t]), (t, key)
    finally:
        env.close()


def test_collecting_with_cameras_changes_no_state(lift_image_demos, lift_demos):
    """Rendering observations reads the simulation and restores it bit for bit: the demo of seed 0 collected with
    two cameras has exactly the states and actions of the one collected without (fails if rendering's mj_forward
    were left in the simulation data the controller reads)."""
    with h5py.File(lift_image_demos) as with_cameras, h5py.File(lift_demos) as without:
        a, b = with_cameras["data/demo_0"], without["data/demo_0"]
        assert a.attrs["seed"] == b.attrs["seed"] == 0
        assert np.array_equal(a["states"][()], b["states"][()]) and np.array_equal(a["actions"][()], b["actions"][()])


def test_eval_of_a_checkpoint_naming_a_camera_the_env_lacks_is_one_error_line(tmp_path):
    from safetensors.torch import load_file, save_file

    data = write_tiny_hdf5(tmp_path / "img.hdf5", tiny_image_episodes())
    run = tmp_path / "run"
    assert run_cli(*train_args(data, run, "data.obs_keys=[object,agentview_image]", *TINY_IMAGE)).returncode == 0
    final = run / "checkpoints" / "final"
    meta = json.loads(final.with_suffix(".json").read_text())
    meta["image_shapes"] = {"nosuchcam_image": meta["image_shapes"]["agentview_image"]}
    meta["obs_keys"] = ["object", "nosuchcam_image"]
    weights = {k.replace("agentview_image", "nosuchcam_image"): v
               for k, v in load_file(str(final.with_suffix(".safetensors"))).items()}
    save_file(weights, str(final.with_suffix(".safetensors")))
    meta["weights_sha256"] = file_sha256(final.with_suffix(".safetensors"))
    final.with_suffix(".json").write_text(json.dumps(meta))
    result = run_cli("eval", run, "--episodes", "2", "--workers", "1", "--max-steps", "4")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]  # beside the progress bar
    assert result.returncode == 2 and len(errors) == 1 and "camera 'nosuchcam' is not in Lift" in errors[0]
    assert result.stderr.rstrip().endswith(errors[0]) and "Traceback" not in result.stderr
    assert not (run / "eval.json").exists()


def test_wrong_camera_is_one_error_line_before_any_rollout(tmp_path):
    result = run_cli("collect", "--episodes", "1", "--out", tmp_path / "c.hdf5", "--cameras", "agentview,eye")
    assert_user_error(result, "camera 'eye' is not in Lift")
    assert not (tmp_path / "c.hdf5").exists()
