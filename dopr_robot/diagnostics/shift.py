"""Distribution shift between demo and rollout observations, from Gaussians fitted to each set.

Fit P = N(mu_r, S_r) to the rollout observations and Q = N(mu_d, S_d) to the training-demo observations (sample
mean, sample covariance with ddof=1), each with a ridge: S + ridge * I. The ridge keeps near-constant dimensions
(an object resting on the table in every demo) from making S singular and the KL infinite: a deviation of
sqrt(ridge) along such a dimension counts as one standard deviation.

    kl_gaussian = KL(P || Q) = 1/2 [ tr(S_d^-1 S_r) + (mu_d - mu_r)^T S_d^-1 (mu_d - mu_r) - k
                                     + ln det S_d - ln det S_r ]
        how surprising the rollout states are under the demo distribution (0 iff the Gaussians agree).
    cov_shift = ||S_r - S_d||_F / ||S_d||_F
        relative change of the covariance alone (0 = same spread and correlations; 1 = as large as S_d).
    cov_logdet_ratio = ln det S_r - ln det S_d
        log volume ratio: > 0 when the rollouts spread over more volume than the demos, < 0 when less.
"""

from __future__ import annotations

import numpy as np

DEFAULT_RIDGE = 1e-3


def fit_gaussian(x: np.ndarray, ridge: float = DEFAULT_RIDGE) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D) + ridge * I) of the rows of x (N, D), N >= 2, in float64."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need at least 2 rows of (N, D) data to fit a Gaussian, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False, ddof=1).reshape(x.shape[1], x.shape[1]) + ridge * np.eye(x.shape[1])


def gaussian_kl(mean_p: np.ndarray, cov_p: np.ndarray, mean_q: np.ndarray, cov_q: np.ndarray) -> float:
    """KL(N(mean_p, cov_p) || N(mean_q, cov_q)) in nats; both covariances symmetric positive definite."""
    k = mean_p.shape[0]
    chol_q = np.linalg.cholesky(cov_q)

    def solve(b: np.ndarray) -> np.ndarray:  # cov_q^-1 b through the Cholesky factor (stable, no inverse)
        return np.linalg.solve(chol_q.T, np.linalg.solve(chol_q, b))

    diff = mean_q - mean_p
    trace = float(np.trace(solve(cov_p)))
    mahalanobis = float(diff @ solve(diff))
    logdet_q = 2.0 * float(np.sum(np.log(np.diag(chol_q))))
    logdet_p = float(np.linalg.slogdet(cov_p)[1])
    return max(0.0, 0.5 * (trace + mahalanobis - k + logdet_q - logdet_p))  # clamp float round-off below 0


def covariance_shift(cov_p: np.ndarray, cov_q: np.ndarray) -> tuple[float, float]:
    """(||cov_p - cov_q||_F / ||cov_q||_F, ln det cov_p - ln det cov_q)."""
    frobenius = float(np.linalg.norm(cov_p - cov_q) / np.linalg.norm(cov_q))
    logdet = float(np.linalg.slogdet(cov_p)[1] - np.linalg.slogdet(cov_q)[1])
    return frobenius, logdet


def distribution_shift(rollout_obs: np.ndarray, demo_obs: np.ndarray, ridge: float = DEFAULT_RIDGE) -> dict:
    """kl_gaussian = KL(rollouts || demos), cov_shift and cov_logdet_ratio (see the module docstring)."""
    mean_r, cov_r = fit_gaussian(rollout_obs, ridge)
    mean_d, cov_d = fit_gaussian(demo_obs, ridge)
    frobenius, logdet = covariance_shift(cov_r, cov_d)
    return {"kl_gaussian": gaussian_kl(mean_r, cov_r, mean_d, cov_d), "cov_shift": frobenius,
            "cov_logdet_ratio": logdet, "shift_ridge": ridge}
