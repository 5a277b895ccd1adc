"""Scripted experts: state machines over ground-truth object poses that output OSC delta actions.

Actions follow robosuite 1.5's default composite controller for Panda: 7-D, [dx, dy, dz] in units of 5 cm,
[drx, dry, drz] in units of 0.5 rad, gripper -1 open / +1 close.
The experts are deterministic functions of the observation history (plus the goal location the task fixes,
read from the environment `env` they are built with), so their demonstrations are learnable by a policy that
sees the same observations.
"""

from __future__ import annotations

import numpy as np

POS_GAIN = 10.0  # action per metre of position error (1.0 action = 5 cm target offset per step)
OPEN, CLOSE = -1.0, 1.0


def _yaw(quat_xyzw: np.ndarray) -> float:
    """Heading of the body x-axis in the world xy-plane, from a robosuite (x, y, z, w) quaternion."""
    x, y, z, w = quat_xyzw
    return float(np.arctan2(2 * (x * y + z * w), 1 - 2 * (y * y + z * z)))


def _wrap(angle: float, period: float) -> float:
    """`angle` wrapped to [-period / 2, period / 2): the smallest rotation for a shape with that symmetry."""
    return float((angle + period / 2) % period - period / 2)


def _move_toward(target: np.ndarray, eef: np.ndarray, max_action: float = 1.0) -> np.ndarray:
    return np.clip(POS_GAIN * (target - eef), -max_action, max_action)


class LiftExpert:
    """Reach above the cube, descend, close the gripper, lift."""

    HOVER = 0.06  # metres above the cube before descending
    GRASP_STEPS = 12  # steps to hold still while the fingers close
    LIFT_TO = 0.15  # metres above the cube's resting height

    def __init__(self, env) -> None:
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


class CanExpert:
    """PickPlaceCan: grasp the can from above, lift to a safe height, carry it over its bin, lower, release."""

    HOVER, SAFE_Z, RELEASE_Z = 0.08, 1.05, 0.93
    GRASP_STEPS, LOWER_TIMEOUT, DESCEND_TIMEOUT = 12, 40, 20

    def __init__(self, env) -> None:
        self.phase, self.count = "reach", 0
        # the can's bin cell; robosuite places it at target_bin_placements[object_id]
        self.goal = np.asarray(env.env.target_bin_placements[env.env.object_id])[:2]

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        eef, can = obs["robot0_eef_pos"], obs["Can_pos"]
        gripper = CLOSE
        if self.phase == "reach":
            target, gripper = can + [0.0, 0.0, self.HOVER], OPEN
            if np.linalg.norm((target - eef)[:2]) < 0.01 and abs(target[2] - eef[2]) < 0.02:
                self.phase = "descend"
        if self.phase == "descend":
            target, gripper = can.copy(), OPEN
            self.count += 1
            # a can by the bin wall can stop the fingers short of its centre: grasp where they stop
            if np.linalg.norm(target - eef) < 0.01 or (self.count >= self.DESCEND_TIMEOUT and eef[2] - can[2] < 0.02):
                self.phase, self.count = "grasp", 0
        if self.phase == "grasp":
            target = eef.copy()
            self.count += 1
            if self.count >= self.GRASP_STEPS:
                self.phase = "lift"
        if self.phase == "lift":
            target = np.array([eef[0], eef[1], self.SAFE_Z])
            if eef[2] > self.SAFE_Z - 0.03:
                self.phase = "carry"
        if self.phase == "carry":
            target = np.array([*self.goal, self.SAFE_Z])
            if np.linalg.norm((target - eef)[:2]) < 0.01:
                self.phase, self.count = "lower", 0
        if self.phase == "lower":
            target = np.array([*self.goal, self.RELEASE_Z])
            self.count += 1
            if abs(eef[2] - self.RELEASE_Z) < 0.015 or self.count >= self.LOWER_TIMEOUT:
                self.phase = "release"
        if self.phase == "release":
            target, gripper = np.array([*self.goal, self.RELEASE_Z]), OPEN
        action = np.zeros(7)
        action[:3] = _move_toward(target, eef)
        action[6] = gripper
        return action


class SquareExpert:
    """NutAssemblySquare: turn the gripper to the nut's handle, grasp the handle, lift, carry the nut's centre
    over the square peg while turning the nut square to the peg, lower it onto the peg, release, withdraw."""

    HANDLE = 0.054  # handle site offset along the nut's x-axis (robosuite's SquareNut)
    HOVER, SAFE_Z, SEATED_Z = 0.08, 1.02, 0.845
    YAW_GAIN = 2.0  # action per radian (1.0 action = 0.5 rad target offset per step)
    GRASP_STEPS, RELEASE_STEPS, INSERT_TIMEOUT = 12, 8, 60

    def __init__(self, env) -> None:
        self.phase, self.count = "reach", 0
        self.peg = np.asarray(env.env.sim.data.body_xpos[env.env.peg1_body_id])[:2].copy()

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        eef, nut = obs["robot0_eef_pos"], obs["SquareNut_pos"]
        nut_yaw, eef_yaw = _yaw(obs["SquareNut_quat"]), _yaw(obs["robot0_eef_quat"])
        handle = nut + self.HANDLE * np.array([np.cos(nut_yaw), np.sin(nut_yaw), 0.0])
        gripper, yaw_error = CLOSE, 0.0
        if self.phase == "reach":
            target, gripper = handle + [0.0, 0.0, self.HOVER], OPEN
            yaw_error = _wrap(nut_yaw - eef_yaw, np.pi)  # the fingers straddle the handle either way round
            if np.linalg.norm((target - eef)[:2]) < 0.01 and abs(target[2] - eef[2]) < 0.02 and abs(yaw_error) < 0.05:
                self.phase = "descend"
        if self.phase == "descend":
            target, gripper = handle.copy(), OPEN
            yaw_error = _wrap(nut_yaw - eef_yaw, np.pi)
            if np.linalg.norm(target - eef) < 0.008:
                self.phase, self.count = "grasp", 0
        if self.phase == "grasp":
            target = eef.copy()
            self.count += 1
            if self.count >= self.GRASP_STEPS:
                self.phase = "lift"
        if self.phase == "lift":
            target = np.array([eef[0], eef[1], self.SAFE_Z])
            if eef[2] > self.SAFE_Z - 0.03:
                self.phase = "carry"
        grip_offset = eef - nut  # where the gripper holds the nut, relative to its centre
        if self.phase == "carry":
            target = np.array([*(self.peg + grip_offset[:2]), self.SAFE_Z])
            yaw_error = _wrap(-nut_yaw, np.pi / 2)  # square nut on a square peg: any quarter turn fits
            if np.linalg.norm((target - eef)[:2]) < 0.004 and abs(yaw_error) < 0.03:
                self.phase, self.count = "insert", 0
        if self.phase == "insert":
            target = np.array([*(self.peg + grip_offset[:2]), self.SEATED_Z + grip_offset[2]])
            yaw_error = _wrap(-nut_yaw, np.pi / 2)
            self.count += 1
            if nut[2] < self.SEATED_Z + 0.01 or self.count >= self.INSERT_TIMEOUT:
                self.phase, self.count = "release", 0
        if self.phase == "release":
            target, gripper = eef.copy(), OPEN
            self.count += 1
            if self.count >= self.RELEASE_STEPS:
                self.phase = "withdraw"
        if self.phase == "withdraw":
            target, gripper = np.array([eef[0], eef[1], self.SAFE_Z]), OPEN
        action = np.zeros(7)
        action[:3] = _move_toward(target, eef)
        action[5] = np.clip(self.YAW_GAIN * yaw_error, -1.0, 1.0)
        action[6] = gripper
        return action


EXPERTS = {"lift": LiftExpert, "can": CanExpert, "square": SquareExpert}


class NoisyOperator:
    """Imperfect, "multi-operator"-like demonstrations from a scripted expert, at a noise `level` >= 0.

    Per episode (all draws from `rng`): an operator speed in [1 - 0.4 level, 1]; a detour through a random
    waypoint before the task starts (a suboptimal approach path). Per step: temporally correlated action noise
    (AR(1), std 0.3 level in action units) on the position dims, and hesitations (with probability 0.03 level a pause
    of 3-12 steps with the gripper held). level 0 is the expert itself.
    """

    def __init__(self, expert, level: float, rng: np.random.Generator, eef_start: np.ndarray):
        self.expert, self.level, self.rng = expert, level, rng
        self.speed = 1.0 - 0.4 * level * rng.random()
        offset = level * np.array([rng.uniform(-0.12, 0.12), rng.uniform(-0.12, 0.12), rng.uniform(0.0, 0.08)])
        self.waypoint = eef_start + offset if level > 0 else None
        self.detour_steps = 0
        self.noise = np.zeros(3)
        self.pause = 0
        self.last_gripper = OPEN

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        if self.waypoint is not None:
            self.detour_steps += 1
            if np.linalg.norm(self.waypoint - obs["robot0_eef_pos"]) < 0.02 or self.detour_steps > 30:
                self.waypoint = None
            else:
                action = np.zeros(7)
                action[:3] = _move_toward(self.waypoint, obs["robot0_eef_pos"])
                action[6] = OPEN
                return self._perturb(action)
        if self.pause > 0:
            self.pause -= 1
            return np.array([0, 0, 0, 0, 0, 0, self.last_gripper], dtype=float)
        if self.level > 0 and self.rng.random() < 0.03 * self.level:
            self.pause = int(self.rng.integers(3, 13))
        action = self.expert.act(obs)
        self.last_gripper = action[6]
        return self._perturb(action)

    def _perturb(self, action: np.ndarray) -> np.ndarray:
        if self.level == 0:
            return action
        self.noise = 0.8 * self.noise + 0.6 * 0.3 * self.level * self.rng.standard_normal(3)  # stationary std 0.3 level
        action = action.copy()
        action[:3] = np.clip(self.speed * action[:3] + self.noise, -1.0, 1.0)
        return action
