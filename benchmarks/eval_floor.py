"""Evaluation wall time against the simulator's floor.

    python benchmarks/eval_floor.py RUN [--episodes 40 200] [--workers 2] [--repeats 3] [--max-steps 400]
                                        [--batch-episodes B] [--device cpu] [--floor replay|random|both]

For each episode count N, first one untimed `eval --save-trajectories` (the evaluated actions), then `repeats`
interleaved rounds of
- eval:  `dopr-robot eval RUN --episodes N --workers W` in a fresh interpreter (what a user waits for:
         interpreter start, pool start-up, policy loading, episodes, report), and
- floor: a fresh interpreter that starts W `spawn` processes which import only robosuite, build the same
         environment from the checkpoint's env_args (rendering its cameras at its size for an image checkpoint, as
         the eval's observations do), and run the same episodes without a policy: `replay` (the default) steps
         each episode's recorded actions from its seed's reset, so the simulator goes through exactly the eval's
         states (checked: every replayed episode ends with the eval's success); `random` steps seeded uniform
         random actions for the same number of steps (the floor before replay: free-space flailing has fewer
         contacts than a grasp, so it is ~5% cheaper per step on Lift); `both` times one of each per round;
then prints the median wall of each, the ratio of medians and the per-round ratios, and the machine's load.
The floor is what evaluation would cost if the policy were free and start-up were only the simulator's.

    python benchmarks/eval_floor.py RUN --startup [--repeats 3]

profiles what an eval worker does before its first episode against a floor worker, phase by phase, in fresh
interpreters (median of `repeats`, alternating): import torch, import diffusers (the policy's schedulers), load
the checkpoint, build the environment (robosuite is imported there), one policy call.

    python benchmarks/eval_floor.py RUN --policy-batches 1 2 4 8 16 [--repeats 7]

times one policy call (the checkpoint's, one thread) at each batch size B (episodes per block): per call and per
episode, the median of `repeats` timings of 5 calls each.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # measure the tree this file is in (an editable install may point elsewhere)


def _floor_worker(args: tuple[dict, dict | None, str, list[tuple[int, int]]]) -> int:
    env_args, image_shapes, actions_file, episodes = args
    import numpy as np

    from dopr_robot.envs.render import ImageSpec
    from dopr_robot.envs.robosuite_env import RobosuiteEnv

    # an image checkpoint's cameras at its size: the floor renders every observation's frames as the eval does
    env = RobosuiteEnv(env_args, images=ImageSpec.from_image_shapes(image_shapes))
    low, high = env.env.action_spec
    recorded = np.load(actions_file) if actions_file else None
    for seed, steps in episodes:
        if recorded is not None:
            actions, expected = recorded[f"actions_{seed}"], bool(recorded[f"success_{seed}"])
        else:
            actions, expected = np.random.default_rng(seed).uniform(low, high, (steps, len(low))), None
        env.reset(seed)
        for action in actions:
            env.step(action)
            success = env.is_success()  # the eval checks success after every step too
        if expected is not None and success != expected:
            raise RuntimeError(f"seed {seed}: the replayed episode did not end as the evaluated one")
    return sum(steps for _, steps in episodes)


def floor(env_args: dict, image_shapes: dict | None, actions_file: str | None, lengths: dict[int, int],
          workers: int) -> None:
    """Round-robin the episodes over `workers` spawn processes (the eval balances dynamically; with equal work
    per worker this is the same). `actions_file`: the .npz of the evaluated actions (replay), or None (random)."""
    seeds = sorted(lengths)
    shares = [[(s, lengths[s]) for s in seeds[i::workers]] for i in range(workers)]
    with mp.get_context("spawn").Pool(workers) as pool:
        pool.map(_floor_worker, [(env_args, image_shapes, actions_file, share) for share in shares], chunksize=1)


def _recorded_actions(rollouts: Path, out: Path) -> dict[int, int]:
    """The evaluated episodes' actions (an `eval --save-trajectories` file) as an .npz the floor workers read
    with numpy alone; {seed: steps}."""
    import h5py
    import numpy as np

    arrays, lengths = {}, {}
    with h5py.File(rollouts, "r") as f:
        for demo in f["data"].values():
            seed = int(demo.attrs["seed"])
            arrays[f"actions_{seed}"] = demo["actions"][()]
            arrays[f"success_{seed}"] = np.array(bool(demo.attrs["success"]))
            lengths[seed] = len(arrays[f"actions_{seed}"])
    np.savez(out, **arrays)
    return lengths


_STARTUP_PHASES = {
    "eval": [("import torch", "import torch; torch.set_num_threads(1)"),
             ("import diffusers", "import diffusers.schedulers.scheduling_ddim"),
             ("load checkpoint", "from dopr_robot.checkpoint import load_policy; policy, meta = load_policy(CKPT)"),
             ("build env (imports robosuite)", "from dopr_robot.envs.robosuite_env import RobosuiteEnv; "
                                               "env = RobosuiteEnv(meta['env_args'])"),
             ("first policy call", "policy.predict_action(torch.zeros(1, policy.n_obs_steps, meta['obs_dim']), "
                                   "torch.Generator().manual_seed(0))")],
    "floor": [("build env (imports robosuite)", "import json; from dopr_robot.envs.robosuite_env import RobosuiteEnv; "
                                                "env = RobosuiteEnv(json.load(open(CKPT))['env_args'])")],
}


def _phase_times(kind: str, ckpt: str) -> list[float]:
    """One fresh interpreter (as a spawn worker is) running the phases of `kind`; seconds per phase. An eval worker
    starts as the pool's do (`lean_startup`)."""
    lines = ["import time, sys", f"CKPT = {ckpt!r}"]
    if kind == "eval":
        lines.append("from dopr_robot.evaluation.pool import lean_startup; lean_startup().__enter__()")
    lines.append("_t = [time.perf_counter()]")
    for _, code in _STARTUP_PHASES[kind]:
        lines += [code, "_t.append(time.perf_counter())"]
    lines.append("print(' '.join(f'{b - a:.4f}' for a, b in zip(_t, _t[1:])))")
    out = subprocess.run([sys.executable, "-c", "\n".join(lines)], capture_output=True, text=True, cwd=REPO, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}).stdout
    return [float(x) for x in out.split()]


def startup(ckpt: Path, repeats: int) -> None:
    runs: dict[str, list[list[float]]] = {"eval": [], "floor": []}
    for _ in range(repeats):
        for kind in runs:
            runs[kind].append(_phase_times(kind, str(ckpt)))
    for kind, samples in runs.items():
        medians = [statistics.median(column) for column in zip(*samples)]
        phases = ", ".join(f"{name} {t:.2f} s" for (name, _), t in zip(_STARTUP_PHASES[kind], medians))
        print(f"{kind} worker start-up {sum(medians):.2f} s (medians of {repeats}): {phases}")


def policy_batches(ckpt: Path, batches: list[int], repeats: int) -> None:
    import numpy as np
    import torch

    from dopr_robot.checkpoint import load_policy
    from dopr_robot.evaluation.lockstep import Planner

    torch.set_num_threads(1)
    policy, meta = load_policy(ckpt)
    planner = Planner(policy)
    for batch in batches:
        seeds = list(range(batch))
        histories = [[(np.zeros(meta["obs_dim"], dtype=np.float32), {})] * policy.n_obs_steps] * batch  # low-dim only
        planner.plan(seeds, [True] * batch, histories)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(5):
                planner.plan(seeds, [True] * batch, histories)
            times.append((time.perf_counter() - start) / 5)
        call = statistics.median(times)
        print(f"B={batch}: {call * 1e3:.2f} ms per call, {call / batch * 1e3:.2f} ms per episode "
              f"(medians of {repeats}); load average {os.getloadavg()[0]:.2f}")


def _timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{result.stderr}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--episodes", type=int, nargs="+", default=[40, 200])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--batch-episodes", type=int, default=None, help="eval --batch-episodes [the run's]")
    parser.add_argument("--device", default=None, help="eval --device (the policy in the main process) [in the workers]")
    parser.add_argument("--floor", choices=("replay", "random", "both"), default="replay",
                        help="the floor's actions: the evaluated ones replayed, or seeded random ones [replay]")
    parser.add_argument("--startup", action="store_true", help="profile worker start-up phases instead")
    parser.add_argument("--policy-batches", type=int, nargs="+", help="time one policy call per batch size instead")
    parser.add_argument("--floor-only", type=Path, default=None, help=argparse.SUPPRESS)  # internal: a spec file
    args = parser.parse_args()
    if args.floor_only is not None:
        spec = json.loads(args.floor_only.read_text())
        floor(spec["env_args"], spec["image_shapes"], spec["actions"], {int(k): v for k, v in spec["lengths"].items()},
              spec["workers"])
        return

    from dopr_robot.evaluation.evaluate import read_checkpoint_meta
    from dopr_robot.rundir import resolve_checkpoint, rollouts_path

    ckpt = resolve_checkpoint(args.run).resolve()
    meta = read_checkpoint_meta(ckpt)
    env_args, image_shapes = meta["env_args"], meta.get("image_shapes")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; checkpoint {ckpt}; "
          f"{args.workers} workers, 1 thread each")
    if args.startup:
        startup(ckpt, args.repeats)
        return
    if args.policy_batches:
        policy_batches(ckpt, args.policy_batches, args.repeats)
        return
    kinds = ["replay", "random"] if args.floor == "both" else [args.floor]
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.episodes:
            report = Path(tmp) / f"eval_{n}.json"
            eval_cmd = [sys.executable, "-m", "dopr_robot.cli", "eval", str(ckpt), "--episodes", str(n),
                        "--workers", str(args.workers)]
            if args.max_steps:
                eval_cmd += ["--max-steps", str(args.max_steps)]
            if args.batch_episodes:
                eval_cmd += ["--batch-episodes", str(args.batch_episodes)]
            if args.device:
                eval_cmd += ["--device", args.device]
            recorded = Path(tmp) / f"recorded_{n}.json"  # untimed: the episodes' actions, for the replay floor
            _timed([*eval_cmd, "--out", str(recorded), "--save-trajectories"])
            lengths = _recorded_actions(rollouts_path(recorded), Path(tmp) / f"actions_{n}.npz")
            floor_cmds = {}
            for kind in kinds:
                spec = Path(tmp) / f"floor_{n}_{kind}.json"
                spec.write_text(json.dumps({"env_args": env_args, "image_shapes": image_shapes, "lengths": lengths,
                                            "workers": args.workers, "actions": str(Path(tmp) / f"actions_{n}.npz")
                                            if kind == "replay" else None}))
                floor_cmds[kind] = [sys.executable, str(Path(__file__).resolve()), str(ckpt), "--floor-only", str(spec)]
            evals, floors = [], {kind: [] for kind in kinds}
            for _ in range(args.repeats):
                evals.append(_timed([*eval_cmd, "--out", str(report)]))
                data = json.loads(report.read_text())
                if {e["seed"]: e["steps"] for e in data["per_episode"]} != lengths:
                    sys.exit(f"the timed eval's episodes differ from the recorded ones: {report}")
                for kind in kinds:
                    floors[kind].append(_timed(floor_cmds[kind]))
                for old in Path(tmp).glob(f"eval_{n}-*"):
                    old.unlink()  # archived reports of the earlier repeats
            rows = []
            for kind in kinds:
                median = statistics.median(floors[kind])
                pairs = ", ".join(f"{e / f:.2f}" for e, f in zip(evals, floors[kind]))
                rows.append(f"{kind} floor {median:.1f} s, ratio {statistics.median(evals) / median:.2f} "
                            f"(rounds: {pairs})")
            print(f"{n} episodes ({sum(lengths.values())} env steps, success {data['success_rate']:.0%}): "
                  f"eval {statistics.median(evals):.1f} s; {'; '.join(rows)} (medians of {args.repeats}); "
                  f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
