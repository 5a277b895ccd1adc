"""The evaluation engine: one reusable worker pool, results identical to the pre-pool code, perturbations,
fault isolation (a killed worker, an episode that raises, a timeout, an environment that cannot be built)."""

import json
import os
import shutil
import signal
import time

import numpy as np
import pytest

from conftest import run_cli
from dopr_robot.config import load_config
from dopr_robot.errors import UserError
from dopr_robot.evaluation import EpisodeSettings, EvalPool, Perturbation
from dopr_robot.training import train

TINY = ["policy.mlp.hidden_dim=64", "policy.mlp.num_layers=2", "train.batch_size=32", "train.log_every=5",
        "train.val_every=10", "train.warmup_steps=5", "train.steps=20"]

# Recorded once with the code before the pool (main at 01fc1d6: `evaluate(run, episodes=3, seed_start=500,
# max_steps=24, workers=1)` on these tiny runs): seed -> (success, steps, return, sum of executed actions).
BEFORE = {
    "diffusion": {500: (False, 24, 0.0, 9.343191160820425), 501: (False, 24, 0.0, 9.064861587728956),
                  502: (False, 24, 0.0, 9.051571598742157)},
    "flow": {500: (False, 24, 0.0, -12.660431301454082), 501: (False, 24, 0.0, -6.001783437561244),
             502: (False, 24, 0.0, -0.9669857262633741)},
}
SEEDS = [500, 501, 502]
ONE_BY_ONE = [(s,) for s in SEEDS]  # blocks of one episode: B = 1, the evaluation before batching


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, lift_demos):
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for name, extra in (("diffusion", []), ("flow", ["policy.type=flow"])):
        cfg = load_config(None, [f"data.path={lift_demos}", *TINY, *extra])
        runs[name] = train(cfg, root / name, progress=False)
    return runs


def _ckpt(run):
    return run / "checkpoints" / "final.json"


def _key(outcomes):
    return {s: (o.record["success"], o.record["steps"], o.record["return"], float(np.sum(o.trajectory.actions,
                                                                                       dtype=np.float64)))
            for s, o in outcomes.items()}


def _object_path(outcome):
    return outcome.trajectory.obs["object"][:, :3]


def test_one_pool_matches_the_pre_pool_results_and_perturbs_deterministically(tiny_runs, tmp_path):
    plain = EpisodeSettings(max_steps=24, n_action_steps=8, record=True)
    last = tmp_path / "last.json"  # re-saved in place, like training's checkpoints/last

    def save_as_last(run):
        shutil.copyfile(_ckpt(run).with_suffix(".safetensors"), last.with_suffix(".safetensors"))
        shutil.copyfile(_ckpt(run), last)

    save_as_last(tiny_runs["diffusion"])
    with EvalPool(2, preload=last) as pool:
        base = pool.evaluate(last, ONE_BY_ONE, plain)
        for seed, (success, steps, ret, action_sum) in BEFORE["diffusion"].items():
            got = _key(base)[seed]
            assert got[:3] == (success, steps, ret)
            assert got[3] == pytest.approx(action_sum, rel=1e-6, abs=1e-6)  # bit-equal here; CPUs may round
        # the same pool after the checkpoint file was replaced: the workers reload it
        save_as_last(tiny_runs["flow"])
        flow = pool.evaluate(last, ONE_BY_ONE, plain)
        for seed, (success, steps, ret, action_sum) in BEFORE["flow"].items():
            assert _key(flow)[seed][:3] == (success, steps, ret)
            assert _key(flow)[seed][3] == pytest.approx(action_sum, rel=1e-6, abs=1e-6)

        def run(**levels):
            settings = EpisodeSettings(max_steps=24, n_action_steps=8, record=True,
                                       perturbation=Perturbation(**levels))
            return pool.evaluate(_ckpt(tiny_runs["diffusion"]), ONE_BY_ONE[:2], settings)

        zero = run(push_magnitude=2.0)  # push probability 0: zero perturbation == the unperturbed episode
        for s in SEEDS[:2]:
            np.testing.assert_array_equal(zero[s].trajectory.actions, base[s].trajectory.actions)
            np.testing.assert_array_equal(zero[s].trajectory.states, base[s].trajectory.states)
        both = [run(action_noise=0.2, obs_noise=0.5, push=1.0, push_magnitude=0.5) for _ in range(2)]
        for s in SEEDS[:2]:  # same seed, same perturbed rollout
            np.testing.assert_array_equal(both[0][s].trajectory.states, both[1][s].trajectory.states)
            assert 1 <= both[0][s].record["push_step"] <= 6
        action = run(action_noise=0.2)
        obs = run(obs_noise=0.5)
        push = run(push=1.0, push_magnitude=0.5)
        for s in SEEDS[:2]:
            assert not np.allclose(action[s].trajectory.actions, base[s].trajectory.actions)
            assert not np.allclose(obs[s].trajectory.actions, base[s].trajectory.actions)
            step = push[s].record["push_step"]
            # before the push the object is where it was; after it, it moved differently
            np.testing.assert_array_equal(_object_path(push[s])[:step], _object_path(base[s])[:step])
            assert np.abs(_object_path(push[s])[-1] - _object_path(base[s])[-1]).max() > 1e-3


def test_a_killed_worker_costs_no_episode_and_the_run_finishes(tiny_runs):
    seeds = [500, 501, 502, 503]
    killed = []

    with EvalPool(2) as pool:
        def kill_one(seed, outcome):
            if not killed:
                pid = next(iter(pool._executor._processes))
                os.kill(pid, signal.SIGKILL)  # what the out-of-memory killer does
                killed.append(pid)

        outcomes = pool.evaluate(_ckpt(tiny_runs["diffusion"]), [(s,) for s in seeds],
                                 EpisodeSettings(max_steps=24, n_action_steps=8, record=True), kill_one)
    assert killed and sorted(outcomes) == seeds
    assert not any("error" in o.record for o in outcomes.values())
    for seed, (success, steps, ret, action_sum) in BEFORE["diffusion"].items():
        assert _key(outcomes)[seed][:3] == (success, steps, ret)
        assert _key(outcomes)[seed][3] == pytest.approx(action_sum, rel=1e-6, abs=1e-6)


def test_episode_errors_timeouts_and_unbuildable_environments(tiny_runs, tmp_path):
    def variant(name, **changes):
        meta = json.loads(_ckpt(tiny_runs["diffusion"]).read_text())
        for key, value in changes.items():
            meta[key] = value
        (tmp_path / f"{name}.json").write_text(json.dumps(meta))
        shutil.copyfile(_ckpt(tiny_runs["diffusion"]).with_suffix(".safetensors"), tmp_path / f"{name}.safetensors")
        return tmp_path / f"{name}.json"

    raises = variant("raises", obs_keys=["object", "no_such_observation"])  # fails inside every episode
    meta = json.loads(_ckpt(tiny_runs["diffusion"]).read_text())
    unbuildable = variant("unbuildable", env_args={**meta["env_args"], "env_name": "NoSuchEnv"})
    settings = EpisodeSettings(max_steps=24, n_action_steps=8)
    with EvalPool(1) as pool:
        outcomes = pool.evaluate(raises, [(500, 501)], settings)
        assert [o.record["success"] for o in outcomes.values()] == [None, None]  # missing, not failed
        assert all("KeyError" in o.record["error"] for o in outcomes.values())
        with pytest.raises(UserError, match="NoSuchEnv"):
            pool.evaluate(unbuildable, [(500,)], settings)
        # an episode that runs past its timeout is stopped and recorded, and the pool carries on
        pool.episode_timeout_s = 0.5
        start = time.monotonic()
        slow = pool.evaluate(_ckpt(tiny_runs["diffusion"]), [(500,), (501,)], EpisodeSettings(400, 8))
        assert all("timed out" in o.record["error"] for o in slow.values())
        assert time.monotonic() - start < 120
    result = run_cli("eval", str(unbuildable), "--episodes", "2", "--workers", "1")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "NoSuchEnv" in errors[0]
    assert result.stderr.rstrip().endswith(errors[0]) and "Traceback" not in result.stderr


# Recorded with main at 29c4d8a (one episode at a time, `rollout.run_episode` before lockstep) on these tiny
# runs, `run_episode(policy, env, seed, 24, 8, obs_keys, record=True, perturbation=P)`, P = none or
# (action_noise 0.2, obs_noise 0.5, push 1.0): success, steps, return, push_step, and the first 16 hex digits of
# the sha256 of the executed actions and of the MuJoCo states (bit-exact on this machine's CPU).
MAIN_B1 = {
    "diffusion/plain/500": [False, 24, 0.0, None, "e7c12ee63b25e3c3", "3419c52ac4bb909f"],
    "diffusion/plain/501": [False, 24, 0.0, None, "25b70e3b7e8dcc59", "4ffea32f64c2cafc"],
    "diffusion/plain/502": [False, 24, 0.0, None, "3aafc183939e01a1", "68cd2b332bb422aa"],
    "diffusion/perturbed/500": [False, 24, 0.0, 3, "4514bea9289c1f8d", "fa734dc39bf95b4d"],
    "diffusion/perturbed/501": [False, 24, 0.0, 4, "5f49973a8b9ee924", "3177e7c14555c017"],
    "diffusion/perturbed/502": [False, 24, 0.0, 4, "64b837dcd3ca57a9", "a1640ff07cdaaf0a"],
    "flow/plain/500": [False, 24, 0.0, None, "50b7a28b7732f9a3", "382f963e32df9dc4"],
    "flow/plain/501": [False, 24, 0.0, None, "dc7db35ffd19cabe", "562d3ae6ddedd5da"],
    "flow/plain/502": [False, 24, 0.0, None, "9a486e85c4513547", "568a193427def110"],
    "flow/perturbed/500": [False, 24, 0.0, 3, "1bea05d0a072b78a", "69f379f1e14ed0b8"],
    "flow/perturbed/501": [False, 24, 0.0, 4, "52df3227f52bdffe", "2699b03d3b9d5db4"],
    "flow/perturbed/502": [False, 24, 0.0, 4, "eac0f92291a15a36", "26ff4ab8938a1178"],
}


def _digest(array) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def test_blocks_of_one_reproduce_the_unbatched_evaluation_bit_for_bit(tiny_runs):
    """B = 1 through the lockstep engine and the pool gives main's per-episode results exactly, with and without
    perturbations (mutants: a block's noise drawn from one generator, a wrong seed per block position)."""
    perturbed = Perturbation(action_noise=0.2, obs_noise=0.5, push=1.0)
    with EvalPool(1) as pool:
        for name in ("diffusion", "flow"):
            for label, perturbation in (("plain", Perturbation()), ("perturbed", perturbed)):
                settings = EpisodeSettings(max_steps=24, n_action_steps=8, record=True, perturbation=perturbation)
                outcomes = pool.evaluate(_ckpt(tiny_runs[name]), ONE_BY_ONE, settings)
                for seed in SEEDS:
                    r, t = outcomes[seed].record, outcomes[seed].trajectory
                    got = [r["success"], r["steps"], r["return"], r.get("push_step"), _digest(t.actions),
                           _digest(t.states)]
                    assert got == MAIN_B1[f"{name}/{label}/{seed}"], (name, label, seed)


def _fingerprints(outcomes):
    return {s: (o.record["success"], o.record["steps"], o.record["return"], o.record.get("push_step"),
                _digest(o.trajectory.actions), _digest(o.trajectory.states)) for s, o in outcomes.items()}


def test_per_episode_results_do_not_depend_on_workers_or_on_where_the_policy_runs(tiny_runs):
    """At a fixed B the per-episode results are the same for 1, 2 and 3 workers, and with the policy in the main
    process (`--device cpu`, workers only step environments). Mutants: blocks cut by worker instead of by seed,
    a device path whose noise generators are not restarted per episode."""
    from dopr_robot.evaluation.lockstep import episode_blocks

    seeds = [600, 601, 602, 603, 604]
    blocks = episode_blocks(seeds, 2)
    assert blocks == [(600, 601), (602, 603), (604,)]
    settings = EpisodeSettings(max_steps=20, n_action_steps=8, record=True,
                               perturbation=Perturbation(action_noise=0.1, push=0.5))
    runs = {}
    for workers, device in ((1, None), (2, None), (3, None), (2, "cpu")):
        with EvalPool(workers, device=device) as pool:
            runs[workers, device] = _fingerprints(pool.evaluate(_ckpt(tiny_runs["flow"]), blocks, settings))
            if device is not None:  # a second evaluation in the same pool starts every generator afresh
                again = _fingerprints(pool.evaluate(_ckpt(tiny_runs["flow"]), blocks, settings))
                assert again == runs[workers, device]
    first = runs[1, None]
    assert sorted(first) == seeds
    for key, fingerprints in runs.items():
        assert fingerprints == first, key


def test_device_workers_read_the_policy_spec_from_the_json_which_must_match_the_weights(tiny_runs, tmp_path):
    """Device-mode workers start their episodes on the spec read from the checkpoint's JSON while the main process
    loads the policy: it equals the policy's own, and a JSON whose normalizer was edited is refused at load (one
    line), so the two cannot drift apart. Mutant: the spec's obs_scale read from the action normalizer."""
    from dopr_robot.checkpoint import load_policy
    from dopr_robot.evaluation.lockstep import PolicySpec

    policy, meta = load_policy(_ckpt(tiny_runs["diffusion"]))
    spec, from_json = PolicySpec.of(policy), PolicySpec.of_checkpoint(meta)
    assert (from_json.n_obs_steps, from_json.action_dim, from_json.image_keys) == \
        (spec.n_obs_steps, spec.action_dim, spec.image_keys) == (2, 7, ())
    assert from_json.obs_scale.dtype == np.float32
    np.testing.assert_array_equal(from_json.obs_scale, spec.obs_scale)
    edited = tmp_path / "edited"
    shutil.copytree(tiny_runs["diffusion"] / "checkpoints", edited)
    meta["normalizer"]["obs"]["scale"][0] *= 2
    (edited / "final.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="disagrees with its weights on the obs normalizer"):
        load_policy(edited / "final.json")


def test_an_episode_whose_environment_raises_costs_only_itself(tiny_runs):
    """One environment of a block that cannot give the policy's observations (no object observations): its
    episode is recorded with the error, and the block's other episodes end exactly as in a block without it."""
    from dopr_robot.checkpoint import load_policy
    from dopr_robot.envs import make_env
    from dopr_robot.evaluation.lockstep import Planner, PolicySpec, run_block

    policy, meta = load_policy(_ckpt(tiny_runs["diffusion"]))
    good = [make_env(meta["env_args"]) for _ in range(2)]
    broken = make_env({**meta["env_args"], "env_kwargs": {**meta["env_args"]["env_kwargs"], "use_object_obs": False}})
    spec = PolicySpec.of(policy)
    mixed = run_block(Planner(policy).plan, [good[0], broken, good[1]], [700, 701, 702], spec, meta["obs_keys"],
                      16, 8, record=True)
    clean = run_block(Planner(policy).plan, good, [700, 702], spec, meta["obs_keys"], 16, 8, record=True)
    assert "KeyError" in mixed[701].record["error"] and mixed[701].record["success"] is None
    for seed in (700, 702):
        assert "error" not in mixed[seed].record
        assert {k: mixed[seed].record[k] for k in ("success", "steps", "return")} == \
            {k: clean[seed].record[k] for k in ("success", "steps", "return")}
        np.testing.assert_array_equal(mixed[seed].trajectory.actions, clean[seed].trajectory.actions)


def test_each_row_of_a_batch_draws_its_noise_from_its_own_generator():
    """predict_action's noise for a batch of episodes: row i as in a batch of one from generator i (main drew
    the whole batch's noise from one generator, so an episode's noise depended on its batch)."""
    import torch

    from dopr_robot.policies.base import draw

    batch = draw(torch.randn, (3, 16, 7), generator=[torch.Generator().manual_seed(s) for s in (5, 6, 7)],
                 device=torch.device("cpu"))
    for i, seed in enumerate((5, 6, 7)):
        alone = torch.randn((1, 16, 7), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(batch[i:i + 1], alone)


def test_the_planner_keeps_one_generator_per_episode(tiny_runs):
    """Each episode's sampling noise comes from its own seed, whatever its place in its block (mutant: a block's
    noise seeded by its first seed), restarted on its first call of an evaluation."""
    from collections import deque

    import torch

    from dopr_robot.checkpoint import load_policy
    from dopr_robot.evaluation.lockstep import Planner

    policy, meta = load_policy(_ckpt(tiny_runs["flow"]))
    planner = Planner(policy)
    window = deque([(np.zeros(meta["obs_dim"], dtype=np.float32), {})] * policy.n_obs_steps)  # (low-dim, frames)
    for _ in range(2):  # the second time, every episode starts again
        planner.plan([5, 6], [True, True], [window, window])
        for seed in (5, 6):
            expected = torch.Generator().manual_seed(seed)
            torch.randn((1, policy.horizon, policy.action_dim), generator=expected)
            assert torch.equal(planner._generators[seed].get_state(), expected.get_state()), seed


def test_a_worker_without_the_policy_imports_neither_torch_nor_h5py(tiny_runs):
    """With the policy in the main process (`--device`), a worker only steps environments: what it imports to
    load the checkpoint's metadata, build the environment and run a block's episodes must not pull in torch (or
    h5py) through a shared module, or every worker pays ~1 s of start-up for nothing. Mutant: `flatten_obs` back
    in the torch-importing `datasets.windows`, or an eager `datasets/__init__`."""
    import subprocess
    import sys

    code = ("import sys; from dopr_robot.evaluation import pool, lockstep, rollout; "
            f"ckpt = {str(_ckpt(tiny_runs['flow']))!r}; pool._load(pool.checkpoint_token(__import__('pathlib').Path(ckpt)), "
            "ckpt, with_policy=False); print(sorted(m for m in ('torch', 'h5py', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_worker_starts_without_torch_dynamo_and_samples_as_the_main_process_does(tiny_runs):
    """A pool worker's start-up (`_init_worker` with a diffusion checkpoint preloaded) imports diffusers without
    torch._dynamo (diffusers keeps its no-op marker), leaves torch._dynamo importable for later, turns the collector
    back on with start-up's objects frozen, and gives a policy whose sampled chunk equals, bit for bit, the one this
    process samples with diffusers intact. Mutants: the import not blocked, the block left in place, the collector
    left off."""
    import subprocess
    import sys

    import torch

    from dopr_robot.checkpoint import load_policy

    ckpt = str(_ckpt(tiny_runs["diffusion"]))
    code = ("import gc, os, sys, pathlib, json, torch; from dopr_robot.evaluation import pool; "
            f"ckpt = {ckpt!r}; pool._init_worker(os.getppid(), (pool.checkpoint_token(pathlib.Path(ckpt)), ckpt), "
            "None, None); policy, meta = pool._worker['policy'], pool._worker['meta']; "
            "chunk = policy.predict_action(torch.ones(2, policy.n_obs_steps, meta['obs_dim']), "
            "[torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]).numpy(); "
            "from diffusers.utils.torch_utils import maybe_allow_in_graph as marker; "
            "state = ['torch._dynamo' in sys.modules, marker.__module__, gc.isenabled(), gc.get_freeze_count() > 0]; "
            "import torch._dynamo; print(json.dumps([*state, chunk.tolist()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    *state, chunk = json.loads(out.strip().splitlines()[-1])
    assert state == [False, "diffusers.utils.torch_utils", True, True]  # then `import torch._dynamo` worked
    policy, meta = load_policy(ckpt)
    here = policy.predict_action(torch.ones(2, policy.n_obs_steps, meta["obs_dim"]),
                                 [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]).numpy()
    np.testing.assert_array_equal(np.asarray(chunk, dtype=np.float32), here)  # JSON round-trips float32 exactly
    assert sys.modules.get("torch._dynamo") is not None  # this process, which loaded diffusers, is untouched
