"""Scripted experts: state machines over ground-truth object poses that output OSC delta actions.

Actions follow robosuite 1.5's default composite controller for Panda: 7-D, [dx, dy, dz] in units of 5 cm,
[drx, dry, drz] in units of 0.5 rad, gripper -1 open / +1 close.
The experts are deterministic functions of the observation history, so their demonstrations are learnable
by a policy that sees the same observations.
"""

from __future__ import annotations

import numpy as np

POS_GAIN = 10.0  # action per metre of position error (1.0 action = 5 cm target offset per step)
OPEN, CLOSE = -1.0, 1.0


def _move_toward(target: np.ndarray, eef: np.ndarray, max_action: float = 1.0) -> np.ndarray:
    return np.clip(POS_GAIN * (target - eef), -max_action, max_action)


class LiftExpert:
    """Reach above the cube, descend, close the gripper, lift."""

    HOVER = 0.06  # metres above the cube before descending
    GRASP_STEPS = 12  # steps to hold still while the fingers close
    LIFT_TO = 0.15  # metres above the cube's resting height

    def __init__(self) -> None:
        self.phase = "reach"
        self.grasp_count = 0
        self.cube_rest_z: float | None = None

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        eef, cube = obs["robot0_eef_pos"], obs["cube_pos"]
        if self.cube_rest_z is None:
            self.cube_rest_z = float(cube[2])
        action = np.zeros(7)
        gripper = OPEN
        if self.phase == "reach":
            target = cube + [0.0, 0.0, self.HOVER]
            if np.linalg.norm((target - eef)[:2]) < 0.01 and abs(target[2] - eef[2]) < 0.02:
                self.phase = "descend"
        if self.phase == "descend":
            target = cube + [0.0, 0.0, -0.005]
            if np.linalg.norm(target - eef) < 0.01:
                self.phase = "grasp"
        if self.phase == "grasp":
            target, gripper = eef.copy(), CLOSE
            self.grasp_count += 1
            if self.grasp_count >= self.GRASP_STEPS:
                self.phase = "lift"
        if self.phase == "lift":
            target, gripper = cube.copy(), CLOSE
            target[2] = self.cube_rest_z + self.LIFT_TO
        action[:3] = _move_toward(target, eef)
        action[6] = gripper
        return action


EXPERTS = {"lift": LiftExpert}
