"""In-training rollouts: success in metrics.jsonl, `last` / `best` chosen on selection seeds only."""

import json

import pytest

from dopr_robot.config import load_config
from dopr_robot.errors import UserError
from dopr_robot.training import train
from dopr_robot.training.selection import is_better

TINY = ["policy.mlp.hidden_dim=64", "policy.mlp.num_layers=2", "train.batch_size=32", "train.log_every=5",
        "train.val_every=10", "train.warmup_steps=5", "train.steps=20"]


def test_best_is_the_highest_success_and_ties_go_to_the_later_step():
    assert is_better(0.0, None)
    assert is_better(0.5, 0.5)  # tie: the later step replaces best
    assert is_better(0.6, 0.5) and not is_better(0.4, 0.5)


def test_in_training_rollouts_log_success_and_select_on_selection_seeds(tmp_path, lift_demos):
    cfg = load_config(None, [f"data.path={lift_demos}", *TINY, "train.eval_every=10", "train.eval_episodes=2",
                             "eval.max_steps=8", "eval.workers=1"])
    run = train(cfg, tmp_path / "run", progress=False)
    records = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert [s for s, r in records.items() if "success" in r] == [10, 20]
    assert records[10]["success_episodes"] == 2 and records[10]["success_seed_start"] == 200000
    last = json.loads((run / "checkpoints" / "last.json").read_text())
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert last["step"] == 20 and last["selection"]["step"] == 20
    # 8-step rollouts of a 20-step policy never succeed: every evaluation ties, so best is the later one
    assert records[10]["success"] == records[20]["success"] == 0.0 and best["step"] == 20
    assert (run / "checkpoints" / "best.safetensors").read_bytes() == \
        (run / "checkpoints" / "last.safetensors").read_bytes()
    selection_seeds = set(range(best["selection"]["seed_start"], best["selection"]["seed_start"] + 2))
    report_seeds = set(range(cfg.eval.seed_start, cfg.eval.seed_start + cfg.eval.episodes))
    assert selection_seeds == {200000, 200001} and not selection_seeds & report_seeds


@pytest.mark.parametrize("overrides, message", [
    (["train.eval_every=7"], "multiple of train.log_every"),
    (["train.eval_every=100", "train.eval_seed_start=100010"], "overlap"),
    (["eval.push=1.5"], "probability"),
    (["eval.action_noise=-0.1"], "eval.action_noise"),
])
def test_rollout_keys_are_validated(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)
