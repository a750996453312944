"""ee-gym: Gymnasium environments for learned early exiting of language models (ConsistentEE).

``import ee_gym`` registers ``ConsistentEE-<Task>-v0`` for every task and loads nothing heavy: the
names below that need torch or transformers (the model, the cache, stage 1) are attributes that load
on first use, as are the submodules (``ee_gym.cache``, ``ee_gym.training``, ...).
"""

from __future__ import annotations

import importlib
from typing import Any

from ee_gym.hardness import memorized_layer
from ee_gym.tasks import TaskSpec, get_task, load_split, task_from_files, task_from_hub, task_names

__version__ = "0.1.0"

#: names served on first use, and the module each lives in
_LAZY = {
    "ExitCache": "ee_gym.cache",
    "StaleCacheError": "ee_gym.cache",
    "build_cache": "ee_gym.cache",
    "open_cache": "ee_gym.cache",
    "MultiExitConfig": "ee_gym.multiexit",
    "MultiExitModel": "ee_gym.multiexit",
    "Stage1Config": "ee_gym.training",
    "train_stage1": "ee_gym.training",
}

__all__ = [
    "ExitCache",
    "MultiExitConfig",
    "MultiExitModel",
    "Stage1Config",
    "StaleCacheError",
    "TaskSpec",
    "build_cache",
    "get_task",
    "load_split",
    "memorized_layer",
    "open_cache",
    "task_from_files",
    "task_from_hub",
    "task_names",
    "train_stage1",
]


def __getattr__(name: str) -> Any:
    """Heavy names and submodules, imported on first use."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


# Registers ConsistentEE-<Task>-v0 for every task (one loop, at import; string entry points only).
from ee_gym import envs  # noqa: E402,F401
