"""ConsistentEE's reward and its named variants (docs/method.md, "Stage 2").

Every reward is paid once, at the exit layer t (1..L), from the cross-entropy of the exit's head,
whether it was right, the input's memorized layer m and the price alpha of one layer:

    hardness  R = -CE - alpha * t * (1 - m / L)     easy inputs pay the full price per layer
    plain     R = -CE - alpha * t
    ce        R = -CE                               what the authors' released code runs
    accuracy  R = 1[correct] - alpha * t

All functions take numpy arrays (or scalars) and broadcast.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ee_gym.tasks import TaskDefaults, UnknownTaskError, task_default
from ee_gym.validation import ConfigError, check_float

#: alpha for a 12-layer model when a task names none (the authors' code notes 0.035 for RTE); a task's
#: own is ``TaskDefaults.alpha`` on its spec (:func:`ee_gym.tasks.task_default`).
GENERIC_BASE_ALPHA = TaskDefaults().alpha
REFERENCE_DEPTH = 12


def default_alpha(task: str, num_layers: int) -> float:
    """The per-layer price for a model of ``num_layers`` layers.

    Scaled by 12 / L so that going through the whole network costs what it costs a 12-layer
    BERT-base in the paper (alpha * L stays the same).
    """
    try:
        base = task_default(task, "alpha")
    except UnknownTaskError:  # a name no spec was registered for: the generic price
        base = GENERIC_BASE_ALPHA
    return base * REFERENCE_DEPTH / num_layers


def check_alpha(alpha, name: str = "alpha") -> float | None:
    """``alpha`` as a float when it is a finite price >= 0, None (the default price) as None, else
    :class:`~ee_gym.validation.ConfigError`: what every env constructor checks its ``alpha`` with."""
    if alpha is None:
        return None
    try:
        return check_float(name, alpha, minimum=0.0)
    except ConfigError as error:
        raise ConfigError(
            f"{error}: alpha is the price of one layer, a number >= 0 (or None for the default, "
            "ee_gym.rewards.default_alpha)"
        ) from None


def hardness(ce, correct, t, m, num_layers: int, alpha: float):
    return -ce - alpha * t * (1.0 - m / num_layers)


def plain(ce, correct, t, m, num_layers: int, alpha: float):
    return -ce - alpha * t


def cross_entropy_only(ce, correct, t, m, num_layers: int, alpha: float):
    return -np.asarray(ce, dtype=np.float64)


def accuracy(ce, correct, t, m, num_layers: int, alpha: float):
    return np.asarray(correct, dtype=np.float64) - alpha * t


RewardFn = Callable[..., np.ndarray]
REWARDS: dict[str, RewardFn] = {
    "hardness": hardness,
    "plain": plain,
    "ce": cross_entropy_only,
    "accuracy": accuracy,
}


def get_reward(name: str) -> RewardFn:
    """The reward function called ``name``; unknown names list the valid ones."""
    if not isinstance(name, str) or name not in REWARDS:
        raise ConfigError(f"unknown reward {name!r}; choose one of {', '.join(REWARDS)}")
    return REWARDS[name]
