"""In-training rollouts and checkpoint selection: `checkpoints/last` and `checkpoints/best`.

Every `train.eval_every` steps the EMA policy is saved as `last` and evaluated on `train.eval_episodes` seeded
episodes with SELECTION seeds `train.eval_seed_start + i` (default 200000..), never the REPORT seeds
`eval.seed_start + i` (default 100000..) that `dopr-robot eval` uses; config validation keeps the two ranges
disjoint. So the success a `best` checkpoint is reported with (by `eval --checkpoint best`, on report seeds) is
not the number it was chosen on. `best` is the evaluated checkpoint with the highest selection success; a tie
goes to the later step (later weights are the better-trained ones when the rollouts cannot tell them apart).

The rollouts run in one `EvalPool` kept for the whole training run (started at the first evaluation), the same
code as `eval`. They draw nothing from the training generator, so training is bit-identical with or without
them. The checkpoints' JSON carries `selection: {step, success, successes, return, episodes, seed_start, errors, metric}`;
on resume, the best so far is read back from `best.json`. Errored episodes are missing, not failures.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

from dopr_robot.fileio import atomic_path, write_json


def is_better(score: float, best_score: float | None) -> bool:
    """The rule for replacing `best`: higher selection score, ties to the later (current) step."""
    return best_score is None or score >= best_score


class RolloutSelector:
    def __init__(self, run_dir: Path, cfg):
        self.checkpoints = Path(run_dir) / "checkpoints"
        self.seeds = [cfg.train.eval_seed_start + i for i in range(cfg.train.eval_episodes)]
        self.max_steps = cfg.eval.max_steps
        self.n_action_steps = cfg.data.n_action_steps
        self.workers = cfg.eval.workers
        self.batch_episodes = cfg.eval.batch_episodes
        self.metric = cfg.train.select_metric  # "success" | "return"
        self.pool = None
        self.best_score: float | None = None
        try:
            self.best_score = float(json.loads((self.checkpoints / "best.json").read_text())["selection"][self.metric])
        except (OSError, ValueError, KeyError, TypeError):
            pass

    def evaluate(self, step: int, save_last: Callable[[], Path]) -> dict[str, Any]:
        """Save the EMA policy as `last` (via `save_last`), roll it out, update `best`; returns the metrics keys."""
        import os

        from dopr_robot.evaluation.lockstep import episode_blocks
        from dopr_robot.evaluation.pool import EpisodeSettings, EvalPool

        last = save_last()
        if self.pool is None:
            workers = max(1, min(self.workers or os.cpu_count() or 1, len(self.seeds)))
            self.pool = EvalPool(workers, preload=last)
        outcomes = self.pool.evaluate(last, episode_blocks(self.seeds, self.batch_episodes),
                                      EpisodeSettings(self.max_steps, self.n_action_steps))
        completed = [outcomes[s].record for s in self.seeds if "error" not in outcomes[s].record]
        successes = sum(bool(r["success"]) for r in completed)  # errored episodes are missing, not failures
        success = successes / len(completed) if completed else 0.0
        mean_return = sum(float(r["return"]) for r in completed) / len(completed) if completed else float("-inf")
        selection = {"step": step, "success": success, "successes": successes, "return": mean_return,
                     "episodes": len(self.seeds), "seed_start": self.seeds[0],
                     "errors": sum("error" in o.record for o in outcomes.values()), "metric": self.metric}
        meta = json.loads(last.read_text())
        meta["selection"] = selection
        write_json(last, meta)
        score = selection[self.metric]
        if is_better(score, self.best_score):
            with atomic_path(self.checkpoints / "best.safetensors") as tmp:
                shutil.copyfile(last.with_suffix(".safetensors"), tmp)
            write_json(self.checkpoints / "best.json", meta)
            self.best_score = score
        return {"success": success, "return": mean_return, "success_episodes": len(self.seeds),
                "success_seed_start": self.seeds[0]}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None
