"""Statistics for comparing closed-loop success between groups of training runs (numpy only, seeded).

The unit of replication is the training seed: a run is one training seed of one group (optimizer + grid point),
evaluated on the same held-out episode seeds. A run's outcome is its vector of per-episode successes (0/1).

- `wilson_interval`: Wilson score interval of a binomial proportion (the one implementation in the package).
- `hierarchical_bootstrap_diff`: percentile interval of the difference of mean success between two groups,
  resampling training seeds with replacement and then episodes within each resampled seed.
- `permutation_test`: exact two-sided permutation test of the difference of mean per-seed success over training
  seeds (every relabelling when feasible, else a seeded Monte Carlo).
- `paired_episode_test`: exact two-sided sign-flip test over episode seeds when every run of both groups played
  the same episode seeds (reduces to the exact McNemar test for one run per group).
- `trend_test`: two-sided permutation test of a linear trend of per-seed success over a swept setting (one test
  for a whole damping curve, instead of one per grid point against the baseline).
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np

Z95 = 1.959963984540054  # standard normal quantile 0.975
EXACT_PERMUTATION_LIMIT = 200_000  # enumerate every relabelling up to this many, else Monte Carlo


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default); sane at 0% and 100%.

    With p = successes / n: center = (p + z^2 / 2n) / (1 + z^2 / n),
    half-width = z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n).
    """
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, center - half)  # exact at the edges (no 1e-17 round-off)
    hi = 1.0 if successes == n else min(1.0, center + half)
    return (lo, hi)


def _per_seed_counts(group: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """(episodes, success rate) of each run of a group; refuses empty groups or runs."""
    if len(group) == 0:
        raise ValueError("a group needs at least one run")
    n = np.array([len(run) for run in group], dtype=np.int64)
    if (n == 0).any():
        raise ValueError("every run needs at least one episode")
    rate = np.array([float(np.mean(run)) for run in group])
    return n, rate


def hierarchical_bootstrap_diff(baseline: Sequence[Sequence[float]], group: Sequence[Sequence[float]],
                                n_boot: int = 10_000, seed: int = 0, level: float = 0.95) -> dict:
    """Bootstrap interval of mean_success(group) - mean_success(baseline).

    Each group's mean success is the mean over its training seeds of the per-seed success rate (every seed weighs
    the same, whatever its episode count). One bootstrap replicate, per group independently: draw S training seeds
    with replacement from the group's S seeds; for each drawn seed, draw its n episodes with replacement from its
    own episodes; average. For 0/1 outcomes the second stage is exactly a Binomial(n, p_seed) / n draw, which is how
    it is computed. The interval is the (1 - level)/2 and (1 + level)/2 percentiles of the replicated differences.
    Returns {"diff", "ci": [lo, hi], "n_boot", "seed", "level", "method"}.
    """
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    rng = np.random.default_rng(seed)

    def replicate_means(runs: Sequence[Sequence[float]]) -> np.ndarray:
        n, rate = _per_seed_counts(runs)
        picks = rng.integers(0, len(n), size=(n_boot, len(n)))  # stage 1: training seeds
        successes = rng.binomial(n[picks], rate[picks])  # stage 2: episodes within each drawn seed
        return (successes / n[picks]).mean(axis=1)

    base_means = replicate_means(baseline)
    group_means = replicate_means(group)
    diffs = group_means - base_means
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    observed = float(_per_seed_counts(group)[1].mean() - _per_seed_counts(baseline)[1].mean())
    return {"diff": observed, "ci": [float(lo), float(hi)], "n_boot": n_boot, "seed": seed, "level": level,
            "method": "hierarchical bootstrap (training seeds, then episodes within seed), percentile interval"}


def permutation_test(baseline_rates: Sequence[float], group_rates: Sequence[float],
                     n_resamples: int = 100_000, seed: int = 0) -> dict:
    """Two-sided permutation test of mean(group_rates) - mean(baseline_rates) over training seeds.

    Null: the optimizer label does not matter, so every split of the pooled per-seed success rates into groups of
    the observed sizes is equally likely. p = fraction of splits with |difference| >= the observed |difference|
    (the observed split counts). When the number of splits C(m + n, m) is at most EXACT_PERMUTATION_LIMIT every
    split is enumerated (exact p); otherwise `n_resamples` seeded random splits give p = (1 + hits) / (1 +
    n_resamples), which is a valid p-value (Phipson & Smyth 2010).
    Returns {"p", "method": "exact"|"monte-carlo", "n_permutations", "seed"}.
    """
    x = np.asarray(baseline_rates, dtype=float)
    y = np.asarray(group_rates, dtype=float)
    if x.size == 0 or y.size == 0:
        raise ValueError("both groups need at least one training seed")
    pooled = np.concatenate([x, y])
    total, m = pooled.size, y.size
    observed = abs(y.mean() - x.mean())
    tolerance = 1e-12 * max(1.0, observed)  # equal differences must count as "as extreme" despite round-off
    n_splits = math.comb(total, m)
    if n_splits <= EXACT_PERMUTATION_LIMIT:
        chosen = np.array(list(itertools.combinations(range(total), m)), dtype=np.int64)
        sum_y = pooled[chosen].sum(axis=1)
        diff = sum_y / m - (pooled.sum() - sum_y) / (total - m)
        hits = int((np.abs(diff) >= observed - tolerance).sum())
        return {"p": hits / n_splits, "method": "exact", "n_permutations": n_splits, "seed": None}
    rng = np.random.default_rng(seed)
    perms = rng.permuted(np.tile(pooled, (n_resamples, 1)), axis=1)
    diff = perms[:, :m].mean(axis=1) - perms[:, m:].mean(axis=1)
    hits = int((np.abs(diff) >= observed - tolerance).sum())
    return {"p": (1 + hits) / (1 + n_resamples), "method": "monte-carlo", "n_permutations": n_resamples,
            "seed": seed}


def trend_test(x: Sequence[float], rates: Sequence[float], n_resamples: int = 100_000, seed: int = 0) -> dict:
    """Two-sided permutation test of the least-squares slope of per-seed success `rates` on the setting `x`
    (one entry per training run; pass log10 of a log-spaced setting to get a slope per decade).

    Null: success does not depend on the setting, so the runs' rates are exchangeable across their x values.
    p = fraction of reassignments with |slope| >= the observed |slope| (the observed one counts): every
    permutation when there are at most EXACT_PERMUTATION_LIMIT of them, else `n_resamples` seeded random ones with
    p = (1 + hits) / (1 + n_resamples). Needs two or more distinct x values.
    Returns {"slope", "p", "method", "n_permutations", "seed", "n_runs"}.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(rates, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("x and rates need one value per run")
    if np.unique(x).size < 2:
        raise ValueError("a trend needs two or more distinct setting values")
    centered = x - x.mean()
    weights = centered / (centered @ centered)  # slope = weights @ y (least squares)
    observed = abs(float(weights @ y))
    tolerance = 1e-12 * max(1.0, observed)
    if math.factorial(y.size) <= EXACT_PERMUTATION_LIMIT:
        perms = np.array(list(itertools.permutations(y)))
        hits = int((np.abs(perms @ weights) >= observed - tolerance).sum())
        return {"slope": float(weights @ y), "p": hits / len(perms), "method": "exact",
                "n_permutations": len(perms), "seed": None, "n_runs": int(y.size)}
    rng = np.random.default_rng(seed)
    perms = rng.permuted(np.tile(y, (n_resamples, 1)), axis=1)
    hits = int((np.abs(perms @ weights) >= observed - tolerance).sum())
    return {"slope": float(weights @ y), "p": (1 + hits) / (1 + n_resamples), "method": "monte-carlo",
            "n_permutations": n_resamples, "seed": seed, "n_runs": int(y.size)}


def trend_label(trend: dict) -> str:
    """A trend's slope in percentage points: "-5.3 pp per decade" (x = log10 of the setting) or "per unit"."""
    return f"{100 * trend['slope']:+.1f} pp per {'decade' if trend['x'].startswith('log10(') else 'unit'}"


def sign_flip_distribution(weights: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Exact distribution of T = sum_i s_i w_i with independent fair signs s_i = +-1 and integer weights w_i >= 0.

    Computed by convolution over the integer support [-sum w, sum w]; returns (support, probabilities).
    """
    w = np.abs(np.asarray(weights, dtype=np.int64))
    span = int(w.sum())
    prob = np.zeros(2 * span + 1)
    prob[span] = 1.0
    for wi in w[w > 0]:
        wi = int(wi)
        shifted = np.zeros_like(prob)
        shifted[wi:] += 0.5 * prob[:-wi]
        shifted[:-wi] += 0.5 * prob[wi:]
        prob = shifted
    return np.arange(-span, span + 1), prob


def paired_episode_test(baseline: Sequence[Sequence[float]], group: Sequence[Sequence[float]]) -> dict:
    """Exact two-sided sign-flip test over episode seeds; every run must list its episodes in the same seed order.

    For episode seed e, d_e = mean over the group's runs of success(e) - mean over the baseline's runs of
    success(e). Null: for each episode seed the two groups are exchangeable, so d_e is symmetric about 0 and its
    sign is a fair coin independent across seeds. Statistic T = sum_e d_e; p = P(|T'| >= |T|) under the sign-flip
    distribution, computed exactly (d_e * m * n is an integer for m baseline and n group runs). Pairing on the
    episode seed removes the variance of the initial states both groups share; the test is conditional on these
    trained runs (episode seeds are the unit), so it speaks about these runs, not about new training seeds --
    `permutation_test` over training seeds is the one that does. With one run per group d_e is in {-1, 0, 1} and
    this is exactly the two-sided exact McNemar test on the discordant pairs.
    Returns {"p", "n_episodes", "n_discordant" (episode seeds with d_e != 0), "mean_diff", "method"}.
    """
    base = np.asarray(baseline, dtype=float)
    grp = np.asarray(group, dtype=float)
    if base.ndim != 2 or grp.ndim != 2 or base.shape[1] != grp.shape[1] or base.shape[1] == 0:
        raise ValueError("paired test needs the same episodes (seeds) for every run of both groups")
    m, n = base.shape[0], grp.shape[0]
    # d_e * m * n = m * (group successes at e) - n * (baseline successes at e): an integer, so the test is exact
    scaled = np.rint(m * grp.sum(axis=0) - n * base.sum(axis=0)).astype(np.int64)
    support, prob = sign_flip_distribution(scaled)
    observed = abs(int(scaled.sum()))
    p = float(prob[np.abs(support) >= observed].sum())
    return {"p": min(1.0, p), "n_episodes": int(base.shape[1]), "n_discordant": int((scaled != 0).sum()),
            "mean_diff": float(scaled.sum() / (m * n * base.shape[1])),
            "method": "exact sign-flip test over episode seeds on per-seed mean differences"}


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b and c discordant pairs: min(1, 2 P(X <= min(b, c))), X ~ Bin(b+c, 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def mean_sd(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1; None with fewer than two values)."""
    if len(values) == 0:
        return None, None
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), (float(arr.std(ddof=1)) if arr.size > 1 else None)
