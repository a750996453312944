"""The ConsistentEE environments and their registration.

Every task gets the id ``ConsistentEE-<Task>-v0``, registered in one loop at import over
:data:`ENV_TASKS`: the classification tasks of ``ee_gym.tasks`` (``ConsistentEE-RTE-v0``,
``ConsistentEE-SST2-v0``, ...: one input per episode) and the generation tasks (token-level exits on a
decoder LM, ``ConsistentEE-XSum-v0``: one generated token per episode). Each kind names its single
env and its natively batched vector env by string entry points, so registering imports no env module,
no model code and no torch; they load when an env is made. Every id's kwargs are plain JSON data, so
``gym.spec(id).to_json()`` works for every id.

Tasks made later with ``task_from_files`` / ``task_from_hub`` are registered when they are made; their
ids also carry the task's spec (``kwargs["task_spec"]``), so that a process that never made the task
(the spawned or forkserver workers of ``gym.make_vec(..., vectorization_mode="async")``, an SB3
``SubprocVecEnv`` given ``gym.spec(id)``) rebuilds it from the id alone.

The env classes (``ConsistentEEEnv``, ``ConsistentEEVectorEnv``, ...) are attributes of this package
that load on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import gymnasium as gym

from ee_gym import tasks
from ee_gym.envs.base import CONTINUE, EXIT, EpisodeOverError, InputIndexError

ENV_PREFIX = "ConsistentEE"


@dataclass(frozen=True)
class EnvKind:
    """One kind of episode: the entry points of its single and vector envs."""

    entry_point: str
    vector_entry_point: str


#: what an episode is, by kind
ENV_KINDS_BY_NAME: dict[str, EnvKind] = {
    "classification": EnvKind(
        "ee_gym.envs.classification:ConsistentEEEnv", "ee_gym.envs.vector:ConsistentEEVectorEnv"
    ),
    "generation": EnvKind(
        "ee_gym.envs.generation:ConsistentEETokenEnv", "ee_gym.envs.generation:make_token_vector_env"
    ),
}
#: kind -> single-env entry point (the former shape of this table)
ENV_KINDS = {name: kind.entry_point for name, kind in ENV_KINDS_BY_NAME.items()}
CLASSIFICATION_ENTRY_POINT = ENV_KINDS["classification"]
GENERATION_ENTRY_POINT = ENV_KINDS["generation"]


@dataclass(frozen=True)
class EnvTask:
    """A task as the registry sees it: its name, its name in the env id, its kind, and what a
    process needs to rebuild it (a user task's spec as plain data)."""

    name: str
    env_name: str
    kind: str
    task_spec: dict | None = None

    @property
    def id(self) -> str:
        return f"{ENV_PREFIX}-{self.env_name}-v0"

    def kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"task": self.name}
        if self.task_spec is not None:
            kwargs["task_spec"] = self.task_spec
        return kwargs


#: the generation tasks, as the classification ones are in ``ee_gym.tasks``: name -> its env name
GENERATION_ENV_NAMES = {"xsum": "XSum"}


def _classification_task(spec: tasks.TaskSpec) -> EnvTask:
    builtin = spec.name in _BUILTIN_NAMES
    return EnvTask(
        spec.name, spec.env_name, "classification", None if builtin else tasks.task_spec_to_dict(spec)
    )


def env_tasks() -> list[EnvTask]:
    """Every task that has an env id now: the classification tasks, then the generation ones."""
    found = [_classification_task(tasks.get_task(name)) for name in tasks.task_names()]
    return found + [EnvTask(name, env, "generation") for name, env in GENERATION_ENV_NAMES.items()]


def env_id(task: str | tasks.TaskSpec) -> str:
    """``ConsistentEE-<Task>-v0`` for a task name or spec."""
    if isinstance(task, str) and task.lower() in GENERATION_ENV_NAMES:
        return f"{ENV_PREFIX}-{GENERATION_ENV_NAMES[task.lower()]}-v0"
    return f"{ENV_PREFIX}-{tasks.get_task(task).env_name}-v0"


def register(task: EnvTask) -> str:
    """Register (or re-register) the env id of one task and return it."""
    kind = ENV_KINDS_BY_NAME[task.kind]
    gym.registry.pop(task.id, None)  # a task made again replaces its env id (no override warning)
    gym.register(
        id=task.id,
        entry_point=kind.entry_point,
        vector_entry_point=kind.vector_entry_point,
        kwargs=task.kwargs(),
    )
    return task.id


def register_task_env(spec: tasks.TaskSpec) -> str:
    """Register (or re-register) the env id of one classification task and return it."""
    return register(_classification_task(spec))


def register_generation_env(task: str) -> str:
    """Register (or re-register) the env id of one generation task and return it."""
    return register(EnvTask(task, GENERATION_ENV_NAMES[task], "generation"))


def registered_ids(kind: str | None = None) -> list[str]:
    """Every ConsistentEE id in Gymnasium's registry, or those of one ``kind``
    (``"classification"``: one input per episode; ``"generation"``: one generated token per episode)."""
    if kind is not None and kind not in ENV_KINDS:
        raise ValueError(f"unknown env kind {kind!r}; choose one of {', '.join(ENV_KINDS)}")
    ids = (i for i in gym.registry if i.startswith(ENV_PREFIX + "-"))
    return sorted(i for i in ids if kind is None or gym.spec(i).entry_point == ENV_KINDS[kind])


_BUILTIN_NAMES = frozenset(spec.name for spec in tasks.BUILTIN_TASKS)
for _task in env_tasks():  # the one registration loop
    register(_task)
tasks.on_register(register_task_env)

#: names this package serves on first use, and the module each lives in
_LAZY = {
    "ConsistentEEEnv": "ee_gym.envs.classification",
    "LayerEpisodeEnv": "ee_gym.envs.base",
    "ConsistentEETokenEnv": "ee_gym.envs.generation",
    "make_token_vector_env": "ee_gym.envs.generation",
    "ConsistentEEVectorEnv": "ee_gym.envs.vector",
    "SB3VecEnv": "ee_gym.envs.sb3",
    "make_sb3_vec_env": "ee_gym.envs.sb3",
    "ExitTable": "ee_gym.envs.table",
    "OBS_MODES": "ee_gym.observations",
    "ObservationEncoder": "ee_gym.observations",
    "StatsView": "ee_gym.observations",
}


def __getattr__(name: str) -> Any:
    """The env classes, loaded on first use (so that registering imports none of them)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CONTINUE",
    "EXIT",
    "OBS_MODES",
    "ConsistentEEEnv",
    "ConsistentEETokenEnv",
    "ConsistentEEVectorEnv",
    "EnvTask",
    "EpisodeOverError",
    "ExitTable",
    "InputIndexError",
    "ObservationEncoder",
    "SB3VecEnv",
    "StatsView",
    "env_id",
    "env_tasks",
    "make_sb3_vec_env",
    "make_token_vector_env",
    "register",
    "register_generation_env",
    "register_task_env",
    "registered_ids",
]
