"""Bad input: one line on stderr, exit code 2, no traceback, nothing overwritten."""

import h5py
import pytest

from conftest import run_cli


def assert_user_error(result, fragment: str) -> None:
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr


def test_missing_dataset(tmp_path):
    assert_user_error(run_cli("train", "--dataset", str(tmp_path / "nope.hdf5"), "--out", str(tmp_path / "r")),
                      "dataset not found")


def test_corrupt_dataset(tmp_path):
    bad = tmp_path / "bad.hdf5"
    bad.write_text("this is not HDF5")
    assert_user_error(run_cli("train", "--dataset", str(bad), "--out", str(tmp_path / "r")), "not a readable HDF5")
    empty = tmp_path / "empty.hdf5"
    with h5py.File(empty, "w") as f:
        f.create_group("something_else")
    assert_user_error(run_cli("train", "--dataset", str(empty), "--out", str(tmp_path / "r")), "no 'data' group")


def test_wrong_obs_key(tmp_path, lift_demos):
    result = run_cli("train", "--dataset", str(lift_demos), "--out", str(tmp_path / "r"),
                     "--set", "data.obs_keys=[object,robot0_eef_posx]")
    assert_user_error(result, "no observation key 'robot0_eef_posx'")


@pytest.mark.parametrize("override, fragment", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("optim.lr=-1", "optim.lr must be > 0"),
    ("optim.lr=.nan", "optim.lr must be > 0"),
    ("optim.ap.damping=.inf", "must be finite"),
    ("optim.name=sgd", "optim.name must be one of"),
    ("data.horizon=4", "data.horizon (4) must cover"),
    ("train.steps=ten", "train.steps must be int"),
])
def test_invalid_config_values(tmp_path, lift_demos, override, fragment):
    assert_user_error(run_cli("train", "--dataset", str(lift_demos), "--out", str(tmp_path / "r"), "--set", override),
                      fragment)


def test_missing_config_file(tmp_path):
    assert_user_error(run_cli("train", "--config", str(tmp_path / "none.yaml")), "config file not found")


def test_eval_of_missing_or_corrupt_run(tmp_path):
    assert_user_error(run_cli("eval", str(tmp_path / "no_run")), "checkpoint not found")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "final.json").write_text("{not json")
    assert_user_error(run_cli("eval", str(tmp_path / "run")), "malformed")


def test_collect_never_overwrites_silently(tmp_path):
    out = tmp_path / "keep.hdf5"
    out.write_bytes(b"precious")
    assert_user_error(run_cli("collect", "--episodes", "1", "--out", str(out)), "exists")
    assert out.read_bytes() == b"precious"


def test_usage_errors(tmp_path):
    assert_user_error(run_cli("train", "--set", "train.steps=1", "train.seed=2"), "unexpected extra argument")
    assert_user_error(run_cli("eval", "--episodes", "x", str(tmp_path)), "Invalid value for '--episodes'")
    assert_user_error(run_cli("trian"), "No such command")
