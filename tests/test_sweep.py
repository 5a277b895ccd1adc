"""`dopr-robot sweep`: real cells (tiny MLP, 20 steps, 2 short episodes on scripted Lift demos), resume, isolation."""

import json
import re
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import REPO, run_cli
from dopr_robot.errors import UserError
from dopr_robot.experiments.sweep import run_sweep

CONFIG = str(REPO / "configs" / "lift.yaml")
TINY = ["policy.mlp.hidden_dim=64", "policy.mlp.num_layers=2", "policy.diffusion.num_inference_steps=2",
        "train.batch_size=32", "train.log_every=5", "train.val_every=10", "train.warmup_steps=5", "train.steps=20",
        "eval.max_steps=8"]
CELLS = ["adam_lr-1e-3_s0", "dopr_lr-1e-3_s0", "adam_lr-3e-4_s0", "dopr_lr-3e-4_s0"]  # seed-major, then grid


def sweep_args(out, demos, *extra, sets=()):
    args = ["sweep", CONFIG, "--out", str(out), "--optims", "adam,dopr", "--seeds", "0",
            "--grid", "optim.lr=1e-3,3e-4", "--episodes", "2", "--jobs", "2"]
    for item in [f"data.path={demos}", *TINY, *sets]:
        args += ["--set", item]
    return [*args, *extra]


def one_new_cell_args(out, demos, seed, *launcher):
    """The finished sweep's command narrowed to one new cell, adam_lr-1e-3_s<seed>, run through `launcher`."""
    args = sweep_args(out, demos, *launcher)
    for flag, value in (("--seeds", str(seed)), ("--optims", "adam"), ("--grid", "optim.lr=1e-3")):
        args[args.index(flag) + 1] = value
    return args


def cell_files(out):
    """Every file of every cell with its mtime (ns)."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns
            for name in CELLS for p in (out / name).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, lift_demos):
    out = tmp_path_factory.mktemp("sweep") / "grid"
    result = run_cli(*sweep_args(out, lift_demos))
    assert result.returncode == 0, result.stderr + result.stdout
    return out, result


def test_sweep_trains_and_evaluates_every_cell(finished, lift_demos):
    out, result = finished
    record = json.loads((out / "sweep.json").read_text())
    assert [c["name"] for c in record["cells"]] == CELLS
    assert record["grid"] == {"optim.lr": ["1e-3", "3e-4"]} and record["set"][0] == f"data.path={lift_demos}"
    for cell in record["cells"]:
        run = out / cell["name"]
        assert cell["state"] == "done" and cell["error"] is None and cell["dir"] == str(run)
        config = (run / "config.yaml").read_text()
        assert f"name: {cell['optim']}" in config and f"lr: {float(cell['settings']['optim.lr'])}" in config
        report = json.loads((run / "eval.json").read_text())
        assert report["episodes"] == 2 and [e["seed"] for e in report["per_episode"]] == [100000, 100001]
        assert report["optim"] == cell["optim"] and report["train_seed"] == 0
        assert cell["success_rate"] == report["success_rate"] and cell["val_loss"] > 0
        assert "$ dopr-robot train" in (run / "sweep.log").read_text()
    lines = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert len(lines) == 4 and all("success" in line and "val_loss" in line for line in lines)
    assert "ETA" in lines[0] and "last cell" in lines[-1]


def test_rerun_skips_finished_cells_and_refuses_other_settings(finished, lift_demos):
    out, _ = finished
    before = cell_files(out)
    again = run_cli(*sweep_args(out, lift_demos))
    assert again.returncode == 0, again.stderr
    assert "(4 done, 0 to run)" in again.stdout and not any(l.startswith("[") for l in again.stdout.splitlines())
    assert cell_files(out) == before  # no subprocess touched any cell
    other = run_cli(*sweep_args(out, lift_demos, sets=["optim.weight_decay=0.1"]))
    assert other.returncode == 2 and other.stderr.startswith("error:") and "another set" in other.stderr
    assert cell_files(out) == before


def test_interrupted_cell_resumes_to_the_uninterrupted_result(finished, lift_demos):
    out, _ = finished
    name = "dopr_lr-1e-3_s0"
    run = out / name
    full_weights = load_file(str(run / "checkpoints" / "final.safetensors"))
    full_report = json.loads((run / "eval.json").read_text())
    cell = next(c for c in json.loads((out / "sweep.json").read_text())["cells"] if c["name"] == name)
    # The state a kill -9 at step 10 leaves behind: a trainer state at step 10, no final checkpoint, no report.
    shutil.rmtree(run)
    part = run_cli(*cell["train_command"][1:], "--until", "10")
    assert part.returncode == 0, part.stderr
    assert (run / "trainer_state.pt").is_file() and not (run / "checkpoints" / "final.json").exists()
    before = {k: v for k, v in cell_files(out).items() if not k.startswith(name + "/")}

    result = run_cli(*sweep_args(out, lift_demos))
    assert result.returncode == 0, result.stderr
    assert "(3 done, 1 to run)" in result.stdout and f"[1/1] {name}: success" in result.stdout
    log = (run / "sweep.log").read_text()
    assert "--resume" in log and "--until" not in log
    resumed = load_file(str(run / "checkpoints" / "final.safetensors"))
    assert resumed.keys() == full_weights.keys() and all(resumed[k].equal(full_weights[k]) for k in resumed)
    report = json.loads((run / "eval.json").read_text())
    strip = lambda eps: [{k: e[k] for k in ("seed", "success", "steps", "return")} for e in eps]
    assert strip(report["per_episode"]) == strip(full_report["per_episode"])
    assert {k: v for k, v in cell_files(out).items() if not k.startswith(name + "/")} == before


def test_interrupted_eval_is_finished_with_the_same_episodes(finished, lift_demos):
    """A report missing (eval killed): the re-run evaluates again, from the episode journal (`eval --resume`)."""
    out, _ = finished
    run = out / "adam_lr-3e-4_s0"
    full = json.loads((run / "eval.json").read_text())
    wall = lambda: next(c["wall_s"] for c in json.loads((out / "sweep.json").read_text())["cells"]
                        if c["name"] == run.name)
    first_wall = wall()
    (run / "eval.json").unlink()
    weights = (run / "checkpoints" / "final.safetensors").stat().st_mtime_ns
    result = run_cli(*sweep_args(out, lift_demos))
    assert result.returncode == 0 and "(3 done, 1 to run)" in result.stdout, result.stderr
    report = json.loads((run / "eval.json").read_text())
    strip = lambda eps: [{k: e[k] for k in ("seed", "success", "steps", "return")} for e in eps]
    assert strip(report["per_episode"]) == strip(full["per_episode"])
    assert (run / "checkpoints" / "final.safetensors").stat().st_mtime_ns == weights  # not trained again
    last_command = [l for l in (run / "sweep.log").read_text().splitlines() if l.startswith("$ dopr-robot")][-1]
    assert last_command.startswith("$ dopr-robot eval") and "--resume" in last_command
    assert wall() > first_wall > 0  # the cell's wall time adds this invocation's to the first one's


def test_a_report_with_errored_episodes_does_not_make_its_cell_done(tmp_path):
    """Main counted any report with the requested episodes as done, errored episodes and all."""
    from dopr_robot.experiments.cells import report_complete

    path = tmp_path / "eval.json"
    report = {"episodes": 4, "successes": 1, "checkpoint_name": "final", "n_errors": 0}
    path.write_text(json.dumps(report))
    assert report_complete(path, 4, "final")
    legacy = {"episodes": 4, "successes": 1, "checkpoint_name": "final", "errors": 2}  # before n_errors
    for errored in ({**report, "n_errors": 1}, legacy):
        path.write_text(json.dumps(errored))
        assert not report_complete(path, 4, "final")


def test_failed_cell_is_recorded_and_retried(tmp_path, lift_demos):
    out = tmp_path / "bad"
    args = ["sweep", CONFIG, "--out", str(out), "--optims", "adam", "--seeds", "0", "--episodes", "2"]
    for item in [f"data.path={lift_demos}", *TINY, "data.obs_keys=[no_such_key]"]:
        args += ["--set", item]
    first = run_cli(*args)
    assert first.returncode == 1 and "FAILED" in first.stdout and "failed: adam_s0" in first.stdout
    cell = json.loads((out / "sweep.json").read_text())["cells"][0]
    assert cell["state"] == "failed" and "no_such_key" in cell["error"] and cell["success_rate"] is None
    second = run_cli(*args)
    assert second.returncode == 1 and "(0 done, 1 to run)" in second.stdout
    assert (out / "adam_s0" / "sweep.log").read_text().count("$ dopr-robot train") == 2


def test_dry_run_lists_cells_and_writes_nothing(tmp_path):
    out = tmp_path / "dry"
    result = run_cli("sweep", CONFIG, "--out", str(out), "--optims", "adam,dopr", "--seeds", "0-1",
                     "--grid", "optim.ap.damping=0.3,3", "--grid", "policy.unet.down_dims=[16,32],[32,64]",
                     "--dry-run")
    assert result.returncode == 0, result.stderr
    cells = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("  todo")]
    # adam never reads the damping: one adam cell per down_dims and seed (the first damping value's name)
    assert len(cells) == 2 * 2 * 2 + 2 * 2 and len(set(cells)) == 12
    assert [c for c in cells if c.startswith("adam")] == [f"adam_damping-0.3_down_dims-{d}_s{s}" for s in (0, 1)
                                                          for d in ("16-32", "32-64")]
    assert cells[0] == "adam_damping-0.3_down_dims-16-32_s0" and cells[-1] == "dopr_damping-3_down_dims-32-64_s1"
    assert not out.exists()


@pytest.mark.parametrize("changes, message", [
    ({"grid": ["optim.ap.dampin=1,3"]}, "--grid optim.ap.dampin: unknown config key"),
    ({"grid": ["optim.name=adam,muon"]}, "use --optims"),
    ({"grid": ["optim.ap.damping=1,-1"]}, "cell adam_damping--1_s0: optim.ap.damping must be >= 0"),
    ({"grid": ["optim.lr=1e-3,0.001,1e-3"]}, "repeated"),
    ({"sets": ["train.seed=3"]}, "use --seeds"),
    ({"seeds": "4-1"}, "--seeds"),
    ({"optims": "adam,sgd"}, "unknown optimizer 'sgd'"),
    ({"perturb": ["wind=1"]}, "--perturb expects"),
    ({"launcher": "slurmish"}, "--launcher must be one of"),
    ({"jobs": 0}, "--jobs must be >= 1; got 0"),  # main: one line naming every flag
    ({"episodes": 0}, "--episodes must be >= 1; got 0"),
])
def test_bad_input_is_refused_before_any_work(tmp_path, changes, message):
    out = tmp_path / "never"
    args = {"grid": [], "sets": [], "optims": "adam", "seeds": "0", **changes}
    with pytest.raises(UserError, match=re.escape(message)):
        run_sweep(Path(CONFIG), out, **args)
    assert not out.exists()


def test_bad_grid_key_on_the_command_line_is_one_line_exit_2(tmp_path):
    out = tmp_path / "never"
    result = run_cli("sweep", CONFIG, "--out", str(out), "--grid", "optim.ap.dampin=1,3")
    assert result.returncode == 2 and result.stderr.startswith("error: --grid optim.ap.dampin: unknown config key")
    assert result.stderr.count("\n") == 1 and not out.exists()


def test_refuses_a_directory_that_is_not_a_sweep(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = run_cli("sweep", CONFIG, "--out", str(tmp_path), "--optims", "adam", "--seeds", "0")
    assert result.returncode == 2 and "not a sweep directory" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_submitit_launcher_extends_the_sweep(finished, lift_demos):
    """A new seed added to the finished sweep, run through submitit (its local executor where there is no SLURM)."""
    pytest.importorskip("submitit", reason="optional extra: pip install 'dopr-robot[slurm]'")
    out, _ = finished
    result = run_cli(*one_new_cell_args(out, lift_demos, 1, "--launcher", "submitit"))
    assert result.returncode == 0, result.stderr + result.stdout
    record = json.loads((out / "sweep.json").read_text())
    assert [c["name"] for c in record["cells"]][-1] == "adam_lr-1e-3_s1" and len(record["cells"]) == 5
    assert record["seeds"] == [0, 1] and record["cells"][-1]["state"] == "done"
    assert json.loads((out / "adam_lr-1e-3_s1" / "eval.json").read_text())["train_seed"] == 1


def extra_args(out, demos):
    args = ["sweep", CONFIG, "--out", str(out), "--optims", "adam", "--seeds", "0", "--episodes", "2", "--workers", "1"]
    for item in [f"data.path={demos}", *TINY, "train.eval_every=10", "train.eval_episodes=1"]:
        args += ["--set", item]
    return [*args, "--perturb", "action_noise=0.5"]


@pytest.fixture(scope="module")
def extra(tmp_path_factory, lift_demos):
    """A one-cell sweep whose training keeps a best checkpoint, with one perturbation level: three reports."""
    out = tmp_path_factory.mktemp("sweep") / "extra"
    result = run_cli(*extra_args(out, lift_demos))
    assert result.returncode == 0, result.stderr + result.stdout
    return out, result


def test_best_checkpoint_and_perturbation_reports(extra, lift_demos):
    """eval_best.json when training keeps a best checkpoint; one eval_<tag>.json per perturbation level."""
    out, result = extra
    run = out / "adam_s0"
    cell = json.loads((out / "sweep.json").read_text())["cells"][0]
    report = json.loads((run / "eval_best.json").read_text())
    assert report["checkpoint_name"] == "best" and report["episodes"] == 2
    assert cell["best_success_rate"] == report["success_rate"] and "(best ckpt" in result.stdout
    report = json.loads((run / "eval_action_noise0.5.json").read_text())
    assert report["perturbation"]["action_noise"] == 0.5 and report["episodes"] == 2
    again = run_cli(*extra_args(out, lift_demos))
    assert again.returncode == 0 and "(1 done, 0 to run)" in again.stdout


STANDALONE = {"eval": [], "eval_best": ["--checkpoint", "best"], "eval_action_noise0.5": ["--action-noise", "0.5"]}


def test_cell_reports_run_in_one_pool_and_match_standalone_evals(extra, lift_demos, tmp_path):
    """A cell's reports are evaluated in one worker pool (one worker here: every episode of every report ran in
    the same process) with the same episodes as `dopr-robot eval` of each on its own; a journal that cannot be
    resumed is run again from the start."""
    out, _ = extra
    run = out / "adam_s0"
    strip = lambda report: [{k: e[k] for k in ("seed", "success", "steps", "return")} for e in report["per_episode"]]
    reports = {stem: json.loads((run / f"{stem}.json").read_text()) for stem in STANDALONE}
    assert len({e["worker_pid"] for report in reports.values() for e in report["per_episode"]}) == 1
    log = (run / "sweep.log").read_text()
    assert log.count("in one worker pool") == 1 and log.count("$ dopr-robot eval") == 3
    for stem, flags in STANDALONE.items():
        alone = run_cli("eval", str(run), *flags, "--episodes", "2", "--workers", "1",
                        "--out", str(tmp_path / f"{stem}.json"))
        assert alone.returncode == 0, alone.stderr
        assert strip(json.loads((tmp_path / f"{stem}.json").read_text())) == strip(reports[stem])

    # eval_best killed before its report, its journal from other settings: refused, then run from the start
    journal = run / "eval_best_episodes.jsonl"
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join([json.dumps({**json.loads(lines[0]), "max_steps": 99}), *lines[1:]]) + "\n")
    (run / "eval_best.json").unlink()
    again = run_cli(*extra_args(out, lift_demos))
    assert again.returncode == 0 and "(0 done, 1 to run)" in again.stdout, again.stderr + again.stdout
    assert strip(json.loads((run / "eval_best.json").read_text())) == strip(reports["eval_best"])
    log = (run / "sweep.log").read_text()
    assert log.count("in one worker pool") == 2 and "cannot resume (--resume:" in log
    assert log.splitlines()[-1] == "# exit code 0"


def test_ray_launcher_extends_the_sweep(finished, lift_demos):
    pytest.importorskip("ray", reason="optional extra: pip install 'dopr-robot[ray]'")
    out, _ = finished
    result = run_cli(*one_new_cell_args(out, lift_demos, 2, "--launcher", "ray", "--launcher-opt",
                                        "include_dashboard=false"))
    assert result.returncode == 0, result.stderr + result.stdout
    cell = next(c for c in json.loads((out / "sweep.json").read_text())["cells"] if c["name"] == "adam_lr-1e-3_s2")
    assert cell["state"] == "done"
    assert json.loads((out / "adam_lr-1e-3_s2" / "eval.json").read_text())["train_seed"] == 2
