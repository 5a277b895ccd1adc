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


class _PoseCommand:
    """One arm's absolute command: a world position that moves toward its target at a bounded speed, a yaw about
    world z applied to the arm's top-down orientation, and the gripper."""

    SPEED = 0.02  # metres per control step (0.4 m/s at 20 Hz)

    def __init__(self, down: np.ndarray, pos: np.ndarray) -> None:
        self.down, self.pos, self.yaw, self.gripper = down, np.array(pos, dtype=np.float64), 0.0, OPEN

    def goto(self, target, eef: np.ndarray, tol: float = 0.01) -> bool:
        """Step the command toward `target`; True once the end effector is within `tol` of it."""
        target = np.asarray(target, dtype=np.float64)
        step = target - self.pos
        dist = np.linalg.norm(step)
        self.pos = target.copy() if dist < self.SPEED else self.pos + step / dist * self.SPEED
        return bool(np.linalg.norm(target - eef) < tol)

    def action(self) -> np.ndarray:
        from dopr_robot.envs.rotations import matrix_to_axis_angle

        c, s = np.cos(self.yaw), np.sin(self.yaw)
        turn = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
        return np.concatenate([self.pos, matrix_to_axis_angle(turn @ self.down), [self.gripper]])


def _rotation(quat_xyzw: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_quat(quat_xyzw).as_matrix()


class TransportExpert:
    """TwoArmTransport with two Pandas facing each other ("opposed"), in absolute world-frame poses (14-D:
    per arm position, axis-angle, gripper; the env_args of `default_env_args("transport")`).

    robot1 lifts the trash out of the target bin and drops it in the trash bin, then waits over the middle;
    robot0 lifts the start bin's lid by its handle and drops it beside the bin, grasps the hammer's handle off
    centre, turns it so that the handle points at robot1 (grasping the end that needs the smaller wrist turn),
    and holds it out over the gap; robot1 grasps the handle (near the head when the head points its way),
    robot0 opens and withdraws upward first (the head must not catch on its fingers), robot1 carries the hammer
    over the target bin and drops it. Grip sites close along their x axis.
    """

    # top-down grip orientations of the two arms at yaw 0 (their reset orientations)
    DOWN = (np.diag([-1.0, 1.0, -1.0]), np.diag([1.0, -1.0, -1.0]))
    HANDOVER = np.array([0.0, -0.05, 1.0])  # robot0's grip site while it holds the hammer out
    GRASP_STEPS, RELEASE_STEPS, REACH_TIMEOUT = 10, 20, 40

    def __init__(self, env) -> None:
        self.arms: list[_PoseCommand] | None = None
        self.phase = ["lid_above", "trash_above"]
        self.count = [0, 0]
        self.sign: float | None = None  # +1: the hammer's head ends up on robot1's side
        self.lid: np.ndarray | None = None  # where the lid's handle is grasped (fixed at the start)

    @staticmethod
    def _closing_yaw(arm_down: np.ndarray, direction) -> float:
        """The yaw (within +-pi/2) that lines the arm's closing axis up with +-direction."""
        base = np.arctan2(arm_down[1, 0], arm_down[0, 0])
        return float((np.arctan2(direction[1], direction[0]) - base + np.pi / 2) % np.pi - np.pi / 2)

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        eef = [np.asarray(obs["robot0_eef_pos"]), np.asarray(obs["robot1_eef_pos"])]
        if self.arms is None:
            self.arms = [_PoseCommand(self.DOWN[i], eef[i]) for i in range(2)]
        payload = np.asarray(obs["payload_pos"])
        axis = _rotation(obs["payload_quat"])[:, 2]  # the handle's axis, toward the head
        flat = axis[:2] / np.linalg.norm(axis[:2])
        if self.sign is None:  # robot0 grasps so that the handle end that turns least points at robot1
            turn = np.arctan2(flat[1], flat[0]) - np.pi / 2
            self.sign = 1.0 if abs((turn + np.pi) % (2 * np.pi) - np.pi) <= np.pi / 2 else -1.0
        axis, flat = self.sign * axis, self.sign * flat
        self._robot0(obs, eef[0], payload, flat)
        self._robot1(obs, eef, payload, axis, flat)
        return np.concatenate([arm.action() for arm in self.arms])

    def _robot0(self, obs, eef, payload, flat) -> None:
        arm, phase = self.arms[0], self.phase[0]
        if self.lid is None:
            self.lid = np.asarray(obs["lid_handle_pos"]) + [0.0, 0.0, 0.015]
        lid = self.lid
        grasp = np.array([*(payload[:2] - 0.05 * flat), payload[2]])
        if phase == "lid_above":
            arm.yaw = self._closing_yaw(arm.down, [1.0, 0.0])  # the handle is long along y
            phase = "lid_down" if arm.goto(lid + [0, 0, 0.11], eef) else phase
        elif phase == "lid_down":
            phase = "lid_grasp" if arm.goto(lid, eef, 0.008) else phase
        elif phase in ("lid_grasp", "payload_grasp"):
            arm.gripper = CLOSE
            self.count[0] += 1
            if self.count[0] > self.GRASP_STEPS:
                phase, self.count[0] = ("lid_up" if phase == "lid_grasp" else "payload_up"), 0
        elif phase == "lid_up":
            phase = "lid_away" if arm.goto([lid[0], lid[1], 1.10], eef, 0.02) else phase
        elif phase == "lid_away":
            phase = "lid_drop" if arm.goto([lid[0] - 0.35, lid[1], 1.05], eef, 0.02) else phase
        elif phase == "lid_drop":
            arm.gripper = OPEN
            self.count[0] += 1
            if self.count[0] > 8:
                phase, self.count[0] = "payload_above", 0
        elif phase == "payload_above":
            # the yaw that points the handle at +y once the wrist is back at yaw 0 (the handover pose)
            arm.yaw = float((np.arctan2(flat[1], flat[0]) - np.pi / 2 + np.pi) % (2 * np.pi) - np.pi)
            phase = "payload_down" if arm.goto(grasp + [0, 0, 0.174], eef) else phase
        elif phase == "payload_down":
            phase = "payload_grasp" if arm.goto(grasp, eef, 0.008) else phase
        elif phase == "payload_up":
            phase = "payload_turn" if arm.goto([eef[0], eef[1], 1.10], eef, 0.02) else phase
        elif phase == "payload_turn":
            arm.yaw -= float(np.clip(arm.yaw, -0.05, 0.05))
            there = arm.goto([0.0, -0.2, 1.05], eef, 0.02)
            phase = "handover" if there and arm.yaw == 0.0 else phase
        elif phase == "handover":
            arm.goto(self.HANDOVER, eef, 0.02)
            if self.phase[1] == "taken":
                phase, self.count[0] = "release", 0
        elif phase == "release":
            arm.gripper = OPEN
            self.count[0] += 1
            if self.count[0] > self.RELEASE_STEPS:
                phase = "withdraw"
        elif phase == "withdraw":  # straight up out of the open fingers, then back
            phase = "away" if arm.goto([0.0, -0.05, 1.13], eef, 0.02) else phase
        elif phase == "away":
            arm.goto([0.0, -0.30, 1.15], eef)
        self.phase[0] = phase

    def _robot1(self, obs, eef, payload, axis, flat) -> None:
        arm, phase, here = self.arms[1], self.phase[1], eef[1]
        trash = np.asarray(obs["trash_pos"])
        take = payload + (0.06 if self.sign > 0 else 0.01) * axis  # near the head, where the weight is
        if phase == "trash_above":
            arm.yaw = self._closing_yaw(arm.down, _rotation(obs["trash_quat"])[:2, 0])
            phase = "trash_down" if arm.goto(trash + [0, 0, 0.12], here) else phase
        elif phase == "trash_down":
            phase = "trash_grasp" if arm.goto(trash, here, 0.008) else phase
        elif phase in ("trash_grasp", "take_grasp"):
            arm.gripper = CLOSE
            self.count[1] += 1
            if self.count[1] > self.GRASP_STEPS:
                phase, self.count[1] = ("trash_up" if phase == "trash_grasp" else "taken"), 0
        elif phase == "trash_up":
            phase = "trash_carry" if arm.goto([here[0], here[1], 1.05], here, 0.02) else phase
        elif phase == "trash_carry":
            bin_pos = np.asarray(obs["trash_bin_pos"])
            phase = "trash_drop" if arm.goto([bin_pos[0], bin_pos[1], 1.05], here, 0.02) else phase
        elif phase == "trash_drop":
            arm.gripper = OPEN
            self.count[1] += 1
            if self.count[1] > 8:
                phase, self.count[1] = "wait", 0
        elif phase == "wait":
            arm.yaw = self._closing_yaw(arm.down, [1.0, 0.0])
            arm.goto([0.0, 0.15, 1.2], here)
            if self.phase[0] == "handover" and np.linalg.norm(eef[0] - self.HANDOVER) < 0.02:
                phase = "take_above"
        elif phase == "take_above":
            arm.yaw = self._closing_yaw(arm.down, [-flat[1], flat[0]])
            if arm.goto(take + [0, 0, 0.08], here):
                phase, self.count[1] = "take_down", 0
        elif phase == "take_down":
            self.count[1] += 1
            if arm.goto(take, here, 0.012) or self.count[1] > self.REACH_TIMEOUT:
                phase, self.count[1] = "take_grasp", 0
        elif phase == "taken":
            phase = "carry_up" if self.phase[0] == "away" else phase
        elif phase == "carry_up":
            phase = "carry" if arm.goto([here[0], 0.2, 1.15], here, 0.02) else phase
        elif phase == "carry":
            bin_pos = np.asarray(obs["target_bin_pos"])
            if arm.goto([bin_pos[0], bin_pos[1], 1.05], here, 0.02):
                phase = "drop"
        elif phase == "drop":
            arm.gripper = OPEN
        self.phase[1] = phase


EXPERTS = {"lift": LiftExpert, "can": CanExpert, "square": SquareExpert, "transport": TransportExpert}


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
