"""The bad-input matrix of demonstration files and output paths: each case is one `error:` line, exit code 2,
and nothing written (no run directory, no converted file); damaged data is never read as zeros."""

import h5py
import numpy as np
import pytest

from dopr_robot.datasets import open_demos
from tiny_data import assert_user_error, run_cli, tiny_episodes, train_args, write_tiny_hdf5


@pytest.fixture()
def good_h5(tmp_path):
    return write_tiny_hdf5(tmp_path / "good.hdf5")


def assert_rejected_everywhere(path, tmp_path, fragment, commands=("train", "inspect", "convert")):
    """`train`, `inspect` and `convert` each fail with one line naming the problem and write nothing."""
    for command in commands:
        if command == "train":
            result = run_cli(*train_args(path, tmp_path / "run"))
        elif command == "inspect":
            result = run_cli("inspect", str(path))
        else:
            result = run_cli("convert", str(path), str(tmp_path / "out.zarr"))
        assert_user_error(result, fragment)
    assert not (tmp_path / "run").exists() and not (tmp_path / "out.zarr").exists()


def test_hdf5_with_a_zeroed_block_mid_file(good_h5, tmp_path):
    size = good_h5.stat().st_size
    with open(good_h5, "r+b") as f:  # as a bad sector or an interrupted copy leaves it
        f.seek(int(0.4 * size))
        f.write(b"\0" * int(0.2 * size))
    assert_rejected_everywhere(good_h5, tmp_path, "is corrupt or unreadable")


def test_empty_train_mask(tmp_path):
    path = write_tiny_hdf5(tmp_path / "d.hdf5", masks={"train": [], "valid": [5]})
    assert_rejected_everywhere(path, tmp_path, "mask/train is empty", commands=("train",))


def test_action_dims_differ_between_demos(tmp_path):
    episodes = tiny_episodes(4) + tiny_episodes(2, action_dim=6)
    path = write_tiny_hdf5(tmp_path / "d.hdf5", episodes)
    assert_rejected_everywhere(path, tmp_path, "demo_4 has 6-D actions, demo_0 7-D")


def test_demo_missing_an_obs_key(good_h5, tmp_path):
    with h5py.File(good_h5, "a") as f:
        del f["data/demo_3/obs/robot0_eef_quat"]
    assert_rejected_everywhere(good_h5, tmp_path, "demo_3 has no observation key 'robot0_eef_quat'",
                               commands=("inspect", "convert"))


def test_mask_naming_a_demo_that_does_not_exist(good_h5, tmp_path):
    with h5py.File(good_h5, "a") as f:
        del f["mask/valid"]
        f.create_dataset("mask/valid", data=np.array([b"demo_5", b"demo_17"]))
    assert_rejected_everywhere(good_h5, tmp_path, "mask/valid names demo_17, which is not a demo",
                               commands=("inspect", "convert"))


@pytest.fixture()
def good_zarr(good_h5, tmp_path):
    path = tmp_path / "good.zarr"
    open_demos(good_h5).save(path)
    return path


def test_zarr_with_a_missing_chunk_is_not_read_as_zeros(good_zarr, tmp_path):
    chunks = [p for p in (good_zarr / "data" / "action").iterdir() if not p.name.startswith(".")]
    assert chunks
    chunks[0].unlink()
    assert_rejected_everywhere(good_zarr, tmp_path, "data/action is missing 1 of 1 chunk files",
                               commands=("train", "inspect"))


def test_zarr_with_a_truncated_chunk(good_zarr, tmp_path):
    chunk = good_zarr / "data" / "object" / "0.0"
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    assert_rejected_everywhere(good_zarr, tmp_path, "data/object is corrupt or unreadable",
                               commands=("train", "inspect"))


def test_zarr_with_a_flipped_byte_in_a_chunk(good_zarr, tmp_path):
    """Chunks written here carry a checksum: damage that keeps the length is caught too."""
    chunk = good_zarr / "data" / "object" / "0.0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert_rejected_everywhere(good_zarr, tmp_path, "data/object is corrupt or unreadable",
                               commands=("train", "inspect"))


def test_blosc_zarr_from_another_writer_with_a_truncated_chunk(good_zarr, tmp_path):
    """zarr's default v2 codec (Blosc, as diffusion_policy writes) trusts its own header over the file length,
    so a truncated chunk would decode past its buffer; the reader checks the two agree first."""
    import zarr

    source = zarr.open_group(str(good_zarr), mode="r")
    path = tmp_path / "blosc.zarr"
    target = zarr.open_group(str(path), mode="w", zarr_format=2)
    target.attrs.update(dict(source.attrs))
    for name in [f"data/{k}" for k in source["data"].keys()] + ["meta/episode_ends"]:
        values = source[name][:]
        target.create_array(name, shape=values.shape, dtype=values.dtype, chunks=values.shape)[:] = values
    assert zarr.open_group(str(path), mode="r")["data/object"].compressors[0].codec_id == "blosc"
    assert len(open_demos(path).names) == 6  # intact, it reads
    chunk = path / "data" / "object" / "0.0"
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    assert_rejected_everywhere(path, tmp_path, "data/object is corrupt or unreadable (chunk 0.0 is",
                               commands=("train", "inspect"))


def test_zarr_written_here_keeps_all_zero_chunks(good_h5, tmp_path):
    """An all-zero column is stored, not skipped, so a missing chunk file always means damage."""
    episodes = tiny_episodes()
    for e in episodes:
        e.states = np.zeros_like(e.states)
    path = tmp_path / "zeros.zarr"
    open_demos(write_tiny_hdf5(tmp_path / "z.hdf5", episodes)).save(path)
    assert np.all(open_demos(path).episodes(None)[0].states == 0)
    assert any(not p.name.startswith(".") for p in (path / "data" / "states").iterdir())


def test_invalid_or_unwritable_out_fails_before_the_work(good_h5, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    assert_user_error(run_cli(*train_args(good_h5, a_file / "run")), "not a directory")
    assert_user_error(run_cli(*train_args(good_h5, a_file)), "exists and is not a directory")
    assert_user_error(run_cli(*train_args(good_h5, "/proc/dopr_run")), "not writable")
    assert_user_error(run_cli("convert", str(good_h5), str(a_file / "x.zarr")), "not a directory")
    assert_user_error(run_cli("convert", str(good_h5), str(tmp_path / "x.txt")), "must end in .zarr")
    assert_user_error(run_cli("convert", str(good_h5), "/proc/dopr.zarr"), "not writable")
    # collect checks --out before any rollout (on main it ran the expert first, then failed writing)
    assert_user_error(run_cli("collect", "--episodes", "1", "--out", str(a_file / "demos.hdf5")),
                      "not a directory")
    assert_user_error(run_cli("collect", "--episodes", "1", "--out", str(tmp_path / "demos.txt")), "must end in")
    (tmp_path / "adir.hdf5").mkdir()
    assert_user_error(run_cli("collect", "--episodes", "1", "--out", str(tmp_path / "adir.hdf5"), "--overwrite"),
                      "is a directory")
    assert a_file.read_text() == "keep" and (tmp_path / "adir.hdf5").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "adir.hdf5", "good.hdf5"]
