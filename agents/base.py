"""The protocol every exit policy follows, learned or rule-based.

A policy sees a batch of observations of one mode (``obs_mode``, see ee_gym.envs.observations) and
answers one action per row: 0 = CONTINUE, 1 = EXIT. Learners train on an env first (``learn``); rules
have nothing to learn. ``bind`` hands a policy the vector env it is about to act in, before any
``act``: most policies ignore it; the oracles use it to peek at labels and later layers, which is
why they are marked ``deployable = False``: they are references, not policies one could ship.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ee_gym.envs import ConsistentEEVectorEnv


class ExitPolicy(ABC):
    """Base class of exit policies. Subclasses set ``name`` and ``obs_mode`` and implement ``act``."""

    name: ClassVar[str] = "policy"
    #: the observation mode this policy reads (the env is made with it)
    obs_mode: ClassVar[str] = "stats"
    #: False for references that read what a deployed model cannot know (labels, later layers)
    deployable: ClassVar[bool] = True
    #: True for policies whose ``learn`` trains something
    learns: ClassVar[bool] = False

    def bind(self, env: ConsistentEEVectorEnv) -> None:
        """Called with the vector env before acting in it. Default: nothing to do."""
        return None

    @abstractmethod
    def act(self, obs: Any, deterministic: bool = True) -> np.ndarray:
        """Actions (int64, 0 or 1) for a batch of observations."""

    def learn(self, env: ConsistentEEVectorEnv, **kwargs: Any) -> ExitPolicy:
        """Train on ``env`` (a vector env made with this policy's ``obs_mode``). Rules: no-op."""
        return self

    # -- persistence: rules save their parameters as JSON; learners add their weights -------------
    def get_params(self) -> dict[str, Any]:
        """The constructor arguments that recreate this policy."""
        return {}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the policy to a folder (``policy.json`` plus whatever a learner adds)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self._save_weights(folder)  # first: a learner that cannot save leaves no policy.json behind
        (folder / "policy.json").write_text(json.dumps({"name": self.name, "params": self.get_params()}))
        return folder

    def _save_weights(self, folder: Path) -> None:
        """Learners write their weights here."""
        return None

    def _load_weights(self, folder: Path) -> None:
        """Learners read their weights here."""
        return None

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"


def load_policy(path: str | os.PathLike) -> ExitPolicy:
    """Load any policy saved with ``ExitPolicy.save``."""
    from agents import make

    folder = Path(path)
    if not (folder / "policy.json").is_file():
        raise FileNotFoundError(f"{folder} holds no saved policy (no policy.json)")
    record = json.loads((folder / "policy.json").read_text())
    policy = make(record["name"], **record["params"])
    policy._load_weights(folder)
    return policy
