"""Rotation representations of absolute pose actions: axis-angle (robosuite's controller input) and the
continuous 6-D representation (Zhou et al. 2019) that diffusion_policy trains Tool-Hang and Transport on.

An absolute pose action of one arm is `[x, y, z, r (3 or 6), gripper]`: 7-D with an axis-angle `r`, 10-D with a
6-D `r`. A robot with k arms concatenates k such blocks (Transport: 14-D / 20-D), diffusion_policy's layout.

The 6-D form is the first two rows of the rotation matrix, and back is Gram-Schmidt on them (the rows of
pytorch3d's matrix_to_rotation_6d / rotation_6d_to_matrix, which diffusion_policy's RotationTransformer uses),
so a file converted by diffusion_policy reads the same here. Axis-angle <-> matrix goes through scipy's
Rotation, which is exact near angle pi, where hand-written log maps lose precision. Pure numpy + scipy.
"""

from __future__ import annotations

import numpy as np

ROTATIONS = ("axis_angle", "rotation_6d")
_ROTATION_WIDTH = {"axis_angle": 3, "rotation_6d": 6}


def axis_angle_to_matrix(rotvec: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation  # here: evaluation's main process imports envs/ but rotates nothing

    rotvec = np.asarray(rotvec, dtype=np.float64)
    return Rotation.from_rotvec(rotvec.reshape(-1, 3)).as_matrix().reshape(*rotvec.shape[:-1], 3, 3)


def matrix_to_axis_angle(matrix: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    matrix = np.asarray(matrix, dtype=np.float64)
    return Rotation.from_matrix(matrix.reshape(-1, 3, 3)).as_rotvec().reshape(*matrix.shape[:-2], 3)


def matrix_to_rotation_6d(matrix: np.ndarray) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float64)
    return matrix[..., :2, :].reshape(*matrix.shape[:-2], 6)


def rotation_6d_to_matrix(d6: np.ndarray) -> np.ndarray:
    """Gram-Schmidt: any 6 numbers with independent halves give a rotation (a policy's output need not be exact)."""
    d6 = np.asarray(d6, dtype=np.float64)
    a1, a2 = d6[..., :3], d6[..., 3:]
    b1 = a1 / np.linalg.norm(a1, axis=-1, keepdims=True)
    b2 = a2 - np.sum(b1 * a2, axis=-1, keepdims=True) * b1
    b2 = b2 / np.linalg.norm(b2, axis=-1, keepdims=True)
    return np.stack([b1, b2, np.cross(b1, b2)], axis=-2)


def axis_angle_to_rotation_6d(rotvec: np.ndarray) -> np.ndarray:
    return matrix_to_rotation_6d(axis_angle_to_matrix(rotvec))


def rotation_6d_to_axis_angle(d6: np.ndarray) -> np.ndarray:
    return matrix_to_axis_angle(rotation_6d_to_matrix(d6))


def action_width(rotation: str, n_arms: int) -> int:
    """Width of an absolute pose action with this rotation representation: (3 + r + 1) per arm."""
    return (4 + _ROTATION_WIDTH[rotation]) * n_arms


def rotation_of_width(width: int, n_arms: int) -> str | None:
    """The rotation representation an absolute action of this width has, or None if neither fits."""
    for rotation in ROTATIONS:
        if width == action_width(rotation, n_arms):
            return rotation
    return None


def convert_actions(actions: np.ndarray, source: str, target: str, n_arms: int) -> np.ndarray:
    """(..., k * (4 + r)) absolute pose actions from one rotation representation to another (same dtype)."""
    actions = np.asarray(actions)
    if source == target:
        return actions
    per_arm = actions.reshape(*actions.shape[:-1], n_arms, action_width(source, 1))
    pos, rot, gripper = per_arm[..., :3], per_arm[..., 3:-1], per_arm[..., -1:]
    rot = axis_angle_to_rotation_6d(rot) if target == "rotation_6d" else rotation_6d_to_axis_angle(rot)
    out = np.concatenate([pos, rot.astype(per_arm.dtype, copy=False), gripper], axis=-1)
    return out.reshape(*actions.shape[:-1], action_width(target, n_arms))
