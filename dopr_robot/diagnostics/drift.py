"""Drift from the demonstrations: how far closed-loop observations wander from every training observation.

All distances are Euclidean, in whatever space the caller passes (the diagnose command passes observations
normalized as the policy sees them). For a query point q and a reference set R,

    nn(q, R) = min_{r in R} ||q - r||_2      (exact: brute force in chunks, float64)

The drift curve is nn(rollout observation at step t, training-demo observations), averaged over the episodes
still running at step t. The demos' own band is the spread of nn(demo observation, the OTHER demos): a point
of a held-in demo is never compared with its own demo, so the band is how far a fresh demonstration typically
lies from the rest (leave-one-demo-out). The departure step is the first step whose mean drift is above the
band's upper edge: from there the rollouts are, on average, further from the demos than a demo ever is.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

BLOCK_ENTRIES = 2 ** 24  # distances held at once (128 MB of float64), whatever the reference size


def nearest_distances(queries: np.ndarray, reference: np.ndarray, query_groups: np.ndarray | None = None,
                      reference_groups: np.ndarray | None = None) -> np.ndarray:
    """nn distance of each row of `queries` (N, D) to the rows of `reference` (M, D).

    With groups (integer labels per row), a query never matches a reference row of its own group (the
    leave-one-group-out distance); a query whose group holds every reference row gets +inf.
    """
    if queries.ndim != 2 or reference.ndim != 2 or queries.shape[1] != reference.shape[1]:
        raise ValueError(f"need (N, D) queries and (M, D) reference, got {queries.shape} and {reference.shape}")
    if (query_groups is None) != (reference_groups is None):
        raise ValueError("pass both query_groups and reference_groups, or neither")
    ref = torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float64))
    ref_groups = None if reference_groups is None else torch.from_numpy(np.asarray(reference_groups))
    out = np.empty(len(queries), dtype=np.float64)
    rows = max(1, BLOCK_ENTRIES // max(1, len(reference)))
    for start in range(0, len(queries), rows):
        stop = min(start + rows, len(queries))
        q = torch.from_numpy(np.ascontiguousarray(queries[start:stop], dtype=np.float64))
        # float64 keeps the matrix-product form of cdist accurate (no cancellation at the scales seen here)
        dist = torch.cdist(q, ref)
        if ref_groups is not None:
            own = torch.from_numpy(np.asarray(query_groups[start:stop]))[:, None] == ref_groups[None, :]
            dist = dist.masked_fill(own, float("inf"))
        out[start:stop] = dist.min(dim=1).values.numpy()
    return out


def drift_curve(distances: Sequence[np.ndarray], mask: Sequence[bool] | None = None) -> list[float | None]:
    """Mean over episodes of `distances[e][t]`, for t = 0 .. longest episode - 1, over the episodes that are
    still running at t (and selected by `mask`). Steps no selected episode reaches are None."""
    length = max((len(d) for d in distances), default=0)
    chosen = [d for d, keep in zip(distances, mask if mask is not None else [True] * len(distances)) if keep]
    curve: list[float | None] = []
    for t in range(length):
        alive = [d[t] for d in chosen if len(d) > t]
        curve.append(float(np.mean(alive)) if alive else None)
    return curve


def episodes_running(distances: Sequence[np.ndarray]) -> list[int]:
    """How many episodes contribute to each step of the drift curve."""
    length = max((len(d) for d in distances), default=0)
    return [sum(len(d) > t for d in distances) for t in range(length)]


def demo_band(demo_obs: Sequence[np.ndarray], percentiles: tuple[float, float] = (5.0, 95.0)
              ) -> tuple[float, float] | None:
    """Percentiles of the leave-one-demo-out nn distances of every demo observation (None with < 2 demos)."""
    if len(demo_obs) < 2:
        return None
    points = np.concatenate(demo_obs)
    groups = np.concatenate([np.full(len(d), i) for i, d in enumerate(demo_obs)])
    own = nearest_distances(points, points, groups, groups)
    lo, hi = np.percentile(own, percentiles)
    return float(lo), float(hi)


def departure_step(curve: Sequence[float | None], upper: float) -> int | None:
    """First step t with curve[t] > upper (None if the curve never leaves the band upward)."""
    for t, value in enumerate(curve):
        if value is not None and value > upper:
            return t
    return None
