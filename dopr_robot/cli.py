"""The `dopr-robot` command line: a thin layer over collect, training and evaluation.

Bad input (missing or corrupt files, unknown keys, invalid values) ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import List, Optional

import typer

from dopr_robot.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train diffusion / flow action-chunking policies with AdamW, Muon or DoPr; "
                       "measure closed-loop success.")


@app.command("collect")
def collect_cmd(
    task: str = typer.Option("lift", help="lift | can | square"),
    episodes: int = typer.Option(100, help="successful demonstrations to write"),
    seed: int = typer.Option(0, help="attempt i uses environment seed SEED + i"),
    out: Path = typer.Option(..., help="output robomimic-layout .hdf5 file"),
    max_steps: int = typer.Option(400, help="step limit of one expert attempt"),
    noise: float = typer.Option(0.0, help="imperfect demos: operator noise level (0 = the expert; 1 = hard)"),
    overwrite: bool = typer.Option(False, help="replace OUT if it exists"),
):
    """Roll out a scripted expert in robosuite and write its successful demos (robomimic HDF5)."""
    from dopr_robot.collect import collect

    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    s = collect(task, episodes, seed, out, max_steps=max_steps, noise=noise)
    who = f"noisy (level {noise}) expert" if noise else "expert"
    typer.echo(f"{who} success rate {s['expert_success_rate']:.1%} ({s['demos']}/{s['attempts']} attempts), "
               f"mean length {s['mean_length']:.1f} steps, {s['seconds']:.0f} s -> {s['out']}")


@app.command("train")
def train_cmd(
    config: Optional[Path] = typer.Option(None, help="YAML config (default: the built-in Lift quickstart config)"),
    dataset: Optional[Path] = typer.Option(None, help="robomimic .hdf5 dataset (overrides data.path)"),
    optim: Optional[str] = typer.Option(None, help="adam | muon | dopr (DoPr over Adam) | dopr-muon"),
    policy: Optional[str] = typer.Option(None, help="diffusion | flow"),
    steps: Optional[int] = typer.Option(None, help="training steps (train.steps)"),
    seed: Optional[int] = typer.Option(None, help="training seed (train.seed)"),
    out: Optional[Path] = typer.Option(None, help="run directory (default: runs/<config>_<policy>_<optim>_s<seed>)"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="override any config key: --set optim.lr=3e-4"),
    resume: bool = typer.Option(False, help="continue the run in --out from its trainer_state.pt"),
    until: Optional[int] = typer.Option(None, help="stop at this step with a resumable state (time-sliced jobs)"),
    overwrite: bool = typer.Option(False, help="replace an existing run directory"),
):
    """Train a policy; writes config.yaml, metrics.jsonl and checkpoints/ into the run directory."""
    from dopr_robot.config import load_config
    from dopr_robot.training import train

    if resume:
        if out is None:
            raise UserError("--resume needs --out RUN_DIR")
        if config is None:
            config = out / "config.yaml"  # continue the run with the config it was started with
    overrides = list(set_ or [])
    for key, value in (("data.path", dataset), ("optim.name", optim), ("policy.type", policy),
                       ("train.steps", steps), ("train.seed", seed), ("train.device", device)):
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_config(config, overrides)
    if out is None:
        name = config.stem if config else "lift"
        out = Path("runs") / f"{name}_{cfg.policy.type}_{cfg.optim.name}_s{cfg.train.seed}"
    if out.exists() and any(out.iterdir()) and not resume:
        if not overwrite:
            raise UserError(f"run directory {out} exists; pass --resume to continue it or --overwrite to replace it")
        shutil.rmtree(out)
    run = train(cfg, out, collect_if_missing=dataset is None, resume=resume, until=until)
    typer.echo(f"trained -> {run}  (next: dopr-robot eval {run})")


@app.command("eval")
def eval_cmd(
    run: Path = typer.Argument(..., help="run directory or checkpoint (.json/.safetensors)"),
    episodes: Optional[int] = typer.Option(None, help="number of seeded episodes [run's eval.episodes: 50]"),
    workers: Optional[int] = typer.Option(None, help="parallel worker processes, 0 = one per CPU core [eval.workers]"),
    seed_start: Optional[int] = typer.Option(None, help="episode i uses seed SEED_START + i [eval.seed_start: 100000]"),
    max_steps: Optional[int] = typer.Option(None, help="step limit per episode [eval.max_steps: 400]"),
    n_action_steps: Optional[int] = typer.Option(None, help="actions executed per chunk (default: training's)"),
    out: Optional[Path] = typer.Option(None, help="report path (default: RUN/eval.json)"),
    save_trajectories: bool = typer.Option(False, help="also store every episode (robomimic layout) beside the report"),
    videos: int = typer.Option(0, help="record the first N episodes (by seed) as MP4 in videos/ beside the report"),
    videos_failed: int = typer.Option(0, help="record up to N failed episodes (re-run with recording)"),
    video_camera: str = typer.Option("agentview", help="robosuite camera of the videos"),
    video_size: str = typer.Option("256", help="video frame size: N (square) or WIDTHxHEIGHT"),
):
    """Closed-loop success of a checkpoint over many seeded rollouts; writes a JSON report."""
    from dopr_robot.envs.render import RenderSpec, parse_size
    from dopr_robot.evaluation import evaluate, format_report
    from dopr_robot.evaluation.video import videos_dir_for
    from dopr_robot.fileio import write_json

    if (episodes is not None and episodes < 1) or (max_steps is not None and max_steps < 1) or \
            (workers is not None and workers < 0):
        raise UserError("need --episodes >= 1, --max-steps >= 1, --workers >= 0")
    if videos < 0 or videos_failed < 0:
        raise UserError("need --videos >= 0 and --videos-failed >= 0")
    video_spec = RenderSpec(video_camera, *parse_size(video_size))
    if out is None:
        out = (run if run.is_dir() else run.parent) / "eval.json"
    trajectories = out.with_name(out.stem + "_rollouts.hdf5") if save_trajectories else None
    report = evaluate(run, episodes=episodes, seed_start=seed_start, max_steps=max_steps, workers=workers,
                      n_action_steps=n_action_steps, save_trajectories=trajectories,
                      videos=videos, videos_failed=videos_failed, video_spec=video_spec, videos_dir=videos_dir_for(out))
    write_json(out, report)
    typer.echo(format_report(report))
    typer.echo(f"report -> {out}" + (f", trajectories -> {trajectories}" if trajectories else ""))
    if "videos" in report:
        typer.echo(f"videos -> {videos_dir_for(out)}: " + (", ".join(Path(v["path"]).name for v in report["videos"])
                                                          or "none (no episode matched)"))


@app.command("inspect")
def inspect_cmd(file: Path = typer.Argument(..., help="robomimic .hdf5 or ReplayBuffer .zarr")):
    """Summarize a demonstration file: demos, lengths, obs keys and dims, actions, env and controller, masks."""
    from dopr_robot.datasets.inspect import describe

    rows = describe(file)
    width = max(len(k) for k, _ in rows)
    for label, text in rows:
        typer.echo(f"{label:<{width}}  {text}")


@app.command("convert")
def convert_cmd(
    src: Path = typer.Argument(..., help="input .hdf5 (robomimic) or .zarr (ReplayBuffer)"),
    dst: Path = typer.Argument(..., help="output; its suffix (.zarr or .hdf5) picks the format"),
    overwrite: bool = typer.Option(False, help="replace DST if it exists"),
):
    """Convert between robomimic HDF5 and diffusion_policy's ReplayBuffer zarr layout (every obs key kept)."""
    from dopr_robot.datasets import open_demos

    if dst.exists() and not overwrite:
        raise UserError(f"{dst} exists; pass --overwrite to replace it")
    if src.resolve() == dst.resolve():
        raise UserError("source and destination are the same file")
    demos = open_demos(src)
    demos.save(dst)
    typer.echo(f"{len(demos.names)} demos: {src} -> {dst}")


def main() -> None:
    try:
        app(standalone_mode=False)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:
        # Usage errors come from click, or from the copy of click newer typer versions vendor: match by name.
        kinds = {cls.__name__ for cls in type(e).__mro__}
        if "ClickException" in kinds:
            typer.echo(f"error: {e.format_message()}", err=True)
            sys.exit(2)
        if "Abort" in kinds:
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
