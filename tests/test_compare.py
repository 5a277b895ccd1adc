"""`compare` and `plot` over run directories.

Most tests build run directories with known contents (config.yaml, metrics.jsonl, eval*.json, drift.json are
the test data of a pure function over files); one end-to-end test compares real tiny trained and evaluated runs.
"""

import json
import math
import pathlib
import struct

import pytest
import yaml

from conftest import run_cli
from dopr_robot.errors import UserError
from dopr_robot import stats
from dopr_robot.experiments.compare import build_report, compare, discover
from dopr_robot.plotting import plot_run

EPISODE_SEED_START = 100000


def write_run(root, name, optim, seed, outcomes, *, settings=None, val_losses=(0.5, 0.3), success_curve=(),
              best_outcomes=None, perturbed=(), drift=None, seed_start=EPISODE_SEED_START, config_extra=None,
              report_extra=None, returns=None):
    """A run directory as train + eval + diagnose leave it, with known numbers (`returns`: per-episode returns of
    eval.json, else each episode's success)."""
    run = root / name
    run.mkdir(parents=True)
    config = {"optim": {"name": optim, "lr": 1e-4, "ap": {"damping": 1.0}}, "train": {"seed": seed, "steps": 100},
              "eval": {"workers": 2}}
    for key, value in {**(settings or {}), **(config_extra or {})}.items():
        node = config
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    records = []
    for i, val in enumerate(val_losses):
        records.append({"step": 50 * (i + 1), "loss": 2 * val, "grad_norm": 1.0, "lr": 1e-4, "step_time_s": 0.01,
                        "val_loss": val})
    for i, s in enumerate(success_curve):
        if i == len(records):
            records.append({"step": 50 * (i + 1), "loss": 1.0})
        records[i]["success"] = s
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    def report(values, episode_returns=None, **extra):
        n, k = len(values), int(sum(values))
        episode_returns = values if episode_returns is None else episode_returns
        return {"checkpoint": str(run / "checkpoints" / "final.json"), "checkpoint_name": "final", "optim": optim,
                "train_seed": seed, "env_name": "Lift", "episodes": n, "seed_start": seed_start, "max_steps": 400,
                "successes": k, "success_rate": k / n, "success_ci95": list(stats.wilson_interval(k, n)),
                "n_errors": 0, "n_completed": n, "complete": True,
                "perturbation": {"action_noise": 0.0, "obs_noise": 0.0, "push": 0.0, "push_magnitude": 0.0},
                "per_episode": [{"seed": seed_start + i, "success": bool(v), "steps": 10, "return": float(r)}
                                for i, (v, r) in enumerate(zip(values, episode_returns))],
                **(report_extra or {}), **extra}

    if outcomes is not None:
        (run / "eval.json").write_text(json.dumps(report(outcomes, returns)))
    if best_outcomes is not None:
        (run / "eval_best.json").write_text(json.dumps(report(best_outcomes, checkpoint_name="best")))
    for tag, kind, level, values in perturbed:
        rep = report(values, tag=tag)
        rep["perturbation"][kind] = level
        if kind == "push":
            rep["perturbation"]["push_magnitude"] = 2.0
        (run / f"eval_{tag}.json").write_text(json.dumps(rep))
    if drift is not None:
        (run / "drift.json").write_text(json.dumps(drift))
    return run


def two_optimizer_sweep(root, n_seeds=5, episodes=10):
    """adam succeeds on 2/10 episodes per seed, dopr on 8/10: perfectly separated over training seeds."""
    cells = []
    for optim, k in (("adam", 2), ("dopr", 8)):
        for seed in range(n_seeds):
            outcomes = [1] * k + [0] * (episodes - k)
            name = f"{optim}_s{seed}"
            write_run(root, name, optim, seed, outcomes, val_losses=(0.5, 0.3 + 0.01 * seed),
                      success_curve=(k / 20, k / 10), best_outcomes=outcomes[::-1])
            cells.append({"name": name, "dir": str(root / name), "optim": optim, "seed": seed, "settings": {},
                          "state": "done"})
    (root / "sweep.json").write_text(json.dumps({"config": "configs/lift.yaml", "command": ["sweep"],
                                                 "cells": cells}))
    return root


def test_same_config_numbers_and_tests(tmp_path):
    sweep = two_optimizer_sweep(tmp_path / "sweep")
    report, warnings = compare([sweep], n_boot=2000)
    assert warnings == []
    adam, dopr = report["groups"]
    assert (adam["name"], dopr["name"]) == ("adam", "dopr") and adam["n_seeds"] == dopr["n_seeds"] == 5
    assert adam["success_mean"] == pytest.approx(0.2) and adam["success_sd"] == pytest.approx(0.0)
    assert dopr["success_pooled"] == pytest.approx(0.8)
    assert dopr["success_ci"] == pytest.approx(list(stats.wilson_interval(40, 50)))
    assert dopr["best_success_mean"] == pytest.approx(0.8) and dopr["best_n_seeds"] == 5
    assert dopr["val_loss_mean"] == pytest.approx(0.32) and dopr["val_loss_best_mean"] == pytest.approx(0.32)
    assert dopr["intrain_last_mean"] == pytest.approx(0.6)  # mean of the last (up to 5) evaluations: 0.4, 0.8
    assert adam["diff_vs_baseline"] is None and adam["baseline_group"] == "adam"
    assert dopr["diff_vs_baseline"] == pytest.approx(0.6)
    # Welch by hand (mutant caught: any interval merely around 0.6, e.g. the old bootstrap's): each group's per-seed
    # rates are equal, so each variance is its binomial floor 0.2 * 0.8 / 10 = 0.016, se = 0.08, df = 8
    half = pytest.importorskip("scipy.stats").t.ppf(0.975, 8) * 0.08
    assert dopr["diff_ci"] == pytest.approx([0.6 - half, 0.6 + half])
    assert dopr["diff_interval"]["df"] == pytest.approx(8)
    assert dopr["p_permutation"] == pytest.approx(2 / 252)  # perfectly separated, 5 vs 5 seeds
    assert dopr["p_permutation_min"] == pytest.approx(2 / 252) and dopr["few_seeds"] is False
    assert dopr["diff_interval"]["method"].startswith("Welch t") and dopr["diff_ci_bootstrap"][0] < 0.6
    # every run played episode seeds 100000..100009: both succeed on the first 2, only dopr on the next 6, neither
    # on the last 2 -> d_e = 1 on 6 episode seeds, 0 elsewhere -> p = P(all 6 signs agree) = 2 / 2^6
    assert dopr["p_paired"] == pytest.approx(2 / 64) and dopr["paired"]["n_discordant"] == 6
    saved = json.loads((sweep / "compare" / "compare.json").read_text())
    assert saved["groups"][1]["p_permutation"] == dopr["p_permutation"]
    assert saved["provenance"]["command"] and saved["statistics"]["bootstrap"]["n_boot"] == 2000
    md = (sweep / "compare" / "compare.md").read_text()
    assert "| dopr " in md and "+60.0 pp" in md and "0.008 (min 0.008)" in md and "†" not in md.split("\n## ")[1]
    for plot in ("success_vs_val_loss", "training_curves"):
        assert (sweep / "compare" / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert saved["plots"]["drift"] is None and any("diagnose" in n for n in saved["notes"])


def test_incomplete_runs_are_listed_not_fatal(tmp_path):
    sweep = two_optimizer_sweep(tmp_path / "sweep", n_seeds=2)
    (sweep / "dopr_s1" / "eval.json").unlink()
    (sweep / "adam_s0" / "metrics.jsonl").write_text('{"step": 50, "loss": 1.0, "val_loss": 0.4}\n{"step": 1')
    data = json.loads((sweep / "sweep.json").read_text())
    data["cells"].append({"name": "dopr_s2", "optim": "dopr", "seed": 2, "settings": {}, "state": "pending"})
    (sweep / "sweep.json").write_text(json.dumps(data))
    cut = json.loads((sweep / "adam_s1" / "eval.json").read_text())
    cut["per_episode"] = cut["per_episode"][:3]  # a report whose episodes do not add up
    (sweep / "adam_s1" / "eval.json").write_text(json.dumps(cut))
    report, warnings = compare([sweep], n_boot=200)
    incomplete = {i["run"].rsplit("/", 1)[-1]: i["reason"] for i in report["incomplete"]}
    assert set(incomplete) == {"dopr_s1", "dopr_s2", "adam_s1"}
    assert "per_episode" in incomplete["adam_s1"]
    assert "no eval.json" in incomplete["dopr_s1"] and "pending" in incomplete["dopr_s2"]
    assert [g["n_seeds"] for g in report["groups"]] == [1, 1]
    assert any("dopr_s1" in w and "incomplete" in w for w in warnings)
    assert any("metrics.jsonl" in w and "unreadable" in w for w in warnings)  # a cut-off last line


def test_suspicious_reports_are_warned_about(tmp_path):
    """A perturbed report whose episodes do not add up is ignored with a warning; a best checkpoint without
    eval_best.json is pointed out."""
    root = tmp_path / "runs"
    run = write_run(root, "adam_s0", "adam", 0, [1, 0, 0])
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "best.json").write_text("{}")
    cut = write_run(tmp_path / "spare", "adam_s0", "adam", 0, [1, 0],
                    perturbed=[("an1", "action_noise", 0.1, [1, 0, 0])]) / "eval_an1.json"
    bad = json.loads(cut.read_text())
    bad["per_episode"] = bad["per_episode"][:2]  # a perturbed report whose episodes do not add up
    (run / "eval_an1.json").write_text(json.dumps(bad))
    report, warnings = compare([root], n_boot=50)
    assert any("eval_an1.json: per_episode is not one" in w and "ignored" in w for w in warnings)
    assert "perturbation" not in report["groups"][0]
    assert any("--checkpoint best" in w for w in warnings)


def test_a_perturbed_eval_json_is_never_the_headline(tmp_path):
    """`eval --action-noise 0.1` without --tag writes a perturbed RUN/eval.json. Mutant/old behaviour: main read
    it as the run's held-out success with only a stderr warning; now the run is left out and the outputs say why."""
    root = tmp_path / "runs"
    for seed in range(2):
        write_run(root, f"adam_s{seed}", "adam", seed, [1, 0, 0, 0])
        write_run(root, f"dopr_s{seed}", "dopr", seed, [1, 1, 0, 0])
    report = json.loads((root / "dopr_s1" / "eval.json").read_text())
    report["perturbation"]["obs_noise"] = 0.1
    report["per_episode"] = [{**e, "success": True} for e in report["per_episode"]]
    report["success_rate"], report["successes"] = 1.0, 4
    (root / "dopr_s1" / "eval.json").write_text(json.dumps(report))
    result, _ = compare([root], out=tmp_path / "cmp", n_boot=50)
    dopr = result["groups"][1]
    assert dopr["n_seeds"] == 1 and dopr["success_mean"] == pytest.approx(0.5)  # not (0.5 + 1.0) / 2
    [left_out] = result["incomplete"]
    assert left_out["run"].endswith("dopr_s1") and "perturbed report" in left_out["reason"]
    assert "eval --tag" in left_out["reason"]
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "dopr_s1: eval.json is a perturbed report" in md


def _with_errors(run_dir, n_errors, legacy=False):
    """Mark the last `n_errors` episodes of RUN/eval.json as errored (missing): as the new eval writes them
    (n_errors, rates over completed episodes), or as a legacy report did (`errors`, errored = failed)."""
    path = run_dir / "eval.json"
    report = json.loads(path.read_text())
    for e in report["per_episode"][-n_errors:]:
        e["error"] = "EGL: context lost"
        if legacy:
            e["success"] = False
        else:
            del e["success"]
    if legacy:
        report.pop("n_errors"), report.pop("n_completed"), report.pop("complete")
        report["errors"] = n_errors
    else:
        completed = [e for e in report["per_episode"] if "error" not in e]
        report.update(n_errors=n_errors, n_completed=len(completed), complete=False,
                      successes=sum(e["success"] for e in completed),
                      success_rate=sum(e["success"] for e in completed) / len(completed))
    path.write_text(json.dumps(report))


@pytest.mark.parametrize("legacy", [False, True, "counts only"])
def test_errored_episodes_are_refused_unless_allowed(tmp_path, legacy):
    """Old behaviour (the mutant this catches): compare warned on stderr only and counted errored episodes as
    failures, with no trace in compare.json / compare.md. Now: one `error:` line naming the report; with
    --allow-errors the rates are over completed episodes and both outputs list the report and its errors."""
    root = two_optimizer_sweep(tmp_path / "sweep", n_seeds=2)
    _with_errors(root / "dopr_s1", 2, legacy=bool(legacy))  # dopr_s1 succeeds on episodes 0-7, 8-9 errored
    if legacy == "counts only":  # an older report without per-episode records: only its `errors` count tells
        report = json.loads((root / "dopr_s1" / "eval.json").read_text())
        del report["per_episode"]
        (root / "dopr_s1" / "eval.json").write_text(json.dumps(report))
    result = run_cli("compare", str(root), "--n-boot", "50")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("error: ") and "dopr_s1/eval.json: 2 of 10 episodes errored" in result.stderr
    assert "--allow-errors" in result.stderr and not (root / "compare").exists()
    report, _ = compare([root], n_boot=50, allow_errors=True)
    dopr = report["groups"][1]
    assert dopr["success_per_seed"] == pytest.approx([0.8, 1.0])  # 8/8 completed, not 8/10
    assert dopr["episodes"] == 18 and dopr["successes"] == 16
    if legacy != "counts only":
        assert dopr["paired"]["n_episodes"] == 8  # the episode seeds every run completed
    [errored] = report["errored_episodes"]
    assert errored == {"report": str(root / "dopr_s1" / "eval.json"), "n_errors": 2, "episodes": 10,
                       "n_completed": 8}
    saved = json.loads((root / "compare" / "compare.json").read_text())
    assert saved["allow_errors"] is True and saved["errored_episodes"] == [errored]
    md = (root / "compare" / "compare.md").read_text()
    assert "## Errored episodes" in md and "dopr_s1/eval.json: 2 of 10 episodes errored" in md
    # a report marked incomplete (an eval stopped with episodes missing) is refused too, even at n_errors 0
    report = json.loads((root / "adam_s0" / "eval.json").read_text())
    (root / "adam_s0" / "eval.json").write_text(json.dumps({**report, "complete": False}))
    with pytest.raises(UserError, match="adam_s0/eval.json: 0 of 10 episodes errored"):
        compare([root], n_boot=50)


def _protocol_runs(root, **per_run_extra):
    """adam and dopr, two seeds each; `per_run_extra` {run name: report fields} changes one run's protocol."""
    for optim in ("adam", "dopr"):
        for seed in range(2):
            name = f"{optim}_s{seed}"
            write_run(root, name, optim, seed, [1, 0, 0, 1], report_extra=per_run_extra.get(name))
    return root


@pytest.mark.parametrize("field, value", [("max_steps", 200), ("seed_start", 0), ("env_name", "PickPlaceCan"),
                                          ("checkpoint_name", "last"), ("episodes", 6)])
def test_runs_of_another_protocol_are_refused_or_split(tmp_path, field, value):
    """Old behaviour: runs evaluated with other max_steps / episode seeds / task / checkpoint were averaged into
    one group silently. Now one `error:` line names the field; --split-protocols compares each protocol apart."""
    extra = {field: value}
    if field == "seed_start":
        extra["per_episode"] = [{"seed": i, "success": s, "steps": 10, "return": float(s)}
                                for i, s in enumerate([True, False, False, True])]
    if field == "episodes":
        extra.update(successes=3, success_rate=0.5, per_episode=[
            {"seed": EPISODE_SEED_START + i, "success": s, "steps": 10, "return": float(s)}
            for i, s in enumerate([True, False, False, True, True, False])])
    root = _protocol_runs(tmp_path / "runs", dopr_s1=extra)
    result = run_cli("compare", str(root), "--n-boot", "50")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"error: protocol field {field} differs") and "dopr_s1" in result.stderr
    report, _ = compare([root], n_boot=50, split_protocols=True)
    names = {g["name"]: g for g in report["groups"]}
    assert sorted(names) == ["adam@p0", "dopr@p0", "dopr@p1"]
    assert names["dopr@p1"]["runs"] == [str(root / "dopr_s1")] and names["dopr@p1"]["baseline_group"] is None
    assert names["dopr@p0"]["baseline_group"] == "adam@p0" and names["dopr@p0"]["n_seeds"] == 1
    assert [p["fields"][field] for p in report["protocols"]] == [
        {"max_steps": 400, "seed_start": EPISODE_SEED_START, "env_name": "Lift", "checkpoint_name": "final",
         "episodes": 4}[field],
        value]


def test_dataset_and_sweep_identity_are_protocol(tmp_path):
    """The training data (sha256 in the report's provenance) and two sweeps of different configs / --set must not
    merge into one group; bookkeeping --set items (train.device, train.threads) are not protocol."""
    root = _protocol_runs(tmp_path / "runs",
                          **{n: {"provenance": {"run": {"dataset": {"sha256": "a" * 64}}}}
                             for n in ("adam_s0", "adam_s1", "dopr_s0")},
                          dopr_s1={"provenance": {"run": {"dataset": {"sha256": "b" * 64}}}})
    with pytest.raises(UserError, match="protocol field dataset_sha256 differs"):
        compare([root], n_boot=50)
    # a swept data.path (here: the plain runs' configs differ in it) may change the dataset between groups, never
    # within one (mutant caught: checking dataset_sha256 across all runs, or not at all)
    for name, path in (("adam_s0", "a.hdf5"), ("adam_s1", "a.hdf5"), ("dopr_s0", "b.hdf5"), ("dopr_s1", "b.hdf5")):
        config = yaml.safe_load((root / name / "config.yaml").read_text())
        config["data"] = {"path": path}
        (root / name / "config.yaml").write_text(yaml.safe_dump(config))
        report = json.loads((root / name / "eval.json").read_text())
        report["provenance"]["run"]["dataset"]["sha256"] = path[0] * 64
        (root / name / "eval.json").write_text(json.dumps(report))
    swept = build_report(discover([root], [])[0], n_boot=50)
    assert [g["name"] for g in swept["groups"]] == ["adam_path-a.hdf5", "dopr_path-b.hdf5"]
    assert swept["groups"][1]["baseline_group"] is None  # no adam group trained on b.hdf5: nothing to compare
    assert swept["protocols"][0]["fields"]["dataset_sha256"] == "varies with data.path"
    report = json.loads((root / "dopr_s1" / "eval.json").read_text())
    report["provenance"]["run"]["dataset"]["sha256"] = "c" * 64
    (root / "dopr_s1" / "eval.json").write_text(json.dumps(report))
    with pytest.raises(UserError, match="protocol field dataset_sha256 differs"):
        build_report(discover([root], [])[0], n_boot=50)
    sweeps = []
    for k, (sha, sets) in enumerate([("1" * 64, ["train.device=cuda"]),
                                     ("1" * 64, ["train.threads=1", "train.device=cpu"])]):
        sweep = two_optimizer_sweep(tmp_path / f"sweep{k}", n_seeds=2)
        data = json.loads((sweep / "sweep.json").read_text())
        data.update(config_sha256=sha, set=sets)
        for cell in data["cells"]:  # the second sweep holds seeds 2-3
            cell["seed"] += 2 * k
        (sweep / "sweep.json").write_text(json.dumps(data))
        sweeps.append((sweep, data))
    report, _ = compare([s for s, _ in sweeps], out=tmp_path / "cmp", n_boot=50)  # only bookkeeping differs
    assert [g["n_seeds"] for g in report["groups"]] == [4, 4]
    sweep, data = sweeps[1]
    (sweep / "sweep.json").write_text(json.dumps({**data, "set": ["optim.lr=3e-4"]}))
    with pytest.raises(UserError, match="protocol field sweep_set differs"):
        compare([s for s, _ in sweeps], out=tmp_path / "cmp", n_boot=50)
    (sweep / "sweep.json").write_text(json.dumps({**data, "config_sha256": "2" * 64}))
    with pytest.raises(UserError, match="protocol field sweep_config_sha256 differs"):
        compare([s for s, _ in sweeps], out=tmp_path / "cmp", n_boot=50)


def test_duplicate_training_seeds_in_a_group_are_an_error(tmp_path):
    """Old behaviour: a note in compare.json. The same run given twice (or two sweeps' seed-0 cells) would count
    as two training seeds."""
    sweeps = [two_optimizer_sweep(tmp_path / f"sweep{k}", n_seeds=2) for k in range(2)]
    with pytest.raises(UserError, match=r"group adam: training seed 0 twice \("):
        compare(sweeps, out=tmp_path / "cmp", n_boot=50)


def test_grid_groups_from_config_diffs_and_best_config(tmp_path):
    """Without sweep.json: groups come from the keys the configs differ in (AP keys only for AP optimizers)."""
    root = tmp_path / "runs"
    for seed in range(3):
        write_run(root, f"adam_s{seed}", "adam", seed, [1] * 4 + [0] * 6, success_curve=(0.3, 0.4),
                  config_extra={"train.device": f"cuda:{seed}"})  # bookkeeping keys do not split groups
        for damping, k, sel in ((0.3, 3, 0.9), (3, 7, 0.5)):  # selection seeds favour 0.3, held-out seeds 3
            write_run(root, f"dopr_d{damping}_s{seed}", "dopr", seed, [1] * k + [0] * (10 - k),
                      settings={"optim.ap.damping": damping}, success_curve=(sel - 0.1, sel))
    report = build_report(discover([root], [])[0], select="best-config", n_boot=500)
    names = [g["name"] for g in report["groups"]]
    assert names == ["adam", "dopr_damping-0.3", "dopr_damping-3"]
    assert report["settings_keys"] == ["optim.ap.damping"]
    same = {g["name"]: g for g in report["groups"]}
    assert same["dopr_damping-3"]["diff_vs_baseline"] == pytest.approx(0.3)
    best = {g["name"]: g for g in report["best_config"]["groups"]}
    assert set(best) == {"adam", "dopr_damping-0.3"}  # chosen on the selection seeds, not on held-out success
    assert best["dopr_damping-0.3"]["selection_score"] == pytest.approx(0.85)
    assert best["dopr_damping-0.3"]["diff_vs_baseline"] == pytest.approx(-0.1)
    assert best["dopr_damping-0.3"]["candidates"] == pytest.approx({"dopr_damping-0.3": 0.85, "dopr_damping-3": 0.45})


def test_best_config_needs_in_training_success(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "adam_s0", "adam", 0, [1, 0])
    write_run(root, "dopr_s0", "dopr", 0, [1, 1])
    with pytest.raises(UserError, match="train.eval_every"):
        build_report(discover([root], [])[0], select="best-config")


def test_best_config_on_a_return_metric_ranks_grid_points_by_selection_return(tmp_path):
    """For --metric return the grid point is chosen on the mean in-training return (metrics.jsonl `return`), not on
    in-training success, which ties here (every selection episode 'succeeds': a hopper that never fell)."""
    root = tmp_path / "runs"
    for seed in range(2):
        for lr, sel_return in ((1e-4, 900.0), (3e-4, 1500.0)):
            run = write_run(root, f"adam_lr{lr}_s{seed}", "adam", seed, [1] * 10, settings={"optim.lr": lr},
                            success_curve=(1.0, 1.0), returns=[100.0 * (i + seed) for i in range(10)])
            lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            for r in lines:
                r["return"] = sel_return
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    by_return = build_report(discover([root], [], metric="return")[0], select="best-config", n_boot=200,
                             metric="return")
    assert [g["name"] for g in by_return["best_config"]["groups"]] == ["adam_lr-0.0003"]
    assert by_return["best_config"]["groups"][0]["selection_score"] == pytest.approx(1500.0)
    by_success = build_report(discover([root], [])[0], select="best-config", n_boot=200)
    assert [g["name"] for g in by_success["best_config"]["groups"]] == ["adam_lr-0.0001"]  # a tie: first name


def test_checkpoint_best_compares_each_runs_best_checkpoint_report(tmp_path):
    """--checkpoint best: eval_best.json is each run's held-out report (perturbed reports of the final checkpoint
    are not read with it); a run without one is left out, named."""
    root = tmp_path / "runs"
    for seed in range(3):
        write_run(root, f"adam_s{seed}", "adam", seed, [0] * 10, best_outcomes=[1] * 5 + [0] * 5,
                  perturbed=[("push1", "push", 1.0, [0] * 10)])
        write_run(root, f"dopr_s{seed}", "dopr", seed, [0] * 10, best_outcomes=[1] * 8 + [0] * 2)
    write_run(root, "dopr_s3", "dopr", 3, [1] * 10)  # no best report
    report, warnings = compare([root], out=tmp_path / "cmp", checkpoint="best", n_boot=200)
    groups = {g["name"]: g for g in report["groups"]}
    assert groups["adam"]["success_mean"] == pytest.approx(0.5) and groups["dopr"]["success_mean"] == pytest.approx(0.8)
    assert groups["dopr"]["n_seeds"] == 3 and "perturbation" not in groups["adam"]
    assert any("dopr_s3" in w and "eval_best.json" in w for w in warnings)
    assert "eval_best.json, the best checkpoint" in (tmp_path / "cmp" / "compare.md").read_text()
    final, _ = compare([root], out=tmp_path / "cmp_final", n_boot=200)
    assert {g["name"]: g["success_mean"] for g in final["groups"]}["adam"] == 0.0


def test_per_grid_point_baseline_and_explicit_baseline(tmp_path):
    root = tmp_path / "runs"
    for lr, k_adam, k_muon in ((1e-4, 2, 4), (3e-4, 5, 9)):
        for seed in range(2):
            write_run(root, f"adam_lr{lr}_s{seed}", "adam", seed, [1] * k_adam + [0] * (10 - k_adam),
                      settings={"optim.lr": lr})
            write_run(root, f"muon_lr{lr}_s{seed}", "muon", seed, [1] * k_muon + [0] * (10 - k_muon),
                      settings={"optim.lr": lr})
    report = build_report(discover([root], [])[0], n_boot=300)
    by = {g["name"]: g for g in report["groups"]}
    assert by["muon_lr-0.0003"]["baseline_group"] == "adam_lr-0.0003"
    assert by["muon_lr-0.0003"]["diff_vs_baseline"] == pytest.approx(0.4)
    assert by["muon_lr-0.0001"]["diff_vs_baseline"] == pytest.approx(0.2)
    named = build_report(discover([root], [])[0], baseline="adam_lr-0.0001", n_boot=300)
    assert {g["baseline_group"] for g in named["groups"]} == {"adam_lr-0.0001"}
    with pytest.raises(UserError, match="--baseline 'sgd'"):
        build_report(discover([root], [])[0], baseline="sgd")


def test_paired_test_skipped_when_episode_seeds_differ(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "adam_s0", "adam", 0, [1, 0, 0, 0])
    write_run(root, "dopr_s0", "dopr", 0, [1, 1, 1, 0], seed_start=5)
    with pytest.raises(UserError, match="protocol field seed_start differs"):
        build_report(discover([root], [])[0], n_boot=100)
    for run in ("adam_s0", "dopr_s0"):  # older reports without seed_start: only the per-episode seeds tell
        report = json.loads((root / run / "eval.json").read_text())
        del report["seed_start"]
        (root / run / "eval.json").write_text(json.dumps(report))
    dopr = build_report(discover([root], [])[0], n_boot=100)["groups"][1]
    assert dopr["p_paired"] is None and "no episode seed in common" in dopr["paired"]["skipped"]
    assert dopr["p_permutation"] == 1.0  # one seed per group: the two labellings are equally extreme


def test_perturbation_and_drift_plots(tmp_path):
    root = tmp_path / "runs"
    steps = list(range(0, 40, 4))
    for optim, k, slope in (("adam", 6, 0.05), ("dopr", 8, 0.02)):
        for seed in range(2):
            drift = {"steps": steps, "drift_mean": [0.1 + slope * t for t in steps],
                     "drift_success": [0.1 + 0.5 * slope * t for t in steps],
                     "drift_failure": [0.1 + 2 * slope * t for t in steps], "demo_band": [0.05, 0.3],
                     "departure_step": 8 if optim == "adam" else 20}
            write_run(root, f"{optim}_s{seed}", optim, seed, [1] * k + [0] * (10 - k), drift=drift,
                      perturbed=[("an1", "action_noise", 0.1, [1] * (k - 2) + [0] * (12 - k)),
                                 ("an2", "action_noise", 0.3, [1] * (k - 5) + [0] * (15 - k)),
                                 ("push", "push", 0.5, [1] * (k - 3) + [0] * (13 - k))])
    (root / "adam_s0" / "eval_an1-20260101-120000.json").write_text("{}")  # archived reports: ignored
    for run in ("adam_s0", "dopr_s0"):  # a complete report at another level, archived under a clashing stamp
        archived = json.loads((root / run / "eval_an1.json").read_text())
        archived["perturbation"]["action_noise"] = 0.2
        (root / run / "eval_an1-20260101-120000-1.json").write_text(json.dumps(archived))
    report, _ = compare([root], out=tmp_path / "cmp", n_boot=200)
    dopr = report["groups"][1]
    rows = dopr["perturbation"]["action_noise"]
    assert [r["level"] for r in rows] == [0.0, 0.1, 0.3]
    assert [r["success_pooled"] for r in rows] == pytest.approx([0.8, 0.6, 0.3])
    assert list(dopr["perturbation"]) == ["action_noise", "push (magnitude 2)"]
    for plot in ("drift", "perturbation"):
        assert (tmp_path / "cmp" / f"{plot}.png").is_file() and report["plots"][plot]


def test_perturbation_differences_per_level(tmp_path):
    """Each perturbation level of a group is compared with the baseline group's runs at the same kind and level,
    exactly as the unperturbed eval: level 0 repeats the main numbers; a level only dopr played has none."""
    root = tmp_path / "runs"
    for optim, k0, k1 in (("adam", 5, 4), ("dopr", 8, 7)):
        for seed in range(3):
            perturbed = [("an1", "action_noise", 0.1, [1] * k1 + [0] * (10 - k1)),
                         ("push", "push", 0.5, [1] * (k0 - 3) + [0] * (13 - k0))]
            if optim == "dopr":
                perturbed.append(("an3", "action_noise", 0.3, [1] * 2 + [0] * 8))  # no adam run at 0.3
            write_run(root, f"{optim}_s{seed}", optim, seed, [1] * k0 + [0] * (10 - k0), perturbed=perturbed)
    # another eval of adam_s0 at 0.1 under a later tag: one report per run and level (the first by file name)
    write_run(tmp_path / "spare", "adam_s0", "adam", 0, [1] * 5 + [0] * 5,
              perturbed=[("zz", "action_noise", 0.1, [1] * 10)])
    (tmp_path / "spare" / "adam_s0" / "eval_zz.json").rename(root / "adam_s0" / "eval_zz.json")
    report, _ = compare([root], out=tmp_path / "cmp", n_boot=500)
    adam, dopr = report["groups"]
    assert adam["baseline_group"] == "adam" and "diff_vs_baseline" not in adam["perturbation"]["action_noise"][0]
    assert [r["success_pooled"] for r in adam["perturbation"]["action_noise"]] == pytest.approx([0.5, 0.4])
    assert any("adam_s0: several eval_<tag>.json at action_noise 0.1" in n for n in report["notes"])
    rows = {r["level"]: r for r in dopr["perturbation"]["action_noise"]}
    assert sorted(rows) == [0.0, 0.1, 0.3]
    zero = rows[0.0]  # level 0 is eval.json: the group's main difference, bootstrap interval included
    for key in ("diff_vs_baseline", "diff_ci", "p_permutation", "p_paired", "paired", "permutation"):
        assert zero[key] == dopr[key], key
    assert zero["diff_vs_baseline"] == pytest.approx(0.3) and zero["note"] is None
    at = rows[0.1]  # adam 4/10, dopr 7/10 in every seed
    assert at["baseline_group"] == "adam" and at["n_seeds"] == 3 and at["note"] is None
    assert at["diff_vs_baseline"] == pytest.approx(0.3)
    assert at["diff_ci"][0] < 0.3 < at["diff_ci"][1]
    # 3 vs 3 seeds with identical rates within each group: perfectly separated, 2 of C(6, 3) = 20 splits
    assert at["p_permutation"] == pytest.approx(2 / 20) and at["permutation"]["method"] == "exact"
    # shared episode seeds: both succeed on the first 4, only dopr on the next 3 -> p = 2 / 2^3
    assert at["p_paired"] == pytest.approx(2 / 8) and at["paired"]["n_discordant"] == 3
    expected = stats.hierarchical_bootstrap_diff([[1] * 4 + [0] * 6] * 3, [[1] * 7 + [0] * 3] * 3, n_boot=500)
    assert at["diff_ci_bootstrap"] == pytest.approx(expected["ci"])
    # Welch on per-seed rates, by hand: the sample variances are 0, so each is its binomial floor q(1-q)/10
    v_adam, v_dopr = 0.4 * 0.6 / 10 / 3, 0.7 * 0.3 / 10 / 3
    df = (v_adam + v_dopr) ** 2 / ((v_adam ** 2 + v_dopr ** 2) / 2)
    half = pytest.importorskip("scipy.stats").t.ppf(0.975, df) * math.sqrt(v_adam + v_dopr)
    assert at["diff_ci"] == pytest.approx([0.3 - half, 0.3 + half]) and at["few_seeds"] is True
    assert at["p_permutation_min"] == pytest.approx(2 / 20) and at["p_paired_min"] == pytest.approx(2 / 8)
    only = rows[0.3]
    assert only["success_pooled"] == pytest.approx(0.2)
    assert all(only[k] is None for k in ("diff_vs_baseline", "diff_ci", "p_permutation", "p_paired", "paired"))
    assert only["note"] == "baseline group adam has no runs at action_noise 0.3"
    push = {r["level"]: r for r in dopr["perturbation"]["push (magnitude 2)"]}
    assert push[0.5]["diff_vs_baseline"] == pytest.approx(0.3) and push[0.0]["p_permutation"] == dopr["p_permutation"]
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["groups"][1]["perturbation"]["action_noise"][1]["p_permutation"] == pytest.approx(0.1)
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert md.index("## Same configuration") < md.index("## Success under perturbation") < md.index("### action_noise")
    section = md[md.index("### action_noise"):md.index("### push")]
    header, rule, *lines = section.strip().splitlines()[2:]
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "level", "adam [Wilson 95%]", "dopr [Wilson 95%]", "dopr vs adam [95% CI]", "p perm", "p paired"]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert [c[0] for c in cells] == ["0", "0.1", "0.3"]
    assert cells[1][1].startswith("40.0% [") and cells[1][3].startswith("+30.0 pp [") and cells[1][3].endswith("] †")
    assert cells[1][4:] == ["0.100 (min 0.100)", "0.250 (min 0.250)"]
    assert cells[2][1] == "-" and cells[2][3:] == ["no baseline runs", "-", "-"]


def test_perturbation_differences_follow_the_best_config_baseline(tmp_path):
    """best-config rows are compared with the selected baseline, and a group without one has no differences."""
    root = tmp_path / "runs"
    for name, optim, damping, k, sel in (("adam", "adam", None, 4, 0.5), ("dopr_a", "dopr", 0.3, 8, 0.9),
                                         ("dopr_b", "dopr", 3, 6, 0.2)):
        settings = {} if damping is None else {"optim.ap.damping": damping}
        write_run(root, name, optim, 0, [1] * k + [0] * (10 - k), settings=settings, success_curve=(sel,),
                  perturbed=[("an1", "action_noise", 0.1, [1] * (k - 1) + [0] * (11 - k))])
    report = build_report(discover([root], [])[0], select="best-config", baseline="dopr_damping-3", n_boot=100)
    same = {g["name"]: g for g in report["groups"]}
    assert same["dopr_damping-0.3"]["perturbation"]["action_noise"][1]["diff_vs_baseline"] == pytest.approx(0.2)
    best = {g["name"]: g for g in report["best_config"]["groups"]}
    assert set(best) == {"adam", "dopr_damping-0.3"}  # the named baseline was not selected: no differences
    assert best["adam"]["diff_vs_baseline"] is None and best["adam"]["paired"] is None
    assert "diff_vs_baseline" not in best["adam"]["perturbation"]["action_noise"][1]
    assert same["adam"]["perturbation"]["action_noise"][1]["diff_vs_baseline"] == pytest.approx(-0.2)


def test_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        compare([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a run directory"):
        compare([tmp_path / "empty"])
    write_run(tmp_path / "a", "r", "adam", 0, None)
    with pytest.raises(UserError, match="no complete run"):
        compare([tmp_path / "a"])
    with pytest.raises(UserError, match="--out"):
        compare([tmp_path / "a", tmp_path / "empty"])
    assert not (tmp_path / "a" / "compare").exists()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(UserError, match="is not writable"):  # checked before drawing (was a traceback)
        plot_run(tmp_path / "m", "/proc/no/such/curves.png")
    with pytest.raises(UserError, match="must end in .png"):
        plot_run(tmp_path / "m", tmp_path / "m" / "curves.txt")
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["metrics.jsonl"]


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_compare_and_plot_on_real_runs(tmp_path, lift_demos):
    """End to end: `train` (CLI, writes its training-curve PNG) and the Python API train two tiny real runs,
    `evaluate` plays 2 episodes each, then `compare` and `plot` read them from disk."""
    from dopr_robot.config import load_config
    from dopr_robot.evaluation import evaluate
    from dopr_robot.fileio import write_json
    from dopr_robot.training import train

    tiny = ["policy.mlp.hidden_dim=32", "policy.mlp.num_layers=2", "train.batch_size=16", "train.log_every=5",
            "train.val_every=5", "train.warmup_steps=2", "train.steps=10"]
    root = tmp_path / "runs"
    args = ["train", "--dataset", str(lift_demos), "--out", str(root / "dopr_s0"), "--optim", "dopr"]
    result = run_cli(*args, *[a for item in tiny for a in ("--set", item)])
    assert result.returncode == 0, result.stderr
    assert _png_size(root / "dopr_s0" / "training_curves.png")[0] > 800
    train(load_config(None, [f"data.path={lift_demos}", *tiny, "optim.name=adam"]), root / "adam_s0", progress=False)
    for run in ("adam_s0", "dopr_s0"):
        write_json(root / run / "eval.json", evaluate(root / run, episodes=2, max_steps=20, workers=1, progress=False))
    result = run_cli("compare", str(root), "--n-boot", "200")
    assert result.returncode == 0, result.stderr
    saved = json.loads((root / "compare" / "compare.json").read_text())
    assert [g["name"] for g in saved["groups"]] == ["adam", "dopr"]
    dopr = saved["groups"][1]
    assert dopr["n_seeds"] == 1 and dopr["runs"] == [str(root / "dopr_s0")]
    assert math.isfinite(dopr["val_loss_mean"]) and dopr["episodes"] == 2
    assert dopr["p_paired"] is not None  # both played seeds 100000, 100001
    assert "| dopr" in result.stdout and "compare.json" in result.stdout
    assert _png_size(root / "compare" / "success_vs_val_loss.png")[0] > 500
    bad = run_cli("compare", str(root), "--select", "best-of-all")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --select") and len(bad.stderr.splitlines()) == 1
    result = run_cli("plot", str(root / "adam_s0"), "--out", str(tmp_path / "adam.png"))
    assert result.returncode == 0, result.stderr
    assert _png_size(tmp_path / "adam.png")[0] > 800
    with pytest.raises(UserError, match="no such run directory"):
        plot_run(tmp_path / "missing")
    assert plot_run(tmp_path / "runs" / "compare", missing_ok=True) is None  # a directory without metrics


def test_sweep_grid_groups_keep_the_sweep_cell_names(tmp_path):
    """sweep.json's settings are the grid's value texts, applied to every optimizer (adam too): groups are the
    cell names without `_s<seed>`, and each is compared with adam at the same grid point."""
    root = tmp_path / "sweep"
    cells = []
    for damping, k_adam, k_dopr in (("0.3", 3, 6), ("3", 4, 9)):
        for optim, k in (("adam", k_adam), ("dopr", k_dopr)):
            for seed in range(2):
                name = f"{optim}_damping-{damping}_s{seed}"
                write_run(root, name, optim, seed, [1] * k + [0] * (10 - k), settings={"optim.ap.damping": damping})
                cells.append({"name": name, "dir": str(root / name), "optim": optim, "seed": seed,
                              "settings": {"optim.ap.damping": damping}, "state": "done"})
    (root / "sweep.json").write_text(json.dumps({"cells": cells}))
    report = build_report(discover([root], [])[0], n_boot=200)
    by = {g["name"]: g for g in report["groups"]}
    assert sorted(by) == ["adam_damping-0.3", "adam_damping-3", "dopr_damping-0.3", "dopr_damping-3"]
    assert by["dopr_damping-3"]["baseline_group"] == "adam_damping-3"
    assert by["dopr_damping-3"]["diff_vs_baseline"] == pytest.approx(0.5)
    assert by["dopr_damping-0.3"]["settings"] == {"optim.ap.damping": "0.3"} and by["adam_damping-3"]["n_seeds"] == 2
    [panel] = report["grid"]  # the value texts are numbers; damping means nothing to adam: its groups are lines
    assert [p["x"] for p in panel["series"][0]["points"]] == [0.3, 3.0]
    assert [(line["group"], line["baseline"]) for line in panel["lines"]] == [("adam_damping-0.3", True),
                                                                              ("adam_damping-3", True)]


def damping_sweep_and_plain_runs(root):
    """As the README's damping comparison: a sweep of dopr over optim.ap.damping (cells named by their settings),
    plus plain dopr and adam runs trained at the config's damping 1.0 (no settings: they only differ in optim)."""
    cells = []
    outcomes = {"0.3": ([1] * 6 + [0] * 4, [1] * 6 + [0] * 4),  # 12/20
                "3": ([1] * 9 + [0] * 1, [1] * 5 + [0] * 5)}  # 14/20
    for damping, per_seed in outcomes.items():
        for seed, values in enumerate(per_seed):
            name = f"dopr_damping-{damping}_s{seed}"
            write_run(root / "sweep", name, "dopr", seed, values, settings={"optim.ap.damping": float(damping)})
            cells.append({"name": name, "optim": "dopr", "seed": seed, "settings": {"optim.ap.damping": damping},
                          "state": "done"})
    (root / "sweep" / "sweep.json").write_text(json.dumps({"cells": cells}))
    for seed in range(3):
        write_run(root / "plain", f"adam_s{seed}", "adam", seed, [1] * 5 + [0] * 5)  # config damping 1.0 too
        write_run(root / "plain", f"dopr_s{seed}", "dopr", seed, [1] * 4 + [0] * 6)
    return [root / "sweep", root / "plain"]


def test_grid_plot_success_against_a_swept_setting(tmp_path):
    """Plot (e): the damping curve of dopr includes the plain dopr group at its config value; adam is a line."""
    report, _ = compare(damping_sweep_and_plain_runs(tmp_path), out=tmp_path / "cmp", n_boot=200)
    [panel] = report["grid"]
    assert panel["key"] == "optim.ap.damping" and panel["log_x"] is True  # 0.3 to 3: a decade
    [dopr] = panel["series"]
    assert dopr["optim"] == "dopr" and dopr["fixed"] == {}
    points = dopr["points"]
    assert [p["x"] for p in points] == [0.3, 1.0, 3.0]
    assert [p["group"] for p in points] == ["dopr_damping-0.3", "dopr", "dopr_damping-3"]
    assert [p["from"] for p in points] == ["settings", "config", "settings"]
    assert [p["n_seeds"] for p in points] == [2, 3, 2]
    assert [p["success_pooled"] for p in points] == pytest.approx([0.6, 0.4, 0.7])
    assert [p["success_mean"] for p in points] == pytest.approx([0.6, 0.4, 0.7])
    assert points[2]["success_ci"] == pytest.approx(list(stats.wilson_interval(14, 20)))
    [adam] = panel["lines"]
    assert adam["group"] == "adam" and adam["baseline"] is True and adam["n_seeds"] == 3
    assert adam["success_pooled"] == pytest.approx(0.5)
    assert adam["success_ci"] == pytest.approx(list(stats.wilson_interval(15, 30)))
    assert report["plots"]["grid"] == str(tmp_path / "cmp" / "grid.png")
    assert _png_size(tmp_path / "cmp" / "grid.png")[0] > 500
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["grid"][0]["series"][0]["points"][1]["x"] == 1.0
    assert not any("plot (e)" in n for n in report["notes"])
    # the whole curve is one trend test over its 7 runs, on log10(damping)
    trend = dopr["trend"]
    expected = stats.trend_test([math.log10(x) for x in (0.3, 0.3, 1, 1, 1, 3, 3)],
                                [0.6, 0.6, 0.4, 0.4, 0.4, 0.9, 0.5])
    assert trend["x"] == "log10(optim.ap.damping)" and trend["n_runs"] == 7 and trend["method"] == "exact"
    assert trend["slope"] == pytest.approx(expected["slope"]) and trend["p"] == pytest.approx(expected["p"])
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| optim.ap.damping | dopr      | 0.3, 1, 3 | 7    |" in md and stats.trend_label(trend) in md


def test_grid_plot_config_value_must_agree_and_several_keys(tmp_path):
    paths = damping_sweep_and_plain_runs(tmp_path)
    sweep = json.loads((paths[0] / "sweep.json").read_text())
    for seed, damping in ((0, 1.0), (1, 2.0)):  # sweep cells without the setting whose configs disagree on it
        write_run(paths[0], f"dopr_s{seed}", "dopr", seed, [1, 0] * 5, config_extra={"optim.ap.damping": damping})
        sweep["cells"].append({"name": f"dopr_s{seed}", "optim": "dopr", "seed": seed, "settings": {},
                               "state": "done"})
    (paths[0] / "sweep.json").write_text(json.dumps(sweep))
    report = build_report(discover(paths[:1], [])[0], n_boot=100)
    assert [p["group"] for p in report["grid"][0]["series"][0]["points"]] == ["dopr_damping-0.3", "dopr_damping-3"]
    assert any(n.startswith("plot (e), optim.ap.damping: group(s) dopr left off") for n in report["notes"])
    # the plain dopr runs of another directory split by assign_settings when their configs disagree
    config = yaml.safe_load((paths[1] / "dopr_s2" / "config.yaml").read_text())
    config["optim"]["ap"]["damping"] = 2.0
    (paths[1] / "dopr_s2" / "config.yaml").write_text(yaml.safe_dump(config))
    report = build_report(discover(paths[1:], [])[0], n_boot=100)
    points = report["grid"][0]["series"][0]["points"]
    assert [(p["group"], p["x"], p["from"]) for p in points] == [("dopr_damping-1", 1.0, "settings"),
                                                                 ("dopr_damping-2", 2.0, "settings")]
    assert report["grid"][0]["log_x"] is False and [g["group"] for g in report["grid"][0]["lines"]] == ["adam"]
    # two keys in one grid: one panel per key, one series per value of the other key; muon has one lr only
    root = tmp_path / "lr_damping"
    for lr in (1e-4, 1e-3):
        for damping, k in ((0.5, 3), (5, 6)):
            write_run(root, f"dopr_{lr}_{damping}", "dopr", 0, [1] * k + [0] * (10 - k),
                      settings={"optim.lr": lr, "optim.ap.damping": damping})
        write_run(root, f"adam_{lr}", "adam", 0, [1] * 5 + [0] * 5, settings={"optim.lr": lr})
    write_run(root, "muon", "muon", 0, [1] * 7 + [0] * 3, settings={"optim.lr": 2e-4})
    report = build_report(discover([root], [])[0], n_boot=100)
    by_key = {p["key"]: p for p in report["grid"]}
    assert sorted(by_key) == ["optim.ap.damping", "optim.lr"]
    damping = by_key["optim.ap.damping"]
    assert sorted(s["fixed"]["optim.lr"] for s in damping["series"]) == [1e-4, 1e-3]
    assert all([p["x"] for p in s["points"]] == [0.5, 5.0] for s in damping["series"])
    assert sorted(line["group"] for line in damping["lines"]) == ["adam_lr-0.0001", "adam_lr-0.001", "muon_lr-0.0002"]
    lr = by_key["optim.lr"]
    assert {(s["optim"], len(s["points"])) for s in lr["series"]} == {("adam", 2), ("dopr", 2), ("muon", 1)}
    assert lr["lines"] == [] and lr["log_x"] is True
    compare([root], out=tmp_path / "cmp2", n_boot=100)
    assert (tmp_path / "cmp2" / "grid.png").is_file()


def test_grid_plot_left_out_when_nothing_varies(tmp_path):
    report, _ = compare([two_optimizer_sweep(tmp_path / "sweep", n_seeds=2)], n_boot=100)
    assert report["grid"] == [] and report["plots"]["grid"] is None
    assert "plot (e) left out: no numeric grid setting varies within an optimizer" in report["notes"]
    assert not (tmp_path / "sweep" / "compare" / "grid.png").exists()


def test_a_run_never_imports_the_sweep_layer():
    """Statistics sit below evaluation and plotting (dopr_robot.stats). On main, evaluation and plotting imported
    dopr_robot.experiments.stats: importing them loaded the sweep/compare package."""
    import subprocess
    import sys

    code = ("import sys, dopr_robot.evaluation, dopr_robot.plotting, dopr_robot.stats; "
            "print(sorted(m for m in sys.modules if m.startswith('dopr_robot.experiments')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _return_runs(root, reference_scores=None):
    """adam's seeds have mean returns 25, 20, 30 and dopr's 40, 45, 50 (4 episodes each, seeds 100000-100003);
    every run fails the task, so success cannot tell them apart."""
    returns = {"adam": [[10, 20, 30, 40], [20] * 4, [30] * 4], "dopr": [[40] * 4, [45] * 4, [50] * 4]}
    extra = None if reference_scores is None else {"reference_scores": reference_scores}
    for optim, per_seed in returns.items():
        for seed, values in enumerate(per_seed):
            write_run(root, f"{optim}_s{seed}", optim, seed, [0] * 4, returns=values, report_extra=extra)
    return root


def test_compare_on_returns_has_the_known_answer(tmp_path):
    """--metric return: the difference of mean returns is 45 - 25 = 20; the seeds separate perfectly (exact
    permutation p = 2 / C(6, 3) = 0.1, also its minimum); per episode seed d_e = 25, 21.7, 18.3, 15 all > 0, so
    the paired sign-flip p = 2 / 2^4; Welch by hand: both seed variances 25, se = sqrt(50 / 3), df = 4. Mutant
    caught: a compare that reads `success` whatever --metric says (every difference 0, p 1)."""
    scipy_stats = pytest.importorskip("scipy.stats")
    root = _return_runs(tmp_path / "runs")
    result = run_cli("compare", str(root), "--metric", "return", "--n-boot", "200")
    assert result.returncode == 0, result.stderr
    report = json.loads((root / "compare" / "compare.json").read_text())
    adam, dopr = report["groups"]
    assert report["metric"] == "return" and adam["return_per_seed"] == pytest.approx([25, 20, 30])
    assert dopr["return_mean"] == pytest.approx(45) and dopr["return_sd"] == pytest.approx(5)
    assert adam["return_pooled"] == pytest.approx(25)
    ref = scipy_stats.ttest_1samp([10, 20, 30, 40] + [20] * 4 + [30] * 4, 0).confidence_interval(0.95)
    assert adam["return_ci"] == pytest.approx([ref.low, ref.high])
    assert dopr["diff_vs_baseline"] == pytest.approx(20)
    half = scipy_stats.t.ppf(0.975, 4) * math.sqrt(50 / 3)
    assert dopr["diff_ci"] == pytest.approx([20 - half, 20 + half]) and dopr["diff_interval"]["df"] == pytest.approx(4)
    assert dopr["p_permutation"] == pytest.approx(0.1) and dopr["p_permutation_min"] == pytest.approx(0.1)
    assert dopr["p_paired"] == pytest.approx(2 / 16) and dopr["paired"]["mean_diff"] == pytest.approx(20)
    lo, hi = dopr["diff_ci_bootstrap"]
    assert 20 - 25 <= lo < 20 < hi <= 20 + 25
    assert "| dopr" in result.stdout and f"+20 [{20 - half:+.4g}, {20 + half:+.4g}] †" in result.stdout
    assert "return final" in result.stdout and "t 95% over episodes" in result.stdout
    assert _png_size(root / "compare" / "success_vs_val_loss.png")[0] > 500
    success = build_report(discover([root], [])[0], n_boot=100)["groups"][1]
    assert success["diff_vs_baseline"] == 0.0 and success["p_permutation"] == 1.0


def test_normalized_return_needs_reference_scores(tmp_path):
    """normalized_return = (return - min) / (max - min) with the report's reference_scores; a report without them
    is refused with one line naming it."""
    root = _return_runs(tmp_path / "runs", reference_scores={"min": 10.0, "max": 60.0})
    report, _ = compare([root], metric="normalized_return", n_boot=100)
    adam, dopr = report["groups"]  # (45 - 10) / 50 and (25 - 10) / 50 (mutant caught: dividing without the min)
    assert dopr["normalized_return_mean"] == pytest.approx(0.7) and adam["normalized_return_mean"] == pytest.approx(0.3)
    assert dopr["diff_vs_baseline"] == pytest.approx(0.4) and dopr["p_permutation"] == pytest.approx(0.1)
    md = (root / "compare" / "compare.md").read_text()
    assert "metric normalized return" in md and "+40.0 pp [" in md
    plain = _return_runs(tmp_path / "plain")
    result = run_cli("compare", str(plain), "--metric", "normalized_return")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert "adam_s0/eval.json: --metric normalized_return needs the report's reference_scores" in result.stderr
    bad = run_cli("compare", str(plain), "--metric", "reward")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --metric must be one of success, return")


def test_return_metric_through_the_grid_and_perturbation_plots(tmp_path):
    """Every plot and table that shows success shows the metric: in these runs each episode's return is its
    success (0 or 1), so the return numbers must equal the success ones, key for key."""
    paths = damping_sweep_and_plain_runs(tmp_path)
    by_metric = {m: compare(paths, out=tmp_path / m, n_boot=100, metric=m)[0] for m in ("success", "return")}
    s_points = by_metric["success"]["grid"][0]["series"][0]["points"]
    r_points = by_metric["return"]["grid"][0]["series"][0]["points"]
    assert [p["return_pooled"] for p in r_points] == pytest.approx([p["success_pooled"] for p in s_points])
    trend = by_metric["return"]["grid"][0]["series"][0]["trend"]
    assert trend["metric"] == "return" and stats.trend_label(trend).endswith(" per decade")
    assert "pp" not in stats.trend_label(trend)
    assert (tmp_path / "return" / "grid.png").is_file()
    root = tmp_path / "perturbed"
    for optim, k in (("adam", 4), ("dopr", 7)):
        for seed in range(2):
            write_run(root, f"{optim}_s{seed}", optim, seed, [1] * k + [0] * (10 - k),
                      perturbed=[("an1", "action_noise", 0.1, [1] * (k - 1) + [0] * (11 - k))])
    report, _ = compare([root], out=tmp_path / "pcmp", n_boot=100, metric="return")
    row = report["groups"][1]["perturbation"]["action_noise"][1]
    assert row["return_mean"] == pytest.approx(0.6) and row["diff_vs_baseline"] == pytest.approx(0.3)
    assert (tmp_path / "pcmp" / "perturbation.png").is_file()
    assert "## Return under perturbation" in (tmp_path / "pcmp" / "compare.md").read_text()


def test_compare_normalized_return_on_real_gymnasium_runs(minari_pendulum, tmp_path, monkeypatch):
    """Interface (b) end to end: two tiny policies trained on a real Minari dataset and evaluated on
    InvertedPendulum-v5 write reports with per-episode returns and the dataset's reference_scores; compare
    --metric normalized_return reads them: each run's mean is its mean return / 40 (reference min 0, max 40)."""
    from tiny_data import run_cli as run_in_process, train_args

    root, dataset_id, _ = minari_pendulum
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    runs = tmp_path / "runs"
    for optim in ("adam", "dopr"):
        trained = run_in_process(*train_args(f"minari:{dataset_id}", runs / f"{optim}_s0", f"optim.name={optim}",
                                             "eval.max_steps=20", "data.horizon=8", "data.n_action_steps=4"))
        assert trained.returncode == 0, trained.stderr
        evaluated = run_in_process("eval", str(runs / f"{optim}_s0"), "--episodes", "3", "--workers", "1")
        assert evaluated.returncode == 0, evaluated.stderr
    result = run_in_process("compare", str(runs), "--metric", "normalized_return", "--n-boot", "100")
    assert result.returncode == 0, result.stderr
    report = json.loads((runs / "compare" / "compare.json").read_text())
    for group in report["groups"]:
        [run] = group["runs"]
        returns = [e["return"] for e in json.loads((pathlib.Path(run) / "eval.json").read_text())["per_episode"]]
        assert group["normalized_return_mean"] == pytest.approx(sum(returns) / len(returns) / 40)
    assert report["protocols"][0]["fields"]["env_name"] == "InvertedPendulum-v5"
    assert report["groups"][1]["p_paired_min"] is not None and "normalized return final" in result.stdout
