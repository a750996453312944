"""The ConsistentEE environments and their registration.

Every task in ``ee_gym.tasks`` gets the id ``ConsistentEE-<Task>-v0`` (``ConsistentEE-RTE-v0``,
``ConsistentEE-SST2-v0``, ...), registered in one loop at import, with the single env as
``entry_point`` and the natively batched vector env as ``vector_entry_point``. Tasks made later with
``task_from_files`` / ``task_from_hub`` are registered when they are made; their ids also carry the
task's spec as plain JSON data (``kwargs["task_spec"]``), so that a process that never made the task
(the spawned or forkserver workers of ``gym.make_vec(..., vectorization_mode="async")``, an SB3
``SubprocVecEnv`` given ``gym.spec(id)``) rebuilds it from the id alone.

Every generation task (token-level exits on a decoder LM, ``ee_gym.envs.generation``) gets
``ConsistentEE-<Task>-v0`` too (``ConsistentEE-XSum-v0``), registered in a second loop: its episodes
are generated tokens, and its vector entry point builds the same native vector env over a token table.
"""

from __future__ import annotations

import gymnasium as gym

from ee_gym import tasks
from ee_gym.envs.classification import (
    CONTINUE,
    EXIT,
    ConsistentEEEnv,
    EpisodeOverError,
    InputIndexError,
)
from ee_gym.envs.generation import ConsistentEETokenEnv, make_token_vector_env
from ee_gym.envs.observations import OBS_MODES, ObservationEncoder, StatsView
from ee_gym.envs.sb3 import SB3VecEnv, make_sb3_vec_env
from ee_gym.envs.table import ExitTable
from ee_gym.envs.vector import ConsistentEEVectorEnv

ENV_PREFIX = "ConsistentEE"
#: generation task -> its name in the env id
GENERATION_ENV_NAMES = {"xsum": "XSum"}
CLASSIFICATION_ENTRY_POINT = "ee_gym.envs.classification:ConsistentEEEnv"
GENERATION_ENTRY_POINT = "ee_gym.envs.generation:ConsistentEETokenEnv"
ENV_KINDS = {"classification": CLASSIFICATION_ENTRY_POINT, "generation": GENERATION_ENTRY_POINT}


def env_id(task: str | tasks.TaskSpec) -> str:
    """``ConsistentEE-<Task>-v0`` for a task name or spec."""
    return f"{ENV_PREFIX}-{tasks.get_task(task).env_name}-v0"


def register_task_env(spec: tasks.TaskSpec) -> str:
    """Register (or re-register) the env id of one task and return it."""
    name = env_id(spec)
    kwargs: dict = {"task": spec.name}
    if spec.name not in _BUILTIN_NAMES:  # a user task: other processes rebuild it from the id
        kwargs["task_spec"] = tasks.task_spec_to_dict(spec)
    gym.registry.pop(name, None)  # a task made again replaces its env id (no override warning)
    gym.register(
        id=name,
        entry_point=CLASSIFICATION_ENTRY_POINT,
        vector_entry_point="ee_gym.envs.vector:ConsistentEEVectorEnv",
        kwargs=kwargs,
    )
    return name


def register_generation_env(task: str) -> str:
    """Register (or re-register) the env id of one generation task and return it."""
    name = f"{ENV_PREFIX}-{GENERATION_ENV_NAMES[task]}-v0"
    gym.registry.pop(name, None)
    gym.register(
        id=name,
        entry_point=GENERATION_ENTRY_POINT,
        vector_entry_point="ee_gym.envs.generation:make_token_vector_env",
        kwargs={"task": task},
    )
    return name


def registered_ids(kind: str | None = None) -> list[str]:
    """Every ConsistentEE id in Gymnasium's registry, or those of one ``kind``
    (``"classification"``: one input per episode; ``"generation"``: one generated token per episode)."""
    if kind is not None and kind not in ENV_KINDS:
        raise ValueError(f"unknown env kind {kind!r}; choose one of {', '.join(ENV_KINDS)}")
    ids = (i for i in gym.registry if i.startswith(ENV_PREFIX + "-"))
    return sorted(i for i in ids if kind is None or gym.spec(i).entry_point == ENV_KINDS[kind])


_BUILTIN_NAMES = frozenset(spec.name for spec in tasks.BUILTIN_TASKS)
for _name in tasks.task_names():
    register_task_env(tasks.get_task(_name))
tasks.on_register(register_task_env)
for _name in GENERATION_ENV_NAMES:
    register_generation_env(_name)

__all__ = [
    "CONTINUE",
    "EXIT",
    "OBS_MODES",
    "ConsistentEEEnv",
    "ConsistentEETokenEnv",
    "ConsistentEEVectorEnv",
    "EpisodeOverError",
    "ExitTable",
    "InputIndexError",
    "ObservationEncoder",
    "SB3VecEnv",
    "StatsView",
    "env_id",
    "make_sb3_vec_env",
    "make_token_vector_env",
    "register_generation_env",
    "register_task_env",
    "registered_ids",
]
