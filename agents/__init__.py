"""Exit policies, swappable by name: ``agents.make("reinforce")``, ``agents.make("entropy", threshold=0.2)``.

Every policy here implements :class:`ee_gym.policy.ExitPolicy` and is registered, on import, in the
core's policy registry (:func:`ee_gym.policy.register_policy`), through which the pipeline, stage 3,
inference and the CLI find policies by name without importing this package. Adding an algorithm is
one class written to the protocol, registered: one line in ``REGISTRY`` below for the policies of
this package, or an entry point in the ``ee_gym.policies`` group for another package's.
"""

from __future__ import annotations

from typing import Any

from ee_gym.policy import ExitPolicy, load_policy, make_policy, policy_names, register_policy

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
    # the supervised learned baseline (BERxiT's learning-to-exit module)
    "learned-exit": "agents.learned_exit:LearnedExit",
    # classic rules (docs: the baselines)
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
for _name, _target in REGISTRY.items():
    register_policy(_name, _target)


def names() -> list[str]:
    """Every registered policy name (this package's and any other's registered in ee_gym)."""
    return policy_names()


def make(name: str, **kwargs: Any) -> ExitPolicy:
    """A ready policy: ``make("ppo")``, ``make("patience", patience=2)``.

    An unknown name, or a keyword the policy does not take, raises
    :class:`~ee_gym.validation.ConfigError` (a ValueError) listing the valid ones; so do values out of
    range (``make("reinforce", hidden_size=0)``, ``make("maxprob", threshold=2.0)``).
    """
    return make_policy(name, **kwargs)


__all__ = ["REGISTRY", "ExitPolicy", "load_policy", "make", "names"]
