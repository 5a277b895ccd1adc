"""Comparison statistics against cases with a known answer (textbook values, closed forms, brute force)."""

import itertools
import math

import numpy as np
import pytest

from dopr_robot import stats
from dopr_robot.stats import (binomial_variance_floor, hierarchical_bootstrap_diff, mcnemar_exact,
                              paired_episode_test, permutation_test, seed_t_interval, trend_test, wilson_interval)


@pytest.mark.parametrize("successes, n, lo, hi", [
    # Newcombe (1998), Stat. Med. 17:857, Table I, method 3 (Wilson score without continuity correction)
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 10, 0.0, 0.2775),
    (1, 29, 0.0061, 0.1718),
])
def test_wilson_matches_newcombe_table(successes, n, lo, hi):
    got = wilson_interval(successes, n)
    assert got == pytest.approx((lo, hi), abs=5e-5)


def test_wilson_edges_are_exact():
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    # at 0 successes the upper bound has the closed form z^2 / (n + z^2)
    z2 = 1.959963984540054 ** 2
    assert wilson_interval(0, 20)[1] == pytest.approx(z2 / (20 + z2), rel=1e-12)


def test_permutation_perfectly_separated_five_seeds_is_2_over_252():
    result = permutation_test([0.1, 0.2, 0.15, 0.3, 0.25], [0.6, 0.7, 0.65, 0.9, 0.8])
    assert result["method"] == "exact" and result["n_permutations"] == math.comb(10, 5) == 252
    assert result["p"] == pytest.approx(2 / 252)


def test_permutation_identical_groups_is_one_and_matches_scipy_exact():
    assert permutation_test([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])["p"] == 1.0
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    x, y = rng.uniform(0.2, 0.6, 6), rng.uniform(0.3, 0.8, 5)
    ours = permutation_test(x, y)["p"]
    # our two-sided p is P(|T| >= |t|); scipy's "two-sided" doubles a one-sided tail instead, so ask it for |T|
    ref = scipy_stats.permutation_test((y, x), lambda a, b: abs(a.mean() - b.mean()),
                                       permutation_type="independent", n_resamples=np.inf,
                                       alternative="greater").pvalue
    assert ours == pytest.approx(ref, rel=1e-9)


def test_permutation_falls_back_to_seeded_monte_carlo():
    # 12 vs 12 seeds: C(24, 12) = 2.7M splits > the exact limit. Perfect separation: no random split is as
    # extreme as the observed one (probability 2 / 2.7M per draw), so p = (1 + 0) / (1 + R).
    x, y = np.linspace(0.0, 0.3, 12), np.linspace(0.6, 0.9, 12)
    a = permutation_test(x, y, n_resamples=20_000, seed=5)
    b = permutation_test(x, y, n_resamples=20_000, seed=5)
    assert a["method"] == "monte-carlo" and a["n_permutations"] == 20_000 and a["seed"] == 5
    assert a["p"] == b["p"] == pytest.approx(1 / 20_001)


@pytest.mark.parametrize("b, c, p", [(0, 5, 0.0625), (1, 9, 2 * 11 / 1024), (3, 3, 1.0), (0, 0, 1.0)])
def test_mcnemar_exact_known_values(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p)


def test_paired_test_with_one_run_per_group_is_exact_mcnemar():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(20):
        base, grp = rng.integers(0, 2, 30), rng.integers(0, 2, 30)
        b = int(((base == 1) & (grp == 0)).sum())
        c = int(((base == 0) & (grp == 1)).sum())
        result = paired_episode_test([base], [grp])
        assert result["n_discordant"] == b + c
        assert result["p"] == pytest.approx(mcnemar_exact(b, c), rel=1e-12)
        if b + c:
            assert result["p"] == pytest.approx(scipy_stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


def test_paired_test_matches_brute_force_sign_flips_with_several_runs():
    rng = np.random.default_rng(1)
    base, grp = rng.integers(0, 2, (3, 9)), rng.integers(0, 2, (2, 9))
    d = grp.mean(axis=0) - base.mean(axis=0)
    observed = abs(d.sum())
    flips = np.array(list(itertools.product([-1, 1], repeat=9)))
    brute = np.mean(np.abs(flips @ d) >= observed - 1e-12)
    assert paired_episode_test(base, grp)["p"] == pytest.approx(brute, rel=1e-12)
    with pytest.raises(ValueError):
        paired_episode_test([[1, 0, 1]], [[1, 0]])


def _synthetic_group(rng, seeds, episodes, rate, seed_sd=0.1):
    """Training seeds whose success rates scatter around `rate`; episodes are Bernoulli at the seed's rate."""
    return [rng.binomial(1, q, episodes) for q in np.clip(rng.normal(rate, seed_sd, seeds), 0, 1)]


def test_bootstrap_is_seeded_and_covers_a_known_difference():
    rng = np.random.default_rng(7)
    base, grp = _synthetic_group(rng, 5, 50, 0.4), _synthetic_group(rng, 5, 50, 0.6)
    a = hierarchical_bootstrap_diff(base, grp, n_boot=2000, seed=11)
    assert a == hierarchical_bootstrap_diff(base, grp, n_boot=2000, seed=11)
    assert a["ci"] != hierarchical_bootstrap_diff(base, grp, n_boot=2000, seed=12)["ci"]
    assert a["diff"] == pytest.approx(np.mean([r.mean() for r in grp]) - np.mean([r.mean() for r in base]))
    assert a["ci"][0] < a["diff"] < a["ci"][1]
    # frequentist check: over repeated synthetic experiments the 95% interval covers the true 0.2 most times
    covered, widths = 0, {}
    for size in [(5, 50), (10, 200)]:
        w = []
        for k in range(60):
            r = hierarchical_bootstrap_diff(_synthetic_group(rng, *size, 0.4), _synthetic_group(rng, *size, 0.6),
                                            n_boot=1000, seed=k)
            covered += r["ci"][0] <= 0.2 <= r["ci"][1]
            w.append(r["ci"][1] - r["ci"][0])
        widths[size] = np.mean(w)
    assert covered / 120 >= 0.85
    assert widths[(10, 200)] < 0.75 * widths[(5, 50)]  # more seeds and episodes -> a narrower interval


def test_bootstrap_without_any_variance_is_a_point():
    result = hierarchical_bootstrap_diff([[1, 1, 1]] * 3, [[0, 0, 0]] * 4, n_boot=100)
    assert result["diff"] == -1.0 and result["ci"] == [-1.0, -1.0]


def test_trend_of_a_perfect_line_over_three_runs_is_2_over_6():
    """Of the 3! reassignments only the line itself and its mirror reach |slope| 1."""
    result = trend_test([0, 1, 2], [0.0, 1.0, 2.0])
    assert result["slope"] == pytest.approx(1.0)
    assert result["p"] == pytest.approx(2 / 6) and result["method"] == "exact" and result["n_permutations"] == 6


def test_trend_matches_brute_force_and_a_flat_curve_is_p_one():
    x = [-1, -1, 0, 0, 0, 1, 1]
    y = [0.6, 0.5, 0.45, 0.4, 0.5, 0.3, 0.35]
    slopes = [np.polyfit(x, perm, 1)[0] for perm in itertools.permutations(y)]
    observed = np.polyfit(x, y, 1)[0]
    result = trend_test(x, y)
    assert result["slope"] == pytest.approx(observed)
    assert result["p"] == pytest.approx(np.mean(np.abs(slopes) >= abs(observed) - 1e-12))
    assert result["p"] < 0.05
    assert trend_test(x, [0.4] * 7)["p"] == 1.0


def test_trend_with_many_runs_is_a_seeded_monte_carlo():
    x = np.repeat(np.log10([0.1, 1, 10, 100]), 3)  # 12 runs: 12! reassignments, too many to enumerate
    y = np.array([0.6, 0.55, 0.62, 0.5, 0.48, 0.52, 0.4, 0.42, 0.38, 0.3, 0.33, 0.28])
    a, b = trend_test(x, y, n_resamples=20_000, seed=3), trend_test(x, y, n_resamples=20_000, seed=3)
    assert a == b and a["method"] == "monte-carlo" and a["n_permutations"] == 20_000
    assert a["slope"] == pytest.approx(np.polyfit(x, y, 1)[0])
    # a perfectly ordered decline: only reassignments with the same slope magnitude count
    assert a["p"] < 1e-3
    with pytest.raises(ValueError, match="two or more distinct"):
        trend_test([1, 1, 1], [0.1, 0.2, 0.3])


def test_seed_t_interval_is_welchs_t_interval():
    """Against scipy's Welch test (ttest_ind(equal_var=False).confidence_interval) on per-seed rates. Mutants
    caught: a pooled-variance (Student) interval, a z quantile instead of t, or df = m + n - 2."""
    scipy_stats = pytest.importorskip("scipy.stats")
    base, group = [0.5, 0.58, 0.48, 0.3, 0.42], [0.66, 0.7, 0.62]
    ours = seed_t_interval(base, group)
    ref = scipy_stats.ttest_ind(group, base, equal_var=False).confidence_interval(0.95)
    assert ours["ci"] == pytest.approx([ref.low, ref.high], rel=1e-9)
    assert ours["diff"] == pytest.approx(np.mean(group) - np.mean(base))
    assert seed_t_interval([0.5], group)["ci"] is None  # one seed has no variance to estimate


def test_binomial_variance_floor_raises_a_too_small_sample_variance_only():
    """Var(seed rate) >= q (1 - q) / n. Identical per-seed rates (sample variance 0) get the floor; a larger
    sample variance is kept. Mutant caught: a floor of q(1-q) without / n, or the floor added instead of max'ed."""
    scipy_stats = pytest.importorskip("scipy.stats")
    assert binomial_variance_floor([0.4, 0.4, 0.4], [10, 10, 10]) == pytest.approx(0.024)
    assert binomial_variance_floor([0.2, 0.6], [10, 40]) == pytest.approx(0.4 * 0.6 * (0.1 + 0.025) / 2)
    floor = (0.024, 0.021)
    point = seed_t_interval([0.4] * 3, [0.7] * 3, variance_floor=floor)
    v = (0.024 / 3, 0.021 / 3)
    df = sum(v) ** 2 / ((v[0] ** 2 + v[1] ** 2) / 2)
    half = scipy_stats.t.ppf(0.975, df) * math.sqrt(sum(v))
    assert point["ci"] == pytest.approx([0.3 - half, 0.3 + half]) and point["df"] == pytest.approx(df)
    wide = [0.2, 0.5, 0.8]  # sample variance 0.09 > floor: unchanged by it
    assert seed_t_interval(wide, [0.7] * 3, variance_floor=(0.024, 0.0))["ci"] == pytest.approx(
        seed_t_interval(wide, [0.7] * 3)["ci"])


@pytest.mark.parametrize("m, n, expected", [(3, 3, 2 / 20), (5, 5, 2 / 252), (3, 5, 1 / 56), (2, 3, 1 / 10)])
def test_smallest_attainable_permutation_p(m, n, expected):
    """min_p is the p of perfectly separated groups with distinct values: 3 vs 3 seeds cannot go below 0.10."""
    separated = permutation_test(np.arange(m), np.arange(m, m + n) + 0.5)
    assert separated["min_p"] == pytest.approx(expected) and separated["p"] == pytest.approx(expected)
    assert permutation_test([0.1] * m, [0.2] * n)["min_p"] == pytest.approx(expected)


def test_trend_and_paired_min_p_match_brute_force():
    x = [0, 0, 1, 1, 2]  # ties in x: runs at one value swap without changing the slope
    best = min(trend_test(x, list(perm))["p"] for perm in itertools.permutations([0.1, 0.2, 0.3, 0.5, 0.8]))
    assert trend_test(x, [0.4, 0.1, 0.3, 0.3, 0.2])["min_p"] == pytest.approx(best)
    # paired, one run per group: d_e in {-1, 0, 1}; 4 discordant episodes -> at best 2 / 2^4
    result = paired_episode_test([[1, 0, 0, 1, 1, 0]], [[0, 1, 1, 1, 1, 1]])
    assert result["n_discordant"] == 4 and result["min_p"] == pytest.approx(2 / 16)


def test_paired_test_on_returns_is_exact_up_to_20_episodes_then_seeded_monte_carlo():
    """Real-valued per-episode returns: all 2^E sign flips of d_e for E <= 20 (brute force here), a seeded Monte
    Carlo above. Mutant caught: rounding real d_e to integers (the success path) would make d = 0.4 and 0.6
    ties."""
    rng = np.random.default_rng(4)
    base, grp = rng.normal(100, 20, (2, 10)), rng.normal(110, 20, (3, 10))
    d = grp.mean(axis=0) - base.mean(axis=0)
    flips = np.array(list(itertools.product([-1, 1], repeat=10)))
    brute = np.mean(np.abs(flips @ d) >= abs(d.sum()) - 1e-9)
    result = paired_episode_test(base, grp)
    assert result["p"] == pytest.approx(brute, rel=1e-12) and "all 2^E" in result["method"]
    assert result["min_p"] == pytest.approx(2 / 1024)
    assert paired_episode_test([[0.4, 0.0]], [[1.0, 0.0]])["p"] == pytest.approx(1.0)  # d = (0.6, 0): p = 1
    big_base, big_grp = rng.normal(100, 20, (2, 40)), rng.normal(130, 20, (2, 40))
    a = paired_episode_test(big_base, big_grp, n_resamples=5000, seed=3)
    assert a == paired_episode_test(big_base, big_grp, n_resamples=5000, seed=3)
    assert "5000 seeded random flips" in a["method"] and a["min_p"] == pytest.approx(1 / 5001)
    assert a["p"] == pytest.approx(1 / 5001)  # a 30-point shift over 40 episodes: no random flip is as extreme


def test_bootstrap_on_returns_resamples_episodes_within_seeds():
    """Real values take the episode-resampling path: seeded, centred on the observed difference, and a group
    whose every episode has the same return has no within-seed spread (mutant caught: a binomial draw on
    non-0/1 values, which fails or draws counts)."""
    base = [[10.0, 12.0, 14.0], [11.0, 13.0, 15.0]]
    grp = [[20.0, 20.0, 20.0], [20.0, 20.0, 20.0]]
    a = hierarchical_bootstrap_diff(base, grp, n_boot=400, seed=2)
    assert a == hierarchical_bootstrap_diff(base, grp, n_boot=400, seed=2)
    assert a["diff"] == pytest.approx(20.0 - 12.5)
    lo, hi = a["ci"]
    assert 20 - 15 <= lo < 7.5 < hi <= 20 - 10  # bounded by the most and least any resample can give
    assert hierarchical_bootstrap_diff(grp, grp, n_boot=50)["ci"] == [0.0, 0.0]
    # seeds with equal means but spread-out episodes: only the within-seed stage gives the interval its width
    # (mutant caught: stage 2 left out for real values, which would give [0, 0] here)
    spread = hierarchical_bootstrap_diff([[0.0, 20.0], [20.0, 0.0]], [[10.0, 10.0]] * 2, n_boot=400, seed=1)["ci"]
    assert spread[0] < 0 < spread[1]


def test_mean_interval_is_the_one_sample_t_interval():
    scipy_stats = pytest.importorskip("scipy.stats")
    values = [3.0, 5.0, 4.0, 8.0]
    ref = scipy_stats.ttest_1samp(values, 0.0).confidence_interval(0.95)
    assert stats.mean_interval(values)["ci"] == pytest.approx([ref.low, ref.high])
    assert stats.mean_interval([2.0]) == {"mean": 2.0, "ci": None}
