"""Run directories are never destroyed or shared by mistake; trainer state is periodic; resume is exact about
what it continues; every run records where it came from."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from dopr_robot.config import load_config
from dopr_robot.errors import UserError
from dopr_robot.training import train
from tiny_data import TINY_TRAIN, assert_user_error, run_cli, train_args, write_tiny_hdf5


@pytest.fixture(scope="module")
def tiny_h5(tmp_path_factory):
    return write_tiny_hdf5(tmp_path_factory.mktemp("data") / "tiny.hdf5")


@pytest.fixture(scope="module")
def finished_run(tiny_h5, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "done"
    train(load_config(None, [f"data.path={tiny_h5}", *TINY_TRAIN]), run, progress=False)
    return run


def tree(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_overwrite_with_a_bad_dataset_keeps_the_finished_run(finished_run, tmp_path):
    bad = tmp_path / "bad.hdf5"
    bad.write_text("not hdf5")
    before = tree(finished_run)
    assert_user_error(run_cli(*train_args(bad, finished_run), "--overwrite"), "not a readable HDF5")
    assert_user_error(run_cli(*train_args(tmp_path / "none.hdf5", finished_run), "--overwrite"), "dataset not found")
    assert_user_error(run_cli(*train_args(finished_run.parent / "tiny.hdf5", finished_run), "--overwrite",
                              "--set", "optim.lr=-1"), "optim.lr must be > 0")
    assert tree(finished_run) == before


def test_overwrite_never_deletes_the_dataset_or_a_directory_that_is_not_a_run(tmp_path):
    data = tmp_path / "data"
    dataset = write_tiny_hdf5(data / "demos.hdf5")
    (data / "notes.txt").write_text("unrelated")
    before = tree(data)
    assert_user_error(run_cli(*train_args(dataset, data, "train.steps=2"), "--overwrite"),
                      "not a dopr-robot run directory")
    assert_user_error(run_cli(*train_args(dataset, tmp_path, "train.steps=2"), "--overwrite"),
                      "not a dopr-robot run directory")
    (data / "config.yaml").write_text("looks like a run\n")  # even then: it holds the dataset this run reads
    assert_user_error(run_cli(*train_args(dataset, data, "train.steps=2"), "--overwrite"), "which this run needs")
    assert {k: v for k, v in tree(data).items() if k != "config.yaml"} == before


def test_overwrite_replaces_an_earlier_run(tiny_h5, tmp_path):
    run = tmp_path / "run"
    assert run_cli(*train_args(tiny_h5, run, "train.checkpoint_every=2")).returncode == 0
    assert (run / "checkpoints" / "step_0000002.json").is_file()
    result = run_cli(*train_args(tiny_h5, run, "train.steps=3", "train.checkpoint_every=0"), "--overwrite")
    assert result.returncode == 0, result.stderr
    assert not (run / "checkpoints" / "step_0000002.json").exists()  # nothing of the old run is mixed in
    assert json.loads((run / "checkpoints" / "final.json").read_text())["step"] == 3
    assert not (run / "run.lock").exists()  # released


def test_a_second_process_on_a_locked_run_fails_with_one_line(tiny_h5, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom dopr_robot.rundir import run_lock\n"
                               f"with run_lock({str(run)!r}):\n    print('locked', flush=True)\n    time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert_user_error(run_cli(*train_args(tiny_h5, run)), f"is in use by process {holder.pid}")
        assert sorted(p.name for p in run.iterdir()) == ["run.lock"]  # the loser wrote nothing
    finally:
        holder.kill()  # like kill -9: the kernel drops the flock; the stale file must not block anyone
        holder.wait()
    assert (run / "run.lock").exists()
    result = run_cli(*train_args(tiny_h5, run, "train.steps=2"))
    assert result.returncode == 0, result.stderr
    assert not (run / "run.lock").exists()


def test_run_lock_is_exclusive_within_a_process_too(tmp_path):
    from dopr_robot.rundir import run_lock

    with run_lock(tmp_path / "run") as path:
        assert path.read_text().strip() == str(os.getpid())
        with pytest.raises(UserError, match=f"in use by process {os.getpid()}"):
            with run_lock(tmp_path / "run"):
                pass
    assert not path.exists()
    with run_lock(tmp_path / "run"):  # reusable after release
        pass


def test_default_trainer_state_is_periodic_and_atomic(tiny_h5, tmp_path, monkeypatch):
    """The trainer state is saved every train.checkpoint_every steps (default 1000) through a temporary file:
    a save that dies half-way leaves the previous state whole, no temporary file behind, and resume goes on
    from it. (It used to check the default value only.)"""
    assert load_config(None).train.checkpoint_every == 1000
    cfg = load_config(None, [f"data.path={tiny_h5}", *TINY_TRAIN, "train.checkpoint_every=2"])
    run, real_save, saved = tmp_path / "run", torch.save, []

    def save_that_dies_at_step_4(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "optimizer" in obj:
            saved.append(obj["step"])
            if obj["step"] == 4 and saved.count(4) == 1:
                f.write(b"half a state")  # the write is cut short ...
                raise OSError("No space left on device")  # ... and fails
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_that_dies_at_step_4)
    with pytest.raises(Exception):
        train(cfg, run, progress=False)
    assert saved == [2, 4]  # periodic: every 2 steps
    assert torch.load(run / "trainer_state.pt", weights_only=False)["step"] == 2  # the previous state, whole
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    train(cfg, run, progress=False, resume=True)
    assert saved == [2, 4, 4, 6] and torch.load(run / "trainer_state.pt", weights_only=False)["step"] == 6


def test_resume_until_at_or_below_the_saved_step_is_refused(tiny_h5, tmp_path):
    run = tmp_path / "run"
    assert run_cli(*train_args(tiny_h5, run), "--until", "4").returncode == 0
    before = tree(run)
    for n in ("4", "2"):
        assert_user_error(run_cli("train", "--out", str(run), "--resume", "--until", n),
                          "already at step 4; --until")
    assert tree(run) == before
    assert run_cli("train", "--out", str(run), "--resume").returncode == 0
    assert_user_error(run_cli("train", "--out", str(run), "--resume"), "already at step 6")


def test_metrics_are_not_duplicated_after_a_crash_and_resume(tiny_h5, tmp_path):
    """State saved at step 2, metrics logged to step 4, then a crash: the resumed run logs 3, 4 once."""
    cfg = load_config(None, [f"data.path={tiny_h5}", *TINY_TRAIN])
    run = tmp_path / "run"
    train(cfg, run, progress=False, until=2)
    state_at_2 = (run / "trainer_state.pt").read_bytes()
    train(cfg, run, progress=False, resume=True, until=4)
    (run / "trainer_state.pt").write_bytes(state_at_2)  # what a kill -9 between two saves leaves
    train(cfg, run, progress=False, resume=True)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert torch.load(run / "trainer_state.pt", weights_only=False)["step"] == 6


def test_warmup_longer_than_training_warns(tiny_h5, tmp_path):
    result = run_cli(*train_args(tiny_h5, tmp_path / "run", "train.steps=2", "train.warmup_steps=2"))
    assert result.returncode == 0, result.stderr
    assert "warning: train.warmup_steps (2) >= train.steps (2)" in result.stdout


def test_provenance_is_written_at_train_start(finished_run, tiny_h5):
    from dopr_robot.provenance import provenance

    record = json.loads((finished_run / "provenance.json").read_text())
    assert record["dataset"]["sha256"] == hashlib.sha256(tiny_h5.read_bytes()).hexdigest()
    assert record["packages"]["torch"] == torch.__version__
    assert set(record["packages"]) >= {"torch", "mujoco", "robosuite", "diffusers", "numpy"}
    assert record["python"] == sys.version.split()[0] and record["platform"]
    git = record["git"]
    in_checkout = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert git["commit"] == (in_checkout or None) and isinstance(git["dirty"], (bool, type(None)))
    assert provenance(tiny_h5)["dataset"] == record["dataset"]  # the helper eval/compare embed
