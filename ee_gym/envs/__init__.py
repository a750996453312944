"""The ConsistentEE environments and their registration.

Every task in ``ee_gym.tasks`` gets the id ``ConsistentEE-<Task>-v0`` (``ConsistentEE-RTE-v0``,
``ConsistentEE-SST2-v0``, ...), registered in one loop at import, with the single env as
``entry_point`` and the natively batched vector env as ``vector_entry_point``. Tasks made later with
``task_from_files`` / ``task_from_hub`` are registered when they are made.
"""

from __future__ import annotations

import gymnasium as gym

from ee_gym import tasks
from ee_gym.envs.classification import CONTINUE, EXIT, ConsistentEEEnv, EpisodeOverError
from ee_gym.envs.observations import OBS_MODES, ObservationEncoder, StatsView
from ee_gym.envs.sb3 import SB3VecEnv, make_sb3_vec_env
from ee_gym.envs.table import ExitTable
from ee_gym.envs.vector import ConsistentEEVectorEnv

ENV_PREFIX = "ConsistentEE"


def env_id(task: str | tasks.TaskSpec) -> str:
    """``ConsistentEE-<Task>-v0`` for a task name or spec."""
    return f"{ENV_PREFIX}-{tasks.get_task(task).env_name}-v0"


def register_task_env(spec: tasks.TaskSpec) -> str:
    """Register (or re-register) the env id of one task and return it."""
    name = env_id(spec)
    gym.registry.pop(name, None)  # a task made again replaces its env id (no override warning)
    gym.register(
        id=name,
        entry_point="ee_gym.envs.classification:ConsistentEEEnv",
        vector_entry_point="ee_gym.envs.vector:ConsistentEEVectorEnv",
        kwargs={"task": spec.name},
    )
    return name


def registered_ids() -> list[str]:
    """Every ConsistentEE id in Gymnasium's registry."""
    return sorted(i for i in gym.registry if i.startswith(ENV_PREFIX + "-"))


for _name in tasks.task_names():
    register_task_env(tasks.get_task(_name))
tasks.on_register(register_task_env)

__all__ = [
    "CONTINUE",
    "EXIT",
    "OBS_MODES",
    "ConsistentEEEnv",
    "ConsistentEEVectorEnv",
    "EpisodeOverError",
    "ExitTable",
    "ObservationEncoder",
    "SB3VecEnv",
    "StatsView",
    "env_id",
    "make_sb3_vec_env",
    "register_task_env",
    "registered_ids",
]
