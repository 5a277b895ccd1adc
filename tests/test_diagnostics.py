"""Test-time-feedback diagnostics: drift, band and departure on a synthetic case with a known answer, Gaussian KL
and covariance shift against closed forms, and `dopr-robot diagnose` end to end on a real tiny run."""

import json
import re

import numpy as np
import pytest
import torch

from conftest import run_cli
from dopr_robot.datasets.robomimic_hdf5 import RobomimicFile, write_robomimic
from dopr_robot.diagnostics import (covariance_shift, demo_band, departure_step, diagnose, distribution_shift,
                                    drift_curve, fit_gaussian, gaussian_kl, nearest_distances)
from dopr_robot.diagnostics import drift as drift_module
from test_cli import assert_user_error
from test_train_eval import tiny_config


# --- drift on a synthetic trajectory with a known answer

def line_demos(n_demos=5, length=50, spacing=0.01, step=0.1):
    """Demo i runs along x at height y = i * spacing: each demo point's nearest other-demo point is `spacing` away."""
    x = step * np.arange(length)
    return [np.stack([x, np.full(length, i * spacing)], axis=1) for i in range(n_demos)]


def test_drift_band_and_departure_on_a_rollout_leaving_the_demos_at_a_known_rate():
    demos = line_demos()
    rate = 0.003  # the rollout rises above the top demo (y = 0.04) by `rate` per step, moving along x like the demos
    t = np.arange(30)
    rollout = np.stack([0.1 * t, 0.04 + rate * t], axis=1)
    distances = nearest_distances(rollout, np.concatenate(demos))
    np.testing.assert_allclose(distances, rate * t, atol=1e-12)  # nearest point: the top demo at the same x
    lo, hi = demo_band(demos)
    assert lo == pytest.approx(0.01) and hi == pytest.approx(0.01)  # leave-one-demo-out: the neighbour demo
    curve = drift_curve([distances])
    assert departure_step(curve, hi) == 4  # 0.003 * 3 = 0.009 <= 0.01 < 0.012 = 0.003 * 4
    assert departure_step([0.0, 0.005, None, 0.01], hi) is None  # never above the band: no departure


def test_drift_curve_averages_running_episodes_and_splits_by_outcome():
    distances = [np.array([1.0, 2.0, 3.0]), np.array([3.0, 4.0])]
    assert drift_curve(distances) == [2.0, 3.0, 3.0]  # step 2: only the longer episode is still running
    assert drift_curve(distances, [True, False]) == [1.0, 2.0, 3.0]
    assert drift_curve(distances, [False, True]) == [3.0, 4.0, None]
    assert drift_curve(distances, [False, False]) == [None, None, None]


def test_nearest_distances_is_exact_across_blocks_and_leaves_own_group_out(monkeypatch):
    rng = np.random.default_rng(0)
    queries, reference = rng.normal(size=(37, 5)), rng.normal(size=(53, 5))
    brute = np.sqrt(((queries[:, None] - reference[None]) ** 2).sum(-1))
    monkeypatch.setattr(drift_module, "BLOCK_ENTRIES", 100)  # forces 2-row blocks: block seams must not matter
    np.testing.assert_allclose(nearest_distances(queries, reference), brute.min(1), rtol=1e-12)
    q_groups, r_groups = np.arange(37) % 3, np.arange(53) % 3
    masked = np.where(q_groups[:, None] == r_groups[None], np.inf, brute)
    np.testing.assert_allclose(nearest_distances(queries, reference, q_groups, r_groups), masked.min(1), rtol=1e-12)
    assert demo_band([np.zeros((4, 2))]) is None  # one demo has no other demo to be compared with


# --- distribution shift against closed forms

def test_kl_of_identical_gaussians_is_zero_and_shifted_ones_match_closed_forms():
    x = np.random.default_rng(1).normal(size=(500, 4))
    same = distribution_shift(x, x)
    assert same["kl_gaussian"] == pytest.approx(0.0, abs=1e-10)
    assert same["cov_shift"] == pytest.approx(0.0, abs=1e-12) and same["cov_logdet_ratio"] == pytest.approx(0.0, abs=1e-10)
    k, eye = 3, np.eye(3)
    mu = np.array([1.0, -2.0, 0.5])
    assert gaussian_kl(mu, eye, np.zeros(k), eye) == pytest.approx(0.5 * mu @ mu)  # mean shift: |mu|^2 / 2
    s2 = 4.0
    assert gaussian_kl(np.zeros(k), s2 * eye, np.zeros(k), eye) == pytest.approx(0.5 * k * (s2 - 1 - np.log(s2)))
    assert covariance_shift(s2 * eye, eye) == pytest.approx((s2 - 1, k * np.log(s2)))
    # a full-covariance case against torch's implementation
    a, b = np.random.default_rng(2).normal(size=(2, k, k))
    cov_p, cov_q = a @ a.T + 0.5 * eye, b @ b.T + 0.5 * eye
    mean_p, mean_q = np.array([0.3, 0.1, -0.2]), np.array([-0.1, 0.4, 0.0])
    reference = torch.distributions.kl_divergence(
        torch.distributions.MultivariateNormal(torch.tensor(mean_p), torch.tensor(cov_p)),
        torch.distributions.MultivariateNormal(torch.tensor(mean_q), torch.tensor(cov_q)))
    assert gaussian_kl(mean_p, cov_p, mean_q, cov_q) == pytest.approx(float(reference), rel=1e-9)


def test_ridge_keeps_a_constant_dimension_finite():
    x = np.random.default_rng(3).normal(size=(100, 2))
    x[:, 1] = 0.5  # constant in the demos, as a resting object's height is
    mean, cov = fit_gaussian(x, ridge=1e-3)
    assert cov[1, 1] == pytest.approx(1e-3) and mean[1] == pytest.approx(0.5)
    moved = x.copy()
    moved[:, 1] += np.sqrt(1e-3)  # one ridge standard deviation off along the constant dimension
    assert distribution_shift(moved, x, ridge=1e-3)["kl_gaussian"] == pytest.approx(0.5, rel=1e-6)


# --- end to end on a real tiny run

@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, lift_demos):
    from dopr_robot.training import train

    run = train(tiny_config(lift_demos), tmp_path_factory.mktemp("diag") / "run", progress=False)
    result = run_cli("eval", str(run), "--episodes", "2", "--workers", "1", "--max-steps", "30",
                     "--save-trajectories")
    assert result.returncode == 0, result.stderr
    return run


def test_diagnose_cli_writes_drift_json_and_png(evaluated_run):
    run = evaluated_run
    result = run_cli("diagnose", str(run))
    assert result.returncode == 0, result.stderr
    assert "departure step" in result.stdout
    report = json.loads((run / "drift.json").read_text())
    eval_report = json.loads((run / "eval.json").read_text())
    assert report["closed_loop_success"] == eval_report["success_rate"]
    assert report["n_success"] + report["n_failure"] == 2
    longest = max(e["steps"] for e in eval_report["per_episode"])
    assert report["steps"] == list(range(longest)) and len(report["drift_mean"]) == longest
    assert all(np.isfinite(v) and v >= 0 for v in report["drift_mean"])
    lo, hi = report["demo_band"]
    assert 0 <= lo <= hi
    first_above = next((t for t, v in enumerate(report["drift_mean"]) if v > hi), None)
    assert report["departure_step"] == first_above
    assert report["kl_gaussian"] >= 0 and report["cov_shift"] >= 0
    assert report["open_loop_windows"] > 0 and np.isfinite(report["open_loop_chunk_mse"])
    assert report["checkpoint"].endswith("final.json") and report["rollouts"].endswith("eval_rollouts.hdf5")
    assert (run / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the open-loop error is seeded: the same seed gives the same number, in-process as from the CLI
    again = diagnose(run, out=run / "again.json", seed=0, plot=False)
    assert again["open_loop_chunk_mse"] == report["open_loop_chunk_mse"]
    assert again["drift_mean"] == report["drift_mean"]


def test_diagnose_bad_input_is_one_line(evaluated_run, tmp_path):
    before = (evaluated_run / "drift.json").read_bytes() if (evaluated_run / "drift.json").exists() else None
    assert_user_error(run_cli("diagnose", str(tmp_path)), "rollouts file not found")
    # rollouts lacking an observation key the checkpoint was trained on
    with RobomimicFile(evaluated_run / "eval_rollouts.hdf5") as f:
        env_args, episodes = f.env_args, [f.read(name, ["object", "robot0_eef_pos"]) for name in f.demos]
    partial = tmp_path / "partial_rollouts.hdf5"
    write_robomimic(partial, episodes, env_args, attrs={"source": "dopr-robot eval", "checkpoint": "final.json"})
    assert_user_error(run_cli("diagnose", str(evaluated_run), "--rollouts", str(partial)),
                      "no observation key(s) robot0_eef_quat, robot0_gripper_qpos")
    after = (evaluated_run / "drift.json").read_bytes() if (evaluated_run / "drift.json").exists() else None
    assert after == before  # validation fails before anything is written


def test_diagnose_refuses_files_that_are_not_this_runs_rollouts(evaluated_run, lift_demos, tmp_path):
    """Fault: `diagnose --rollouts DEMOS.hdf5` took demonstrations for rollouts (every demo a success: 100%
    closed-loop success for a 17% policy); rollouts of another run's checkpoint were read as this run's."""
    before = (evaluated_run / "drift.json").read_bytes() if (evaluated_run / "drift.json").exists() else None
    assert_user_error(run_cli("diagnose", str(evaluated_run), "--rollouts", str(lift_demos)),
                      "is not a rollouts file of `dopr-robot eval --save-trajectories`")
    other = tmp_path / "other" / "checkpoints" / "final.json"
    other.parent.mkdir(parents=True)
    other.write_text("{}")
    with RobomimicFile(evaluated_run / "eval_rollouts.hdf5") as f:
        env_args, episodes = f.env_args, [f.read(name) for name in f.demos]
    foreign = tmp_path / "foreign_rollouts.hdf5"
    write_robomimic(foreign, episodes, env_args, attrs={"source": "dopr-robot eval", "checkpoint": str(other)})
    assert_user_error(run_cli("diagnose", str(evaluated_run), "--rollouts", str(foreign)),
                      f"come from checkpoint {other}, which is not a checkpoint of {evaluated_run}")
    after = (evaluated_run / "drift.json").read_bytes() if (evaluated_run / "drift.json").exists() else None
    assert after == before


def test_diagnose_archives_the_report_it_replaces(evaluated_run, tmp_path):
    """Fault: a second `diagnose` overwrote drift.json and drift.png; like eval's reports, the earlier pair is
    now renamed aside (<stem>-<its time>.json / .png), never lost."""
    out = tmp_path / "drift.json"
    out.write_text('{"earlier": true}\n')
    out.with_suffix(".png").write_bytes(b"earlier plot")
    diagnose(evaluated_run, out=out, seed=0)
    archived = sorted(tmp_path.glob("drift-*.json"))
    assert len(archived) == 1 and re.fullmatch(r"drift-\d{8}-\d{6}\.json", archived[0].name)
    assert archived[0].read_text() == '{"earlier": true}\n'
    assert archived[0].with_suffix(".png").read_bytes() == b"earlier plot"
    assert "drift_mean" in json.loads(out.read_text()) and out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


# --- spectrum: what damping leaves of AP's preconditioner

def test_spectrum_cond_equals_the_conditioning_dopr_itself_uses(evaluated_run):
    """The spectrum's S is the S DoPr forms: on the same batch and loss noise, cond(S_d) at gamma equals the
    condition number of the damped matrix DoPr factorizes in its own step (primal path, health spectrum)."""
    from dopr_robot.checkpoint import load_policy
    from dopr_robot.config import config_from_dict
    from dopr_robot.datasets import WindowDataset
    from dopr_robot.diagnostics.demos import training_demos
    from dopr_robot.diagnostics.spectrum import layer_spectra
    from dopr_robot.optim import DoPr

    ckpt = evaluated_run / "checkpoints" / "final.json"
    policy, meta = load_policy(ckpt)
    cfg = config_from_dict(meta["config"])
    _, train_eps, _ = training_demos(meta, ckpt, None)
    windows = WindowDataset(train_eps, meta["obs_keys"], policy.n_obs_steps, policy.horizon, cfg.data.n_action_steps)
    gamma, batch = 3.0, 32
    layers = DoPr(policy, ap=False).layers
    rows = layer_spectra(policy, windows, layers, batch, batches=1, seed=7, gammas=[gamma],
                         damping_form="mean", eps=1e-8)
    assert [r["name"] for r in rows] == [layer.name for layer in layers] and len(rows) >= 3

    optimizer = DoPr(policy, lr=0.0, damping=gamma, path="primal")
    policy.train()
    generator = torch.Generator().manual_seed(7)
    obs, actions = windows.sample(batch, generator)
    policy.compute_loss(obs, actions, generator).backward()
    optimizer.step()
    health = optimizer.health(spectrum=True)
    assert health["ap_retries"] == 0
    for r in rows:
        assert r["cond_damped"][gamma] == pytest.approx(health[f"ap_cond/{r['name']}"], rel=1e-4)
        assert 1 / r["d_in"] <= r["top_share"] <= 1
        assert r["lambda_max_over_mean"] == pytest.approx(r["top_share"] * r["d_in"])


def test_spectrum_cli_reports_damping_tending_to_identity(evaluated_run, tmp_path):
    out = tmp_path / "spectrum.json"
    result = run_cli("spectrum", str(evaluated_run), "--gamma", "0.1", "--gamma", "1000", "--batches", "2",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["gammas"] == [0.1, 1000.0] and report["batches"] == 2 and report["run_optim"] == "adam"
    for layer in report["layers"]:
        weak, strong = layer["cond_damped"]["0.1"], layer["cond_damped"]["1000.0"]
        # cond(S + lambda I) falls toward 1 as lambda grows, and is ~1 + lambda_max / (gamma * mean) at large gamma
        assert weak > strong >= 1
        assert strong == pytest.approx(1 + layer["lambda_max_over_mean"] / 1000, rel=0.05)
        assert layer["name"] in result.stdout
    # the same seed gives the same numbers
    again = run_cli("spectrum", str(evaluated_run), "--gamma", "0.1", "--gamma", "1000", "--batches", "2",
                    "--out", str(tmp_path / "again.json"))
    assert json.loads((tmp_path / "again.json").read_text())["layers"] == report["layers"]


def test_spectrum_bad_input_is_one_line(evaluated_run, tmp_path):
    assert_user_error(run_cli("spectrum", str(tmp_path / "nope")), "run directory not found")
    assert_user_error(run_cli("spectrum", str(evaluated_run), "--batches", "0"), "--batches must be >= 1")
    assert_user_error(run_cli("spectrum", str(evaluated_run), "--gamma", "-1"),
                      "--gamma values must be finite and >= 0")
    assert_user_error(run_cli("spectrum", str(evaluated_run), "--out", str(tmp_path / "x.txt")),
                      "--out must be a .json file path")
    assert not (evaluated_run / "spectrum.json").exists()
