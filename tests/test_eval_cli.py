"""`dopr-robot eval` as a user runs it: journal, --resume, kept reports, --tag / --checkpoint, bad input."""

import json

import pytest

from conftest import run_cli
from dopr_robot.config import load_config
from dopr_robot.training import train

TINY = ["policy.mlp.hidden_dim=64", "policy.mlp.num_layers=2", "train.batch_size=32", "train.log_every=5",
        "train.val_every=10", "train.warmup_steps=5", "train.steps=10"]
FIELDS = ("seed", "success", "steps", "return")


@pytest.fixture(scope="module")
def run(tmp_path_factory, lift_demos):
    cfg = load_config(None, [f"data.path={lift_demos}", *TINY])
    return train(cfg, tmp_path_factory.mktemp("evalcli") / "run", progress=False)


def _records(report):
    return [tuple(e[k] for k in FIELDS) for e in report["per_episode"]]


def test_interrupted_eval_resumes_to_the_same_records_and_keeps_old_reports(run):
    args = ["eval", str(run), "--episodes", "3", "--workers", "1", "--max-steps", "12"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    report = json.loads((run / "eval.json").read_text())
    assert report["checkpoint_name"] == "final" and report["n_errors"] == 0 and report["complete"]
    assert report["perturbation"] == {"action_noise": 0.0, "obs_noise": 0.0, "push": 0.0, "push_magnitude": 0.0}
    journal = run / "eval_episodes.jsonl"
    lines = journal.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["max_steps"] == 12 and header["step"] == 10 and len(lines) == 4
    # as if killed during the second episode's append: one record and a torn line survive
    journal.write_text("\n".join(lines[:2]) + "\n" + lines[2][:17])
    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    again = json.loads((run / "eval.json").read_text())
    assert _records(again) == _records(report) and again["resumed_episodes"] == 1
    assert len(journal.read_text().splitlines()) == 4
    kept = sorted(p.name for p in run.glob("eval-*.json"))
    assert len(kept) == 1 and json.loads((run / kept[0]).read_text())["per_episode"] == report["per_episode"]
    # a resume with other settings is refused in one line, and nothing is touched
    before = journal.read_text()
    refused = run_cli("eval", str(run), "--episodes", "3", "--workers", "1", "--max-steps", "13", "--resume")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "max_steps" in refused.stderr
    assert journal.read_text() == before


def test_tag_and_checkpoint_name_the_report_and_n_action_steps_is_recorded(run):
    result = run_cli("eval", str(run), "--checkpoint", "final", "--tag", "short", "--episodes", "1",
                     "--workers", "1", "--max-steps", "6", "--n-action-steps", "3", "--action-noise", "0.1")
    assert result.returncode == 0, result.stderr
    report = json.loads((run / "eval_short.json").read_text())
    assert report["n_action_steps"] == 3 and report["tag"] == "short"
    assert report["perturbation"]["action_noise"] == 0.1 and (run / "eval_short_episodes.jsonl").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--n-action-steps", "-3"], "--n-action-steps must be in 1..15"),
    (["--n-action-steps", "99"], "--n-action-steps must be in 1..15"),
    (["--checkpoint", "best"], "no checkpoint 'best'"),
    (["--tag", "a/b"], "--tag"),
    (["--out", "/proc/no/such/report.json"], "is not writable"),
    (["--out", "REPORT_DIR"], "is a directory"),
    (["--out", "report.txt"], "ending in .json"),
    (["--push", "2"], "probability"),
    (["--obs-noise", "-1"], "obs_noise"),
])
def test_bad_eval_input_is_one_line_before_any_episode(run, tmp_path, extra, message):
    extra = [str(tmp_path) if a == "REPORT_DIR" else str(tmp_path / a) if a == "report.txt" else a for a in extra]
    result = run_cli("eval", str(run), "--episodes", "1", "--workers", "1", "--max-steps", "4", *extra)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not list(tmp_path.iterdir()) and not (run / "eval_a").exists()


def test_kill_9_mid_eval_then_resume_gives_the_uninterrupted_records(run, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    out = tmp_path / "killed.json"
    args = ["eval", str(run), "--episodes", "3", "--workers", "1", "--max-steps", "12", "--seed-start", "700"]
    journal = tmp_path / "killed_episodes.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "dopr_robot.cli", *args, "--out", str(out)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if journal.is_file() and len(journal.read_text().splitlines()) >= 2:  # header + one episode
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the command and its workers, at once
    process.wait()
    assert not out.exists()
    assert run_cli(*args, "--out", str(out), "--resume").returncode == 0
    resumed = json.loads(out.read_text())
    assert resumed["resumed_episodes"] >= 1
    assert run_cli(*args, "--out", str(tmp_path / "whole.json")).returncode == 0
    assert _records(resumed) == _records(json.loads((tmp_path / "whole.json").read_text()))


def _variant(run, tmp_path, name, **changes):
    """A copy of the run's final checkpoint with some of its JSON changed (same weights)."""
    import shutil

    meta = json.loads((run / "checkpoints" / "final.json").read_text())
    meta.update(changes)
    (tmp_path / f"{name}.json").write_text(json.dumps(meta))
    shutil.copyfile(run / "checkpoints" / "final.safetensors", tmp_path / f"{name}.safetensors")
    return tmp_path / f"{name}.json"


def test_errored_episodes_are_missing_not_failures_and_fail_the_command(run, tmp_path):
    """Main scored an episode that raised as success=False inside success_rate and exited 0 (mutant: errors
    counted as failures). Now: missing, rates over completed episodes, exit 2 with one line, --allow-errors."""
    raises = _variant(run, tmp_path, "raises", obs_keys=["object", "no_such_observation"])  # every episode raises
    out = tmp_path / "r.json"
    args = ["eval", str(raises), "--episodes", "2", "--workers", "1", "--max-steps", "4", "--out", str(out)]
    result = run_cli(*args)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "2 of 2 episodes errored" in errors[0] and str(out) in errors[0]
    report = json.loads(out.read_text())  # written before the command fails
    assert (report["n_errors"], report["n_completed"], report["complete"]) == (2, 0, False)
    assert report["success_rate"] is None and report["success_ci95"] is None and report["mean_return"] is None
    assert report["allow_errors"] is False and report["successes"] == 0
    assert all("KeyError" in e["error"] and e["success"] is None for e in report["per_episode"])
    allowed = run_cli(*args, "--allow-errors")
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(out.read_text())["allow_errors"] is True and "INCOMPLETE" in allowed.stdout


def test_resume_runs_errored_episodes_again(run, tmp_path):
    """Main's --resume reused journal records with an error (mutant: errored journal records reused), so the
    report kept them for good."""
    out = tmp_path / "e.json"
    args = ["eval", str(run), "--episodes", "3", "--workers", "1", "--max-steps", "6", "--seed-start", "40",
            "--out", str(out)]
    assert run_cli(*args).returncode == 0
    whole = json.loads(out.read_text())
    journal = tmp_path / "e_episodes.jsonl"
    lines = journal.read_text().splitlines()
    record = json.loads(lines[2])  # seed 41, as main recorded an episode that raised
    lines[2] = json.dumps({"seed": record["seed"], "success": False, "steps": 0, "return": 0.0, "wall_s": 0.1,
                           "error": "MemoryError"})
    journal.write_text("\n".join(lines) + "\n")
    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    again = json.loads(out.read_text())
    assert again["resumed_episodes"] == 2 and again["n_errors"] == 0 and again["complete"]
    assert _records(again) == _records(whole)


def test_rates_are_over_completed_episodes():
    from dopr_robot.evaluation.evaluate import summarize
    from dopr_robot.stats import wilson_interval

    records = [{"seed": 1, "success": True, "steps": 10, "return": 2.0},
               {"seed": 2, "success": False, "steps": 30, "return": 0.0},
               {"seed": 3, "success": None, "steps": None, "return": None, "error": "timed out"}]
    s = summarize(records)
    assert (s["n_completed"], s["n_errors"], s["complete"], s["successes"]) == (2, 1, False, 1)
    assert s["success_rate"] == 0.5 and s["mean_return"] == 1.0 and s["mean_steps"] == 20.0
    assert s["success_ci95"] == list(wilson_interval(1, 2))
    assert summarize(records[:2])["complete"] is True


@pytest.mark.parametrize("flag, value, message", [
    ("--episodes", "0", "--episodes must be >= 1; got 0"),
    ("--max-steps", "0", "--max-steps must be >= 1; got 0"),
    ("--workers", "-1", "--workers must be >= 0; got -1"),
])
def test_a_bad_count_names_its_flag(run, flag, value, message):
    """Main's one catch-all line named every flag ("need --episodes >= 1, --max-steps >= 1, ...")."""
    result = run_cli("eval", str(run), "--workers", "1", flag, value)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.strip() == f"error: {message}"


def _children(pid: int) -> list[int]:
    """Live spawn workers (multiprocessing's spawn_main) whose parent is `pid`, from /proc (Linux)."""
    from pathlib import Path

    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_eval_takes_its_workers_with_it(run, tmp_path):
    """Main's spawn workers outlived a `kill -9` of eval's main process (~1 GB each, minutes later)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    args = ["eval", str(run), "--episodes", "40", "--workers", "2", "--max-steps", "400",
            "--out", str(tmp_path / "k.json")]
    process = subprocess.Popen([sys.executable, "-m", "dopr_robot.cli", *args], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(workers) < 2 and process.poll() is None:
            time.sleep(0.1)
            workers = _children(process.pid)
        assert len(workers) == 2, "the eval's workers never started"
        os.kill(process.pid, signal.SIGKILL)  # the main process only
        process.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{w}") and _alive(w) for w in workers):
            time.sleep(0.1)
        assert not [w for w in workers if os.path.exists(f"/proc/{w}") and _alive(w)]
    finally:
        for w in workers:  # never leave a worker behind, whatever happened
            try:
                os.kill(w, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
