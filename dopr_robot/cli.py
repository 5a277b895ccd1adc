"""The `dopr-robot` command line: a thin layer over collect, expert train/eval, inspect/convert, train, eval,
diagnose, spectrum, plot, sweep and compare. Each command parses its options, calls one function of a
sub-package and prints its result.

Bad input (missing or corrupt files, unknown keys, invalid values) ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from dopr_robot.errors import Interrupted, UserError, check_counts

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Train diffusion / flow action-chunking policies with AdamW, Muon or DoPr; "
                       "measure closed-loop success.")


@app.command("collect")
def collect_cmd(
    task: str = typer.Option("lift", help="lift | can | square | transport"),
    episodes: int = typer.Option(100, help="successful demonstrations to write (with --env: episodes)"),
    seed: int = typer.Option(0, help="attempt i uses environment seed SEED + i"),
    out: Path = typer.Option(..., help="output robomimic-layout .hdf5 file (with --env: Minari dataset directory)"),
    max_steps: int = typer.Option(400, help="step limit of one expert attempt"),
    noise: float = typer.Option(0.0, help="imperfect demos: operator noise level (0 = the expert; 1 = hard)"),
    overwrite: bool = typer.Option(False, help="replace OUT if it exists"),
    env: Optional[str] = typer.Option(None, help="Gymnasium task (e.g. Hopper-v5): roll out --expert into a Minari "
                                      "dataset instead of a scripted robosuite expert"),
    expert: Optional[Path] = typer.Option(None, help="with --env: Stable-Baselines3 expert zip (dopr-robot expert "
                                          "train)"),
    dataset_id: Optional[str] = typer.Option(None, help="with --env: the Minari id recorded in the dataset "
                                             "[dopr/<env>/expert-v0 or dopr/<env>/noisy<LEVEL>-v0]"),
    ref_episodes: int = typer.Option(20, help="with --env: episodes behind the reference scores (expert, random)"),
    cameras: Optional[str] = typer.Option(None, help="also store these cameras' frames as obs/<camera>_image, "
                                                     "e.g. agentview,robot0_eye_in_hand"),
    image_size: int = typer.Option(84, help="side of the rendered frames in pixels (with --cameras)"),
):
    """Roll out a scripted expert in robosuite and write its successful demos (robomimic HDF5); with --env, roll
    out an SB3 expert on a Gymnasium task and write every episode as a Minari dataset."""
    if env is not None or expert is not None:
        if env is None or expert is None:
            raise UserError("--env and --expert go together: collect --env Hopper-v5 --expert EXPERT.zip --out DIR")
        from dopr_robot.experts.minari_collect import collect_minari

        s = collect_minari(env, expert, episodes, seed, out, noise=noise, dataset_id=dataset_id,
                           ref_episodes=ref_episodes, overwrite=overwrite)
        typer.echo(f"{s['episodes']} episodes ({s['steps']} steps, {s['terminated_early']} ended early), mean return "
                   f"{s['mean_return']:.1f} +- {s['std_return']:.1f}; reference scores {s['ref_min_score']:.1f} "
                   f"(random) / {s['ref_max_score']:.1f} (expert), {s['seconds']:.0f} s -> {s['out']} "
                   f"(Minari id {s['dataset_id']})")
        return
    from dopr_robot.collect import collect
    from dopr_robot.envs.render import parse_cameras
    from dopr_robot.rundir import check_output_file

    check_output_file(out, overwrite, suffixes=(".hdf5", ".h5"), what="--out")  # before the rollouts, not after
    s = collect(task, episodes, seed, out, max_steps=max_steps, noise=noise,
                cameras=parse_cameras(cameras) if cameras is not None else (), image_size=image_size)
    who = f"noisy (level {noise}) expert" if noise else "expert"
    typer.echo(f"{who} success rate {s['expert_success_rate']:.1%} ({s['demos']}/{s['attempts']} attempts), "
               f"mean length {s['mean_length']:.1f} steps, {s['seconds']:.0f} s -> {s['out']}")


expert_app = typer.Typer(no_args_is_help=True, help="Stable-Baselines3 experts on Gymnasium MuJoCo tasks.")
app.add_typer(expert_app, name="expert")


@expert_app.command("train")
def expert_train_cmd(
    env: str = typer.Option(..., help="Gymnasium environment id, e.g. Hopper-v5"),
    algo: str = typer.Option("td3", help="td3 | sac | ppo (td3: ~1.6x SAC's steps/s on one CPU thread)"),
    steps: int = typer.Option(300_000, help="environment steps"),
    seed: int = typer.Option(0, help="seed of the networks, the replay sampling and the env"),
    out: Path = typer.Option(..., help="expert file (.zip); OUT.json records the run, OUT.ckpt/ its checkpoints"),
    eval_every: int = typer.Option(20_000, help="env steps between evaluations; the best model is kept"),
    max_minutes: Optional[float] = typer.Option(None, help="stop training after this wall time, then evaluate "
                                                "and save as if STEPS were reached (the record says so)"),
    overwrite: bool = typer.Option(False, help="replace OUT if it exists"),
):
    """Train an SB3 expert (zoo hyper-parameters); evaluate it over 20 seeded episodes."""
    from dopr_robot.experts.sb3 import ExpertTrainConfig, train_expert
    from dopr_robot.rundir import check_output_file

    check_output_file(out, overwrite, suffixes=(".zip",), what="--out")
    r = train_expert(ExpertTrainConfig(env=env, algo=algo, steps=steps, seed=seed, eval_every=eval_every,
                                          max_minutes=max_minutes), out, overwrite=overwrite)
    e = r["evaluation"]
    typer.echo(f"{algo} on {env}, {r['steps_done']} steps, seed {seed}: mean return {e['mean_return']:.1f} "
               f"+- {e['std_return']:.1f} over {e['episodes']} episodes ({r['chosen']} model), "
               f"{r['train_seconds']:.0f} s -> {out}")


@expert_app.command("eval")
def expert_eval_cmd(
    expert: Path = typer.Argument(..., help="SB3 expert zip"),
    env: str = typer.Option(..., help="Gymnasium environment id"),
    episodes: int = typer.Option(20, help="deterministic episodes"),
    seed_start: int = typer.Option(1_000_000, help="episode i is reset with seed SEED_START + i"),
):
    """Mean return of an expert over seeded episodes."""
    from dopr_robot.experts.sb3 import evaluate_expert, load_expert

    if episodes < 1:
        raise UserError(f"--episodes must be >= 1; got {episodes}")
    e = evaluate_expert(load_expert(expert, env), env, episodes, seed_start)
    typer.echo(f"mean return {e['mean_return']:.1f} +- {e['std_return']:.1f} (min {e['min_return']:.1f}), "
               f"mean length {e['mean_length']:.0f} over {episodes} episodes from seed {seed_start}")
@app.command("render-obs")
def render_obs_cmd(
    src: Path = typer.Argument(..., metavar="IN", help="robomimic .hdf5 with MuJoCo states (ours or downloaded)"),
    out: Path = typer.Argument(..., metavar="OUT", help="new .hdf5: IN with obs/<camera>_image added"),
    cameras: str = typer.Option("agentview,robot0_eye_in_hand", help="comma-separated robosuite cameras"),
    size: int = typer.Option(84, help="frame side in pixels"),
    overwrite: bool = typer.Option(False, help="replace OUT if it exists"),
):
    """Render camera observations at every demo state of IN (robomimic's dataset_states_to_obs) into OUT."""
    from dopr_robot.envs.render import parse_cameras
    from dopr_robot.render_obs import render_obs
    from dopr_robot.rundir import check_output_file

    if not src.exists():
        raise UserError(f"dataset not found: {src}")
    check_output_file(out, overwrite, suffixes=(".hdf5", ".h5"), what="OUT")
    s = render_obs(src, out, parse_cameras(cameras), size)
    typer.echo(f"rendered {s['frames']} frames ({', '.join(s['cameras'])} at {s['size']}x{s['size']}) of "
               f"{s['demos']} demos in {s['seconds']:.0f} s -> {s['out']}")


@app.command("train")
def train_cmd(
    config: Optional[Path] = typer.Option(None, help="YAML config (default: the built-in Lift quickstart config)"),
    dataset: Optional[Path] = typer.Option(None, help="robomimic .hdf5, ReplayBuffer .zarr, minari:DATASET_ID or a "
                                                      "Minari dataset directory (overrides data.path)"),
    optim: Optional[str] = typer.Option(None, help="adam | muon | signum | dopr (DoPr over Adam) | dopr-muon | "
                                        "dopr-signum"),
    policy: Optional[str] = typer.Option(None, help="diffusion | flow | bc (bc: --set policy.backbone=resmlp)"),
    steps: Optional[int] = typer.Option(None, help="training steps (train.steps)"),
    seed: Optional[int] = typer.Option(None, help="training seed (train.seed)"),
    out: Optional[Path] = typer.Option(None, help="run directory (default: runs/<config>_<policy>_<optim>_s<seed>)"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="override any config key: --set optim.lr=3e-4"),
    resume: bool = typer.Option(False, help="continue the run in --out from its trainer_state.pt"),
    until: Optional[int] = typer.Option(None, help="stop at this step with a resumable state (time-sliced jobs)"),
    overwrite: bool = typer.Option(False, help="replace an earlier run in --out (a directory holding config.yaml)"),
):
    """Train a policy; writes config.yaml, metrics.jsonl and checkpoints/ into the run directory."""
    from dopr_robot.config import load_config
    from dopr_robot.training import train
    from dopr_robot.training.distributed import is_writer

    if resume:
        if out is None:
            raise UserError("--resume needs --out RUN_DIR")
        if config is None:
            config = out / "config.yaml"  # continue the run with the config it was started with
    overrides = list(set_ or [])
    for flag, key, value in (("--dataset", "data.path", dataset), ("--optim", "optim.name", optim),
                             ("--policy", "policy.type", policy), ("--steps", "train.steps", steps),
                             ("--seed", "train.seed", seed), ("--device", "train.device", device)):
        if value is not None:
            clash = [item for item in set_ or [] if item.partition("=")[0].strip() == key]
            if clash:  # which one would win is a guess the user should not have to make
                raise UserError(f"{flag} {value} and --set {clash[0]} both set {key}; give one")
            overrides.append(f"{key}={value}")
    cfg = load_config(config, overrides)
    if out is None:
        name = config.stem if config else "lift"
        out = Path("runs") / f"{name}_{cfg.policy.type}_{cfg.optim.name}_s{cfg.train.seed}"
    try:
        run = train(cfg, out, collect_if_missing=dataset is None, resume=resume, until=until, overwrite=overwrite)
    except KeyboardInterrupt:
        from dopr_robot.rundir import saved_state_note

        raise Interrupted(saved_state_note(out)) from None
    if is_writer():  # under torchrun only rank 0 writes and speaks
        from dopr_robot.plotting import plot_run
        curves = plot_run(run, missing_ok=True)  # RUN/training_curves.png; None when no metrics record exists yet
        typer.echo(f"trained -> {run}  (next: dopr-robot eval {run})" + (f", curves -> {curves}" if curves else ""))


@app.command("eval")
def eval_cmd(
    run: Path = typer.Argument(..., help="run directory or checkpoint (.json/.safetensors)"),
    checkpoint: Optional[str] = typer.Option(None, help="final | best | last | NAME in RUN/checkpoints [final]"),
    episodes: Optional[int] = typer.Option(None, help="number of seeded episodes [run's eval.episodes: 50]"),
    workers: Optional[int] = typer.Option(None, help="parallel worker processes, 0 = one per CPU core [eval.workers]"),
    seed_start: Optional[int] = typer.Option(None, help="episode i uses seed SEED_START + i [eval.seed_start: 100000]"),
    max_steps: Optional[int] = typer.Option(None, help="step limit per episode [eval.max_steps: 400]"),
    n_action_steps: Optional[int] = typer.Option(None, help="actions executed per chunk, 1 to horizon - "
                                                            "n_obs_steps + 1 (default: training's)"),
    out: Optional[Path] = typer.Option(None, help="report path (default: RUN/eval.json, RUN/eval_<checkpoint>.json "
                                                  "or RUN/eval_<tag>.json)"),
    tag: Optional[str] = typer.Option(None, help="name this report RUN/eval_<TAG>.json"),
    resume: bool = typer.Option(False, help="run only the episodes missing from the report's journal"),
    action_noise: Optional[float] = typer.Option(None, help="Gaussian noise std on executed actions (raw env "
                                                            "units) [eval.action_noise: 0]"),
    obs_noise: Optional[float] = typer.Option(None, help="Gaussian noise std on the policy's observations "
                                                         "(normalized units) [eval.obs_noise: 0]"),
    push: Optional[float] = typer.Option(None, help="probability per episode of one push on the object (Gymnasium: "
                                                    "the torso) [eval.push: 0]"),
    push_magnitude: Optional[float] = typer.Option(None, help="push: velocity kick in m/s [eval.push_magnitude: 0.5]"),
    episode_timeout: float = typer.Option(600.0, help="seconds per episode before a running block of episodes "
                                                      "is stopped; its episodes are recorded as errors"),
    save_trajectories: bool = typer.Option(False, help="also store every episode (robomimic layout) beside the report"),
    videos: int = typer.Option(0, help="record the first N episodes (by seed) as MP4 in videos/ beside the report"),
    videos_failed: int = typer.Option(0, help="record up to N failed episodes (re-run with recording)"),
    video_camera: str = typer.Option("agentview", help="robosuite camera of the videos (Gymnasium: a camera of the "
                                                       "model, e.g. track; otherwise the env's own view)"),
    video_size: str = typer.Option("256", help="video frame size: N (square) or WIDTHxHEIGHT"),
    batch_episodes: Optional[int] = typer.Option(None, help="episodes a worker runs together, one batched policy "
                                                            "call per re-plan [eval.batch_episodes]"),
    device: Optional[str] = typer.Option(None, help="cpu | cuda | cuda:N: run the policy in the main process on "
                                                    "it, workers only step environments [the workers' CPUs]"),
    allow_errors: bool = typer.Option(False, help="exit 0 even when episodes errored (they stay missing from "
                                                  "the rates; the report records this)"),
):
    """Closed-loop success of a checkpoint over many seeded rollouts; writes a JSON report."""
    from dopr_robot.envs.render import RenderSpec, parse_size
    from dopr_robot.evaluation import check_complete, format_report, run_eval
    from dopr_robot.evaluation.video import videos_dir_for

    check_counts(("--episodes", episodes, 1), ("--max-steps", max_steps, 1), ("--workers", workers, 0),
                 ("--seed-start", seed_start, 0), ("--videos", videos, 0), ("--videos-failed", videos_failed, 0),
                 ("--batch-episodes", batch_episodes, 1))
    if not episode_timeout > 0:
        raise UserError(f"--episode-timeout must be > 0; got {episode_timeout:g}")
    video_spec = RenderSpec(video_camera, *parse_size(video_size))
    levels = {"action_noise": action_noise, "obs_noise": obs_noise, "push": push, "push_magnitude": push_magnitude}
    perturbation = {k: v for k, v in levels.items() if v is not None}  # the rest from the run's eval config
    report, path = run_eval(run, checkpoint_name=checkpoint, out=out, tag=tag, resume=resume,
                            save_trajectories=save_trajectories, episodes=episodes, seed_start=seed_start,
                            max_steps=max_steps, workers=workers, n_action_steps=n_action_steps,
                            perturbation=perturbation, episode_timeout_s=episode_timeout,
                            videos=videos, videos_failed=videos_failed, video_spec=video_spec,
                            allow_errors=allow_errors, batch_episodes=batch_episodes, device=device)
    typer.echo(format_report(report))
    typer.echo(f"report -> {path}" + (f", trajectories -> {report['trajectories']}" if save_trajectories else ""))
    if "videos" in report:
        names = ", ".join(Path(v["path"]).name for v in report["videos"]) or "none (no episode matched)"
        typer.echo(f"videos -> {videos_dir_for(path)}: {names}")
    check_complete(report, path)  # errored episodes: one error: line, exit 2 (unless --allow-errors)


@app.command("diagnose")
def diagnose_cmd(
    run: Path = typer.Argument(..., help="run directory"),
    rollouts: Optional[Path] = typer.Option(None, help="saved rollouts [RUN/eval_rollouts.hdf5]"),
    out: Optional[Path] = typer.Option(None, help="report path; the plot goes beside it as .png [RUN/drift.json]"),
    checkpoint: Optional[Path] = typer.Option(None, help="checkpoint [the one the rollouts record, else final]"),
    dataset: Optional[Path] = typer.Option(None, help="training dataset [the one the checkpoint records]"),
    seed: int = typer.Option(0, help="seed of the policy's sampling noise in the open-loop chunk error"),
):
    """Drift of rollouts from the demos per time step, demo/rollout shift, open-loop vs closed-loop error."""
    from dopr_robot.diagnostics import diagnose
    from dopr_robot.rundir import DRIFT_REPORT

    r = diagnose(run, rollouts=rollouts, out=out, checkpoint=checkpoint, dataset=dataset, seed=seed)
    band = r["demo_band"]
    mse = r["open_loop_chunk_mse"]
    typer.echo(f"episodes          {r['n_success']} successful, {r['n_failure']} failed "
               f"(closed-loop success {r['closed_loop_success']:.1%})")
    typer.echo(f"demo band         " + (f"[{band[0]:.4g}, {band[1]:.4g}]" if band else "n/a (fewer than 2 demos)"))
    typer.echo(f"departure step    {r['departure_step'] if r['departure_step'] is not None else 'never'}")
    typer.echo(f"shift             KL(rollouts||demos) {r['kl_gaussian']:.4g}, cov shift {r['cov_shift']:.4g}, "
               f"log-det ratio {r['cov_logdet_ratio']:.4g}")
    typer.echo(f"open-loop chunk   " + (f"MSE {mse:.4g} over {r['open_loop_windows']} valid windows"
                                        if mse is not None else "n/a (no valid demos)"))
    json_path = out or run / DRIFT_REPORT
    typer.echo(f"report -> {json_path}, plot -> {json_path.with_suffix('.png')}")


@app.command("spectrum")
def spectrum_cmd(
    run: Path = typer.Argument(..., help="run directory"),
    gamma: Optional[List[float]] = typer.Option(None, help="damping gamma to report cond(S_d) at (repeatable) "
                                                           "[the run's]"),
    batches: int = typer.Option(4, help="training batches to average over"),
    seed: int = typer.Option(0, help="seed of the batches and the loss's noise"),
    out: Optional[Path] = typer.Option(None, help="report path [RUN/spectrum.json]"),
    checkpoint: Optional[Path] = typer.Option(None, help="checkpoint [the run's final]"),
    dataset: Optional[Path] = typer.Option(None, help="training dataset [the one the checkpoint records]"),
):
    """Per AP layer: the input second moment's lambda_max/mean and what damping gamma leaves of its conditioning."""
    from dopr_robot.diagnostics.spectrum import spectrum
    from dopr_robot.rundir import SPECTRUM_REPORT

    r = spectrum(run, out=out, checkpoint=checkpoint, dataset=dataset, gammas=gamma, batches=batches, seed=seed)
    gammas, width = r["gammas"], max(len(layer["name"]) for layer in r["layers"])
    typer.echo(f"{'layer':<{width}} {'d_in':>5} {'lmax/mean':>9} {'top share':>9} "
               + " ".join(f"{'cond g=' + format(g, 'g'):>11}" for g in gammas))
    for layer in r["layers"]:
        typer.echo(f"{layer['name']:<{width}} {layer['d_in']:>5} {layer['lambda_max_over_mean']:>9.1f} "
                   f"{layer['top_share']:>9.3f} " + " ".join(f"{layer['cond_damped'][str(g)]:>11.3g}" for g in gammas))
    typer.echo(f"{r['batches']} batches of {r['batch_size']} windows, seed {r['seed']}, damping form "
               f"{r['damping_form']} -> {out or run / SPECTRUM_REPORT}")


@app.command("sweep")
def sweep_cmd(
    config: Path = typer.Argument(..., help="YAML config every cell starts from"),
    out: Path = typer.Option(..., help="sweep directory: DIR/sweep.json and one run directory per cell"),
    optims: str = typer.Option("adam,muon,dopr,dopr-muon", help="comma-separated optimizers"),
    seeds: str = typer.Option("0-4", help="training seeds: 0-4, 0,2,5 or 0-2,9"),
    grid: Optional[List[str]] = typer.Option(None, help="KEY=v1,v2 (repeatable): every optimizer gets every point"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="override a config key in every cell"),
    jobs: int = typer.Option(1, help="cells run in parallel (local launcher); each gets cores/JOBS threads"),
    episodes: Optional[int] = typer.Option(None, help="episodes of every eval report [config's eval.episodes]"),
    workers: Optional[int] = typer.Option(None, help="eval worker processes per cell [cores/JOBS]"),
    perturb: Optional[List[str]] = typer.Option(None, help="NAME=v1,v2 (action_noise|obs_noise|push): "
                                                           "one eval report per level"),
    launcher: str = typer.Option("local", help="local | ray | submitit (SLURM arrays; local jobs without SLURM)"),
    launcher_opt: Optional[List[str]] = typer.Option(None, help="KEY=VALUE for the launcher (submitit parameters, "
                                                                "ray.remote options, ray address)"),
    dry_run: bool = typer.Option(False, help="list the cells and whether they are done; run nothing"),
):
    """Train and evaluate every optimizer x grid point x seed; re-run the same command to resume."""
    from dopr_robot.experiments.sweep import run_sweep

    failed = run_sweep(config, out, optims, seeds, list(grid or []), list(set_ or []), jobs=jobs, episodes=episodes,
                       workers=workers, perturb=list(perturb or []), launcher=launcher,
                       launcher_options=list(launcher_opt or []), dry_run=dry_run,
                       command=["dopr-robot", *sys.argv[1:]], echo=typer.echo)
    if failed:
        sys.exit(1)  # some cells failed (not a usage error: their logs say why)


@app.command("compare")
def compare_cmd(
    paths: List[Path] = typer.Argument(..., help="sweep directories (with sweep.json, or holding run directories) "
                                                 "or run directories"),
    baseline: Optional[str] = typer.Option(None, help="baseline: a group name or an optimizer [adam]"),
    select: str = typer.Option("same-config", help="same-config | best-config (also pick each optimizer's grid "
                                                   "point on the selection seeds, report it on held-out seeds)"),
    out: Optional[Path] = typer.Option(None, help="output directory [DIR/compare when one DIR is given]"),
    last_n: int = typer.Option(5, help="in-training success of a run: mean of its last N evaluations"),
    n_boot: int = typer.Option(10000, help="hierarchical bootstrap replicates"),
    seed: int = typer.Option(0, help="seed of the bootstrap and of Monte Carlo permutations"),
    allow_errors: bool = typer.Option(False, help="use reports with errored episodes (rates over the completed "
                                                  "ones; listed in the outputs) instead of refusing them"),
    split_protocols: bool = typer.Option(False, help="compare runs of different protocols (max_steps, episode "
                                                     "seeds, dataset...) apart instead of refusing them"),
    metric: str = typer.Option("success", help="per-episode metric compared: success | return | "
                                               "normalized_return (by the report's reference_scores)"),
    checkpoint: str = typer.Option("final", help="final | best: each run's held-out report of its final checkpoint "
                                                 "(eval.json) or of its best one (eval_best.json)"),
):
    """Group runs by optimizer and grid point; success with intervals and tests vs the baseline, and plots."""
    from dopr_robot.experiments.compare import compare, default_out, format_markdown

    out = out if out is not None else default_out(paths)
    report, warnings = compare(paths, baseline=baseline, select=select, out=out, last_n=last_n, n_boot=n_boot,
                               seed=seed, command=sys.argv, allow_errors=allow_errors,
                               split_protocols=split_protocols, metric=metric, checkpoint=checkpoint)
    for warning in warnings:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(format_markdown(report))
    plots = ", ".join(Path(p).name for p in report["plots"].values() if p)
    typer.echo(f"compare -> {out / 'compare.json'}, {out / 'compare.md'}" + (f", plots: {plots}" if plots else ""))


@app.command("plot")
def plot_cmd(
    run: Path = typer.Argument(..., help="run directory"),
    out: Optional[Path] = typer.Option(None, help="PNG file [RUN/training_curves.png]"),
):
    """Training curves of a run as a PNG: loss, validation loss, lr, step time, DoPr health, in-training success."""
    from dopr_robot.plotting import plot_run

    typer.echo(f"training curves -> {plot_run(run, out)}")


@app.command("inspect")
def inspect_cmd(file: Path = typer.Argument(..., help="robomimic .hdf5, ReplayBuffer .zarr or minari:DATASET_ID")):
    """Summarize a demonstration file: demos, lengths, obs keys and dims, actions, env and controller, masks."""
    from dopr_robot.datasets.inspect import describe

    rows = describe(file)
    width = max(len(k) for k, _ in rows)
    for label, text in rows:
        typer.echo(f"{label:<{width}}  {text}")


@app.command("convert")
def convert_cmd(
    src: Path = typer.Argument(..., help="input .hdf5 (robomimic), .zarr (ReplayBuffer) or minari:DATASET_ID"),
    dst: Path = typer.Argument(..., help="output; its suffix (.zarr or .hdf5) picks the format"),
    overwrite: bool = typer.Option(False, help="replace DST if it exists"),
):
    """Convert between robomimic HDF5 and diffusion_policy's ReplayBuffer zarr layout (every obs key kept)."""
    from dopr_robot.datasets import open_demos
    from dopr_robot.rundir import check_output_file

    if src.resolve() == dst.resolve():
        raise UserError("source and destination are the same file")
    check_output_file(dst, overwrite, suffixes=(".zarr", ".hdf5", ".h5", ".hdf"), what="DST")
    demos = open_demos(src)  # reads and checks every demo before anything is written
    demos.save(dst)
    typer.echo(f"{len(demos.names)} demos: {src} -> {dst}")


# What Ctrl-C leaves behind, per command (a command that knows more raises `Interrupted` with its own line).
INTERRUPTED = {
    "eval": "finished episodes are kept in the report's journal: the same command with --resume runs only the rest",
    "sweep": "finished cells are kept, an unfinished one loses its steps since its last trainer state: "
             "the same command again resumes the sweep",
}
INTERRUPTED_DEFAULT = "nothing half-written was left (files are written whole or not at all); run the command again"


def _interrupted(error: KeyboardInterrupt) -> None:
    note = str(error) if isinstance(error, Interrupted) and str(error) else \
        INTERRUPTED.get(sys.argv[1] if len(sys.argv) > 1 else "", INTERRUPTED_DEFAULT)
    typer.echo(f"interrupted: {note}", err=True)
    sys.exit(130)


def main() -> None:
    command = typer.main.get_command(app)
    try:
        # parse and run without typer's main, which turns Ctrl-C into a silent exit code 130 (no interrupted line)
        with command.make_context("dopr-robot", sys.argv[1:]) as ctx:
            command.invoke(ctx)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt as e:
        _interrupted(e)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except BrokenPipeError:  # `dopr-robot ... | head`: the reader left; no traceback, and none at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except Exception as e:
        # Usage errors come from click, or from the copy of click newer typer versions vendor: match by name.
        kinds = {cls.__name__ for cls in type(e).__mro__}
        if "NoArgsIsHelpError" in kinds:  # `dopr-robot` alone: the help, not an error line
            typer.echo(e.format_message(), err=True)
            sys.exit(2)
        if "ClickException" in kinds:
            typer.echo(f"error: {e.format_message()}", err=True)
            sys.exit(2)
        if "Abort" in kinds:
            sys.exit(1)
        raise


def run() -> None:
    """The `dopr-robot` console script and `python -m dopr_robot`: `main`, then a quicker interpreter exit.
    Shutting down collects every object the garbage collector tracks, 0.8 s once torch and diffusers are loaded
    (an `eval --device` or `train` process; 0.23 s with them frozen, measured here): a short evaluation's
    user waits for it. Nothing left at that point needs a collection (reports and checkpoints are written and
    closed). Tests call `main` in their own long-lived process, which this would leave frozen.

    A torchrun rank that finished (its process group destroyed, its files written and closed) skips interpreter
    teardown altogether: gloo's threads still alive at static destruction sometimes abort a rank there ("terminate
    called without an active exception", SIGABRT), and torchrun then reports a run that succeeded as failed
    (seen once in the DDP test under load; the same abort in a spawned gloo worker went from 2 in 15 runs to 0 in
    55 when it skipped teardown, 87b1d7e)."""
    try:
        main()
    finally:
        gc.freeze()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun, as `init_distributed` reads it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    run()
