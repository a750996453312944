"""rl-zoo3 hyperparameter files for the ee-gym ids, shipped inside the package.

``ppo.yml``, ``a2c.yml``, ``dqn.yml`` and ``qrdqn.yml`` are in the zoo's format: one entry per
registered id and a ``default`` for the ids of your own tasks. ``default`` is what ee-gym's own SB3
learner trains with (``agents/sb3.py``), laid out for the zoo's vector env of single envs; a task
the comparisons searched (``benchmarks/results/<task>/results.json``, ``tuning``) takes the
candidate its validation slice chose. (MaskablePPO is not among the zoo's algorithms.)

    python -m rl_zoo3.train --algo ppo --env ConsistentEE-RTE-v0 --gym-packages ee_gym \\
        --conf-file $(python -m ee_gym.zoo ppo)
"""

from __future__ import annotations

from pathlib import Path

from ee_gym.validation import ConfigError

#: the zoo algorithms a file is shipped for
ZOO_ALGOS = ("ppo", "a2c", "dqn", "qrdqn")


def conf_file(algo: str) -> Path:
    """The hyperparameter file of a zoo algorithm (``--conf-file``)."""
    if algo not in ZOO_ALGOS:
        raise ConfigError(f"no rl-zoo3 file for {algo!r}: ee-gym ships {', '.join(ZOO_ALGOS)}")
    return Path(__file__).with_name(f"{algo}.yml")
