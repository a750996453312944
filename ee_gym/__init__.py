"""ee-gym: Gymnasium environments for learned early exiting of language models (ConsistentEE)."""

from ee_gym.cache import ExitCache, StaleCacheError, build_cache, open_cache
from ee_gym.hardness import memorized_layer
from ee_gym.multiexit import MultiExitConfig, MultiExitModel
from ee_gym.tasks import TaskSpec, get_task, load_split, task_from_files, task_from_hub, task_names
from ee_gym.training import Stage1Config, train_stage1

__version__ = "0.1.0"

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

# Registers ConsistentEE-<Task>-v0 for every task (one loop, at import).
from ee_gym import envs  # noqa: E402,F401
