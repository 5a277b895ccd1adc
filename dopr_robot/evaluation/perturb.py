"""Perturbation stress for closed-loop evaluation: action noise, observation noise, one push on the object.

Units (so that a level means the same thing for every run, whatever its dataset):
- `action_noise` S: i.i.d. Gaussian N(0, S^2) added to every executed action, in the environment's raw action
  units (robosuite's controller input, [-1, 1] per dimension; robosuite clips what leaves that box).
- `obs_noise` S: i.i.d. Gaussian N(0, S^2) in the policy's *normalized* observation units (its [-1, 1] range
  scaling), i.e. raw noise S / scale per dimension, added to each observation as it enters the policy's
  observation window. The environment and the recorded observations are untouched.
- `push` P: with probability P per episode, one push on the task object (Lift's cube, Can's can, Square's nut)
  at a control step drawn uniformly from [1, max(1, max_steps // 4)] (the approach and grasp phase, where a
  knock matters; an episode that ends earlier is not pushed). The push is a velocity kick: `push_magnitude` F
  m/s is added to the object's linear velocity in a uniformly random horizontal direction, just before that
  step's action is executed. A kick, unlike a force, means the same whatever the object's mass and the
  simulator's substeps.
- Gymnasium environments (`envs.gymnasium_env`): actions and their noise are in the action space's units (clipped
  to its bounds); the push acts on the torso as a force over a few steps whose impulse is the same velocity
  change for the whole robot (`GymnasiumEnv.push_object`).

Every draw comes from the episode's seed through its own generator per perturbation kind, separate from the
environment's reset stream and the policy's sampling noise. So all-zero levels reproduce the unperturbed
episode exactly, the same seed gives the same perturbed episode in any worker, and the draws of one kind do
not change when another kind's level changes (common random numbers across a perturbation sweep).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from dopr_robot.errors import UserError

# Stream ids mixed with the episode seed: np.random.default_rng([seed, STREAM]).
_ACTION_STREAM, _OBS_STREAM, _PUSH_STREAM = 1, 2, 3


@dataclass(frozen=True)
class Perturbation:
    action_noise: float = 0.0
    obs_noise: float = 0.0
    push: float = 0.0
    push_magnitude: float = 0.5

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
                raise UserError(f"perturbation {name} must be a finite number >= 0; got {value!r}")
        if self.push > 1:
            raise UserError(f"perturbation push is a probability in [0, 1]; got {self.push!r}")

    @property
    def active(self) -> bool:
        return bool(self.action_noise or self.obs_noise or (self.push and self.push_magnitude))

    def report(self) -> dict[str, float]:
        """What the report records: every level, zeros when off (push_magnitude is 0 when no push can happen)."""
        return {"action_noise": float(self.action_noise), "obs_noise": float(self.obs_noise),
                "push": float(self.push), "push_magnitude": float(self.push_magnitude) if self.push else 0.0}


class EpisodePerturber:
    """The perturbations of one episode, drawn from its seed (see the module docstring)."""

    def __init__(self, perturbation: Perturbation, seed: int, max_steps: int, action_dim: int,
                 obs_scale: np.ndarray):
        self.p = perturbation
        self._action_rng = np.random.default_rng([seed, _ACTION_STREAM])
        self._obs_rng = np.random.default_rng([seed, _OBS_STREAM])
        push_rng = np.random.default_rng([seed, _PUSH_STREAM])
        # Drawn whatever the levels, so one episode's push step and direction do not depend on P.
        happens = push_rng.random() < perturbation.push
        step = int(push_rng.integers(1, max(1, max_steps // 4) + 1))
        angle = push_rng.uniform(0.0, 2 * np.pi)
        self.push_step = step if happens and perturbation.push_magnitude > 0 else None
        self.push_velocity = perturbation.push_magnitude * np.array([np.cos(angle), np.sin(angle), 0.0])
        self._action_dim = action_dim
        self._obs_raw_std = perturbation.obs_noise / np.asarray(obs_scale, dtype=np.float64)

    def action(self, action: np.ndarray) -> np.ndarray:
        if not self.p.action_noise:
            return action
        return action + self.p.action_noise * self._action_rng.standard_normal(self._action_dim)

    def observation(self, flat_obs: np.ndarray) -> np.ndarray:
        if not self.p.obs_noise:
            return flat_obs
        noise = self._obs_raw_std * self._obs_rng.standard_normal(flat_obs.shape[0])
        return (flat_obs + noise).astype(np.float32)
