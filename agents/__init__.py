"""Exit policies, swappable by name: ``agents.make("reinforce")``, ``agents.make("entropy", threshold=0.2)``.

Adding an algorithm is one new file with an :class:`~agents.base.ExitPolicy` subclass plus one line
in ``REGISTRY`` below.
"""

from __future__ import annotations

from typing import Any

from agents.base import ExitPolicy, load_policy
from ee_gym.validation import ConfigError

# name -> "module:Class"; imported on first use so that a missing optional dependency only
# affects the policies that need it.
REGISTRY: dict[str, str] = {
    # learned (the paper's learner, then stable-baselines3 and sb3-contrib)
    "reinforce": "agents.reinforce:Reinforce",
    "ppo": "agents.sb3:PPOPolicy",
    "a2c": "agents.sb3:A2CPolicy",
    "dqn": "agents.sb3:DQNPolicy",
    "qrdqn": "agents.sb3:QRDQNPolicy",
    "maskable-ppo": "agents.sb3:MaskablePPOPolicy",
    # classic rules (BASELINES.md)
    "static": "agents.rules:Static",
    "entropy": "agents.rules:Entropy",
    "normentropy": "agents.rules:NormalizedEntropy",
    "maxprob": "agents.rules:MaxProb",
    "top2gap": "agents.rules:Top2Gap",
    "patience": "agents.rules:Patience",
    "pcee": "agents.rules:PCEE",
    # references that peek at labels or later layers (not deployable)
    "oracle": "agents.oracles:Oracle",
    "oracle-consistent": "agents.oracles:OracleConsistent",
}


def names() -> list[str]:
    """Every registered policy name."""
    return sorted(REGISTRY)


def make(name: str, **kwargs: Any) -> ExitPolicy:
    """A ready policy: ``make("ppo")``, ``make("patience", patience=2)``.

    An unknown name, or a keyword the policy does not take, raises
    :class:`~ee_gym.validation.ConfigError` (a ValueError) listing the valid ones; so do values out of
    range (``make("reinforce", hidden_size=0)``, ``make("maxprob", threshold=2.0)``).
    """
    import importlib

    if not isinstance(name, str) or name not in REGISTRY:
        raise ConfigError(f"unknown policy {name!r}; known: {', '.join(names())}")
    module, cls_name = REGISTRY[name].split(":")
    cls = getattr(importlib.import_module(module), cls_name)
    accepted = cls.accepted_arguments()
    unknown = [key for key in kwargs if accepted is not None and key not in accepted]
    if unknown:
        raise ConfigError(
            f"policy {name!r} takes no argument {', '.join(map(repr, unknown))}; it accepts "
            f"{', '.join(accepted) if accepted else 'no arguments'}"
        )
    return cls(**kwargs)


__all__ = ["REGISTRY", "ExitPolicy", "load_policy", "make", "names"]
