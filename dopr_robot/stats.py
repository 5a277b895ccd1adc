"""Statistics for comparing closed-loop success between groups of training runs (numpy only, seeded).

The unit of replication is the training seed: a run is one training seed of one group (optimizer + grid point),
evaluated on the same held-out episode seeds. A run's outcome is its vector of per-episode successes (0/1).

- `wilson_interval`: Wilson score interval of a binomial proportion (the one implementation in the package).
- `seed_t_interval`: the interval compare reports for a difference of means: Welch's t interval on the per-seed
  means (for success, each group's variance at least the binomial variance of one seed's rate). It holds its
  level at 2-5 training seeds (benchmarks/interval_coverage.py: 95.7-100% coverage in every scenario there).
- `hierarchical_bootstrap_diff`: percentile interval of the difference of means between two groups, resampling
  training seeds with replacement and then episodes within each resampled seed. Kept for reference: it
  under-covers when seeds differ (down to 82% at 2 seeds, 88% at 3, 93.5% at 5 in the same simulation) and
  over-covers when they do not.
- `permutation_test`: exact two-sided permutation test of the difference of mean per-seed values over training
  seeds (every relabelling when feasible, else a seeded Monte Carlo).
- `paired_episode_test`: two-sided sign-flip test over episode seeds when every run of both groups played the
  same episode seeds (exact for successes, where it reduces to the exact McNemar test for one run per group, and
  for up to 20 episodes; else a seeded Monte Carlo).
- Every test also returns `min_p`, the smallest p-value it could give with these group sizes (2/252 for 5 vs 5
  seeds, 0.10 for 3 vs 3): a p at its minimum is as strong as that design allows.
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
EXACT_SIGN_FLIP_EPISODES = 20  # a real-valued paired test enumerates all 2^n sign flips up to this many episodes
FEW_SEEDS = 5  # comparisons with fewer training seeds in a group are flagged
# The per-episode metrics compare can test, their names in tables and plots, and the interval of a pooled mean
METRICS = ("success", "return", "normalized_return")
METRIC_LABELS = {"success": "success", "return": "return", "normalized_return": "normalized return"}
POOLED_INTERVAL = {"success": "Wilson 95%", "return": "t 95% over episodes", "normalized_return": "t 95% over episodes"}


def t_quantile(q: float, df: float) -> float:
    """Quantile of Student's t distribution (scipy; imported here so `wilson_interval` users stay light)."""
    from scipy.stats import t

    return float(t.ppf(q, df))


def binomial_variance_floor(rates: Sequence[float], episodes: Sequence[int]) -> float:
    """The smallest variance a seed's success rate can have: with rate p_s = Binomial(n_s, q_s) / n_s and q_s
    varying over training seeds with mean q and variance tau^2, Var(p_s) = tau^2 (1 - 1/n) + q (1 - q) / n >=
    q (1 - q) / n. Estimated with q = the mean rate and 1/n = the mean of 1/n_s."""
    q = float(np.mean(rates))
    return q * (1 - q) * float(np.mean(1.0 / np.asarray(episodes, dtype=float)))


def welch_interval(baseline: tuple[float, float, int], group: tuple[float, float, int], level: float = 0.95,
                   variance_floor: tuple[float, float] = (0.0, 0.0)) -> dict:
    """Welch's t interval for the difference of two means from each group's (mean, sample variance, count):
    diff +- t_{(1+level)/2, df} sqrt(v_b / m + v_g / n), each v raised to its `variance_floor`, df the
    Welch-Satterthwaite degrees of freedom (a point when both variances are 0). Needs counts >= 2 (else "ci" is
    None). Returns {"diff", "ci", "se", "df", "level", "method"}."""
    (mx, vx, nx), (my, vy, ny) = baseline, group
    diff = float(my - mx)
    method = "Welch t interval on per-seed means" + (", binomial variance floor" if any(variance_floor) else "")
    out = {"diff": diff, "ci": None, "se": None, "df": None, "level": level, "method": method}
    if nx < 2 or ny < 2:
        return {**out, "method": method + " (needs 2 or more training seeds per group)"}
    ex, ey = max(vx, variance_floor[0]) / nx, max(vy, variance_floor[1]) / ny
    se = math.sqrt(ex + ey)
    if se == 0.0:
        return {**out, "ci": [diff, diff], "se": 0.0, "df": float(nx + ny - 2)}
    df = (ex + ey) ** 2 / (ex ** 2 / (nx - 1) + ey ** 2 / (ny - 1))
    half = t_quantile((1 + level) / 2, df) * se
    return {**out, "ci": [diff - half, diff + half], "se": se, "df": df}


def seed_t_interval(baseline: Sequence[float], group: Sequence[float], level: float = 0.95,
                    variance_floor: tuple[float, float] = (0.0, 0.0)) -> dict:
    """Welch's t interval for mean(group) - mean(baseline), the per-seed means (one per training seed) being the
    observations (`welch_interval` on their mean, sample variance (ddof 1) and count), each group's variance
    raised to `variance_floor` (`binomial_variance_floor` for success rates)."""
    def moments(values: Sequence[float]) -> tuple[float, float, int]:
        arr = np.asarray(values, dtype=float)
        return float(arr.mean()), float(arr.var(ddof=1)) if arr.size > 1 else 0.0, int(arr.size)

    return welch_interval(moments(baseline), moments(group), level, variance_floor)


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


def _per_seed(group: Sequence[Sequence[float]]) -> tuple[list[np.ndarray], np.ndarray]:
    """Each run's per-episode values and each run's mean; refuses empty groups or runs."""
    if len(group) == 0:
        raise ValueError("a group needs at least one run")
    runs = [np.asarray(run, dtype=float) for run in group]
    if any(run.size == 0 for run in runs):
        raise ValueError("every run needs at least one episode")
    return runs, np.array([run.mean() for run in runs])


def difference_interval(baseline: Sequence[Sequence[float]], group: Sequence[Sequence[float]],
                        binary: bool, level: float = 0.95) -> dict:
    """compare's interval for the difference of mean per-episode values between two groups of runs (a list of
    per-episode values per run): `seed_t_interval` on the per-run means, with each group's variance at least
    `binomial_variance_floor` when the values are successes (`binary`)."""
    means = [[float(np.mean(run)) for run in runs] for runs in (baseline, group)]
    floor = (0.0, 0.0)
    if binary:
        floor = tuple(binomial_variance_floor(m, [len(run) for run in runs])
                      for m, runs in zip(means, (baseline, group)))
    return seed_t_interval(means[0], means[1], level, floor)


def hierarchical_bootstrap_diff(baseline: Sequence[Sequence[float]], group: Sequence[Sequence[float]],
                                n_boot: int = 10_000, seed: int = 0, level: float = 0.95) -> dict:
    """Bootstrap interval of mean(group) - mean(baseline) of per-episode values (success 0/1, or a return).

    Each group's mean is the mean over its training seeds of the per-seed mean (every seed weighs the same,
    whatever its episode count). One bootstrap replicate, per group independently: draw S training seeds with
    replacement from the group's S seeds; for each drawn seed, draw its n episodes with replacement from its own
    episodes; average. For 0/1 outcomes the second stage is exactly a Binomial(n, p_seed) / n draw, which is how
    it is computed then. The interval is the (1 - level)/2 and (1 + level)/2 percentiles of the replicated
    differences. Returns {"diff", "ci": [lo, hi], "n_boot", "seed", "level", "method"}.
    """
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    rng = np.random.default_rng(seed)

    def replicate_means(group_runs: Sequence[Sequence[float]]) -> np.ndarray:
        runs, means = _per_seed(group_runs)
        n = np.array([run.size for run in runs], dtype=np.int64)
        picks = rng.integers(0, len(runs), size=(n_boot, len(runs)))  # stage 1: training seeds
        if all(np.isin(run, (0.0, 1.0)).all() for run in runs):  # stage 2 for successes: a binomial draw
            return (rng.binomial(n[picks], means[picks]) / n[picks]).mean(axis=1)
        resampled = np.empty(picks.shape)  # stage 2 for real values: each drawn seed's episodes resampled
        for s, run in enumerate(runs):
            where = picks == s
            draws = rng.integers(0, run.size, size=(int(where.sum()), run.size))
            resampled[where] = run[draws].mean(axis=1)
        return resampled.mean(axis=1)

    diffs = replicate_means(group) - replicate_means(baseline)
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    observed = float(_per_seed(group)[1].mean() - _per_seed(baseline)[1].mean())
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
    `min_p`, the smallest p any data could give here: 2 / C(m + n, m) for equal groups (a split and its mirror
    are equally extreme), 1 / C(m + n, m) otherwise (distinct values), 1 / (1 + n_resamples) for Monte Carlo.
    Returns {"p", "method": "exact"|"monte-carlo", "n_permutations", "seed", "min_p"}.
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
        return {"p": hits / n_splits, "method": "exact", "n_permutations": n_splits, "seed": None,
                "min_p": (2 if m == total - m else 1) / n_splits}
    rng = np.random.default_rng(seed)
    perms = rng.permuted(np.tile(pooled, (n_resamples, 1)), axis=1)
    diff = perms[:, :m].mean(axis=1) - perms[:, m:].mean(axis=1)
    hits = int((np.abs(diff) >= observed - tolerance).sum())
    return {"p": (1 + hits) / (1 + n_resamples), "method": "monte-carlo", "n_permutations": n_resamples,
            "seed": seed, "min_p": 1 / (1 + n_resamples)}


def trend_test(x: Sequence[float], rates: Sequence[float], n_resamples: int = 100_000, seed: int = 0) -> dict:
    """Two-sided permutation test of the least-squares slope of per-seed success `rates` on the setting `x`
    (one entry per training run; pass log10 of a log-spaced setting to get a slope per decade).

    Null: success does not depend on the setting, so the runs' rates are exchangeable across their x values.
    p = fraction of reassignments with |slope| >= the observed |slope| (the observed one counts): every
    permutation when there are at most EXACT_PERMUTATION_LIMIT of them, else `n_resamples` seeded random ones with
    p = (1 + hits) / (1 + n_resamples). Needs two or more distinct x values. `min_p`: the smallest p any data can
    give, prod(k_j!) / N! for k_j runs at the j-th distinct x (runs tied in x swap without changing the slope).
    Returns {"slope", "p", "method", "n_permutations", "seed", "n_runs", "min_p"}.
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
    if math.factorial(y.size) <= EXACT_PERMUTATION_LIMIT:
        perms = np.array(list(itertools.permutations(y)))
        p = float(np.mean(np.abs(perms @ weights) >= observed - 1e-12 * max(1.0, observed)))

        # the steepest generic data (distinct values sorted along x) is matched only by the reassignments that
        # swap runs tied in x: prod(k_j!) of the N! reassignments
        ties = math.prod(math.factorial(int(k)) for k in np.unique(x, return_counts=True)[1])
        return {"slope": float(weights @ y), "p": p, "method": "exact", "n_permutations": len(perms),
                "seed": None, "n_runs": int(y.size), "min_p": ties / len(perms)}
    rng = np.random.default_rng(seed)
    shuffled = rng.permuted(np.tile(y, (n_resamples, 1)), axis=1)
    hits = int((np.abs(shuffled @ weights) >= observed - 1e-12 * max(1.0, observed)).sum())
    return {"slope": float(weights @ y), "p": (1 + hits) / (1 + n_resamples), "method": "monte-carlo",
            "n_permutations": n_resamples, "seed": seed, "n_runs": int(y.size), "min_p": 1 / (1 + n_resamples)}


def trend_label(trend: dict) -> str:
    """A trend's slope: "-5.3 pp per decade" (x = log10 of the setting) or "per unit"; in percentage points for
    success and normalized return, in the return's own units ("+12.5 per decade") for return."""
    per = "decade" if trend["x"].startswith("log10(") else "unit"
    if trend.get("metric", "success") == "return":
        return f"{trend['slope']:+.4g} per {per}"
    return f"{100 * trend['slope']:+.1f} pp per {per}"


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


def paired_episode_test(baseline: Sequence[Sequence[float]], group: Sequence[Sequence[float]],
                        n_resamples: int = 100_000, seed: int = 0) -> dict:
    """Two-sided sign-flip test over episode seeds; every run must list its episodes in the same seed order.

    For episode seed e, d_e = mean over the group's runs of value(e) - mean over the baseline's runs of value(e)
    (success 0/1, or a return). Null: for each episode seed the two groups are exchangeable, so d_e is symmetric
    about 0 and its sign is a fair coin independent across seeds. Statistic T = sum_e d_e; p = P(|T'| >= |T|)
    under the sign-flip distribution. For successes it is computed exactly (d_e * m * n is an integer for m
    baseline and n group runs), and with one run per group it is exactly the two-sided exact McNemar test on the
    discordant pairs. For real values it enumerates all 2^E flips up to EXACT_SIGN_FLIP_EPISODES episodes, else
    draws `n_resamples` seeded ones (p = (1 + hits) / (1 + n_resamples)). Pairing on the episode seed removes the
    variance of the initial states both groups share; the test is conditional on these trained runs (episode
    seeds are the unit), so it speaks about these runs, not about new training seeds -- `permutation_test` over
    training seeds is the one that does. `min_p`: the smallest p these d_e's magnitudes allow (every sign the
    same), 1 / (1 + n_resamples) for Monte Carlo.
    Returns {"p", "n_episodes", "n_discordant" (episode seeds with d_e != 0), "mean_diff", "method", "min_p"}.
    """
    base = np.asarray(baseline, dtype=float)
    grp = np.asarray(group, dtype=float)
    if base.ndim != 2 or grp.ndim != 2 or base.shape[1] != grp.shape[1] or base.shape[1] == 0:
        raise ValueError("paired test needs the same episodes (seeds) for every run of both groups")
    m, n = base.shape[0], grp.shape[0]
    episodes = int(base.shape[1])
    if np.isin(base, (0.0, 1.0)).all() and np.isin(grp, (0.0, 1.0)).all():
        # d_e * m * n = m * (group successes at e) - n * (baseline successes at e): an integer, so the test is exact
        scaled = np.rint(m * grp.sum(axis=0) - n * base.sum(axis=0)).astype(np.int64)
        support, prob = sign_flip_distribution(scaled)
        observed = abs(int(scaled.sum()))
        p = float(prob[np.abs(support) >= observed].sum())
        return {"p": min(1.0, p), "n_episodes": episodes, "n_discordant": int((scaled != 0).sum()),
                "mean_diff": float(scaled.sum() / (m * n * episodes)),
                "method": "exact sign-flip test over episode seeds on per-seed mean differences",
                "min_p": min(1.0, float(prob[np.abs(support) >= np.abs(scaled).sum()].sum()))}
    d = grp.mean(axis=0) - base.mean(axis=0)
    observed = abs(float(d.sum()))
    tolerance = 1e-12 * max(1.0, float(np.abs(d).sum()))
    out = {"n_episodes": episodes, "n_discordant": int((d != 0).sum()), "mean_diff": float(d.mean())}
    if episodes <= EXACT_SIGN_FLIP_EPISODES:
        signs = 1 - 2 * ((np.arange(2 ** episodes)[:, None] >> np.arange(episodes)) & 1)
        totals = np.abs(signs @ d)
        return {**out, "p": float(np.mean(totals >= observed - tolerance)),
                "method": "exact sign-flip test over episode seeds (all 2^E flips) on per-seed mean differences",
                "min_p": float(np.mean(totals >= float(np.abs(d).sum()) - tolerance))}
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(n_resamples, episodes))
    hits = int((np.abs(signs @ d) >= observed - tolerance).sum())
    return {**out, "p": (1 + hits) / (1 + n_resamples), "min_p": 1 / (1 + n_resamples),
            "method": f"sign-flip test over episode seeds, {n_resamples} seeded random flips (seed {seed})"}


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b and c discordant pairs: min(1, 2 P(X <= min(b, c))), X ~ Bin(b+c, 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def mean_interval(values: Sequence[float], level: float = 0.95) -> dict:
    """Mean of values taken as independent draws, with its t interval: mean +- t_{(1+level)/2, n-1} sd / sqrt(n)
    (None with fewer than two values). Returns {"mean", "ci"}."""
    arr = np.asarray(values, dtype=float)
    mean = float(arr.mean())
    if arr.size < 2:
        return {"mean": mean, "ci": None}
    half = t_quantile((1 + level) / 2, arr.size - 1) * float(arr.std(ddof=1)) / math.sqrt(arr.size)
    return {"mean": mean, "ci": [mean - half, mean + half]}


def mean_sd(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1; None with fewer than two values)."""
    if len(values) == 0:
        return None, None
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), (float(arr.std(ddof=1)) if arr.size > 1 else None)
