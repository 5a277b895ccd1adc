"""Coverage of compare's 95% intervals for a difference of mean success at 2, 3 and 5 training seeds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/interval_coverage.py [--reps 2000] [--n-boot 1000] [--seed 0]

A hierarchical simulation of what `compare` sees: each training seed of a group has its own success probability
q_s, drawn from a Beta distribution with mean mu and standard deviation tau (tau = 0: the seeds do not differ),
and plays 50 episodes, each a Bernoulli(q_s) success. Under the null both groups share mu and tau, so the true
difference of mean success is 0; in the last scenario the group's mu is 0.2 higher (coverage of +0.2). For each
simulated comparison the script computes, with the package's own functions (`dopr_robot.stats`):
- old: the hierarchical percentile bootstrap (`hierarchical_bootstrap_diff`, B = --n-boot), compare's interval
  before this change;
- new: Welch's t interval on the per-seed rates with each group's variance at least a seed's binomial variance
  (`difference_interval`, the call compare makes), compare's interval now;
and prints, per scenario and number of seeds (baseline vs group), the fraction of intervals that contain the true
difference (coverage, with its Monte Carlo standard error) and the mean width in percentage points.
Seeded: the same command prints the same table.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from dopr_robot import stats

EPISODES = 50
SCENARIOS = [  # (name, mu, tau, true difference)
    ("null, seeds alike (tau 0)", 0.45, 0.0, 0.0),
    ("null, mu 0.45, tau 0.08", 0.45, 0.08, 0.0),
    ("null, mu 0.45, tau 0.15", 0.45, 0.15, 0.0),
    ("null, mu 0.70, tau 0.05", 0.70, 0.05, 0.0),
    ("null, mu 0.10, tau 0.05", 0.10, 0.05, 0.0),
    ("+0.2, mu 0.45 vs 0.65, tau 0.08", 0.45, 0.08, 0.2),
]
SEEDS = [(2, 2), (3, 3), (5, 5), (2, 3), (3, 5)]  # training seeds of (baseline, group)


def draw_group(rng: np.random.Generator, seeds: int, mu: float, tau: float) -> list[np.ndarray]:
    """One group's runs: per-episode successes of `seeds` training seeds with Beta(mu, tau) probabilities."""
    if tau == 0.0:
        q = np.full(seeds, mu)
    else:
        k = mu * (1 - mu) / tau ** 2 - 1  # Beta(mu k, (1 - mu) k) has mean mu and sd tau
        q = rng.beta(mu * k, (1 - mu) * k, seeds)
    return [(rng.random(EPISODES) < qs).astype(float) for qs in q]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=2000, help="simulated comparisons per cell")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates of the old interval")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    start = time.time()
    print(f"{args.reps} simulated comparisons per row, {EPISODES} episodes per run, B = {args.n_boot}, seed "
          f"{args.seed}; coverage of the true difference by 95% intervals (± Monte Carlo standard error), mean "
          f"width in pp\n")
    widths = (33, 5, 21, 21)
    print("| " + " | ".join(f"{h:<{w}}" for h, w in zip(("scenario", "seeds", "old: bootstrap",
                                                          "new: Welch t + floor"), widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lowest: dict[int, float] = {}
    for name, mu, tau, delta in SCENARIOS:
        for m, n in SEEDS:
            covered = {"old": 0, "new": 0}
            width = {"old": 0.0, "new": 0.0}
            for rep in range(args.reps):
                baseline = draw_group(rng, m, mu, tau)
                group = draw_group(rng, n, mu + delta, tau)
                intervals = {"old": stats.hierarchical_bootstrap_diff(baseline, group, n_boot=args.n_boot,
                                                                      seed=rep)["ci"],
                             "new": stats.difference_interval(baseline, group, binary=True)["ci"]}
                for key, (lo, hi) in intervals.items():
                    covered[key] += lo <= delta <= hi
                    width[key] += hi - lo
            cells = []
            for key in ("old", "new"):
                c = covered[key] / args.reps
                se = math.sqrt(c * (1 - c) / args.reps)
                cells.append(f"{100 * c:5.1f}% ± {100 * se:.1f}, {100 * width[key] / args.reps:4.1f} pp")
            if m == n:
                lowest[m] = min(lowest.get(m, 1.0), covered["new"] / args.reps)
            print(f"| {name:<33} | {m} v {n} | {cells[0]:<21} | {cells[1]:<21} |", flush=True)
    print("\nlowest coverage of the new interval, equal seeds per group: "
          + ", ".join(f"{k} seeds {100 * v:.1f}%" for k, v in sorted(lowest.items()))
          + f"  ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
