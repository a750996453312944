"""The protocol every exit policy follows, learned or rule-based: :mod:`ee_gym.policy`.

It lives in the core so that the pipeline, stage 3, inference and the CLI drive any policy without
importing this package; these names stay importable from here (``from agents.base import
ExitPolicy``) for the policies and scripts written against them.
"""

from __future__ import annotations

from ee_gym.policy import (
    POLICY_FILE,
    SHAPE_KEYS,
    ExitPolicy,
    PolicyMismatchError,
    TrainingBudget,
    describe_shapes,
    env_shapes,
    load_policy,
)

__all__ = [
    "POLICY_FILE",
    "SHAPE_KEYS",
    "ExitPolicy",
    "PolicyMismatchError",
    "TrainingBudget",
    "describe_shapes",
    "env_shapes",
    "load_policy",
]
