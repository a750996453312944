"""Reference exits that no deployed model could take: they read labels and later layers.

Both answer from the env they are bound to (its table, and which input is at which layer in each
sub-env), not from the observation, so they work with any ``obs_mode``; they are marked
``deployable = False`` and bound what a policy over the same heads can reach.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ee_gym.envs import ConsistentEEVectorEnv
from ee_gym.policy import ExitPolicy


class _EnvPeeker(ExitPolicy):
    obs_mode = "stats"
    deployable = False

    def __init__(self) -> None:
        self.env: ConsistentEEVectorEnv | None = None

    def bind(self, env: ConsistentEEVectorEnv) -> None:
        self.env = env

    def act(self, obs: Any, deterministic: bool = True) -> np.ndarray:
        if self.env is None:
            raise RuntimeError(f"{self.name} reads the env's table: call policy.bind(env) before act")
        env = self.env
        return self.exits(env.table, env.index, env.layer - 1).astype(np.int64)

    def exits(self, table, index: np.ndarray, layer0: np.ndarray) -> np.ndarray:
        """Boolean [num_envs]: exit input ``index`` at 0-based layer ``layer0``."""
        raise NotImplementedError


class Oracle(_EnvPeeker):
    """Exit at the earliest layer whose head is right (else at L). Not deployable: reads the labels."""

    name = "oracle"

    def exits(self, table, index, layer0):
        return table.correct[index, layer0]


class OracleConsistent(_EnvPeeker):
    """Exit at the earliest layer whose prediction agrees with the last layer's: the same label, or
    for a regression task within the task's tolerance of the last layer's value (the task's own
    notion of a right answer, with the full model's answer as the label).

    The most speed possible with the full model's answers (classification: identical ones). Not
    deployable: reads the last layer's prediction before getting there.
    """

    name = "oracle-consistent"

    def exits(self, table, index, layer0):
        # exact equality of real-valued heads never holds before L: agreement is the target's rule
        return table.target.correct(table.predictions[index, layer0], table.predictions[index, -1])
