"""Diagnostics of a run. Test-time feedback: drift of closed-loop observations away from the demonstrations,
demo/rollout distribution shift, and open-loop chunk error beside closed-loop success (`dopr-robot diagnose`).
AP: each preconditioned layer's input spectrum against the damping (`dopr-robot spectrum`, spectrum.py)."""

from dopr_robot.diagnostics.drift import demo_band, departure_step, drift_curve, nearest_distances
from dopr_robot.diagnostics.openloop import open_loop_chunk_mse
from dopr_robot.diagnostics.report import diagnose
from dopr_robot.diagnostics.shift import covariance_shift, distribution_shift, fit_gaussian, gaussian_kl

__all__ = ["covariance_shift", "demo_band", "departure_step", "diagnose", "distribution_shift", "drift_curve",
           "fit_gaussian", "gaussian_kl", "nearest_distances", "open_loop_chunk_mse"]
