"""Deterministic behaviour cloning over action chunks: one network maps the observation window to the action
chunk, trained with the mean squared error (L2) on the normalized chunk. The baseline the generative policies
are measured against, and the DoPr paper's Humanoid setting (a residual MLP trained by L2 behaviour cloning).

It draws no noise: the generator the trainer and evaluator pass is accepted and unused, so a BC policy's loss
and actions depend only on its weights and inputs.
"""

from __future__ import annotations

import torch.nn.functional as F

from dopr_robot.policies.base import ActionChunkPolicy


class BCPolicy(ActionChunkPolicy):
    def _loss(self, actions, cond, generator, rows=None):
        if rows is not None:
            actions, cond = actions[rows], cond[rows]
        return F.mse_loss(self.model(cond), actions)

    def _sample(self, shape, cond, generator):
        return self.model(cond)
