"""Offscreen rendering and evaluation videos: real robosuite rollouts rendered with MuJoCo (OSMesa or EGL),
encoded to MP4 and decoded back. Skipped, with the reason printed (`-ra`), where rendering does not work."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, run_cli
from dopr_robot.checkpoint import load_policy
from dopr_robot.config import load_config
from dopr_robot.envs import RobosuiteEnv
from dopr_robot.envs.render import RenderSpec, check_rendering, parse_size
from dopr_robot.errors import UserError
from dopr_robot.evaluation import evaluate
from dopr_robot.evaluation.rollout import run_episode
from dopr_robot.evaluation.video import VideoRecorder
from dopr_robot.training import train

TINY = ["policy.mlp.hidden_dim=64", "policy.mlp.num_layers=2", "train.batch_size=32", "train.log_every=5",
        "train.val_every=10", "train.warmup_steps=5", "train.steps=10"]
SPEC = RenderSpec("agentview", 64, 96)  # not square: a swapped width/height shows


@pytest.fixture(scope="module")
def rendering(lift_demos):
    """Skip (with the reason) where offscreen rendering does not work; else the dataset's env_args."""
    from dopr_robot.datasets import open_demos

    env_args = open_demos(lift_demos).env_args
    try:
        check_rendering(env_args, SPEC)
    except UserError as e:
        pytest.skip(f"offscreen rendering unavailable here: {e}")
    return env_args


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, lift_demos):
    run = tmp_path_factory.mktemp("video_run") / "run"
    train(load_config(None, [f"data.path={lift_demos}", *TINY]), run, progress=False)
    return run


def decode(path) -> np.ndarray:
    """Every frame of an MP4, decoded by imageio's ffmpeg plugin: (frames, height, width, 3) uint8."""
    import imageio.v2 as imageio

    with imageio.get_reader(path, format="FFMPEG") as reader:
        return np.stack([frame for frame in reader])  # not list(reader): its len() is inf for video


def test_recorded_rollout_is_an_mp4_with_one_frame_per_step_plus_reset(tmp_path, rendering, tiny_run):
    policy, meta = load_policy(tiny_run)
    env = RobosuiteEnv(rendering, render=SPEC)
    with VideoRecorder(env, tmp_path, seed=7, fps=20) as recorder:
        result, _ = run_episode(policy, env, 7, 12, 8, meta["obs_keys"], recorder=recorder)
        path = recorder.finish(result["success"])
    assert path.name == f"7_{'success' if result['success'] else 'failure'}.mp4"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    frames = decode(path)
    assert frames.shape == (result["steps"] + 1, SPEC.height, SPEC.width, 3)
    assert frames.std() > 10  # a scene, not a blank frame
    # the first decoded frame is the rendered reset frame (H.264 is lossy: close, not equal)
    env.reset(7)
    assert np.abs(frames[0].astype(float) - env.render_frame()).mean() < 8


def test_recording_does_not_change_the_episode(tmp_path, rendering, tiny_run):
    policy, meta = load_policy(tiny_run)
    runs = []
    for render in (None, SPEC):
        env = RobosuiteEnv(rendering, render=render)
        if render is None:
            runs.append(run_episode(policy, env, 11, 24, 8, meta["obs_keys"], record=True))
        else:
            with VideoRecorder(env, tmp_path, seed=11, fps=20) as recorder:
                runs.append(run_episode(policy, env, 11, 24, 8, meta["obs_keys"], record=True, recorder=recorder))
                recorder.finish(runs[-1][0]["success"])
                assert recorder.frames == runs[-1][0]["steps"] + 1
    (a, ta), (b, tb) = runs
    assert (a["success"], a["steps"], a["return"]) == (b["success"], b["steps"], b["return"])
    assert np.array_equal(ta.actions, tb.actions) and np.array_equal(ta.states, tb.states)


def test_eval_cli_records_first_and_failed_episodes(tmp_path, rendering, tiny_run):
    out = tmp_path / "eval.json"
    # 12 steps cannot lift the cube: every episode fails. --videos 1 records seed 100; --videos-failed 2 then
    # re-runs one more failure (seed 101) with recording, since seed 100's video already shows a failure.
    result = run_cli("eval", str(tiny_run), "--episodes", "3", "--max-steps", "12", "--workers", "1",
                     "--seed-start", "100", "--out", str(out), "--videos", "1", "--videos-failed", "2",
                     "--video-size", f"{SPEC.width}x{SPEC.height}")
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert [(v["seed"], v["reason"], v["path"]) for v in report["videos"]] == [
        (100, "first", "videos/100_failure.mp4"), (101, "failed", "videos/101_failure.mp4")]
    assert sorted(p.name for p in (tmp_path / "videos").iterdir()) == ["100_failure.mp4", "101_failure.mp4"]
    for video in report["videos"]:
        assert "differs_from_first_run" not in video
        frames = decode(tmp_path / video["path"])
        assert frames.shape == (video["steps"] + 1, SPEC.height, SPEC.width, 3)
    assert "videos -> " in result.stdout


def test_unknown_camera_fails_before_any_episode(tmp_path, rendering, tiny_run):
    with pytest.raises(UserError, match=r"^camera 'nosuchcam' is not in Lift \(cameras: .*agentview"):
        evaluate(tiny_run, episodes=1, max_steps=4, workers=1, progress=False, videos=1,
                 video_spec=RenderSpec("nosuchcam", 64, 64), videos_dir=tmp_path / "videos")
    assert not (tmp_path / "videos").exists()


def headless_env(**extra):
    """This process's environment without a display (as on a server), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    return {**env, **extra}


def test_unusable_backend_fails_before_any_episode_with_one_line_naming_the_fix(tmp_path, tiny_run):
    # MUJOCO_GL=glx on a machine without a display: MuJoCo and robosuite import fine, rendering cannot start.
    result = subprocess.run([sys.executable, "-m", "dopr_robot.cli", "eval", str(tiny_run), "--episodes", "1",
                             "--workers", "1", "--out", str(tmp_path / "eval.json"), "--videos", "1"],
                            capture_output=True, text=True, cwd=REPO, env=headless_env(MUJOCO_GL="glx"))
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: offscreen rendering does not work here (MUJOCO_GL=glx: ")
    assert "apt-get install libosmesa6 and MUJOCO_GL=osmesa" in result.stderr and "MUJOCO_GL=egl" in result.stderr
    assert not (tmp_path / "eval.json").exists() and not (tmp_path / "videos").exists()


def test_invalid_mujoco_gl_is_one_error_line_for_any_command(tmp_path):
    # MuJoCo loads the MUJOCO_GL backend when it is imported, so a bad value breaks every command, not only videos.
    result = subprocess.run([sys.executable, "-m", "dopr_robot.cli", "collect", "--episodes", "1",
                             "--out", str(tmp_path / "demos.hdf5")],
                            capture_output=True, text=True, cwd=REPO, env=headless_env(MUJOCO_GL="nosuchbackend"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: importing MuJoCo/robosuite failed with MUJOCO_GL=nosuchbackend")
    assert "unset MUJOCO_GL" in result.stderr and not (tmp_path / "demos.hdf5").exists()


@pytest.mark.parametrize("text, expected", [("256", (256, 256)), ("320x240", (240, 320)), ("96X64", (64, 96))])
def test_video_size_parses(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["255", "0", "abc", "320x", "1x2x3", "4096"])
def test_bad_video_size_is_a_user_error(text):
    with pytest.raises(UserError, match="video size"):
        parse_size(text)


def test_videos_failed_counts_failures_already_recorded_and_takes_the_rest_in_seed_order(tmp_path):
    from dopr_robot.evaluation.video import VideoPlan

    results = {s: {"seed": s, "success": s in (11, 14), "steps": 5} for s in range(10, 17)}
    results[15]["error"] = "episode raised"  # an episode that did not run is not a failure to show
    seeds = sorted(results)
    plan = VideoPlan.create(seeds, 2, 3, SPEC, tmp_path / "videos", {"env_kwargs": {"control_freq": 20}})
    assert plan.first_seeds == {10, 11} and plan.fps == 20.0
    assert plan.reruns(results) == [12, 13]  # 10 (failed) is recorded already: two more of the three
    assert VideoPlan.create(seeds, 0, 1, SPEC, tmp_path, {}).reruns(results) == [10]
    assert VideoPlan.create(seeds, 3, 0, SPEC, tmp_path, {}).reruns(results) == []
    assert VideoPlan.create(seeds, 0, 0, SPEC, tmp_path, {}) is None


def test_pool_workers_record_only_the_planned_seeds_with_the_unrecorded_outcomes(rendering, tiny_run):
    from dopr_robot.evaluation import run_eval

    def outcomes(report):
        return [(r["seed"], r["success"], r["steps"], r["return"]) for r in report["per_episode"]]

    args = dict(episodes=3, seed_start=100, max_steps=12, workers=2, progress=False)
    plain, _ = run_eval(tiny_run, tag="plain", **args)
    assert "videos" not in plain and not (tiny_run / "videos_plain").exists()
    spec = {"video_spec": SPEC}
    recorded, path = run_eval(tiny_run, tag="rec", videos=1, videos_failed=2, **spec, **args)
    assert path == tiny_run / "eval_rec.json" and outcomes(recorded) == outcomes(plain)
    # every 12-step episode fails: seed 100 recorded as it ran, 101 re-run for its video; per report tag
    assert [(v["seed"], v["reason"], v["path"]) for v in recorded["videos"]] == [
        (100, "first", "videos_rec/100_failure.mp4"), (101, "failed", "videos_rec/101_failure.mp4")]
    assert sorted(p.name for p in (tiny_run / "videos_rec").iterdir()) == ["100_failure.mp4", "101_failure.mp4"]
    assert all("differs_from_first_run" not in v for v in recorded["videos"])
    # a resume that finds every episode in the journal starts a pool only for the re-runs it records
    resumed, _ = run_eval(tiny_run, tag="rec", resume=True, videos_failed=3, **spec, **args)
    assert resumed["resumed_episodes"] == 3 and outcomes(resumed) == outcomes(plain)
    assert [(v["seed"], v["reason"]) for v in resumed["videos"]] == [(100, "failed"), (101, "failed"),
                                                                     (102, "failed")]
    frames = decode(tiny_run / resumed["videos"][2]["path"])
    assert frames.shape == (resumed["videos"][2]["steps"] + 1, SPEC.height, SPEC.width, 3)


def test_archiving_a_report_moves_its_journal_and_videos_under_one_suffix_and_rewrites_its_paths(tmp_path):
    from dopr_robot.evaluation.archive import archive_report

    report = tmp_path / "eval_t.json"
    (tmp_path / "videos_t").mkdir()
    (tmp_path / "videos_t" / "7_failure.mp4").write_bytes(b"mp4")
    report.write_text(json.dumps({"videos": [{"seed": 7, "path": "videos_t/7_failure.mp4"},
                                             {"seed": 8, "path": "elsewhere/8_success.mp4"}], "success_rate": 0.5}))
    (tmp_path / "eval_t_episodes.jsonl").write_text("{}\n")
    os.utime(report, (1767268800, 1767268800))  # 2026-01-01 12:00:00 UTC
    (tmp_path / "videos_t-20260101-120000").mkdir()  # the stamp is taken for the videos only: all members get -1
    archived = archive_report(report)
    assert archived == tmp_path / "eval_t-20260101-120000-1.json"
    assert (tmp_path / "eval_t-20260101-120000-1_episodes.jsonl").read_text() == "{}\n"
    assert (tmp_path / "videos_t-20260101-120000-1" / "7_failure.mp4").read_bytes() == b"mp4"
    assert not report.exists() and not (tmp_path / "eval_t_episodes.jsonl").exists()
    assert not (tmp_path / "videos_t").exists()
    data = json.loads(archived.read_text())
    assert [v["path"] for v in data["videos"]] == ["videos_t-20260101-120000-1/7_failure.mp4",
                                                   "elsewhere/8_success.mp4"]  # a video elsewhere stays
    assert data["success_rate"] == 0.5 and archived.stat().st_mtime == 1767268800
    # a report replaced at the end of a resume goes alone: its journal and videos are continued
    report.write_text(json.dumps({"videos": [{"seed": 9, "path": "videos_t/9_success.mp4"}]}))
    (tmp_path / "eval_t_episodes.jsonl").write_text("{}\n")
    (tmp_path / "videos_t").mkdir()
    alone = archive_report(report, with_journal_and_videos=False)
    assert json.loads(alone.read_text())["videos"][0]["path"] == "videos_t/9_success.mp4"
    assert (tmp_path / "eval_t_episodes.jsonl").exists() and (tmp_path / "videos_t").is_dir()
    # an interrupted fresh eval leaves a journal and videos without a report: they still go aside together
    assert archive_report(report) is None
    assert not (tmp_path / "eval_t_episodes.jsonl").exists() and not (tmp_path / "videos_t").exists()
    assert len(list(tmp_path.glob("videos_t-*"))) == 3 and len(list(tmp_path.glob("eval_t-*_episodes.jsonl"))) == 2


def test_archiving_moves_the_saved_rollouts_and_retargets_the_report(tmp_path):
    from dopr_robot.evaluation.archive import archive_report

    report = tmp_path / "eval_traj.json"
    (tmp_path / "eval_traj_rollouts.hdf5").write_bytes(b"hdf5")
    report.write_text(json.dumps({"trajectories": "runs/x/eval_traj_rollouts.hdf5", "success_rate": 0.25}))
    os.utime(report, (1767268800, 1767268800))
    archived = archive_report(report)
    assert archived == tmp_path / "eval_traj-20260101-120000.json"
    assert (tmp_path / "eval_traj-20260101-120000_rollouts.hdf5").read_bytes() == b"hdf5"
    assert not (tmp_path / "eval_traj_rollouts.hdf5").exists()
    data = json.loads(archived.read_text())
    assert data["trajectories"] == "runs/x/eval_traj-20260101-120000_rollouts.hdf5" and data["success_rate"] == 0.25


def test_a_second_eval_archives_the_first_reports_videos_and_a_resume_does_not(rendering, tiny_run):
    from dopr_robot.evaluation import run_eval

    args = dict(episodes=2, max_steps=8, workers=1, progress=False, tag="twice", video_spec=SPEC)
    first, path = run_eval(tiny_run, seed_start=100, videos=1, **args)
    second, _ = run_eval(tiny_run, seed_start=200, videos=1, **args)
    assert [v["path"] for v in second["videos"]] == ["videos_twice/200_failure.mp4"]
    assert [p.name for p in (tiny_run / "videos_twice").iterdir()] == ["200_failure.mp4"]
    [archived] = tiny_run.glob("eval_twice-*.json")  # the first report
    suffix = archived.stem.removeprefix("eval_twice")
    assert (tiny_run / f"eval_twice{suffix}_episodes.jsonl").is_file()
    old = json.loads(archived.read_text())
    assert old["per_episode"] == first["per_episode"]
    assert [v["path"] for v in old["videos"]] == [f"videos_twice{suffix}/100_failure.mp4"]
    assert all((archived.parent / v["path"]).is_file() for v in old["videos"])
    assert decode(archived.parent / old["videos"][0]["path"]).shape[0] == old["videos"][0]["steps"] + 1
    # a resume (every episode in the journal: nothing runs) continues the report: no videos are archived
    resumed, _ = run_eval(tiny_run, seed_start=200, resume=True, **{**args, "video_spec": None})
    assert resumed["resumed_episodes"] == 2
    assert sorted(p.name for p in tiny_run.glob("videos_twice*")) == ["videos_twice", f"videos_twice{suffix}"]
    assert [p.name for p in (tiny_run / "videos_twice").iterdir()] == ["200_failure.mp4"]
    replaced = [p for p in tiny_run.glob("eval_twice-*.json") if p != archived]
    assert len(replaced) == 1 and json.loads(replaced[0].read_text())["videos"] == second["videos"]
    assert json.loads(path.read_text())["resumed_episodes"] == 2


def test_a_recorder_failure_never_fails_its_episode(tmp_path, rendering, tiny_run):
    """Main recorded an episode whose recorder raised as an errored (failed) episode. Now the episode's result
    stands and the video is reported missing with the reason: a recorder that cannot render its frames
    (captured from an environment without a renderer) mid-episode, and one whose directory cannot be made."""
    policy, meta = load_policy(tiny_run)
    plain = RobosuiteEnv(rendering)
    expected, _ = run_episode(policy, plain, 11, 8, 8, meta["obs_keys"])
    with VideoRecorder(RobosuiteEnv(rendering, render=SPEC), tmp_path / "v", seed=11, fps=20) as recorder:
        result, _ = run_episode(policy, plain, 11, 8, 8, meta["obs_keys"], recorder=recorder)
        assert recorder.finish(result["success"]) is None
    assert recorder.error.startswith("RuntimeError: this environment was built without render")
    assert (result["success"], result["steps"], result["return"]) == \
        (expected["success"], expected["steps"], expected["return"])
    assert not list((tmp_path / "v").iterdir())  # no partial file

    blocked = tmp_path / "a_file"
    blocked.write_text("not a directory")
    report = evaluate(tiny_run, episodes=1, seed_start=11, max_steps=8, workers=1, progress=False, videos=1,
                      video_spec=SPEC, videos_dir=blocked / "videos")
    record = report["per_episode"][0]
    assert "error" not in record and report["complete"] and record["steps"] == expected["steps"]
    assert report["videos"] == [] and [(m["seed"], m["reason"]) for m in report["videos_missing"]] == [(11, "first")]
    assert report["videos_missing"][0]["error"].startswith(("NotADirectoryError", "FileExistsError"))
