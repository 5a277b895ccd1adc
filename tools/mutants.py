"""A small mutation check of dopr_robot/optim (and, with `--area evaluation`, of dopr_robot/evaluation): apply
hand-made mutants one at a time to a copy of the repository and run their tests against each (tests/test_optim.py;
each evaluation mutant names its own tests); a mutant the tests do not fail is listed as surviving.

Run:  OMP_NUM_THREADS=1 .venv/bin/python tools/mutants.py [--area optim|evaluation] [--timeout 600] [--only NAME,NAME]

Each mutant is one plausible bug (a wrong constant, a dropped branch, a skipped step), written as an exact
text replacement that must match once. The copy lives in a temporary directory; the checkout is not touched.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOPR = "dopr_robot/optim/dopr.py"
OPTIM_TESTS = "tests/test_optim.py"

# (name, file, original text, mutated text)
MUTANTS = [
    ("ema replaced by the per-batch S", DOPR,
     "old.lerp_(s, torch.where(has, 1 - self.ema_decay, 1.0).to(s.dtype))", "old.copy_(s)"),
    ("non-finite statistic enters the average", DOPR, "s = torch.where(finite, s, old)", "pass"),
    ("damping not relative to the mean eigenvalue", DOPR,
     'return gamma * (trace / d if form == "mean" else trace) + eps', "return gamma * trace + eps"),
    ("retry at 1x instead of 10x", DOPR, "add_(10 * lam.index_select(0, slot)[:, None])",
     "add_(lam.index_select(0, slot)[:, None])"),
    ("failed factorization not replaced by the identity", DOPR,
     "factor.diagonal(dim1=-2, dim2=-1).add_((~ok)[:, None])", "pass"),
    ("primal and dual AP skipped at step time", DOPR, "ap_grads = self._ap_gradients()",
     "ap_grads = {}; self._ap_gradients()"),
    ("backward path forgets to whiten D", DOPR, "left, right = whiten @ d_rows, rows", "left, right = d_rows, rows"),
    ("clipping measures M on the backward path", DOPR,
     "true = {id(w.grad): sq for w, sq in self.true_grad_norms_sq().items() if w.grad is not None}", "true = {}"),
    ("statistics from eval-mode calls", DOPR,
     "if module is self.layer.module and module.training and torch.is_grad_enabled():",
     "if module is self.layer.module and torch.is_grad_enabled():"),
    ("repeated calls not weighted by rows", DOPR, "        pending.rows += rows.shape[0]\n",
     "        pending.rows = rows.shape[0]\n"),
    ("dual path in float32", DOPR, "inputs = [(layer, torch.cat(p.inputs).double()) for layer, p in dual]",
     "inputs = [(layer, torch.cat(p.inputs)) for layer, p in dual]"),
    ("refresh every step", DOPR, 'and (self.steps % self.refresh_every == 0 or "ap_inverse" not in state)',
     "and True"),
    ("conv taps ordered wrong", DOPR, "return g.movedim(1, -1).reshape(-1, g.shape[1])",
     "return g.reshape(-1, g.shape[1])"),
    ("muon without nesterov", DOPR, 'update = g.lerp(buf, momentum) if group["nesterov"] else buf',
     "update = buf"),
    ("newton-schulz coefficient", DOPR, "NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)",
     "NS_COEFFICIENTS = (3.4445, -4.7750, 2.0)"),
    ("muon lr scale on the smaller side", DOPR, "return lr * 0.2 * math.sqrt(max(d_out, d_in))",
     "return lr * 0.2 * math.sqrt(min(d_out, d_in))"),
    ("signum momentum weights swapped", DOPR, 'buf.lerp_(g, 1 - group["momentum"])\n        p.mul_',
     'buf.lerp_(g, group["momentum"])\n        p.mul_'),
    ("flop count picks the dearest path", DOPR, "return min(costs, key=costs.get)", "return max(costs, key=costs.get)"),
    ("previous_batch folds before the solve", DOPR,
     'previous = self.stats_from == "previous_batch" and "ap_stat" in state', "previous = False"),
]

# Evaluation (issue 17 item 5): (name, file, original text, mutated text, the tests that should catch it)
EVAL_CLI, EVAL_ENGINE, EVAL_VIDEOS, EVAL_SWEEP = ("tests/test_eval_cli.py", "tests/test_eval_engine.py",
                                                  "tests/test_videos.py", "tests/test_sweep.py")
EVALUATION_MUTANTS = [
    ('errors counted as failures', 'dopr_robot/evaluation/evaluate.py',
     'completed = [r for r in per_episode if "error" not in r]',
     "completed = [{**r, 'success': r.get('success') or False, 'return': r.get('return') or 0.0, 'steps': r.get('steps') or 0} for r in per_episode]", [EVAL_CLI, '-k', 'rates_are_over_completed']),
    ('wilson over all episodes', 'dopr_robot/evaluation/evaluate.py',
     '"success_ci95": list(wilson_interval(successes, n)) if n else None',
     '"success_ci95": list(wilson_interval(successes, len(per_episode))) if n else None', [EVAL_CLI, '-k', 'rates_are_over_completed']),
    ('resume reuses errored records', 'dopr_robot/evaluation/evaluate.py',
     'done = {s: r for s, r in done.items() if "error" not in r}',
     'done = dict(done)', [EVAL_CLI, '-k', 'resume_runs_errored']),
    ('errors exit zero', 'dopr_robot/evaluation/evaluate.py',
     'if report["n_errors"] and not report["allow_errors"]:',
     'if False:', [EVAL_CLI, '-k', 'errored_episodes_are_missing']),
    ('errored record says failed', 'dopr_robot/evaluation/pool.py',
     '{"seed": seed, "success": None,',
     '{"seed": seed, "success": False,', [EVAL_CLI, '-k', 'errored_episodes_are_missing']),
    ('resumed block journals done seeds again', 'dopr_robot/evaluation/evaluate.py',
     'if seed in done:  # ran again with its block',
     'if False:', [EVAL_CLI, '-k', 'resumes_to_the_same_records']),
    ('cell with errors is done', 'dopr_robot/experiments/cells.py',
     'name == checkpoint_name and errored == 0',
     'name == checkpoint_name', [EVAL_SWEEP, '-k', 'errored_episodes_does_not']),
    ('recorder failure fails episode', 'dopr_robot/evaluation/video.py',
     '        except Exception as e:  # noqa: BLE001 - see the class docstring\n            self._fail(e)\n\n    def finish',
     '        except Exception as e:  # noqa: BLE001 - see the class docstring\n            raise\n\n    def finish', [EVAL_VIDEOS, '-k', 'recorder_failure']),
    ('workers outlive a killed eval', 'dopr_robot/evaluation/pool.py',
     '    die_with_parent(parent)\n',
     '', [EVAL_CLI, '-k', 'kill_9_of_eval']),
    ('one generator per batch', 'dopr_robot/policies/base.py',
     'if isinstance(generator, (list, tuple)):',
     'if isinstance(generator, (list, tuple)) and not (generator := generator[0]):', [EVAL_ENGINE, '-k', 'own_generator']),
    ('block noise from its first seed', 'dopr_robot/evaluation/lockstep.py',
     'self._generators[seed] = torch.Generator().manual_seed(seed)',
     'self._generators[seed] = torch.Generator().manual_seed(seeds[0])', [EVAL_ENGINE, '-k', 'generator_per_episode']),
    ('generators not restarted', 'dopr_robot/evaluation/lockstep.py',
     '            if first:\n',
     '            if seed not in self._generators:\n', [EVAL_ENGINE, '-k', 'pre_pool_results']),
    ('blocks cut by position not seed', 'dopr_robot/evaluation/lockstep.py',
     'return [tuple(seeds[i:i + batch]) for i in range(0, len(seeds), batch)]',
     'return [tuple(seeds[i::-(-len(seeds) // batch)]) for i in range(-(-len(seeds) // batch))]', [EVAL_ENGINE, '-k', 'workers_or']),
    ('env error ends the block', 'dopr_robot/evaluation/lockstep.py',
     '        except Exception as e:  # noqa: BLE001 - this episode is lost, its block goes on\n            failed(seed, e, 0.0)',
     '        except Exception as e:  # noqa: BLE001 - this episode is lost, its block goes on\n            failed(seed, e, 0.0)\n            running = []\n            break', [EVAL_ENGINE, '-k', 'costs_only']),
    ('timeout not scaled by block', 'dopr_robot/evaluation/pool.py',
     'return t0 + self.episode_timeout_s * len(block)',
     'return t0 + self.episode_timeout_s', [EVAL_ENGINE, '-k', 'timeouts']),
]


def copy_repo(dest: Path) -> None:
    for name in ("dopr_robot", "tests", "configs", "pyproject.toml"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, dest / name)


def run_tests(root: Path, timeout: int, tests: list[str]) -> tuple[str, float]:
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                 *tests], cwd=root, env=env, capture_output=True, text=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - start
    return ("passed" if result.returncode == 0 else "failed"), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=int, default=600, help="seconds per test run")
    parser.add_argument("--only", default=None, help="comma-separated mutant names")
    parser.add_argument("--area", choices=("optim", "evaluation"), default="optim",
                        help="optim: MUTANTS against tests/test_optim.py; evaluation: EVALUATION_MUTANTS, each "
                             "against the tests it names")
    args = parser.parse_args()
    pool = [(*m, [OPTIM_TESTS]) for m in MUTANTS] if args.area == "optim" else EVALUATION_MUTANTS
    chosen = [m for m in pool if args.only is None or m[0] in args.only.split(",")]
    with tempfile.TemporaryDirectory(prefix="dopr-mutants-") as tmp:
        root = Path(tmp)
        copy_repo(root)
        for name, rel, old, _, _ in chosen:  # every mutant must apply before anything runs
            if (root / rel).read_text().count(old) != 1:
                sys.exit(f"mutant {name!r}: its text does not occur exactly once in {rel}")
        for tests in sorted({tuple(m[4]) for m in chosen}):
            outcome, seconds = run_tests(root, args.timeout, list(tests))
            print(f"unmutated: {' '.join(tests)} {outcome} ({seconds:.0f} s)", flush=True)
            if outcome != "passed":
                sys.exit("the unmutated tests must pass first")
        survivors = []
        for name, rel, old, new, tests in chosen:
            path = root / rel
            original = path.read_text()
            path.write_text(original.replace(old, new))
            try:
                outcome, seconds = run_tests(root, args.timeout, tests)
            finally:
                path.write_text(original)
            verdict = "killed" if outcome == "failed" else "SURVIVED" if outcome == "passed" else outcome
            print(f"{verdict:>9}  {name} ({seconds:.0f} s)", flush=True)
            if outcome == "passed":
                survivors.append(name)
        print(f"\n{len(chosen) - len(survivors)} of {len(chosen)} mutants killed; surviving: "
              f"{', '.join(survivors) if survivors else 'none'}")

if __name__ == "__main__":
    main()
