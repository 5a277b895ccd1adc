"""A small mutation check of dopr_robot/evaluation/ (issue 17 item 5): hand-made mutants, each the kind of slip that
would put a wrong number in a report, each run against the tests that should catch it.

    python tools/mutate_evaluation.py [--only NAME ...] [--list]

Every mutant is applied to a copy of the repository under a temporary directory (the checkout is never touched),
and the named tests run there (`pytest -x -q`, one thread). A mutant is *killed* when those tests fail, *survived*
when they pass. Prints one line per mutant and the survivors at the end; exits 1 if any survived.
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
CLI, ENGINE, VIDEOS, SWEEP = "tests/test_eval_cli.py", "tests/test_eval_engine.py", "tests/test_videos.py", \
    "tests/test_sweep.py"

# name: (file, original text, mutated text, pytest arguments)
MUTANTS = {
    "errors-counted-as-failures": (
        "dopr_robot/evaluation/evaluate.py", 'completed = [r for r in per_episode if "error" not in r]',
        "completed = [{**r, 'success': r.get('success') or False, 'return': r.get('return') or 0.0, "
        "'steps': r.get('steps') or 0} for r in per_episode]",
        [CLI, "-k", "rates_are_over_completed"]),
    "wilson-over-all-episodes": (
        "dopr_robot/evaluation/evaluate.py", '"success_ci95": list(wilson_interval(successes, n)) if n else None',
        '"success_ci95": list(wilson_interval(successes, len(per_episode))) if n else None',
        [CLI, "-k", "rates_are_over_completed"]),
    "resume-reuses-errored-records": (
        "dopr_robot/evaluation/evaluate.py",
        'done = {s: r for s, r in done.items() if "error" not in r}', "done = dict(done)",
        [CLI, "-k", "resume_runs_errored"]),
    "errors-exit-zero": (
        "dopr_robot/evaluation/evaluate.py", 'if report["n_errors"] and not report["allow_errors"]:',
        "if False:", [CLI, "-k", "errored_episodes_are_missing"]),
    "errored-record-says-failed": (
        "dopr_robot/evaluation/pool.py", '{"seed": seed, "success": None,', '{"seed": seed, "success": False,',
        [CLI, "-k", "errored_episodes_are_missing"]),
    "resumed-block-journals-done-seeds-again": (
        "dopr_robot/evaluation/evaluate.py", "if seed in done:  # ran again with its block", "if False:",
        [CLI, "-k", "resumes_to_the_same_records"]),
    "cell-with-errors-is-done": (
        "dopr_robot/experiments/cells.py", "name == checkpoint_name and errored == 0", "name == checkpoint_name",
        [SWEEP, "-k", "errored_episodes_does_not"]),
    "recorder-failure-fails-episode": (
        "dopr_robot/evaluation/video.py", "        except Exception as e:  # noqa: BLE001 - see the class docstring\n"
        "            self._fail(e)\n\n    def finish",
        "        except Exception as e:  # noqa: BLE001 - see the class docstring\n"
        "            raise\n\n    def finish",
        [VIDEOS, "-k", "recorder_failure"]),
    "workers-outlive-a-killed-eval": (
        "dopr_robot/evaluation/pool.py", "    die_with_parent(parent)\n", "",
        [CLI, "-k", "kill_9_of_eval"]),
    "one-generator-per-batch": (
        "dopr_robot/policies/base.py", "if isinstance(generator, (list, tuple)):",
        "if isinstance(generator, (list, tuple)) and not (generator := generator[0]):",
        [ENGINE, "-k", "own_generator"]),
    "block-noise-from-its-first-seed": (
        "dopr_robot/evaluation/lockstep.py", "self._generators[seed] = torch.Generator().manual_seed(seed)",
        "self._generators[seed] = torch.Generator().manual_seed(seeds[0])",
        [ENGINE, "-k", "generator_per_episode"]),
    "generators-not-restarted": (
        "dopr_robot/evaluation/lockstep.py", "            if first:\n",
        "            if seed not in self._generators:\n",
        [ENGINE, "-k", "pre_pool_results"]),
    "blocks-cut-by-position-not-seed": (
        "dopr_robot/evaluation/lockstep.py", "return [tuple(seeds[i:i + batch]) for i in range(0, len(seeds), batch)]",
        "return [tuple(seeds[i::-(-len(seeds) // batch)]) for i in range(-(-len(seeds) // batch))]",
        [ENGINE, "-k", "workers_or"]),
    "env-error-ends-the-block": (
        "dopr_robot/evaluation/lockstep.py",
        "        except Exception as e:  # noqa: BLE001 - this episode is lost, its block goes on\n"
        "            failed(seed, e, 0.0)",
        "        except Exception as e:  # noqa: BLE001 - this episode is lost, its block goes on\n"
        "            failed(seed, e, 0.0)\n            running = []\n            break",
        [ENGINE, "-k", "costs_only"]),
    "timeout-not-scaled-by-block": (
        "dopr_robot/evaluation/pool.py", "return t0 + self.episode_timeout_s * len(block)",
        "return t0 + self.episode_timeout_s", [ENGINE, "-k", "timeouts"]),
}


def run(name: str) -> tuple[bool, float]:
    path, old, new, tests = MUTANTS[name]
    with tempfile.TemporaryDirectory(prefix=f"mutant-{name}-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "runs", "data"))
        target = copy / path
        text = target.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"{name}: the text to mutate is not found exactly once in {path} (stale mutant)")
        target.write_text(text.replace(old, new))
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                                cwd=copy, capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1"})
        return result.returncode != 0, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(MUTANTS))
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    if args.list:
        print("\n".join(f"{n}: {m[0]} -> {' '.join(m[3])}" for n, m in MUTANTS.items()))
        return
    survivors = []
    for name in args.only or MUTANTS:
        killed, seconds = run(name)
        print(f"{'killed  ' if killed else 'SURVIVED'} {name} ({seconds:.0f} s)", flush=True)
        if not killed:
            survivors.append(name)
    print(f"survivors: {', '.join(survivors) or 'none'}")
    sys.exit(1 if survivors else 0)


if __name__ == "__main__":
    main()
