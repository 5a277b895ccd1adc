"""`expert train` (Stable-Baselines3) and `collect --env` (a Minari dataset written with Minari's DataCollector),
with a tiny PPO expert on InvertedPendulum-v5 trained in the test (seconds), and their bad input."""

import json
import zipfile

import numpy as np
import pytest

pytest.importorskip("stable_baselines3")
minari = pytest.importorskip("minari")

from tiny_data import assert_user_error, run_cli  # noqa: E402

ENV = "InvertedPendulum-v5"


@pytest.fixture(scope="module")
def tiny_expert(tmp_path_factory):
    out = tmp_path_factory.mktemp("experts") / "ip_ppo.zip"
    result = run_cli("expert", "train", "--env", ENV, "--algo", "ppo", "--steps", "1024", "--seed", "3",
                     "--eval-every", "512", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def _episodes(path):
    dataset = minari.MinariDataset(path / "data")
    return dataset, list(dataset.iterate_episodes())


def test_expert_train_writes_the_model_and_its_record(tiny_expert):
    record = json.loads(tiny_expert.with_suffix(".json").read_text())
    assert record["env"] == ENV and record["algo"] == "ppo" and record["seed"] == 3
    assert record["steps_done"] == 1024 and not record["stopped_by_time_limit"]
    assert record["evaluation"]["episodes"] == 20 and len(record["evaluation"]["returns"]) == 20
    assert record["chosen"] in ("best", "last") and "--steps 1024" in record["command"]
    assert (tiny_expert.parent / "ip_ppo.ckpt" / "best_model.zip").is_file()  # the EvalCallback's best so far
    with zipfile.ZipFile(tiny_expert) as z:
        assert "policy.pth" in z.namelist()
    shown = run_cli("expert", "eval", str(tiny_expert), "--env", ENV, "--episodes", "20")
    assert shown.returncode == 0 and f"mean return {record['evaluation']['mean_return']:.1f}" in shown.stdout


def test_expert_train_never_mixes_in_an_earlier_runs_checkpoints(tmp_path):
    out = tmp_path / "e.zip"
    args = ["expert", "train", "--env", ENV, "--algo", "ppo", "--steps", "512", "--out", str(out)]
    assert run_cli(*args, "--eval-every", "256").returncode == 0
    assert (tmp_path / "e.ckpt" / "best_model.zip").is_file()
    out.unlink()  # as if the run had been stopped before writing OUT: its checkpoints are not cleared silently
    assert_user_error(run_cli(*args), "e.ckpt exists")
    assert (tmp_path / "e.ckpt" / "best_model.zip").is_file()
    # with --overwrite the earlier best model goes: the new run (no evaluation before its end) can only be "last"
    assert run_cli(*args, "--eval-every", "100000", "--overwrite").returncode == 0
    assert not (tmp_path / "e.ckpt" / "best_model.zip").exists()
    assert json.loads(out.with_suffix(".json").read_text())["chosen"] == "last"
    (tmp_path / "e.ckpt" / "mine.txt").write_text("keep")
    assert_user_error(run_cli(*args, "--overwrite"), "not expert checkpoints")
    assert (tmp_path / "e.ckpt" / "mine.txt").read_text() == "keep"


def test_collect_env_writes_a_minari_dataset_with_seeded_episodes(tmp_path, tiny_expert, monkeypatch):
    root = tmp_path / "minari_root"
    out = root / "dopr" / "invertedpendulum" / "expert-v0"
    result = run_cli("collect", "--env", ENV, "--expert", str(tiny_expert), "--episodes", "4", "--seed", "10",
                     "--out", str(out), "--ref-episodes", "3")
    assert result.returncode == 0, result.stderr
    dataset, episodes = _episodes(out)
    assert dataset.total_episodes == 4 and [int(e.id) for e in episodes] == [0, 1, 2, 3]
    assert dataset.spec.env_spec.id == ENV and dataset.recover_environment().spec.id == ENV
    meta = dataset.storage.metadata
    assert meta["dataset_id"] == "dopr/invertedpendulum/expert-v0" and meta["num_episodes_average_score"] == 3
    assert meta["ref_min_score"] < meta["ref_max_score"]
    for e in episodes:
        assert e.observations.shape == (len(e.actions) + 1, 4) and e.actions.shape[1] == 1
        assert e.terminations[-1] or e.truncations[-1]
    # the per-episode seeds Minari stores are SEED + i
    import h5py

    with h5py.File(out / "data" / "main_data.hdf5") as f:
        assert [int(f[f"episode_{i}"].attrs["seed"]) for i in range(4)] == [10, 11, 12, 13]
    # readable by id from Minari's datasets root, as `--dataset minari:<id>` finds it
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    assert minari.load_dataset("dopr/invertedpendulum/expert-v0").total_steps == dataset.total_steps
    # the same command gives the same data; leaves no staging directory behind
    again = run_cli("collect", "--env", ENV, "--expert", str(tiny_expert), "--episodes", "4", "--seed", "10",
                    "--out", str(tmp_path / "again"), "--ref-episodes", "3")
    assert again.returncode == 0, again.stderr
    for a, b in zip(episodes, _episodes(tmp_path / "again")[1]):
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.observations, b.observations)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "minari_root"]


def test_collect_env_noise_perturbs_the_executed_actions_reproducibly(tmp_path, tiny_expert):
    args = ["collect", "--env", ENV, "--expert", str(tiny_expert), "--episodes", "2", "--seed", "10",
            "--ref-episodes", "1"]
    for name, noise in (("clean", "0"), ("noisy_a", "1"), ("noisy_b", "1")):
        result = run_cli(*args, "--noise", noise, "--out", str(tmp_path / name))
        assert result.returncode == 0, result.stderr
    clean, noisy_a, noisy_b = (_episodes(tmp_path / n) for n in ("clean", "noisy_a", "noisy_b"))
    assert noisy_a[0].storage.metadata["dataset_id"] == "dopr/invertedpendulum/noisy1-v0"
    first_clean, first_noisy = clean[1][0], noisy_a[1][0]
    assert first_noisy.observations[0] == pytest.approx(first_clean.observations[0])  # same seed, same start
    assert not np.allclose(first_noisy.actions[:5], first_clean.actions[:5])
    assert np.all(np.abs(first_noisy.actions) <= 3.0)  # clipped to InvertedPendulum's action space
    for a, b in zip(noisy_a[1], noisy_b[1]):
        np.testing.assert_array_equal(a.actions, b.actions)


def test_collect_env_bad_input_is_one_error_line_and_writes_nothing(tmp_path, tiny_expert):
    out = tmp_path / "out"
    base = ["collect", "--out", str(out)]
    not_a_zip = tmp_path / "notes.zip"
    not_a_zip.write_text("not a zip")
    other_zip = tmp_path / "other.zip"
    with zipfile.ZipFile(other_zip, "w") as z:
        z.writestr("weights.bin", b"0")
    cases = [
        ([*base, "--env", "Nope-v9", "--expert", str(tiny_expert)], "unknown Gymnasium environment"),
        ([*base, "--env", ENV, "--expert", str(tmp_path / "missing.zip")], "expert file not found"),
        ([*base, "--env", ENV, "--expert", str(not_a_zip)], "not a Stable-Baselines3 zip"),
        ([*base, "--env", ENV, "--expert", str(other_zip)], "not a Stable-Baselines3 model zip"),
        ([*base, "--env", "Hopper-v5", "--expert", str(tiny_expert)], "does not fit Hopper-v5"),
        ([*base, "--env", ENV, "--expert", str(tiny_expert), "--episodes", "0"], "--episodes must be >= 1"),
        ([*base, "--env", ENV, "--expert", str(tiny_expert), "--noise", "-1"], "--noise must be in"),
        ([*base, "--env", ENV, "--expert", str(tiny_expert), "--dataset-id", "a b"], "not a Minari id"),
        ([*base, "--env", ENV], "--env and --expert go together"),
    ]
    for args, fragment in cases:
        assert_user_error(run_cli(*args), fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.zip", "other.zip"]
    # an existing directory that is not a Minari dataset is never replaced
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_user_error(run_cli(*base, "--env", ENV, "--expert", str(tiny_expert)), "exists")
    assert_user_error(run_cli(*base, "--env", ENV, "--expert", str(tiny_expert), "--overwrite"),
                      "not a Minari dataset directory")
    assert (out / "keep.txt").read_text() == "mine"


def test_expert_train_bad_input_is_one_error_line(tmp_path):
    out = str(tmp_path / "e.zip")
    cases = [
        (["--env", "Nope-v9", "--out", out], "unknown Gymnasium environment"),
        (["--env", ENV, "--algo", "dqn", "--out", out], "unknown --algo"),
        (["--env", ENV, "--steps", "0", "--out", out], "--steps must be >= 1"),
        (["--env", ENV, "--max-minutes", "0", "--out", out], "--max-minutes must be > 0"),
        (["--env", ENV, "--out", str(tmp_path / "e.pt")], "must end in .zip"),
    ]
    for args, fragment in cases:
        assert_user_error(run_cli("expert", "train", *args), fragment)
    assert list(tmp_path.iterdir()) == []


def test_operator_noise_has_the_documented_statistics():
    """AR(1) noise of stationary std 0.3 level, held actions with probability 0.03 level per step, clipping to the
    action space; level 0 returns the expert's action untouched."""
    from dopr_robot.experts.minari_collect import OperatorNoise

    wide = np.full(3, 100.0)
    expert_action = np.array([0.1, -0.2, 0.3], dtype=np.float32)
    assert OperatorNoise(0.0, -wide, wide, np.random.default_rng(0))(expert_action) is expert_action
    operator = OperatorNoise(1.0, -wide, wide, np.random.default_rng(0))
    executed = np.array([operator(expert_action) for _ in range(20000)])
    held = np.all(executed[1:] == executed[:-1], axis=1)
    deviation = executed[1:][~held] - expert_action
    assert deviation.std() == pytest.approx(0.3, rel=0.1)
    lag1 = np.corrcoef(deviation[:-1, 0], deviation[1:, 0])[0, 1]
    assert 0.6 < lag1 < 0.9  # temporally correlated (0.8, less where a hold intervenes)
    assert 0.1 < held.mean() < 0.3  # 0.03 per step x 7.5 steps on average, of the steps not already held
    narrow = OperatorNoise(3.0, -np.full(3, 0.4), np.full(3, 0.4), np.random.default_rng(1))
    assert np.all(np.abs([narrow(expert_action) for _ in range(500)]) <= 0.4)


@pytest.mark.parametrize("name", ["Hopper-v5_td3", "Walker2d-v5_td3"])
def test_the_committed_expert_collects_offline(tmp_path, name):
    """data/experts/<env>_<algo>.zip loads with the installed SB3, fits its env, and its record holds the 20 returns
    the README quotes; one collected episode comes back as a Minari dataset."""
    from pathlib import Path

    expert = Path(__file__).resolve().parents[1] / "data" / "experts" / f"{name}.zip"
    record = json.loads(expert.with_suffix(".json").read_text())
    env = name.rsplit("_", 1)[0]
    assert record["env"] == env and len(record["evaluation"]["returns"]) == 20
    assert record["evaluation"]["mean_return"] == pytest.approx(np.mean(record["evaluation"]["returns"]))
    result = run_cli("collect", "--env", env, "--expert", str(expert), "--episodes", "1", "--seed", "5",
                     "--ref-episodes", "1", "--out", str(tmp_path / "one"))
    assert result.returncode == 0, result.stderr
    dataset, (episode,) = _episodes(tmp_path / "one")
    assert dataset.spec.env_spec.id == env and len(episode.actions) >= 1


def test_a_collected_dataset_trains_a_bc_policy_that_evaluates(tmp_path, tiny_expert):
    """collect --env's output is what `train --dataset DIR` reads (the Minari reader), and the checkpoint rebuilds
    the env for `eval`, with the dataset's reference scores."""
    data = tmp_path / "ip"
    assert run_cli("collect", "--env", ENV, "--expert", str(tiny_expert), "--episodes", "3", "--ref-episodes", "2",
                   "--out", str(data)).returncode == 0
    run = tmp_path / "run"
    sets = ["policy.backbone=resmlp", "policy.resmlp.hidden_dim=16", "policy.resmlp.num_blocks=1",
            "data.obs_keys=[obs]", "data.n_obs_steps=1", "data.horizon=4", "data.n_action_steps=2",
            "train.batch_size=8", "train.warmup_steps=1", "train.log_every=2", "train.val_every=4",
            "train.threads=1", "eval.max_steps=20"]
    trained = run_cli("train", "--dataset", str(data), "--policy", "bc", "--steps", "4", "--out", str(run),
                      *[a for s in sets for a in ("--set", s)])
    assert trained.returncode == 0, trained.stderr
    report = run / "eval.json"
    shown = run_cli("eval", str(run), "--episodes", "1", "--workers", "1", "--out", str(report))
    assert shown.returncode == 0, shown.stderr
    r = json.loads(report.read_text())
    assert r["per_episode"][0]["steps"] >= 1 and np.isfinite(r["per_episode"][0]["return"])
    assert set(r["reference_scores"]) == {"min", "max"} and r["reference_scores"]["min"] < r["reference_scores"]["max"]


def test_a_gymnasium_config_collects_its_dataset_and_keeps_the_best_return(tmp_path, tiny_expert):
    """data.expert: a missing data.path is collected from the SB3 expert as a Minari dataset before training
    (as a robosuite config collects its scripted demos), and train.select_metric=return keeps as `best` the
    in-training evaluation with the highest mean return on the selection seeds (ties to the later step); an
    unknown Gymnasium id is one error line."""
    data = tmp_path / "data" / "ip_expert"
    run = tmp_path / "run"
    sets = [f"data.path={data}", f"data.task={ENV}", f"data.expert={tiny_expert}", "data.collect_episodes=3",
            "data.horizon=4", "data.n_action_steps=2", "policy.type=bc", "policy.backbone=resmlp",
            "policy.resmlp.hidden_dim=16", "policy.resmlp.num_blocks=1", "train.steps=6", "train.log_every=2",
            "train.eval_every=2", "train.eval_episodes=2", "train.select_metric=return", "train.batch_size=8",
            "train.warmup_steps=0", "eval.max_steps=10", "eval.workers=1"]
    args = ["train", "--out", str(run)] + [a for s in sets for a in ("--set", s)]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert f"{data} not found: collecting 3 {ENV} episodes" in result.stdout
    assert len(list(minari.MinariDataset(data / "data").iterate_episodes())) == 3
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    selections = [(r["step"], r["return"]) for r in records if "return" in r]
    assert [s for s, _ in selections] == [2, 4, 6]
    best = json.loads((run / "checkpoints" / "best.json").read_text())["selection"]
    assert best["metric"] == "return"
    top = max(r for _, r in selections)
    assert best["return"] == top and best["step"] == max(s for s, r in selections if r == top)

    bad = run_cli("train", "--out", str(tmp_path / "run2"), "--set", f"data.path={tmp_path / 'other'}",
                  "--set", "data.task=Nope-v9", "--set", f"data.expert={tiny_expert}")
    assert_user_error(bad, "Nope-v9")
